"""make study: the stage plan, the computed verdicts, the results writer, and the whole target at smoke scale."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT
from helpers.entries import compose_entry, subprocess_env

from mergevq.entries import study, study_results
from mergevq.models.merge import reachable_keeps

TABLES = ("reconstruction", "representation", "recovery", "generation")


def _config(*overrides: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose_entry("study", list(overrides)), resolve=True)


def test_plan_covers_every_variant_route_and_sweep():
    config = _config("scale=cpu")
    stages = study.plan(config)
    names = [s.name for s in stages]
    assert len(names) == len(set(names))
    for variant in ("g", "gr", "r"):
        assert names.index(f"train_{variant}") < names.index(f"evaluate_{variant}") < names.index(f"probe_{variant}")
    assert names.index("codes") < names.index("ar_mergear") < names.index("samples_mergear_strict")
    assert {"samples_raster", "samples_mergear_soft", "samples_randar", "sweep_codebook_report"} <= set(names)
    evaluate_g = next(s for s in stages if s.name == "evaluate_g")
    keeps = json.loads(next(a for a in evaluate_g.args if a.startswith("keeps=")).split("=", 1)[1])
    assert keeps == [k for k in reachable_keeps(256, 4) if round(k ** 0.5) ** 2 == k] and keeps[0] == 36
    train_gr = next(s for s in stages if s.name == "train_gr")
    assert train_gr.resumes and train_gr.expects.endswith(f"step_{config['scale']['tokenizer_steps']:08d}")
    assert "backend=cpu" in train_gr.args and f"train.max_steps={config['scale']['tokenizer_steps']}" in train_gr.args
    assert "num_classes=10" in next(s for s in stages if s.name == "ar_randar").args


def test_every_stage_composes_with_its_entry():
    """The overrides the study passes are keys the entries know (a typo would fail only an hour in)."""
    for stage in study.plan(_config("scale=smoke")):
        if stage.entry == "report" or callable(stage.args):
            continue
        args = [a.replace("{work}", "/tmp/w") for a in stage.args if not a.startswith("sweep=")]
        compose_entry("tokenize" if stage.entry == "pretokenize" else stage.entry, args)


def test_finished_stage_is_skipped_and_unfinished_output_cleared(tmp_path):
    stage = study.Stage("probe_x", "probe", ["ckpt=nowhere"], "out", "out/eval_card.json")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "probe_x.done").write_text("1.0\n")
    assert study.run_stage(stage, tmp_path) == 0.0  # no process started (ckpt=nowhere would fail)
    command = study.stage_command(study.Stage("r", "report", lambda work: [str(work / "sweep")], "o", "o/x"), tmp_path)
    assert command[1:] == ["-m", "mergevq.entries.report", str(tmp_path / "sweep")]


def test_rank_correlation_of_ranks_with_ties_and_degenerate_inputs():
    assert study_results.rank_correlation([1, 2, 3, 4], [10, 20, 20, 40]) == pytest.approx(0.9486833)  # tied ranks 2.5
    assert study_results.rank_correlation([1, 2, 3], [9.0, 4.0, 1.0]) == pytest.approx(-1.0)
    assert study_results.rank_correlation([1, 2], [1, 2]) is None
    assert study_results.rank_correlation([1, 2, 3], [5, 5, 5]) is None


def test_trend_verdict_is_computed_from_the_rows():
    falling = [{"variant": "G+R", "K": k, "rfid": 100 - k} for k in (16, 36, 64)]
    rising = [{"variant": "R", "K": k, "rfid": k} for k in (16, 36, 64)]
    assert "trend agrees" in study_results.trend_verdict(falling, "rfid", True, "rFID")
    assert "does not agree" in study_results.trend_verdict(rising, "rfid", True, "rFID")
    assert "partly agrees" in study_results.trend_verdict(falling + rising, "rfid", True, "rFID")


def _fake_work(work: Path) -> None:
    def card(path: Path, metrics: dict, **extra) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "eval_card.json").write_text(json.dumps({"metrics": metrics, **extra}))

    card(work / "tok_gr" / "eval", {str(k): {"rfid": 90 - k, "psnr": 10 + k / 10, "ssim": 0.5, "code_usage": 0.01,
                                             "rfid_recovered": 92 - k, "psnr_recovered": 9 + k / 10,
                                             "recovery_accuracy": 0.9 if k < 64 else 1.0} for k in (16, 36, 64)})
    card(work / "tok_gr" / "probe", {str(k): {"cls_top1": 0.7 - k / 1000, "mean_top1": 0.6} for k in (16, 36, 64)})
    for folder, kv, gfid in (("samples_raster", 63, 200.0), ("samples_randar", 47, 230.0)):
        (work / folder).mkdir()
        (work / folder / "sampling.json").write_text(json.dumps({"keep": 36, "positions": 64, "steps": 9, "num_samples": 20,
                                                                 "peak_kv_max": kv, "peak_kv_mean": kv}))
        card(work / folder, {"gfid": gfid, "precision": 0.1, "recall": 0.2, "class_accuracy": gfid / 400},
             reference={"num_images": 16}, classifier_accuracy=0.9)


def test_results_writer_gives_every_table_plot_and_json(tmp_path):
    config = _config("scale=smoke", "variants=[gr]", "sweeps=[merge_ratio]")
    _fake_work(tmp_path / "work")
    written = study_results.write_results(config, tmp_path / "work", tmp_path / "results", {"train_gr": {"seconds": 60.0,
                                                                                                    "group": "x"}})
    for name in TABLES:
        data = json.loads(written[name].read_text())
        assert data["rows"] and data["header"]["commit"] and data["header"]["scale"]["name"] == "smoke"
    for plot in ("rfid_vs_k", "probe_vs_k", "recovery_vs_k", "gfid_vs_kv"):
        assert written[plot].stat().st_size > 1000
    text = written["readme"].read_text()
    assert text.count("\n## ") == 6 and "1.0 minutes" in text
    assert "MergeAR" not in json.dumps(json.loads(written["generation"].read_text())["rows"])  # only what ran
    assert "RandAR + recovery 1.15x the raster gFID, class accuracy +7.5 points, 47/63 peak KV entries in 9/9 steps" in text
    assert "trend agrees on quality" in text
    rows = json.loads(written["generation"].read_text())["rows"]
    assert [r["class_accuracy"] for r in rows] == [0.5, 0.575] and rows[0]["classifier_accuracy"] == 0.9
    assert "(no evaluation cards: the sweep did not run)" in text


@pytest.mark.slow
def test_make_study_at_smoke_scale_writes_every_table_and_plot(tmp_path):
    """The make target as printed, a few steps per stage: every table and plot; a second run skips every stage."""
    # one sweep: the codebook sweep runs through the same three stages (its composition: a fast test above)
    args = (f"scale=smoke dataset=photos num_classes=11 variants=[gr] sweeps=[merge_ratio] features=random "
            f"work_dir={tmp_path / 'work'} results_dir={tmp_path / 'results'}")
    env = subprocess_env()
    proc = subprocess.run(["make", "study", f"ARGS={args}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = tmp_path / "results"
    for name in TABLES:
        assert json.loads((results / f"{name}.json").read_text())["rows"], name
    for plot in ("rfid_vs_k.png", "probe_vs_k.png", "recovery_vs_k.png", "gfid_vs_kv.png",
                 "sweep_merge_ratio/rfid_vs_k.png"):
        assert (results / plot).stat().st_size > 1000, plot
    text = (results / "README.md").read_text()
    assert "(no rows" not in text and "did not run" not in text and "untrained, randomly initialised" in text
    assert len(json.loads((results / "generation.json").read_text())["rows"]) == 4
    again = subprocess.run(["make", "study", f"ARGS={args}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done before, skipped") == len(study.plan(_config("variants=[gr]", "sweeps=[merge_ratio]")))
    refused = subprocess.run(["make", "study", f"ARGS={args.replace('features=random', 'features=inception')}"], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "holds a study with other settings (features differs)" in refused.stderr


def test_work_dir_of_another_study_is_refused(tmp_path):
    from mergevq.errors import UserError

    study.check_work_dir(tmp_path, _config("scale=smoke"))
    study.check_work_dir(tmp_path, _config("scale=smoke", "results_dir=elsewhere"))  # output place only: same study
    with pytest.raises(UserError, match=r"other settings \(scale, variants differ\).*work_dir="):
        study.check_work_dir(tmp_path, _config("scale=cpu", "variants=[gr]"))

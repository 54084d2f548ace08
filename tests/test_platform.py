"""The platform as a user meets it: every preset and sweep with every logger, W&B runs that survive a
restart, the paths group, the mixed-precision rule, scoped help and preset ownership, the sweeper
objective and an Optuna study on the tiny config (in-process)."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import yaml
from helpers.wandb import read_offline_wandb_runs
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mergevq.engine.runner import resolve_mixed_precision
from mergevq.entries import cli
from mergevq.entries.cli import CONF_DIR, check_preset, entry_help, preset_entry
from mergevq.entries.objective import metric_keep, objective, with_metric_validated
from mergevq.errors import UserError
from mergevq.runs.loggers import (
    LOGGER_KINDS,
    RUN_ID_FILE,
    CSVLogger,
    NoLogger,
    WandbLogger,
    logger_from_config,
)

ROOT = CONF_DIR.parent
PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
SWEEPS = sorted(p.stem for p in (CONF_DIR / "sweep").glob("*.yaml"))
SEARCHES = sorted(p.stem for p in (CONF_DIR / "hparams_search").glob("*.yaml"))


def compose_entry(entry: str, overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(entry, overrides=overrides)


def resolved(entry: str, overrides: list[str], run_dir) -> dict:
    extra = ["codes=/tmp/codes"] if entry == "train_ar" else []
    return OmegaConf.to_container(compose_entry(entry, [*overrides, *extra, f"run_dir={run_dir}"]), resolve=True)


# ------------------------------------------------------------------ every preset x sweep x logger


def preset_cases():
    cases = []
    for preset in PRESETS:
        group = (yaml.safe_load((CONF_DIR / "experiment" / f"{preset}.yaml").read_text()).get("logger") or {}).get("group")
        cases += [(preset_entry(preset), [f"experiment={preset}"], group)]  # demo presets set no group
    for study in SWEEPS:
        cases += [("train_tokenizer", [f"sweep={study}"], f"sweep_{study}"),
                  ("train_tokenizer", ["experiment=demo_tiny", f"sweep={study}"], f"sweep_{study}")]
    for search in SEARCHES:
        cases += [("train_tokenizer", [f"hparams_search={search}"], f"optuna_{search.removesuffix('_optuna')}")]
    return cases


def test_recipe_search_points_each_change_one_thing_of_the_demo_recipe(tmp_path):
    """sweep=recipe32: every point names an ablation file, and each ablation differs from experiment=demo_tiny
    in what it says (and only there: the run settings the sweep fixes aside)."""
    points = yaml.safe_load((CONF_DIR / "sweep" / "recipe32.yaml").read_text())["hydra"]["sweeper"]["params"]["ablation"]
    names = points.split(",")
    assert sorted(names) == sorted(p.stem for p in (CONF_DIR / "ablation").glob("*.yaml"))

    def flat(tree, prefix=""):
        return {k: v for key, value in tree.items() for k, v in (flat(value, f"{prefix}{key}.").items()
                                                                  if isinstance(value, dict) else [(prefix + key, value)])}

    base = flat(resolved("train_tokenizer", ["experiment=demo_tiny"], tmp_path))
    for name in names:
        changed = flat(resolved("train_tokenizer", ["experiment=demo_tiny", f"ablation={name}"], tmp_path))
        written = flat(yaml.safe_load((CONF_DIR / "ablation" / f"{name}.yaml").read_text()) or {})
        differ = {k for k in base if base[k] != changed.get(k)}
        assert differ == {k for k in written if base.get(k) != written[k]}, name
        assert all(changed[k] == v for k, v in written.items()), name
        assert (name == "none") == (not differ), name


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k == "wandb" else k for k in LOGGER_KINDS])
def test_every_preset_and_sweep_builds_every_logger(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # wandb.init checks every argument, writes nothing
    monkeypatch.setenv("WANDB_SILENT", "true")
    expected_type = {"csv": CSVLogger, "wandb": WandbLogger, "none": NoLogger}[kind]
    for index, (entry, overrides, group) in enumerate(preset_cases()):
        run_dir = tmp_path / str(index)
        config = resolved(entry, [*overrides, f"logger={kind}"], run_dir)
        assert config["logger"]["group"] == group, overrides
        logger = logger_from_config(config, run_dir)
        assert isinstance(logger, expected_type), overrides
        logger.log({"x": 1.0}, step=1)
        logger.finish()
        if kind == "csv":
            recorded = json.loads((run_dir / "logger.json").read_text())
            assert recorded["group"] == group and recorded["kind"] == "csv", overrides


def test_csv_logger_rejects_unknown_options(tmp_path):
    with pytest.raises(ValueError, match="logger=csv has no option projekt"):
        CSVLogger(tmp_path, projekt="x")


# ------------------------------------------------------------------ W&B run id across restarts




@pytest.mark.slow
def test_wandb_run_id_persists_across_restarts(wandb_offline):
    run_dir = wandb_offline
    config = {"task": "train_tokenizer", "resume": "auto",
              "logger": {"kind": "wandb", "project": "p", "group": "g", "tags": [], "name": None, "mode": None}}
    ids = []
    for first, last in ((1, 3), (3, 5)):  # a run, then its resume from the step-2 checkpoint
        with logger_from_config(config, run_dir) as logger:
            ids.append(logger.run_id)
            for step in range(first, last):
                logger.log({"loss": 1.0 / step}, step=step)
    assert ids[0] == ids[1] == (run_dir / RUN_ID_FILE).read_text().strip()
    runs = read_offline_wandb_runs(run_dir)
    assert [r["run_id"] for r in runs] == ids
    assert [row["_step"] for r in runs for row in r["history"]] == [1, 2, 3, 4]
    with logger_from_config({**config, "resume": "never"}, run_dir) as fresh:  # a new run: a new id
        assert fresh.run_id != ids[0] == ids[1]
    assert (run_dir / RUN_ID_FILE).read_text().strip() == fresh.run_id


def test_wandb_id_only_for_training_entries(wandb_offline, monkeypatch):
    """One-shot entries (no ``resume`` key) keep no id: rerunning them must not append to an old run."""
    config = {"task": "evaluate", "logger": {"kind": "wandb", "project": "p", "mode": "disabled"}}
    with logger_from_config(config, wandb_offline):
        pass
    assert not (wandb_offline / RUN_ID_FILE).exists()


# ------------------------------------------------------------------------------------ paths


def test_paths_group_sets_site_locations_once(tmp_path, monkeypatch):
    monkeypatch.delenv("MERGEVQ_DATA_DIR", raising=False)
    monkeypatch.setenv("MERGEVQ_WEIGHTS_DIR", "/env/w")
    config = resolved("train_tokenizer", ["experiment=tokenizer_256_gr_d64", "paths.data=/mnt/d"], tmp_path)
    assert config["data"]["root"] == "/mnt/d/imagenet"
    assert config["teacher"]["path"] == "/env/w/dinov2-base"
    assert config["tokenizer"]["encoder_init"] == "/env/w/vit_base_patch14_dinov2.safetensors"
    assert config["loss"]["perceptual"]["backbone_weights"] == "/env/w/vgg16-397923af.pth"
    small = resolved("train_tokenizer", ["experiment=tokenizer_256_gr_d32", "paths.weights=/x"], tmp_path)
    assert small["tokenizer"]["encoder_init"] == "/x/vit_small_patch14_dinov2.safetensors"
    assert resolved("train_tokenizer", ["data=imagenet"], tmp_path)["data"]["root"] == "/data/imagenet"


def test_no_preset_or_sweep_repeats_a_site_path():
    files = [*(CONF_DIR / "experiment").glob("*.yaml"), *(CONF_DIR / "sweep").glob("*.yaml"),
             *(ROOT / "experiments" / "sweeps").glob("*.yaml")]
    for file in files:
        body = "\n".join(line.split("#")[0] for line in file.read_text().splitlines())  # values, not comments
        for text in ("/data/", "/weights/", "???"):
            assert text not in body, (file.name, text)


# ------------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("hydra_value,launcher,expected", [
    (None, None, "no"), (None, "bf16", "bf16"), (None, "fp16", "fp16"),   # unset: the launcher's
    ("bf16", None, "bf16"), ("no", "no", "no"), ("bf16", "bf16", "bf16"),  # set: agree or no launcher
])
def test_mixed_precision_launcher_wins_when_unset(hydra_value, launcher, expected):
    assert resolve_mixed_precision(hydra_value, launcher) == expected


def test_mixed_precision_disagreement_is_one_line():
    with pytest.raises(UserError) as error:
        resolve_mixed_precision("bf16", "fp16")
    text = str(error.value)
    assert "\n" not in text and "backend.mixed_precision=bf16" in text and "fp16" in text
    assert "backend.mixed_precision=null" in text


def test_accelerator_takes_the_launcher_precision(monkeypatch):
    from accelerate.state import AcceleratorState

    from mergevq.engine.runner import build_accelerator

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    backend = {"name": "cpu", "device": "cpu", "mixed_precision": None}
    AcceleratorState._reset_state(reset_partial_state=True)  # earlier tests in this process built one
    try:
        assert build_accelerator(backend).mixed_precision == "bf16"
        with pytest.raises(UserError, match="launcher asks for bf16"):
            build_accelerator({**backend, "mixed_precision": "no"})
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # later tests build their own


# ------------------------------------------------------------------------ scoped help, presets


def test_each_entry_help_lists_only_its_groups_and_presets():
    tokenizer, ar = entry_help("train_tokenizer"), entry_help("train_ar")
    assert "tokenizer_256_gr_d64" in tokenizer and "demo_tiny" in tokenizer and "merge_ratio_optuna" in tokenizer
    assert "demo_ar" not in tokenizer and "ar_b_mergear_g" not in tokenizer and "\ngenerator:" not in tokenizer
    assert "demo_ar" in ar and "ar_l_randar_gr" in ar and "\ngenerator:" in ar
    assert "tokenizer_256" not in ar and "\ntokenizer:" not in ar and "\nsweep:" not in ar
    assert set(cli.entry_presets("train_tokenizer")) | set(cli.entry_presets("train_ar")) == set(PRESETS)


def test_another_entrys_preset_is_one_line_naming_its_entry(capsys):
    with pytest.raises(SystemExit) as stop:
        check_preset("train_tokenizer", ["experiment=demo_ar", "train.max_steps=1"])
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "generator (stage II) preset for mergevq.entries.train_ar" in line and "python -m mergevq.entries.train_ar" in line
    assert "+experiment" not in line and "tokenizer_256_gr_d64" in line
    with pytest.raises(SystemExit):
        check_preset("train_ar", ["experiment=tokenizer_256_g_d64"])
    check_preset("train_tokenizer", ["experiment=demo_tiny"])  # its own: no error


# ---------------------------------------------------------------------- the sweeper objective


def test_objective_reads_validation_at_the_nominal_k(tmp_path):
    config = resolved("train_tokenizer", ["tokenizer=tiny", "train.keep_candidates=[25,49]",
                                          "optimized_metric=val/k_nominal/psnr"], tmp_path)
    assert metric_keep(config) == 36  # tiny G+R: 64 tokens, nominal 0.5625 x 64
    validated = with_metric_validated(config)
    assert validated["train"]["val_keeps"] == [25, 49, 36]
    with (tmp_path / "val_per_k.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["keep", "psnr", "l1"])
        writer.writeheader()
        writer.writerows([{"keep": k, "psnr": 10 + k, "l1": 0.1} for k in (25, 36, 49)])
    assert objective(validated, {"rec": 0.5}, tmp_path) == 46.0
    assert objective({**validated, "optimized_metric": "final/rec"}, {"rec": 0.5}, tmp_path) == 0.5
    with pytest.raises(UserError, match="val_per_k.csv has K"):
        objective({**validated, "optimized_metric": "val/k64/psnr"}, {}, tmp_path)


def test_optuna_study_of_three_trials_on_the_tiny_config(tmp_path, monkeypatch, one_thread):
    """hparams_search=merge_ratio_optuna through the entry (in-process): three trials, each a training
    job, and the best value is the best trial's validation PSNR at the nominal K."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install hydra-optuna-sweeper")
    from mergevq.entries import train_tokenizer

    sweep = tmp_path / "study"
    monkeypatch.setenv("MERGEVQ_SWEEP_DIR", str(sweep))
    monkeypatch.setattr(sys, "argv", [
        "train_tokenizer", "-m", "hparams_search=merge_ratio_optuna", "hydra.sweeper.n_trials=3", "tokenizer=tiny",
        "data=photos", "train.global_batch_size=4", "loss.perceptual_weight=0", "loss.adversarial_weight=0",
        "train.progress=false", "train.val_batches=1", "train.max_steps=2", "data.train_kwargs.num_samples=8",
        "data.val_kwargs.num_samples=4", "hydra/job_logging=none", "hydra/hydra_logging=none"])
    train_tokenizer.main()
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    values, points = [], set()
    for job in sorted(p for p in sweep.iterdir() if p.name.isdigit()):
        with (job / "val_per_k.csv").open(newline="") as handle:
            rows = {int(r["keep"]): float(r["psnr"]) for r in csv.DictReader(handle)}
        values.append(rows[36])
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        points.add(tuple(o for o in overrides if o.startswith(("variant.keep_candidates", "train.lr="))))
    assert len(values) == 3 and len(points) == 3
    assert result["best_value"] == pytest.approx(max(values))
    assert set(result["best_params"]) == {"variant.keep_candidates.count", "variant.keep_candidates.distribution",
                                          "train.lr"}

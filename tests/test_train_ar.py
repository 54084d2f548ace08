"""Integration tests of the stage-II pipeline: tokenize -> train_ar -> sample (+ gFID card), the KV-cache
benchmark and the CLI's one-line errors.

One tiny tokenizer checkpoint (built, not trained, as in test_tokenize) and one code cache written by
the pretokenize entry's task are shared by the module. Training runs go through Hydra's compose API
and the entry's ``task`` in-process (tiny GPT, global batch 8, a few optimizer steps); real processes
(slow tests) for the sample entry with its gFID card and for the CLI error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers.entries import run_python, run_task
from helpers.models import TINY_PHOTOS, write_tokenizer_run
from helpers.stage2 import NUM_CLASSES, checkpoint_steps, sample_config, step_dir, train, train_rows
from PIL import Image
from safetensors.torch import load_file

from mergevq.benchmarks import ar_cache, ar_trained
from mergevq.data.code_cache import CodeCache
from mergevq.engine.schedules import lr_lambda
from mergevq.entries.pretokenize import task as pretokenize_task
from mergevq.entries.sampling import sample_images
from mergevq.models.gpt import GPT, gpt_args
from mergevq.models.mergear import MergeARConfig, mergear_inputs
from mergevq.runs.restore import load_trained_generator

KEEP_CHOICES = [16, 25, 36, 49, 64]  # reachable perfect squares in [16, 64] from the 8 x 8 grid
DATA = TINY_PHOTOS


def optimizer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "optim.pt", map_location="cpu", weights_only=True)["optimizers"]


def adjacent_groups(codes: np.ndarray, width: int) -> int:
    """Number of groups the 'adjacent' duplicate rule forms in one raster code sequence [L]:
    a token joins its upper or left neighbour's group when it repeats that neighbour's code."""
    groups: list[int] = []
    for pos, code in enumerate(codes.tolist()):
        group = pos
        r, c = divmod(pos, width)
        for m in ([pos - width] if r else []) + ([pos - 1] if c else []):  # left checked last, wins
            if codes[m] == code:
                group = groups[m]
        groups.append(group)
    return len(set(groups))


# ------------------------------------------------------------------------------------------ fixtures


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one intra-op thread (see conftest)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The module's folder; it holds tok_run, a tokenizer run with distinct raw and EMA weights (no training)."""
    folder = tmp_path_factory.mktemp("stage2")
    write_tokenizer_run(folder / "tok_run", DATA)
    return folder


@pytest.fixture(scope="module")
def tokenizer_run(work) -> Path:
    return work / "tok_run"


@pytest.fixture(scope="module")
def codes(work, tokenizer_run) -> Path:
    """A 32-item code cache with K drawn from [16, 64], through the pretokenize entry's task."""
    out = work / "codes"
    run_task(pretokenize_task, "tokenize", [f"ckpt={tokenizer_run}", f"out={out}", "keep_range=[16,64]", "num_images=32",
                                          "batch_size=16"])
    cache = CodeCache(out)
    assert len(cache) == 32 and cache.meta["grid"] == [8, 8] and cache.meta["keep"]["choices"] == KEEP_CHOICES
    return out


@pytest.fixture(scope="module")
def mergear_run(work, codes) -> Path:
    return train(work / "mergear", codes, "generator=mergear")


# ------------------------------------------------------------------------------------------ training


def test_mergear_training(mergear_run, codes):
    assert checkpoint_steps(mergear_run) == [4]
    checkpoint = step_dir(mergear_run, 4)
    assert (checkpoint / "gpt.safetensors").is_file() and not (checkpoint / "gpt_ema.safetensors").exists()
    rows = train_rows(mergear_run)
    assert sorted(rows) == [1, 2, 3, 4]
    losses = [rows[s]["train/loss"] for s in range(1, 5)]
    assert all(math.isfinite(v) for v in losses)
    first = rows[1]["train/loss_pre"] + rows[1]["train/loss_post"]
    assert abs(first - math.log(2**18)) < 0.1  # near-uniform over the 2^18 codes (64 x 4096 heads)
    assert losses[0] == pytest.approx(first + rows[1]["train/loss_copy"], rel=1e-5)
    assert 0 < rows[1]["train/loss_copy"] < math.log(64)  # uniform over "new" + the first occurrences
    assert losses[-1] < losses[0]

    model, mergear, config, meta, loaded = load_trained_generator(mergear_run)
    assert loaded == checkpoint and config["generator"]["kind"] == "mergear"
    assert model.args.prefix_tokens == 2 and model.args.num_keep_options == len(KEEP_CHOICES)
    assert mergear is not None and list(mergear.keep_options) == CodeCache(codes).meta["keep"]["choices"]
    assert mergear.window == 16 and mergear.duplicate_rule == "same_code_any"
    assert mergear.copy_head and mergear.mask_groups == "codes" and model.copy_head is not None
    assert model.args.grid == (8, 8) and model.args.seq_len == 64
    weights = load_file(checkpoint / "gpt.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items() if k in weights)
    assert "keep_embedding.weight" in weights


def test_raster_training(work, codes):
    run = train(work / "raster", codes, "generator=raster")
    assert checkpoint_steps(run) == [4] and (step_dir(run, 4) / "gpt.safetensors").is_file()
    rows = train_rows(run)
    assert sorted(rows) == [1, 2, 3, 4] and all(math.isfinite(r["train/loss"]) for r in rows.values())
    model, mergear, config, _, _ = load_trained_generator(run)
    assert mergear is None and config["generator"]["kind"] == "raster"
    assert model.args.prefix_tokens == 1 and model.args.num_keep_options == 0
    assert "keep_embedding.weight" not in load_file(step_dir(run, 4) / "gpt.safetensors")


def test_resume_is_bitwise_identical(work, codes):
    """6 steps straight vs interrupted at 4 (last checkpoint at 3) and resumed: same weights and
    optimizer state. The 6 steps cross an epoch boundary (4 steps per epoch)."""
    common = ("generator=mergear", "train.max_steps=6", "train.ckpt_every=3")
    straight = train(work / "straight", codes, *common)
    assert checkpoint_steps(straight) == [3, 6]

    resumed = work / "resumed"
    train(resumed, codes, *common, "train.interrupt_at=4")
    assert checkpoint_steps(resumed) == [3] and max(train_rows(resumed)) == 4
    train(resumed, codes, *common)
    assert checkpoint_steps(resumed) == [3, 6]

    a, b = load_file(step_dir(straight, 6) / "gpt.safetensors"), load_file(step_dir(resumed, 6) / "gpt.safetensors")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"

    opt_a, opt_b = optimizer_state(step_dir(straight, 6)), optimizer_state(step_dir(resumed, 6))
    state_a, state_b = opt_a["optimizer"]["state"], opt_b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    assert {float(s["step"]) for s in state_a.values()} == {float(s["step"]) for s in state_b.values()} == {6.0}
    for index in state_a:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state_a[index][key], state_b[index][key]), (index, key)
    assert opt_a["scheduler"]["last_epoch"] == opt_b["scheduler"]["last_epoch"] == 6

    rows_a, rows_b = train_rows(straight), train_rows(resumed)
    for step in range(1, 7):
        assert rows_a[step]["train/loss"] == rows_b[step]["train/loss"], step
        assert rows_a[step]["train/lr"] == rows_b[step]["train/lr"], step


def test_lr_schedule_counts_optimizer_steps(work, codes):
    """grad_accum=2 (8 micro-batches for 4 optimizer steps): the schedule ends at min_ratio * peak at
    optimizer step max_steps, not half-way (the official horizon counted micro-batches)."""
    peak = 3.0e-4
    run = train(work / "accum", codes, "generator=raster", "train.grad_accum=2", f"train.lr={peak}",
                "train.lr_schedule.kind=var", "train.lr_schedule.min_ratio=0.1",
                "train.lr_schedule.warmup_start=0.005")
    rows = train_rows(run)
    assert sorted(rows) == [1, 2, 3, 4]
    assert abs(rows[4]["train/lr"] - 0.1 * peak) < 1e-9
    schedule = lr_lambda("var", total_steps=4, warmup_steps=1, min_ratio=0.1, warmup_start=0.005)
    for step, row in rows.items():  # logged after the step: the LR of the next optimizer step
        assert abs(row["train/lr"] - peak * schedule(step)) < 1e-12, step
    assert rows[2]["train/lr"] > rows[3]["train/lr"] > rows[4]["train/lr"]
    saved = optimizer_state(step_dir(run, 4))
    assert {float(s["step"]) for s in saved["optimizer"]["state"].values()} == {4.0}
    assert saved["scheduler"]["last_epoch"] == 4


# ------------------------------------------------------------------------------------------ sampling


@pytest.mark.slow
def test_sample_entry_and_gfid_card(work, mergear_run, codes):
    out = work / "sample_run"
    args = (f"ckpt={mergear_run}", "per_class=2", "classes=[0,1]", "evaluate.enabled=true",
            "evaluate.features=random", "evaluate.num_reference=16")
    proc = run_python("-m", "mergevq.entries.sample", *args, cwd=work, MERGEVQ_RUN_DIR=str(out),
                      MERGEVQ_CACHE=str(work / "mergevq_cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]

    with Image.open(out / "samples.png") as grid:
        assert grid.format == "PNG" and grid.size == (2 * 34 + 2, 2 * 34 + 2)  # 2 x 2 of 32 px, padding 2
    npz = np.load(out / "samples.npz")
    images, labels = npz["arr_0"], npz["labels"]
    assert images.dtype == np.uint8 and images.shape == (4, 32, 32, 3)
    assert labels.tolist() == [0, 0, 1, 1] and npz["codes"].shape == (4, 64)

    sampling = json.loads((out / "sampling.json").read_text())
    for key in ("cfg_scale", "temperature", "top_k", "top_p", "seed", "keep", "window", "duplicate_rule",
                "cfg_interval", "per_class", "batch_size", "weights"):
        assert key in sampling, key
    assert sampling["cfg_scale"] == [1.5, 1.5] and sampling["temperature"] == [1.0, 1.0]
    assert sampling["top_k"] == 0 and sampling["top_p"] == 1.0 and sampling["seed"] == 0
    # keep not given: the tokenizer's nominal K (36 of 64 for tiny G+R), said so; budget strict
    assert sampling["keep"] == 36 and sampling["keep_source"] == "default: the tokenizer's nominal K"
    assert sampling["window"] == 16 and sampling["budget"] == "strict" and sampling["copy_head"] is True
    assert sampling["duplicate_rule"] == "same_code_any" and sampling["generator"]["kind"] == "mergear"
    assert sampling["tokens_per_s"] > 0 and sampling["prefix_tokens"] == 2 and sampling["positions"] == 64
    assert sampling["images_per_s"] > 0 and sampling["steps"] == 64 and sampling["num_samples"] == 4
    assert Path(sampling["checkpoint"]) == step_dir(mergear_run, 4)
    realised = [len(set(row.tolist())) for row in npz["codes"]]  # distinct codes = groups (one rule)
    assert realised == [36] * 4 and sampling["groups_max"] == 36 and sampling["groups_mean"] == 36
    assert 0 < sampling["peak_kv_mean"] <= sampling["peak_kv_max"] <= 2 + 36 + sampling["window"] + 1
    assert sampling["peak_kv_cache_entries"] == sampling["peak_kv_max"]

    card = json.loads((out / "eval_card.json").read_text())
    assert card["kind"] == "generator" and math.isfinite(card["metrics"]["gfid"])
    assert card["metrics"]["num_samples"] == 4 and card["reference"]["num_images"] == 16
    assert card["feature_extractor"]["trained"] is False
    assert any("UNTRAINED" in w for w in card["warnings"])
    assert card["sampling"]["seed"] == 0 and card["sampling_stats"]["peak_kv_cache_entries"] == sampling["peak_kv_cache_entries"]

    # The same seed in another process draws the same samples; another seed does not.
    config = sample_config(*args[:3])
    again = sample_images(config, torch.device("cpu"))
    assert np.array_equal(again["images"], images) and np.array_equal(again["codes"], npz["codes"])
    other = sample_images({**config, "seed": 1}, torch.device("cpu"))
    assert not np.array_equal(other["codes"], npz["codes"])


def test_mergear_eviction_bound(mergear_run):
    """budget=off with the adjacent rule (the pre-copy-head sampler): greedy decoding of the untrained
    model repeats codes, so groups merge and the cache stays at most P + K + w (+1 for the query's own
    entry), far below the raster's P + L; strict keeps exactly K groups and P + K + w entries."""
    config = sample_config(f"ckpt={mergear_run}", "per_class=2", "classes=[0,1]", "cfg_scale=1.0",
                           "temperature=1.0", "top_k=1", "keep=16", "window=2", "budget=off",
                           "duplicate_rule=adjacent")
    result = sample_images(config, torch.device("cpu"))
    assert result["settings"]["keep"] == 16 and result["settings"]["window"] == 2
    most_groups = max(adjacent_groups(row, 8) for row in result["codes"])
    peak = result["stats"]["peak_kv_cache_entries"]
    assert most_groups < 64 and peak <= most_groups + 2 + 2 + 1 < 2 + 64
    mean_groups = sum(adjacent_groups(row, 8) for row in result["codes"]) / len(result["codes"])
    assert 2 < result["stats"]["mean_peak_kv_cache_entries"] <= min(peak, mean_groups + 2 + 2 + 1)

    strict = sample_images({**config, "budget": "strict", "top_k": 0}, torch.device("cpu"))
    assert [len(set(row.tolist())) for row in strict["codes"]] == [16] * 4
    assert strict["stats"]["groups_max"] == 16 and strict["stats"]["peak_kv_max"] <= 2 + 16 + 2


# ------------------------------------------------------------------------------------------ benchmark, errors


def test_kv_cache_benchmark(tmp_path, capsys):
    out = tmp_path / "b.json"
    rows = ar_cache.main(["--grids", "8", "--keeps", "16,36", "--window", "4", "--batch", "1", "--out", str(out)])
    assert f"wrote {out}" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert "machine" in report and report["results"] == json.loads(json.dumps(rows))
    assert [(r["L"], r["K"]) for r in report["results"]] == [(64, 16), (64, 36)]
    for r in report["results"]:
        assert r["raster_kv_entries"] == 1 + 64
        assert r["mergear_peak_kv_entries"] <= r["K"] + r["window"] + 2 + 1
        assert r["mergear_peak_kv_entries"] < r["raster_kv_entries"]
        assert 0 < r["mergear_kv_bytes"] < r["raster_kv_bytes"]
        assert r["raster_tokens_per_s"] > 0 and r["mergear_tokens_per_s"] > 0
        assert r["raster_attended_per_token"] == 1 + (64 + 1) / 2  # query l sees P + l + 1 slots
        assert r["mergear_attended_per_token"] <= r["K"] + r["window"] + 2 + 1
        assert r["attention_ratio"] == r["mergear_attended_per_token"] / r["raster_attended_per_token"] < 1


def test_duplicate_rules_on_the_real_code_cache(codes):
    """On the code grids ``mergevq.entries.pretokenize`` wrote: 'same_code_any' finds at most K groups per image
    (a tokenizer group shares one code), 'adjacent' at least as many as 'same_code_any' (it only joins
    a left or upper neighbour), 'none' every position; the agreement is a fraction."""
    rows = ar_trained.rule_rows(str(codes), limit=32)
    assert sorted(r["keep"] for r in rows) == sorted({int(CodeCache(codes)[i]["keep"]) for i in range(32)})
    assert sum(r["images"] for r in rows) == 32
    for r in rows:
        assert 1 <= r["same_code_any_groups"] <= r["keep"] <= r["none_groups"] == 64
        assert r["adjacent_groups"] >= r["same_code_any_groups"]
        assert 0 <= r["adjacent_agreement"] <= 1 and 0 <= r["same_code_any_agreement"] <= 1


@pytest.mark.slow
def test_copy_head_loss_goes_down_on_real_codes(codes):
    """The copy decision learns from the code grids ``mergevq.entries.pretokenize`` wrote (8 images, 40 steps)."""
    cache = CodeCache(codes)
    items = [cache[i] for i in range(8)]
    grid, groups = (torch.stack([item[k] for item in items]) for k in ("grid_codes", "groups"))
    keep, labels = (torch.stack([item[k] for item in items]) for k in ("keep", "label"))
    config = MergeARConfig(window=4, keep_options=tuple(KEEP_CHOICES), mask_groups="codes", copy_head=True)
    torch.manual_seed(0)
    args = gpt_args("tiny", grid=(8, 8), num_classes=NUM_CLASSES, class_dropout=0.0, token_dropout=0.0,
                    resid_dropout=0.0, ffn_dropout=0.0)
    model = GPT(config.model_args(args))
    inputs = mergear_inputs(grid, groups, keep, config)
    assert int((inputs["copy_target"] > 0).sum()) > 0  # the real grids hold duplicates to copy
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        out = model.loss(grid, labels, **inputs)
        losses.append(float(out["loss_copy"].detach()))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    assert losses[-1] < 0.5 * losses[0]


def test_run_from_before_the_copy_head_still_samples(work, codes):
    """A run whose stored config predates mask_groups / copy_head / the same_code_any default (the keys
    removed from its state.json, its weights without a copy head) loads as the old model and samples at
    the defaults: budget strict, via the token heads' exact copy mass, exactly K groups."""
    run = train(work / "before_copy_head", codes, "generator=mergear", "generator.copy_head=false",
                "generator.mask_groups=tokenizer", "generator.duplicate_rule=adjacent")
    checkpoint = step_dir(run, 4)
    state = json.loads((checkpoint / "state.json").read_text())
    config = yaml.safe_load(state["metadata"]["config"])
    for key in ("mask_groups", "copy_head", "duplicate_rule"):
        del config["generator"][key]
    state["metadata"]["config"] = yaml.safe_dump(config)
    (checkpoint / "state.json").write_text(json.dumps(state))
    assert not any(k.startswith("copy_head") for k in load_file(checkpoint / "gpt.safetensors"))

    result = sample_images(sample_config(f"ckpt={run}", "per_class=2", "classes=[0,1]", "keep=25"),
                           torch.device("cpu"))
    settings = result["settings"]
    assert settings["copy_head"] is False and settings["duplicate_rule"] == "adjacent"
    assert settings["budget"] == "strict" and settings["keep"] == 25
    assert [len(set(row.tolist())) for row in result["codes"]] == [25] * 4
    assert result["stats"]["groups_max"] == 25 and result["stats"]["peak_kv_max"] <= 2 + 25 + 16


def test_trained_mergear_benchmark(mergear_run, tmp_path, capsys):
    """``make bench-ar CKPT=...``: realised groups and peak KV per K and budget (strict: exactly K)."""
    out = tmp_path / "ar_trained.json"
    result = ar_trained.main(["--ckpt", str(mergear_run), "--keeps", "16,25", "--budgets", "strict,off",
                              "--samples", "4", "--batch", "4", "--out", str(out)])
    assert f"wrote {out}" in capsys.readouterr().out and json.loads(out.read_text())["sampling"] == result["sampling"]
    rows = {(r["keep"], r["budget"]): r for r in result["sampling"]}
    assert sorted(rows) == [(16, "off"), (16, "strict"), (25, "off"), (25, "strict")]
    for keep in (16, 25):
        strict = rows[keep, "strict"]
        assert strict["groups_mean"] == strict["groups_max"] == keep
        assert strict["peak_kv_max"] <= 2 + keep + strict["window"]
        assert rows[keep, "off"]["tokens_per_s"] > 0


@pytest.mark.slow
def test_missing_code_cache_is_one_line_error(tmp_path):
    proc = run_python("-m", "mergevq.entries.train_ar", "codes=/nonexistent", cwd=tmp_path,
                      MERGEVQ_RUN_DIR=str(tmp_path / "hydra_run"))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "codes" in errors[0] and "/nonexistent" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr

"""Integration tests of the stage-I platform (``python -m mergevq.entries.train_tokenizer``).

Tiny configs throughout (tokenizer=tiny at 32 px, photos, global batch 4, a few optimizer steps,
VGG perceptual backbone random since no weights exist offline). Single-process runs go through
Hydra's compose API and the entry's ``task`` in-process; real processes are used where the process
boundary is the point: one-line CLI errors, torchrun with two ranks, and a Hydra multirun sweep.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from helpers.entries import describe, run_python, subprocess_env
from helpers.runs import (
    BASE,
    MODULES,
    assert_same_modules,
    assert_same_tensors,
    checkpoint_steps,
    compose_run,
    read_csv,
    step_dir,
    train,
    train_rows,
)
from helpers.wandb import read_offline_wandb
from omegaconf import OmegaConf
from safetensors.torch import load_file

from mergevq.engine.stage1 import build_data
from mergevq.entries.config_check import ConfigError, check_tokenizer_run
from mergevq.models.blocks import Recomputable
from mergevq.models.factory import build_tokenizer, layout

ROOT = Path(__file__).resolve().parents[1]
# The scaled-down Open-MAGVIT2 baseline (kind magvit2: no variant, no keep).
MAGVIT2 = (
    "tokenizer=open_magvit2",
    "tokenizer.ch=32",
    "tokenizer.ch_mult=[1,2]",
    "tokenizer.num_res_blocks=1",
    "tokenizer.resolution=32",
    "tokenizer.align_size=28",
)


# ------------------------------------------------------------------------------------------ helpers


# ------------------------------------------------------------------------------ 1. tiny variant runs

VARIANT_RUNS = {
    # G with the tiny random DINOv2 teacher (three views, alignment loss), LPIPS on a random VGG.
    "g_teacher": dict(
        overrides=("variant=g", "teacher.kind=tiny_random", "train.max_steps=2", "train.val_keeps=[49,64]"),
        steps=2, val_keeps=[49, 64], logged=("align", "lpips", "g_adv", "d_hinge", "d_lecam"),
    ),
    # G+R with learned Source Recovery and two micro-batches per optimizer step.
    "gr_recovery_accum2": dict(
        overrides=(
            "variant=gr", "recovery.enabled=true", "recovery.width=32", "recovery.num_heads=2",
            "train.grad_accum=2", "loss.perceptual_weight=0", "train.max_steps=2", "train.val_keeps=[36,64]",
        ),
        steps=2, val_keeps=[36, 64], logged=("recovery", "recovery_acc", "g_adv"),
    ),
    "r": dict(
        overrides=("variant=r", "loss.perceptual_weight=0", "train.max_steps=2", "train.val_keeps=[16,36]"),
        steps=2, val_keeps=[16, 36], logged=("g_adv",),
    ),
    # No merging: K is None throughout (logged and tabled as 0).
    "open_magvit2": dict(
        overrides=(*MAGVIT2, "loss.perceptual_weight=0", "train.max_steps=2"),
        steps=2, val_keeps=[0], logged=("g_adv",),
    ),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "g_teacher" else n for n in VARIANT_RUNS])
def test_tiny_run(tmp_path, name):
    spec = VARIANT_RUNS[name]
    run_dir = train(tmp_path / "run", *spec["overrides"])
    steps = spec["steps"]
    config = OmegaConf.to_container(compose_run(run_dir, *spec["overrides"]), resolve=True)

    # Provenance next to the run; config.yaml is the resolved config of this run.
    for file in ("config.yaml", "git.txt", "packages.txt", "environment.json"):
        assert (run_dir / file).is_file() and (run_dir / file).stat().st_size > 0, file
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["tokenizer"] == config["tokenizer"]
    assert saved["train"]["max_steps"] == steps and saved["run_dir"] == str(run_dir)
    assert "torch==" in (run_dir / "packages.txt").read_text()

    # The final checkpoint holds every module, and the tokenizer file fits the configured model.
    assert checkpoint_steps(run_dir) == [steps]
    ckpt = step_dir(run_dir, steps)
    for file in [f"{m}.safetensors" for m in MODULES] + ["optim.pt", "state.json", "rng_rank0.pt"]:
        assert (ckpt / file).is_file(), file
    assert json.loads((ckpt / "state.json").read_text())["step"] == steps
    model = build_tokenizer(config["tokenizer"], config["variant"], config["quantizer"], config["recovery"])
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for module in ("tokenizer", "tokenizer_ema"):
        weights = load_file(str(ckpt / f"{module}.safetensors"))
        assert {k: tuple(v.shape) for k, v in weights.items()} == expected, module
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    if config["recovery"]["enabled"]:
        assert any(k.startswith("recovery.") for k in expected)

    # One metrics row per optimizer step with finite losses; the variant's extra terms are logged.
    rows = train_rows(run_dir)
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    for row in rows:
        for key in ("rec", "commit", "entropy", "total", "lr", *spec["logged"]):
            assert math.isfinite(row[f"train/{key}"]), (key, row)
    if config["tokenizer"]["kind"] == "magvit2":
        candidates = {0}  # K is None: no merging
    else:
        candidates = set(layout(config["tokenizer"], config["variant"])["keep_candidates"])
    assert {int(r["train/keep"]) for r in rows} <= candidates

    # Validation pins each K: one row per validation K in val_per_k.csv and per-K columns in metrics.
    table = read_csv(run_dir / "val_per_k.csv")
    assert [int(r["keep"]) for r in table] == spec["val_keeps"]
    assert all(math.isfinite(float(r["psnr"])) and float(r["psnr"]) > 0 for r in table)
    columns = read_csv(run_dir / "metrics.csv")[0].keys()
    assert all(f"val/k{k}/psnr" in columns for k in spec["val_keeps"])
    assert list((run_dir / "images").glob("reconstructions_step*.png"))


@pytest.mark.parametrize(
    "override", ["train.keep_candidates=[64]", "train.val_keeps=[64]", "teacher.kind=tiny_random"]
)
def test_magvit2_config_rejects_merging_and_alignment(tmp_path, override):
    """Open-MAGVIT2 neither merges nor aligns: such settings fail the config check, not step 1."""
    check_tokenizer_run(OmegaConf.to_container(compose_run(tmp_path, *MAGVIT2), resolve=True))
    config = OmegaConf.to_container(compose_run(tmp_path, *MAGVIT2, override), resolve=True)
    with pytest.raises(ConfigError, match=re.escape(override.split("=")[0])):
        check_tokenizer_run(config)


def test_teacher_run_uses_three_views(tmp_path):
    """teacher.kind=tiny_random feeds the reconstruction view plus the two alignment views."""
    config = OmegaConf.to_container(compose_run(tmp_path, "variant=g", "teacher.kind=tiny_random"), resolve=True)
    item = build_data(config, "train")[0]
    assert {"image", "image_aug_w", "image_aug_s"} <= set(item)
    assert item["image"].shape[-1] == 32 and item["image_aug_s"].shape[-1] == 28
    plain = OmegaConf.to_container(compose_run(tmp_path, "variant=g"), resolve=True)
    assert "image_aug_w" not in build_data(plain, "train")[0]


# ------------------------------------------------------------------------------------------ 2. overfit


@pytest.mark.slow
def test_overfits_four_images(tmp_path):
    """G+R tiny, K pinned at 64, four fixed images, no GAN / perceptual terms, lr 1e-3."""
    steps = 30
    run_dir = train(
        tmp_path / "run", "variant=gr", "train.keep_candidates=[64]", "data.train_kwargs.num_samples=4",
        "loss.adversarial_weight=0", "loss.perceptual_weight=0", "train.lr=1e-3", f"train.max_steps={steps}",
        "train.val_every=1000", "train.ckpt_every=1000", "train.ema.enabled=false",
    )
    rows = train_rows(run_dir)
    assert len(rows) == steps
    assert {int(r["train/keep"]) for r in rows} == {64}
    assert "train/g_adv" not in rows[0] and "train/lpips" not in rows[0]
    start, end = rows[0]["train/rec"], sum(r["train/rec"] for r in rows[-3:]) / 3
    assert end < 0.6 * start, f"reconstruction loss {start:.4f} -> {end:.4f}"


# ------------------------------------------------------------------------------- 3. resume equivalence


@pytest.mark.slow
def test_memory_and_layout_switches_keep_the_losses(tmp_path, monkeypatch):
    """train.activation_checkpointing and backend.channels_last change how the step runs, not what it
    computes: the same logged losses as the plain run (to float rounding)."""
    import mergevq.engine.stage1 as stage1

    seen = []
    real_compile = stage1.compile_in_place

    def spy(modules, setting):  # called once the tokenizer is set up: record what the switches did
        decoder = modules[1]
        seen.append((decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last),
                     all(b.activation_checkpointing for b in decoder.modules() if isinstance(b, Recomputable))))
        return real_compile(modules, setting)

    monkeypatch.setattr(stage1, "compile_in_place", spy)
    steps = ("train.max_steps=2", "train.val_every=100", "train.ckpt_every=100", "train.keep_candidates=[36]")
    plain = train_rows(train(tmp_path / "plain", *steps))
    switched = train_rows(train(tmp_path / "switched", *steps, "train.activation_checkpointing=true",
                                "backend.channels_last=true"))
    assert seen == [(False, False), (True, True)]
    assert len(plain) == len(switched) == 2
    for a, b in zip(plain, switched, strict=True):
        for key in ("train/rec", "train/commit", "train/total", "train/d_hinge"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key


@pytest.mark.slow
def test_resume_is_bitwise_identical(tmp_path):
    """6 steps straight vs. killed after step 4 (last checkpoint: 3) and resumed: identical weights.
    8 training images = 2 steps per epoch, so the resume lands mid-epoch and crosses epochs."""
    common = (
        "variant=r", "loss.perceptual_weight=0", "data.train_kwargs.num_samples=8", "train.max_steps=6",
        "train.ckpt_every=3", "train.val_every=1000", "train.val_keeps=[36]", "train.grad_clip=5.0",
    )
    straight = train(tmp_path / "straight", *common)
    assert checkpoint_steps(straight) == [3, 6]

    resumed = train(tmp_path / "resumed", *common, "train.interrupt_at=4")
    assert checkpoint_steps(resumed) == [3]  # interrupted: no save at step 4, no final save
    assert not (resumed / "val_per_k.csv").exists()
    assert_same_modules(step_dir(straight, 3), step_dir(resumed, 3))
    train(resumed, *common, "resume=auto")
    assert checkpoint_steps(resumed) == [3, 6]

    assert_same_modules(step_dir(straight, 6), step_dir(resumed, 6))
    optim_a = torch.load(step_dir(straight, 6) / "optim.pt", weights_only=True)["optimizers"]
    optim_b = torch.load(step_dir(resumed, 6) / "optim.pt", weights_only=True)["optimizers"]
    for name in ("opt_g", "opt_d"):
        for index, state in optim_a[name]["state"].items():
            assert_same_tensors(state, optim_b[name]["state"][index], f"{name} state {index}")
    # Not vacuous: the GAN was training, so discriminator and LeCam moved between steps 3 and 6.
    for name in ("discriminator", "lecam", "tokenizer_ema"):
        with pytest.raises(AssertionError):
            assert_same_modules(step_dir(straight, 3), step_dir(straight, 6), [name])
    resumed_rows = train_rows(resumed)
    assert [int(r["step"]) for r in resumed_rows] == [1, 2, 3, 4, 4, 5, 6]  # step 4 is redone
    assert resumed_rows[-1]["train/total"] == train_rows(straight)[-1]["train/total"]


# ------------------------------------------------------------------------------- 6. config errors

# name -> (overrides, words the one error line must contain)
CONFIG_ERRORS = {
    "unknown_key": (("train.bogus=1",), ("train.bogus",)),
    "unknown_group_option": (("tokenizer=d65",), ("tokenizer", "d65", "d64", "open_magvit2", "tiny")),
    "unreachable_keep": (("train.val_keeps=[1]",), ("train.val_keeps", "keep=1")),
    "batch_vs_accum": (("train.global_batch_size=5", "train.grad_accum=2"), ("train.global_batch_size=5", "train.grad_accum=2")),
    "missing_data_root": (("data=folder", "data.root=/nonexistent"), ("data.root", "/nonexistent")),
    "missing_teacher": (("teacher.kind=dinov2", "teacher.path=/nonexistent"), ("teacher.path", "/nonexistent")),
    "missing_vgg": (("loss.perceptual.pretrained=true",), ("loss.perceptual", "VGG16")),
}


@pytest.fixture(scope="module")
def config_error_runs(tmp_path_factory):
    """Every bad command line, two at a time (they are independent processes)."""
    root = tmp_path_factory.mktemp("config_errors")
    torch_home = root / "torch_home"  # empty: no VGG16 in the hub cache
    torch_home.mkdir()

    def run(name):
        overrides, _ = CONFIG_ERRORS[name]
        run_dir = root / name
        env = subprocess_env(MERGEVQ_RUN_DIR=str(run_dir), TORCH_HOME=str(torch_home))
        base = [o for o in BASE if not o.startswith("data.")]  # data=folder has no photos kwargs
        proc = run_python("-m", "mergevq.entries.train_tokenizer", *base, "train.max_steps=1", *overrides, cwd=root, env=env)
        return proc, run_dir

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(CONFIG_ERRORS, pool.map(run, CONFIG_ERRORS)))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIG_ERRORS))
def test_config_error_is_one_line(config_error_runs, name):
    proc, run_dir = config_error_runs[name]
    assert proc.returncode != 0, describe(proc)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, describe(proc)
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    for word in CONFIG_ERRORS[name][1]:
        assert word in lines[0], (word, lines[0])
    assert "search path" not in lines[0] and "provider=" not in lines[0]  # Hydra's tail is cut
    # Failed before anything was built: no checkpoint, no provenance, no metrics.
    assert not (run_dir / "checkpoints").exists()
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "metrics.csv").exists()


# ---------------------------------------------------------------------------------- 7. W&B offline


@pytest.mark.slow
def test_wandb_offline_run_reads_back(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    overrides = ("logger=wandb", "variant=r", "loss.perceptual_weight=0", "train.max_steps=2", "train.val_keeps=[36]")
    run_dir = train(tmp_path / "run", *overrides)
    resolved = OmegaConf.to_container(compose_run(run_dir, *overrides), resolve=True)

    run = read_offline_wandb(run_dir)
    assert Path(run["path"]).is_relative_to(run_dir / "wandb")
    history = [row for row in run["history"] if "train/total" in row]
    assert [int(row["_step"]) for row in history] == [1, 2]
    assert all(math.isfinite(row["train/total"]) for row in history)
    assert any("val/k36/psnr" in row for row in run["history"])
    assert "final/total" in run["summary"]

    config = run["config"]
    assert config["logger"]["kind"] == "wandb" and config["run_dir"] == str(run_dir)
    assert config["train"]["max_steps"] == 2 and config["train"]["val_keeps"] == [36]
    assert config["variant"]["name"] == "r" and config["loss"]["perceptual_weight"] == 0
    assert config["tokenizer"] == resolved["tokenizer"]
    assert {"logger=wandb", "train.max_steps=2", "variant=r"} <= set(config["overrides"])
    assert not (run_dir / "metrics.csv").exists()  # the W&B logger replaces the CSV one

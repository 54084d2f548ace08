"""Stage-I test runs: the shared tiny override set, one in-process run through the entry's task, a
2-process torchrun of the entry, and readers of what a run directory holds (metrics rows,
checkpoint steps, bit-equality of saved modules)."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

from mergevq.entries.train_tokenizer import task

from .entries import compose_entry, run_python, run_task, subprocess_env

MODULES = ("tokenizer", "tokenizer_ema", "discriminator", "lecam")

# Shared by every run: tiny model and data, cheap validation (one batch, K pinned per test).
BASE = (
    "tokenizer=tiny",
    "data=photos",
    "backend=cpu",
    "logger=csv",
    "train.global_batch_size=4",
    "train.progress=false",
    "train.log_every=1",
    "train.val_batches=1",
    "loss.perceptual.pretrained=false",
    "data.train_kwargs.num_samples=16",
    "data.val_kwargs.num_samples=4",
)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def train_rows(run_dir: Path) -> list[dict[str, float]]:
    """metrics.csv rows of training logs (validation rows share the file), values as floats."""
    rows = [r for r in read_csv(run_dir / "metrics.csv") if r.get("train/total")]
    return [{k: float(v) for k, v in r.items() if v != ""} for r in rows]


def checkpoint_steps(run_dir: Path) -> list[int]:
    folder = run_dir / "checkpoints"
    return sorted(int(p.name.split("_")[1]) for p in folder.glob("step_*")) if folder.is_dir() else []


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: different keys"
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {len(different)} tensors differ, e.g. {different[:3]}"


def assert_same_modules(ckpt_a: Path, ckpt_b: Path, names=MODULES) -> None:
    for name in names:
        assert_same_tensors(
            load_file(str(ckpt_a / f"{name}.safetensors")), load_file(str(ckpt_b / f"{name}.safetensors")),
            f"{name} of {ckpt_a} vs {ckpt_b}",
        )


def compose_run(run_dir: Path, *overrides: str, hydra_node: bool = False):
    """The composed train_tokenizer config with the run directory pinned (no Hydra run here)."""
    return compose_entry("train_tokenizer", [*BASE, *overrides, f"run_dir='{run_dir}'"], hydra_node)


def train(run_dir: Path, *overrides: str) -> Path:
    """One in-process run through the entry's task (config check, RunSession, Stage1Trainer)."""
    run_task(task, "train_tokenizer", [*BASE, *overrides, f"run_dir='{run_dir}'"])
    return run_dir


DDP = (
    "variant=r", "loss.perceptual_weight=0", "data.train_kwargs.num_samples=8", "train.max_steps=2",
    "train.ckpt_every=1", "train.val_keeps=[36]",
)


def torchrun(*args: str, cwd: Path, run_dir: Path, **env: str) -> subprocess.CompletedProcess:
    environ = subprocess_env(ACCELERATE_USE_CPU="1", MERGEVQ_RUN_DIR=str(run_dir), **env)
    launch = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    return run_python(*launch, *args, *BASE, *DDP, cwd=cwd, env=environ, timeout=400)

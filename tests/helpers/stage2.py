"""Stage-II test runs: the shared override set, one in-process train_ar run through the entry's task,
the resolved sample config, and readers of a run directory."""

from __future__ import annotations

import csv
from pathlib import Path

from omegaconf import OmegaConf

from mergevq.entries.train_ar import task as train_ar_task

from .entries import compose_entry, run_task

NUM_CLASSES = 11  # photos labels are indices into PHOTO_NAMES (11 names)
# Shared by every training run: 32 cached items, global batch 8 -> 4 optimizer steps per epoch.
BASE = (
    "backend=cpu",
    "logger=csv",
    f"num_classes={NUM_CLASSES}",
    "train.max_steps=4",
    "train.lr_schedule.warmup_steps=1",
    "train.global_batch_size=8",
    "train.progress=false",
    "train.log_every=1",
)


def train(run_dir: Path, codes: Path, *overrides: str) -> Path:
    """One in-process stage-II run through the entry's task, set up as Hydra's run_job does."""
    run_task(train_ar_task, "train_ar", [*BASE, f"codes='{codes}'", *overrides, f"run_dir='{run_dir}'"])
    return run_dir


def sample_config(*overrides: str) -> dict:
    """The resolved ``sample`` config as the entry's task sees it (run dir pinned, no Hydra run)."""
    return OmegaConf.to_container(compose_entry("sample", [*overrides, "run_dir=unused"]), resolve=True)


def train_rows(run_dir: Path) -> dict[int, dict[str, float]]:
    """metrics.csv as step -> values (a resumed run re-logs a step: the last row wins)."""
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {int(r["step"]): {k: float(v) for k, v in r.items() if k != "step" and v != ""} for r in rows}


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))

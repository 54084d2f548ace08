"""Tiny models and runs for tests: config groups as dicts, the tiny G+R tokenizer with seeded weights,
and a tokenizer run directory (one checkpoint, no training)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from . import ROOT


def load_group(group: str, name: str) -> dict:
    """One config group option as a plain dict (interpolations are not needed by model groups)."""
    return yaml.safe_load((ROOT / "conf" / group / f"{name}.yaml").read_text())


TINY_PHOTOS = {
    "name": "photos", "root": None, "cache_dir": None, "size": 32, "align_size": 28,
    "train_kwargs": {"num_samples": 32, "crop_size": 64, "seed": 0},
    "val_kwargs": {"num_samples": 16, "crop_size": 64, "seed": 1},
}


def tiny_tokenizer(seed: int, recovery: dict | None = None):
    """The tiny G+R tokenizer with seeded random weights, in eval mode."""
    import torch

    from mergevq.models.factory import build_tokenizer

    torch.manual_seed(seed)
    return build_tokenizer(load_group("tokenizer", "tiny"), load_group("variant", "gr"), {"bits": 18}, recovery).eval()


def write_tokenizer_run(root: Path, data: dict | None = None, step: int = 1, recovery: dict | None = None) -> Path:
    """A tokenizer run directory without training: one checkpoint with distinct raw (seed 1) and EMA
    (seed 0) weights and the stored config that `load_trained_tokenizer` rebuilds from."""
    from mergevq.runs.checkpoint import save_checkpoint

    config = {"tokenizer": load_group("tokenizer", "tiny"), "variant": load_group("variant", "gr"),
              "quantizer": {"bits": 18}, "recovery": recovery, "data": data or TINY_PHOTOS, "train": {}, "seed": 0}
    models = {"tokenizer": tiny_tokenizer(1, recovery), "tokenizer_ema": tiny_tokenizer(0, recovery)}
    save_checkpoint(root / "checkpoints", step=step, models=models, optimizers={}, extra={"step": step},
                    metadata={"config": yaml.safe_dump(config)})
    return root


def groups_to_source(groups: torch.Tensor, keep: int) -> torch.Tensor:
    """Dense binary source matrix S [B, K, L] with S[b, k, l] = 1 iff position l belongs to token k
    (the dense reference of ``mergevq.models.merge.unmerge``)."""
    return torch.nn.functional.one_hot(groups, keep).transpose(1, 2).float()

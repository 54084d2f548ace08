"""Rebuild a trained model from one of the project's own checkpoints (config stored inside it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from torch import nn

from .checkpoint import latest_checkpoint, load_checkpoint, read_state
from .session import check_format

WEIGHT_NAMES = {"ema": "tokenizer_ema", "raw": "tokenizer"}
# The ``_target_``s a stored config may name. Our builders read plain values and instantiate nothing,
# so none is allowed: a checkpoint's config cannot make a loader import and call arbitrary code.
ALLOWED_TARGETS: tuple[str, ...] = ()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir (step_XXXXXXXX), a run dir or its checkpoints/ dir -> the checkpoint dir."""
    path = Path(path).expanduser()
    if (path / "state.json").is_file():
        return path
    for candidate in (path / "checkpoints", path):
        found = latest_checkpoint(candidate)
        if found is not None:
            return found
    raise FileNotFoundError(f"no checkpoint under {path}: give a run directory or a checkpoints/step_* directory")


def _targets(tree: Any, key: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every ``_target_`` in a nested config."""
    if isinstance(tree, dict):
        found = [(f"{key}._target_".lstrip("."), tree["_target_"])] if "_target_" in tree else []
        return found + [t for k, v in tree.items() for t in _targets(v, f"{key}.{k}")]
    if isinstance(tree, list):
        return [t for i, v in enumerate(tree) for t in _targets(v, f"{key}[{i}]")]
    return []


def stored_config(checkpoint: Path) -> dict[str, Any]:
    """The resolved run config saved in the checkpoint: plain YAML (safe_load), from this version's
    run format, with no ``_target_`` outside ALLOWED_TARGETS; nothing is instantiated from it."""
    state = read_state(checkpoint)
    check_format(state, checkpoint)
    metadata = state.get("metadata", {})
    if "config" not in metadata:
        raise ValueError(f"{checkpoint} has no stored config (not a mergevq training checkpoint?)")
    config = yaml.safe_load(metadata["config"])
    refused = [f"{key}={value}" for key, value in _targets(config) if value not in ALLOWED_TARGETS]
    if refused:
        raise ValueError(f"{checkpoint}: the stored config names _target_s outside the allow-list "
                         f"{list(ALLOWED_TARGETS)}: {', '.join(refused)}; refusing to build from it")
    return config


def load_trained_tokenizer(path: str | Path, weights: str = "ema") -> tuple[nn.Module, dict[str, Any], Path]:
    """-> (tokenizer in eval mode, run config, checkpoint dir). weights: 'ema' or 'raw'."""
    from ..models.factory import build_tokenizer

    if weights not in WEIGHT_NAMES:
        raise ValueError(f"weights={weights!r}: use ema or raw")
    checkpoint = resolve_checkpoint(path)
    config = stored_config(checkpoint)
    tokenizer = build_tokenizer(config["tokenizer"], config.get("variant"), config["quantizer"], config.get("recovery"))
    name = WEIGHT_NAMES[weights]
    if not (checkpoint / f"{name}.safetensors").is_file():
        raise FileNotFoundError(f"{checkpoint} has no {name}.safetensors (trained without EMA? use weights=raw)")
    load_checkpoint(checkpoint, {name: tokenizer})
    return tokenizer.eval(), config, checkpoint


def load_trained_generator(path: str | Path, weights: str = "ema"):
    """-> (GPT in eval mode, MergeARConfig or None, run config, code-cache meta, checkpoint dir).

    weights: 'ema' uses gpt_ema when the run kept one, else the raw weights ('raw' forces them)."""
    from ..data.code_cache import CodeCache
    from .stage2 import cache_contents, generator_setup

    checkpoint = resolve_checkpoint(path)
    config = stored_config(checkpoint)
    cache = CodeCache(config["codes"])
    meta = {**cache.meta, **cache_contents(cache)}
    model, mergear = generator_setup(config, meta)
    name = "gpt_ema" if weights == "ema" and (checkpoint / "gpt_ema.safetensors").is_file() else "gpt"
    load_checkpoint(checkpoint, {name: model})
    return model.eval(), mergear, config, meta, checkpoint

"""Rebuild a trained model from one of the project's own checkpoints (config stored inside it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from torch import nn

from ..errors import CheckpointError, PathNotFound
from .checkpoint import latest_checkpoint, load_checkpoint, read_state

WEIGHT_NAMES = {"ema": "tokenizer_ema", "raw": "tokenizer"}
# What each kind of checkpoint is, the model file that marks it and the entries that take it.
KINDS = {"tokenizer": ("tokenizer", "a stage-I tokenizer run (train_tokenizer)", "evaluate, tokenize, reconstruct, probe"),
         "generator": ("gpt", "a stage-II generator run (train_ar)", "sample")}
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
    raise PathNotFound(f"no checkpoint under {path}{'' if path.exists() else ' (it does not exist)'}: give a run "
                       "directory or a checkpoints/step_* directory")


def require_kind(checkpoint: Path, kind: str, entry: str) -> None:
    """Refuse a checkpoint of the other kind, saying what it is and which entries take it."""
    models = read_state(checkpoint).get("models", [])
    if KINDS[kind][0] in models:
        return
    for other, (marker, what, entries) in KINDS.items():
        if other != kind and marker in models:
            raise CheckpointError(f"{checkpoint} is {what}; {entry} takes {KINDS[kind][1]} (entries that take this "
                                  f"one: {entries})")
    raise CheckpointError(f"{checkpoint} holds {models}, not {KINDS[kind][1]}")


def code_cache_of(config: dict[str, Any], checkpoint: Path) -> Path:
    """The code cache a generator run trained on: runs store it absolute; older runs stored the path
    as given, relative to where training ran (tried here relative to the current directory)."""
    stored = Path(str(config["codes"])).expanduser()
    tried = stored if stored.is_absolute() else Path.cwd() / stored
    if not (tried / "index.json").is_file():
        raise PathNotFound(f"the code cache of {checkpoint} (stored codes={config['codes']}) is not at {tried}: "
                           "restore it there, or run from the directory training ran in")
    return tried


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
    require_kind(checkpoint, "tokenizer", "this entry")
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
    from ..data.code_cache import CodeCache, cache_contents
    from ..models.generator_factory import build_generator

    checkpoint = resolve_checkpoint(path)
    require_kind(checkpoint, "generator", "sample")
    config = stored_config(checkpoint)
    cache = CodeCache(code_cache_of(config, checkpoint))
    meta = {**cache.meta, **cache_contents(cache)}
    model, mergear = build_generator(config, meta)
    name = "gpt_ema" if weights == "ema" and (checkpoint / "gpt_ema.safetensors").is_file() else "gpt"
    load_checkpoint(checkpoint, {name: model})
    return model.eval(), mergear, config, meta, checkpoint

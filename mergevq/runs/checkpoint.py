"""Atomic, pickle-free training checkpoints in a run directory.

Layout of one checkpoint (``directory/step_{step:08d}/``)::

    <name>.safetensors   one per entry of ``models``: its state dict (contiguous CPU clones), with the
                         checkpoint ``metadata`` (dict[str, str]) as safetensors string metadata
    optim.pt             {"optimizers": {name: state_dict}} via torch.save; loads with weights_only=True
    rng_rank{r}.pt       RNG state of rank r (python, numpy, torch CPU, CUDA/NPU), one per rank
    state.json           {"format_version", "step", "world_size", "models", "optimizers", "extra", "metadata",
                         "files": {file name: sha256 hex} of every other file, verified at load}

Checkpoints written before ``files`` existed still load, unverified (a log line says so).

Atomicity: every file is written (and fsynced) into ``step_XXXXXXXX.tmp/``; the directory is then
renamed to ``step_XXXXXXXX`` (atomic on POSIX) and the parent directory fsynced. A checkpoint dir
therefore either is complete or does not exist under its final name; ``state.json`` is written last
inside the tmp dir and a final dir without it is treated as broken. Re-saving an existing step moves
the old dir to ``step_XXXXXXXX.tmp-old`` first and removes it once the new one is in place.

Multi-process (all ranks must see the same ``directory``, i.e. a shared file system)::

    tmp = prepare_checkpoint_dir(directory, step)        # every rank; same name on all ranks
    write_rank_rng(tmp, rank)                            # every rank
    barrier()                                            # e.g. accelerator.wait_for_everyone()
    if rank == 0:
        finalize_checkpoint(tmp, step, models, optimizers, extra, metadata, world_size=world_size)
    barrier()                                            # nobody reads it before it exists

``save_checkpoint(..., rank=rank, world_size=world_size, barrier=accelerator.wait_for_everyone)`` runs
exactly that sequence. Rank 0 should call :func:`cleanup_incomplete` once at start-up (before any rank
saves) so stale ``.tmp`` dirs from a crashed run cannot leak files into a new checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError
from .atomic import fsync_dir
from .integrity import read_checked as _read
from .integrity import sha256_file, verify_files

FORMAT_VERSION = 1  # the one format version: state.json's format_version; runs also record it as RUN_FORMAT
RUN_FORMAT = f"mergevq-run/{FORMAT_VERSION}"  # metadata.format, as every run since the first has written it
STATE_FILE = "state.json"
OPTIM_FILE = "optim.pt"
_FINAL_RE = re.compile(r"^step_(\d+)$")
_TMP_RE = re.compile(r"^step_\d+\.tmp")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class CheckpointMismatchError(CheckpointError):
    """A state dict in a checkpoint does not fit the module it is loaded into (lists every problem)."""


# --------------------------------------------------------------------------------------------- files


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def step_dir_name(step: int) -> str:
    """``step_{step:08d}``: zero-padded so names sort like steps (up to 10^8 - 1)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step_{step:08d}"


# ----------------------------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """Snapshot of the global RNGs as pickle-free values (ints, floats, str, lists, uint8 tensors).

    Keys: ``python`` [version, state ints (625), gauss_next], ``numpy`` {name, keys (624 ints), pos,
    has_gauss, cached_gaussian}, ``torch`` (CPU ByteTensor), and ``cuda`` / ``npu`` (list of
    ByteTensors, one per visible device) when that backend is available. ``numpy.random.Generator``
    objects (``default_rng``) are not global and are not covered.
    """
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    out: dict[str, Any] = {
        "python": [int(version), [int(x) for x in state], gauss],
        "numpy": {
            "name": str(name),
            "keys": [int(x) for x in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    npu = getattr(torch, "npu", None)
    if npu is not None and npu.is_available():
        out["npu"] = npu.get_rng_state_all()
    return out


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng`. Missing keys are skipped; a device state is restored only when
    that backend is available (for min(saved, visible) devices)."""
    if "python" in state:
        version, values, gauss = state["python"]
        random.setstate((int(version), tuple(int(x) for x in values), gauss))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state(
            (
                n["name"],
                np.asarray(n["keys"], dtype=np.uint32),
                n["pos"],
                n["has_gauss"],
                n["cached_gaussian"],
            )
        )
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    npu = getattr(torch, "npu", None)
    if "npu" in state and npu is not None and npu.is_available():
        for i, s in enumerate(state["npu"][: npu.device_count()]):
            npu.set_rng_state(s, i)


def _rng_file(checkpoint: Path, rank: int) -> Path:
    return Path(checkpoint) / f"rng_rank{rank}.pt"


def write_rank_rng(tmp: Path, rank: int, rng: Mapping[str, Any] | None = None) -> Path:
    """Write ``rng`` (default: :func:`capture_rng` now) of ``rank`` into the (tmp) checkpoint dir."""
    path = _rng_file(tmp, rank)
    torch.save(dict(rng if rng is not None else capture_rng()), path)
    _fsync_file(path)
    return path


def load_rng(path: Path, rank: int = 0) -> dict[str, Any] | None:
    """The RNG dict saved by ``rank`` in checkpoint ``path`` (``weights_only=True``), or None if absent."""
    file = _rng_file(path, rank)
    if not file.is_file():
        return None
    return _read(file, lambda: torch.load(file, map_location="cpu", weights_only=True))


# ------------------------------------------------------------------------------------------------ save


def _state_of(obj: Any) -> dict[str, Any]:
    """state_dict of a module/optimizer/scheduler/EMA, or the mapping itself."""
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "state_dict"):
        return obj.state_dict()
    raise TypeError(f"expected a Mapping or an object with state_dict(), got {type(obj).__name__}")


def _tensors_for_safetensors(name: str, state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"model '{name}': entry '{key}' is {type(value).__name__}, not a tensor")
        # A fresh contiguous CPU copy: no shared storage (tied weights), no views, no device memory.
        out[key] = value.detach().cpu().clone(memory_format=torch.contiguous_format)
    return out


def prepare_checkpoint_dir(directory: Path, step: int) -> Path:
    """Create (if needed) and return ``directory/step_XXXXXXXX.tmp``; same name on every rank."""
    tmp = Path(directory) / f"{step_dir_name(step)}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp


def finalize_checkpoint(
    tmp: Path,
    step: int,
    models: Mapping[str, Any],
    optimizers: Mapping[str, Any],
    extra: Mapping[str, Any],
    metadata: Mapping[str, str],
    world_size: int = 1,
    keep_last: int | None = 3,
    on_written: Callable[[], None] | None = None,
) -> Path:
    """Rank 0: write models/optimizers/state into ``tmp``, rename it to its final name, prune.

    Requires ``rng_rank{r}.pt`` for every r < world_size to be in ``tmp`` already (callers barrier
    after :func:`write_rank_rng`). ``metadata`` values must be str. ``keep_last``: keep this many
    complete checkpoints (highest steps), always including this one; None keeps all.
    ``on_written``: called once the model files are in ``tmp`` and before the optimizer file,
    ``state.json`` and the rename (a fault-injection point for tests). Returns the final directory.
    """
    tmp = Path(tmp)
    missing = [r for r in range(world_size) if not _rng_file(tmp, r).is_file()]
    if missing:
        raise RuntimeError(f"{tmp}: no RNG file from ranks {missing}; barrier after write_rank_rng()")
    bad = {
        k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)
    }
    if bad:
        raise TypeError(f"metadata must be dict[str, str]; offending entries: {bad}")
    meta = dict(metadata)
    bad_names = [n for n in models if not _NAME_RE.match(n)]
    if bad_names:
        raise ValueError(f"model names must match {_NAME_RE.pattern} (they become file names): {bad_names}")

    for name, model in models.items():
        file = tmp / f"{name}.safetensors"
        save_file(_tensors_for_safetensors(name, _state_of(model)), str(file), metadata=meta)
        _fsync_file(file)
    if on_written is not None:
        on_written()
    optim_file = tmp / OPTIM_FILE
    torch.save({"optimizers": {name: _state_of(opt) for name, opt in optimizers.items()}}, optim_file)
    _fsync_file(optim_file)
    state = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "world_size": int(world_size),
        "models": sorted(models),
        "optimizers": sorted(optimizers),
        "extra": dict(extra),
        "metadata": meta,
        "files": {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()},
    }
    state_file = tmp / STATE_FILE
    state_file.write_text(json.dumps(state, indent=2, sort_keys=True))
    _fsync_file(state_file)
    fsync_dir(tmp)

    final = tmp.parent / step_dir_name(step)
    old = None
    if final.exists():  # re-save of the same step: move the old one away, drop it after the swap
        old = tmp.parent / f"{final.name}.tmp-old"
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if keep_last is not None:
        prune_checkpoints(final.parent, keep_last, protect=final)
    return final


def save_checkpoint(
    directory: Path,
    step: int,
    models: Mapping[str, nn.Module | Mapping[str, torch.Tensor] | Any],
    optimizers: Mapping[str, Any],
    extra: Mapping[str, Any],
    metadata: Mapping[str, str],
    rng: Mapping[str, Any] | None = None,
    keep_last: int | None = 3,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    on_written: Callable[[], None] | None = None,
) -> Path:
    """Save one checkpoint to ``directory/step_{step:08d}`` and return that path (on every rank).

    models: name -> nn.Module, a tensor state dict, or anything with ``state_dict()`` (e.g. EMA);
        each becomes ``<name>.safetensors``. Pass unwrapped modules (no DDP ``module.`` prefix).
    optimizers: name -> optimizer / LR scheduler / GradScaler (anything with ``state_dict()``).
    extra: JSON-able training state (step, epoch, samples seen, sampler state, ...).
    metadata: str -> str (resolved config text, git sha, ...), stored in state.json and every
        safetensors header.
    rng: this rank's RNG state; None captures it now (:func:`capture_rng`).
    rank, world_size, barrier: with world_size > 1 every rank calls this with the same ``step``;
        ranks != 0 only write their RNG file (their models/optimizers are ignored), ``barrier`` (e.g.
        ``accelerator.wait_for_everyone``) is required and is called twice (see module docstring).
    on_written: passed to :func:`finalize_checkpoint` (rank 0).
    """
    if world_size > 1 and barrier is None:
        raise ValueError("save_checkpoint with world_size > 1 needs a barrier callable")
    tmp = prepare_checkpoint_dir(directory, step)
    write_rank_rng(tmp, rank, rng)
    if barrier is not None:
        barrier()
    final = Path(directory) / step_dir_name(step)
    if rank == 0:
        final = finalize_checkpoint(tmp, step, models, optimizers, extra, metadata, world_size, keep_last, on_written)
    if barrier is not None:
        barrier()
    return final


# ---------------------------------------------------------------------------------------- discovery


def _complete_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint (final name and a state.json), sorted by step."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        m = _FINAL_RE.match(child.name)
        if m and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoint dirs under ``directory``, oldest (lowest step) first."""
    return [p for _, p in _complete_checkpoints(directory)]


def latest_checkpoint(directory: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None. ``*.tmp*`` dirs and dirs without
    ``state.json`` are ignored."""
    found = _complete_checkpoints(directory)
    return found[-1][1] if found else None


def prune_checkpoints(directory: Path, keep_last: int, protect: Path | None = None) -> list[Path]:
    """Delete complete checkpoints except the ``keep_last`` highest steps and ``protect``. Returns the
    deleted paths."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (or None to keep all), got {keep_last}")
    paths = list_checkpoints(directory)
    keep = set(paths[-keep_last:])
    if protect is not None:
        keep.add(Path(protect))
    removed = [p for p in paths if p not in keep]
    for p in removed:
        shutil.rmtree(p)
    return removed


def cleanup_incomplete(directory: Path) -> list[Path]:
    """Remove leftover ``step_*.tmp*`` dirs and ``step_*`` dirs without ``state.json``.

    A complete ``step_X.tmp-old`` without a ``step_X`` (a crash in the middle of re-saving step X) is
    first renamed back to ``step_X``. Rank 0 only, at start-up, before any rank saves (it would delete
    an in-flight save). Returns the removed paths.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    for old in directory.glob("step_*.tmp-old"):
        final = directory / old.name.removesuffix(".tmp-old")
        if _FINAL_RE.match(final.name) and not final.exists() and (old / STATE_FILE).is_file():
            os.rename(old, final)
            fsync_dir(directory)
    removed = []
    for child in sorted(directory.iterdir()):
        if not child.is_dir():
            continue
        if _TMP_RE.match(child.name) or (_FINAL_RE.match(child.name) and not (child / STATE_FILE).is_file()):
            shutil.rmtree(child)
            removed.append(child)
    return removed


# ------------------------------------------------------------------------------------------------ load


def read_state(path: Path) -> dict[str, Any]:
    """The parsed ``state.json`` of checkpoint ``path``."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory (no {STATE_FILE}): give a run directory or "
                              "its checkpoints/step_* directory")
    try:
        state = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{file} is damaged ({error}): use another checkpoint") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatchError(
            f"{path}: checkpoint format_version {state.get('format_version')} was written by another version "
            f"of mergevq; this version reads format_version {FORMAT_VERSION}"
        )
    found = state.get("metadata", {}).get("format")
    if found is not None and found != RUN_FORMAT:
        raise CheckpointMismatchError(f"{path} was written by another version of mergevq (run format {found!r}); this "
                                      f"version reads {RUN_FORMAT!r}: retrain, or load it with the version that wrote it")
    return state


def load_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    """The raw CPU state dict stored as ``<name>.safetensors`` in checkpoint ``path``."""
    file = Path(path) / f"{name}.safetensors"
    if not file.is_file():
        have = sorted(p.stem for p in Path(path).glob("*.safetensors"))
        raise FileNotFoundError(f"{path}: no model '{name}' (checkpoint has {have})")
    return _read(file, lambda: load_file(str(file), device="cpu"))


def mis_shaped(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """Keys in both state dicts whose tensors differ in shape, sorted."""
    return sorted(k for k in set(expected) & set(found)
                  if isinstance(expected[k], torch.Tensor) and tuple(expected[k].shape) != tuple(found[k].shape))


def compare_states(expected: Mapping[str, Any], found: Mapping[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """The one state-dict comparison: (missing, unexpected, shape mismatches as
    'name: checkpoint (..) vs model (..)'), each sorted by key. expected: the model's, found: the file's."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shape = [f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in mis_shaped(expected, found)]
    return missing, unexpected, shape


def _load_into(name: str, target: Any, loaded: dict[str, torch.Tensor], strict: bool) -> dict[str, list[str]]:
    """Check ``loaded`` against ``target.state_dict()`` and load it. Returns the mismatch report."""
    expected = target.state_dict()
    missing, unexpected, shape = compare_states(expected, loaded)
    bad_shape = set(mis_shaped(expected, loaded))
    report = {"missing": missing, "unexpected": unexpected, "shape_mismatch": shape}
    if strict and (missing or unexpected or shape):
        lines = [f"model '{name}' does not match its checkpoint:"]
        lines += [f"  {kind}: {', '.join(items)}" for kind, items in report.items() if items]
        raise CheckpointMismatchError("\n".join(lines))
    usable = {k: v for k, v in loaded.items() if k in expected and k not in bad_shape}
    if isinstance(target, nn.Module):
        target.load_state_dict(usable, strict=strict)
    else:
        target.load_state_dict(usable)
    return report


def load_checkpoint(
    path: Path,
    models: Mapping[str, Any],
    optimizers: Mapping[str, Any] | None = None,
    rank: int = 0,
    strict: bool = True,
) -> dict[str, Any]:
    """Load checkpoint ``path`` into ``models`` (and ``optimizers``) in place; return its state.

    models: name -> nn.Module or any object with state_dict()/load_state_dict() (e.g. EMA); each is
        read from ``<name>.safetensors`` (a missing file raises FileNotFoundError). strict: missing or
        unexpected keys and shape mismatches raise :class:`CheckpointMismatchError` listing all of
        them; non-strict loads the keys that fit and reports the rest.
    optimizers: name -> object with load_state_dict(); read from ``optim.pt`` with weights_only=True.
    Returns state.json as a dict (``step``, ``extra``, ``metadata``, ``world_size``, ...) plus
    ``rng`` (this ``rank``'s RNG dict or None; restore it with :func:`restore_rng` when appropriate)
    and ``load_report`` (name -> {missing, unexpected, shape_mismatch}).
    """
    path = Path(path)
    state = read_state(path)
    files = [f"{name}.safetensors" for name in models] + ([OPTIM_FILE] if optimizers else [])
    verify_files(path, [*files, _rng_file(path, rank).name], state)
    state["load_report"] = {
        name: _load_into(name, target, load_tensors(path, name), strict) for name, target in models.items()
    }
    if optimizers:
        optim_file = path / OPTIM_FILE
        saved = _read(optim_file, lambda: torch.load(optim_file, map_location="cpu", weights_only=True))["optimizers"]
        absent = sorted(set(optimizers) - set(saved))
        if absent:
            raise KeyError(f"{path}: no optimizer state for {absent} (checkpoint has {sorted(saved)})")
        for name, opt in optimizers.items():
            opt.load_state_dict(saved[name])
    state["rng"] = load_rng(path, rank)
    return state

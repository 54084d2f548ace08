"""One run directory shared by every rank: pinned from rank 0, probed for writability, provenance and
checkpoints written by rank 0 (each rank adds only its own RNG state to a checkpoint), and resume
from the last complete checkpoint.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import (
    CheckpointMismatchError,
    cleanup_incomplete,
    latest_checkpoint,
    load_checkpoint,
    read_state,
    restore_rng,
    save_checkpoint,
)
from .provenance import git_sha, write_provenance
from .runner import fault_point

FORMAT = "mergevq-run/1"
# Config entries that describe the run, not the model: left out of "checkpoint of another config" hints.
_RUN_KEYS = ("run_dir", "resume", "overrides", "train", "logger", "backend", "data", "task", "seed", "codes")

log = logging.getLogger(__name__)


def probe_writable(directory: Path) -> None:
    """Fail before training when the run directory cannot be written (permissions, full disk, a path
    under a file)."""
    probe = directory / f".probe-{uuid.uuid4().hex}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with probe.open("wb") as handle:
            handle.write(b"\0" * 65536)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        raise OSError(f"run directory {directory} is not writable ({reason}); set hydra.run.dir=<writable path>") from error
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass


def check_format(state: Mapping[str, Any], path: Path) -> None:
    """A checkpoint's run format (``metadata.format``) must be this version's, when it has one."""
    found = state.get("metadata", {}).get("format")
    if found is not None and found != FORMAT:
        raise ValueError(f"{path} was written by another version of mergevq (run format {found!r}); this version "
                         f"reads {FORMAT!r}: retrain, or load it with the version that wrote it")


def config_differences(stored: Mapping[str, Any], current: Mapping[str, Any], limit: int = 8) -> list[str]:
    """'key: checkpoint A, this run B' for the model-defining config entries that differ."""
    def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(tree, Mapping):
            return {prefix: tree}
        out: dict[str, Any] = {}
        for key, value in tree.items():
            if not prefix and key in _RUN_KEYS:
                continue
            out.update(flat(value, f"{prefix}{key}."))
        return out

    a, b = flat(stored), flat(current)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return [f"{k.rstrip('.')}: checkpoint {a.get(k)!r}, this run {b.get(k)!r}" for k in keys[:limit]]


class RunSession:
    """run_dir: the directory Hydra chose on this rank; config: the resolved config (plain dict);
    config_text: its YAML, stored with the run and inside every checkpoint."""

    def __init__(self, run_dir: str | Path, config: Mapping[str, Any], config_text: str, keep_last: int = 3):
        self.run_dir = Path(run_dir)
        self.config, self.config_text, self.keep_last = dict(config), config_text, keep_last
        self.acc = None
        self.sha = git_sha()

    def attach(self, accelerator) -> None:
        """Pin the run directory to rank 0's choice and, on rank 0, probe it and write provenance."""
        from accelerate.utils import broadcast_object_list

        self.acc = accelerator
        if accelerator.num_processes > 1:
            shared = [str(self.run_dir)]
            broadcast_object_list(shared, from_process=0)
            self.run_dir = Path(shared[0])
        if accelerator.is_main_process:
            probe_writable(self.run_dir)
            cleanup_incomplete(self.checkpoint_dir)
            write_provenance(self.run_dir, self.config_text)
        accelerator.wait_for_everyone()

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "config": self.config_text, "git_sha": self.sha}

    def save_checkpoint(self, step: int, models: Mapping[str, Any], optimizers: Mapping[str, Any], extra: Mapping[str, Any]) -> Path:
        acc = self.acc
        return save_checkpoint(
            self.checkpoint_dir, step, models, optimizers, extra, self.metadata(),
            keep_last=self.keep_last, rank=acc.process_index, world_size=acc.num_processes,
            barrier=acc.wait_for_everyone if acc.num_processes > 1 else None,
            on_written=lambda: fault_point("checkpoint_write", step, acc.process_index),
        )

    def resume(self, resume: str, models: Mapping[str, Any], optimizers: Mapping[str, Any]) -> dict[str, Any] | None:
        """Load the checkpoint ``resume`` names into models and optimizers in place and restore this
        rank's RNG; -> its state (``step``, ``extra``, ...), or None when there is nothing to resume.

        resume: ``auto`` (the run directory's last complete checkpoint; half-written ``.tmp`` dirs are
        never candidates), ``never``, or a checkpoint directory. A checkpoint of another mergevq version
        or of another model configuration is refused with the versions, or the mismatched keys and
        shapes plus the config entries that differ."""
        if resume == "never":
            return None
        path = latest_checkpoint(self.checkpoint_dir) if resume == "auto" else Path(resume)
        if path is None:
            return None
        check_format(read_state(path), path)
        try:
            state = load_checkpoint(path, models, optimizers, rank=self.acc.process_index)
        except CheckpointMismatchError as error:
            stored = yaml.safe_load(read_state(path).get("metadata", {}).get("config") or "{}") or {}
            differences = config_differences(stored, self.config)
            hint = "; config differences: " + "; ".join(differences) if differences else ""
            raise CheckpointMismatchError(
                f"resume={path} holds a checkpoint of another configuration{hint}\n{error}"
            ) from None
        if state["rng"] is not None:
            restore_rng(state["rng"])
        log.info("resumed from %s at step %d", path, state["step"])
        return state

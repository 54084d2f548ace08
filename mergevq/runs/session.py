"""One run directory shared by every rank: pinned from rank 0, locked and probed for writability by
rank 0, provenance and checkpoints written by rank 0 (each rank adds only its own RNG state to a
checkpoint), and resume from the last intact checkpoint.

Resume rules: the resolved config is compared with the one stored in the checkpoint before anything
is written. Keys in ``MUTABLE`` (step counts, learning rates, logging, hardware) may change: they are
listed in the log and applied (the trainer re-applies learning rates after loading the optimizer
state). Any other difference refuses the resume with the list of keys. With ``resume=auto`` a damaged
checkpoint (hash mismatch, unreadable file) is skipped for the one before it, with a warning.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..errors import CheckpointError, RunDirError, UserError, one_line
from .checkpoint import (
    RUN_FORMAT,
    CheckpointMismatchError,
    cleanup_incomplete,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_state,
    restore_rng,
    save_checkpoint,
    step_dir_name,
)
from .faults import fault_point
from .provenance import git_sha, write_provenance
from .runlock import RunLock

# Config entries that describe the run, not the model: left out of "checkpoint of another config" hints.
_RUN_KEYS = ("run_dir", "resume", "overrides", "train", "logger", "backend", "data", "task", "seed", "codes")
# Config keys (dotted prefixes) a resume may change; every other difference refuses the resume.
MUTABLE = ("train.max_steps", "train.lr", "train.disc_lr", "train.lr_schedule", "train.grad_clip", "train.log_every",
           "train.val_every", "train.ckpt_every", "train.keep_last", "train.progress", "train.interrupt_at",
           "train.num_workers", "train.val_batches", "train.val_keeps", "train.max_bad_steps",
           "train.collapse_alarm", "train.activation_checkpointing", "logger", "backend", "paths",
           "optimized_metric")
_NOT_COMPARED = ("run_dir", "resume", "overrides")

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


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, Mapping) or not tree:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def resume_changes(stored: Mapping[str, Any], current: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """-> (changes a resume applies, changes that refuse it), each as 'key: checkpoint A, this run B'."""
    a, b = _flatten(stored), _flatten(current)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith(_NOT_COMPARED))
    allowed, refused = [], []
    for key in keys:
        name = key.rstrip(".")
        text = f"{name}: checkpoint {a.get(key)!r}, this run {b.get(key)!r}"
        (allowed if any(name == m or name.startswith(m + ".") for m in MUTABLE) else refused).append(text)
    return allowed, refused


def stored_run_config(state: Mapping[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(state.get("metadata", {}).get("config") or "{}") or {}


class RunSession:
    """run_dir: the directory Hydra chose on this rank; config: the resolved config (plain dict);
    config_text: its YAML, stored with the run and inside every checkpoint."""

    def __init__(self, run_dir: str | Path, config: Mapping[str, Any], config_text: str, keep_last: int = 3):
        self.run_dir = Path(run_dir)
        self.config, self.config_text, self.keep_last = dict(config), config_text, keep_last
        self.acc = None
        self.sha = git_sha()
        self.lock: RunLock | None = None

    def __enter__(self) -> RunSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the run-directory lock (rank 0); the kernel also drops it when the process dies."""
        if self.lock is not None:
            self.lock.release()

    def attach(self, accelerator) -> None:
        """Pin the run directory to rank 0's choice and, on rank 0, probe and lock it, check the resume
        config against the stored one and write provenance; a failure there is raised on every rank."""
        from accelerate.utils import broadcast_object_list

        self.acc = accelerator
        if accelerator.num_processes > 1:
            shared = [str(self.run_dir)]
            broadcast_object_list(shared, from_process=0)
            self.run_dir = Path(shared[0])
        failure: list[Any] = [None]
        error: UserError | None = None
        if accelerator.is_main_process:
            try:
                self._prepare_run_dir()
            except UserError as raised:
                error, failure = raised, [one_line(raised)]
        if accelerator.num_processes > 1:
            broadcast_object_list(failure, from_process=0)
        if error is not None:
            raise error
        if failure[0] is not None:
            raise UserError(f"rank 0 could not start the run: {failure[0]}")
        accelerator.wait_for_everyone()

    def _prepare_run_dir(self) -> None:
        probe_writable(self.run_dir)
        self.lock = RunLock(self.run_dir)
        self.lock.acquire()
        try:
            cleanup_incomplete(self.checkpoint_dir)
            self.check_resume_config(self.config.get("resume", "auto"))
            write_provenance(self.run_dir, self.config_text)
        except BaseException:
            self.close()
            raise

    def _candidates(self, resume: str) -> list[Path]:
        """Checkpoints ``resume`` may load, the preferred first."""
        if resume == "never":
            return []
        return list(reversed(list_checkpoints(self.checkpoint_dir))) if resume == "auto" else [Path(resume)]

    def check_resume_config(self, resume: str) -> list[str]:
        """Refuse a resume whose config differs in keys outside ``MUTABLE`` (all listed); log and return
        the differences that will be applied."""
        for path in self._candidates(resume):
            try:
                state = read_state(path)
            except CheckpointMismatchError:
                raise
            except CheckpointError:
                continue  # unreadable: resume() falls back past it
            stored = stored_run_config(state)
            task = stored.get("task") or ("train_ar" if "gpt" in state.get("models", []) else "train_tokenizer")
            if task != self.config.get("task"):
                raise CheckpointError(
                    f"resume={path} is a checkpoint of {task} (models {', '.join(state.get('models', []))}); "
                    f"this is {self.config.get('task')}: resume from one of its own runs, or set resume=never")
            if stored.get("codes") and self.config.get("codes"):  # older stage-II runs stored it as given
                stored["codes"] = str(Path(str(stored["codes"])).expanduser().resolve())
            allowed, refused = resume_changes(stored, self.config)
            if refused:
                raise CheckpointMismatchError(
                    f"resume={path} holds a checkpoint of another configuration; keys that cannot change on resume "
                    f"differ: {'; '.join(refused)}: restore them, or train in a new run directory")
            if allowed:
                log.info("resume from %s applies changed settings: %s", path, "; ".join(allowed))
            return allowed
        return []

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def metadata(self) -> dict[str, str]:
        return {"format": RUN_FORMAT, "config": self.config_text, "git_sha": self.sha}

    def save_checkpoint(self, step: int, models: Mapping[str, Any], optimizers: Mapping[str, Any], extra: Mapping[str, Any]) -> Path:
        """Save one checkpoint; a failed write (full disk) is one line naming the run directory, the
        half-written step removed and the previous checkpoint untouched."""
        acc = self.acc
        try:
            return save_checkpoint(
                self.checkpoint_dir, step, models, optimizers, extra, self.metadata(),
                keep_last=self.keep_last, rank=acc.process_index, world_size=acc.num_processes,
                barrier=acc.wait_for_everyone if acc.num_processes > 1 else None,
                on_written=lambda: fault_point("checkpoint_write", step, acc.process_index),
            )
        except OSError as error:
            if acc.num_processes == 1:
                shutil.rmtree(self.checkpoint_dir / f"{step_dir_name(step)}.tmp", ignore_errors=True)
            previous = latest_checkpoint(self.checkpoint_dir)
            raise RunDirError(
                f"could not write the step-{step} checkpoint in run directory {self.run_dir} ({one_line(error)}); "
                f"the previous checkpoint {previous or '(none)'} is intact: free space there and rerun with resume=auto"
            ) from error

    def resume(self, resume: str, models: Mapping[str, Any], optimizers: Mapping[str, Any]) -> dict[str, Any] | None:
        """Load the checkpoint ``resume`` names into models and optimizers in place and restore this
        rank's RNG; -> its state (``step``, ``extra``, ...), or None when there is nothing to resume.

        resume: ``auto`` (the run directory's last complete checkpoint; half-written ``.tmp`` dirs are
        never candidates), ``never``, or a checkpoint directory. A checkpoint of another mergevq version
        or of another model configuration is refused with the versions, or the mismatched keys and
        shapes plus the config entries that differ."""
        candidates = self._candidates(resume)
        for index, path in enumerate(candidates):
            try:
                state = self._load(path, models, optimizers)
                break
            except CheckpointMismatchError:
                raise
            except CheckpointError as error:
                if index + 1 == len(candidates) or resume != "auto":
                    raise
                log.warning("%s; resume=auto falls back to the previous checkpoint %s", one_line(error), candidates[index + 1])
        else:
            return None
        if state["rng"] is not None:
            restore_rng(state["rng"])
        log.info("resumed from %s at step %d", path, state["step"])
        return state

    def _load(self, path: Path, models: Mapping[str, Any], optimizers: Mapping[str, Any]) -> dict[str, Any]:
        state = read_state(path)
        absent = sorted(set(models) - set(state.get("models", [])))
        if absent:
            raise CheckpointError(f"resume={path} has no {', '.join(absent)} (it holds {', '.join(state.get('models', []))}): "
                                  "resume from a run of this entry, or set resume=never")
        try:
            return load_checkpoint(path, models, optimizers, rank=self.acc.process_index)
        except CheckpointMismatchError as error:
            differences = config_differences(stored_run_config(state), self.config)
            hint = "; config differences: " + "; ".join(differences) if differences else ""
            raise CheckpointMismatchError(f"resume={path} holds a checkpoint of another configuration{hint}\n{error}") from None

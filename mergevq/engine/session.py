"""One run directory shared by every rank: pinned from rank 0, probed for writability, provenance and
checkpoints written by rank 0 (each rank adds only its own RNG state to a checkpoint).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .checkpoint import cleanup_incomplete, save_checkpoint
from .provenance import git_sha, write_provenance

FORMAT = "mergevq-run/1"


def probe_writable(directory: Path) -> None:
    """Fail before training when the run directory cannot be written (permissions, full disk)."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".probe-{uuid.uuid4().hex}"
    try:
        with probe.open("wb") as handle:
            handle.write(b"\0" * 65536)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise OSError(f"run directory {directory} is not writable ({error}); set hydra.run.dir=<writable path>") from error
    finally:
        probe.unlink(missing_ok=True)


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
        )

"""Test hook: fault injection (``MERGEVQ_FAULT``), a kill -9 or a NaN loss at a chosen step, used by
the trainers and the checkpoint writer."""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

FAULT_ENV = "MERGEVQ_FAULT"
FAULT_POINTS = ("step", "checkpoint_write", "validation", "nan_loss")


def fault_armed(point: str, step: int, rank: int = 0) -> bool:
    """Test hook: whether ``MERGEVQ_FAULT`` arms ``point`` at ``step`` on ``rank`` (False when unset).

    MERGEVQ_FAULT holds ';'-separated entries ``point:steps[:rank<r>]``, steps ','-separated, e.g.
    ``checkpoint_write:3``, ``nan_loss:2,3`` or ``step:2:rank1`` (no rank: every rank). Points:
    ``step`` (inside a training step, after backward, before the optimizer step), ``nan_loss`` (the
    loss becomes NaN), numbered by the 1-based batch count (= the optimizer step until a step is
    skipped); ``checkpoint_write`` (rank 0, the tmp checkpoint dir half written, before the rename)
    and ``validation`` (inside validation), numbered by the optimizer step they belong to.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return False
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        name, _, rest = entry.partition(":")
        steps, _, where = rest.partition(":")
        if name not in FAULT_POINTS:
            raise ValueError(f"{FAULT_ENV}={spec}: unknown fault point {name!r}; use {', '.join(FAULT_POINTS)}")
        if name == point and str(step) in steps.split(",") and where in ("", f"rank{rank}"):
            return True
    return False


def fault_point(point: str, step: int, rank: int = 0) -> None:
    """Test hook: SIGKILL this process here when ``MERGEVQ_FAULT`` arms ``point`` (a kill -9 in the
    middle of training); a no-op otherwise."""
    if fault_armed(point, step, rank):
        log.warning("%s: killing process %d at %s, step %d", FAULT_ENV, os.getpid(), point, step)
        os.kill(os.getpid(), signal.SIGKILL)

"""Learning-rate multipliers counted in OPTIMIZER steps (not micro-batches).

``lr_lambda(...)(s)`` is the multiplier of the base LR for the optimizer step taken after ``s``
optimizer steps have been done (``LambdaLR`` calls it with ``last_epoch``): ``s = 0`` is the first
step, and ``s = total_steps`` (what the scheduler reports after the last step) is the end value; the
multiplier stays at the end value beyond it.

Kinds (after an optional linear warm-up from ``warmup_start`` at s = 0 to 1 at s = warmup_steps):

* ``constant``: 1.
* ``step``: ``drop_rate ** (number of drop_steps <= s)``; drop_steps are absolute optimizer steps.
* ``cosine``: ``min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2``, p from 0 at warmup_steps to 1
  at total_steps.
* ``var`` (VAR-style stage II): warm-up, then constant 1 for ``hold_ratio * total_steps`` steps
  (5% by default), then linear from 1 down to ``min_ratio`` at total_steps. Typical values:
  ``warmup_start=0.005, min_ratio=0.1``.

With Accelerate: do not ``accelerator.prepare`` the scheduler (its wrapper steps the scheduler
``num_processes`` times per optimizer step unless ``split_batches=True``) and call
``scheduler.step()`` only when ``accelerator.sync_gradients`` is True. Compute ``total_steps`` with
:func:`optimizer_steps`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

KINDS = ("constant", "step", "cosine", "var")


def optimizer_steps(num_micro_batches: int, accumulation: int = 1, epochs: int = 1) -> int:
    """Optimizer steps of ``epochs`` epochs of ``num_micro_batches`` batches (per process) each.

    Ceil division per epoch: the last, partial accumulation window of an epoch still ends in an
    optimizer step, as Accelerate does by default (``sync_with_dataloader=True``).
    """
    if num_micro_batches < 0 or accumulation < 1 or epochs < 0:
        raise ValueError(f"bad arguments: {num_micro_batches=}, {accumulation=}, {epochs=}")
    return epochs * (-(-num_micro_batches // accumulation))


def lr_lambda(
    kind: str,
    total_steps: int,
    warmup_steps: int = 0,
    drop_steps: Sequence[int] = (),
    drop_rate: float = 0.1,
    min_ratio: float = 0.0,
    warmup_start: float = 0.0,
    hold_ratio: float = 0.05,
) -> Callable[[int], float]:
    """A function optimizer step s (>= 0) -> LR multiplier; see the module docstring for the kinds."""
    if kind not in KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {KINDS}")
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps: {total_steps=}, {warmup_steps=}"
        )
    drops = sorted(int(d) for d in drop_steps)
    hold_end = min(total_steps, warmup_steps + round(hold_ratio * total_steps))

    def after_warmup(s: int) -> float:
        if kind == "constant":
            return 1.0
        if kind == "step":
            return drop_rate ** sum(1 for d in drops if d <= s)
        if kind == "cosine":
            p = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
            return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
        # var
        if s < hold_end:
            return 1.0
        p = min(1.0, (s - hold_end) / max(1, total_steps - hold_end))
        return 1.0 + (min_ratio - 1.0) * p

    def fn(s: int) -> float:
        if s < warmup_steps:
            return warmup_start + (1.0 - warmup_start) * s / warmup_steps
        return after_warmup(s)

    return fn


def build_scheduler(optimizer: torch.optim.Optimizer, **kwargs) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR(optimizer, lr_lambda(**kwargs))``; step it once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(**kwargs))

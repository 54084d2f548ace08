"""Exponential moving average of model weights.

After each optimizer step: ``shadow <- decay * shadow + (1 - decay) * param`` for every floating-point
parameter (one ``torch._foreach_lerp_`` call); buffers (BatchNorm statistics, counters) and
non-floating parameters are copied as they are. The shadow lives on the parameters' device and dtype.
Pass the unwrapped model (``accelerator.unwrap_model(model)``), so names carry no DDP prefix.

Cadence: the official stage-I code updates its EMA once per *micro-batch* (Lightning's
``on_train_batch_end``) while the weights change once per optimizer step, so under gradient
accumulation a the same weights are averaged in a times: decay^a per optimizer step. ``update(model,
repeats=a)`` does exactly that in one lerp; ``updates_per_step`` maps the config's cadence to a.

``state_dict()`` is keyed exactly like ``model.state_dict()`` (plain tensors), so a checkpoint's
``ema.safetensors`` loads straight into a bare model for evaluation. ``num_updates`` (used only by the
optional warm-up) is not part of it: store it in the checkpoint ``extra`` if warm-up is on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

CADENCES = ("micro_batch", "optimizer_step")


def updates_per_step(cadence: str, grad_accum: int) -> int:
    """EMA updates one optimizer step counts for: grad_accum for the official per-micro-batch cadence,
    1 for once per optimizer step."""
    if cadence not in CADENCES:
        raise ValueError(f"train.ema.cadence={cadence!r} is unknown: use one of {', '.join(CADENCES)}")
    return int(grad_accum) if cadence == "micro_batch" else 1


class EMA:
    """EMA of ``model``'s weights.

    decay: per-update decay in [0, 1). warmup: use ``min(decay, (1 + n) / (10 + n))`` for update n
    (n = 0, 1, ...) so early averages are not dominated by the random init; off by default.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = warmup
        self.num_updates = 0
        with torch.no_grad():
            # remove_duplicate=False: every name of a tied parameter gets (identical) averaged values.
            self._param_names = [
                n for n, p in model.named_parameters(remove_duplicate=False) if p.is_floating_point()
            ]
            self.shadow: dict[str, torch.Tensor] = {
                k: v.detach().clone() for k, v in model.state_dict(keep_vars=False).items()
            }

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module, repeats: int = 1) -> None:
        """``repeats`` EMA steps towards ``model``'s current weights (one lerp with the product of
        their decays); call once per optimizer step."""
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        decay = 1.0
        for _ in range(repeats):
            decay *= self.current_decay()
            self.num_updates += 1
        params = dict(model.named_parameters(remove_duplicate=False))
        averaged = set(self._param_names)
        torch._foreach_lerp_(
            [self.shadow[n] for n in self._param_names],
            [params[n].detach() for n in self._param_names],
            1.0 - decay,
        )
        for name, value in model.state_dict().items():
            if name not in averaged:
                self.shadow[name].copy_(value)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters and buffers with the EMA weights."""
        model.load_state_dict(self.shadow, strict=True)

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into ``model``; the original weights are restored bitwise
        on exit (also on exceptions)."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                model.load_state_dict(backup, strict=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Shadow weights keyed like ``model.state_dict()`` (the live tensors; the checkpoint clones)."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy ``state`` into the shadow in place (keys must match; dtype/device of the shadow kept)."""
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(f"EMA state mismatch: missing {missing}, unexpected {unexpected}")
        for k, v in state.items():
            self.shadow[k].copy_(v)

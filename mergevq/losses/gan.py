"""GAN losses for the stage-I tokenizer: hinge D loss, non-saturating G loss, LeCam regulariser.

Logits are PatchGAN maps of any shape [B, ...]; every function reduces to a scalar.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))).  logits [B, ...] -> scalar."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """mean_b softplus(-mean_ij D(x_rec)[b, ij]).  logits_fake [B, ...] -> scalar.

    The patch logits are averaged per image *before* the softplus (= BCE with target "real"),
    as in the official code (spec 6.2); this is not the mean of per-patch softplus values.
    """
    per_image = logits_fake.flatten(1).mean(dim=1)
    return F.softplus(-per_image).mean()


class LeCam(nn.Module):
    """LeCam regulariser (Tseng et al. 2021) with EMA anchors of the batch-mean logits.

    forward(logits_real, logits_fake) -> scalar
        = mean relu(D(x) - ema_fake)^2 + mean relu(ema_real - D(x_rec))^2

    In training mode the buffers ``ema_real`` / ``ema_fake`` (scalars, init 0) are first updated
    with ``ema = decay * ema + (1 - decay) * mean(logits)`` (detached), then the penalty is
    computed with the updated values. In eval mode the buffers are left untouched. This differs
    from the official code, which also updates them during validation; we do not, so evaluating a
    model never changes its training state. The buffers are per process (not all-reduced), as in
    the official code: keep this module outside a DDP-wrapped discriminator, or DDP would broadcast
    rank 0's buffers.
    """

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        """Move both EMAs towards the batch-mean logits (called by forward in training mode)."""
        self.ema_real.mul_(self.decay).add_((1.0 - self.decay) * logits_real.float().mean())
        self.ema_fake.mul_(self.decay).add_((1.0 - self.decay) * logits_fake.float().mean())

    def penalty(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """The regulariser against the current anchors (no update)."""
        return (
            F.relu(logits_real - self.ema_fake).pow(2).mean()
            + F.relu(self.ema_real - logits_fake).pow(2).mean()
        )

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.update(logits_real, logits_fake)
        return self.penalty(logits_real, logits_fake)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Temporarily set ``requires_grad=False`` on all of ``module``'s parameters; restore after.

    Used for the generator's adversarial loss: gradients still flow through D into its input
    (the reconstruction) but none accumulate in D's ``.grad`` (fixes the official accumulation bug,
    spec 6.4). Previous flags are restored even if the body raises. BatchNorm running statistics
    are not frozen: that is a matter of ``train()``/``eval()``, not of this context.
    """
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)

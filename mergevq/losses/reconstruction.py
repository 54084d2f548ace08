"""Pixel reconstruction loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_loss(x: torch.Tensor, xrec: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Per-element mean |x - xrec| (``'l1'``, official code) or (x - xrec)^2 (``'l2'``, paper).

    x, xrec [B, C, H, W] (any equal shapes) -> scalar. Unknown ``kind`` -> ValueError.
    """
    if kind == "l1":
        return F.l1_loss(xrec, x)
    if kind == "l2":
        return F.mse_loss(xrec, x)
    raise ValueError(f"unknown reconstruction loss kind {kind!r}; expected 'l1' or 'l2'")

"""Linear probing on frozen tokenizer features (spec section 5: no official code; inferred protocol).

Feature kinds (one encoder pass, no decoder):
    'cls'          MergeVQ: the encoder's CLS token after the last ViT block, *before* the alignment
                   head ([B, C], C = encoder width). Equals ``aux['cls']`` of ``tokenizer(x, keep)``.
    'mean'         MergeVQ: mean over the K kept tokens of the last ViT block's output, *before* the
                   latent head ([B, C]). ``aux`` does not expose these, so they are read from the
                   encoder's own stem and transformer (the same computation as ``encoder.forward``).
    'mean_latent'  mean over kept tokens of the latents z ([B, z_channels], = ``aux['z'].mean(1)``);
                   MAGVIT2: mean over all positions of the pre-quantisation latent.
A kind a tokenizer cannot provide is skipped: no 'cls' without a CLS token (MAGVIT2); 'mean' falls
back to 'mean_latent' when token features before the latent head are not reachable.

The probe (a simplified MAE / MoCo-v3 recipe): BatchNorm1d(affine=False) + Linear (weights
trunc-normal std 0.01, bias 0), SGD momentum 0.9, weight decay 0 by default, cross-entropy, mini-batches
of ``batch_size`` shuffled with a seeded generator, a linear warm-up over the first 10 % of epochs
then cosine decay per step. No augmentation (features are extracted once). Deterministic given seed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mergevq.models.magvit2 import Magvit2Tokenizer
from mergevq.models.tokenizer import MergeVQTokenizer

KINDS = ("cls", "mean", "mean_latent")


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader item -> (images [B, 3, H, W], labels [B]): dicts with 'image'/'label' or (x, y) pairs."""
    if isinstance(batch, dict):
        return batch["image"], batch["label"]
    images, labels = batch[0], batch[1]
    return images, torch.as_tensor(labels)


def _mergevq_features(tokenizer: MergeVQTokenizer, x: torch.Tensor, keep: int | None) -> dict:
    """One encoder pass -> {'cls' [B, C], 'mean' [B, C], 'mean_latent' [B, z]}."""
    encoder = tokenizer.encoder
    h, w = tokenizer.grid(x)
    out, _ = encoder.transformer(encoder.tokens(x), tokenizer.schedule(h * w, keep))  # [B, 1 + K, C]
    kept = out[:, 1:]
    return {"cls": out[:, 0], "mean": kept.mean(1), "mean_latent": encoder.latent_head(kept).mean(1)}


def _generic_features(tokenizer: nn.Module, x: torch.Tensor, keep: int | None) -> dict:
    """Fallback through forward(x, keep) -> (xrec, aux): 'cls' = aux['cls'], 'mean_latent' = mean z."""
    _, aux = tokenizer(x, keep)
    z = aux.get("z")
    return {"cls": aux.get("cls"), "mean": None, "mean_latent": None if z is None else z.mean(1)}


def probe_features(tokenizer: nn.Module, x: torch.Tensor, keep: int | None = None) -> dict:
    """x [B, 3, H, W] in [-1, 1] -> {kind: [B, D] or None} for every kind in KINDS."""
    if isinstance(tokenizer, MergeVQTokenizer):
        return _mergevq_features(tokenizer, x, keep)
    if isinstance(tokenizer, Magvit2Tokenizer):
        h, w = tokenizer.encoder.grid_size(*x.shape[-2:])
        if keep is not None and keep != h * w:
            raise ValueError(f"MAGVIT2 does not merge: keep must be None or {h * w}, got {keep}")
        z = tokenizer.encoder(x)  # [B, z, h, w]
        return {"cls": None, "mean": None, "mean_latent": z.flatten(2).mean(2)}
    return _generic_features(tokenizer, x, keep)


def resolve_kinds(available: dict, kinds: Sequence[str]) -> list[str]:
    """Requested kinds -> the kinds actually used ('mean' -> 'mean_latent' fallback, missing skipped)."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown feature kinds {unknown}; known: {list(KINDS)}")
    used = []
    for kind in kinds:
        if kind == "mean" and available.get("mean") is None:
            kind = "mean_latent"
        if available.get(kind) is not None and kind not in used:
            used.append(kind)
    return used


@torch.no_grad()
def extract_probe_features(
    tokenizer: nn.Module,
    loader: Iterable,
    keep: int | None = None,
    kinds: Sequence[str] = ("cls", "mean"),
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Frozen features for linear probing -> {kind: (features [N, D] float32, labels [N] int64)}.

    The keys are the kinds actually used (see the module docstring): e.g. ('cls', 'mean') gives
    {'cls', 'mean'} for MergeVQ and {'mean_latent'} for MAGVIT2. The tokenizer runs in eval mode
    (restored afterwards).
    """
    was_training = tokenizer.training
    tokenizer.eval()
    param = next(tokenizer.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    chunks: dict[str, list[np.ndarray]] = {}
    labels: list[np.ndarray] = []
    used: list[str] | None = None
    try:
        for batch in loader:
            images, y = _split_batch(batch)
            feats = probe_features(tokenizer, images.to(device), keep)
            used = resolve_kinds(feats, kinds) if used is None else used
            for kind in used:
                chunks.setdefault(kind, []).append(feats[kind].float().cpu().numpy())
            labels.append(y.reshape(-1).long().cpu().numpy())
    finally:
        tokenizer.train(was_training)
    all_labels = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    return {kind: (np.concatenate(chunks[kind]), all_labels) for kind in used or []}


class LinearProbe(nn.Module):
    """BatchNorm1d(affine=False) + Linear: [N, D] -> logits [N, num_classes]."""

    def __init__(self, dim: int, num_classes: int, generator: torch.Generator | None = None):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01, a=-0.02, b=0.02, generator=generator)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))


def _lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    """Linear warm-up for `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def _topk_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, chunk: int = 4096) -> float:
    """Fraction of rows whose label is among the top-k logits."""
    if len(y) == 0:
        return float("nan")
    hits = 0
    for start in range(0, len(y), chunk):
        logits = model(x[start : start + chunk])
        top = logits.topk(k, dim=1).indices
        hits += int((top == y[start : start + chunk, None]).any(1).sum())
    return hits / len(y)


def _as_tensor(a: Any, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a)).to(dtype)


def linear_probe(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    test_y: Any,
    epochs: int = 100,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
    momentum: float = 0.9,
) -> dict[str, float]:
    """Train BN(affine=False) + Linear on frozen features (CPU) -> {top1, top5 (>= 5 classes), train_top1}.

    train_x [N, D], train_y [N] int, test_x [M, D], test_y [M] (arrays or tensors). lr is the peak
    learning rate for ``batch_size`` (MoCo-v3 style scaling lr = base * batch / 256 is left to the
    caller). Labels must be 0 .. C-1; C = 1 + the largest label seen in train or test.
    """
    x, y = _as_tensor(train_x, torch.float32), _as_tensor(train_y, torch.int64)
    tx, ty = _as_tensor(test_x, torch.float32), _as_tensor(test_y, torch.int64)
    if x.ndim != 2 or len(x) != len(y) or len(x) < 2:
        raise ValueError(f"train_x must be [N>=2, D] with N labels; got {tuple(x.shape)} and {tuple(y.shape)}")
    num_classes = int(max(y.max(), ty.max() if len(ty) else 0)) + 1
    generator = torch.Generator().manual_seed(seed)
    model = LinearProbe(x.shape[1], num_classes, generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    batch_size = min(batch_size, len(x))
    steps_per_epoch = len(x) // batch_size  # drop the last partial batch (BatchNorm needs > 1 row)
    total = epochs * steps_per_epoch
    warmup = max(1, (epochs // 10) * steps_per_epoch)
    step = 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for i in range(steps_per_epoch):
            index = order[i * batch_size : (i + 1) * batch_size]
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total, warmup, lr)
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    model.eval()
    result = {"top1": _topk_accuracy(model, tx, ty, 1), "train_top1": _topk_accuracy(model, x, y, 1)}
    if num_classes >= 5:
        result["top5"] = _topk_accuracy(model, tx, ty, 5)
    return result

"""Reconstruction metrics for tokenizers: PSNR, SSIM, LPIPS, codebook statistics, rFID features.

Conventions (spec section 8):
    * Images are [B, 3, H, W] in [-1, 1]. Reconstructions are clamped to [-1, 1] before any metric.
    * PSNR and SSIM are computed per image on images mapped to [0, 1] (peak value 1) and averaged
      over images. The official script computes PSNR of the whole batch array instead; that batch-level
      number is *not* what :func:`psnr_per_image` returns.
    * SSIM is the standard Gaussian-window SSIM of torchmetrics (11x11, sigma 1.5). The official
      script uses scikit-image, whose default window is 7x7 uniform, so values differ slightly.
    * Accumulators are sums in float64 plus counts, so shards of the data can be evaluated separately
      (one shard per process) and merged exactly: the merge is a sum.

Multi-process use: shard the data without padding duplicates (or drop them before ``update``), call
``update`` on every process, then ``reduce(accelerator)`` once on every process.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure

MSE_FLOOR = 1e-10  # PSNR of identical images is capped at 10 * log10(1 / 1e-10) = 100 dB (not inf)


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] in float64, clamped."""
    return ((x.double() + 1) / 2).clamp(0, 1)


def psnr_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x, y [B, 3, H, W] in [-1, 1] -> PSNR in dB per image [B] (float64), peak 1 on [0, 1] images.

    MSE is averaged over C, H, W of each image separately and floored at ``MSE_FLOOR`` (100 dB cap).
    """
    mse = (_to_unit(x) - _to_unit(y)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(MSE_FLOOR))


def ssim_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x, y [B, 3, H, W] in [-1, 1] -> SSIM per image [B] (float64), data_range 1 on [0, 1] images."""
    return structural_similarity_index_measure(_to_unit(x), _to_unit(y), data_range=1.0, reduction="none")


class CodebookStats:
    """Counts of code indices over batches: usage, entropy and perplexity of the empirical distribution.

    counts [codebook_size] int64 on CPU; merging across processes is a sum of ``counts``.
    """

    def __init__(self, codebook_size: int):
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be positive, got {codebook_size}")
        self.codebook_size = codebook_size
        self.counts = torch.zeros(codebook_size, dtype=torch.int64)

    def update(self, codes: torch.Tensor) -> None:
        """codes: int tensor of any shape with values in [0, codebook_size)."""
        flat = codes.reshape(-1).long()
        if flat.numel() == 0:
            return
        low, high = int(flat.min()), int(flat.max())
        if low < 0 or high >= self.codebook_size:
            raise ValueError(f"codes span [{low}, {high}], outside [0, {self.codebook_size})")
        self.counts += torch.bincount(flat, minlength=self.codebook_size).cpu()

    def merge(self, other: CodebookStats) -> None:
        if other.codebook_size != self.codebook_size:
            raise ValueError(f"codebook sizes differ: {self.codebook_size} vs {other.codebook_size}")
        self.counts += other.counts

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def usage(self) -> float:
        """Fraction of the codebook seen at least once."""
        return int((self.counts > 0).sum()) / self.codebook_size

    def entropy(self, unit: str = "nats") -> float:
        """Entropy of the empirical code distribution in 'nats' or 'bits' (0 when nothing was seen)."""
        if unit not in ("nats", "bits"):
            raise ValueError(f"unit must be 'nats' or 'bits', got {unit!r}")
        if self.total == 0:
            return 0.0
        seen = self.counts[self.counts > 0].double()
        p = seen / seen.sum()
        nats = float(-(p * p.log()).sum())
        return nats / math.log(2) if unit == "bits" else nats

    def perplexity(self) -> float:
        """exp(entropy in nats): the effective number of codes used."""
        return math.exp(self.entropy("nats"))


class _KeepAccumulator:
    """Sums for one keep count K: psnr/ssim/lpips sums, counts, code counts, feature chunks."""

    def __init__(self, codebook_size: int):
        self.sums = torch.zeros(3, dtype=torch.float64)  # psnr, ssim, lpips
        self.counts = torch.zeros(4, dtype=torch.int64)  # images, images with lpips, classified, classified right
        self.codes = CodebookStats(codebook_size)
        self.features: list[np.ndarray] = []
        self.num_tokens: int | None = None

    def merge(self, other: _KeepAccumulator) -> None:
        self.sums += other.sums
        self.counts += other.counts
        self.codes.merge(other.codes)
        self.features.extend(other.features)
        self.num_tokens = self.num_tokens or other.num_tokens


def _as_numpy(features: Any) -> np.ndarray:
    """Features from feature_fn (tensor or array) -> float32 numpy [B, D]."""
    if isinstance(features, torch.Tensor):
        features = features.detach().float().cpu().numpy()
    features = np.asarray(features, dtype=np.float32)
    return features.reshape(features.shape[0], -1)


def _codebook_size(tokenizer: nn.Module) -> int:
    quantizer = getattr(tokenizer, "quantizer", None)
    if quantizer is None or not hasattr(quantizer, "codebook_size"):
        raise ValueError("the tokenizer has no quantizer.codebook_size; pass codebook_size explicitly")
    return int(quantizer.codebook_size)


class ReconstructionEvaluator:
    """One pass over the data, reconstructing every batch at every keep count K.

    tokenizer:  ``encode(x, keep) -> Tokens`` and ``decode(Tokens) -> image`` (MergeVQ or MAGVIT2).
    keeps:      keep counts K; None means the tokenizer's default (MAGVIT2: all positions).
    lpips:      optional module (x, y in [-1, 1]) -> per-image distance [B].
    feature_fn: optional images [B, 3, H, W] in [-1, 1] -> features [B, D] (tensor or array), e.g.
                InceptionV3 pool3 for rFID. Reconstruction features are kept per K and, with
                ``collect_real_features``, the features of the inputs once (``real_features()``).
    classify:   optional images [B, 3, H, W] in [-1, 1] -> predicted classes [B] (``eval.classifier``):
                with labels given to ``update``, the class accuracy of the reconstructions per K and of
                the originals (``original_class_accuracy()``): how much class information survives.

    update(x [B, 3, H, W], labels [B] or None); results() -> {K: {psnr, ssim, lpips, code_usage,
    code_entropy_bits, code_perplexity, num_tokens, num_images, class_accuracy (with classify)}};
    features(K) -> [N, D] float32.

    With a Source Recovery module (``tokenizer.recovery``) every K is also decoded with the groups it
    predicts from the K codes and their first raster positions (the generation route of spec 7.5):
    results add psnr_recovered, ssim_recovered, lpips_recovered and recovery_accuracy (fraction of
    positions given their true owner); features(K, recovered=True) for its rFID.
    """

    def __init__(
        self,
        tokenizer: nn.Module,
        keeps: Sequence[int | None],
        lpips: nn.Module | None = None,
        feature_fn: Callable[[torch.Tensor], Any] | None = None,
        codebook_size: int | None = None,
        collect_real_features: bool = True,
        classify: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        keeps = list(keeps)
        if not keeps:
            raise ValueError("keeps is empty: give at least one keep count (None = tokenizer default)")
        if len(set(keeps)) != len(keeps):
            raise ValueError(f"keeps has duplicates: {keeps}")
        self.tokenizer, self.keeps, self.lpips, self.feature_fn = tokenizer, keeps, lpips, feature_fn
        self.codebook_size = codebook_size or _codebook_size(tokenizer)
        self.collect_real_features = collect_real_features and feature_fn is not None
        self.acc = {k: _KeepAccumulator(self.codebook_size) for k in keeps}
        self.recovers = getattr(tokenizer, "recovery", None) is not None
        self.acc_recovered = {k: _KeepAccumulator(self.codebook_size) for k in keeps} if self.recovers else {}
        self.recovery_hits = {k: torch.zeros(2, dtype=torch.int64) for k in self.acc_recovered}  # correct, positions
        self.real: list[np.ndarray] = []
        self.classify = classify
        self.original_hits = torch.zeros(2, dtype=torch.int64)  # classified, classified right
        self.reduced = False

    def _device(self) -> torch.device:
        param = next(self.tokenizer.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @torch.no_grad()
    def update(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """x [B, 3, H, W] in [-1, 1], labels [B] (class accuracy; needs ``classify``): reconstruct at
        every K and accumulate the metrics."""
        if self.reduced:
            raise RuntimeError("update() after reduce(): the accumulators already hold global sums")
        x = x.to(self._device())
        if self.classify is None:
            labels = None
        if labels is not None:
            labels = torch.as_tensor(labels).cpu()
            self.original_hits += _hits(self.classify(x), labels)
        if self.collect_real_features:
            self.real.append(_as_numpy(self.feature_fn(x)))
        for keep, acc in self.acc.items():
            tokens = self.tokenizer.encode(x, keep)
            self._accumulate(acc, self.tokenizer.decode(tokens), x, tokens.codes, labels)
            if self.recovers:
                from ..models.positions import group_starts

                starts = group_starts(tokens.groups, tokens.codes.shape[1])
                groups = self.tokenizer.recover_groups(tokens.codes, starts)
                self.recovery_hits[keep] += torch.tensor([int((groups == tokens.groups).sum()), groups.numel()])
                xrec = self.tokenizer.decode(dataclasses.replace(tokens, groups=groups))
                self._accumulate(self.acc_recovered[keep], xrec, x, tokens.codes, labels)

    def _accumulate(self, acc: _KeepAccumulator, xrec: torch.Tensor, x: torch.Tensor, codes: torch.Tensor,
                    labels: torch.Tensor | None = None) -> None:
        xrec = xrec.float().clamp(-1, 1)
        if labels is not None:
            acc.counts[2:] += _hits(self.classify(xrec), labels)
        acc.sums[0] += psnr_per_image(xrec, x).sum().cpu()
        acc.sums[1] += ssim_per_image(xrec, x).sum().cpu()
        acc.counts[0] += x.shape[0]
        if self.lpips is not None:
            acc.sums[2] += self.lpips(xrec, x).double().sum().cpu()
            acc.counts[1] += x.shape[0]
        acc.codes.update(codes)
        acc.num_tokens = codes.shape[1]
        if self.feature_fn is not None:
            acc.features.append(_as_numpy(self.feature_fn(xrec)))

    def merge(self, other: ReconstructionEvaluator) -> None:
        """Add another evaluator's accumulators (same keeps), e.g. one that saw another data shard."""
        if other.keeps != self.keeps:
            raise ValueError(f"keeps differ: {self.keeps} vs {other.keeps}")
        for keep in self.keeps:
            self.acc[keep].merge(other.acc[keep])
            if self.recovers:
                self.acc_recovered[keep].merge(other.acc_recovered[keep])
                self.recovery_hits[keep] += other.recovery_hits[keep]
        self.real.extend(other.real)
        self.original_hits += other.original_hits

    def reduce(self, accelerator: Any) -> None:
        """Sum every accumulator over processes and gather the features (call once, on every process).

        Uses ``accelerator.reduce(t, reduction='sum')`` and ``accelerator.gather``; afterwards every
        process holds the global numbers. A no-op for the sums when there is one process.
        """
        if self.reduced:
            raise RuntimeError("reduce() was already called")
        device = getattr(accelerator, "device", torch.device("cpu"))
        for keep, hits in self.recovery_hits.items():
            self.recovery_hits[keep] = accelerator.reduce(hits.to(device), reduction="sum").cpu()
        for acc in [*self.acc.values(), *self.acc_recovered.values()]:
            acc.sums = accelerator.reduce(acc.sums.to(device), reduction="sum").cpu()
            acc.counts = accelerator.reduce(acc.counts.to(device), reduction="sum").cpu()
            acc.codes.counts = accelerator.reduce(acc.codes.counts.to(device), reduction="sum").cpu()
            if self.feature_fn is not None:
                acc.features = [_gather_rows(accelerator, acc.features, device)]
        if self.collect_real_features:
            self.real = [_gather_rows(accelerator, self.real, device)]
        self.original_hits = accelerator.reduce(self.original_hits.to(device), reduction="sum").cpu()
        self.reduced = True

    def results(self) -> dict[int | None, dict[str, float | int | None]]:
        """{K: {psnr, ssim, lpips (None without an LPIPS module), code_usage, code_entropy_bits,
        code_perplexity, num_tokens (K actually produced), num_images}} averaged per image."""
        out = {}
        for keep, acc in self.acc.items():
            n, n_lpips = int(acc.counts[0]), int(acc.counts[1])
            out[keep] = {
                "psnr": float(acc.sums[0]) / n if n else float("nan"),
                "ssim": float(acc.sums[1]) / n if n else float("nan"),
                "lpips": float(acc.sums[2]) / n_lpips if n_lpips else None,
                "code_usage": acc.codes.usage(),
                "code_entropy_bits": acc.codes.entropy("bits"),
                "code_perplexity": acc.codes.perplexity(),
                "num_tokens": acc.num_tokens,
                "num_images": n,
            }
            if self.classify is not None and acc.counts[2]:
                out[keep]["class_accuracy"] = int(acc.counts[3]) / int(acc.counts[2])
            if self.recovers:
                rec, (hit, total) = self.acc_recovered[keep], self.recovery_hits[keep].tolist()
                n_rec, n_rec_lpips = int(rec.counts[0]), int(rec.counts[1])
                out[keep].update(
                    psnr_recovered=float(rec.sums[0]) / n_rec if n_rec else float("nan"),
                    ssim_recovered=float(rec.sums[1]) / n_rec if n_rec else float("nan"),
                    lpips_recovered=float(rec.sums[2]) / n_rec_lpips if n_rec_lpips else None,
                    recovery_accuracy=hit / total if total else float("nan"),
                )
                if self.classify is not None and rec.counts[2]:
                    out[keep]["class_accuracy_recovered"] = int(rec.counts[3]) / int(rec.counts[2])
        return out

    def original_class_accuracy(self) -> float | None:
        """Class accuracy of the input images themselves (None without classify or labels)."""
        seen, right = self.original_hits.tolist()
        return right / seen if seen else None

    def features(self, keep: int | None, recovered: bool = False) -> np.ndarray:
        """Reconstruction features at keep count K: [N, D] float32 (needs feature_fn); recovered: of the
        decodes with Source Recovery's predicted groups."""
        if self.feature_fn is None:
            raise ValueError("no feature_fn was given: there are no reconstruction features")
        if recovered and not self.recovers:
            raise ValueError("the tokenizer has no Source Recovery module: there are no recovered decodes")
        return _concat((self.acc_recovered if recovered else self.acc)[keep].features)

    def real_features(self) -> np.ndarray:
        """Features of the input images: [N, D] float32 (needs feature_fn and collect_real_features)."""
        if not self.collect_real_features:
            raise ValueError("real features were not collected (feature_fn=None or collect_real_features=False)")
        return _concat(self.real)


def _hits(predicted: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-> int64 [classified, classified right] of predicted classes [B] against labels [B]."""
    return torch.tensor([len(labels), int((predicted.cpu() == labels).sum())], dtype=torch.int64)


def _concat(chunks: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(chunks, axis=0) if chunks else np.zeros((0, 0), dtype=np.float32)


def _gather_rows(accelerator: Any, chunks: list[np.ndarray], device: torch.device) -> np.ndarray:
    """Concatenate this process's [n_i, D] rows with every other process's (unequal n_i allowed)."""
    local = torch.from_numpy(_concat(chunks)).to(device)
    sizes = accelerator.gather(torch.tensor([local.shape[0], local.shape[1]], device=device)).view(-1, 2).cpu()
    width, longest = int(sizes[:, 1].max()), int(sizes[:, 0].max())
    padded = torch.zeros(longest, width, dtype=torch.float32, device=device)
    padded[: local.shape[0], : local.shape[1]] = local
    gathered = accelerator.gather(padded).view(len(sizes), longest, width).cpu()
    return np.concatenate([gathered[i, : int(n)].numpy() for i, (n, _) in enumerate(sizes)], axis=0)

"""Incremental decoding state of the raster generator (LlamaGen): a preallocated KV cache, the prefix
run once, one token per step. ``GuidedDecoder`` holds what every decoder shares (the CFG row doubling
and the prefill); ``MergeARDecoder`` (mergear.py) adds the position cache and eviction."""

from __future__ import annotations

import torch
from torch import Tensor

from mergevq.models.gpt import GPT


class GuidedDecoder:
    """Base of the incremental decoders (raster, MergeAR): with ``cfg`` the model runs 2B rows
    [cond; uncond] that share the sampled tokens, the uncond half conditioned on the null class.
    Subclasses set ``model`` and ``cfg``."""

    model: GPT
    cfg: bool

    def _rows(self, x: Tensor) -> Tensor:
        """x [B, ...] -> [2B, ...] (twice) with CFG, else x."""
        return torch.cat([x, x]) if self.cfg else x

    def _prefill(self, labels: Tensor, keep: Tensor | None) -> Tensor:
        """labels [B], keep [B] or None -> h [rows, D] predicting token 0."""
        if self.cfg:
            labels = torch.cat([labels, torch.full_like(labels, self.model.null_class)])
            keep = None if keep is None else self._rows(keep)
        return self.model.prefill(labels, keep)


class RasterDecoder(GuidedDecoder):
    """Plain raster decoding (LlamaGen): token l's K/V go to slot P + l; every query sees everything
    before it. Same interface as ``MergeARDecoder`` (prefill, assign, feed, decode_one, stats)."""

    def __init__(self, model: GPT, batch: int, cfg: bool = False):
        self.model, self.batch, self.cfg = model, batch, cfg
        self.prefix, self.length = model.args.prefix_tokens, model.args.seq_len
        self.caches = model.setup_cache(2 * batch if cfg else batch, self.prefix + self.length)
        device = model.cls_embedding.weight.device
        self.codes = torch.zeros(batch, self.length, dtype=torch.long, device=device)
        self.n_assigned = self.n_fed = 0

    def prefill(self, labels: Tensor, keep: Tensor | None = None) -> Tensor:
        return self._prefill(labels, keep)

    def assign(self, code: Tensor, known_group: Tensor | None = None) -> Tensor:
        self.codes[:, self.n_assigned] = code
        self.n_assigned += 1
        return torch.ones_like(code, dtype=torch.bool)

    def feed(self) -> Tensor:
        if self.n_fed >= self.n_assigned:
            raise RuntimeError("assign the token before feeding it")
        h = self.model.decode_one(self._rows(self.codes[:, self.n_fed]), self.n_fed)
        self.n_fed += 1
        return h

    def decode_one(self, code: Tensor, known_group: Tensor | None = None) -> Tensor:
        self.assign(code)
        return self.feed()

    def stats(self) -> dict:
        n, p = self.n_assigned, self.prefix
        device = self.codes.device
        peak = p + max(self.n_fed - 1, 0)
        return {
            "peak_cache": peak,
            "peak_cache_per_row": torch.full((self.batch,), peak, device=device),
            "peak_live": p + self.n_fed,
            "slots_used": p + self.n_fed,
            "num_groups": torch.full((self.batch,), n, device=device),
            "groups": torch.arange(n, device=device).expand(self.batch, n).clone(),
        }

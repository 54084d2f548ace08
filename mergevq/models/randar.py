"""RandAR over the K merged tokens (spec 7.5; Pang et al., arXiv 2412.01827): the project's GPT in a
random token order, each image token preceded by a position instruction naming where it goes.

Sequence (K tokens in a random order pi, p_i = representative raster position of token pi_i):

    input index   0      1     2     3     4    ...  2K - 1
    content       [C]    q_0   t_0   q_1   t_1  ...  q_{K-1}      (t_{K-1} is never fed)
    RoPE          none   p_0   p_0   p_1   p_1  ...  p_{K-1}
    predicts             t_0         t_1       ...  t_{K-1}       (the output at q_i)

q_i is the position instruction: with ``position_query='rope'`` (RandAR) one shared learned vector,
viewed as n_head x head_dim and rotated by the 2D RoPE of p_i; 'table' adds a learned embedding of p_i
instead of the rotation; 'both' rotates the shared vector and adds the table. Image tokens carry the
2D RoPE of their position as in the raster model; the class token carries none. Training is teacher
forcing over a fresh random order per sample and step, with class dropout for CFG and the factorised
6 + 12-bit heads (the intra-token transformer reads the output at q_i).

Parallel decoding (``RandARDecoder``): the K queries of a row are split into ``parallel_schedule``
steps. One forward pass feeds the tokens sampled at the previous step, each followed by the next
query of that step (the exact teacher-forcing layout, written over the slots the previous step's
extra queries used), then the queries of this step; the queries of one step see each other but not
each other's tokens. Slot j of the KV cache holds input index j, so the cache (2K slots, allocated
once) ends as teacher forcing's and ``steps == K`` is exactly one token at a time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .decoders import GuidedDecoder
from .gpt import GPT, ModelArgs
from .positions import parallel_schedule
from .rope import apply_rope

POSITION_QUERIES = ("rope", "table", "both")


class RandAR(GPT):
    """Random-order GPT with position instructions (see the module docstring). args.prefix_tokens = 1."""

    def __init__(self, args: ModelArgs, position_query: str = "rope"):
        if args.prefix_tokens != 1:
            raise ValueError("RandAR has one prefix token (the class): set prefix_tokens=1, num_keep_options=0")
        if position_query not in POSITION_QUERIES:
            raise ValueError(f"position_query={position_query!r}: use one of {POSITION_QUERIES}")
        super().__init__(args)
        self.position_query = position_query
        self.query = nn.Parameter(torch.randn(args.dim) * args.init_std)
        self.query_table = None
        if position_query != "rope":
            self.query_table = nn.Embedding(args.seq_len, args.dim)
            nn.init.normal_(self.query_table.weight, 0.0, args.init_std)

    def position_rope(self, positions: Tensor) -> Tensor:
        """positions [B, n] raster indices -> RoPE tables [B, n, Dh/2, 2]."""
        return self.rope[self.args.prefix_tokens + positions]

    def instructions(self, positions: Tensor) -> Tensor:
        """positions [B, n] -> position-instruction tokens [B, n, D]."""
        b, n = positions.shape
        if self.position_query == "table":
            return self.query.expand(b, n, -1) + self.query_table(positions)
        heads = self.query.view(1, 1, self.args.n_head, self.args.head_dim).expand(b, n, -1, -1)
        q = apply_rope(heads, self.position_rope(positions)).reshape(b, n, -1)
        return q + self.query_table(positions) if self.query_table is not None else q

    def hidden(self, codes: Tensor, positions: Tensor, labels: Tensor) -> Tensor:
        """codes, positions [B, K] (generation order), labels [B] -> h [B, K, D] at q_0 .. q_{K-1}."""
        b, k = codes.shape
        tokens = self.tok_dropout(self.embed_tokens(codes[:, :-1]))
        queries = self.instructions(positions)
        x = torch.zeros(b, 2 * k - 1, self.args.dim, dtype=queries.dtype, device=queries.device)
        x[:, 0::2], x[:, 1::2] = queries, tokens
        x = torch.cat([self.embed_prefix(labels, drop=self.training), x], 1)
        pos_rope = self.position_rope(positions)
        rope = torch.cat([self.rope[:1].expand(b, -1, -1, -1), pos_rope.repeat_interleave(2, 1)[:, :-1]], 1)
        for layer in self.layers:
            x = layer(x, rope)
        return x[:, 1::2]

    def forward(self, codes: Tensor, positions: Tensor, labels: Tensor) -> tuple[Tensor, ...]:
        """Teacher-forced logits per part, [B, K, V_j] each."""
        return self.head_logits(self.hidden(codes, positions, labels), codes)

    def loss(self, codes: Tensor, labels: Tensor, keep=None, mask=None, label_smoothing: float = 0.0, *,
             positions: Tensor, valid: Tensor | None = None) -> dict[str, Tensor]:
        """Mean cross-entropy over the valid [B, K] tokens, summed over parts (as ``GPT.loss``).
        keep / mask exist for the trainer's common call and must be None."""
        if keep is not None or mask is not None:
            raise ValueError("RandAR takes no merge instruction or mask")
        logits = self(codes, positions, labels)
        valid = torch.ones_like(codes, dtype=torch.bool) if valid is None else valid
        names = ("pre", "post") if len(logits) == 2 else tuple(f"part{j}" for j in range(len(logits)))
        out = {}
        for name, lg, target in zip(names, logits, self.split(codes)):
            ce = F.cross_entropy(lg.flatten(0, -2), target.flatten(), reduction="none", label_smoothing=label_smoothing)
            out[f"loss_{name}"] = (ce * valid.flatten()).sum() / valid.sum().clamp_min(1)
        return {"loss": sum(out.values()), **out} if len(logits) > 1 else {"loss": out[f"loss_{names[0]}"]}

    def feed(self, x: Tensor, rope: Tensor, start: int) -> Tensor:
        """Inputs x [rows, n, D] with RoPE [rows, n, Dh/2, 2] into KV slots start .. start + n - 1;
        each attends to every slot before its own -> outputs [rows, n, D]."""
        n = x.shape[1]
        span = start + n
        mask = torch.arange(span, device=x.device)[None, :] <= torch.arange(start, span, device=x.device)[:, None]
        for layer, cache in zip(self.layers, self._caches()):
            x = layer(x, rope, mask[None, None], cache, slice(start, span), span)
        return x


class RandARDecoder(GuidedDecoder):
    """Parallel decoding with a preallocated KV cache of 2K slots (see the module docstring).

    Use: h = start(labels, positions, sizes) (the first step's queries); then per step
    h = step(codes [B, n]) with the codes sampled for the current queries, until ``done``.
    """

    def __init__(self, model: RandAR, positions: Tensor, sizes: Sequence[int], cfg: bool = False):
        self.model, self.cfg = model, cfg
        self.batch, self.keep = positions.shape
        if sum(sizes) != self.keep or min(sizes) < 1:
            raise ValueError(f"step sizes {list(sizes)} must be >= 1 and sum to K={self.keep}")
        self.positions, self.sizes = positions, list(sizes)
        self.caches = model.setup_cache(2 * self.batch if cfg else self.batch, 2 * self.keep)
        self.queries = self._rows(model.instructions(positions))
        self.ropes = self._rows(model.position_rope(positions))
        self.codes = torch.zeros_like(positions)
        self.step_index, self.first, self.high = 0, 0, 0  # first: index of the current step's first query

    @property
    def current(self) -> int:
        """Number of queries of the current step."""
        return self.sizes[self.step_index]

    @property
    def done(self) -> bool:
        return self.step_index >= len(self.sizes)

    def start(self, labels: Tensor) -> Tensor:
        """labels [B] -> h [rows, n, D] at the first step's n queries (slots 0 .. n)."""
        n = self.current
        if self.cfg:
            labels = torch.cat([labels, torch.full_like(labels, self.model.null_class)])
        prefix = self.model.embed_prefix(labels)
        x = torch.cat([prefix, self.queries[:, :n]], 1)
        rope = torch.cat([self.model.rope[:1].expand(x.shape[0], -1, -1, -1), self.ropes[:, :n]], 1)
        self.high = n + 1
        return self.model.feed(x, rope, 0)[:, 1:]

    def step(self, codes: Tensor) -> Tensor | None:
        """codes [B, n] sampled at the current queries -> h [rows, m, D] at the next step's m queries
        (None after the last step)."""
        a, n = self.first, self.current
        self.codes[:, a : a + n] = codes
        self.step_index += 1
        self.first = a + n
        if self.done:
            return None
        m = self.current
        tokens = self.model.embed_tokens(self._rows(codes))  # [rows, n, D]
        d = tokens.shape[-1]
        x = torch.zeros(tokens.shape[0], 2 * n - 1 + m, d, dtype=tokens.dtype, device=tokens.device)
        x[:, 0 : 2 * n - 1 : 2] = tokens
        x[:, 1 : 2 * n - 1 : 2] = self.queries[:, a + 1 : a + n]
        x[:, 2 * n - 1 :] = self.queries[:, a + n : a + n + m]
        rope = torch.cat([self.ropes[:, a : a + n].repeat_interleave(2, 1)[:, 1:],
                          self.ropes[:, a + n : a + n + m]], 1)
        start = 2 * a + 2  # slot of t_a
        self.high = max(self.high, start + x.shape[1])
        return self.model.feed(x, rope, start)[:, 2 * n - 1 :]

    def stats(self) -> dict[str, Any]:
        device = self.positions.device
        return {
            "peak_cache": self.high,
            "peak_cache_per_row": torch.full((self.batch,), self.high, device=device),
            "slots_used": self.high,
            "num_groups": torch.full((self.batch,), self.keep, device=device),
            "steps": len(self.sizes),
            "positions": self.positions.clone(),
        }


@torch.no_grad()
def generate_randar(
    model: RandAR,
    labels: Tensor,
    positions: Tensor,
    steps: int | None = None,
    *,
    cfg_scale: float | Sequence[float] = 1.0,
    cfg_interval: tuple[float, float] | None = None,
    temperature: float | Sequence[float] = 1.0,
    top_k: int | Sequence[int] = 0,
    top_p: float | Sequence[float] = 1.0,
    seed: int | None = None,
) -> tuple[Tensor, dict]:
    """K codes for class labels [B] at positions [B, K] (generation order: the order they are given)
    in ``steps`` forward passes (default K: one token per pass) -> (codes [B, K], stats).

    Sampling options as ``generate`` (CFG per sub-head; cfg_interval in fractions of the K tokens,
    by the index of a step's first token). stats: peak_cache_per_row [B], num_groups [B] (= K),
    steps, positions [B, K], seconds, tokens_per_s."""
    from .generate import _per_part, _sample_code

    k = model.num_parts
    scales, temps = _per_part(cfg_scale, k, "cfg_scale"), _per_part(temperature, k, "temperature")
    top_ks, top_ps = _per_part(top_k, k, "top_k"), _per_part(top_p, k, "top_p")
    cfg = any(s != 1.0 for s in scales)
    batch, keep = positions.shape
    generator = torch.Generator(device=labels.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    decoder = RandARDecoder(model, positions.to(labels.device), parallel_schedule(keep, steps or keep), cfg=cfg)
    was_training = model.training
    model.eval()
    try:
        start = time.perf_counter()
        h = decoder.start(labels)
        while h is not None:
            n, first = h.shape[1], decoder.first
            guide = cfg and (cfg_interval is None or cfg_interval[0] <= first / keep < cfg_interval[1])
            flat = h.reshape(-1, h.shape[-1])  # [rows * n, D]: cond rows first, as _sample_code splits
            code = _sample_code(model, flat, cfg, guide, scales, temps, top_ks, top_ps, generator)
            h = decoder.step(code.view(batch, n))
        seconds = time.perf_counter() - start
    finally:
        model.train(was_training)
        model.clear_cache()
    stats = decoder.stats()
    stats.update(seconds=seconds, tokens_per_s=batch * keep / max(seconds, 1e-9), generated_tokens=batch * keep)
    return decoder.codes.clone(), stats


def build_randar(args: ModelArgs, generator: dict) -> RandAR:
    """The RandAR of a ``generator=randar`` config (position_query) over ModelArgs."""
    return RandAR(args, position_query=generator.get("position_query", "rope"))

"""Class-conditional LLaMA-style autoregressive generator over LFQ codes (spec section 7.1).

Sequence layout (P = ``prefix_tokens``, L = h * w raster positions, T = P + L - 1 inputs):

    input index   0 .. P-1                   P + l  (l = 0 .. L-2)
    content       [C] (class), [M] (MergeAR)  e(t_l) = sum_i Emb_i(part_i(t_l))
    predicts      index P-1 -> t_0            t_{l+1}

Codes are always passed as joined LFQ indices ([B, L] int64). With ``factorized_bits=(6, 12)`` they are
split into k = 2 parts (pre = bits 0-5, post = bits 6-17; ``lfq.split_codes``), embedded with one table
per part and predicted by one head per part. The head of part j reads slot j of a short causal
"intra-token" transformer over [h_n, Emb_0(part_0), ..., Emb_{k-2}(part_{k-2})] (``intra_layers``
blocks, spec 7.1), so p(t) = p(pre | ctx) * p(post | ctx, pre). A plain vocabulary (``vocab_size``)
is the k = 1 case. With ``intra_layers = 0`` every head reads the normed h_n directly (parts are then
conditionally independent given the context).

2D RoPE: rotary pairs 0 .. head_dim/4 - 1 rotate with the row of the position a token sits at,
pairs head_dim/4 .. head_dim/2 - 1 with its column; input P + l is at raster position l. Prefix
positions carry no position: with ``zero_prefix_rope=True`` (default, the official / LlamaGen
behaviour) their cos = sin = 0, which zeroes the prefix queries and keys, so every query gives the
prefix the attention logit 0; with ``False`` they get the identity rotation (q/k kept, no position).
The intra-token transformer uses the prefix row for slot 0 and raster positions 0 .. k-2 for the
later slots (for k = 2 and the default this is the official rows 0-1 of the table).

Inference (prefill / decode split, LlamaGen style): ``setup_cache`` preallocates per-layer K/V
buffers with a number of *slots*; ``prefill`` writes the prefix into slots 0 .. P-1 once and
``decode_one`` feeds one token, writes its K/V into a slot (by default P + l; MergeAR passes its own
slot per row and a mask of live slots) and returns the hidden state that predicts the next token.
Keys are rotated before they are cached, so which slot holds an entry does not matter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergevq.models.blocks import Recomputable
from mergevq.models.lfq import join_codes, split_codes
from mergevq.models.rope import apply_rope, rope_2d


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= n."""
    return -(-n // multiple) * multiple


@dataclass
class ModelArgs:
    """Hyper-parameters of ``GPT``. Give either ``factorized_bits`` or ``vocab_size`` (default (6, 12))."""

    dim: int = 1024
    n_layer: int = 24
    n_head: int = 16
    intra_layers: int = 2  # intra-token transformer depth (0: heads read h_n directly)
    ffn_hidden: int | None = None  # None: round_up(int(8 * dim / 3), multiple_of)
    multiple_of: int = 256
    factorized_bits: tuple[int, ...] | None = None  # e.g. (6, 12): heads of 64 and 4096
    vocab_size: int | None = None  # plain single head (small codebooks)
    num_classes: int = 1000  # the class table has num_classes + 1 rows; the last is the null class
    class_dropout: float = 0.1
    token_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    attn_dropout: float = 0.0
    rope_base: float = 10000.0
    grid: tuple[int, int] = (16, 16)  # (h, w) raster grid, L = h * w
    norm_eps: float = 1e-5
    init_std: float = 0.02
    prefix_tokens: int = 1  # 1: [C]; 2: [C] [M] (MergeAR merge instruction)
    num_keep_options: int = 0  # rows of the merge-instruction table (0: no [M] token)
    zero_prefix_rope: bool = True  # official quirk: prefix q/k zeroed (False: identity rotation)
    copy_head: bool = False  # MergeAR: a pointer head choosing "new group" or "copy an earlier group"

    def __post_init__(self):
        if self.factorized_bits is None and self.vocab_size is None:
            self.factorized_bits = (6, 12)
        if self.factorized_bits is not None and self.vocab_size is not None:
            raise ValueError("give factorized_bits or vocab_size, not both")
        if self.factorized_bits is not None:
            self.factorized_bits = tuple(int(b) for b in self.factorized_bits)
            if not self.factorized_bits or min(self.factorized_bits) < 1:
                raise ValueError(f"bad factorized_bits {self.factorized_bits}")
        self.grid = tuple(int(g) for g in self.grid)
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f"grid must be (h, w), got {self.grid}")
        if self.dim % self.n_head or (self.dim // self.n_head) % 4:
            raise ValueError(f"dim {self.dim} / {self.n_head} heads must give a head_dim divisible by 4")
        if self.prefix_tokens != 1 + (self.num_keep_options > 0):
            raise ValueError("prefix_tokens must be 1 (class) or 2 (class + merge instruction, "
                             "which needs num_keep_options > 0)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden width."""
        return self.ffn_hidden or round_up(int(8 * self.dim / 3), self.multiple_of)

    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        """Vocabulary of each predicted part: (64, 4096) for (6, 12), (vocab_size,) for a plain head."""
        if self.factorized_bits is None:
            return (self.vocab_size,)
        return tuple(2**b for b in self.factorized_bits)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.vocab_sizes)

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]


# Spatial depth / width / heads and intra-token depth. b/l/xl are the official "B"/"L"/"XL"
# (343.6M / 804.4M / 1486.7M parameters with (6, 12) heads and 1000 classes, spec 7.1).
GPT_SIZES: dict[str, dict] = {
    "tiny": dict(n_layer=4, dim=128, n_head=4, intra_layers=1),
    "b": dict(n_layer=24, dim=1024, n_head=16, intra_layers=2),
    "l": dict(n_layer=36, dim=1280, n_head=20, intra_layers=3),
    "xl": dict(n_layer=48, dim=1536, n_head=24, intra_layers=4),
}


def gpt_args(size: str, **overrides) -> ModelArgs:
    """ModelArgs of a registered size, with keyword overrides."""
    if size not in GPT_SIZES:
        raise KeyError(f"unknown GPT size {size!r}; known: {sorted(GPT_SIZES)}")
    return ModelArgs(**{**GPT_SIZES[size], **overrides})


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in float32 (or wider)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class KVCache:
    """Preallocated keys and values of one attention layer: k, v [max_batch, n_head, max_seq, head_dim].

    ``update`` writes new entries in place (the buffers are never reallocated) and returns the
    first ``span`` slots of the first B rows.
    """

    def __init__(self, max_batch: int, n_head: int, max_seq: int, head_dim: int, dtype, device):
        shape = (max_batch, n_head, max_seq, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, k: Tensor, v: Tensor, slots: slice | Tensor, span: int) -> tuple[Tensor, Tensor]:
        """k, v [B, H, T, Dh]; slots: a slice of T slots shared by all rows, or (T = 1) a scatter index
        [B, H, 1, Dh] int64 holding each row's slot (``slot_index``)."""
        b = k.shape[0]
        if b > self.k.shape[0] or span > self.k.shape[2]:
            raise ValueError(f"cache of {tuple(self.k.shape[:3:2])} (batch, slots) is too small for "
                             f"batch {b}, span {span}")
        if isinstance(slots, Tensor):
            self.k[:b].scatter_(2, slots, k)
            self.v[:b].scatter_(2, slots, v)
        else:
            self.k[:b, :, slots] = k
            self.v[:b, :, slots] = v
        return self.k[:b, :, :span], self.v[:b, :, :span]


class Attention(nn.Module):
    """Bias-free fused-qkv attention with RoPE and an optional mask / KV cache.

    x [B, T, D], rope [T, Dh/2, 2], mask [B or 1, (H or 1), T, S] bool (True = may attend) or float
    (additive), None = causal. With a cache the new K/V go to ``slots`` and the queries attend over
    the first ``span`` slots (mask None then means: all of them for T = 1, causal for the prefill).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_head, self.head_dim = args.n_head, args.head_dim
        self.wqkv = nn.Linear(args.dim, 3 * args.dim, bias=False)
        self.wo = nn.Linear(args.dim, args.dim, bias=False)
        self.attn_dropout = args.attn_dropout
        self.resid_dropout = nn.Dropout(args.resid_dropout)

    def forward(self, x, rope, mask=None, cache: KVCache | None = None, slots=None, span=None):
        b, t, d = x.shape
        q, k, v = self.wqkv(x).view(b, t, 3, self.n_head, self.head_dim).unbind(2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))  # [B, H, T, Dh]
        if cache is not None:
            k, v = cache.update(k, v, slots, span)
        if mask is not None and mask.dim() == 3:
            mask = mask[:, None]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and t > 1,
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(b, t, d)))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), then dropout."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.ffn_dropout = nn.Dropout(args.ffn_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(Recomputable):
    """Pre-RMSNorm attention + SwiGLU, both residual. Arguments as ``Attention``; without a KV cache
    the block can recompute its activations in backward (``set_activation_checkpointing``)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, rope, mask=None, cache=None, slots=None, span=None):
        if cache is None:
            return self.recompute(self._forward, x, rope, mask)
        return self._forward(x, rope, mask, cache, slots, span)

    def _forward(self, x, rope, mask=None, cache=None, slots=None, span=None):
        x = x + self.attention(self.attention_norm(x), rope, mask, cache, slots, span)
        return x + self.feed_forward(self.ffn_norm(x))


class CopyHead(nn.Module):
    """Pointer head of MergeAR's explicit copy decision: at raster position l, "new group" or "copy
    the group whose first occurrence is m" for an earlier first occurrence m < l.

    One attention-like head with 2D RoPE, so the score sees where m lies relative to l:
    score(l, m) = <rot_l(W_q n(h_l)), rot_m(W_k n(o_m))> / sqrt(Dh), where h_l [.., D] is the spatial
    output that predicts token l and o_m the spatial output at the input holding token m (for m < L - 1
    that is h_{m+1}); the "new" logit is a linear function of n(h_l). Column 0 of the logits is "new",
    column 1 + m copies m.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.wq = nn.Linear(args.dim, args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.head_dim, bias=False)
        self.new = nn.Linear(args.dim, 1)
        self.scale = args.head_dim**-0.5

    def keys(self, out: Tensor, rope: Tensor) -> Tensor:
        """out [B, T, D] (outputs at the inputs holding tokens m), rope [T, Dh/2, 2] -> keys [B, T, Dh]."""
        return apply_rope(self.wk(self.norm(out))[:, :, None], rope)[:, :, 0]

    def logits(self, h: Tensor, rope: Tensor, keys: Tensor, allowed: Tensor) -> Tensor:
        """h [B, T, D] (outputs predicting tokens l), rope [T, Dh/2, 2], keys [B, S, Dh], allowed [B, T, S]
        bool (m is an earlier first occurrence) -> logits [B, T, 1 + S] (float32; -inf where not allowed)."""
        z = self.norm(h)
        q = apply_rope(self.wq(z)[:, :, None], rope)[:, :, 0]
        scores = _wide(torch.einsum("btd,bsd->bts", q, keys) * self.scale).masked_fill(~allowed, float("-inf"))
        return torch.cat([_wide(self.new(z)), scores], dim=-1)


def _wide(x: Tensor) -> Tensor:
    """Logits in float32 or wider."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
class GPT(nn.Module):
    """Class-conditional raster-order generator (LlamaGen / Open-MAGVIT2 AR). See the module docstring."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        vocab = args.vocab_sizes
        self.tok_embeddings = nn.ModuleList(nn.Embedding(v, args.dim) for v in vocab)
        self.cls_embedding = nn.Embedding(args.num_classes + 1, args.dim)
        self.keep_embedding = nn.Embedding(args.num_keep_options, args.dim) if args.num_keep_options else None
        self.tok_dropout = nn.Dropout(args.token_dropout)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layer))
        self.intra_blocks = nn.ModuleList(TransformerBlock(args) for _ in range(args.intra_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.heads = nn.ModuleList(nn.Linear(args.dim, v, bias=False) for v in vocab)
        self.copy_head = CopyHead(args) if args.copy_head else None

        rope = rope_2d(args.grid, args.head_dim, args.rope_base, args.prefix_tokens, args.zero_prefix_rope)
        p = args.prefix_tokens
        self.register_buffer("rope", rope, persistent=False)  # [P + L, Dh/2, 2]
        self.register_buffer("intra_rope", torch.cat([rope[:1], rope[p : p + len(vocab) - 1]]), persistent=False)
        self.kv_cache: list[KVCache] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, init_std) for linear and embedding weights, RMSNorm weights 1, output heads 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, 0.0, self.args.init_std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        for head in self.heads:
            nn.init.zeros_(head.weight)
        if self.copy_head is not None:
            nn.init.zeros_(self.copy_head.new.bias)

    @property
    def null_class(self) -> int:
        return self.args.num_classes

    @property
    def num_parts(self) -> int:
        return len(self.args.vocab_sizes)

    def split(self, codes: Tensor) -> tuple[Tensor, ...]:
        """codes [...] -> one tensor [...] per predicted part."""
        if self.args.factorized_bits is None:
            return (codes,)
        return split_codes(codes, self.args.factorized_bits)

    def join(self, parts: Sequence[Tensor]) -> Tensor:
        """Inverse of ``split``."""
        if self.args.factorized_bits is None:
            return parts[0]
        return join_codes(parts, self.args.factorized_bits)

    # ---- embeddings -------------------------------------------------------------------------------
    def embed_tokens(self, codes: Tensor) -> Tensor:
        """codes [...] -> e(t) = sum_i Emb_i(part_i) [..., D]."""
        return sum(emb(p) for emb, p in zip(self.tok_embeddings, self.split(codes)))

    def embed_prefix(self, labels: Tensor, keep: Tensor | None = None, drop: bool = False) -> Tensor:
        """labels [B], keep [B] (merge-instruction index) -> [B, P, D].

        drop: replace each label by the null class with probability ``class_dropout`` (training CFG).
        The merge instruction is never dropped.
        """
        if drop and self.args.class_dropout > 0:
            dropped = torch.rand(labels.shape, device=labels.device) < self.args.class_dropout
            labels = torch.where(dropped, self.null_class, labels)
        prefix = [self.cls_embedding(labels)]
        if self.keep_embedding is not None:
            if keep is None:
                raise ValueError("this model has a merge-instruction token: pass keep")
            prefix.append(self.keep_embedding(keep.expand(labels.shape)))
        return torch.stack(prefix, dim=1)

    # ---- training forward -------------------------------------------------------------------------
    def hidden(self, codes: Tensor, labels: Tensor, keep: Tensor | None = None, mask: Tensor | None = None):
        """codes [B, L], labels [B], keep [B] or None, mask [B or 1, T, T] or None (causal), T = P + L - 1
        -> h [B, L, D]: the spatial output at the inputs that predict t_0 .. t_{L-1}."""
        p = self.args.prefix_tokens
        x = torch.cat([self.embed_prefix(labels, keep, drop=self.training), self.embed_tokens(codes[:, :-1])], 1)
        x = self.tok_dropout(x)
        rope = self.rope[: x.shape[1]]
        for layer in self.layers:
            x = layer(x, rope, mask)
        return x[:, p - 1 :]

    def head_logits(self, h: Tensor, codes: Tensor) -> tuple[Tensor, ...]:
        """Teacher-forced heads: h [..., D], target codes [...] -> logits [..., V_j] per part j.

        Part j reads slot j of the intra-token sequence [h, Emb_0(part_0), ..., Emb_{k-2}(part_{k-2})].
        """
        if not self.intra_blocks:
            z = self.norm(h)
            return tuple(_wide(head(z)) for head in self.heads)
        k, lead = self.num_parts, h.shape[:-1]
        parts = self.split(codes)
        seq = torch.stack([h, *(emb(q) for emb, q in zip(self.tok_embeddings, parts[: k - 1]))], dim=-2)
        seq = seq.reshape(-1, k, h.shape[-1])
        for block in self.intra_blocks:
            seq = block(seq, self.intra_rope[:k])
        seq = self.norm(seq).view(*lead, k, -1)
        return tuple(_wide(head(seq[..., j, :])) for j, head in enumerate(self.heads))

    def forward(self, codes: Tensor, labels: Tensor, keep: Tensor | None = None, mask: Tensor | None = None):
        """codes [B, L] int64, labels [B] -> tuple of logits [B, L, V_j] per part
        ((logits_pre [B, L, 64], logits_post [B, L, 4096]) for (6, 12); a 1-tuple for a plain head)."""
        return self.head_logits(self.hidden(codes, labels, keep, mask), codes)

    def copy_logits(self, h: Tensor, first: Tensor) -> Tensor:
        """Teacher-forced copy decision: h [B, L, D] from ``hidden``, first [B, L] bool (token m is the
        first occurrence of its group) -> logits [B, L, L] (column 0: new group, 1 + m: copy m < l)."""
        length, p = h.shape[1], self.args.prefix_tokens
        rope = self.rope[p : p + length]
        keys = self.copy_head.keys(h[:, 1:], rope[:-1])  # o_m = h_{m+1}, m = 0 .. L-2
        idx = torch.arange(length, device=h.device)
        allowed = (idx[None, :-1] < idx[:, None]) & first[:, None, :-1]
        return self.copy_head.logits(h, rope, keys, allowed)

    def loss(
        self, codes: Tensor, labels: Tensor, keep: Tensor | None = None, mask: Tensor | None = None,
        label_smoothing: float = 0.0, copy_target: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Sum over parts of the cross-entropy (mean over all B * L positions).

        copy_target [B, L] int64 (0: new group, 1 + m: copy the group first seen at m), for a model
        with a copy head: adds "loss_copy", the cross-entropy of the copy decision over positions 1 .. L-1.
        Returns {"loss"} plus {"loss_pre", "loss_post"} for two parts ({"loss_part{j}"} for more).
        """
        h = self.hidden(codes, labels, keep, mask)
        logits = self.head_logits(h, codes)
        names = ("pre", "post") if len(logits) == 2 else tuple(f"part{j}" for j in range(len(logits)))
        terms = {f"loss_{name}": F.cross_entropy(lg.flatten(0, -2), target.flatten(), label_smoothing=label_smoothing)
                 for name, lg, target in zip(names, logits, self.split(codes))}
        if self.copy_head is not None and copy_target is not None:
            copy = self.copy_logits(h, copy_target == 0)[:, 1:]
            terms["loss_copy"] = F.cross_entropy(copy.flatten(0, 1), copy_target[:, 1:].flatten())
        if len(terms) == 1:
            return {"loss": next(iter(terms.values()))}
        return {"loss": sum(terms.values()), **terms}

    # ---- cached inference -------------------------------------------------------------------------
    def next_part_logits(self, h: Tensor, prev: Sequence[Tensor] = ()) -> Tensor:
        """Logits of part j = len(prev) given h [N, D] and the sampled parts prev (each [N]) -> [N, V_j]."""
        j = len(prev)
        if not self.intra_blocks:
            return _wide(self.heads[j](self.norm(h)))
        seq = torch.stack([h, *(self.tok_embeddings[i](q) for i, q in enumerate(prev))], dim=1)
        for block in self.intra_blocks:
            seq = block(seq, self.intra_rope[: j + 1])
        return _wide(self.heads[j](self.norm(seq[:, -1])))

    def setup_cache(self, max_batch: int, max_seq: int, dtype: torch.dtype | None = None) -> list[KVCache]:
        """Preallocate per-layer K/V buffers of ``max_seq`` slots (prefix included) for ``max_batch`` rows."""
        ref = self.cls_embedding.weight
        self.kv_cache = [
            KVCache(max_batch, self.args.n_head, max_seq, self.args.head_dim, dtype or ref.dtype, ref.device)
            for _ in self.layers
        ]
        return self.kv_cache

    def clear_cache(self) -> None:
        self.kv_cache = None

    def _caches(self) -> list[KVCache]:
        if self.kv_cache is None:
            raise RuntimeError("call setup_cache first")
        return self.kv_cache

    def prefill(self, labels: Tensor, keep: Tensor | None = None) -> Tensor:
        """Run the prefix once (no class dropout) into slots 0 .. P-1 -> h [B, D] that predicts t_0."""
        x = self.embed_prefix(labels, keep)
        p = x.shape[1]
        for layer, cache in zip(self.layers, self._caches()):
            x = layer(x, self.rope[:p], None, cache, slice(0, p), p)
        return x[:, -1]

    def decode_one(self, codes: Tensor, pos: int, slots: Tensor | None = None, live: Tensor | None = None) -> Tensor:
        """Feed token ``pos`` (codes [B], raster position pos) -> h [B, D] that predicts t_{pos+1}.

        Default: its K/V go to slot P + pos and it attends to slots 0 .. P + pos. MergeAR: slots [B]
        int64 (one slot per row) and live [B, S] bool, the slots to attend to (the new one included).
        """
        p = self.args.prefix_tokens
        x = self.embed_tokens(codes)[:, None]
        rope = self.rope[p + pos : p + pos + 1]
        if slots is None:
            slots, span, mask = slice(p + pos, p + pos + 1), p + pos + 1, None
        else:  # one scatter index and one additive mask for all layers
            b, (n_head, head_dim) = codes.shape[0], (self.args.n_head, self.args.head_dim)
            slots = slots.view(b, 1, 1, 1).expand(b, n_head, 1, head_dim)
            span = live.shape[1]
            mask = torch.where(live, 0.0, float("-inf")).to(x.dtype)[:, None, None, :]
        for layer, cache in zip(self.layers, self._caches()):
            x = layer(x, rope, mask, cache, slots, span)
        return x[:, 0]


def build_gpt(size: str = "b", **overrides) -> GPT:
    """GPT of a registered size (see ``GPT_SIZES``) with ModelArgs overrides."""
    return GPT(gpt_args(size, **overrides))

"""The LITERAL path: the official MergeVQ algorithm written out as the paper/code states it.

Used only by the benchmarks (as the baseline the fast path is measured against) and by the tests
(the fast path must compute the same losses). It reuses the tokenizer's modules and weights, but
replaces the three places where the project computes something cheaper than the definition:

- **source tracking**: a dense binary source matrix S' [B, T, 1 + L] (CLS included, T tokens),
  starting from the identity and merged with ``amax`` alongside the tokens in every block (ToMe's
  ``merge_source``). The per-position latents are rebuilt from it with a scatter ("token_unmerge"
  semantics: zeros, then an index put at the nonzeros of S). The fast path keeps one owner index per
  position and gathers (``mergevq.models.merge.unmerge``).
- **entropy**: the official ``entropy_loss`` over the full softmax of all 2^bits codes, [B*K, 2^18]
  for the paper's LFQ, with its eps in the batch term -sum p log(p + eps) and the (constant) eps shift
  in the per-sample log_softmax (``entropy_terms_bruteforce``); the fast path factorises it per bit
  and applies the same eps to the materialised [2^bits] batch distribution.
- **attention**: unfused ``softmax(q k^T / sqrt(d) + log size) v`` with the [B, H, T, T] attention
  matrix materialised, in the encoder and in the decoder; the fast path calls SDPA.

The kept tokens stay in ToMe order (the official code has no canonical order); every loss is
invariant to that order, and the unmerged per-position latents are identical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..models.lfq import bits_to_indices, entropy_terms_bruteforce
from ..models.transformer import Attention, Block

# --------------------------------------------------------------------------- attention


def attention_unfused(attn: Attention, x: Tensor, key_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x [B, T, C] -> (out [B, T, C], keys averaged over heads [B, T, C/H]) with the explicit softmax."""
    batch, tokens, dim = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(dim // heads))  # [B, H, T, T]
    if key_bias is not None:
        logits = logits + key_bias[:, None, None, :].to(logits.dtype)
    weights = logits.softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, tokens, dim)
    return attn.proj(out), k.mean(dim=1)


def block_attend(block: Block, x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor]:
    """Attention half of a ViT block with proportional attention (key bias log size)."""
    bias = None if size is None else size[..., 0].log()
    out, metric = attention_unfused(block.attn, block.norm1(x), bias)
    return x + block.drop_path(block.ls1(out)), metric


def block_forward(block: Block, x: Tensor) -> Tensor:
    """A whole (non-merging) block with unfused attention: the decoder's blocks."""
    return block.feed_forward(block_attend(block, x, None)[0])


# --------------------------------------------------------------------------- ToMe, literally


def bipartite_soft_matching(metric: Tensor, r: int):
    """ToMe bipartite soft matching with a protected CLS token; returns merge(x, mode) or None.

    A = even tokens (CLS first), B = odd tokens; each A token picks its most similar B token
    (cosine of the head-averaged keys), the r best A tokens are merged into their B partners, and
    the output is [kept A in original order, all B].
    """
    tokens = metric.shape[1]
    r = min(r, (tokens - 1) // 2)
    if r <= 0:
        return None
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, 0::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)
        scores[:, 0, :] = -math.inf  # CLS never merges
        best, partner = scores.max(dim=-1)
        ranked = best.argsort(dim=-1, descending=True)[..., None]
        merged_a = ranked[:, :r]
        kept_a = ranked[:, r:].sort(dim=1).values
        target_b = partner[..., None].gather(1, merged_a)

    def merge(x: Tensor, mode: str = "sum") -> Tensor:
        even, odd = x[:, 0::2], x[:, 1::2]
        batch, count, channels = even.shape
        kept = even.gather(1, kept_a.expand(batch, count - r, channels))
        moving = even.gather(1, merged_a.expand(batch, r, channels))
        odd = odd.scatter_reduce(1, target_b.expand(batch, r, channels), moving, reduce=mode)
        return torch.cat([kept, odd], dim=1)

    return merge


def merging_transformer(transformer, x: Tensor, schedule: Sequence[int]) -> tuple[Tensor, Tensor]:
    """x [B, L, C] -> (tokens [B, 1 + K, C] in ToMe order, dense source S' [B, 1 + K, 1 + L]).

    Size-weighted average merging, proportional attention, and the (T x T) source matrix merged
    with amax in every block (ToMe's trace_source).
    """
    batch, positions, _ = x.shape
    x = torch.cat([transformer.cls_token.expand(batch, -1, -1), x], dim=1)
    size = None  # ToMe starts without sizes (no bias in the first attention)
    source = torch.eye(positions + 1, dtype=x.dtype, device=x.device).expand(batch, -1, -1)
    for block, r in zip(transformer.blocks, schedule, strict=True):
        x, metric = block_attend(block, x, size)
        merge = bipartite_soft_matching(metric, r) if r > 0 else None
        if merge is not None:
            if size is None:
                size = torch.ones_like(x[..., :1])
            x = merge(x * size, "sum")
            size = merge(size, "sum")
            x = x / size
            with torch.no_grad():
                source = merge(source, "amax")
        x = block.feed_forward(x)
    return x, source


def token_unmerge(tokens: Tensor, source: Tensor) -> Tensor:
    """tokens [B, K, C], binary source S [B, K, L] -> [B, L, C]: zeros, then index put at nonzeros(S)."""
    batch, _, positions = source.shape
    out = tokens.new_zeros(batch, positions, tokens.shape[-1])
    b, k, pos = source.nonzero(as_tuple=True)
    out[b, pos] = tokens[b, k]
    return out


# --------------------------------------------------------------------------- LFQ, literally


def lfq_literal(quantizer, z: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Sign quantizer with the official entropy terms through the full 2^bits softmax (in fp32)."""
    q = torch.where(z > 0, 1.0, -1.0).to(z.dtype)
    z_q = z + (q - z).detach()
    codes = bits_to_indices(z > 0)
    commit = (z - q.detach()).pow(2).mean()
    if quantizer.training:
        with torch.autocast(z.device.type, enabled=False):
            sample, batch = entropy_terms_bruteforce(
                z.reshape(-1, quantizer.bits).to(torch.promote_types(z.dtype, torch.float32)),
                quantizer.temperature,
                quantizer.entropy_eps,
            )
    else:
        sample = batch = commit.new_zeros(())
    entropy = quantizer.sample_weight * sample - quantizer.batch_weight * batch
    losses = {
        "commit": commit,
        "sample_entropy": sample,
        "batch_entropy": batch,
        "entropy": entropy,
        "loss": quantizer.commit_weight * commit + quantizer.entropy_weight * entropy,
    }
    return z_q, codes, losses


# --------------------------------------------------------------------------- decoder


def decode(decoder, z: Tensor) -> Tensor:
    """MergeVQDecoder.forward with unfused attention in its transformer blocks. z [B, z, h, w]."""
    x = decoder.conv_in(z)
    batch, channels, height, width = x.shape
    front = decoder.transformer
    x = (x + front.pos_embed(x)).flatten(2).transpose(1, 2)
    for block in front.blocks:
        x = block_forward(block, x)
    x = x.transpose(1, 2).reshape(batch, channels, height, width)
    for level in reversed(range(len(decoder.up))):
        x = decoder.adaptive[level](x, z)
        stage = decoder.up[level]
        for res in stage.block:
            x = res(x)
        if hasattr(stage, "upsample"):
            x = stage.upsample(x)
    return decoder.conv_out(decoder.act_out(decoder.norm_out(x)))


# --------------------------------------------------------------------------- the tokenizer pass


def forward(tokenizer, x: Tensor, keep: int | None = None) -> tuple[Tensor, dict]:
    """Literal MergeVQTokenizer.forward: (xrec, aux) with aux z, codes (ToMe order), source
    [B, K, L], z_l (unmerged latents [B, L, z]) and the quantizer losses."""
    if tokenizer.recovery is not None:
        raise NotImplementedError("the literal path covers the released configs (no Source Recovery)")
    encoder = tokenizer.encoder
    grid = tokenizer.grid(x)
    tokens, source = merging_transformer(encoder.transformer, encoder.tokens(x), tokenizer.schedule(grid[0] * grid[1], keep))
    z = encoder.latent_head(tokens[:, 1:])
    z_q, codes, losses = lfq_literal(tokenizer.quantizer, z)
    source = source[:, 1:, 1:]
    z_l = token_unmerge(z_q, source)
    xrec = decode(tokenizer.decoder, z_l.transpose(1, 2).reshape(z_l.shape[0], z_l.shape[-1], *grid))
    return xrec, {"z": z, "codes": codes, "source": source, "z_l": z_l, "cls": tokens[:, 0], "losses": losses}


def align_logits(tokenizer, view: Tensor, keep: int | None = None, num_positions: int | None = None) -> Tensor:
    """Literal alignment branch (same merge schedule rule as MergeVQTokenizer.align_logits)."""
    from ..models.merge import merge_schedule

    encoder = tokenizer.encoder
    tokens = encoder.tokens(view)
    view_positions = tokens.shape[1]
    if tokenizer.align_merge == "none":
        schedule = [0] * encoder.depth
    elif tokenizer.align_merge == "ratio":
        full = num_positions or view_positions
        ratio = (keep or tokenizer.default_keep or full) / full
        schedule = merge_schedule(view_positions, max(1, round(ratio * view_positions)), encoder.depth)
    else:
        schedule = tokenizer.schedule(num_positions or view_positions, keep)
    out, _ = merging_transformer(encoder.transformer, tokens, schedule)
    return encoder.align(out[:, 0])


def stage1_forward(tokenizer, x: Tensor, keep: int | None, view: Tensor | None = None,
                   num_positions: int | None = None) -> tuple[Tensor, dict]:
    """What ``Stage1Model.forward`` computes, on the literal path."""
    xrec, aux = forward(tokenizer, x, keep)
    if view is not None:
        aux["align_logits"] = align_logits(tokenizer, view, keep, num_positions)
    return xrec, aux

"""MergeAR's copy decision and keep budget at inference (``generate(..., budget=...)``).

At each position l the sampler decides, per sequence, "new group" or "copy the group first seen at m"
(m an earlier first occurrence), then takes the code from the copied group or samples one that no
group has yet (``banned_codes``). The decision's probabilities come from the copy head when the model
has one, else from the token heads: p(copy m) = p(code_m) (exact for factorised heads, part by part,
under the same CFG and temperature as the code itself) and p(new) = 1 - sum_m p(code_m), which is the
distribution plain sampling gives (``budget='off'``), made explicit.

budget: 'strict' forces copies once K groups are open and new groups when the positions left equal
the groups still to open, so a sample opens exactly min(K, L) groups; 'soft' samples the decision
from the model's probabilities; 'off' leaves it to the sampled code and the decoder's duplicate rule.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mergevq.models.gpt import GPT

BUDGETS = ("strict", "soft", "off")


def code_log_probs(model: GPT, h: Tensor, codes: Tensor, cfg: bool, guide: bool, scales, temps) -> Tensor:
    """log p(codes[b, s]) under the sampler's (guided, tempered) factorised distribution.

    h [rows, D] (rows = 2B with CFG: [cond; uncond]), codes [B, S] -> [B, S] float32 (top-k/top-p
    are not applied: they shape the code sample, not the copy decision)."""
    batch, count = codes.shape
    total = torch.zeros(batch, count, device=h.device, dtype=torch.promote_types(h.dtype, torch.float32))
    if count == 0:
        return total
    parts = model.split(codes)
    rows = h.shape[0]
    hs = h[:, None].expand(rows, count, h.shape[-1]).reshape(rows * count, -1)
    for j in range(model.num_parts):
        prev = [torch.cat([p, p]) if cfg else p for p in parts[:j]]
        logits = model.next_part_logits(hs, [p.reshape(-1) for p in prev]).view(rows, count, -1)
        if cfg:
            cond, uncond = logits.chunk(2)
            logits = cond + (scales[j] - 1.0) * (cond - uncond) if guide else cond
        temp = temps[j] if temps[j] > 0 else 1.0
        logp = (logits / temp).log_softmax(-1)
        total += logp.gather(-1, parts[j][..., None])[..., 0]
    return total


def decision_logits(model: GPT, decoder, h: Tensor, cfg: bool, guide: bool, scales, temps) -> Tensor:
    """[B, 1 + l] logits of the decision at position l = decoder.n_assigned: column 0 "new", 1 + m
    "copy the group first seen at m" (-inf where m is not a first occurrence)."""
    if model.copy_head is not None:
        return decoder.copy_logits(h)
    pos = decoder.n_assigned
    first = decoder.is_first[:, :pos]
    logp = code_log_probs(model, h, decoder.codes[:, :pos], cfg, guide, scales, temps).masked_fill(~first, float("-inf"))
    copy_mass = logp.exp().sum(-1, keepdim=True).clamp(max=1.0)
    return torch.cat([(1.0 - copy_mass).clamp_min(1e-12).log(), logp], dim=-1)


def decide(logits: Tensor, open_groups: Tensor, keep: Tensor, left: int, budget: str, capacity: int,
           generator: torch.Generator | None = None) -> Tensor:
    """Sample the decision -> choice [B] (0: new group, 1 + m: copy m).

    logits [B, 1 + l]; open_groups [B] groups opened so far; keep [B] the budget K; left: positions
    still to generate, this one included; capacity: the most groups the codebook can hold. 'strict'
    forbids "new" once min(K, capacity) groups are open and forbids copies when every position left
    must open a group."""
    logits = logits.float()
    if budget == "strict":
        must_copy = (open_groups >= keep.clamp(max=capacity)) & torch.isfinite(logits[:, 1:]).any(-1)
        must_new = (left <= keep - open_groups) & ~must_copy
        logits = logits.clone()
        logits[:, 0] = logits[:, 0].masked_fill(must_copy, float("-inf"))
        logits[:, 1:] = logits[:, 1:].masked_fill(must_new[:, None], float("-inf"))
    elif budget != "soft":
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    probs = logits.softmax(-1).nan_to_num(0.0)
    probs[:, 0] += probs.sum(-1) == 0  # nothing allowed (cannot happen for K >= 1): start a group
    from .generate import sample_categorical  # generate imports this module

    return sample_categorical(probs, generator)


def banned_codes(model: GPT, taken: Tensor, taken_mask: Tensor, parts: list[Tensor], vocab: int) -> Tensor:
    """The values of part j = len(parts) that would complete a code some group already has.

    taken [B, S] codes of the groups, taken_mask [B, S] bool (which entries count), parts: the parts
    0 .. j-1 already sampled (each [B]) -> [B, vocab] bool. For part j < k - 1 a value is banned when
    it starts no free code (k = 2: every code with that first part is taken)."""
    k = model.num_parts
    split = model.split(taken)
    match = taken_mask.clone()
    for i, p in enumerate(parts):
        match &= split[i] == p[:, None]
    j = len(parts)
    counts = torch.zeros(taken.shape[0], vocab, device=taken.device).scatter_add_(1, split[j], match.float())
    codes_per_value = math.prod(model.args.vocab_sizes[j + 1 : k])  # codes that start with (parts, value)
    return counts >= codes_per_value

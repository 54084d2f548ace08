"""MergeAR (spec 7.4): raster-order generation over K-sparse code grids with duplicate-aware attention.

The tokenizer merges the L raster positions into K groups; every position is trained to predict the
code of its group (``Tokens.code_grid()``), duplicates included. The input sequence of the ``GPT``
is [C] [M] e(t_0) .. e(t_{L-2}) (P = 2 prefix tokens): [M], the merge instruction, is an embedding
of the keep count K, stored as an index into a list of ``keep_options`` (K must be one of them;
the index, not K itself, is what the model sees, so an option list is part of a checkpoint).

Groups of a sequence (``sequence_groups``). One rule decides them for the training mask, the copy
targets and the inference position cache: with ``mask_groups='codes'`` (default) a token starts a
group iff no earlier token has its code, else it joins the group of the first token with that code
(``code_groups``; the inference rule 'same_code_any' is the same function applied token by token, so
a model fed the true sequence rebuilds the training mask exactly). ``mask_groups='tokenizer'`` uses
the tokenizer's groups instead (the official source matrix; two groups may share a code, and no
inference rule can rebuild them from the codes alone).

Mask (input index P + l holds token l, see ``gpt.py``): the query holding token l may attend to
the key holding token m iff m == l, or l - w <= m < l (the w most recent tokens), or m < l is the
first occurrence of its group (rep(m) == m, rep = smallest raster index of the group). Prefix keys
are always visible, prefix queries are causal. Later duplicates that left the window are hidden,
i.e. evicted from the KV cache at inference.

Copy decision (``copy_head``): a pointer head (``gpt.CopyHead``) scores "new group" against every
earlier first occurrence, trained with cross-entropy on the groups above (``copy_targets``). At
inference a copy sets the token's code to the copied group's code; "new" samples a code that no
group has yet. ``budget`` (generate.py) can force either decision so that a sample opens exactly K
groups.

Inference (``MergeARDecoder``): after token l is sampled its group is decided (``duplicate_rule``,
or forced with ``known_group``) and recorded in the position cache (groups, is_first, codes); then
the duplicate that just left the window (token l - w - 1, if not a first occurrence) is evicted and
token l is fed. KV slot scheme: slot reuse. One token enters per step and at most one leaves, so the
new entry takes the slot of the duplicate that leaves, or else the next fresh slot: the live slots of
a row are always [0, used), attention runs over slots [0, span) with span >= max(used) and the mask
slot < used. Keys carry their RoPE position, so which slot holds an entry does not matter and this
gives the same logits as the masked full forward. ``used`` lives on the device and grows by at most
one per token, so the host bounds it without waiting for the device and re-reads it only every
``sync_every`` tokens (attending over at most sync_every - 1 dead slots; default 16 on an
accelerator, every token on the CPU, where reading a tensor costs no device sync).
Between steps a row holds at most P + K + w entries (K = groups so far); the query's own entry makes
P + K + w + 1 while a step attends. The buffers have ``max_slots`` slots (default P + L, the
no-duplicate worst case), allocated once.

Duplicate rules (used when the sampler does not decide the group itself, i.e. ``budget='off'``):
  'same_code_any' (default): token l joins the group of the first token with the same code (equal
      to the training groups of ``mask_groups='codes'``).
  'adjacent': it joins the group of its left neighbour (same row) if their codes are equal, else
      that of its upper neighbour if their codes are equal, else it starts a group. ToMe groups are
      not contiguous, so this opens more groups than the data has (the pre-copy-head default).
  'none': every token starts its own group (no eviction: the raster baseline).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from mergevq.models.decoders import GuidedDecoder
from mergevq.models.gpt import GPT, ModelArgs
from mergevq.models.tokens import Tokens

DUPLICATE_RULES = ("same_code_any", "adjacent", "none")
MASK_GROUPS = ("codes", "tokenizer")


@dataclass
class MergeARConfig:
    """MergeAR options the paper leaves open.

    window: recent-window size w (the figure uses 2; default: one row of the 16 x 16 grid).
    keep_options: the keep counts K the merge-instruction table covers (index i <-> keep_options[i]).
    duplicate_rule: how inference decides that a sampled token duplicates an existing group when the
        sampler does not decide it (budget off).
    mask_groups: 'codes' (groups from code equality, as inference sees them) or 'tokenizer'.
    copy_head: train and use the explicit copy decision (pointer head).
    The defaults of a config that lacks a key are those of checkpoints made before the key existed.
    """

    window: int = 16
    keep_options: tuple[int, ...] = (256,)
    duplicate_rule: str = "adjacent"
    mask_groups: str = "tokenizer"
    copy_head: bool = False

    def __post_init__(self):
        self.keep_options = tuple(int(k) for k in self.keep_options)
        if self.window < 0:
            raise ValueError(f"window must be >= 0, got {self.window}")
        if self.duplicate_rule not in DUPLICATE_RULES:
            raise ValueError(f"duplicate_rule must be one of {DUPLICATE_RULES}, got {self.duplicate_rule!r}")
        if self.mask_groups not in MASK_GROUPS:
            raise ValueError(f"mask_groups must be one of {MASK_GROUPS}, got {self.mask_groups!r}")
        self.copy_head = bool(self.copy_head)

    def model_args(self, base: ModelArgs) -> ModelArgs:
        """base with the [C] [M] prefix, a merge-instruction table of len(keep_options) rows and the copy head."""
        return replace(base, prefix_tokens=2, num_keep_options=len(self.keep_options), copy_head=self.copy_head)


def representative(groups: Tensor) -> tuple[Tensor, Tensor]:
    """groups [B, L] int64 (non-negative ids) -> (rep [B, L], is_first [B, L] bool).

    rep[b, l] = smallest raster index m with groups[b, m] == groups[b, l]; is_first = rep == l.
    """
    if groups.numel() and int(groups.min()) < 0:
        raise ValueError("group ids must be non-negative")
    b, length = groups.shape
    index = torch.arange(length, device=groups.device).expand(b, length)
    size = int(groups.max()) + 1 if groups.numel() else 1
    first = torch.full((b, size), length, dtype=torch.long, device=groups.device)
    first = first.scatter_reduce(1, groups, index, reduce="amin")
    rep = first.gather(1, groups)
    return rep, rep == index


def code_groups(codes: Tensor) -> Tensor:
    """codes [B, L] -> groups [B, L]: the raster index of the first token with the same code
    (so a group's id is its representative, as the inference position cache numbers them)."""
    same = codes[:, :, None] == codes[:, None, :]
    return same.to(torch.uint8).argmax(-1)  # first True along m (there is one: m == l)


def sequence_groups(codes: Tensor, groups: Tensor, mask_groups: str = "codes") -> Tensor:
    """The groups MergeAR trains on: code_groups(codes) ('codes') or the tokenizer's groups [B, L]."""
    if mask_groups not in MASK_GROUPS:
        raise ValueError(f"mask_groups must be one of {MASK_GROUPS}, got {mask_groups!r}")
    return code_groups(codes) if mask_groups == "codes" else groups


def copy_targets(groups: Tensor) -> Tensor:
    """groups [B, L] -> copy-decision targets [B, L] int64: 0 where a token starts a group, 1 + rep(l)
    (copy the group first seen at rep(l)) where it duplicates one (column layout of ``GPT.copy_logits``)."""
    rep, is_first = representative(groups)
    return torch.where(is_first, 0, rep + 1)


def token_mask(groups: Tensor, window: int) -> Tensor:
    """groups [B, L] -> [B, L, L] bool: query holding token l may see token m (the paper's figure).

    allow[l, m] = m == l or l - window <= m < l or (m < l and is_first[m]).
    """
    _, is_first = representative(groups)
    idx = torch.arange(groups.shape[1], device=groups.device)
    causal = idx[None, :] <= idx[:, None]
    recent = idx[None, :] >= idx[:, None] - window
    return causal & (recent | is_first[:, None, :])


def mergear_mask(groups: Tensor, window: int, prefix: int = 2) -> Tensor:
    """groups [B, L] -> mask [B, T, T] bool over the model input, T = prefix + L - 1.

    Rows/columns 0 .. prefix-1 are the prefix (causal among themselves, visible to everyone);
    index prefix + l holds token l (l <= L - 2) and uses ``token_mask``.
    """
    b, length = groups.shape
    t = prefix + length - 1
    mask = torch.ones(t, t, dtype=torch.bool, device=groups.device).tril().expand(b, t, t).clone()
    mask[:, prefix:, prefix:] = token_mask(groups[:, :-1], window)
    return mask


def keep_index(keep: int | Sequence[int] | Tensor, keep_options: Sequence[int]) -> Tensor:
    """Keep counts K (int or [B]) -> their indices in keep_options (ValueError if one is missing)."""
    keep = torch.as_tensor(keep, dtype=torch.long)
    match = keep[..., None] == torch.as_tensor(tuple(keep_options), dtype=torch.long, device=keep.device)
    if not bool(match.any(-1).all()):
        raise ValueError(f"keep {keep.tolist()} not in keep_options {tuple(keep_options)}")
    return match.long().argmax(-1)


def rule_group(rule: str, pos: int, code: Tensor, codes: Tensor, groups: Tensor, is_first: Tensor,
               grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The inference duplicate rule for token ``pos``: code [B] given the earlier tokens' codes,
    groups and is_first ([B, >= pos], columns < pos used) -> (group id [B], is a duplicate [B] bool);
    a new group's id is pos."""
    group = torch.full_like(code, pos)
    dup = torch.zeros_like(code, dtype=torch.bool)
    if pos == 0 or rule == "none":
        return group, dup
    if rule == "same_code_any":
        match = (codes[:, :pos] == code[:, None]) & is_first[:, :pos]
        dup = match.any(1)
        return torch.where(dup, groups[:, :pos].gather(1, match.long().argmax(1, keepdim=True))[:, 0], group), dup
    if rule != "adjacent":
        raise ValueError(f"duplicate_rule must be one of {DUPLICATE_RULES}, got {rule!r}")
    r, c = divmod(pos, grid[1])
    neighbours = ([pos - grid[1]] if r else []) + ([pos - 1] if c else [])
    for m in neighbours:  # the left neighbour, checked last, wins
        same = codes[:, m] == code
        group, dup = torch.where(same, groups[:, m], group), dup | same
    return group, dup


def rule_groups(codes: Tensor, grid: tuple[int, int], rule: str) -> Tensor:
    """codes [B, L] -> the groups [B, L] the inference rule finds, token by token (for measuring a rule
    against the tokenizer's groups; 'same_code_any' equals ``code_groups``)."""
    groups = torch.full_like(codes, -1)
    is_first = torch.zeros_like(codes, dtype=torch.bool)
    for pos in range(codes.shape[1]):
        group, dup = rule_group(rule, pos, codes[:, pos], codes, groups, is_first, grid)
        groups[:, pos], is_first[:, pos] = group, ~dup
    return groups


def mergear_inputs(codes: Tensor, groups: Tensor, keep: Tensor, config: MergeARConfig, prefix: int = 2) -> dict[str, Tensor]:
    """codes [B, L] (per-position code grid), groups [B, L] (tokenizer groups), keep [B] (K) ->
    the MergeAR inputs of ``GPT.loss``: keep (merge-instruction index), mask [B, T, T] and, with a
    copy head, copy_target [B, L]. The groups come from ``sequence_groups(config.mask_groups)``."""
    groups = sequence_groups(codes, groups, config.mask_groups)
    out = {"keep": keep_index(keep, config.keep_options).to(codes.device),
           "mask": mergear_mask(groups, config.window, prefix)}
    if config.copy_head:
        out["copy_target"] = copy_targets(groups)
    return out


def mergear_batch(tokens: Tokens, config: MergeARConfig, prefix: int = 2) -> dict[str, Tensor]:
    """Training inputs for ``GPT.loss(labels=..., **batch)`` from encoded tokens: codes [B, L]
    (y_l = code of l's group) plus ``mergear_inputs``."""
    codes = tokens.code_grid()
    keep = torch.as_tensor(tokens.keep, device=codes.device).expand(codes.shape[0])
    return {"codes": codes, **mergear_inputs(codes, tokens.groups, keep, config, prefix)}


class MergeARDecoder(GuidedDecoder):
    """Incremental MergeAR decoding with a position cache and KV eviction (see the module docstring).

    batch B sequences; with cfg=True the model runs 2B rows [cond; uncond] that share the tokens,
    groups and slots. State (all [B, L]): codes, groups (-1 = not yet decided), is_first, slot_of
    (-1 = not fed; an evicted token's slot holds a later token); used [B] (live slots [0, used)).
    Use: h = prefill(labels, keep); then per token: h = decode_one(code) (decides the group of the
    token, evicts, feeds it); ``assign`` alone decides the group of a token that is never fed.
    With a copy head, ``copy_logits(h)`` scores "new" against the first occurrences so far; the keys
    of fed tokens are kept in copy_keys [B, L, Dh] (cond rows).
    """

    def __init__(self, model: GPT, batch: int, window: int, duplicate_rule: str = "same_code_any",
                 cfg: bool = False, max_slots: int | None = None, sync_every: int | None = None):
        if duplicate_rule not in DUPLICATE_RULES:
            raise ValueError(f"duplicate_rule must be one of {DUPLICATE_RULES}, got {duplicate_rule!r}")
        self.model, self.batch, self.window, self.rule, self.cfg = model, batch, window, duplicate_rule, cfg
        self.prefix, self.length = model.args.prefix_tokens, model.args.seq_len
        self.max_slots = max_slots or self.prefix + self.length
        device = model.cls_embedding.weight.device
        # reading a CPU tensor costs no device sync: there the span is exact after every token
        self.sync_every = max(int(sync_every or (1 if device.type == "cpu" else 16)), 1)
        self.caches = model.setup_cache(2 * batch if cfg else batch, self.max_slots)
        shape = (batch, self.length)
        self.codes = torch.zeros(shape, dtype=torch.long, device=device)
        self.groups = torch.full(shape, -1, dtype=torch.long, device=device)
        self.is_first = torch.zeros(shape, dtype=torch.bool, device=device)
        self.slot_of = torch.full(shape, -1, dtype=torch.long, device=device)
        self.used = torch.zeros(batch, dtype=torch.long, device=device)  # live slots of a row: [0, used)
        self.slot_range = torch.arange(self.max_slots, device=device)
        self.rows = torch.arange(batch, device=device)
        self.n_assigned = self.n_fed = 0
        self.span = 0  # host-side bound of max(used): attention runs over slots [0, span)
        self.peak_live = torch.zeros(batch, dtype=torch.long, device=device)  # attended by one query
        self.open_groups = torch.zeros(batch, dtype=torch.long, device=device)
        self.copy_keys = None
        if model.copy_head is not None:
            self.copy_keys = torch.zeros(batch, self.length, model.args.head_dim, device=device,
                                         dtype=model.cls_embedding.weight.dtype)

    def prefill(self, labels: Tensor, keep: Tensor | None = None) -> Tensor:
        """labels [B], keep [B] -> h [rows, D] predicting token 0 (uncond rows use the null class)."""
        h = self._prefill(labels, keep)
        self.used.fill_(self.prefix)
        self.span = self.prefix
        self.peak_live.fill_(self.prefix)
        return h

    def assign(self, code: Tensor, known_group: Tensor | None = None) -> Tensor:
        """Record token l = n_assigned (code [B]) in the position cache -> is_first [B].

        known_group [B]: force the group id (first iff no earlier token has it); else the rule
        decides and a new group's id is its raster index l.
        """
        pos = self.n_assigned
        if pos >= self.length:
            raise RuntimeError("all positions are assigned")
        if known_group is not None:
            group = known_group.to(code.device)
            dup = (self.groups[:, :pos] == group[:, None]).any(1)
        else:
            group, dup = rule_group(self.rule, pos, code, self.codes, self.groups, self.is_first, self.model.args.grid)
        first = ~dup
        self.codes[:, pos], self.groups[:, pos], self.is_first[:, pos] = code, group, first
        self.open_groups += first
        self.n_assigned += 1
        return first

    def feed(self) -> Tensor:
        """Evict the duplicate leaving the window and feed the next assigned token -> h [rows, D]."""
        pos = self.n_fed
        if pos >= self.n_assigned:
            raise RuntimeError("assign the token before feeding it")
        old = pos - self.window - 1
        if old >= 0:  # the new entry takes the slot of the duplicate that leaves, else a fresh one
            kept = self.is_first[:, old]
            slot = torch.where(kept, self.used, self.slot_of[:, old])
            self.used += kept
        else:
            slot = self.used.clone()
            self.used += 1
        self.slot_of[:, pos] = slot
        self.span += 1  # live slots are [0, used) and used grows by at most one per token
        if self.span > self.max_slots or (pos + 1) % self.sync_every == 0:
            self.span = int(self.used.max())
            if self.span > self.max_slots:
                raise RuntimeError(f"KV cache of {self.max_slots} slots is full")
        self.peak_live = torch.maximum(self.peak_live, self.used)
        live = self.slot_range[: self.span] < self.used[:, None]
        h = self.model.decode_one(self._rows(self.codes[:, pos]), pos, slots=self._rows(slot), live=self._rows(live))
        if self.copy_keys is not None:
            rope = self.model.rope[self.prefix + pos : self.prefix + pos + 1]
            self.copy_keys[:, pos] = self.model.copy_head.keys(h[: self.batch, None], rope)[:, 0]
        self.n_fed += 1
        return h

    def copy_logits(self, h: Tensor) -> Tensor:
        """h [rows, D] predicting token l = n_assigned -> [B, 1 + l] logits (cond rows): column 0 "new
        group", 1 + m "copy the group first seen at m" (-inf where m is not a first occurrence)."""
        pos = self.n_assigned
        rope = self.model.rope[self.prefix + pos : self.prefix + pos + 1]
        allowed = self.is_first[:, None, :pos]
        return self.model.copy_head.logits(h[: self.batch, None], rope, self.copy_keys[:, :pos], allowed)[:, 0]

    def decode_one(self, code: Tensor, known_group: Tensor | None = None) -> Tensor:
        """assign(code, known_group) then feed() -> h [rows, D] predicting the next token."""
        self.assign(code, known_group)
        return self.feed()

    @property
    def live(self) -> Tensor:
        """[B, max_slots] bool: the slots holding live entries (prefix, first occurrences, the window)."""
        return self.slot_range < self.used[:, None]

    @property
    def high(self) -> int:
        """Slot high-water mark over rows (reads the device)."""
        return int(self.used.max())

    @property
    def peak_cache(self) -> Tensor:
        """[B] most entries each row held between steps (<= P + K + w); the query's own makes one more."""
        return (self.peak_live - 1).clamp_min(self.prefix)

    def stats(self) -> dict:
        """peak_cache: most entries held between steps (<= P + K + w); peak_live: most entries one
        query attends to (own entry included); slots_used: buffer high-water mark; num_groups: K."""
        n = self.n_assigned
        return {
            "peak_cache": int(self.peak_cache.max()),
            "peak_live": int(self.peak_live.max()),
            "peak_cache_per_row": self.peak_cache.clone(),
            "slots_used": self.high,
            "num_groups": self.is_first[:, :n].sum(1),
            "groups": self.groups[:, :n].clone(),
        }

"""MergeAR (spec 7.4): raster-order generation over K-sparse code grids with duplicate-aware attention.

The tokenizer merges the L raster positions into K groups; every position is trained to predict the
code of its group (``Tokens.code_grid()``), duplicates included. The input sequence of the ``GPT``
is [C] [M] e(t_0) .. e(t_{L-2}) (P = 2 prefix tokens): [M], the merge instruction, is an embedding
of the keep count K, stored as an index into a list of ``keep_options`` (K must be one of them;
the index, not K itself, is what the model sees, so an option list is part of a checkpoint).

Mask (input index P + l holds token l, see ``gpt.py``): the query holding token l may attend to
the key holding token m iff m == l, or l - w <= m < l (the w most recent tokens), or m < l is the
first occurrence of its group (rep(m) == m, rep = smallest raster index of the group). Prefix keys
are always visible, prefix queries are causal. Later duplicates that left the window are hidden,
i.e. evicted from the KV cache at inference.

Inference (``MergeARDecoder``): after token l is sampled its group is decided (``duplicate_rule``,
or forced with ``known_group``) and recorded in the position cache (groups, is_first, codes); then
the duplicate that just left the window (token l - w - 1, if not a first occurrence) is evicted and
token l is fed. KV slot scheme: slot reuse. Each row keeps a boolean map of live slots; a new entry
takes the lowest free slot of its row, an evicted entry frees its slot, and attention runs over
slots [0, span) with the live map as mask, span >= the slot high-water mark. Keys carry their RoPE
position, so this gives the same logits as the masked full forward. The high-water mark lives on the
device and grows by at most one slot per token, so the host bounds it without waiting for the device
and re-reads it only every ``sync_every`` tokens (attending over at most sync_every - 1 dead slots).
Between steps a row holds at most P + K + w entries (K = groups so far); the query's own entry makes
P + K + w + 1 while a step attends. The buffers have ``max_slots`` slots (default P + L, the
no-duplicate worst case), allocated once.

Duplicate rules (the paper only says "check duplication"; all are config options):
  'adjacent' (default): token l joins the group of its left neighbour (same row) if their codes are
      equal, else that of its upper neighbour if their codes are equal, else it starts a group
      (a group shares one code, so this compares with the cached first occurrence of the
      neighbour's group; groups can only grow rightwards and downwards under this rule).
  'same_code_any': it joins the earliest group whose first occurrence has the same code.
  'none': every token starts its own group (no eviction: the raster baseline).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from mergevq.models.gpt import GPT, GuidedDecoder, ModelArgs
from mergevq.models.tokens import Tokens

DUPLICATE_RULES = ("adjacent", "same_code_any", "none")


@dataclass
class MergeARConfig:
    """MergeAR options the paper leaves open.

    window: recent-window size w (the figure uses 2; default: one row of the 16 x 16 grid).
    keep_options: the keep counts K the merge-instruction table covers (index i <-> keep_options[i]).
    duplicate_rule: how inference decides that a sampled token duplicates an existing group.
    """

    window: int = 16
    keep_options: tuple[int, ...] = (256,)
    duplicate_rule: str = "adjacent"

    def __post_init__(self):
        self.keep_options = tuple(int(k) for k in self.keep_options)
        if self.window < 0:
            raise ValueError(f"window must be >= 0, got {self.window}")
        if self.duplicate_rule not in DUPLICATE_RULES:
            raise ValueError(f"duplicate_rule must be one of {DUPLICATE_RULES}, got {self.duplicate_rule!r}")

    def model_args(self, base: ModelArgs) -> ModelArgs:
        """base with the [C] [M] prefix and a merge-instruction table of len(keep_options) rows."""
        return replace(base, prefix_tokens=2, num_keep_options=len(self.keep_options))


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


def mergear_batch(tokens: Tokens, config: MergeARConfig, prefix: int = 2) -> dict[str, Tensor]:
    """Training inputs for ``GPT.loss(labels=..., **batch)``: codes [B, L] (y_l = code of l's group),
    keep [B] (merge-instruction index of K = tokens.keep) and the MergeAR mask [B, T, T]."""
    codes = tokens.code_grid()
    keep = keep_index(tokens.keep, config.keep_options).to(codes.device).expand(codes.shape[0])
    return {"codes": codes, "keep": keep, "mask": mergear_mask(tokens.groups, config.window, prefix)}


class MergeARDecoder(GuidedDecoder):
    """Incremental MergeAR decoding with a position cache and KV eviction (see the module docstring).

    batch B sequences; with cfg=True the model runs 2B rows [cond; uncond] that share the tokens,
    groups and slots. State (all [B, L]): codes, groups (-1 = not yet decided), is_first, slot_of
    (-1 = no live entry); live [B, max_slots] bool.
    Use: h = prefill(labels, keep); then per token: h = decode_one(code) (decides the group of the
    token, evicts, feeds it); ``assign`` alone decides the group of a token that is never fed.
    """

    def __init__(self, model: GPT, batch: int, window: int, duplicate_rule: str = "adjacent",
                 cfg: bool = False, max_slots: int | None = None, sync_every: int = 16):
        if duplicate_rule not in DUPLICATE_RULES:
            raise ValueError(f"duplicate_rule must be one of {DUPLICATE_RULES}, got {duplicate_rule!r}")
        self.model, self.batch, self.window, self.rule, self.cfg = model, batch, window, duplicate_rule, cfg
        self.prefix, self.length = model.args.prefix_tokens, model.args.seq_len
        self.max_slots = max_slots or self.prefix + self.length
        self.sync_every = max(int(sync_every), 1)
        self.bounded = self.max_slots < self.prefix + self.length  # only then can the cache fill up
        device = model.cls_embedding.weight.device
        self.caches = model.setup_cache(2 * batch if cfg else batch, self.max_slots)
        shape = (batch, self.length)
        self.codes = torch.zeros(shape, dtype=torch.long, device=device)
        self.groups = torch.full(shape, -1, dtype=torch.long, device=device)
        self.is_first = torch.zeros(shape, dtype=torch.bool, device=device)
        self.slot_of = torch.full(shape, -1, dtype=torch.long, device=device)
        self.live = torch.zeros(batch, self.max_slots, dtype=torch.bool, device=device)
        self.rows = torch.arange(batch, device=device)
        self.n_assigned = self.n_fed = 0
        self.high_device = torch.zeros((), dtype=torch.long, device=device)  # slot high-water mark over rows
        self.span = 0  # host-side bound of it: attention runs over slots [0, span)
        self.peak_cache = torch.zeros(batch, dtype=torch.long, device=device)  # held between steps
        self.peak_live = torch.zeros(batch, dtype=torch.long, device=device)  # attended by one query

    def prefill(self, labels: Tensor, keep: Tensor | None = None) -> Tensor:
        """labels [B], keep [B] -> h [rows, D] predicting token 0 (uncond rows use the null class)."""
        h = self._prefill(labels, keep)
        self.live[:, : self.prefix] = True
        self.high_device.fill_(self.prefix)
        self.span = self.prefix
        self.peak_cache.fill_(self.prefix)
        self.peak_live.fill_(self.prefix)
        return h

    def assign(self, code: Tensor, known_group: Tensor | None = None) -> Tensor:
        """Record token l = n_assigned (code [B]) in the position cache -> is_first [B].

        known_group [B]: force the group id (first iff no earlier token has it); else the rule
        decides and a new group's id is its raster index l.
        """
        pos, rows = self.n_assigned, self.rows
        if pos >= self.length:
            raise RuntimeError("all positions are assigned")
        seen_codes, seen_groups = self.codes[:, :pos], self.groups[:, :pos]
        group = torch.full_like(code, pos)
        dup = torch.zeros_like(code, dtype=torch.bool)
        if known_group is not None:
            group = known_group.to(code.device)
            dup = (seen_groups == group[:, None]).any(1)
        elif pos == 0 or self.rule == "none":
            pass
        elif self.rule == "same_code_any":
            match = (seen_codes == code[:, None]) & self.is_first[:, :pos]
            dup = match.any(1)
            group = torch.where(dup, seen_groups[rows, match.long().argmax(1)], group)
        elif self.rule == "adjacent":
            r, c = divmod(pos, self.model.args.grid[1])
            neighbours = ([pos - self.model.args.grid[1]] if r else []) + ([pos - 1] if c else [])
            for m in neighbours:  # the left neighbour, checked last, wins
                same = seen_codes[:, m] == code
                group, dup = torch.where(same, seen_groups[:, m], group), dup | same
        self.codes[:, pos], self.groups[:, pos], self.is_first[:, pos] = code, group, ~dup
        self.n_assigned += 1
        return ~dup

    def feed(self) -> Tensor:
        """Evict the duplicate leaving the window and feed the next assigned token -> h [rows, D]."""
        pos, rows = self.n_fed, self.rows
        if pos >= self.n_assigned:
            raise RuntimeError("assign the token before feeding it")
        old = pos - self.window - 1
        if old >= 0:
            evict = ~self.is_first[:, old] & (self.slot_of[:, old] >= 0)
            slot = self.slot_of[:, old].clamp_min(0)
            self.live[rows, slot] &= ~evict
            self.slot_of[:, old] = torch.where(evict, -1, self.slot_of[:, old])
        held = self.live.sum(1)
        slot = (~self.live).long().argmax(1)  # lowest free slot of each row
        if self.bounded and bool(self.live[rows, slot].any()):
            raise RuntimeError(f"KV cache of {self.max_slots} slots is full")
        self.live[rows, slot] = True
        self.slot_of[:, pos] = slot
        self.high_device = torch.maximum(self.high_device, slot.max() + 1)
        self.span = min(self.span + 1, self.max_slots)  # the lowest free slot is at most the old mark
        if (pos + 1) % self.sync_every == 0:
            self.span = int(self.high_device)
        self.peak_cache = torch.maximum(self.peak_cache, held)
        self.peak_live = torch.maximum(self.peak_live, held + 1)
        h = self.model.decode_one(
            self._rows(self.codes[:, pos]), pos, slots=self._rows(slot), live=self._rows(self.live[:, : self.span])
        )
        self.n_fed += 1
        return h

    def decode_one(self, code: Tensor, known_group: Tensor | None = None) -> Tensor:
        """assign(code, known_group) then feed() -> h [rows, D] predicting the next token."""
        self.assign(code, known_group)
        return self.feed()

    @property
    def high(self) -> int:
        """Slot high-water mark over rows (reads the device)."""
        return int(self.high_device)

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

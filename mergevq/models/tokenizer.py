"""The MergeVQ tokenizer: encode to K merged LFQ codes plus groups, decode from codes (and groups)."""

from __future__ import annotations

import torch
from torch import nn

from .decoder import MergeVQDecoder
from .encoder import MergeVQEncoder
from .lfq import LFQ
from .merge import canonical_order, merge_schedule, unmerge
from .positions import group_starts
from .recovery import SourceRecovery, recovery_loss
from .tokens import Tokens, square_grid

ALIGN_MERGES = ("official", "ratio", "none")


class MergeVQTokenizer(nn.Module):
    """Stateless tokenizer: the keep count K is an argument of every call.

    default_keep is only the value used when keep is None (the variant's nominal K).
    recovery_detach: Source Recovery learns from the quantized tokens without sending its loss back into
    the encoder (a stop-gradient; the paper and the official code say nothing about it; joint by default).
    align_merge chooses how the alignment (CLS) branch merges on its own view size:
    'official' applies the reconstruction schedule's per-layer counts (capped by the smaller
    token count, as the official code does), 'ratio' keeps the same fraction K/L of the view's
    tokens, 'none' does not merge in that branch.
    """

    def __init__(
        self,
        encoder: MergeVQEncoder,
        decoder: MergeVQDecoder,
        quantizer: LFQ,
        recovery: SourceRecovery | None = None,
        default_keep: int | None = None,
        align_merge: str = "official",
        recovery_detach: bool = False,
    ):
        super().__init__()
        if align_merge not in ALIGN_MERGES:
            raise ValueError(f"align_merge={align_merge!r}: use one of {ALIGN_MERGES}")
        self.encoder, self.decoder, self.quantizer, self.recovery = encoder, decoder, quantizer, recovery
        self.default_keep = default_keep
        self.align_merge = align_merge
        self.recovery_detach = recovery_detach

    # ------------------------------------------------------------------ helpers
    def grid(self, x: torch.Tensor) -> tuple[int, int]:
        factor = self.encoder.downsample_factor
        return x.shape[-2] // factor, x.shape[-1] // factor

    def schedule(self, num_positions: int, keep: int | None) -> list[int]:
        """Per-layer merge counts for L positions -> K kept (ValueError when K is unreachable)."""
        if keep is None:
            keep = num_positions if self.default_keep is None else self.default_keep
        return merge_schedule(num_positions, keep, self.encoder.depth)

    def _encode(self, x: torch.Tensor, keep: int | None, stem: torch.Tensor | None = None):
        """-> (z [B,K,z] canonical order, z_q, codes [B,K], groups [B,L], cls, grid, quantizer losses)."""
        grid = self.grid(x)
        z, groups, cls = self.encoder(x, self.schedule(grid[0] * grid[1], keep), stem)
        order, groups = canonical_order(groups, z.shape[1])
        z = z.gather(1, order[..., None].expand(-1, -1, z.shape[-1]))
        z_q, codes, losses = self.quantizer(z)
        return z, z_q, codes, groups, cls, grid, losses

    def _decode_latents(self, z_q: torch.Tensor, groups: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """z_q [B, K, z], groups [B, L] -> image (unmerge by gather, then the CNN decoder)."""
        return self.decode_positions(unmerge(z_q, groups), grid)

    def decode_positions(self, z_l: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Per-position latents [B, L, z] -> image."""
        return self.decoder(z_l.transpose(1, 2).reshape(z_l.shape[0], z_l.shape[-1], *grid))

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def encode(self, x: torch.Tensor, keep: int | None = None, stem: torch.Tensor | None = None) -> Tokens:
        """x [B, 3, H, W] in [-1, 1] -> Tokens(codes [B, K], groups [B, L], cls [B, C], grid).

        stem: ``stem_tokens(x)`` [B, L, C] when the same images are encoded at several K (the stem, most
        of an encode's cost, does not depend on K); the codes are those of an encode without it."""
        _, _, codes, groups, cls, grid, _ = self._encode(x, keep, stem)
        return Tokens(codes=codes, groups=groups, cls=cls, grid=grid)

    @torch.no_grad()
    def stem_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, H, W] -> the stem's tokens [B, L, C] in raster order (before any merging)."""
        return self.encoder.tokens(x)

    def decode(self, tokens: Tokens) -> torch.Tensor:
        """Tokens -> image [B, 3, H, W]."""
        return self._decode_latents(self.quantizer.code_vectors(tokens.codes), tokens.groups, tokens.grid)

    def decode_grid(self, codes: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Per-position codes [B, L] (what a raster or MergeAR generator emits) -> image."""
        return self.decode_positions(self.quantizer.code_vectors(codes), grid or square_grid(codes.shape[1]))

    def recover_groups(self, codes: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
        """Codes [B, K] in canonical order (and their groups' first raster positions [B, K]) ->
        groups [B, L] predicted by Source Recovery."""
        if self.recovery is None:
            raise ValueError("this tokenizer has no Source Recovery module (train it with recovery.enabled=true)")
        return self.recovery.predict_groups(self.quantizer.code_vectors(codes), starts)

    def decode_recovered(self, codes: torch.Tensor, grid: tuple[int, int], starts: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """Codes [B, K] in canonical order without groups: predict groups with Source Recovery, decode."""
        groups = self.recover_groups(codes, starts)
        return self._decode_latents(self.quantizer.code_vectors(codes), groups, grid)

    def forward(self, x: torch.Tensor, keep: int | None = None) -> tuple[torch.Tensor, dict]:
        """Training/eval pass -> (xrec, aux). aux: z, codes, groups, cls, losses (quantizer terms and,
        with Source Recovery, 'recovery' CE against the true groups)."""
        z, z_q, codes, groups, cls, grid, losses = self._encode(x, keep)
        xrec = self._decode_latents(z_q, groups, grid)
        losses = dict(losses)
        if self.recovery is not None:
            logits = self.recovery(z_q.detach() if self.recovery_detach else z_q, group_starts(groups, z_q.shape[1]))
            losses["recovery"] = recovery_loss(logits, groups)
            losses["recovery_accuracy"] = (logits.argmax(-1) == groups).float().mean().detach()
        return xrec, {"z": z, "codes": codes, "groups": groups, "cls": cls, "losses": losses}

    def align_logits(self, view: torch.Tensor, keep: int | None = None, num_positions: int | None = None):
        """Student alignment logits [B, align_dim] from the CLS token of a (224 px) view.

        keep / num_positions describe the reconstruction setting whose merging the branch follows.
        """
        tokens = self.encoder.tokens(view)
        view_positions = tokens.shape[1]
        if self.align_merge == "none":
            schedule = [0] * self.encoder.depth
        elif self.align_merge == "ratio":
            full = num_positions or view_positions
            ratio = (keep or self.default_keep or full) / full
            schedule = merge_schedule(view_positions, max(1, round(ratio * view_positions)), self.encoder.depth)
        else:
            schedule = self.schedule(num_positions or view_positions, keep)
        out, _ = self.encoder.transformer(tokens, schedule)
        return self.encoder.align(out[:, 0])

"""Open-MAGVIT2 2D LFQ tokenizer: the CNN baseline of MergeVQ's tables (no token merging).

The encoder and decoder follow Open-MAGVIT2 (SEED-Voken, ``improved_model.py``; the MergeVQ repo
carries the same modules in ``model_vqgan.py``). Parameter names match the official state dict, so an
official checkpoint loads after stripping its ``encoder.`` / ``decoder.`` prefixes.

Layouts (f = 2 ** (len(ch_mult) - 1) is the downsampling factor):
    Encoder  x [B, in_channels, H, W] -> z [B, z_channels, H/f, W/f]
        conv_in, down.{i}.block.{j} (ResBlock), down.{i}.downsample (strided conv, all but the last
        level), mid_block.{j}, norm_out, SiLU, conv_out (1x1)
    Decoder  z [B, z_channels, h, w] -> x [B, out_ch, h*f, w*f]
        conv_in, mid_block.{j}, then for i = n-1 .. 0: adaptive.{i} (AdaGN styled by z),
        up.{i}.block.{j}, up.{i}.upsample (depth-to-space, all but level 0); norm_out, SiLU, conv_out
"""

from __future__ import annotations

import torch
from torch import nn

from mergevq.models.blocks import AdaptiveGroupNorm, ResBlock, Upsampler, group_norm
from mergevq.models.lfq import LFQ, codes_to_vectors
from mergevq.models.tokens import Tokens, square_grid


def _per_level(num_res_blocks: int | list[int], levels: int) -> list[int]:
    """An int or a per-level list (the MergeVQ repo's variant) -> one count per level."""
    if isinstance(num_res_blocks, int):
        return [num_res_blocks] * levels
    if len(num_res_blocks) != levels:
        raise ValueError(f"num_res_blocks has {len(num_res_blocks)} entries for {levels} levels")
    return list(num_res_blocks)


class _Level(nn.Module):
    """One resolution level: ``block`` (ResBlocks) plus an optional resampler set by the owner."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)


class Magvit2Encoder(nn.Module):
    """x [B, in_channels, H, W] -> z [B, z_channels, H/f, W/f] with f = 2 ** (len(ch_mult) - 1)."""

    def __init__(
        self,
        ch: int,
        ch_mult: list[int] | tuple[int, ...],
        num_res_blocks: int | list[int],
        z_channels: int = 18,
        in_channels: int = 3,
    ):
        super().__init__()
        n = len(ch_mult)
        counts = _per_level(num_res_blocks, n)
        self.num_levels = n
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList()
        c_in = ch
        for i, mult in enumerate(ch_mult):
            c_out = ch * mult
            level = _Level([ResBlock(c_in if j == 0 else c_out, c_out) for j in range(counts[i])])
            if i < n - 1:
                level.downsample = nn.Conv2d(c_out, c_out, 3, stride=2, padding=1)
            self.down.append(level)
            c_in = c_out
        self.mid_block = nn.ModuleList([ResBlock(c_in, c_in) for _ in range(counts[-1])])
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, z_channels, 1)
        self.act = nn.SiLU()

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Latent grid (h, w) for an input of height x width (each stride-2 conv rounds up)."""
        for _ in range(self.num_levels - 1):
            height, width = (height + 1) // 2, (width + 1) // 2
        return height, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                x = block(x)
            if hasattr(level, "downsample"):
                x = level.downsample(x)
        for block in self.mid_block:
            x = block(x)
        return self.conv_out(self.act(self.norm_out(x)))


class Magvit2Decoder(nn.Module):
    """z [B, z_channels, h, w] -> x [B, out_ch, h*f, w*f]; every level starts with an AdaGN
    whose scale and shift come from the statistics of the decoder input z."""

    def __init__(
        self,
        ch: int,
        ch_mult: list[int] | tuple[int, ...],
        num_res_blocks: int | list[int],
        z_channels: int = 18,
        out_ch: int = 3,
    ):
        super().__init__()
        n = len(ch_mult)
        counts = _per_level(num_res_blocks, n)
        c_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, padding=1)
        self.mid_block = nn.ModuleList([ResBlock(c_in, c_in) for _ in range(counts[-1])])
        up, adaptive = [], []  # built from the coarsest level down, stored by level index
        for i in reversed(range(n)):
            c_out = ch * ch_mult[i]
            adaptive.append(AdaptiveGroupNorm(z_channels, c_in))
            level = _Level([ResBlock(c_in if j == 0 else c_out, c_out) for j in range(counts[i])])
            if i > 0:
                level.upsample = Upsampler(c_out)
            up.append(level)
            c_in = c_out
        self.up = nn.ModuleList(up[::-1])
        self.adaptive = nn.ModuleList(adaptive[::-1])
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, out_ch, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        style = z
        x = self.conv_in(z)
        for block in self.mid_block:
            x = block(x)
        for i in reversed(range(len(self.up))):
            x = self.adaptive[i](x, style)
            for block in self.up[i].block:
                x = block(x)
            if hasattr(self.up[i], "upsample"):
                x = self.up[i].upsample(x)
        return self.conv_out(self.act(self.norm_out(x)))


class Magvit2Tokenizer(nn.Module):
    """Open-MAGVIT2: CNN encoder -> LFQ on every position of the h x w grid -> CNN decoder.

    Constructor:
        encoder:   kwargs of ``Magvit2Encoder`` (ch, ch_mult, num_res_blocks, z_channels, in_channels).
        decoder:   kwargs of ``Magvit2Decoder``; None reuses the encoder's ch, ch_mult, num_res_blocks
                   and z_channels (the official model builds both from one ddconfig).
        quantizer: an ``LFQ`` module, or kwargs for ``LFQ`` (bits defaults to z_channels); None
                   means ``LFQ(bits=z_channels)``.
    e.g. the 256-px baseline: ``Magvit2Tokenizer(dict(ch=128, ch_mult=[1, 1, 2, 2, 4],
    num_res_blocks=4, z_channels=18))`` gives 16 x 16 tokens and a 2^18 codebook.

    There is no merging: ``encode`` keeps all L = h * w positions and each owns itself.
    """

    def __init__(self, encoder: dict, decoder: dict | None = None, quantizer: nn.Module | dict | None = None):
        super().__init__()
        if decoder is None:
            decoder = {k: v for k, v in encoder.items() if k != "in_channels"}
        self.encoder = Magvit2Encoder(**encoder)
        self.decoder = Magvit2Decoder(**decoder)
        self.bits = self.encoder.conv_out.out_channels
        if not isinstance(quantizer, nn.Module):
            quantizer = LFQ(**{"bits": self.bits, **(quantizer or {})})
        if getattr(quantizer, "bits", self.bits) != self.bits:
            raise ValueError(
                f"quantizer has {quantizer.bits} bits but the encoder gives z_channels={self.bits}"
            )
        self.quantizer = quantizer

    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict, tuple[int, int]]:
        """x [B, 3, H, W] -> z_q [B, L, bits], codes [B, L] (raster order), losses, grid (h, w)."""
        z = self.encoder(x)
        h, w = z.shape[-2:]
        z_q, codes, losses = self.quantizer(z.flatten(2).transpose(1, 2))
        return z_q, codes, losses, (h, w)

    def _decode_vectors(self, z_q: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """z_q [B, L, bits] in raster order -> image [B, 3, H, W]."""
        b, _, d = z_q.shape
        return self.decoder(z_q.transpose(1, 2).reshape(b, d, *grid))

    def encode(self, x: torch.Tensor, keep: int | None = None) -> Tokens:
        """x [B, 3, H, W] -> Tokens(codes [B, L], groups [B, L] = arange(L), cls=None, grid=(h, w)).

        ``keep`` must be None or L: this tokenizer cannot merge tokens.
        """
        self._check_keep(x, keep)
        _, codes, _, grid = self._quantize(x)
        return Tokens(codes=codes.long(), groups=_identity_groups(codes), cls=None, grid=grid)

    def _check_keep(self, x: torch.Tensor, keep: int | None) -> None:
        h, w = self.encoder.grid_size(*x.shape[-2:])
        if keep is not None and keep != h * w:
            raise ValueError(
                f"Magvit2Tokenizer does not merge tokens: keep must be None or {h * w} "
                f"(all {h}x{w} positions), got {keep}"
            )

    def decode(self, tokens: Tokens) -> torch.Tensor:
        """Tokens -> image [B, 3, H, W]."""
        return self.decode_grid(tokens.code_grid(), tokens.grid)

    def decode_grid(self, codes: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """codes [B, L] in raster order -> image [B, 3, H, W]; grid defaults to a square."""
        grid = grid or square_grid(codes.shape[1])
        vectors = codes_to_vectors(codes, self.bits, self.decoder.conv_in.weight.dtype)
        return self._decode_vectors(vectors, grid)

    def forward(self, x: torch.Tensor, keep: int | None = None) -> tuple[torch.Tensor, dict]:
        """x [B, 3, H, W] -> (xrec [B, 3, H, W], aux) with aux = {"losses": the quantizer's loss dict,
        "codes": [B, L] int64, "groups": identity [B, L], "cls": None}; gradients reach the encoder
        through the quantizer's straight-through estimator."""
        self._check_keep(x, keep)
        z_q, codes, losses, grid = self._quantize(x)
        aux = {"losses": losses, "codes": codes, "groups": _identity_groups(codes), "cls": None}
        return self._decode_vectors(z_q, grid), aux


def _identity_groups(codes: torch.Tensor) -> torch.Tensor:
    """[B, L] with every position owning itself."""
    return torch.arange(codes.shape[1], device=codes.device).expand_as(codes).contiguous()

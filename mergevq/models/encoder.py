"""MergeVQ encoder: CNN or patch stem, ViT blocks with ToMe merging after attention, latent head,
and the global-alignment head on the CLS token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .blocks import ResBlock, group_norm
from .merge import bipartite_match, merge_weighted, reindex_owner
from .transformer import Block, drop_path_rates, init_transformer_weights


class CNNStem(nn.Module):
    """conv_in, then per level num_res_blocks ResBlocks and a stride-2 conv (not after the last).

    x [B, 3, H, W] -> [B, ch * ch_mult[-1], H / 2^(n-1), W / 2^(n-1)]; no output norm.
    """

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, in_channels: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList()
        width = ch
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResBlock(width, ch * mult))
                width = ch * mult
            if level < len(ch_mult) - 1:
                stage.downsample = nn.Conv2d(width, width, 3, stride=2, padding=1)
            self.down.append(stage)
        self.out_channels = width
        self.factor = 2 ** (len(ch_mult) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                x = block(x)
            if hasattr(stage, "downsample"):
                x = stage.downsample(x)
        return x


class PatchStem(nn.Module):
    """Non-overlapping patch conv + per-channel GroupNorm (the R variant): [B,3,H,W] -> [B,D,H/p,W/p]."""

    def __init__(self, width: int, patch_size: int, in_channels: int = 3):
        super().__init__()
        self.conv_in = nn.Sequential(
            nn.Conv2d(in_channels, width, patch_size, stride=patch_size),
            nn.GroupNorm(width, width, eps=1e-6),
        )
        self.out_channels = width
        self.factor = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_in(x)


def alignment_head(width: int, out_dim: int, kind: str) -> nn.Sequential:
    """MLP on the CLS token: 'layer3' = 3 Linear with GELU; 'layer2' = Linear, GELU, LN, Linear."""
    hidden = 4 * width
    if kind == "layer3":
        return nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, out_dim)
        )
    if kind == "layer2":
        return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, out_dim))
    raise ValueError(f"unknown alignment head {kind!r}: use layer2, layer3 or none")


class MergingTransformer(nn.Module):
    """CLS + L tokens through ViT blocks, merging r_l tokens after the attention of block l.

    No positional embedding: position enters only through the stem features.
    """

    def __init__(self, width: int, depth: int, num_heads: int, drop_path: float = 0.0):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(
            Block(width, num_heads, drop_path=rate) for rate in drop_path_rates(drop_path, depth)
        )
        init_transformer_weights(self)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, x: torch.Tensor, schedule: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, L, C], schedule: merges per block -> (tokens [B, 1 + K, C] in ToMe order with CLS
        first, groups [B, L] in [0, K): the kept token owning each raster position).

        Proportional attention (+log size) and size-weighted averages; per-block counts are capped
        at (T - 1) // 2, so K can come out larger than L - sum(schedule) (the caller checks).
        """
        batch, positions, _ = x.shape
        x = torch.cat([self.cls_token.expand(batch, -1, -1), x], dim=1)
        owner = torch.arange(1, positions + 1, device=x.device).expand(batch, -1)
        size = None
        for block, r in zip(self.blocks, schedule, strict=True):
            x, metric = block.attend(x, size)
            plan = bipartite_match(metric, r) if r > 0 else None
            if plan is not None:
                owner = reindex_owner(owner, plan, x.shape[1])
                x, size = merge_weighted(x, size, plan)
            x = block.feed_forward(x)
        return x, owner - 1


class MergeVQEncoder(nn.Module):
    """Image -> (latents of the kept tokens, merge groups, CLS feature).

    stem: 'cnn' (G, G+R) or 'patch' (R). width = ch * ch_mult[-1] for the CNN stem; patch_width
    for the patch stem. heads = max(width // head_dim, num_heads) when head_dim is given.
    """

    def __init__(
        self,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        depth: int = 12,
        num_heads: int = 8,
        head_dim: int | None = None,
        z_channels: int = 18,
        stem: str = "cnn",
        patch_size: int = 16,
        patch_width: int = 768,
        align_head: str = "none",
        align_dim: int = 768,
        drop_path: float = 0.0,
        in_channels: int = 3,
    ):
        super().__init__()
        if stem == "cnn":
            self.stem = CNNStem(ch, ch_mult, num_res_blocks, in_channels)
        elif stem == "patch":
            self.stem = PatchStem(patch_width, patch_size, in_channels)
        else:
            raise ValueError(f"unknown stem {stem!r}: use cnn or patch")
        width = self.stem.out_channels
        if head_dim is not None:
            num_heads = max(width // head_dim, num_heads)
        self.width, self.depth = width, depth
        self.transformer = MergingTransformer(width, depth, num_heads, drop_path)
        self.norm_out = group_norm(width)
        self.act_out = nn.SiLU()
        self.conv_out = nn.Conv2d(width, z_channels, 1)
        self.align_head = None if align_head == "none" else alignment_head(width, align_dim, align_head)

    @property
    def downsample_factor(self) -> int:
        return self.stem.factor

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, H, W] -> stem tokens [B, L, C] in raster order."""
        return self.stem(x).flatten(2).transpose(1, 2)

    def latent_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """GN over (channel groups x kept tokens) -> SiLU -> 1x1 conv: [B, K, C] -> [B, K, z]."""
        grid = tokens.transpose(1, 2)[..., None]  # [B, C, K, 1]; GN statistics ignore the token layout
        return self.conv_out(self.act_out(self.norm_out(grid)))[..., 0].transpose(1, 2)

    def forward(self, x: torch.Tensor, schedule: Sequence[int], tokens: torch.Tensor | None = None):
        """x [B, 3, H, W] -> (z [B, K, z_channels] in ToMe order, groups [B, L], cls [B, C]).

        tokens: ``self.tokens(x)`` when already computed (encoding one batch at several K runs the stem once)."""
        out, groups = self.transformer(self.tokens(x) if tokens is None else tokens, schedule)
        return self.latent_head(out[:, 1:]), groups, out[:, 0]

    def align(self, cls: torch.Tensor) -> torch.Tensor:
        """CLS feature [B, C] -> alignment logits [B, align_dim]."""
        if self.align_head is None:
            raise ValueError("this encoder has no alignment head (align_head=none)")
        return self.align_head(cls)


# --------------------------------------------------------------------------- DINOv2 init


def select_uniform(teacher: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Weight selection (Xu et al., 2311.18823): subsample teacher along every dim to `shape`.

    A dim of size t -> s takes every (t/s)-th element when s divides t, else round(linspace(0, t-1, s)).
    """
    if teacher.dim() != len(shape):
        raise ValueError(f"teacher tensor has {teacher.dim()} dims, student expects {len(shape)}")
    out = teacher
    for dim, (t, s) in enumerate(zip(teacher.shape, shape)):
        if t < s:
            raise ValueError(f"teacher dim {dim} ({t}) is smaller than the student's ({s})")
        if t == s:
            continue
        if t % s == 0:
            index = torch.arange(s) * (t // s)
        else:
            index = torch.linspace(0, t - 1, s).round().long()
        out = out.index_select(dim, index)
    return out


def weight_selection_init(transformer: MergingTransformer, teacher_state: dict[str, torch.Tensor]) -> list[str]:
    """Copy subsampled DINOv2 ViT weights (timm names) into the merging transformer's blocks and
    CLS token. Returns the student keys that were initialised."""
    student = transformer.state_dict()
    selected = {
        key: select_uniform(teacher_state[key], value.shape)
        for key, value in student.items()
        if ("block" in key or "cls_token" in key) and key in teacher_state
    }
    if not selected:
        raise ValueError("no DINOv2 key matched the encoder's blocks: is this a timm ViT state dict?")
    transformer.load_state_dict(selected, strict=False)
    return sorted(selected)


def load_teacher_state(path: str) -> dict[str, torch.Tensor]:
    """Read a timm DINOv2 ViT state dict from a local .safetensors/.pth/.bin file."""
    from pathlib import Path

    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"DINOv2 weights for the encoder init not found at {file}; set tokenizer.encoder_init=<path to a "
            "timm vit_*_patch14_dinov2 state dict (.safetensors/.pth)> or tokenizer.encoder_init=null"
        )
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    state = torch.load(file, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) else state

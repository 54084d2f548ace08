"""Pictures of what the tokenizer merged: merge maps, strips across K, captioned PNG panels.

    merge_map(image [3,H,W] in [-1,1], groups [L], grid (h,w))   -> [3,H,W] in [0,1]
    merge_strip(images [K x [3,H,W]], groups [K x [L]], grid)     -> [3,H,K*W + gaps] in [0,1]
    hstack(panels [N x [3,H,W]] in [0,1])                          -> [3,H,N*W + gaps]
    save_panels(panels, path, captions)                            -> PNG with one caption per panel

A merge map paints every kept token's region (the raster positions of its group, upsampled to pixels)
in its own colour over the image (alpha blend) and draws the group boundaries as lines.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

GOLDEN = (math.sqrt(5) - 1) / 2
LINE_COLOUR = (0.05, 0.05, 0.05)


def group_colours(num_groups: int) -> Tensor:
    """[num_groups, 3] distinct RGB colours in [0, 1]: golden-ratio hue steps, alternating
    saturation and value so neighbours in index order also differ in brightness."""
    colours = [
        colorsys.hsv_to_rgb((i * GOLDEN) % 1.0, (0.55, 0.85, 0.7)[i % 3], (0.95, 0.8)[i % 2])
        for i in range(num_groups)
    ]
    return torch.tensor(colours, dtype=torch.float32).reshape(num_groups, 3)


def group_pixels(groups: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """groups [L] (raster order) -> [H, W] int64: the group of the position each pixel lies in."""
    h, w = grid
    if groups.numel() != h * w:
        raise ValueError(f"groups has {groups.numel()} positions, grid {h}x{w} needs {h * w}")
    cells = groups.reshape(1, 1, h, w).float()
    return F.interpolate(cells, size=size, mode="nearest")[0, 0].round().long()


def boundaries(pixels: Tensor) -> Tensor:
    """[H, W] group ids -> [H, W] bool: pixels whose right or lower neighbour is in another group."""
    edge = torch.zeros_like(pixels, dtype=torch.bool)
    edge[:, :-1] |= pixels[:, :-1] != pixels[:, 1:]
    edge[:-1, :] |= pixels[:-1, :] != pixels[1:, :]
    return edge


def segment_layer(groups: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """[3, H, W] in [0, 1]: each group's pixels in its colour (group ids ranked, so any ids work)."""
    ids, ranks = torch.unique(groups.cpu().long(), return_inverse=True)
    pixels = group_pixels(ranks, grid, size)
    return group_colours(len(ids))[pixels].permute(2, 0, 1)


def merge_map(image: Tensor, groups: Tensor, grid: tuple[int, int], alpha: float = 0.5,
              lines: bool = True) -> Tensor:
    """image [3, H, W] in [-1, 1], groups [L] (kept token of each raster position), grid (h, w)
    -> [3, H, W] in [0, 1]: (1 - alpha) * image + alpha * group colour, boundaries as dark lines."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W], got {tuple(image.shape)}")
    size = tuple(image.shape[-2:])
    base = (image.detach().float().cpu().clamp(-1, 1) + 1) / 2
    out = (1 - alpha) * base + alpha * segment_layer(groups, grid, size)
    if lines:
        _, ranks = torch.unique(groups.cpu().long(), return_inverse=True)
        edge = boundaries(group_pixels(ranks, grid, size))
        out = torch.where(edge, torch.tensor(LINE_COLOUR)[:, None, None], out)
    return out.clamp(0, 1)


def hstack(panels: Sequence[Tensor], gap: int = 2, fill: float = 1.0) -> Tensor:
    """Panels [3, H, W_i] in [0, 1] (same H) -> one image, ``gap`` pixels of ``fill`` between them."""
    if not panels:
        raise ValueError("no panels")
    height = panels[0].shape[-2]
    spacer = torch.full((3, height, gap), fill)
    parts: list[Tensor] = []
    for i, panel in enumerate(panels):
        parts += [spacer] if i else []
        parts.append(panel.detach().float().cpu())
    return torch.cat(parts, dim=-1)


def merge_strip(images: Sequence[Tensor], groups: Sequence[Tensor], grid: tuple[int, int],
                alpha: float = 0.5, gap: int = 2) -> Tensor:
    """One merge map per K: images[k] [3, H, W] in [-1, 1] with groups[k] [L] -> [3, H, K*W + gaps]."""
    if len(images) != len(groups):
        raise ValueError(f"{len(images)} images but {len(groups)} group maps")
    return hstack([merge_map(im, g, grid, alpha) for im, g in zip(images, groups)], gap)


def to_unit(image: Tensor) -> Tensor:
    """[3, H, W] in [-1, 1] -> [0, 1]."""
    return ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2)


def to_pil(image: Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> RGB PIL image."""
    array = (image.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array), "RGB")


def upscale(image: Tensor, factor: int) -> Tensor:
    """Nearest-neighbour upscaling of [3, H, W] by an integer factor (tiny images stay readable)."""
    return image if factor <= 1 else image.repeat_interleave(factor, -2).repeat_interleave(factor, -1)


def display_factor(height: int, min_size: int = 128) -> int:
    """Smallest integer upscaling factor that makes ``height`` at least ``min_size`` pixels."""
    return max(1, math.ceil(min_size / max(1, height)))


def save_panels(panels: Sequence[Tensor], path: str | Path, captions: Sequence[str] | None = None,
                gap: int = 2, min_size: int = 128) -> Path:
    """Write panels [3, H, W] in [0, 1] side by side as a PNG, each with its caption above it.

    Panels smaller than ``min_size`` pixels are upscaled (nearest) by an integer factor first (draw
    merge maps on an upscaled image instead, so that their lines stay one pixel wide).
    """
    factor = display_factor(panels[0].shape[-2], min_size)
    panels = [upscale(p, factor) for p in panels]
    strip = to_pil(hstack(panels, gap))
    if captions:
        font = ImageFont.load_default()
        bar = 16
        canvas = Image.new("RGB", (strip.width, strip.height + bar), "white")
        canvas.paste(strip, (0, bar))
        draw = ImageDraw.Draw(canvas)
        x = 0
        for caption, panel in zip(captions, panels):
            draw.text((x + 3, 2), caption, fill="black", font=font)
            x += panel.shape[-1] + gap
        strip = canvas
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    strip.save(path)
    return path

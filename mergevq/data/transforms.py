"""Image -> view tensors: the three training views of MergeVQ (spec 6.1) and the validation view.

Every view maps a PIL image of any mode to a float32 tensor ``[3, S, S]``:

| key           | used by          | pipeline                                                     | range        |
|---------------|------------------|--------------------------------------------------------------|--------------|
| `image`       | reconstruction   | Resize(short side `size`, bicubic) -> RandomCrop `size`     | [-1, 1]      |
| `image_aug_w` | teacher (weak)   | Resize(`align_size`, bicubic) -> RandomCrop `align_size`    | ImageNet norm|
| `image_aug_s` | student (strong) | RandomResizedCrop `align_size` (0.08, 1), bicubic, hflip 0.5 | [-1, 1]      |
| validation    | eval / rFID      | Resize(`size`, bilinear) -> CenterCrop `size`               | [-1, 1]      |

Resize is applied to the PIL image (antialiased, clipped to uint8), so images smaller than the crop
are scaled up and outputs never leave their range. Randomness comes from torch's RNG.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

VIEW_KEYS = ("image", "image_aug_w", "image_aug_s")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_HALF = (0.5, 0.5, 0.5)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL image -> 8-bit RGB.

    16-bit and 32-bit integer greyscale ('I;16*', 'I') are read as 0..65535 and scaled to 0..255
    (Pillow's own conversion clips instead); float ('F') is read as 0..1. Transparent images
    (alpha modes, palette or greyscale with a transparency key) are composited on `background`.
    CMYK, palette, greyscale and bilevel go through Pillow's conversion.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT:
        a = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        img = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif img.mode == "F":
        a = np.clip(np.asarray(img, dtype=np.float64), 0.0, 1.0)
        img = Image.fromarray(np.rint(a * 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba)
    return img.convert("RGB")


def _to_tensor(mean: Sequence[float], std: Sequence[float]) -> list[Callable]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def recon_transform(size: int) -> v2.Compose:
    """RGB PIL -> `[3, size, size]` in [-1, 1]: Resize(short side, bicubic) -> RandomCrop."""
    return v2.Compose([
        v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC),
        v2.RandomCrop(size),
        *_to_tensor(_HALF, _HALF),
    ])


def teacher_transform(align_size: int) -> v2.Compose:
    """RGB PIL -> `[3, align_size, align_size]`, ImageNet mean/std: Resize(bicubic) -> RandomCrop."""
    return v2.Compose([
        v2.Resize(align_size, interpolation=v2.InterpolationMode.BICUBIC),
        v2.RandomCrop(align_size),
        *_to_tensor(IMAGENET_MEAN, IMAGENET_STD),
    ])


def student_transform(align_size: int) -> v2.Compose:
    """RGB PIL -> `[3, align_size, align_size]` in [-1, 1]: RandomResizedCrop(0.08, 1) + hflip."""
    return v2.Compose([
        v2.RandomResizedCrop(align_size, scale=(0.08, 1.0), interpolation=v2.InterpolationMode.BICUBIC),
        v2.RandomHorizontalFlip(0.5),
        *_to_tensor(_HALF, _HALF),
    ])


def val_transform(size: int) -> v2.Compose:
    """RGB PIL -> `[3, size, size]` in [-1, 1], deterministic: Resize(bilinear) -> CenterCrop."""
    return v2.Compose([
        v2.Resize(size, interpolation=v2.InterpolationMode.BILINEAR),
        v2.CenterCrop(size),
        *_to_tensor(_HALF, _HALF),
    ])


class Views:
    """PIL image (any mode) -> `{key: float32 [3, S_key, S_key]}`, one pipeline per key.

    The image is converted to RGB once and each pipeline draws its own random crop.
    """

    def __init__(self, pipelines: Mapping[str, Callable[[Image.Image], torch.Tensor]]):
        if not pipelines:
            raise ValueError("Views needs at least one pipeline")
        self.pipelines = dict(pipelines)

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        rgb = to_rgb(img)
        return {key: pipe(rgb) for key, pipe in self.pipelines.items()}

    def __repr__(self) -> str:
        return f"Views({self.pipelines!r})"


def three_views(size: int = 256, align_size: int = 224, views: Sequence[str] = VIEW_KEYS) -> Views:
    """The training views of spec 6.1; `views=("image",)` builds only the reconstruction view."""
    builders = {"image": lambda: recon_transform(size),
                "image_aug_w": lambda: teacher_transform(align_size),
                "image_aug_s": lambda: student_transform(align_size)}
    unknown = [v for v in views if v not in builders]
    if unknown:
        raise ValueError(f"unknown views {unknown}; known: {list(VIEW_KEYS)}")
    return Views({key: builders[key]() for key in views})


def val_views(size: int = 256) -> Views:
    """The single deterministic validation view, under the key `image`."""
    return Views({"image": val_transform(size)})

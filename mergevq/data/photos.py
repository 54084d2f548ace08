"""Seeded random crops of the RGB photos shipped inside scikit-image and scikit-learn.

Eleven photos load without a download (300x451 up to 1411x1411). Two are held out for
validation, so the splits never share a photo. Label = index of the photo in `PHOTO_NAMES`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
               "retina", "colorwheel", "motorcycle", "china", "flower")
VAL_PHOTOS = ("coffee", "flower")


@lru_cache(maxsize=1)
def load_photos() -> dict[str, np.ndarray]:
    """name -> read-only uint8 array `[H, W, 3]`, for every name in `PHOTO_NAMES` (loaded once)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(data, name)() for name in PHOTO_NAMES[:8]}
    photos["motorcycle"] = data.stereo_motorcycle()[0]  # left view of the stereo pair
    sklearn_images = load_sample_images()
    for path, img in zip(sklearn_images.filenames, sklearn_images.images):
        photos[path.rsplit("/", 1)[-1].split(".")[0]] = img  # china, flower
    for arr in photos.values():
        arr.setflags(write=False)
    return {name: photos[name] for name in PHOTO_NAMES}


def split_photos(split: str) -> tuple[str, ...]:
    """Photo names of a split: 'val' is `VAL_PHOTOS`, 'train' all the others."""
    if split == "val":
        return VAL_PHOTOS
    if split == "train":
        return tuple(n for n in PHOTO_NAMES if n not in VAL_PHOTOS)
    raise ValueError(f"Photos split must be 'train' or 'val', got {split!r}")


def crop_box(index: int, seed: int, height: int, width: int, crop_size: int) -> tuple[int, int, int]:
    """(top, left, side) of the square crop of item `index`; a pure function of its arguments.

    side = min(crop_size, height, width): a photo smaller than the crop gives its largest square.
    """
    rng = np.random.default_rng((seed, index))
    side = min(crop_size, height, width)
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    return top, left, side


class Photos(Dataset):
    """`num_samples` seeded square crops, cycling through the split's photos.

    Item i -> (transform(RGB PIL crop_size x crop_size), label): photo `i % n_photos` of the split,
    crop box from `crop_box(i, seed, ...)`, so the same (seed, i) always gives the same crop.
    """

    def __init__(self, split: str = "train", num_samples: int = 1000, crop_size: int = 128,
                 seed: int = 0, transform: Callable | None = None):
        if num_samples < 1 or crop_size < 1:
            raise ValueError(f"num_samples and crop_size must be positive, got {num_samples}, {crop_size}")
        self.names = split_photos(split)
        self.num_samples, self.crop_size, self.seed = num_samples, crop_size, seed
        self.transform = transform

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int):
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        name = self.names[index % len(self.names)]
        photo = load_photos()[name]
        top, left, side = crop_box(index, self.seed, photo.shape[0], photo.shape[1], self.crop_size)
        img = Image.fromarray(np.ascontiguousarray(photo[top:top + side, left:left + side]), "RGB")
        return (self.transform(img) if self.transform else img), PHOTO_NAMES.index(name)

"""One builder for every dataset the platform trains or evaluates on.

`build_dataset(name, split, ...)` returns a Dataset whose items are dicts of view tensors
(`image`, and for training optionally `image_aug_w`, `image_aug_s`; see `transforms`) plus
`label`, a 0-d int64 tensor.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from mergevq.data.fashion_mnist import FashionMNIST, fetch_fashion_mnist
from mergevq.data.folder import ImageFolderDataset, imagenet
from mergevq.data.photos import Photos
from mergevq.data.transforms import VIEW_KEYS, Views, three_views, val_views

DATASETS = ("fashion_mnist", "photos", "folder", "imagenet")
EVAL_SPLITS = ("val", "test")

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """`$MERGEVQ_CACHE`, else `$XDG_CACHE_HOME/mergevq`, else `~/.cache/mergevq`."""
    if os.environ.get("MERGEVQ_CACHE"):
        return Path(os.environ["MERGEVQ_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "mergevq"


class LabelledViews(Dataset):
    """Wraps a dataset of `(views dict, label)` items -> `{**views, "label": int64 []}`."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor] | None:
        item = self.base[index]
        if item is None:  # an unreadable file of an evaluation split (see ImageFolderDataset)
            return None
        views, label = item
        return {**views, "label": torch.tensor(label, dtype=torch.int64)}

    @property
    def num_skipped(self) -> int:
        """Unreadable files skipped so far by the wrapped dataset (0 for in-memory datasets)."""
        return getattr(self.base, "num_skipped", 0)


def readable_batch(items: list[dict | None]) -> dict[str, torch.Tensor | int]:
    """DataLoader collate for evaluation: the readable items collated, plus ``num_skipped`` (the
    unreadable ones, dropped and never replaced); a batch of only unreadable items has no tensors."""
    kept = [item for item in items if item is not None]
    return {**(default_collate(kept) if kept else {}), "num_skipped": len(items) - len(kept)}


def is_held_out(name: str, split: str, root: str | Path | None) -> bool:
    """Whether ``split`` of this dataset is held out from training: a 'folder' tree without a
    ``root/<split>`` subfolder serves its training images for every split."""
    if split not in EVAL_SPLITS:
        return False
    return name != "folder" or root is None or (Path(root).expanduser() / split).is_dir()


def build_transform(split: str, size: int = 256, align_size: int = 224,
                    views: Sequence[str] = VIEW_KEYS, augment: bool | None = None) -> Views:
    """Training views for `augment` (default: split == 'train'), else the validation view."""
    augment = split == "train" if augment is None else augment
    return three_views(size, align_size, views) if augment else val_views(size)


def _require_root(name: str, root: str | Path | None) -> Path:
    if root is None:
        raise FileNotFoundError(f"dataset {name!r} needs a root folder; set data.root=/path/to/{name}")
    if not Path(root).expanduser().is_dir():
        raise FileNotFoundError(f"data root {root} for dataset {name!r} does not exist; "
                                f"set data.root=/path/to/{name}")
    return Path(root).expanduser()


def build_dataset(name: str, split: str = "train", root: str | Path | None = None,
                  cache_dir: str | Path | None = None, size: int = 256, align_size: int = 224,
                  views: Sequence[str] = VIEW_KEYS, augment: bool | None = None, replace_unreadable: bool = True,
                  **kwargs) -> LabelledViews:
    """A dataset of `{view key: float32 [3, S, S], "label": int64 []}` items.

    name: 'fashion_mnist' (root = folder of the IDX .gz files, default: fetched into cache_dir),
          'photos' (kwargs: num_samples, crop_size, seed), 'folder' (root/<split> if it exists,
          else root, as class folders) or 'imagenet' (root/{train,val}/<wnid>/*.JPEG, file list
          cached under cache_dir).
    split: 'train', or 'val'/'test' (synonyms: each dataset maps them to its own held-out split).
    views/augment: see `build_transform`; evaluation splits get the single `image` view.
    replace_unreadable: folder datasets only; False makes an unreadable file's item None (evaluation:
        collate with `readable_batch`) instead of the next readable image.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if split not in ("train", *EVAL_SPLITS):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    transform = build_transform(split, size, align_size, views, augment)
    held_out = split in EVAL_SPLITS
    if name == "fashion_mnist":
        folder = fetch_fashion_mnist(cache_dir) if root is None else _require_root(name, root)
        base = FashionMNIST(folder, "test" if held_out else "train", transform, **kwargs)
    elif name == "photos":
        base = Photos("val" if held_out else "train", transform=transform, **kwargs)
    elif name == "folder":
        root = _require_root(name, root)
        if held_out and not (root / split).is_dir():
            log.warning("data.root=%s has no %s/ subfolder: the %s split is the training images themselves, "
                        "NOT held out", root, split, split)
        base = ImageFolderDataset(root / split if (root / split).is_dir() else root, transform,
                                  replace_unreadable=replace_unreadable, **kwargs)
    else:
        root = _require_root(name, root)
        base = imagenet(root, "val" if held_out else "train", cache_dir, transform, replace_unreadable, **kwargs)
    return LabelledViews(base)


def dataset_fingerprint(dataset: Dataset) -> str:
    """sha256 naming what a dataset holds, for caches that must follow their inputs: the pixel and label
    arrays of an in-memory set (Fashion-MNIST), else every file's relative path, label, size and mtime
    (class folders), else every item's image and label (read in full: small sets such as the photos)."""
    base = getattr(dataset, "base", dataset)
    digest = hashlib.sha256(f"{type(base).__name__}:{len(dataset)}".encode())
    if isinstance(getattr(base, "images", None), np.ndarray) and isinstance(getattr(base, "labels", None), np.ndarray):
        digest.update(np.ascontiguousarray(base.images).tobytes())
        digest.update(np.ascontiguousarray(base.labels).tobytes())
    elif hasattr(base, "samples") and hasattr(base, "root"):
        for rel, label in base.samples:
            stat = (Path(base.root) / rel).stat()
            digest.update(f"{rel}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    else:
        for index in range(len(dataset)):
            item = dataset[index]
            if item is None:
                digest.update(b"unreadable")
                continue
            digest.update(item["image"].numpy().tobytes())
            digest.update(str(int(item["label"])).encode())
    return digest.hexdigest()


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Every item's label [N] int64, without decoding images where the dataset keeps its labels."""
    base = getattr(dataset, "base", dataset)
    if isinstance(getattr(base, "labels", None), np.ndarray):
        return base.labels.astype(np.int64)
    if hasattr(base, "samples"):
        return np.asarray([label for _, label in base.samples], dtype=np.int64)
    items = (dataset[i] for i in range(len(dataset)))
    return np.asarray([int(item["label"]) for item in items if item is not None], dtype=np.int64)

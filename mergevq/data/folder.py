"""Class-folder image trees (`root/<class>/**/<image>`) and the ImageNet layout with a file-list cache.

A file that fails to decode is skipped, counted and logged. For training the dataset returns the
next readable sample instead, so an epoch never stops on one bad file; for evaluation
(``replace_unreadable=False``) it returns None, so no image is counted twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from mergevq.data.transforms import to_rgb
from mergevq.errors import DataError

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
Sample = tuple[str, int]  # (path relative to the root, label)


def scan_class_folders(root: str | Path) -> tuple[list[str], list[Sample]]:
    """(class names, samples) of a class-folder tree; labels index the sorted class names.

    Hidden entries are ignored, class folders are searched recursively (following links), and
    file extensions are matched case-insensitively. An empty class keeps its label, with a warning.
    """
    root = Path(root)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    samples: list[Sample] = []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = Path(dirpath).relative_to(root)
            found += [((rel / f).as_posix(), label) for f in sorted(filenames)
                      if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".")]
        if not found:
            log.warning("class folder %s has no images", root / name)
        samples += found
    return classes, samples


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file (truncation is an error), returned as 8-bit RGB."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


class ImageFolderDataset(Dataset):
    """Item i -> (transform(RGB PIL image), label) for the i-th sample of a class-folder tree.

    `samples` (relative path, label) pairs skip the scan (see `cached_file_list`). An unreadable
    file is logged, added to `skipped` and counted in `num_skipped`, and the next readable sample
    (wrapping around) is returned, or None with ``replace_unreadable=False``. With DataLoader workers,
    each worker holds its own counter.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None,
                 samples: Sequence[Sample] | None = None, replace_unreadable: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.samples = list(samples) if samples is not None else scan_class_folders(self.root)[1]
        if not self.samples:
            raise ValueError(f"no images found under {self.root} (expected {self.root}/<class>/<image>, "
                             f"extensions {', '.join(IMG_EXTENSIONS)})")
        self.transform, self.replace_unreadable = transform, replace_unreadable
        self.skipped: set[str] = set()
        self._first_error = ""

    @property
    def num_skipped(self) -> int:
        """Number of distinct files found unreadable so far (in this process)."""
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        for step in range(len(self.samples)):
            rel, label = self.samples[(index + step) % len(self.samples)]
            if rel in self.skipped:
                if not self.replace_unreadable:
                    return None
                continue
            try:
                img = load_image(self.root / rel)
            except Exception as err:  # any decoder failure: corrupt, truncated, unsupported mode
                self.skipped.add(rel)
                self._first_error = self._first_error or f"{self.root / rel}: {type(err).__name__}: {err}"
                log.warning("skipping unreadable image %s (%s: %s)", self.root / rel, type(err).__name__, err)
                if not self.replace_unreadable:
                    return None
                continue
            return (self.transform(img) if self.transform else img), label
        raise DataError(f"every one of the {len(self.samples)} image files under {self.root} is unreadable (first: "
                        f"{self._first_error}): replace the files or set data.root to another folder")


def cached_file_list(root: str | Path, cache_dir: str | Path) -> list[Sample]:
    """Samples of a class-folder tree, scanned once and then read from a text file.

    The file `cache_dir/filelists/<basename>-<sha1 of the absolute root>.txt` holds one
    `relative/path<TAB>label` line per image; it is written atomically and reused afterwards
    (delete it to rescan a changed tree).
    """
    root = Path(root).resolve()
    key = hashlib.sha1(str(root).encode()).hexdigest()[:12]
    path = Path(cache_dir).expanduser() / "filelists" / f"{root.name}-{key}.txt"
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            return [(rel, int(label)) for rel, label in (line.rstrip("\n").rsplit("\t", 1) for line in f)]
    samples = scan_class_folders(root)[1]
    samples = [(rel, label) for rel, label in samples if "\n" not in rel and "\t" not in rel]
    if not samples:
        return samples  # nothing worth caching; the dataset reports the empty tree
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False) as f:
        f.writelines(f"{rel}\t{label}\n" for rel, label in samples)
    os.replace(f.name, path)
    log.info("wrote file list of %d images for %s to %s", len(samples), root, path)
    return samples


def imagenet(root: str | Path, split: str, cache_dir: str | Path,
             transform: Callable | None = None, replace_unreadable: bool = True) -> ImageFolderDataset:
    """ImageNet-1k as `root/{train,val}/<wnid>/*.JPEG` (val sorted into class folders)."""
    if split not in ("train", "val"):
        raise ValueError(f"ImageNet split must be 'train' or 'val', got {split!r}")
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"ImageNet split folder {folder} does not exist (expected "
                                f"root/{split}/<wnid>/*.JPEG); set data.root=/path/to/imagenet")
    return ImageFolderDataset(folder, transform, samples=cached_file_list(folder, cache_dir),
                              replace_unreadable=replace_unreadable)

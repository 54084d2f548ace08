"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package: fetch, IDX reader, dataset.

The package puts four IDX `.gz` files in `/usr/share/datasets/fashion-mnist/`. Without it
installed, `apt-get download` + `dpkg-deb -x` fetch them into a cache folder, no root needed
once apt's package lists exist (on a fresh machine: `apt-get update`, as root).
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

PACKAGE = "dataset-fashion-mnist"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (optionally gzipped) -> array of its declared dtype and shape.

    Header: two zero bytes, a dtype code, the number of dims, then one big-endian uint32 per dim.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (header {data[:4]!r})")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: {len(data)} bytes, header {shape} {dtype} needs {expected}")
    return np.frombuffer(data, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def _has_files(folder: Path) -> bool:
    return all((folder / name).is_file() for pair in FILES.values() for name in pair)


def fetch_fashion_mnist(cache_dir: str | Path, system_dir: str | Path = SYSTEM_DIR) -> Path:
    """The folder holding the four Fashion-MNIST IDX `.gz` files, fetching them if needed.

    Looks in `system_dir` (where the installed package puts them), then `cache_dir/fashion-mnist`;
    otherwise runs `apt-get download dataset-fashion-mnist` and `dpkg-deb -x` in a temporary folder
    and moves the files into `cache_dir/fashion-mnist` (each by an atomic rename, so concurrent
    ranks are safe). Raises RuntimeError with apt's message if the download fails.
    """
    if _has_files(Path(system_dir)):
        return Path(system_dir)
    dest = Path(cache_dir).expanduser() / "fashion-mnist"
    if _has_files(dest):
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".fetch-") as tmp:
        _run(["apt-get", "download", PACKAGE], cwd=tmp)
        debs = sorted(Path(tmp).glob(f"{PACKAGE}_*.deb"))
        if not debs:
            raise RuntimeError(f"apt-get download {PACKAGE} wrote no .deb into {tmp}")
        _run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "root")], cwd=tmp)
        extracted = Path(tmp) / "root" / SYSTEM_DIR.relative_to("/")
        for pair in FILES.values():
            for name in pair:
                os.replace(extracted / name, dest / name)
    return dest


def _run(cmd: list[str], cwd: str) -> None:
    if shutil.which(cmd[0]) is None:
        raise RuntimeError(f"`{cmd[0]}` not found: Fashion-MNIST needs Debian's {PACKAGE} package "
                           f"(or its four IDX .gz files in the cache folder)")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        hint = ""
        if cmd[:2] == ["apt-get", "download"]:
            hint = ("\nIf apt has no package lists yet (fresh machine), run `apt-get update` as root "
                    "once; `apt-get download` then works without root.")
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n"
                           f"{proc.stderr.strip() or proc.stdout.strip()}{hint}")


class FashionMNIST(Dataset):
    """Fashion-MNIST from a folder of IDX `.gz` files: item i -> (transform(RGB PIL 32x32), label).

    The 28x28 greyscale image is zero-padded by 2 pixels per side and repeated to 3 channels.
    `split` is 'train' (60k) or 'test' (10k); arrays are read once (about 0.5 s for train).
    """

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None):
        if split not in FILES:
            raise ValueError(f"Fashion-MNIST split must be one of {list(FILES)}, got {split!r}")
        images, labels = (read_idx(Path(root) / name) for name in FILES[split])
        if images.ndim != 3 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"{root}: images {images.shape} and labels {labels.shape} do not match")
        self.images = images  # [N, 28, 28] uint8
        self.labels = labels.astype(np.int64)  # [N]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        img = Image.fromarray(np.pad(self.images[index], 2), "L").convert("RGB")
        return (self.transform(img) if self.transform else img), int(self.labels[index])

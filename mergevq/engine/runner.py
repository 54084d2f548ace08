"""What every training job shares: the Accelerator from the ``backend`` config, seeding, the data
loader with resumable, seeded sampling, and the keep-K draw.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def import_npu() -> None:
    """torch-npu is optional and imported only for backend=npu (installing it elsewhere breaks torch)."""
    try:
        import torch_npu  # noqa: F401
    except ImportError as error:
        raise RuntimeError(
            "backend=npu needs torch-npu and the Ascend CANN toolkit: pip install '.[npu]' on an Ascend "
            f"host, or choose backend=cpu|gpu ({error})"
        ) from error


def check_device(backend: Mapping[str, Any]) -> None:
    device = backend["device"]
    if device == "npu":
        import_npu()
    elif device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"backend={backend['name']} needs a CUDA device and none is visible; use backend=cpu")
    elif device not in ("cpu", "cuda", "npu"):
        raise ValueError(f"backend.device={device!r}: use cpu, cuda or npu")


def build_accelerator(backend: Mapping[str, Any], find_unused_parameters: bool = False):
    """An Accelerator for the backend; on CPU several processes need ACCELERATE_USE_CPU=1 + torchrun."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    check_device(backend)
    if backend.get("allow_tf32") and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)]
    if world_info()[1] > 1:
        timeout = timedelta(seconds=backend.get("timeout_s", 1800))
        handlers.append(InitProcessGroupKwargs(backend=backend.get("dist_backend"), timeout=timeout))
    return Accelerator(
        cpu=backend["device"] == "cpu",
        mixed_precision=backend.get("mixed_precision", "no"),
        kwargs_handlers=handlers,
    )


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and runs."""
    digest = hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededItems(Dataset):
    """Each item's random augmentation is seeded by (seed, epoch, index), independent of the worker,
    the process and of what ran before, so an interrupted run resumes bit for bit."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, self.epoch, index))
            return self.dataset[index]


class ShardSampler(Sampler[int]):
    """Epoch-seeded permutation, sharded across ranks (rank r takes every world-th index), optionally
    skipping the first ``skip`` indices of this rank's shard (resume mid-epoch)."""

    def __init__(self, size: int, rank: int, world: int, seed: int, epoch: int, skip: int = 0, shuffle: bool = True):
        per_rank = size // world
        if shuffle:
            order = torch.randperm(size, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))
        else:
            order = torch.arange(size)
        self.indices = order[rank : per_rank * world : world][skip:].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def epoch_loader(
    items: SeededItems, micro_batch: int, rank: int, world: int, epoch: int, skip_batches: int = 0, workers: int = 0
) -> DataLoader:
    """One epoch of micro-batches for this rank, starting after skip_batches (drop_last)."""
    items.epoch = epoch
    sampler = ShardSampler(len(items), rank, world, items.seed, epoch, skip=skip_batches * micro_batch)
    return DataLoader(items, batch_size=micro_batch, sampler=sampler, drop_last=True, num_workers=workers)


def step_batches(
    items: SeededItems, micro_batch: int, accum: int, rank: int, world: int, steps_per_epoch: int,
    current_step: Callable[[], int], workers: int = 0,
) -> Iterator[list]:
    """Lists of ``accum`` micro-batches, one list per optimizer step, starting where current_step()
    says (resume) and moving to the next epoch after steps_per_epoch steps (partial windows dropped)."""
    while True:
        epoch, in_epoch = divmod(current_step(), steps_per_epoch)
        loader = epoch_loader(items, micro_batch, rank, world, epoch, in_epoch * accum, workers)
        with torch.random.fork_rng(devices=[]):  # iter() draws a base seed from the global RNG: keep
            batches = iter(loader)               # dropout's stream independent of where a run resumed
        buffer = []
        for batch in batches:
            buffer.append(batch)
            if len(buffer) == accum:
                yield buffer
                buffer = []
                if current_step() % steps_per_epoch == 0:
                    break


def batches_per_epoch(size: int, micro_batch: int, world: int) -> int:
    return (size // world) // micro_batch


class KeepSampler:
    """Keep count K per optimizer step from a candidate distribution; a pure function of (seed, step),
    so every rank draws the same K without communication and resume needs no state."""

    def __init__(self, keeps: Sequence[int], probs: Sequence[float] | None, seed: int):
        if probs is None:
            probs = [1.0 / len(keeps)] * len(keeps)
        if len(probs) != len(keeps) or abs(sum(probs) - 1.0) > 1e-6:
            raise ValueError(f"keep probabilities {list(probs)} must match {list(keeps)} and sum to 1")
        self.keeps, self.probs, self.seed = list(keeps), np.asarray(probs, dtype=float), seed

    def __call__(self, step: int) -> int | None:
        rng = np.random.default_rng(mix_seed(self.seed, step, 7))
        keep = self.keeps[rng.choice(len(self.keeps), p=self.probs)]
        return None if keep is None else int(keep)  # None: no merging (tokenizer kind magvit2)


def world_info() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment, before any process group exists."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

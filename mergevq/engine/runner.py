"""What every training job shares: the Accelerator from the ``backend`` config, seeding, the data
loader with resumable, seeded sampling, and the non-finite step guard. The keep-K draw is
``mergevq.models.keep.KeepPolicy.draw``; the fault-injection test hook is ``mergevq.runs.faults``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..models.keep import mix_seed  # noqa: F401  (also mergevq.engine.runner.mix_seed, named in code caches)

log = logging.getLogger(__name__)


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


LAUNCHER_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"  # set by `accelerate launch` (--mixed_precision, config file)


def resolve_mixed_precision(hydra_value: str | None, launcher_value: str | None) -> str:
    """The precision the Accelerator uses: ``backend.mixed_precision`` (no | bf16 | fp16, or null) and
    the launcher's (``ACCELERATE_MIXED_PRECISION``, what ``accelerate launch --mixed_precision`` or its
    config file's ``mixed_precision:`` set; None when not launched by accelerate). null takes the
    launcher's (else "no"); two values that disagree are an error, not a silent override."""
    from ..errors import UserError

    hydra_value = None if hydra_value is None else str(hydra_value)
    if hydra_value is None:
        return launcher_value or "no"
    if launcher_value is not None and launcher_value != hydra_value:
        raise UserError(f"backend.mixed_precision={hydra_value} but the launcher asks for {launcher_value} "
                        f"({LAUNCHER_PRECISION_ENV}, from accelerate launch --mixed_precision or its config file): "
                        f"set backend.mixed_precision=null to use the launcher's, or make the two agree")
    return hydra_value


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
        mixed_precision=resolve_mixed_precision(backend.get("mixed_precision"), os.environ.get(LAUNCHER_PRECISION_ENV)),
        kwargs_handlers=handlers,
    )


def compile_in_place(modules: Sequence[torch.nn.Module], setting: bool | str) -> int:
    """``backend.compile``: false (eager) | true (torch.compile with inductor) | a torch.compile backend
    name. Compiles each module in place (``nn.Module.compile``): parameter and checkpoint names stay
    the same. Callers pass only parts whose shapes are fixed for a run. -> the number compiled."""
    if not setting:
        return 0
    for module in modules:
        module.compile(backend="inductor" if setting is True else str(setting))
    return len(modules)


def host_scalars(logs: Mapping[str, Any]) -> dict[str, Any]:
    """Logs whose values are scalar tensors (left on the device during the step, so the host never
    waits for the GPU mid-step) or plain numbers -> plain floats, with one device-to-host copy."""
    keys = [k for k, v in logs.items() if isinstance(v, torch.Tensor)]
    if not keys:
        return dict(logs)
    values = torch.stack([logs[k].detach().float().reshape(()) for k in keys]).tolist()
    return {**logs, **dict(zip(keys, values, strict=True))}


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class SeededItems(Dataset):
    """Each item's random augmentation is seeded by (seed, epoch, index), independent of the worker,
    the process and of what ran before, so an interrupted run resumes bit for bit."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also seed (and, not restored by
            # fork_rng(devices=[]), change) the accelerator generators, at ~2 ms per item
            torch.default_generator.manual_seed(mix_seed(self.seed, self.epoch, index))
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


def world_info() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment, before any process group exists."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# ---------------------------------------------------------------------------- non-finite steps


class StepGuard:
    """Skips optimizer steps whose loss or gradients are not finite; stops the run after
    ``max_bad_steps`` of them in a row.

    Per step: ``begin(*modules)`` snapshots the buffers a forward pass changes (BatchNorm statistics,
    LeCam anchors); ``watch(loss)`` records each loss before its backward (the backward still runs,
    so every rank joins DDP's gradient all-reduce); ``finite(parameters)``, after the last backward,
    takes one all-reduce of (non-finite losses, gradient norm), so every rank decides alike.
    On a bad step it restores the buffers, counts the skip and returns False: the caller then zeroes
    the gradients and leaves optimizers, schedules and EMA alone. The optimizer-step counter does not
    advance on a skip but the data moves on: a trainer's data position is ``step + skipped``, and
    ``skipped`` is checkpointed, so resume stays exact. With a GradScaler (fp16) gradients are not
    checked here: the scaler already skips steps with inf/NaN gradients and lowers its scale.
    """

    def __init__(self, accelerator, max_bad_steps: int):
        self.acc, self.max_bad_steps = accelerator, int(max_bad_steps)
        self.skipped = 0   # steps skipped in the whole run
        self.in_a_row = 0
        self._losses: list[torch.Tensor] = []
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def begin(self, *modules: torch.nn.Module) -> None:
        self._losses = []
        self._buffers = [(b, b.detach().clone()) for m in modules for b in m.buffers()]

    def watch(self, loss: torch.Tensor) -> torch.Tensor:
        self._losses.append(loss.detach().float().reshape(()))
        return loss

    def finite(self, parameters: Iterable[torch.Tensor]) -> bool:
        device = self.acc.device
        losses = torch.stack(self._losses) if self._losses else torch.zeros(1, device=device)
        grad_norm = torch.zeros((), device=device)
        if getattr(self.acc, "scaler", None) is None:
            grads = [p.grad for p in parameters if p.grad is not None]
            if grads:
                grad_norm = torch.nn.utils.get_total_norm(grads).float().to(device)
        bad_losses = (~torch.isfinite(losses)).sum().float().to(device)
        # mean over ranks: > 0 if any rank saw a bad loss; DDP gradients are equal, NaN/inf propagate
        bad, grad_norm = self.acc.reduce(torch.stack([bad_losses, grad_norm]), "mean").tolist()
        if bad == 0 and math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        with torch.no_grad():
            for buffer, saved in self._buffers:
                buffer.copy_(saved)
        self.skipped += 1
        self.in_a_row += 1
        values = f"losses {[round(v, 6) for v in losses.tolist()]}, gradient norm {grad_norm:.6g}"
        if self.in_a_row >= self.max_bad_steps:
            from ..errors import TrainingStopped

            raise TrainingStopped(
                f"{self.in_a_row} steps in a row had a non-finite loss or gradient (train.max_bad_steps="
                f"{self.max_bad_steps}); last: {values}: lower train.lr, set train.grad_clip or check the data"
            )
        log.warning("skipped a step with a non-finite loss or gradient (%s); %d skipped so far, %d in a row",
                    values, self.skipped, self.in_a_row)
        return False

"""The training loop both stages share: batch layout over processes, resumable step batches, the
non-finite step guard, logging with a progress bar, periodic checkpoints and resume."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from torch.optim.lr_scheduler import LambdaLR

from ..errors import DataError
from ..runs.loggers import logger_from_config
from ..runs.session import RunSession
from .runner import SeededItems, StepGuard, batches_per_epoch, step_batches


class Trainer:
    """Subclasses build their modules, call ``setup_loop`` and implement the hooks below."""

    name = "train"                 # progress-bar label
    throughput = "images_per_s"    # what ``units_per_step`` counts

    cfg: Mapping[str, Any]
    session: RunSession

    def setup_loop(self, accelerator, items: SeededItems, what: str) -> None:
        """Micro-batch size, steps per epoch and the step guard for ``items`` (``what`` names them in errors)."""
        train, world = self.cfg["train"], accelerator.num_processes
        self.acc, self.items = accelerator, items
        if train["global_batch_size"] % (world * train["grad_accum"]):
            raise ValueError(
                f"train.global_batch_size={train['global_batch_size']} is not divisible by {world} processes x "
                f"train.grad_accum={train['grad_accum']}: choose a multiple of {world * train['grad_accum']}"
            )
        self.micro_batch = train["global_batch_size"] // (world * train["grad_accum"])
        self.steps_per_epoch = batches_per_epoch(len(items), self.micro_batch, world) // train["grad_accum"]
        if self.steps_per_epoch == 0:
            raise DataError(f"{what} ({len(items)} items over {world} processes) is smaller than one global batch of "
                            f"train.global_batch_size={train['global_batch_size']}: lower it or add data")
        self.guard = StepGuard(accelerator, train.get("max_bad_steps", 5))
        self.step, self.logger = 0, None

    # ------------------------------------------------------------------ hooks
    def checkpoint_modules(self) -> dict[str, Any]:
        """name -> module (or EMA): saved as safetensors and loaded back in place on resume."""
        raise NotImplementedError

    def checkpoint_optimizers(self) -> dict[str, Any]:
        raise NotImplementedError

    def train_step(self, micro_batches: list[dict]) -> dict[str, float] | None:
        """One optimizer step -> its logs, or None when the guard skipped it."""
        raise NotImplementedError

    def units_per_step(self) -> int:
        return self.cfg["train"]["global_batch_size"]

    def progress_postfix(self, logs: Mapping[str, float]) -> dict[str, str]:
        return {}

    validates = False  # True: validate() every train.val_every steps and at the last step

    def validate(self) -> Any:
        """Held-out evaluation of a trainer with ``validates = True``."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after every optimizer step, before the checkpoint: validation when it is due."""
        train = self.cfg["train"]
        if self.validates and (self.step % train["val_every"] == 0 or self.step == train["max_steps"]):
            self.validate()

    # ------------------------------------------------------------------ state
    @property
    def batches_done(self) -> int:
        """Batches drawn so far: optimizer steps plus skipped (non-finite) steps; the data position."""
        return self.step + self.guard.skipped

    def step_batches(self):
        """Lists of grad_accum micro-batches, one per optimizer step, from the resume point."""
        train = self.cfg["train"]
        return step_batches(self.items, self.micro_batch, train["grad_accum"], self.acc.process_index,
                            self.acc.num_processes, self.steps_per_epoch, lambda: self.batches_done, train["num_workers"])

    def save(self) -> None:
        self.session.save_checkpoint(self.step, self.checkpoint_modules(), self.checkpoint_optimizers(),
                                     {"step": self.step, "skipped_steps": self.guard.skipped})

    def maybe_resume(self) -> None:
        optimizers = self.checkpoint_optimizers()
        # The schedules were built from this run's config: keep its base learning rates over the stored ones.
        fresh = {name: list(s.base_lrs) for name, s in optimizers.items() if isinstance(s, LambdaLR)}
        state = self.session.resume(self.cfg.get("resume", "auto"), self.checkpoint_modules(), optimizers)
        if state is not None:
            self.step = int(state["step"])
            self.guard.skipped = int(state["extra"].get("skipped_steps", 0))
            for name, base_lrs in fresh.items():
                apply_base_lrs(optimizers[name], base_lrs)


    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, float]:
        train, acc = self.cfg["train"], self.acc
        self.logger = logger_from_config(self.session.config, self.session.run_dir, acc.is_main_process)
        self.maybe_resume()
        progress = None
        if train.get("progress", True) and acc.is_main_process:
            from tqdm.auto import tqdm

            progress = tqdm(total=train["max_steps"], initial=self.step, desc=self.name, dynamic_ncols=True)
        start, units = time.perf_counter(), 0
        last: dict[str, float] = {}
        batches = self.step_batches()
        stop_at = min(train["max_steps"], train.get("interrupt_at") or train["max_steps"])
        while self.step < stop_at:
            logs = self.train_step(next(batches))
            units += self.units_per_step()
            if logs is None:  # skipped: no update, the step counter stays, the data moves on
                continue
            self.step += 1
            last = logs
            if self.step % train["log_every"] == 0 or self.step == train["max_steps"] or "collapse_alarm" in logs:
                logs[self.throughput] = units / max(time.perf_counter() - start, 1e-9)
                self.logger.log({f"train/{k}": v for k, v in logs.items()}, self.step)
                if progress is not None:
                    progress.set_postfix(self.progress_postfix(logs))
            if progress is not None:
                progress.update(1)
            self.after_step()
            if self.step % train["ckpt_every"] == 0 or self.step == train["max_steps"]:
                self.save()
        if progress is not None:
            progress.close()
        self.logger.summary({f"final/{k}": v for k, v in last.items()})
        self.logger.finish()
        return last


def apply_base_lrs(scheduler: LambdaLR, base_lrs: list[float]) -> None:
    """Set a restored schedule's base learning rates and its optimizer's current ones (base x multiplier
    at the restored step), so a resume with a new ``train.lr`` trains at it."""
    scheduler.base_lrs = list(base_lrs)
    for group, base, multiplier in zip(scheduler.optimizer.param_groups, base_lrs, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * multiplier(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]

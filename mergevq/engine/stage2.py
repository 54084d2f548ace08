"""Stage II: train a class-conditional AR generator (raster LlamaGen-style or MergeAR) on a code cache
written by ``python -m mergevq.tokenize``, through the same Accelerate session as stage I.

The learning-rate schedule counts optimizer steps (the official schedule mixes optimizer steps with
micro-batches, spec 7.2); weight decay applies to weights with >= 2 dims only.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..data.code_cache import CodeCache
from ..models.gpt import GPT, gpt_args
from ..models.mergear import MergeARConfig, keep_index, mergear_mask
from .ema import EMA
from .loggers import build_logger
from .runner import (
    SeededItems,
    StepGuard,
    batches_per_epoch,
    build_accelerator,
    fault_armed,
    fault_point,
    seed_everything,
    step_batches,
)
from .schedules import build_scheduler
from .session import RunSession

log = logging.getLogger(__name__)


def cache_contents(cache: CodeCache) -> dict[str, list[int]]:
    """The keep counts and class labels present in a code cache (read from the shards' small tensors)."""
    from safetensors import safe_open

    keeps, labels = set(), set()
    for shard in cache.meta["shards"]:
        with safe_open(str(cache.directory / shard["file"]), framework="pt") as handle:
            keeps.update(handle.get_tensor("keep").tolist())
            labels.update(handle.get_tensor("label").tolist())
    return {"keeps": sorted(int(k) for k in keeps), "classes": sorted(int(c) for c in labels)}


def generator_setup(cfg: Mapping[str, Any], meta: Mapping[str, Any]) -> tuple[GPT, MergeARConfig | None]:
    """Build the GPT for the cache's grid and codebook; MergeAR adds the [M] token over keep options.

    meta: the code cache's index plus ``keeps`` (see ``cache_contents``)."""
    ar = dict(cfg["ar"])
    size = ar.pop("size")
    bits = int(meta["codebook_bits"])
    factorized = ar.pop("factorized_bits", None)
    vocab = {"factorized_bits": tuple(factorized)} if factorized else {"vocab_size": 2**bits}
    if factorized and sum(factorized) != bits:
        raise ValueError(f"ar.factorized_bits={factorized} must sum to the tokenizer's {bits} bits")
    args = gpt_args(size, grid=tuple(meta["grid"]), num_classes=int(cfg["num_classes"]), **vocab, **ar)
    generator = cfg["generator"]
    if generator["kind"] == "raster":
        return GPT(args), None
    if generator["kind"] != "mergear":
        raise ValueError(f"generator.kind={generator['kind']!r}: use raster or mergear")
    keep_options = generator.get("keep_options") or meta.get("keep", {}).get("choices") or meta["keeps"]
    mergear = MergeARConfig(window=generator["window"], keep_options=tuple(keep_options),
                            duplicate_rule=generator.get("duplicate_rule", "adjacent"))
    return GPT(mergear.model_args(args)), mergear


class ARTrainingModel(nn.Module):
    """What DDP wraps: the generator's loss in one forward."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, codes, labels, keep=None, mask=None, label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
        return self.gpt.loss(codes, labels, keep, mask, label_smoothing=label_smoothing)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weights with >= 2 dims (matrices, embeddings), none on norms/biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class Stage2Trainer:
    def __init__(self, cfg: Mapping[str, Any], session: RunSession):
        self.cfg, self.session = cfg, session
        train = cfg["train"]
        seed_everything(cfg["seed"])
        self.cache = CodeCache(cfg["codes"])
        meta = {**self.cache.meta, **cache_contents(self.cache)}
        self.acc = acc = build_accelerator(cfg["backend"])
        session.attach(acc)
        world = acc.num_processes
        if train["global_batch_size"] % (world * train["grad_accum"]):
            raise ValueError(f"train.global_batch_size={train['global_batch_size']} is not divisible by "
                             f"{world} processes x train.grad_accum={train['grad_accum']}")
        self.micro_batch = train["global_batch_size"] // (world * train["grad_accum"])
        model, self.mergear = generator_setup(cfg, meta)
        optimizer = torch.optim.AdamW(decay_groups(model, train["weight_decay"]), lr=train["lr"], betas=tuple(train["betas"]))
        self.scheduler = build_scheduler(optimizer, total_steps=train["max_steps"], **dict(train["lr_schedule"]))
        self.model, self.optimizer = acc.prepare(ARTrainingModel(model), optimizer)
        self.ema = EMA(self.gpt, decay=train["ema"]["decay"]) if train["ema"]["enabled"] else None
        self.items = SeededItems(self.cache, cfg["seed"])
        self.steps_per_epoch = batches_per_epoch(len(self.items), self.micro_batch, world) // train["grad_accum"]
        if self.steps_per_epoch == 0:
            raise ValueError(f"the code cache ({len(self.items)} items) is smaller than one global batch")
        self.guard = StepGuard(acc, train.get("max_bad_steps", 5))
        self.step, self.logger = 0, None

    @property
    def gpt(self) -> GPT:
        return self.acc.unwrap_model(self.model).gpt

    def batch_inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Cache items -> GPT.loss inputs: targets are per-position codes; MergeAR adds [M] and its mask."""
        device = self.acc.device
        inputs = {"codes": batch["grid_codes"].to(device), "labels": batch["label"].to(device)}
        if self.mergear is not None:
            inputs["keep"] = keep_index(batch["keep"], self.mergear.keep_options).to(device)
            inputs["mask"] = mergear_mask(batch["groups"].to(device), self.mergear.window, prefix=2)
        return inputs

    def _batches(self):
        """Lists of grad_accum micro-batches, one per optimizer step, from the resume point."""
        return step_batches(self.items, self.micro_batch, self.cfg["train"]["grad_accum"], self.acc.process_index,
                            self.acc.num_processes, self.steps_per_epoch, lambda: self.batches_done,
                            self.cfg["train"]["num_workers"])

    @property
    def batches_done(self) -> int:
        """Batches drawn so far: optimizer steps plus skipped (non-finite) steps; the data position."""
        return self.step + self.guard.skipped

    def train_step(self, micro_batches: list[dict]) -> dict[str, float] | None:
        """One optimizer step -> its logs, or None when it was skipped (non-finite loss or gradient)."""
        acc, train = self.acc, self.cfg["train"]
        batch_number, rank = self.batches_done + 1, acc.process_index
        self.guard.begin()
        logs: dict[str, float] = {}
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with acc.no_sync(self.model) if not last else contextlib.nullcontext():
                with acc.autocast():
                    losses = self.model(**self.batch_inputs(batch), label_smoothing=train.get("label_smoothing", 0.0))
                if fault_armed("nan_loss", batch_number, rank):
                    losses["loss"] = losses["loss"] + float("nan")
                acc.backward(self.guard.watch(losses["loss"]) / len(micro_batches))
            for key, value in losses.items():
                logs[key] = logs.get(key, 0.0) + float(value.detach()) / len(micro_batches)
        fault_point("step", batch_number, rank)
        if not self.guard.finite(self.model.parameters()):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        if train.get("grad_clip"):
            logs["grad_norm"] = float(acc.clip_grad_norm_(self.model.parameters(), train["grad_clip"]))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.gpt)
        logs.update(lr=self.scheduler.get_last_lr()[0], skipped_steps=self.guard.skipped)
        return logs

    def save(self) -> None:
        models: dict[str, Any] = {"gpt": self.gpt}
        if self.ema is not None:
            models["gpt_ema"] = self.ema.state_dict()
        self.session.save_checkpoint(self.step, models, {"optimizer": self.optimizer.optimizer, "scheduler": self.scheduler},
                                     {"step": self.step, "skipped_steps": self.guard.skipped})

    def maybe_resume(self) -> None:
        models: dict[str, Any] = {"gpt": self.gpt}
        if self.ema is not None:
            models["gpt_ema"] = self.ema
        state = self.session.resume(self.cfg.get("resume", "auto"), models,
                                    {"optimizer": self.optimizer.optimizer, "scheduler": self.scheduler})
        if state is not None:
            self.step = int(state["step"])
            self.guard.skipped = int(state["extra"].get("skipped_steps", 0))

    def fit(self) -> dict[str, float]:
        cfg, train, acc = self.cfg, self.cfg["train"], self.acc
        options = {k: v for k, v in cfg["logger"].items() if k != "kind"}
        if cfg["logger"]["kind"] == "wandb":
            options["config"] = self.session.config
        self.logger = build_logger(cfg["logger"]["kind"], self.session.run_dir, acc.is_main_process, **options)
        log.info("generator %s, %d parameters, world size %d", cfg["generator"]["kind"],
                 sum(p.numel() for p in self.gpt.parameters()), acc.num_processes)
        self.maybe_resume()
        progress = None
        if train.get("progress", True) and acc.is_main_process:
            from tqdm.auto import tqdm

            progress = tqdm(total=train["max_steps"], initial=self.step, desc=f"stage II ({cfg['generator']['kind']})",
                            dynamic_ncols=True)
        start, tokens = time.perf_counter(), 0
        last: dict[str, float] = {}
        batches = self._batches()
        stop_at = min(train["max_steps"], train.get("interrupt_at") or train["max_steps"])
        while self.step < stop_at:
            logs = self.train_step(next(batches))
            tokens += train["global_batch_size"] * self.gpt.args.seq_len
            if logs is None:  # skipped: no update, the step counter stays, the data moves on
                continue
            self.step += 1
            last = logs
            if self.step % train["log_every"] == 0 or self.step == train["max_steps"]:
                logs["train_tokens_per_s"] = tokens / max(time.perf_counter() - start, 1e-9)
                self.logger.log({f"train/{k}": v for k, v in logs.items()}, self.step)
                if progress is not None:
                    progress.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{logs['train_tokens_per_s']:.0f}")
            if progress is not None:
                progress.update(1)
            if self.step % train["ckpt_every"] == 0 or self.step == train["max_steps"]:
                self.save()
        if progress is not None:
            progress.close()
        self.logger.summary({f"final/{k}": v for k, v in last.items()})
        self.logger.finish()
        return last


def train_ar(cfg: Mapping[str, Any], session: RunSession) -> dict[str, float]:
    return Stage2Trainer(cfg, session).fit()

"""Stage II: train a class-conditional AR generator (raster LlamaGen-style or MergeAR) on a code cache
written by ``python -m mergevq.entries.pretokenize``, through the same Accelerate session as stage I.

The learning-rate schedule counts optimizer steps (the official schedule mixes optimizer steps with
micro-batches, spec 7.2); weight decay applies to weights with >= 2 dims only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..data.code_cache import CodeCache, cache_contents, training_items
from ..models.blocks import set_activation_checkpointing
from ..models.generator_factory import build_generator
from ..models.gpt import GPT
from ..models.mergear import mergear_inputs
from ..runs.faults import fault_armed, fault_point
from ..runs.session import RunSession
from .ema import EMA
from .runner import SeededItems, build_accelerator, compile_in_place, host_scalars, seed_everything
from .schedules import build_scheduler
from .trainer import Trainer

log = logging.getLogger(__name__)


def check_labels(labels: list[int], num_classes: int, where: str) -> None:
    """Every class id in [0, num_classes); id num_classes is the CFG null class, so it may not be a label."""
    bad = [c for c in labels if not 0 <= c < num_classes]
    if bad:
        from ..errors import DataError

        raise DataError(f"{where} holds class ids {bad[:5]} outside [0, num_classes={num_classes}) (id {num_classes} "
                        f"is the CFG null class): set num_classes={max(labels) + 1} or more")


class ARTrainingModel(nn.Module):
    """What DDP wraps: the generator's loss in one forward."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, codes, labels, keep=None, mask=None, label_smoothing: float = 0.0, **extra) -> dict[str, torch.Tensor]:
        return self.gpt.loss(codes, labels, keep, mask, label_smoothing=label_smoothing, **extra)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weights with >= 2 dims (matrices, embeddings), none on norms/biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class Stage2Trainer(Trainer):
    """The generator, its optimizer and optional EMA over a code cache; ``fit()`` runs to train.max_steps."""

    throughput = "train_tokens_per_s"

    def __init__(self, cfg: Mapping[str, Any], session: RunSession):
        self.cfg, self.session = cfg, session
        train = cfg["train"]
        seed_everything(cfg["seed"])
        self.cache = CodeCache(cfg["codes"])
        contents = cache_contents(self.cache)
        check_labels(contents["classes"], int(cfg["num_classes"]), f"the code cache {cfg['codes']}")
        keeps = cfg.get("codes_keeps")
        if keeps is not None:  # train on the items at these K only (the cache may hold others)
            contents["keeps"] = [k for k in contents["keeps"] if k in set(keeps)]
        acc = build_accelerator(cfg["backend"])
        session.attach(acc)
        self.setup_loop(acc, SeededItems(training_items(self.cache, keeps), cfg["seed"]), "the code cache")
        model, self.mergear = build_generator(cfg, {**self.cache.meta, **contents})
        set_activation_checkpointing(model, bool(train.get("activation_checkpointing", False)))
        compile_in_place([model], cfg["backend"].get("compile", False))
        self.name = f"stage II ({cfg['generator']['kind']})"
        optimizer = torch.optim.AdamW(decay_groups(model, train["weight_decay"]), lr=train["lr"], betas=tuple(train["betas"]))
        self.scheduler = build_scheduler(optimizer, total_steps=train["max_steps"], **dict(train["lr_schedule"]))
        self.model, self.optimizer = acc.prepare(ARTrainingModel(model), optimizer)
        self.ema = EMA(self.gpt, decay=train["ema"]["decay"]) if train["ema"]["enabled"] else None
        log.info("generator %s, %d parameters, world size %d", cfg["generator"]["kind"],
                 sum(p.numel() for p in self.gpt.parameters()), acc.num_processes)

    @property
    def gpt(self) -> GPT:
        return self.acc.unwrap_model(self.model).gpt

    def checkpoint_modules(self) -> dict[str, Any]:
        return {"gpt": self.gpt, **({"gpt_ema": self.ema} if self.ema is not None else {})}

    def checkpoint_optimizers(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.optimizer, "scheduler": self.scheduler}

    def units_per_step(self) -> int:
        return self.cfg["train"]["global_batch_size"] * self.gpt.args.seq_len

    def progress_postfix(self, logs: Mapping[str, float]) -> dict[str, str]:
        return {"loss": f"{logs['loss']:.4f}", "tok_s": f"{logs[self.throughput]:.0f}"}

    def batch_inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Cache items -> GPT.loss inputs: targets are per-position codes; MergeAR adds [M], its mask
        and the copy targets (``mergear_inputs``)."""
        device = self.acc.device
        if self.cfg["generator"]["kind"] == "randar":  # K codes + positions in a fresh random order
            from ..data.randar_batch import randar_batch

            inputs = randar_batch(batch["grid_codes"].to(device), batch["groups"].to(device), batch["keep"].to(device))
            return {**inputs, "labels": batch["label"].to(device)}
        inputs = {"codes": batch["grid_codes"].to(device), "labels": batch["label"].to(device)}
        if self.mergear is not None:
            inputs.update(mergear_inputs(inputs["codes"], batch["groups"].to(device), batch["keep"].to(device),
                                         self.mergear))
        return inputs

    def train_step(self, micro_batches: list[dict]) -> dict[str, float] | None:
        """One optimizer step -> its logs, or None when it was skipped (non-finite loss or gradient)."""
        acc, train = self.acc, self.cfg["train"]
        batch_number, rank = self.batches_done + 1, acc.process_index
        self.guard.begin()
        logs: dict[str, torch.Tensor | float] = {}
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with acc.no_sync(self.model) if not last else contextlib.nullcontext():
                with acc.autocast():
                    losses = self.model(**self.batch_inputs(batch), label_smoothing=train.get("label_smoothing", 0.0))
                if fault_armed("nan_loss", batch_number, rank):
                    losses["loss"] = losses["loss"] + float("nan")
                acc.backward(self.guard.watch(losses["loss"]) / len(micro_batches))
            for key, value in losses.items():
                logs[key] = logs.get(key, 0.0) + value.detach() / len(micro_batches)
        fault_point("step", batch_number, rank)
        if not self.guard.finite(self.model.parameters()):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        if train.get("grad_clip"):
            logs["grad_norm"] = acc.clip_grad_norm_(self.model.parameters(), train["grad_clip"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.gpt)
        return {**host_scalars(logs), "lr": self.scheduler.get_last_lr()[0], "skipped_steps": self.guard.skipped}


def train_ar(cfg: Mapping[str, Any], session: RunSession) -> dict[str, float]:
    return Stage2Trainer(cfg, session).fit()

"""Source Recovery alone on a frozen tokenizer (``recovery.standalone=true``, paper Table A2).

The tokenizer of ``recovery.tokenizer`` (its ``recovery.tokenizer_weights``) is loaded, frozen (eval
mode, no gradients) and only its Source Recovery module trains: the one it has, or a fresh one from the
``recovery`` config. The optimizer is ``recovery.optimizer`` (AdamW); batches, steps, K draw, logging,
checkpoints and resume are the shared ``Trainer``'s. A checkpoint holds the whole tokenizer under both
``tokenizer`` and ``tokenizer_ema`` (the same weights: there is no EMA of the recovery), so evaluate,
pretokenize and sample (``tokenizer=<this run>``) load the run like any tokenizer run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..models.factory import build_recovery
from ..models.recovery import recovery_loss, recovery_targets
from ..runs.html_report import write_run_report
from ..runs.restore import load_trained_tokenizer
from ..runs.session import RunSession
from .runner import SeededItems, build_accelerator, host_scalars, seed_everything
from .schedules import build_scheduler
from .stage1 import build_data, write_table
from .trainer import Trainer

log = logging.getLogger(__name__)


def frozen_tokenizer(recovery: Mapping[str, Any]) -> nn.Module:
    """The tokenizer ``recovery.tokenizer`` names, frozen, with a trainable Source Recovery module (its
    own, or a fresh one of the configured shape)."""
    tokenizer, config, checkpoint = load_trained_tokenizer(recovery["tokenizer"], recovery.get("tokenizer_weights", "ema"))
    tokenizer.requires_grad_(False).eval()
    if tokenizer.recovery is None:
        num_positions, z_channels = tokenizer.keep_policy.num_positions, config["tokenizer"]["z_channels"]
        tokenizer.recovery = build_recovery(recovery, num_positions, z_channels)
        log.info("Source Recovery: a fresh module on the frozen tokenizer of %s", checkpoint)
    else:
        log.info("Source Recovery: training the module of %s further, its tokenizer frozen", checkpoint)
    tokenizer.recovery.requires_grad_(True).train()
    return tokenizer


class RecoveryTrainer(Trainer):
    """Only ``tokenizer.recovery`` trains; ``fit()`` runs to train.max_steps."""

    name = "source recovery"
    validates = True

    def __init__(self, cfg: Mapping[str, Any], session: RunSession):
        self.cfg, self.session = cfg, session
        train, recovery = cfg["train"], cfg["recovery"]
        seed_everything(cfg["seed"])
        self.frozen = frozen_tokenizer(recovery)
        self.keep_policy = self.frozen.keep_policy.for_training(train.get("keep_candidates"), train.get("keep_probs"))
        self.val_keeps = list(train.get("val_keeps") or self.keep_policy.candidates)
        acc = build_accelerator(cfg["backend"])
        session.attach(acc)
        self.setup_loop(acc, SeededItems(build_data(cfg, "train"), cfg["seed"]), "the training set")
        opt = recovery["optimizer"]
        optimizer = torch.optim.AdamW(self.frozen.recovery.parameters(), lr=opt["lr"], betas=tuple(opt["betas"]),
                                      weight_decay=opt["weight_decay"])
        self.sched = build_scheduler(optimizer, total_steps=train["max_steps"], **dict(opt["lr_schedule"]))
        self.frozen.to(acc.device)
        self.model, self.opt = acc.prepare(self.frozen.recovery, optimizer)
        self.val_data = build_data(cfg, "val")

    def checkpoint_modules(self) -> dict[str, Any]:
        return {"tokenizer": self.frozen, "tokenizer_ema": self.frozen}

    def checkpoint_optimizers(self) -> dict[str, Any]:
        return {"opt_recovery": self.opt.optimizer, "sched_recovery": self.sched}

    def progress_postfix(self, logs: Mapping[str, float]) -> dict[str, str]:
        return {"loss": f"{logs['recovery']:.4f}", "acc": f"{logs['recovery_acc']:.3f}", "K": str(int(logs["keep"]))}

    def train_step(self, micro_batches: list[dict]) -> dict[str, float] | None:
        acc, train = self.acc, self.cfg["train"]
        keep = self.keep_policy.draw(self.cfg["seed"], self.step)
        self.guard.begin()
        logs: dict[str, Any] = {"recovery": 0.0, "recovery_acc": 0.0}
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with acc.autocast():
                z_q, starts, groups = recovery_targets(self.frozen, batch["image"].to(acc.device), keep)
            with acc.no_sync(self.model) if not last else contextlib.nullcontext():
                with acc.autocast():
                    logits = self.model(z_q, starts)
                    loss = recovery_loss(logits.float(), groups)
                acc.backward(self.guard.watch(loss) / len(micro_batches))
            logs["recovery"] += loss.detach() / len(micro_batches)
            logs["recovery_acc"] += (logits.argmax(-1) == groups).float().mean().detach() / len(micro_batches)
        if not self.guard.finite(self.model.parameters()):
            self.opt.zero_grad(set_to_none=True)
            return None
        if train.get("grad_clip"):
            logs["grad_norm"] = acc.clip_grad_norm_(self.model.parameters(), train["grad_clip"])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        logs = host_scalars(logs)
        logs.update(keep=keep or 0, lr=self.sched.get_last_lr()[0], skipped_steps=self.guard.skipped)
        return logs

    @torch.no_grad()
    def validate(self) -> list[dict[str, float]]:
        """Rank 0: per pinned K on the held-out split, the recovery loss and the accuracy of the groups
        sampling would use (``predict_groups``: a canonical partition) -> val_per_k.csv, val/k{K}/..."""
        acc, rows = self.acc, []
        if acc.is_main_process:
            module = self.frozen.recovery.eval()
            loader = torch.utils.data.DataLoader(self.val_data, batch_size=max(self.micro_batch, 8), shuffle=False)
            batches = [b["image"].to(acc.device) for _, b in zip(range(self.cfg["train"]["val_batches"]), loader)]
            for keep in self.val_keeps:
                losses, hits = [], []
                for x in batches:
                    z_q, starts, groups = recovery_targets(self.frozen, x, keep)
                    losses.append(float(recovery_loss(module(z_q, starts), groups)))
                    hits.append((module.predict_groups(z_q, starts) == groups).float().mean().item())
                rows.append({"keep": keep or 0, "recovery_loss": sum(losses) / len(losses),
                             "recovery_accuracy": sum(hits) / len(hits)})
            module.train()
            for row in rows:
                self.logger.log({f"val/k{int(row['keep'])}/{k}": v for k, v in row.items() if k != "keep"}, self.step)
            write_table(self.session.run_dir / "val_per_k.csv", rows)
            write_run_report(self.session.run_dir, self.step, f"Source Recovery on a frozen {self.cfg['tokenizer']['name']} tokenizer")
        acc.wait_for_everyone()
        return rows


def train_recovery(cfg: Mapping[str, Any], session: RunSession) -> dict[str, float]:
    return RecoveryTrainer(cfg, session).fit()

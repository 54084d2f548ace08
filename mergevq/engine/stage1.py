"""Stage I: train a tokenizer with two optimizers (tokenizer, discriminator) under Accelerate.

The generator step freezes the discriminator (no gradient leaks into D under accumulation, unlike
the official code, spec 6.4); K is drawn per optimizer step from the candidate distribution with
a seed shared by every rank; validation pins K explicitly; the schedule counts optimizer steps.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.utils import save_image

from ..data import build_dataset
from ..eval.recon import psnr_per_image
from ..losses.criterion import Stage1Criterion, build_teacher
from ..models.blocks import set_activation_checkpointing
from ..models.discriminator import PatchGANDiscriminator
from ..models.factory import build_tokenizer
from ..models.tokens import square_grid
from ..runs.atomic import atomic_write_csv
from ..runs.faults import fault_armed, fault_point
from ..runs.html_report import write_run_report
from ..runs.session import RunSession
from ..viz import merge_map
from .ema import EMA, updates_per_step
from .runner import SeededItems, build_accelerator, compile_in_place, host_scalars, seed_everything
from .schedules import build_scheduler
from .trainer import Trainer

log = logging.getLogger(__name__)


class Stage1Model(nn.Module):
    """What DDP wraps: the reconstruction pass and the alignment (CLS) branch in one forward."""

    def __init__(self, tokenizer: nn.Module):
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, x: torch.Tensor, keep: int | None, view: torch.Tensor | None = None, num_positions: int | None = None):
        xrec, aux = self.tokenizer(x, keep)
        if view is not None:
            aux["align_logits"] = self.tokenizer.align_logits(view, keep, num_positions)
        return xrec, aux


def collapse_check(codes: torch.Tensor, batch_entropy: float, alarm: Mapping[str, Any]) -> dict[str, float]:
    """Code usage (distinct codes / codes in the step's batch) and the quantizer's batch entropy
    (nats) against ``train.collapse_alarm``'s thresholds -> {code_usage, collapse_alarm (1: fired)}."""
    usage = codes.unique().numel() / max(codes.numel(), 1)
    fired = usage < alarm["min_usage"] or batch_entropy < alarm["min_batch_entropy"]
    return {"code_usage": usage, "collapse_alarm": float(fired)}


def _views(cfg: Mapping[str, Any]) -> tuple[str, ...]:
    return ("image", "image_aug_w", "image_aug_s") if cfg["teacher"]["kind"] != "none" else ("image",)


def build_data(cfg: Mapping[str, Any], split: str):
    data = cfg["data"]
    kwargs = dict(data.get("train_kwargs" if split == "train" else "val_kwargs") or {})
    return build_dataset(
        data["name"], split, root=data.get("root"), cache_dir=data.get("cache_dir"), size=data["size"],
        align_size=data["align_size"], views=_views(cfg) if split == "train" else ("image",), **kwargs,
    )


class Stage1Trainer(Trainer):
    """Tokenizer, discriminator, their optimizers and EMA; ``fit()`` runs to train.max_steps."""

    name = "stage I"
    validates = True

    def __init__(self, cfg: Mapping[str, Any], session: RunSession):
        self.cfg, self.session = cfg, session
        train = cfg["train"]
        seed_everything(cfg["seed"])
        tokenizer = build_tokenizer(cfg["tokenizer"], cfg.get("variant"), cfg["quantizer"], cfg.get("recovery"))
        self.is_mergevq = cfg["tokenizer"].get("kind", "mergevq") == "mergevq"
        self.keep_policy = tokenizer.keep_policy.for_training(train.get("keep_candidates"), train.get("keep_probs"))
        self.num_positions = self.keep_policy.num_positions
        self.val_keeps = list(train.get("val_keeps") or self.keep_policy.candidates)

        teacher_kind = cfg["teacher"]["kind"]
        has_align_head = self.is_mergevq and tokenizer.encoder.align_head is not None
        if teacher_kind != "none" and not has_align_head:
            raise ValueError("teacher.kind is set but the tokenizer has no alignment head (variant.align_head=none)")
        acc = build_accelerator(cfg["backend"], find_unused_parameters=has_align_head and teacher_kind == "none")
        session.attach(acc)
        self.setup_loop(acc, SeededItems(build_data(cfg, "train"), cfg["seed"]), "the training set")
        self.teacher = build_teacher(cfg["teacher"], cfg["tokenizer"].get("align_dim", 768), cfg["data"]["align_size"])
        self.criterion = Stage1Criterion(cfg["loss"], self.teacher is not None, cfg.get("recovery", {}).get("enabled", False))
        disc_cfg = cfg["loss"].get("discriminator", {})
        self.use_gan = cfg["loss"]["adversarial_weight"] > 0
        discriminator = PatchGANDiscriminator(ndf=disc_cfg.get("ndf", 64), n_layers=disc_cfg.get("n_layers", 3))
        set_activation_checkpointing(tokenizer, bool(train.get("activation_checkpointing", False)))
        if cfg["backend"].get("channels_last", False):  # conv weights NHWC: their outputs follow
            tokenizer.to(memory_format=torch.channels_last)
            discriminator.to(memory_format=torch.channels_last)
        # the merging transformer changes its token count with K every step: it stays eager
        static = [tokenizer.encoder.stem if self.is_mergevq else tokenizer.encoder, tokenizer.decoder, discriminator]
        compile_in_place(static, cfg["backend"].get("compile", False))

        opt_g = torch.optim.Adam(tokenizer.parameters(), lr=train["lr"], betas=tuple(train["betas"]), weight_decay=train["weight_decay"])
        opt_d = torch.optim.Adam(discriminator.parameters(), lr=train["disc_lr"], betas=tuple(train["betas"]), weight_decay=train["weight_decay"])
        schedule = dict(train["lr_schedule"])
        self.sched_g = build_scheduler(opt_g, total_steps=train["max_steps"], **schedule)
        self.sched_d = build_scheduler(opt_d, total_steps=train["max_steps"], **schedule)
        self.model, self.disc, self.opt_g, self.opt_d = acc.prepare(Stage1Model(tokenizer), discriminator, opt_g, opt_d)
        device = acc.device
        self.criterion.to(device)
        if self.teacher is not None:
            self.teacher.to(device)
        self.ema = EMA(self.tokenizer, decay=train["ema"]["decay"]) if train["ema"]["enabled"] else None
        self.ema_repeats = updates_per_step(train["ema"].get("cadence", "micro_batch"), train["grad_accum"])

        self.val_data = build_data(cfg, "val")

    # ------------------------------------------------------------------ state
    @property
    def tokenizer(self) -> nn.Module:
        return self.acc.unwrap_model(self.model).tokenizer

    def checkpoint_modules(self) -> dict[str, Any]:
        modules = {"tokenizer": self.tokenizer, "discriminator": self.acc.unwrap_model(self.disc), "lecam": self.criterion.lecam}
        if self.ema is not None:
            modules["tokenizer_ema"] = self.ema
        return modules

    def checkpoint_optimizers(self) -> dict[str, Any]:
        return {"opt_g": self.opt_g.optimizer, "opt_d": self.opt_d.optimizer, "sched_g": self.sched_g, "sched_d": self.sched_d}

    def progress_postfix(self, logs: Mapping[str, float]) -> dict[str, str]:
        return {"loss": f"{logs['total']:.4f}", "K": str(int(logs["keep"])), "img_s": f"{logs['images_per_s']:.1f}"}

    # ------------------------------------------------------------------ training
    def train_step(self, micro_batches: list[dict]) -> dict[str, float] | None:
        """One optimizer step -> its logs, or None when it was skipped (non-finite loss or gradient)."""
        acc, train = self.acc, self.cfg["train"]
        keep = self.keep_policy.draw(self.cfg["seed"], self.step)
        gan_on = self.use_gan and self.step >= self.cfg["loss"]["disc_start"]
        d_raw = acc.unwrap_model(self.disc)
        batch_number, rank = self.batches_done + 1, acc.process_index
        alarm = train.get("collapse_alarm") or {}
        watch_codes = bool(alarm.get("every")) and (self.step + 1) % alarm["every"] == 0
        codes: list[torch.Tensor] = []
        self.guard.begin(d_raw, self.criterion.lecam)
        logs: dict[str, torch.Tensor | float] = {}
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            x = batch["image"].to(acc.device)
            with acc.no_sync(self.model) if not last else contextlib.nullcontext():
                with acc.autocast():
                    teacher_logits = None
                    view = None
                    if self.teacher is not None:
                        teacher_logits = self.teacher(batch["image_aug_w"].to(acc.device))
                        view = batch["image_aug_s"].to(acc.device)
                    xrec, aux = self.model(x, keep, view, self.num_positions)
                    loss_g, g_logs = self.criterion.generator(x, xrec, aux, d_raw if gan_on else None, teacher_logits)
                if fault_armed("nan_loss", batch_number, rank):
                    loss_g = loss_g + float("nan")
                acc.backward(self.guard.watch(loss_g) / len(micro_batches))
            if watch_codes:
                codes.append(aux["codes"].detach().flatten())
            if gan_on:
                with acc.no_sync(self.disc) if not last else contextlib.nullcontext():
                    with acc.autocast():
                        loss_d, d_logs = self.criterion.discriminator(self.disc, x, xrec, reduce=lambda t: acc.reduce(t, "mean"))
                    acc.backward(self.guard.watch(loss_d) / len(micro_batches))
                g_logs.update(d_logs)
            for key, value in g_logs.items():
                logs[key] = logs.get(key, 0.0) + value / len(micro_batches)
        fault_point("step", batch_number, rank)
        parameters = [*self.model.parameters(), *(self.disc.parameters() if gan_on else ())]
        if not self.guard.finite(parameters):
            self.opt_g.zero_grad(set_to_none=True)
            self.opt_d.zero_grad(set_to_none=True)
            return None
        if train.get("grad_clip"):
            logs["grad_norm"] = acc.clip_grad_norm_(self.model.parameters(), train["grad_clip"])
            if gan_on:
                acc.clip_grad_norm_(self.disc.parameters(), train["grad_clip"])
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        self.opt_d.step()  # a no-op before disc_start (no gradients); keeps both schedules in step
        self.opt_d.zero_grad(set_to_none=True)
        self.sched_g.step()
        self.sched_d.step()
        if self.ema is not None:
            self.ema.update(self.tokenizer, repeats=self.ema_repeats)
        logs = host_scalars(logs)
        logs.update(keep=keep or 0, lr=self.sched_g.get_last_lr()[0], skipped_steps=self.guard.skipped)
        if codes:
            logs.update(collapse_check(torch.cat(codes), logs["batch_entropy"], alarm))
            if logs["collapse_alarm"] and acc.is_main_process:
                log.warning("codebook collapse alarm at step %d: code usage %.4f (train.collapse_alarm.min_usage=%g), "
                            "batch entropy %.4f nats (train.collapse_alarm.min_batch_entropy=%g)", self.step + 1,
                            logs["code_usage"], alarm["min_usage"], logs["batch_entropy"], alarm["min_batch_entropy"])
        return logs

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> list[dict[str, float]]:
        """Rank 0: reconstruction metrics per pinned K on the held-out split (EMA weights when kept);
        writes a grid (originals, then one row per K) and a per-K table into the run directory."""
        acc = self.acc
        rows: list[dict[str, float]] = []
        if acc.is_main_process:
            tokenizer = self.tokenizer
            context = self.ema.swapped(tokenizer) if self.ema is not None else contextlib.nullcontext()
            was_training = tokenizer.training
            with context:
                tokenizer.eval()
                rows = self._validation_rows(tokenizer)
            tokenizer.train(was_training)
            fault_point("validation", self.step, acc.process_index)
            for row in rows:
                k = int(row["keep"])
                self.logger.log({f"val/k{k}/{key}": v for key, v in row.items() if key != "keep"}, self.step)
            columns = list(rows[0])
            self.logger.log_table("val/per_k", columns, [[row[c] for c in columns] for row in rows], self.step)
            write_table(self.session.run_dir / "val_per_k.csv", rows)
            write_run_report(self.session.run_dir, self.step, f"stage I: {self.cfg['tokenizer']['name']} tokenizer")
        acc.wait_for_everyone()
        return rows

    def _validation_rows(self, tokenizer: nn.Module) -> list[dict[str, float]]:
        loader = torch.utils.data.DataLoader(self.val_data, batch_size=max(self.micro_batch, 8), shuffle=False)
        batches = [b["image"] for _, b in zip(range(self.cfg["train"]["val_batches"]), loader)]
        device = self.acc.device
        grid, maps, rows = [batches[0][:8] * 0.5 + 0.5], [], []
        for keep in self.val_keeps:
            psnr, rec, lpips, codes = [], [], [], []
            for x in batches:
                x = x.to(device)
                xrec, aux = tokenizer(x, keep)
                psnr.append(psnr_per_image(x, xrec))
                rec.append((x - xrec).abs().flatten(1).mean(1))
                if self.criterion.lpips is not None:
                    lpips.append(self.criterion.lpips(x, xrec.clamp(-1, 1)))
                codes.append(aux["codes"].flatten())
            all_codes = torch.cat(codes)
            row = {
                "keep": keep or 0,
                "psnr": float(torch.cat(psnr).mean()),
                "l1": float(torch.cat(rec).mean()),
                "code_usage": float(all_codes.unique().numel() / all_codes.numel()),
            }
            if lpips:
                row["lpips"] = float(torch.cat(lpips).mean())
            rows.append(row)
            xrec, aux = tokenizer(batches[0][:8].to(device), keep)
            grid.append(xrec.clamp(-1, 1).cpu() * 0.5 + 0.5)
            shape = square_grid(aux["groups"].shape[1])
            maps.append(torch.stack([merge_map(x, g, shape) for x, g in zip(batches[0][:8], aux["groups"].cpu())]))
        images = self.session.run_dir / "images"
        images.mkdir(exist_ok=True)
        for name, panel_rows in (("reconstructions", grid), ("merge_maps", [grid[0], *maps])):
            path = images / f"{name}_step{self.step:08d}.png"
            save_image(torch.cat(panel_rows), path, nrow=len(grid[0]))
            self.logger.log_images(f"val/{name}", path, self.step, caption=f"originals, then K={self.val_keeps}")
        return rows


def write_table(path: Path, rows: list[dict[str, float]]) -> None:
    """Per-K rows as CSV (atomic replace)."""
    atomic_write_csv(path, list(rows[0]), rows)


def train_tokenizer(cfg: Mapping[str, Any], session: RunSession) -> dict[str, float]:
    return Stage1Trainer(cfg, session).fit()

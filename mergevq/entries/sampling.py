"""Class-conditional sampling of a trained generator, decoding with its tokenizer, and logging the samples."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.utils import save_image
from tqdm.auto import tqdm

from ..models.generate import generate
from ..models.mergear import keep_index
from ..models.randar import RandAR
from ..runs.atomic import atomic_write_text
from ..runs.loggers import RunLogger
from ..runs.restore import load_trained_generator, load_trained_tokenizer

log = logging.getLogger(__name__)


def class_list(cfg: Mapping[str, Any], meta: Mapping[str, Any]) -> list[int]:
    classes = cfg.get("classes") or meta.get("classes")
    if not classes:
        raise ValueError("no class list: set classes=[...] (the code cache does not record its classes)")
    return [int(c) for c in classes]


def sample_images(cfg: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """-> {images uint8 [N, H, W, 3], labels [N], codes [N, L], stats, settings}."""
    from .config_check import check_sample_run

    check_sample_run(cfg)  # option ranges, checkpoint kind, class ids and keep: before loading anything
    model, mergear, run_cfg, meta, checkpoint = load_trained_generator(cfg["ckpt"], cfg["weights"])
    recorded = meta["tokenizer"]
    tokenizer, _, tokenizer_ckpt = load_trained_tokenizer(cfg.get("tokenizer") or recorded["checkpoint"],
                                                          cfg.get("tokenizer_weights") or recorded.get("weights", "ema"))
    model.to(device)
    tokenizer.to(device)
    labels = torch.tensor([c for c in class_list(cfg, meta) for _ in range(cfg["per_class"])], dtype=torch.long)
    settings = {k: cfg[k] for k in ("cfg_scale", "cfg_interval", "temperature", "top_k", "top_p", "seed", "per_class", "batch_size")}
    options: dict[str, Any] = {}
    if mergear is not None:
        keep, keep_source = default_keep(cfg.get("keep"), mergear.keep_options, meta)
        budget = cfg.get("budget") or "strict"
        options = dict(mergear=True, keep=int(keep_index(keep, mergear.keep_options)),
                       window=cfg.get("window") or mergear.window,
                       duplicate_rule=cfg.get("duplicate_rule") or mergear.duplicate_rule,
                       budget=budget, budget_keep=keep)
        settings.update(keep=keep, keep_source=keep_source, window=options["window"], budget=budget,
                        duplicate_rule=options["duplicate_rule"], copy_head=mergear.copy_head)
        log.info("MergeAR: K=%d (%s), budget %s, window %d%s", keep, keep_source, budget, options["window"],
                 ", copy head" if mergear.copy_head else "")
    route = None
    if isinstance(model, RandAR):  # K codes + positions, then groups
        from .sampling_randar import RandARRoute

        route = RandARRoute(cfg, model, tokenizer, run_cfg, meta)
        settings.update(route.settings())
    images, codes, row_peaks, row_groups, tokens, seconds, steps = [], [], [], [], 0, 0.0, 0
    progress = tqdm(total=len(labels), desc="sample", unit="img", dynamic_ncols=True,
                    disable=not cfg.get("progress", True))
    for start in range(0, len(labels), cfg["batch_size"]):
        batch = labels[start : start + cfg["batch_size"]].to(device)
        seed = cfg["seed"] * 1_000_003 + start  # every batch seeded: a resumed or sharded run draws the same
        sampling = dict(cfg_scale=cfg["cfg_scale"], cfg_interval=cfg.get("cfg_interval"),
                        temperature=cfg["temperature"], top_k=cfg["top_k"], top_p=cfg["top_p"], seed=seed)
        if route is not None:
            out, stats = route.generate(batch, **sampling)
        else:
            out, stats = generate(model, batch, **sampling, **options)
        with torch.no_grad():
            decoded = tokenizer.decode_grid(out, tuple(meta["grid"])).clamp(-1, 1)
        images.append(((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
        codes.append(out.cpu())
        row_peaks.append(stats["peak_cache_per_row"].cpu())
        row_groups.append(torch.as_tensor(stats["num_groups"]).cpu())
        steps = stats["steps"]
        tokens += stats.get("generated_tokens", out.numel())
        seconds += stats["seconds"]
        progress.set_postfix(tok_s=f"{tokens / max(seconds, 1e-9):.0f}", refresh=False)
        progress.update(len(batch))
    progress.close()
    return {
        "images": torch.cat(images).numpy(), "labels": labels.numpy(), "codes": torch.cat(codes).numpy(),
        "stats": generation_stats(torch.cat(row_peaks), torch.cat(row_groups), tokens, len(labels), seconds,
                                  steps, model.args),
        "settings": {**settings, "generator": run_cfg["generator"], "checkpoint": str(checkpoint.resolve()),
                     "tokenizer_checkpoint": str(tokenizer_ckpt.resolve()), "weights": cfg["weights"]},
    }


def default_keep(keep: int | None, keep_options, meta: Mapping[str, Any]) -> tuple[int, str]:
    """The MergeAR merge instruction K and where it came from: the ``keep`` setting, else the
    tokenizer's nominal K recorded in the code cache when it is a keep option, else the largest option."""
    if keep is not None:
        return int(keep), "keep setting"
    nominal = (meta.get("keep") or {}).get("nominal")
    if nominal is not None and int(nominal) in keep_options:
        return int(nominal), "default: the tokenizer's nominal K"
    return int(max(keep_options)), "default: the largest keep option (the tokenizer's nominal K is not one)"


def generation_stats(peaks: torch.Tensor, groups: torch.Tensor, tokens: int, images: int, seconds: float,
                     steps: int, args) -> dict[str, Any]:
    """Per-sample peaks [N] (most KV entries a sequence held at once) and groups [N] (distinct groups
    realised) -> the summary every generator's sampling.json and generation.json row share."""
    peaks, groups = peaks.float(), groups.float()
    return {
        "tokens_per_s": tokens / max(seconds, 1e-9), "images_per_s": images / max(seconds, 1e-9),
        "steps": int(steps), "num_samples": int(images),
        "groups_mean": float(groups.mean()), "groups_max": int(groups.max()),
        "peak_kv_mean": float(peaks.mean()), "peak_kv_max": int(peaks.max()),
        "positions": int(args.seq_len), "prefix_tokens": int(args.prefix_tokens),
        # names of earlier versions, kept for readers of older files
        "peak_kv_cache_entries": int(peaks.max()), "mean_peak_kv_cache_entries": float(peaks.mean()),
        "sequence_length": int(args.seq_len),
    }


def write_samples(result: Mapping[str, Any], run_dir: Path, per_class: int, grid_png: bool, npz: bool) -> dict[str, str]:
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    if npz:
        paths["npz"] = str(run_dir / "samples.npz")
        np.savez(paths["npz"], arr_0=result["images"], labels=result["labels"], codes=result["codes"])
    if grid_png:
        paths["grid"] = str(run_dir / "samples.png")
        save_image(unit_images(result["images"]), paths["grid"], nrow=per_class)
    atomic_write_text(run_dir / "sampling.json", json.dumps({**result["settings"], **result["stats"], **paths}, indent=2, default=str))
    return paths


def unit_images(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] (as in samples.npz) -> float [N, 3, H, W] in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def class_grids(images: torch.Tensor, labels: np.ndarray | torch.Tensor) -> dict[int, torch.Tensor]:
    """images [N, 3, H, W], labels [N] -> {class c: [3, H, W * n_c]}, classes ascending.

    Class c's n_c samples side by side in sample order: columns [i * W, (i + 1) * W) hold its i-th."""
    labels = torch.as_tensor(labels)
    return {int(c): torch.cat(list(images[labels == c]), dim=-1) for c in labels.unique().tolist()}


def settings_text(settings: Mapping[str, Any]) -> str:
    """'cfg_scale=[1.5, 1.5], temperature=..., keep=64, seed=0': the sampling settings of a caption."""
    keys = ("cfg_scale", "cfg_interval", "temperature", "top_k", "top_p", "keep", "seed")
    return ", ".join(f"{k}={settings[k]}" for k in keys if k in settings)


def log_samples(logger: RunLogger, result: Mapping[str, Any], grid: str | None = None) -> None:
    """One image per class (``samples/class_{c:04d}``: its samples in a row), the whole grid
    (``samples/grid``, the samples.png file when written) and the ``samples/stats`` table, at step 0."""
    settings, stats = result["settings"], result["stats"]
    text = settings_text(settings)
    for c, row in class_grids(unit_images(result["images"]), result["labels"]).items():
        logger.log_images(f"samples/class_{c:04d}", row, step=0, caption=f"class {c}; {text}")
    if grid is not None:
        logger.log_images("samples/grid", grid, step=0, caption=f"one row per class; {text}")
    table = {
        "tokens_per_s": stats["tokens_per_s"],
        "images_per_s": stats["images_per_s"],
        "groups_mean": stats["groups_mean"],
        "peak_kv_mean": stats["peak_kv_mean"],
        "peak_kv_cache_entries": stats["peak_kv_cache_entries"],
        "generator": settings["generator"]["kind"],
        "keep": settings.get("keep"),
        "cfg_scale": str(settings["cfg_scale"]),
        "num_images": len(result["images"]),
    }
    logger.log_table("samples/stats", list(table), [list(table.values())], step=0)
    logger.summary({f"samples/{k}": stats[k] for k in ("tokens_per_s", "peak_kv_cache_entries")})

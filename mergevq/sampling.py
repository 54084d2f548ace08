"""Class-conditional sampling of a trained generator, decoding with its tokenizer, and gFID."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.utils import save_image

from .engine.checkpoint import atomic_write_text
from .engine.restore import load_trained_generator, load_trained_tokenizer
from .models.generate import generate
from .models.mergear import keep_index

log = logging.getLogger(__name__)


def class_list(cfg: Mapping[str, Any], meta: Mapping[str, Any]) -> list[int]:
    classes = cfg.get("classes") or meta.get("classes")
    if not classes:
        raise ValueError("no class list: set classes=[...] (the code cache does not record its classes)")
    return [int(c) for c in classes]


def sample_images(cfg: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """-> {images uint8 [N, H, W, 3], labels [N], codes [N, L], stats, settings}."""
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
        keep = cfg.get("keep") or max(mergear.keep_options)
        options = dict(mergear=True, keep=int(keep_index(keep, mergear.keep_options)),
                       window=cfg.get("window") or mergear.window,
                       duplicate_rule=cfg.get("duplicate_rule") or mergear.duplicate_rule)
        settings.update(keep=keep, window=options["window"], duplicate_rule=options["duplicate_rule"])
    images, codes, peak, tokens, seconds = [], [], 0, 0, 0.0
    for start in range(0, len(labels), cfg["batch_size"]):
        batch = labels[start : start + cfg["batch_size"]].to(device)
        seed = cfg["seed"] * 1_000_003 + start  # every batch seeded: a resumed or sharded run draws the same
        out, stats = generate(model, batch, cfg_scale=cfg["cfg_scale"], cfg_interval=cfg.get("cfg_interval"),
                              temperature=cfg["temperature"], top_k=cfg["top_k"], top_p=cfg["top_p"], seed=seed, **options)
        with torch.no_grad():
            decoded = tokenizer.decode_grid(out, tuple(meta["grid"])).clamp(-1, 1)
        images.append(((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
        codes.append(out.cpu())
        peak = max(peak, int(stats["peak_cache"]))
        tokens += out.numel()
        seconds += stats["seconds"]
    return {
        "images": torch.cat(images).numpy(), "labels": labels.numpy(), "codes": torch.cat(codes).numpy(),
        "stats": {"tokens_per_s": tokens / max(seconds, 1e-9), "peak_kv_cache_entries": peak,
                  "sequence_length": int(model.args.seq_len), "prefix_tokens": int(model.args.prefix_tokens)},
        "settings": {**settings, "generator": run_cfg["generator"], "checkpoint": str(checkpoint.resolve()),
                     "tokenizer_checkpoint": str(tokenizer_ckpt.resolve()), "weights": cfg["weights"]},
    }


def write_samples(result: Mapping[str, Any], run_dir: Path, per_class: int, grid_png: bool, npz: bool) -> dict[str, str]:
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    if npz:
        paths["npz"] = str(run_dir / "samples.npz")
        np.savez(paths["npz"], arr_0=result["images"], labels=result["labels"], codes=result["codes"])
    if grid_png:
        paths["grid"] = str(run_dir / "samples.png")
        tensor = torch.from_numpy(result["images"]).permute(0, 3, 1, 2).float() / 255
        save_image(tensor, paths["grid"], nrow=per_class)
    atomic_write_text(run_dir / "sampling.json", json.dumps({**result["settings"], **result["stats"], **paths}, indent=2, default=str))
    return paths

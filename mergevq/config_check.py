"""Checks of a resolved run config, before any data or model is built: each failure is one line
naming the key and how to fix it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


def _require_path(key: str, value: Any, what: str) -> None:
    if value in (None, "", "???"):
        raise ConfigError(f"{key} is not set: set {key}=<path to {what}>")
    if not Path(str(value)).expanduser().exists():
        raise ConfigError(f"{key}={value} does not exist: set {key}=<path to {what}>")


def check_backend(backend: Mapping[str, Any]) -> None:
    """The backend's device is usable here (backend=npu: torch-npu importable; cuda: a visible GPU)."""
    from .engine.runner import check_device

    try:
        check_device(backend)
    except (RuntimeError, ValueError) as error:
        raise ConfigError(" ".join(str(error).split())) from None


def check_tokenizer_run(cfg: Mapping[str, Any], world_size: int = 1) -> None:
    """Stage-I config: reachable keeps, batch layout, data and weight paths, group values."""
    from .data.datasets import DATASETS
    from .models.factory import layout
    from .models.merge import merge_schedule

    tokenizer, train = cfg["tokenizer"], cfg["train"]
    if tokenizer.get("kind", "mergevq") == "mergevq":
        try:
            spec = layout(tokenizer, cfg["variant"])
            for key in ("keep_candidates", "val_keeps"):
                for keep in train.get(key) or []:
                    merge_schedule(spec["num_positions"], keep, tokenizer["depth"])
        except ValueError as error:
            raise ConfigError(f"variant.keep / train.keep_candidates / train.val_keeps: {error}") from None
    else:  # magvit2: no merging (K is always None) and no alignment head
        for key in ("keep_candidates", "val_keeps"):
            if train.get(key):
                raise ConfigError(f"train.{key}={train[key]}: tokenizer.kind={tokenizer['kind']} does not merge tokens: set it to null")
        if cfg.get("teacher", {}).get("kind", "none") != "none":
            raise ConfigError(f"teacher.kind={cfg['teacher']['kind']}: tokenizer.kind={tokenizer['kind']} has no alignment head: use teacher.kind=none")
    from .models.factory import quantizer_bits

    try:
        quantizer_bits(cfg.get("quantizer"), tokenizer["z_channels"])
    except ValueError as error:
        raise ConfigError(str(error)) from None
    check_backend(cfg["backend"])
    bad_steps = train.get("max_bad_steps", 5)
    if isinstance(bad_steps, bool) or not isinstance(bad_steps, int) or bad_steps < 1:
        raise ConfigError(f"train.max_bad_steps={bad_steps}: use an int >= 1 (non-finite steps in a row before stopping)")
    accum = train["grad_accum"]
    from .engine.ema import updates_per_step

    try:
        updates_per_step(train["ema"].get("cadence", "micro_batch"), accum)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if train["global_batch_size"] % (world_size * accum):
        raise ConfigError(
            f"train.global_batch_size={train['global_batch_size']} is not divisible by {world_size} processes x "
            f"train.grad_accum={accum}: use a multiple of {world_size * accum}"
        )
    data = cfg["data"]
    if data["name"] not in DATASETS:
        raise ConfigError(f"data.name={data['name']} is unknown: use one of {', '.join(DATASETS)}")
    if data["name"] in ("folder", "imagenet"):
        _require_path("data.root", data.get("root"), "the image folder")
    teacher = cfg.get("teacher", {})
    if teacher.get("kind") == "dinov2":
        _require_path("teacher.path", teacher.get("path"), "a local DINOv2 directory saved with save_pretrained")
    elif teacher.get("kind") not in ("none", "tiny_random"):
        raise ConfigError(f"teacher.kind={teacher.get('kind')} is unknown: use none, dinov2 or tiny_random")
    if tokenizer.get("encoder_init"):
        _require_path("tokenizer.encoder_init", tokenizer["encoder_init"], "a timm DINOv2 ViT state dict")
    perceptual = cfg["loss"].get("perceptual", {})
    if cfg["loss"].get("perceptual_weight", 0) > 0 and perceptual.get("pretrained", True):
        from .losses.perceptual import hub_vgg16_path

        path = perceptual.get("backbone_weights") or hub_vgg16_path()
        if not Path(str(path)).expanduser().is_file():
            raise ConfigError(
                f"loss.perceptual.backbone_weights: no VGG16 weights at {path}: set "
                "loss.perceptual.backbone_weights=<vgg16 .pth/.safetensors> or loss.perceptual.pretrained=false"
            )
    if cfg["logger"]["kind"] not in ("wandb", "csv", "none"):
        raise ConfigError(f"logger.kind={cfg['logger']['kind']} is unknown: use logger=wandb|csv|none")
    if cfg.get("resume", "auto") not in ("auto", "never") and not Path(str(cfg["resume"])).is_dir():
        raise ConfigError(f"resume={cfg['resume']} is not a checkpoint directory: use resume=auto|never|<dir>")

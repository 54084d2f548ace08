"""Checks of a resolved run config, before any data or model is built: each failure is one line
naming the key and how to fix it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError, UserError


def _require_path(key: str, value: Any, what: str) -> None:
    if value in (None, "", "???"):
        raise ConfigError(f"{key} is not set: set {key}=<path to {what}>")
    if not Path(str(value)).expanduser().exists():
        raise ConfigError(f"{key}={value} does not exist: set {key}=<path to {what}>")


# ------------------------------------------------------------------------------ typed values

def _integer(low: int) -> tuple[Any, str]:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low), f"an integer >= {low}"


def _number(low: float, high: float = float("inf"), open_low: bool = False) -> tuple[Any, str]:
    def test(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and (v > low if open_low else v >= low) and v <= high

    bounds = f"> {low}" if open_low else f">= {low}"
    return test, f"a number {bounds}" + (f" and <= {high}" if high != float("inf") else "")


# key -> (test, what it must be, null allowed); a key absent from a config is not checked.
# Values given as a list (per factorised sub-head) are checked element by element.
TRAIN_VALUES: dict[str, tuple[Any, str, bool]] = {
    "seed": (*_integer(0), False),
    "train.max_steps": (*_integer(1), False),
    "train.global_batch_size": (*_integer(1), False),
    "train.grad_accum": (*_integer(1), False),
    "train.lr": (*_number(0, open_low=True), False),
    "train.disc_lr": (*_number(0, open_low=True), False),
    "train.weight_decay": (*_number(0), False),
    "train.grad_clip": (*_number(0, open_low=True), True),
    "train.label_smoothing": (*_number(0, 1), False),
    "train.ema.decay": (*_number(0, 1), False),
    "train.lr_schedule.warmup_steps": (*_integer(0), False),
    "train.log_every": (*_integer(1), False),
    "train.val_every": (*_integer(1), False),
    "train.ckpt_every": (*_integer(1), False),
    "train.keep_last": (*_integer(1), False),
    "train.val_batches": (*_integer(1), False),
    "train.num_workers": (*_integer(0), False),
    "train.max_bad_steps": (*_integer(1), False),
    "train.interrupt_at": (*_integer(1), True),
    "num_classes": (*_integer(1), False),
    "recovery.optimizer.lr": (*_number(0, open_low=True), False),
    "recovery.optimizer.weight_decay": (*_number(0), False),
}
SAMPLE_VALUES: dict[str, tuple[Any, str, bool]] = {
    "seed": (*_integer(0), False),
    "per_class": (*_integer(1), False),
    "batch_size": (*_integer(1), False),
    "cfg_scale": (*_number(0), False),
    "temperature": (*_number(0, open_low=True), False),
    "top_k": (*_integer(0), False),
    "top_p": (*_number(0, 1, open_low=True), False),
    "keep": (*_integer(1), True),
    "window": (*_integer(1), True),
    "classes": (*_integer(0), True),
}
EVALUATE_VALUES: dict[str, tuple[Any, str, bool]] = {
    "seed": (*_integer(0), False),
    "batch_size": (*_integer(1), False),
    "num_images": (*_integer(1), True),
    "num_workers": (*_integer(0), False),
    "keeps": (*_integer(1), True),
}


def _get(cfg: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_values(cfg: Mapping[str, Any], schema: Mapping[str, tuple[Any, str, bool]]) -> None:
    """Each key of ``schema`` present in ``cfg`` holds the type and range it names (one line otherwise)."""
    for key, (test, what, nullable) in schema.items():
        found, value = _get(cfg, key)
        if not found or (value is None and nullable):
            continue
        items = value if isinstance(value, list | tuple) else [value]
        if value is None or not items or not all(test(v) for v in items):
            raise ConfigError(f"{key}={value!r} is not {what}: set {key}=<{what}>")
    found, warmup = _get(cfg, "train.lr_schedule.warmup_steps")
    if found and warmup > cfg["train"]["max_steps"]:
        raise ConfigError(f"train.lr_schedule.warmup_steps={warmup} is more than train.max_steps="
                          f"{cfg['train']['max_steps']}: lower the warm-up or raise train.max_steps")


def check_image_root(key: str, root: Any, name: str) -> None:
    """``root`` is a folder holding at least one image file (for data.name folder) or the split folders."""
    _require_path(key, root, f"the {name} image folder")
    path = Path(str(root)).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{key}={root} is a file, not a folder: set {key}=<folder of class folders>")
    if name == "folder":
        from ..data.folder import IMG_EXTENSIONS

        for _, _, files in os.walk(path, followlinks=True):
            if any(f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".") for f in files):
                return
        raise ConfigError(f"{key}={root} holds no image files ({', '.join(IMG_EXTENSIONS)}): set {key}=<folder of "
                          "class folders with images>")


def check_backend(backend: Mapping[str, Any]) -> None:
    """The backend's device is usable here (backend=npu: torch-npu importable; cuda: a visible GPU)."""
    from ..engine.runner import check_device

    try:
        check_device(backend)
    except (RuntimeError, ValueError) as error:
        raise ConfigError(" ".join(str(error).split())) from None


def check_tokenizer_run(cfg: Mapping[str, Any], world_size: int = 1) -> None:
    """Stage-I config: reachable keeps, batch layout, data and weight paths, group values."""
    from ..data.datasets import DATASETS
    from ..models.factory import keep_policy

    check_values(cfg, TRAIN_VALUES)
    tokenizer, train = cfg["tokenizer"], cfg["train"]
    if tokenizer.get("kind", "mergevq") == "mergevq":
        try:
            policy = keep_policy(tokenizer, cfg["variant"])
            for key in ("keep_candidates", "val_keeps"):
                for keep in train.get(key) or []:
                    policy.check(keep)
        except ValueError as error:
            raise ConfigError(f"variant.keep / train.keep_candidates / train.val_keeps: {error}") from None
    else:  # magvit2: no merging (K is always None) and no alignment head
        for key in ("keep_candidates", "val_keeps"):
            if train.get(key):
                raise ConfigError(f"train.{key}={train[key]}: tokenizer.kind={tokenizer['kind']} does not merge tokens: set it to null")
        if cfg.get("teacher", {}).get("kind", "none") != "none":
            raise ConfigError(f"teacher.kind={cfg['teacher']['kind']}: tokenizer.kind={tokenizer['kind']} has no alignment head: use teacher.kind=none")
    from ..models.factory import quantizer_bits

    try:
        quantizer_bits(cfg.get("quantizer"), tokenizer["z_channels"])
    except ValueError as error:
        raise ConfigError(str(error)) from None
    check_backend(cfg["backend"])
    bad_steps = train.get("max_bad_steps", 5)
    if isinstance(bad_steps, bool) or not isinstance(bad_steps, int) or bad_steps < 1:
        raise ConfigError(f"train.max_bad_steps={bad_steps}: use an int >= 1 (non-finite steps in a row before stopping)")
    accum = train["grad_accum"]
    from ..engine.ema import updates_per_step

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
        check_image_root("data.root", data.get("root"), data["name"])
    teacher = cfg.get("teacher", {})
    if teacher.get("kind") == "dinov2":
        _require_path("teacher.path", teacher.get("path"), "a local DINOv2 directory saved with save_pretrained")
    elif teacher.get("kind") not in ("none", "tiny_random"):
        raise ConfigError(f"teacher.kind={teacher.get('kind')} is unknown: use none, dinov2 or tiny_random")
    if tokenizer.get("encoder_init"):
        _require_path("tokenizer.encoder_init", tokenizer["encoder_init"], "a timm DINOv2 ViT state dict")
    perceptual = cfg["loss"].get("perceptual", {})
    standalone = bool(cfg.get("recovery", {}).get("standalone"))  # no reconstruction loss: no VGG needed
    if not standalone and cfg["loss"].get("perceptual_weight", 0) > 0 and perceptual.get("pretrained", True):
        from ..losses.perceptual import hub_vgg16_path

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


RECOVERY_SHAPE = ("width", "depth", "num_heads", "drop_path", "key_positions")
_FROZEN = "recovery.tokenizer=<tokenizer run directory or its checkpoints/step_* directory>"


def standalone_recovery_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``recovery.standalone=true``: the run config with the frozen tokenizer's architecture (tokenizer,
    variant, quantizer; its recovery module's shape when it has one) from ``recovery.tokenizer``'s run,
    that path pinned to the absolute checkpoint directory and ``recovery.enabled`` on; ``data.size`` and
    ``data.align_size`` follow the frozen tokenizer where they follow the composed one (their default).
    No weights are read."""
    from ..runs.restore import WEIGHT_NAMES

    recovery = dict(cfg["recovery"])
    value = recovery.get("tokenizer")
    if value in (None, "", "???"):
        raise ConfigError(f"recovery.standalone=true trains Source Recovery on a frozen tokenizer, and none is given: set {_FROZEN}")
    if not Path(str(value)).expanduser().exists():
        raise ConfigError(f"recovery.tokenizer={value} does not exist: set {_FROZEN}")
    if recovery.get("tokenizer_weights", "ema") not in WEIGHT_NAMES:
        raise ConfigError(f"recovery.tokenizer_weights={recovery['tokenizer_weights']!r}: use ema or raw")
    try:
        checkpoint, source = _checkpoint("recovery.tokenizer", value, "tokenizer", "recovery.standalone=true")
    except UserError as error:
        raise ConfigError(f"recovery.tokenizer={value}: {error}") from None
    if source["tokenizer"].get("kind", "mergevq") != "mergevq":
        raise ConfigError(f"recovery.tokenizer={value} is a {source['tokenizer']['kind']} tokenizer, which does not merge "
                          "tokens (nothing to recover): give a MergeVQ tokenizer run")
    data = dict(cfg["data"])
    for key, follows in (("size", "resolution"), ("align_size", "align_size")):
        if data.get(key) == cfg["tokenizer"].get(follows):  # the default follows the tokenizer: the frozen one's
            data[key] = source["data"][key]
    if data["size"] != source["data"]["size"]:
        raise ConfigError(f"data.size={data['size']} but the tokenizer of recovery.tokenizer={value} was trained at "
                          f"{source['data']['size']} px: set data.size={source['data']['size']}")
    stored = source.get("recovery") or {}
    if stored.get("enabled"):  # train its module further: the shape must be the stored one
        recovery.update({key: stored[key] for key in RECOVERY_SHAPE if key in stored})
    recovery.update(enabled=True, tokenizer=str(checkpoint.resolve()))
    tokenizer = {**source["tokenizer"], "encoder_init": None}  # an init, not architecture: the weights are the run's
    return {**cfg, "tokenizer": tokenizer, "variant": source["variant"], "quantizer": source["quantizer"],
            "recovery": recovery, "data": data}


def check_ar_run(cfg: Mapping[str, Any]) -> None:
    """Stage-II config: typed values, the backend, the logger."""
    check_values(cfg, TRAIN_VALUES)
    check_backend(cfg["backend"])
    if cfg["logger"]["kind"] not in ("wandb", "csv", "none"):
        raise ConfigError(f"logger.kind={cfg['logger']['kind']} is unknown: use logger=wandb|csv|none")


def _checkpoint(key: str, value: Any, kind: str, entry: str) -> tuple[Path, dict[str, Any]]:
    """The checkpoint ``key`` names, of the right kind, and its stored config (no weights read)."""
    from ..runs.restore import require_kind, resolve_checkpoint, stored_config

    if value in (None, "", "???"):
        raise ConfigError(f"{key} is not set: set {key}=<run directory or checkpoints/step_* directory>")
    checkpoint = resolve_checkpoint(value)
    require_kind(checkpoint, kind, entry)
    return checkpoint, stored_config(checkpoint)


def check_evaluate_run(cfg: Mapping[str, Any]) -> None:
    """evaluate: typed values, the checkpoint (a tokenizer run), reachable keeps and the data folder,
    all before any model or data is loaded."""
    from ..models.factory import keep_policy

    check_values(cfg, EVALUATE_VALUES)
    _, run = _checkpoint("ckpt", cfg.get("ckpt"), "tokenizer", "evaluate")
    tokenizer = run["tokenizer"]
    if cfg.get("keeps"):
        if tokenizer.get("kind", "mergevq") != "mergevq":
            raise ConfigError(f"keeps={cfg['keeps']}: tokenizer.kind={tokenizer['kind']} does not merge tokens: set keeps=null")
        policy = keep_policy(tokenizer, run["variant"])
        for keep in cfg["keeps"]:
            try:
                policy.check(keep)
            except ValueError as error:
                raise ConfigError(f"keeps={cfg['keeps']}: {error}") from None
    data = {**run["data"], **{k: v for k, v in (cfg.get("data") or {}).items() if v is not None}}
    if data["name"] in ("folder", "imagenet"):
        check_image_root("data.root", data.get("root"), data["name"])


def check_sample_run(cfg: Mapping[str, Any]) -> None:
    """sample: typed option ranges, the checkpoint (a generator run), class ids within the run's
    num_classes and keep among its keep options, before any model is loaded."""
    from ..data.code_cache import CodeCache, cache_contents
    from ..runs.restore import code_cache_of

    check_values(cfg, SAMPLE_VALUES)
    checkpoint, run = _checkpoint("ckpt", cfg.get("ckpt"), "generator", "sample")
    cache = CodeCache(code_cache_of(run, checkpoint))
    contents = cache_contents(cache)
    num_classes = int(run["num_classes"])
    bad = [c for c in cfg.get("classes") or contents["classes"] if not 0 <= int(c) < num_classes]
    if bad:
        raise ConfigError(f"classes: ids {bad[:5]} are outside [0, {num_classes}) of {checkpoint} (id {num_classes} is "
                          f"the CFG null class): use class ids below {num_classes}")
    generator = run["generator"]
    if generator["kind"] == "mergear" and cfg.get("keep") is not None:
        options = generator.get("keep_options") or cache.meta.get("keep", {}).get("choices") or contents["keeps"]
        if int(cfg["keep"]) not in [int(k) for k in options]:
            raise ConfigError(f"keep={cfg['keep']} is not a keep option of {checkpoint}: use one of {list(options)}")

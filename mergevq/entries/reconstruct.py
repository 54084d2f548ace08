"""Reconstruct images with a trained tokenizer and draw its merge maps:

    python -m mergevq.entries.reconstruct ckpt=RUN_DIR input=IMAGE_OR_FOLDER [keep=144 | keep=[64,144,256]]

Each image is resized (shorter side, bilinear) and center-cropped to the tokenizer's resolution, then
encoded and decoded at every K. Per image, in the run dir (``hydra.run.dir``):

    <name>_recon.png      input | reconstruction at K_1 | K_2 ...
    <name>_mergemap.png   input | merge map at K_1 | K_2 ...   (``mergevq.viz.merge_map``)

plus ``reconstruct.json`` with the PSNR of every image at every K and the mean per K. With
logger=csv|wandb both pictures of image i go to ``reconstruct/reconstructions`` and
``reconstruct/merge_maps`` at step i (captions name the image and its PSNR per K), and the mean PSNR
per K to the summary.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from .cli import run_entry

log = logging.getLogger(__name__)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def image_extensions() -> set[str]:
    """Every file suffix PIL has a reader for ('.png', '.jpg', '.webp', ...)."""
    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def find_images(path: str | Path, recursive: bool = False) -> list[Path]:
    """An image file -> [it]; a folder -> its image files (sorted; sub-folders with recursive).

    FileNotFoundError when the path does not exist, ValueError when a folder has no image files.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"input={path}: no such file or directory")
    if path.is_file():
        return [path]
    extensions = image_extensions()
    pattern = path.rglob("*") if recursive else path.glob("*")
    found = sorted(p for p in pattern if p.is_file() and p.suffix.lower() in extensions and not p.name.startswith("."))
    if not found:
        hint = "" if recursive else " (recursive=true also searches sub-folders)"
        raise ValueError(f"input={path}: the folder contains no image files{hint}")
    return found


def load_view(path: Path, size: int) -> torch.Tensor:
    """Any PIL-readable image -> [3, size, size] in [-1, 1] (the evaluation view)."""
    from ..data.folder import load_image
    from ..data.transforms import val_transform

    try:
        image = load_image(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot be read as an image ({error})") from error
    return val_transform(size)(image)


def keep_list(keep: Any) -> list[int | None]:
    """keep config -> list of K (None = the tokenizer's nominal K)."""
    if keep is None:
        return [None]
    if isinstance(keep, int):
        return [keep]
    if isinstance(keep, Sequence) and not isinstance(keep, str) and all(isinstance(k, int) for k in keep) and keep:
        return list(keep)
    raise ValueError(f"keep={keep!r}: give an int, a list of ints or null")


@torch.no_grad()
def reconstruct(tokenizer: torch.nn.Module, x: torch.Tensor, keeps: Sequence[int | None]) -> list[dict[str, Any]]:
    """x [3, S, S] in [-1, 1] -> per K: {keep, recon [3, S, S], groups [L], grid, psnr (dB on [0, 1])}."""
    from ..eval.recon import psnr_per_image

    device = next(tokenizer.parameters()).device
    batch = x[None].to(device)
    rows = []
    for keep in keeps:
        tokens = tokenizer.encode(batch, keep=keep)
        recon = tokenizer.decode(tokens).float().clamp(-1, 1)[0].cpu()
        rows.append({
            "keep": tokens.keep,
            "recon": recon,
            "groups": tokens.groups[0].cpu(),
            "grid": tuple(tokens.grid),
            "psnr": float(psnr_per_image(recon[None], x[None])[0]),
        })
    return rows


def output_name(path: Path, root: Path) -> str:
    """File stem, with sub-folders joined by '__' so recursive inputs do not collide."""
    if root.is_file():
        return path.stem
    return "__".join(path.relative_to(root).with_suffix("").parts)


def write_pictures(name: str, x: torch.Tensor, rows: list[dict[str, Any]], out_dir: Path,
                   alpha: float, min_panel: int) -> tuple[Path, Path]:
    """<name>_recon.png and <name>_mergemap.png (input first, then one panel per K)."""
    from ..viz import display_factor, merge_map, save_panels, to_unit, upscale

    factor = display_factor(x.shape[-2], min_panel)
    big = upscale(x, factor)  # merge maps drawn at display size keep one-pixel boundary lines
    captions = ["input"] + [f"K={row['keep']}" for row in rows]
    recon = save_panels([to_unit(big)] + [upscale(to_unit(row["recon"]), factor) for row in rows],
                        out_dir / f"{name}_recon.png", captions, min_size=min_panel)
    maps = save_panels([to_unit(big)] + [merge_map(big, row["groups"], row["grid"], alpha) for row in rows],
                       out_dir / f"{name}_mergemap.png", captions, min_size=min_panel)
    return recon, maps


def task(cfg: DictConfig) -> float:
    from ..engine.runner import build_accelerator
    from ..runs.loggers import logger_from_config
    from ..runs.restore import load_trained_tokenizer

    config = OmegaConf.to_container(cfg, resolve=True)
    try:
        keeps = keep_list(config["keep"])
        paths = find_images(config["input"], config["recursive"])
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    if config["max_images"]:
        paths = paths[: config["max_images"]]
    device = build_accelerator(config["backend"]).device
    tokenizer, run_config, checkpoint = load_trained_tokenizer(config["ckpt"], config["weights"])
    tokenizer.to(device)
    size = run_config["tokenizer"]["resolution"]
    out_dir = Path(config["run_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(config["input"]).expanduser()

    progress = None
    if root.is_dir() and config["progress"]:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(paths), desc="reconstruct", unit="img", dynamic_ncols=True)
    results = []
    with logger_from_config(config, out_dir) as logger:
        for step, path in enumerate(paths):
            try:
                x = load_view(path, size)
                rows = reconstruct(tokenizer, x, keeps)
            except ValueError as error:  # an unreadable image or a K the tokenizer cannot reach
                fail(str(error))
            name = output_name(path, root)
            recon, maps = write_pictures(name, x, rows, out_dir, config["alpha"], config["min_panel"])
            caption = f"{name}: input, then " + ", ".join(f"K={r['keep']} ({r['psnr']:.2f} dB)" for r in rows)
            logger.log_images("reconstruct/reconstructions", recon, step, caption=caption)
            logger.log_images("reconstruct/merge_maps", maps, step, caption=caption)
            results.append({"image": str(path), "name": name, "psnr": {str(r["keep"]): r["psnr"] for r in rows}})
            if progress is not None:
                progress.update(1)
        if progress is not None:
            progress.close()
        ks = list(results[0]["psnr"]) if results else []
        mean = {k: sum(r["psnr"][k] for r in results) / len(results) for k in ks}
        logger.summary({f"reconstruct/k{k}/mean_psnr": v for k, v in mean.items()})
    summary = {"checkpoint": str(checkpoint), "weights": config["weights"], "resolution": size, "keeps": ks,
               "mean_psnr": mean, "images": results}
    (out_dir / "reconstruct.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("%d image(s) -> %s; mean PSNR per K: %s", len(results), out_dir,
             ", ".join(f"K={k}: {v:.2f} dB" for k, v in mean.items()))
    return mean[ks[0]] if ks else float("nan")


def main() -> None:
    run_entry("reconstruct", task)


if __name__ == "__main__":
    main()

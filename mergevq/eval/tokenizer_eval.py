"""Evaluate a tokenizer checkpoint: rFID, PSNR, SSIM, LPIPS and codebook statistics per K in one pass
over the held-out split, sharded over processes; writes the evaluation card and a plot (and logs them
with :func:`log_per_k`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Subset

from ..data import build_dataset, default_cache_dir
from ..data.datasets import is_held_out, readable_batch
from ..runs.card import lpips_info, package_versions, sha256_file, write_card
from ..runs.loggers import RunLogger
from ..runs.restore import load_trained_tokenizer
from .features import FeatureCache, RandomFeatures, TFInceptionFeatures, extractor_meta
from .fid import fid_from_features
from .recon import ReconstructionEvaluator

log = logging.getLogger(__name__)


def build_extractor(kind: str):
    if kind == "inception":
        return TFInceptionFeatures()
    if kind == "random":
        log.warning("rFID with UNTRAINED random features: a smoke-test number, not comparable to published rFID")
        return RandomFeatures()
    raise ValueError(f"features={kind!r}: use inception or random")


def build_classifier(config: Mapping[str, Any] | None, data: Mapping[str, Any]):
    """The class-accuracy classifier of the evaluated data set (``eval.classifier``), or None when
    ``classifier.enabled`` is false, or 'auto' and the images are over 64 px (no CPU-sized classifier)."""
    config = dict(config or {"enabled": "auto"})
    enabled = config.get("enabled", "auto")
    if enabled not in (True, False, "auto"):
        raise ValueError(f"classifier.enabled={enabled!r}: use auto, true or false")
    if enabled is False or (enabled == "auto" and data["size"] > 64):
        return None
    from .classifier import classifier_for, recipe_from

    cache = Path(config.get("cache_dir") or default_cache_dir() / "classifiers")
    return classifier_for(data, cache, recipe_from(config),
                          refresh=bool(config.get("refresh", False)))


def default_keeps(run_cfg: Mapping[str, Any]) -> list[int | None]:
    """The run's validation keeps, else its train-time candidates; [None] for a non-merging tokenizer."""
    train = run_cfg["train"]
    if train.get("val_keeps") or train.get("keep_candidates"):
        return list(train.get("val_keeps") or train["keep_candidates"])
    from ..models.factory import keep_policy

    return list(keep_policy(run_cfg["tokenizer"], run_cfg.get("variant")).candidates)


def eval_data_config(run_cfg: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    data = dict(run_cfg["data"])
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return data


def plot_per_k(rows: list[dict[str, Any]], path: Path, untrained_features: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keeps = [r["keep"] for r in rows]
    fig, left = plt.subplots(figsize=(5, 3.2), dpi=120)
    left.plot(keeps, [r["rfid"] for r in rows], "o-", color="tab:red", label="rFID")
    left.set_xlabel("kept tokens K")
    left.set_ylabel("rFID" + (" (untrained features)" if untrained_features else ""), color="tab:red")
    right = left.twinx()
    right.plot(keeps, [r["psnr"] for r in rows], "s--", color="tab:blue", label="PSNR")
    right.set_ylabel("PSNR (dB)", color="tab:blue")
    left.set_title("reconstruction vs K")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def log_per_k(logger: RunLogger, card: Mapping[str, Any]) -> None:
    """A tokenizer card to a logger at step 0: the ``eval/per_k`` table (keep, then every per-K metric
    of the card: rfid, psnr, ssim, lpips, code usage ...), the per-K plot when written and
    ``eval/k{K}/{metric}`` summary scalars."""
    per_k = card["metrics"]
    columns = ["keep", "rfid", *(c for c in next(iter(per_k.values())) if c != "rfid")]
    rows = [[int(k), *(m.get(c) for c in columns[1:])] for k, m in per_k.items()]
    logger.log_table("eval/per_k", columns, rows, step=0)
    if card.get("plot"):
        logger.log_images("eval/per_k_plot", card["plot"], step=0, caption="rFID and PSNR vs kept tokens K")
    logger.summary({f"eval/k{k}/{name}": v for k, m in per_k.items() for name, v in m.items()
                    if isinstance(v, int | float)})


def evaluate_tokenizer(cfg: Mapping[str, Any], accelerator, run_dir: Path) -> dict[str, Any]:
    """cfg: the ``evaluate`` config (plain dict). Returns the card (rank 0) or {} (other ranks)."""
    tokenizer, run_cfg, checkpoint = load_trained_tokenizer(cfg["ckpt"], cfg["weights"])
    tokenizer.to(accelerator.device)
    keeps = list(cfg.get("keeps") or default_keeps(run_cfg))
    data = eval_data_config(run_cfg, cfg.get("data"))
    dataset = build_dataset(
        data["name"], cfg["split"], root=data.get("root"), cache_dir=data.get("cache_dir"), size=data["size"],
        align_size=data["align_size"], views=("image",), replace_unreadable=False, **dict(data.get("val_kwargs") or {}),
    )
    held = is_held_out(data["name"], cfg["split"], data.get("root"))
    total = min(len(dataset), cfg.get("num_images") or len(dataset))
    rank, world = accelerator.process_index, accelerator.num_processes
    shard = Subset(dataset, list(range(rank, total, world)))
    loader = DataLoader(shard, batch_size=cfg["batch_size"], shuffle=False, num_workers=cfg.get("num_workers", 0),
                        collate_fn=readable_batch)

    extractor = build_extractor(cfg["features"]).to(accelerator.device)
    cache = FeatureCache(Path(cfg.get("cache_dir") or default_cache_dir() / "features"))
    dataset_id = f"{data['name']}:{data.get('root')}:{cfg['split']}:{sorted((data.get('val_kwargs') or {}).items())}:{total}"
    transform_id = f"resize-bilinear-{data['size']}:center-crop-{data['size']}"
    key = cache.key(dataset_id, transform_id, extractor)
    cached_real = cache.load(key)
    lpips = None
    if cfg["lpips"]["enabled"]:
        from ..losses import LPIPSLoss

        lpips = LPIPSLoss(cfg["lpips"]["pretrained"], cfg["lpips"].get("backbone_weights")).to(accelerator.device)
    classifier = build_classifier(cfg.get("classifier"), data)
    evaluator = ReconstructionEvaluator(
        tokenizer, keeps, lpips=lpips, feature_fn=lambda x: extractor((x + 1) / 2),
        collect_real_features=cached_real is None, classify=classifier.predict if classifier else None,
    )
    batches = loader
    if accelerator.is_main_process:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc=f"evaluate K={keeps}", dynamic_ncols=True)
    skipped = 0
    for batch in batches:
        skipped += batch["num_skipped"]
        if "image" in batch:
            evaluator.update(batch["image"], batch.get("label"))
    evaluator.reduce(accelerator)
    import torch

    skipped = int(accelerator.reduce(torch.tensor(skipped, device=accelerator.device), "sum"))
    if not accelerator.is_main_process:
        return {}

    real = cached_real if cached_real is not None else evaluator.real_features()
    if cached_real is None:
        cache.save(key, real)
    results = evaluator.results()
    rows = []
    for keep in keeps:
        row = {"keep": keep if keep is not None else results[keep]["num_tokens"], **results[keep]}
        row["rfid"] = fid_from_features(real, evaluator.features(keep), method="eigh")
        if evaluator.recovers:  # the same K decoded with Source Recovery's predicted groups
            row["rfid_recovered"] = fid_from_features(real, evaluator.features(keep, recovered=True), method="eigh")
        rows.append(row)
    meta = extractor_meta(extractor)
    weights_file = checkpoint / f"{'tokenizer_ema' if cfg['weights'] == 'ema' else 'tokenizer'}.safetensors"
    card = {
        "kind": "tokenizer",
        "metrics": {str(r["keep"]): {k: v for k, v in r.items() if k != "keep"} for r in rows},
        "checkpoint": str(checkpoint.resolve()),
        "checkpoint_sha256": sha256_file(weights_file),
        "weights": cfg["weights"],
        "keeps": [r["keep"] for r in rows],
        "image_size": data["size"],
        "resize": f"bilinear {data['size']} (shorter side)",
        "crop": f"center {data['size']}",
        "num_images": total - skipped,
        "num_skipped": skipped,  # unreadable files: dropped, never replaced by another image
        "held_out": held,
        "dataset": dataset_id,
        "reference_stats_sha256": None,
        "real_features_cache": str(cache.path(key)),
        "frechet_distance": "trace of the symmetric square root via eigh (equal to scipy sqrtm to 1e-6)",
        "feature_extractor": {"name": meta["extractor"], "weights_sha256": meta["extractor_weights_sha256"],
                              "trained": meta["extractor_trained"]},
        "seeds": {"eval": cfg.get("seed", 0), "train": run_cfg.get("seed")},
        "package_versions": package_versions(),
        "processes": world,
    }
    if not held:
        card["split_note"] = (f"data.root has no {cfg['split']}/ subfolder: these are the training images, "
                              "NOT a held-out split")
        log.warning("evaluation split: %s", card["split_note"])
    if skipped:
        log.warning("%d of %d images were unreadable and are not counted", skipped, total)
    if lpips is not None:
        card["lpips"] = lpips_info(lpips)
    if classifier is not None:
        card["classifier"] = {**classifier.summary(), "original_class_accuracy": evaluator.original_class_accuracy()}
        card["classifier_accuracy"] = classifier.accuracy
    json_path, md_path = write_card(run_dir, card)
    if cfg.get("plot", True):
        card["plot"] = str(plot_per_k(rows, run_dir / "per_k.png", not meta["extractor_trained"]))
    for row in rows:
        log.info("K=%s rFID=%.3f PSNR=%.2f SSIM=%.4f usage=%.4f", row["keep"], row["rfid"], row["psnr"], row["ssim"], row["code_usage"])
        if "class_accuracy" in row:
            log.info("K=%s class accuracy of the reconstructions %.4f (originals %.4f)", row["keep"],
                     row["class_accuracy"], evaluator.original_class_accuracy())
        if "rfid_recovered" in row:
            log.info("K=%s predicted groups: rFID=%.3f PSNR=%.2f recovery accuracy=%.4f", row["keep"],
                     row["rfid_recovered"], row["psnr_recovered"], row["recovery_accuracy"])
    log.info("evaluation card: %s, %s", json_path, md_path)
    return card

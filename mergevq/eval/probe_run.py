"""Linear probe of a tokenizer checkpoint: top-1 per K and feature kind on a labelled data set."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Subset

from ..data import build_dataset
from ..runs.card import package_versions, sha256_file, write_card
from ..runs.restore import load_trained_tokenizer
from .probe import extract_probe_features, linear_probe
from .tokenizer_eval import default_keeps, eval_data_config

log = logging.getLogger(__name__)


def _loader(data: Mapping[str, Any], split: str, limit: int | None, batch_size: int) -> DataLoader:
    dataset = build_dataset(
        data["name"], split, root=data.get("root"), cache_dir=data.get("cache_dir"), size=data["size"],
        align_size=data["align_size"], views=("image",), augment=False,
        **dict(data.get("train_kwargs" if split == "train" else "val_kwargs") or {}),
    )
    count = min(len(dataset), limit or len(dataset))
    return DataLoader(Subset(dataset, range(count)), batch_size=batch_size, shuffle=False)


def probe_tokenizer(cfg: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
    tokenizer, run_cfg, checkpoint = load_trained_tokenizer(cfg["ckpt"], cfg["weights"])
    data = eval_data_config(run_cfg, cfg.get("data"))
    keeps = list(cfg.get("keeps") or default_keeps(run_cfg))
    train = _loader(data, "train", cfg.get("train_images"), cfg["batch_size"])
    test = _loader(data, "val", cfg.get("test_images"), cfg["batch_size"])
    metrics: dict[str, dict[str, float]] = {}
    from tqdm.auto import tqdm

    for keep in keeps:
        bar = {"unit": "batch", "dynamic_ncols": True, "disable": not cfg.get("progress", True)}
        train_feats = extract_probe_features(tokenizer, tqdm(train, desc=f"probe K={keep} train features", **bar), keep, cfg["kinds"])
        test_feats = extract_probe_features(tokenizer, tqdm(test, desc=f"probe K={keep} test features", **bar), keep, cfg["kinds"])
        row = {}
        for kind, (x, y) in train_feats.items():
            tx, ty = test_feats[kind]
            result = linear_probe(x, y, tx, ty, epochs=cfg["epochs"], lr=cfg["lr"], weight_decay=cfg["weight_decay"], seed=cfg["seed"])
            row.update({f"{kind}_{name}": value for name, value in result.items()})
            log.info("K=%s %s: top-1 %.4f (train %.4f)", keep, kind, result["top1"], result["train_top1"])
        metrics[str(keep)] = row
    weights_file = checkpoint / f"{'tokenizer_ema' if cfg['weights'] == 'ema' else 'tokenizer'}.safetensors"
    card = {
        "kind": "linear_probe",
        "metrics": metrics,
        "checkpoint": str(checkpoint.resolve()),
        "checkpoint_sha256": sha256_file(weights_file),
        "weights": cfg["weights"],
        "keeps": keeps,
        "image_size": data["size"],
        "resize": f"bilinear {data['size']} (shorter side)",
        "crop": f"center {data['size']}",
        "num_images": {"train": len(train.dataset), "test": len(test.dataset)},
        "dataset": f"{data['name']}:{data.get('root')}",
        "reference_stats_sha256": None,
        "feature_extractor": {"name": f"mergevq-encoder ({', '.join(cfg['kinds'])})", "weights_sha256": None, "trained": True},
        "probe": {"epochs": cfg["epochs"], "lr": cfg["lr"], "weight_decay": cfg["weight_decay"], "head": "BN(affine=False) + Linear, SGD"},
        "seeds": {"probe": cfg["seed"], "train": run_cfg.get("seed")},
        "package_versions": package_versions(),
    }
    write_card(run_dir, card)
    return card

"""gFID / precision / recall (and IS / sFID with eval.inception_weights) of a sample set against the
held-out split of the tokenizer's data."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..data import build_dataset, default_cache_dir
from ..data.datasets import is_held_out
from ..runs.card import package_versions, sha256_file, write_card
from ..runs.restore import load_trained_tokenizer
from .classifier import trend_note
from .features import FeatureCache, extractor_meta
from .generator_eval import generator_metrics, inception_metrics, reference_spatial, reference_stats
from .inception import CONFIG_KEY, WEIGHTS_FILE, FidelityInception
from .tokenizer_eval import build_classifier, build_extractor


def evaluate_samples(cfg: Mapping[str, Any], result: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
    settings = result["settings"]
    _, tok_cfg, _ = load_trained_tokenizer(settings["tokenizer_checkpoint"], "raw")
    data = tok_cfg["data"]
    dataset = build_dataset(data["name"], "val", root=data.get("root"), cache_dir=data.get("cache_dir"), size=data["size"],
                            align_size=data["align_size"], views=("image",), replace_unreadable=False,
                            **dict(data.get("val_kwargs") or {}))
    count = min(len(dataset), cfg["evaluate"]["num_reference"])
    held = is_held_out(data["name"], "val", data.get("root"))
    extractor = build_extractor(cfg["evaluate"]["features"])
    dataset_id = f"{data['name']}:{data.get('root')}:val:{count}"
    cache = FeatureCache(default_cache_dir() / "features")
    key = cache.key(dataset_id, f"resize-bilinear-{data['size']}:center-crop-{data['size']}", extractor)
    reference = cache.cache_dir / f"{key}.stats.npz"
    features = cache.load(key)
    if features is None or not reference.is_file():
        items = [dataset[i] for i in range(count)]
        images = torch.stack([item["image"] for item in items if item is not None])  # unreadable: dropped
        features, _, _ = reference_stats(extractor, images, reference, {"dataset": dataset_id})
        cache.save(key, features)
    metrics = generator_metrics(extractor, result["images"], reference, features)
    classifier = build_classifier(cfg["evaluate"].get("classifier"), data)
    classes = None
    if classifier is not None:  # is each sample the class it was conditioned on?
        samples = torch.from_numpy(result["images"]).permute(0, 3, 1, 2)
        classes = classifier.score(samples, result["labels"])
        metrics["class_accuracy"] = classes["class_accuracy"]
    inception, warnings = inception_part(cfg, result["images"], dataset, count, cache, dataset_id, data["size"])
    metrics.update(inception.pop("metrics"))
    meta = extractor_meta(extractor)
    ckpt = Path(settings["checkpoint"])
    weights = ckpt / ("gpt_ema.safetensors" if (ckpt / "gpt_ema.safetensors").is_file() and cfg["weights"] == "ema" else "gpt.safetensors")
    card = {
        "kind": "generator",
        "metrics": {k: v for k, v in metrics.items() if k != "reference_stats_sha256"},
        "checkpoint": str(ckpt),
        "checkpoint_sha256": sha256_file(weights),
        "weights": "ema" if weights.name == "gpt_ema.safetensors" else "raw",
        "keeps": [settings.get("keep")],
        "image_size": data["size"],
        "resize": "none (generated at the tokenizer's resolution)",
        "crop": "none",
        "num_images": int(len(result["images"])),
        "reference": {"dataset": dataset_id, "num_images": int(features.shape[0]), "num_skipped": count - int(features.shape[0]),
                      "held_out": held, "stats": str(reference)},
        "reference_stats_sha256": metrics["reference_stats_sha256"],
        "feature_extractor": {"name": meta["extractor"], "weights_sha256": meta["extractor_weights_sha256"],
                              "trained": meta["extractor_trained"]},
        "sampling": settings,
        "sampling_stats": result["stats"],
        "inception": inception,
        "seeds": {"sampling": cfg["seed"]},
        "package_versions": package_versions("torch-fidelity"),
        "warnings": warnings,
    }
    if classes is not None:
        card["class_accuracy"] = {**classes, "note": trend_note(classes)}
        card["classifier"] = classifier.summary()
        card["classifier_accuracy"] = classifier.accuracy
    write_card(run_dir, card)
    return card


def inception_part(cfg: Mapping[str, Any], samples, dataset, count: int, cache: FeatureCache, dataset_id: str,
                   size: int) -> tuple[dict[str, Any], list[str]]:
    """IS and sFID with the InceptionV3 at eval.inception_weights -> (card section with its "metrics",
    warnings); without weights the section says why they were not computed."""
    path = (cfg.get("eval") or {}).get("inception_weights")
    if not path:
        reason = f"{CONFIG_KEY} is not set (torch-fidelity's {WEIGHTS_FILE})"
        return ({"computed": False, "reason": reason, "metrics": {"inception_score": None, "sfid": None}},
                [f"IS and sFID not computed: {reason}"])
    net = FidelityInception(path)
    key = cache.key(dataset_id, f"resize-bilinear-{size}:center-crop-{size}:uint8:sfid-spatial", net)
    reference = cache.load(key)
    if reference is None:
        reference = reference_spatial(net, torch.stack([dataset[i]["image"] for i in range(count)]))
        cache.save(key, reference)
    section = {"computed": True, "name": net.name, "weights": str(net.path), "weights_sha256": net.weights_sha256,
               "trained": net.trained, "sfid_features": "mixed_6/conv (Mixed_6d.branch1x1), first 7 channels",
               "metrics": inception_metrics(net, samples, reference)}
    warnings = [] if net.trained else [
        f"IS and sFID computed with an UNTRAINED InceptionV3 ({net.path}: sha256 {net.weights_sha256[:12]}..., not "
        f"{WEIGHTS_FILE}): not comparable to published IS / sFID"]
    return section, warnings

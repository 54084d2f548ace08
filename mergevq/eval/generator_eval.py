"""Generator metrics: gFID and precision/recall of samples against reference statistics of real images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .card import sha256_file
from .features import extract_features, extractor_meta
from .fid import feature_stats, frechet_distance, load_stats, precision_recall, save_stats


def reference_stats(extractor, images, path: Path, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, mu, sigma of real images [N, 3, H, W] in [-1, 1]; statistics saved as .npz at path."""
    features = extract_features(extractor, [images[i : i + 32] for i in range(0, len(images), 32)], input_range=(-1, 1),
                                progress="reference features")
    mu, sigma = feature_stats(features)
    save_stats(path, mu, sigma, **meta, **{k: str(v) for k, v in extractor_meta(extractor).items()})
    return features, mu, sigma


def generator_metrics(extractor, samples_uint8: np.ndarray, reference: Path, reference_features: np.ndarray | None) -> dict[str, Any]:
    """samples [N, H, W, 3] uint8 -> {gfid, precision, recall (when reference features exist), ...}."""
    images = torch.from_numpy(samples_uint8).permute(0, 3, 1, 2).contiguous()
    features = extract_features(extractor, [images[i : i + 32] for i in range(0, len(images), 32)], progress="sample features")
    mu_ref, sigma_ref, _ = load_stats(reference)
    mu, sigma = feature_stats(features)
    out: dict[str, Any] = {
        "gfid": frechet_distance(mu, sigma, mu_ref, sigma_ref, method="eigh"),
        "num_samples": int(len(features)),
        "reference_stats_sha256": sha256_file(reference),
        "inception_score": None,  # the TF-FID network exposes pool3 only: IS needs the 1008-way logits
    }
    if reference_features is not None:
        out["precision"], out["recall"] = precision_recall(reference_features, features, k=3)
    return out

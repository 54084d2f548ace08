"""Generator metrics: gFID and precision/recall of samples against reference statistics of real images;
Inception Score and sFID through torch-fidelity's InceptionV3 (`inception.FidelityInception`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..runs.card import sha256_file
from .features import extract_features, extractor_meta
from .fid import feature_stats, frechet_distance, load_stats, precision_recall, save_stats
from .inception import inception_score_torch_fidelity, split_blocks


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
    }
    if reference_features is not None:
        out["precision"], out["recall"] = precision_recall(reference_features, features, k=3)
    return out


def _batches(images: torch.Tensor) -> list[torch.Tensor]:
    return [images[i : i + 32] for i in range(0, len(images), 32)]


def reference_spatial(net, images: torch.Tensor) -> np.ndarray:
    """Real images [M, 3, H, W] in [-1, 1] -> their sFID features [M, 2023] through FidelityInception."""
    features = extract_features(net, _batches(images), input_range=(-1, 1), progress="sFID reference features")
    return split_blocks(features)["spatial"]


def inception_metrics(net, samples_uint8: np.ndarray, reference_spatial: np.ndarray, splits: int = 10) -> dict[str, float]:
    """samples [N, H, W, 3] uint8, reference sFID features [M, 2023] -> {inception_score,
    inception_score_std (over min(splits, N) consecutive splits), sfid (mixed_6/conv features)}."""
    images = torch.from_numpy(samples_uint8).permute(0, 3, 1, 2).contiguous()
    blocks = split_blocks(extract_features(net, _batches(images), progress="IS / sFID features"))
    mean, std = inception_score_torch_fidelity(blocks["logits"], splits)
    sfid = frechet_distance(*feature_stats(blocks["spatial"]), *feature_stats(reference_spatial), method="eigh")
    return {"inception_score": mean, "inception_score_std": std, "sfid": sfid}

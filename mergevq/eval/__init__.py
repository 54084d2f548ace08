"""Evaluation: feature extractors and generative metrics (FID, IS, sFID, precision/recall)."""

from mergevq.eval.features import (
    FeatureCache,
    RandomFeatures,
    TFInceptionFeatures,
    extract_features,
    extractor_meta,
)
from mergevq.eval.fid import (
    feature_stats,
    fid_from_features,
    frechet_distance,
    inception_score,
    inception_score_of,
    load_stats,
    precision_recall,
    save_stats,
)
from mergevq.eval.inception import FidelityInception, save_untrained_inception

__all__ = [
    "FeatureCache",
    "FidelityInception",
    "RandomFeatures",
    "TFInceptionFeatures",
    "extract_features",
    "extractor_meta",
    "feature_stats",
    "fid_from_features",
    "frechet_distance",
    "inception_score",
    "inception_score_of",
    "load_stats",
    "precision_recall",
    "save_stats",
    "save_untrained_inception",
]

"""Evaluation cards: every number together with what produced it, as JSON and Markdown.

``write_card(run_dir, card)`` validates the required fields, adds explicit warnings when a metric was
computed with untrained networks, and writes ``eval_card.json`` and ``eval_card.md`` atomically.

Required fields (a missing one is a ValueError naming all of them):
    metrics                  dict; for tokenizers {K: {metric: value}}, else {metric: value}
    checkpoint               path of the evaluated checkpoint
    checkpoint_sha256        its SHA-256 (``sha256_file``)
    weights                  'ema' or 'raw'
    keeps                    the keep counts K evaluated (list)
    image_size, resize, crop the evaluation view, e.g. 256, 'bilinear 256', 'center 256'
    num_images               images evaluated
    reference_stats_sha256   SHA-256 of precomputed FID reference statistics, or None (on the fly)
    feature_extractor        {name, weights_sha256 (None allowed when untrained), trained: bool}
    seeds                    seeds used (dict or list)
    package_versions         {torch, torchvision, torchmetrics, mergevq, numpy, scipy} (``package_versions``)
Optional: ``lpips`` {name, pretrained: bool, source}, ``warnings`` (extra lines), anything else.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergevq.runs.integrity import sha256_file  # noqa: F401 (re-exported)

from .atomic import atomic_write_text

JSON_NAME, MD_NAME = "eval_card.json", "eval_card.md"
REQUIRED = (
    "metrics", "checkpoint", "checkpoint_sha256", "weights", "keeps", "image_size", "resize", "crop",
    "num_images", "reference_stats_sha256", "feature_extractor", "seeds", "package_versions",
)
NULLABLE = {"reference_stats_sha256"}  # present but None is fine
FEATURE_EXTRACTOR_KEYS = ("name", "weights_sha256", "trained")
PACKAGES = ("torch", "torchvision", "torchmetrics", "mergevq", "numpy", "scipy")
WEIGHTS = ("ema", "raw")
UNTRAINED_FID = "FID computed with UNTRAINED random features: not comparable to published rFID"
UNTRAINED_LPIPS = "LPIPS computed with an UNTRAINED (random) backbone: not comparable to published LPIPS"


def package_version(name: str) -> str | None:
    """Installed version of a distribution, None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_versions(*extra: str) -> dict[str, str | None]:
    """Installed versions of the packages that change evaluation numbers (and of `extra`; None when not
    installed)."""
    return {name: package_version(name) for name in (*PACKAGES, *extra)}


def lpips_info(module: Any, name: str = "lpips-vgg") -> dict[str, Any]:
    """{name, pretrained, source} of an LPIPS module (``LPIPSLoss`` records both attributes)."""
    return {
        "name": name,
        "pretrained": bool(getattr(module, "pretrained", False)),
        "source": getattr(module, "backbone_source", None),
    }


@dataclasses.dataclass
class EvaluationCard:
    """Typed builder for a card; ``to_dict()`` gives what ``write_card`` takes."""

    metrics: dict
    checkpoint: str
    checkpoint_sha256: str
    weights: str
    keeps: list
    image_size: int
    resize: str
    crop: str
    num_images: int
    reference_stats_sha256: str | None
    feature_extractor: dict
    seeds: Any
    package_versions: dict = dataclasses.field(default_factory=package_versions)
    lpips: dict | None = None
    warnings: list = dataclasses.field(default_factory=list)
    extra: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        card = dataclasses.asdict(self)
        extra = card.pop("extra")
        return {**card, **extra}


def missing_fields(card: Mapping[str, Any]) -> list[str]:
    """Names of required fields that are absent (or None where None is not allowed), dotted for nested."""
    missing = [k for k in REQUIRED if k not in card or (card[k] is None and k not in NULLABLE)]
    extractor = card.get("feature_extractor")
    if extractor is not None:
        extractor = extractor if isinstance(extractor, Mapping) else {}
        for key in FEATURE_EXTRACTOR_KEYS:
            if key not in extractor or (extractor[key] is None and key != "weights_sha256"):
                missing.append(f"feature_extractor.{key}")
    versions = card.get("package_versions")
    if versions is not None:
        versions = versions if isinstance(versions, Mapping) else {}
        missing += [f"package_versions.{p}" for p in PACKAGES if p not in versions]
    return missing


def card_warnings(card: Mapping[str, Any]) -> list[str]:
    """The card's own warnings plus those implied by untrained feature networks (deduplicated)."""
    found = list(card.get("warnings") or [])
    if not card["feature_extractor"]["trained"]:
        found.append(UNTRAINED_FID)
    lpips = card.get("lpips")
    if isinstance(lpips, Mapping) and not lpips.get("pretrained", False):
        found.append(UNTRAINED_LPIPS)
    return list(dict.fromkeys(found))


def _jsonable(value: Any) -> Any:
    """Paths, tuples, numpy/torch scalars and non-finite floats -> plain JSON values (NaN/inf -> None)."""
    if isinstance(value, Mapping):
        return {("null" if k is None else str(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def _metrics_table(metrics: Mapping[str, Any]) -> list[str]:
    """Per-K metrics ({K: {name: value}}) -> one row per K; flat metrics -> name | value rows."""
    if metrics and all(isinstance(v, Mapping) for v in metrics.values()):
        names = list(dict.fromkeys(name for row in metrics.values() for name in row))
        lines = ["| K | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for keep, row in metrics.items():
            lines.append(f"| {keep} | " + " | ".join(_fmt(row.get(n)) for n in names) + " |")
        return lines
    return ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]


def render_markdown(card: Mapping[str, Any]) -> str:
    """Warnings in bold at the top, the metrics table, then every other field."""
    lines = ["# Evaluation card", ""]
    for warning in card.get("warnings", []):
        lines.append(f"**WARNING: {warning}**")
        lines.append("")
    lines += ["## Metrics", "", *_metrics_table(card["metrics"]), "", "## Provenance", ""]
    for key, value in card.items():
        if key not in ("metrics", "warnings"):
            lines.append(f"- **{key}**: `{json.dumps(value, sort_keys=True)}`")
    return "\n".join(lines) + "\n"


def write_card(run_dir: str | Path, card: Mapping[str, Any] | EvaluationCard) -> tuple[Path, Path]:
    """Validate, add warnings, write ``eval_card.json`` and ``eval_card.md`` atomically -> (json, md)."""
    if isinstance(card, EvaluationCard):
        card = card.to_dict()
    missing = missing_fields(card)
    if missing:
        raise ValueError(f"evaluation card is missing required fields: {', '.join(missing)}")
    if card["weights"] not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {card['weights']!r}")
    full = _jsonable({**card, "warnings": card_warnings(card)})
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = run_dir / JSON_NAME, run_dir / MD_NAME
    atomic_write_text(json_path, json.dumps(full, indent=2, sort_keys=False) + "\n")
    atomic_write_text(md_path, render_markdown(full))
    return json_path, md_path

"""The value a training entry returns to a Hydra sweeper (Optuna): ``optimized_metric``.

``optimized_metric`` names a validation value ``val/k{K}/{key}`` (``key`` a column of
``val_per_k.csv``: psnr, l1, code_usage, ...; ``k_nominal`` = the variant's nominal K, so trials that
train with different keep-K candidates are compared at the same K) or a final training log
``final/{key}`` (rec, total, ...). null keeps the historical return value, the final ``rec``.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import UserError

log = logging.getLogger(__name__)
_VAL = re.compile(r"val/k(\d+|_nominal)/(\w+)")


def metric_keep(config: Mapping[str, Any]) -> int | None:
    """The K a ``val/k.../...`` metric reads (None for other metrics)."""
    metric = config.get("optimized_metric")
    match = _VAL.fullmatch(metric or "")
    if match is None:
        if metric and not str(metric).startswith("final/"):
            raise UserError(f"optimized_metric={metric}: use val/k<K>/<key>, val/k_nominal/<key> or final/<key>")
        return None
    if match.group(1) != "_nominal":
        return int(match.group(1))
    if config["tokenizer"].get("kind", "mergevq") != "mergevq":
        raise UserError(f"optimized_metric={metric}: tokenizer={config['tokenizer']['name']} has no merging (no "
                        "nominal K): use final/<key>")
    from ..models.factory import keep_policy

    return int(keep_policy(config["tokenizer"], config["variant"]).nominal)


def with_metric_validated(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` whose ``train.val_keeps`` includes the K the metric reads (added when missing, logged)."""
    keep = metric_keep(config)
    if keep is None:
        return config
    train = config["train"]
    keeps = train.get("val_keeps") or train.get("keep_candidates")
    if keeps is None:
        from ..models.factory import keep_policy

        keeps = list(keep_policy(config["tokenizer"], config["variant"]).candidates)
    if keep not in keeps:
        log.info("optimized_metric=%s: validating at K=%d as well", config["optimized_metric"], keep)
        config = {**config, "train": {**train, "val_keeps": [*keeps, keep]}}
    return config


def objective(config: Mapping[str, Any], final: Mapping[str, float], run_dir: str | Path) -> float:
    """The number ``optimized_metric`` names, from the run's last validation (``val_per_k.csv``,
    rank 0) or its final training logs."""
    metric = config.get("optimized_metric")
    if not metric:
        return float(final.get("rec", float("nan")))
    if metric.startswith("final/"):
        key = metric.split("/", 1)[1]
        if key not in final:
            raise UserError(f"optimized_metric={metric}: the final logs have {', '.join(sorted(final))}")
        return float(final[key])
    keep, key = metric_keep(config), _VAL.fullmatch(metric).group(2)
    table = Path(run_dir) / "val_per_k.csv"
    if not table.is_file():
        return float("nan")  # not rank 0, or no validation ran
    with table.open(newline="") as handle:
        rows = {int(float(r["keep"])): r for r in csv.DictReader(handle)}
    if keep not in rows or key not in rows[keep]:
        raise UserError(f"optimized_metric={metric}: val_per_k.csv has K {sorted(rows)} and columns "
                        f"{', '.join(next(iter(rows.values()), {}))}")
    return float(rows[keep][key])

"""Aggregate the evaluation cards of a sweep (or of any folder of runs) into one table and plots.

    python -m mergevq.entries.report <sweep or runs dir> [--out DIR]

Every ``eval_card.json`` under the directory (recursively) gives one row per (card, K): the card's
metrics at K, the evaluated run and that run's Hydra overrides. The run is the training run that wrote
the evaluated checkpoint (``<run>/checkpoints/step_*``), else the nearest folder above the card that
holds ``checkpoints/``. Its overrides come from ``<run>/.hydra/overrides.yaml``; without that file the
values of the override keys seen in other runs are read from the config stored in the checkpoint
(``state.json``) or in ``<run>/config.yaml``.

Writes into ``--out`` (default: the directory itself):
    report.md             Markdown table (override columns that differ between runs; the shared ones
                          are listed above the table) and the plots
    report.csv            every column, including every override key
    rfid_vs_k.png         rFID against K, one line per run (tokenizer cards)
    usage_vs_bits.png     codebook usage against LFQ bits (tokenizer.z_channels), when the cards cover
                          more than one codebook size (a codebook sweep)
    probe_top1_vs_k.png   linear-probe top-1 against K, one line per run and feature kind
and prints the table. Nothing is instantiated: cards, configs and overrides are read as plain data.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

CARD_NAME = "eval_card.json"
REPORT_MD, REPORT_CSV = "report.md", "report.csv"
# Metric columns first in this order (when present), then the others alphabetically.
METRIC_ORDER = (
    "rfid", "psnr", "ssim", "lpips", "code_usage", "code_entropy_bits", "code_perplexity",
    "cls_top1", "cls_top5", "mean_top1", "mean_top5", "mean_latent_top1",
    "gfid", "fid", "is", "inception_score", "inception_score_std", "sfid", "precision", "recall",
)
# Shown when no run has recorded overrides (runs started without Hydra command-line overrides).
FALLBACK_KEYS = (
    "tokenizer.name", "variant.name", "tokenizer.z_channels", "quantizer.entropy_weight", "train.keep_candidates",
    "ar.size", "generator.kind",
)
SKIPPED_METRICS = {"num_images"}  # repeated from the card's num_images column


# --------------------------------------------------------------------------------------- reading


def find_cards(root: Path) -> list[Path]:
    """Every eval_card.json under root, in natural path order (job 10 after job 9)."""
    return sorted(root.rglob(CARD_NAME), key=lambda p: natural_key(str(p.relative_to(root))))


def natural_key(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def run_dir_of(card_path: Path, card: Mapping[str, Any]) -> Path | None:
    """The training run whose checkpoint the card evaluated (None if it cannot be located)."""
    checkpoint = Path(str(card.get("checkpoint") or ""))
    if checkpoint.parent.name == "checkpoints" and checkpoint.parent.parent.is_dir():
        return checkpoint.parent.parent
    if (checkpoint / "checkpoints").is_dir():
        return checkpoint
    for folder in card_path.parents:
        if (folder / "checkpoints").is_dir():
            return folder
    return None


def read_overrides(run_dir: Path | None) -> dict[str, str] | None:
    """{key: value as typed} from <run>/.hydra/overrides.yaml; None when the file is absent."""
    if run_dir is None or not (run_dir / ".hydra" / "overrides.yaml").is_file():
        return None
    items = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    overrides = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or key.startswith("~"):
            continue  # deletions carry no value
        overrides[key.lstrip("+")] = value
    return overrides


def stored_config(card: Mapping[str, Any], run_dir: Path | None) -> dict[str, Any] | None:
    """The resolved run config: from the evaluated checkpoint's state.json, else <run>/config.yaml."""
    state = Path(str(card.get("checkpoint") or "")) / "state.json"
    if state.is_file():
        text = json.loads(state.read_text()).get("metadata", {}).get("config")
        if text:
            return yaml.safe_load(text)
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        return yaml.safe_load((run_dir / "config.yaml").read_text())
    return None


def config_value(config: Mapping[str, Any] | None, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def override_text(value: Any) -> str:
    """A config value written as a Hydra override value: [36,64], 0.1, true, null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_text(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{override_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def _number(text: Any) -> Any:
    try:
        return int(text)
    except (TypeError, ValueError):
        try:
            return float(text)
        except (TypeError, ValueError):
            return text


def card_rows(card: Mapping[str, Any]) -> list[tuple[Any, dict[str, Any]]]:
    """[(K, metrics)]: per-K metrics ({K: {name: value}}) give one row per K; flat ones give one row."""
    metrics = card.get("metrics") or {}
    if metrics and all(isinstance(v, Mapping) for v in metrics.values()):
        return [(_number(k), dict(v)) for k, v in metrics.items()]
    keeps = card.get("keeps") or [None]
    return [(keeps[0] if len(keeps) == 1 else override_text(keeps), dict(metrics))]


def collect(root: str | Path) -> list[dict[str, Any]]:
    """One record per (card, K) under root: run, card, kind, K, overrides, metrics and card metadata."""
    root = Path(root)
    records = []
    for path in find_cards(root):
        card = json.loads(path.read_text())
        run = run_dir_of(path, card)
        overrides = read_overrides(run)
        config = stored_config(card, run)
        extractor = card.get("feature_extractor") or {}
        for keep, metrics in card_rows(card):
            records.append({
                "run": _relative(run, root) if run is not None else _relative(path.parent, root),
                "card": _relative(path, root),
                "kind": card.get("kind", "tokenizer"),
                "K": keep,
                "overrides": overrides,
                "config": config,
                "metrics": {k: v for k, v in metrics.items() if k not in SKIPPED_METRICS},
                "num_images": _images(card.get("num_images")),
                "weights": card.get("weights"),
                "features": f"{extractor.get('name')}{'' if extractor.get('trained', True) else ' (untrained)'}",
            })
    _fill_overrides(records)
    kinds = {"tokenizer": 0, "linear_probe": 1, "generator": 2}
    records.sort(key=lambda r: (kinds.get(r["kind"], 3), r["kind"], natural_key(r["run"]), natural_key(str(r["K"])),
                                natural_key(r["card"])))
    return records


def _relative(path: Path, root: Path) -> str:
    try:
        text = str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)
    return "." if text == "." else text


def _images(value: Any) -> Any:
    if isinstance(value, Mapping):  # linear probe: {train, test}
        return "/".join(f"{k} {v}" for k, v in value.items())
    return value


def _fill_overrides(records: list[dict[str, Any]]) -> None:
    """Runs without overrides.yaml: the values of the keys other runs overrode, from their config."""
    keys = override_keys(records)
    if not keys:
        keys = [k for k in FALLBACK_KEYS if any(config_value(r["config"], k) is not None for r in records)]
    for record in records:
        if record["overrides"] is None:
            record["overrides"] = {
                key: override_text(config_value(record["config"], key))
                for key in keys if config_value(record["config"], key) is not None
            }


def override_keys(records: Iterable[Mapping[str, Any]]) -> list[str]:
    keys: dict[str, None] = {}
    for record in records:
        keys.update(dict.fromkeys(record["overrides"] or {}))
    return list(keys)


def metric_names(records: Iterable[Mapping[str, Any]]) -> list[str]:
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record["metrics"]))
    ordered = [n for n in METRIC_ORDER if n in names]
    return ordered + sorted(n for n in names if n not in ordered)


def varying_keys(records: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """(override keys whose value differs between records, {key: value} shared by all records)."""
    varying, common = [], {}
    for key in keys:
        values = {r["overrides"].get(key) for r in records}
        if len(values) > 1 or None in values:
            varying.append(key)
        else:
            common[key] = values.pop()
    return varying, common


# --------------------------------------------------------------------------------------- writing


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) >= 1e4 or (value != 0 and abs(value) < 1e-3) else f"{value:.4f}"
    return str(value)


def table_columns(records: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str], dict[str, str], list[str]]:
    keys = override_keys(records)
    varying, common = varying_keys(records, keys)
    return keys, varying, common, metric_names(records)


def write_csv(records: Sequence[Mapping[str, Any]], path: Path) -> Path:
    keys, _, _, metrics = table_columns(records)
    header = ["run", "kind", "K", *keys, *metrics, "num_images", "weights", "features", "card"]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for r in records:
            writer.writerow([
                r["run"], r["kind"], r["K"], *(r["overrides"].get(k, "") for k in keys),
                *("" if r["metrics"].get(m) is None else r["metrics"][m] for m in metrics),
                r["num_images"], r["weights"], r["features"], r["card"],
            ])
    return path


def markdown_table(records: Sequence[Mapping[str, Any]]) -> str:
    """One table per card kind (tokenizer, linear_probe, generator); metric columns empty for a whole
    kind are left out; overrides shared by every row are listed once above the tables."""
    _, varying, common, _ = table_columns(records)
    text = ""
    if common:
        text = "Shared overrides: " + " ".join(f"`{k}={v}`" for k, v in common.items()) + "\n\n"
    kinds = list(dict.fromkeys(r["kind"] for r in records))
    for kind in kinds:
        rows = [r for r in records if r["kind"] == kind]
        metrics = [m for m in metric_names(rows) if any(r["metrics"].get(m) is not None for r in rows)]
        header = ["run", "K", *varying, *metrics, "images", "features"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in rows:
            cells = [r["run"], r["K"], *(r["overrides"].get(k, "-") for k in varying),
                     *(r["metrics"].get(m) for m in metrics), r["num_images"], r["features"]]
            lines.append("| " + " | ".join(fmt(c).replace("|", "\\|") for c in cells) + " |")
        if len(kinds) > 1:
            text += f"## {kind}\n\n"
        text += "\n".join(lines) + "\n\n"
    return text


def run_label(record: Mapping[str, Any], varying: Sequence[str], skip: Sequence[str] = ()) -> str:
    parts = [f"{k}={record['overrides'].get(k, '-')}" for k in varying if k not in skip]
    return " ".join(parts) if parts else record["run"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_lines(series: Mapping[tuple[str, str], Sequence[tuple[float, float]]], path: Path, xlabel: str,
               ylabel: str, title: str) -> Path:
    """One line per (run, label) key from its (x, y) points, sorted by x, labelled with the label
    -> the PNG at path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for (_, label), points in series.items():
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_rfid_vs_k(records: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    rows = [r for r in records if r["kind"] == "tokenizer" and _numeric(r["metrics"].get("rfid")) and _numeric(r["K"])]
    if not rows:
        return None
    _, varying, _, _ = table_columns(rows)
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in rows:
        series.setdefault((r["run"], run_label(r, varying)), []).append((r["K"], r["metrics"]["rfid"]))
    untrained = any("(untrained)" in r["features"] for r in rows)
    return plot_lines(series, path, "kept tokens K", "rFID" + (" (untrained features)" if untrained else ""), "rFID vs K")


def plot_usage_vs_bits(records: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    rows = [r for r in records if r["kind"] == "tokenizer" and _numeric(r["metrics"].get("code_usage"))
            and _numeric(config_value(r["config"], "tokenizer.z_channels"))]
    if len({config_value(r["config"], "tokenizer.z_channels") for r in rows}) < 2:
        return None
    _, varying, _, _ = table_columns(rows)
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in rows:  # one line per setting other than the bits, across runs
        label = run_label(r, varying, skip=("tokenizer.z_channels",))
        label = f"{label}, K={r['K']}" if label != r["run"] else f"K={r['K']}"
        series.setdefault((label, label), []).append((config_value(r["config"], "tokenizer.z_channels"), r["metrics"]["code_usage"]))
    return plot_lines(series, path, "LFQ bits (codebook 2^bits)", "codebook usage (fraction of codes seen)",
                      "codebook usage vs bits")


def plot_probe_vs_k(records: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    rows = [r for r in records if r["kind"] == "linear_probe" and _numeric(r["K"])]
    names = [m for m in metric_names(rows) if m.endswith("_top1") and not m.endswith("train_top1")]
    if not rows or not names:
        return None
    _, varying, _, _ = table_columns(rows)
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in rows:
        for name in names:
            if _numeric(r["metrics"].get(name)):
                label = f"{run_label(r, varying)} {name.removesuffix('_top1')}"
                series.setdefault((r["run"], label), []).append((r["K"], 100 * r["metrics"][name]))
    return plot_lines(series, path, "kept tokens K", "linear-probe top-1 (%)", "linear probe vs K")


def write_report(records: Sequence[Mapping[str, Any]], out: str | Path, source: str | Path = "") -> dict[str, Path]:
    """report.md, report.csv and the plots that apply -> {name: path}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {"csv": write_csv(records, out / REPORT_CSV)}
    plots = {
        "rfid_vs_k": plot_rfid_vs_k(records, out / "rfid_vs_k.png"),
        "usage_vs_bits": plot_usage_vs_bits(records, out / "usage_vs_bits.png"),
        "probe_top1_vs_k": plot_probe_vs_k(records, out / "probe_top1_vs_k.png"),
    }
    cards = len({r["card"] for r in records})
    lines = [f"# Report: {source}", "", f"{len(records)} rows from {cards} evaluation cards.", "",
             markdown_table(records)]
    if any("(untrained)" in r["features"] for r in records):
        lines += ["Rows with `(untrained)` features: FID from an untrained network, not comparable to published numbers.", ""]
    for name, path in plots.items():
        if path is not None:
            lines += [f"![{name}]({path.name})", ""]
            written[name] = path
    (out / REPORT_MD).write_text("\n".join(lines))
    written["md"] = out / REPORT_MD
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mergevq.entries.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="a sweep dir (multirun/...) or any folder of runs")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: ROOT)")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"error: {args.root} is not a directory", file=sys.stderr)
        return 2
    records = collect(args.root)
    if not records:
        print(f"error: no {CARD_NAME} under {args.root}: evaluate the runs first "
              "(python -m mergevq.entries.evaluate ckpt=<run dir>, or mergevq.entries.probe)", file=sys.stderr)
        return 1
    written = write_report(records, args.out or args.root, source=args.root)
    print(markdown_table(records))
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`make demo` report: after the demo's runs, collect what they produced.

    python -m mergevq.entries.demo_report RUN_DIR

Writes RUN_DIR/per_k.md (PSNR, L1 and code usage per K on the held-out split, from the final
validation; rFID, PSNR and the class accuracy of the reconstructions per K from the evaluation card in
RUN_DIR/eval when present; one row per generator), RUN_DIR/generation.json (one object per generator
sampled in RUN_DIR/samples_<kind>: ``GENERATION_KEYS``), RUN_DIR/reconstructions.png (originals, then one
row per K) and RUN_DIR/index.html (all of it on one page, with the merge maps and every route's samples),
and prints the tables.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import shutil
from pathlib import Path

from ..runs.atomic import atomic_write_text
from ..runs.html_report import figure, latest, page, table

GENERATORS = ("raster", "mergear", "randar")
GENERATION_KEYS = ("generator", "keep", "window", "prefix_tokens", "positions", "steps", "num_samples",
                   "class_accuracy", "classifier_accuracy", "gfid", "precision", "recall", "tokens_per_s",
                   "images_per_s", "groups_mean", "groups_max", "peak_kv_mean", "peak_kv_max")
GENERATION_COLUMNS = ("generator", "keep", "steps", "num_samples", "class_accuracy", "gfid", "precision", "recall",
                      "tokens_per_s", "images_per_s", "groups_mean", "peak_kv_mean", "peak_kv_max")


def per_k_markdown(rows: list[dict], text_columns: tuple[str, ...] = ("keep",)) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [str(row[c]) if c in text_columns or row[c] in (None, "") else f"{float(row[c]):.4f}" for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def generation_rows(run_dir: Path) -> list[dict]:
    """One row per generator sampled under run_dir/samples_<kind> (sampling.json + eval_card.json)."""
    rows = []
    for kind in GENERATORS:
        sampling = run_dir / f"samples_{kind}" / "sampling.json"
        if not sampling.is_file():
            continue
        stats, evaluation = read_json(sampling), read_json(run_dir / f"samples_{kind}" / "eval_card.json")
        metrics = evaluation.get("metrics", {})
        row = {key: stats.get(key, metrics.get(key)) for key in GENERATION_KEYS}
        row.update(generator=kind, gfid=metrics.get("gfid", float("nan")),
                   classifier_accuracy=evaluation.get("classifier_accuracy"),
                   class_accuracy_per_class=(evaluation.get("class_accuracy") or {}).get("per_class"),
                   gfid_note=f"small-sample gFID ({stats.get('num_samples')} samples vs "
                             f"{evaluation.get('reference', {}).get('num_images', '?')} held-out images): trend only")
        if row["keep"] is None:
            row["keep"] = stats.get("positions")  # the raster baseline keeps every position
        rows.append(row)
    return rows


def eval_rows(card: dict) -> list[dict]:
    """Per-K rows of a tokenizer evaluation card: rFID, PSNR, SSIM and, with a classifier, the class
    accuracy of the reconstructions (true groups, then Source Recovery's)."""
    rows = []
    for k, m in card.get("metrics", {}).items():
        row = {"keep": k, "rfid": m["rfid"], "psnr": m["psnr"], "ssim": m["ssim"]}
        for key in ("class_accuracy", "psnr_recovered", "class_accuracy_recovered", "recovery_accuracy"):
            if key in m:
                row[key] = m[key]
        rows.append(row)
    return rows


def per_class_rows(generators: list[dict]) -> list[dict]:
    """One row per class: each route's fraction of samples the classifier assigns to their class."""
    scored = [g for g in generators if g.get("class_accuracy_per_class")]
    classes = sorted({int(c) for g in scored for c in g["class_accuracy_per_class"]})
    return [{"class": c, **{g["generator"]: g["class_accuracy_per_class"].get(str(c), g["class_accuracy_per_class"].get(c))
                            for g in scored}} for c in classes]


def sample_figure(run_dir: Path, row: dict) -> str:
    grid = Path(f"samples_{row['generator']}") / "samples.png"
    if not (run_dir / grid).is_file():
        return ""
    accuracy = row.get("class_accuracy")
    parts = [f"{row['generator']}, K = {row['keep']}, {row['num_samples']} samples, one row per class"]
    if accuracy is not None:
        parts.append(f"class accuracy {accuracy:.3f}")
    parts.append(f"gFID {row['gfid']:.1f} (trend only)")
    return figure(grid, "; ".join(parts))


def summary_line(val_rows: list[dict], generators: list[dict]) -> str:
    """The demo in one sentence: held-out PSNR at every validated K (largest first), each route's class accuracy."""
    parts = []
    if val_rows:
        rows = val_rows[::-1]
        psnr = " / ".join(f"{float(r['psnr']):.2f}" for r in rows)
        parts.append(f"tokenizer PSNR {psnr} dB at K = {' / '.join(str(r['keep']) for r in rows)}")
    accuracies = [f"{g['generator']} {g['class_accuracy']:.3f}" for g in generators if g.get("class_accuracy") is not None]
    if accuracies:
        parts.append("class accuracy of the samples: " + ", ".join(accuracies))
    return "; ".join(parts)


def write_index(run_dir: Path, val_rows: list[dict], card: dict, generators: list[dict]) -> Path:
    """run_dir/index.html: the demo on one page (images linked relative to run_dir)."""
    keeps = ", ".join(r["keep"] for r in val_rows)
    pictures = [figure("reconstructions.png", f"held-out originals (top row), then one row per K = {keeps}")]
    maps = latest(run_dir / "images", "merge_maps")
    if maps:
        pictures.append(figure(maps.relative_to(run_dir), "merge maps: originals, then each kept token's region "
                                                          f"per K = {keeps}"))
    sections = [("Tokenizer: reconstructions and merge maps", '<div class="grid">' + "".join(pictures) + "</div>"),
                ("Validation per K (held-out split, end of training)", table(val_rows))]
    if card:
        classifier = card.get("classifier") or {}
        note = ""
        if classifier:
            note = (f'<p class="note">class accuracy: a pixel CNN trained on the training split (held-out accuracy '
                    f'{classifier["held_out_accuracy"]:.3f}); the originals score {classifier["original_class_accuracy"]:.3f}'
                    f" on these {card['num_images']} images. *_recovered: decoded with the groups Source Recovery "
                    "predicts from the K codes.</p>")
        plot = figure("eval/per_k.png", "rFID and PSNR against K") if (run_dir / "eval" / "per_k.png").is_file() else ""
        sections.append((f"Evaluation ({card['num_images']} held-out images, {card['feature_extractor']['name']})",
                         table(eval_rows(card)) + note + plot))
    if generators:
        sections.append(("Class-conditional samples (one row per class)", '<div class="grid wide">' + "".join(
            sample_figure(run_dir, row) for row in generators) + "</div>"))
        sections.append(("Generation routes", table(generators, GENERATION_COLUMNS)
                         + '<p class="note">class accuracy, gFID, precision and recall from fewer than 1,000 samples: '
                           "trend only.</p>"))
        per_class = per_class_rows(generators)
        if per_class:
            sections.append(("Class accuracy per class (row order of the sample grids)", table(per_class)))
    links = " | ".join(f'<a href="{name}">{name}</a>' for name in ("per_k.md", "generation.json", "report.html",
                                                                    "eval/eval_card.md") if (run_dir / name).is_file())
    intro = f"<p><b>{html.escape(summary_line(val_rows, generators))}</b></p><p>{html.escape(str(run_dir))}: {links}</p>"
    path = run_dir / "index.html"
    atomic_write_text(path, page("mergevq demo", sections, intro=intro))
    return path


def report(run_dir: Path) -> tuple[Path, Path]:
    table_file = run_dir / "val_per_k.csv"
    grid = latest(run_dir / "images", "reconstructions")
    if not table_file.is_file() or grid is None:
        raise FileNotFoundError(f"{run_dir} has no validation results yet: run `make demo` (training) first")
    with table_file.open() as handle:
        rows = list(csv.DictReader(handle))
    markdown = run_dir / "per_k.md"
    text = f"# G+R tokenizer, held-out reconstructions per K ({grid.stem})\n\n" + per_k_markdown(rows)
    card = read_json(run_dir / "eval" / "eval_card.json")
    if card:
        text += (f"\n## Evaluation ({card['num_images']} held-out images, "
                 f"{card['feature_extractor']['name']} features; card: eval/eval_card.md, plot: eval/per_k.png)\n\n")
        text += "".join(f"**{w}**\n\n" for w in card.get("warnings", [])) + per_k_markdown(eval_rows(card))
        if card.get("classifier"):
            text += (f"\nClass accuracy of the originals: {card['classifier']['original_class_accuracy']:.4f} "
                     f"(classifier held-out accuracy {card['classifier']['held_out_accuracy']:.4f}).\n")
    generators = generation_rows(run_dir)
    if generators:
        atomic_write_text(run_dir / "generation.json", json.dumps(generators, indent=2))
        text += ("\n## Class-conditional generation (samples_*/samples.png; class accuracy and small-sample gFID "
                 "against held-out images, trend only; generation.json)\n\n"
                 + per_k_markdown([{c: g[c] for c in GENERATION_COLUMNS} for g in generators],
                                  text_columns=("generator", "keep", "steps", "num_samples")))
    atomic_write_text(markdown, text)
    shutil.copyfile(grid, run_dir / "reconstructions.png")
    index = write_index(run_dir, rows, card, generators)
    print(text)
    print(f"grid (originals, then K = {', '.join(r['keep'] for r in rows)}): {run_dir / 'reconstructions.png'}")
    print(f"page: {index}")
    return markdown, run_dir / "reconstructions.png"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mergevq.entries.demo_report",
                                     description="Summarise a `make demo` run directory (per-K table, generation rows, index.html).")
    parser.add_argument("run_dir", nargs="?", default="outputs/demo")
    args = parser.parse_args(argv)
    try:
        report(Path(args.run_dir))
    except FileNotFoundError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()

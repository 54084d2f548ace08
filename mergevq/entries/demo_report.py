"""`make demo` report: after the tiny tokenizer's training run, collect what it produced.

    python -m mergevq.entries.demo_report RUN_DIR

Writes RUN_DIR/per_k.md (PSNR, L1 and code usage per K on the held-out split, from the final
validation; rFID and PSNR per K from the evaluation card in RUN_DIR/eval when present; one row per
generator), RUN_DIR/generation.json (one object per generator sampled in RUN_DIR/samples_<kind>:
``GENERATION_KEYS``) and RUN_DIR/reconstructions.png (originals, then one row per K), and prints them.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path


def per_k_markdown(rows: list[dict[str, str]], text_columns: tuple[str, ...] = ("keep",)) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row[c] if c in text_columns else f"{float(row[c]):.4f}" for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


GENERATORS = ("raster", "mergear", "randar")
GENERATION_KEYS = ("generator", "keep", "window", "prefix_tokens", "positions", "steps", "num_samples", "gfid",
                   "tokens_per_s", "images_per_s", "groups_mean", "groups_max", "peak_kv_mean", "peak_kv_max")


def generation_rows(run_dir: Path) -> list[dict]:
    """One row per generator sampled under run_dir/samples_<kind> (sampling.json + eval_card.json)."""
    rows = []
    for kind in GENERATORS:
        sampling, card = run_dir / f"samples_{kind}" / "sampling.json", run_dir / f"samples_{kind}" / "eval_card.json"
        if not sampling.is_file():
            continue
        stats = json.loads(sampling.read_text())
        evaluation = json.loads(card.read_text()) if card.is_file() else {}
        row = {key: stats.get(key) for key in GENERATION_KEYS}
        row.update(generator=kind, gfid=evaluation.get("metrics", {}).get("gfid", float("nan")),
                   gfid_note=f"small-sample gFID ({stats.get('num_samples')} samples vs "
                             f"{evaluation.get('reference', {}).get('num_images', '?')} held-out images): trend only")
        if row["keep"] is None:
            row["keep"] = stats.get("positions")  # the raster baseline keeps every position
        rows.append(row)
    return rows


def report(run_dir: Path) -> tuple[Path, Path]:
    table = run_dir / "val_per_k.csv"
    grids = sorted((run_dir / "images").glob("reconstructions_step*.png"))
    if not table.is_file() or not grids:
        raise FileNotFoundError(f"{run_dir} has no validation results yet: run `make demo` (training) first")
    with table.open() as handle:
        rows = list(csv.DictReader(handle))
    markdown = run_dir / "per_k.md"
    text = f"# Tiny G+R tokenizer, held-out reconstructions per K ({grids[-1].stem})\n\n" + per_k_markdown(rows)
    card = run_dir / "eval" / "eval_card.json"
    if card.is_file():
        evaluation = json.loads(card.read_text())
        eval_rows = [{"keep": k, "rfid": str(m["rfid"]), "psnr": str(m["psnr"]), "ssim": str(m["ssim"])}
                     for k, m in evaluation["metrics"].items()]
        text += (f"\n## Evaluation ({evaluation['num_images']} held-out images, "
                 f"{evaluation['feature_extractor']['name']} features; card: eval/eval_card.md, plot: eval/per_k.png)\n\n")
        text += "".join(f"**{w}**\n\n" for w in evaluation.get("warnings", [])) + per_k_markdown(eval_rows)
    generators = generation_rows(run_dir)
    if generators:
        (run_dir / "generation.json").write_text(json.dumps(generators, indent=2))
        columns = ("generator", "keep", "steps", "gfid", "tokens_per_s", "images_per_s", "groups_mean", "groups_max",
                   "peak_kv_mean", "peak_kv_max")
        table = [{c: str(g[c]) for c in columns} for g in generators]
        text += ("\n## Class-conditional generation (samples_*/samples.png; small-sample gFID against held-out "
                 "images, TF-Inception features; generation.json)\n\n"
                 + per_k_markdown(table, text_columns=("generator", "keep", "steps", "groups_max", "peak_kv_max")))
    markdown.write_text(text)
    grid = run_dir / "reconstructions.png"
    shutil.copyfile(grids[-1], grid)
    print(markdown.read_text())
    print(f"grid (originals, then K = {', '.join(r['keep'] for r in rows)}): {grid}")
    return markdown, grid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mergevq.entries.demo_report",
                                     description="Summarise a `make demo` run directory (per-K table, generation rows).")
    parser.add_argument("run_dir", nargs="?", default="outputs/demo")
    args = parser.parse_args(argv)
    try:
        report(Path(args.run_dir))
    except FileNotFoundError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()

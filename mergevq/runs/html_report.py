"""A local HTML page for a run (what W&B would show when it is offline or not used): the latest
validation images, the per-K table and the metrics CSV, refreshed after every validation."""

from __future__ import annotations

import csv
import html
from pathlib import Path

from .atomic import atomic_write_text


def _table(path: Path) -> str:
    if not path.is_file():
        return "<p>no table yet</p>"
    with path.open() as handle:
        rows = list(csv.reader(handle))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(cell: str) -> str:
    try:
        return f"{float(cell):.4g}"
    except ValueError:
        return cell


def write_run_report(run_dir: Path, step: int, title: str) -> Path:
    """run_dir/report.html: newest reconstruction and merge-map PNGs, per-K table, links."""
    images = run_dir / "images"
    figures = []
    for prefix, caption in (("reconstructions", "originals, then one row per K"),
                            ("merge_maps", "merge maps: each kept token's region, one row per K")):
        found = sorted(images.glob(f"{prefix}_step*.png"))
        if found:
            rel = found[-1].relative_to(run_dir)
            figures.append(f'<figure><img src="{rel}" style="image-rendering: pixelated; width: 100%">'
                           f"<figcaption>{html.escape(caption)} ({found[-1].stem})</figcaption></figure>")
    links = [f'<a href="{name}">{name}</a>' for name in ("metrics.csv", "val_per_k.csv", "config.yaml", "eval/eval_card.md")
             if (run_dir / name).is_file()]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}</style></head><body>
<h1>{html.escape(title)}</h1><p>step {step}; {' | '.join(links)}</p>
<h2>Validation per K</h2>{_table(run_dir / "val_per_k.csv")}
<h2>Images</h2>{''.join(figures)}</body></html>
"""
    path = run_dir / "report.html"
    atomic_write_text(path, page)
    return path

"""Local HTML pages (what W&B would show when it is offline or not used), built from three pieces:
``table`` (rows of dicts or a CSV file), ``figure`` (an image with its caption) and ``page`` (a title and
sections). ``write_run_report`` is a training run's page: the latest validation images, the per-K table
and the metrics CSV, refreshed after every validation."""

from __future__ import annotations

import csv
import html
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .atomic import atomic_write_text

STYLE = """body{font-family:sans-serif;max-width:1100px;margin:auto;padding:0 12px}
table{border-collapse:collapse;margin:8px 0;display:block;overflow-x:auto;max-width:100%}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#f3f3f3}figure{margin:12px 0}figure img{image-rendering:pixelated;max-width:100%}
figcaption{color:#444;font-size:90%}.note{color:#666;font-size:90%}.grid{display:flex;flex-wrap:wrap;gap:16px}
.grid figure{flex:1 1 300px}.grid figure img{width:100%}.wide figure{flex:1 1 600px}"""


def fmt(value) -> str:
    """A cell: floats to 4 significant digits, None as '', everything else as text."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    try:
        return f"{float(value):.4g}" if isinstance(value, str) and "." in value else str(value)
    except ValueError:
        return str(value)


def table(rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts -> an HTML table (columns: the first row's keys unless given)."""
    if not rows:
        return "<p>no table yet</p>"
    columns = list(columns or rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(row.get(c)))}</td>" for c in columns) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def csv_table(path: Path) -> str:
    if not path.is_file():
        return "<p>no table yet</p>"
    with path.open() as handle:
        return table(list(csv.DictReader(handle)))


def figure(src: str | Path, caption: str, width: str | None = None) -> str:
    """An image (path relative to the page) with its caption."""
    style = f' style="width:{width}"' if width else ""
    return (f'<figure><img src="{html.escape(str(src))}" alt="{html.escape(caption)}"{style}>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def page(title: str, sections: Iterable[tuple[str, str]], intro: str = "") -> str:
    """A whole page: the title, an intro paragraph (HTML) and (heading, HTML body) sections."""
    body = "".join(f"<h2>{html.escape(heading)}</h2>{content}" for heading, content in sections)
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{intro}{body}</body></html>\n")


def latest(folder: Path, prefix: str) -> Path | None:
    """The newest ``<prefix>_step*.png`` in folder (None when there is none)."""
    found = sorted(folder.glob(f"{prefix}_step*.png"))
    return found[-1] if found else None


def write_run_report(run_dir: Path, step: int, title: str) -> Path:
    """run_dir/report.html: newest reconstruction and merge-map PNGs, per-K table, links."""
    figures = []
    for prefix, caption in (("reconstructions", "originals, then one row per K"),
                            ("merge_maps", "merge maps: each kept token's region, one row per K")):
        found = latest(run_dir / "images", prefix)
        if found:
            figures.append(figure(found.relative_to(run_dir), f"{caption} ({found.stem})", width="100%"))
    links = [f'<a href="{name}">{name}</a>' for name in ("metrics.csv", "val_per_k.csv", "config.yaml", "eval/eval_card.md")
             if (run_dir / name).is_file()]
    text = page(title, [("Validation per K", csv_table(run_dir / "val_per_k.csv")), ("Images", "".join(figures))],
                intro=f"<p>step {step}; {' | '.join(links)}</p>")
    path = run_dir / "report.html"
    atomic_write_text(path, text)
    return path

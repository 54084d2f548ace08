"""Benchmark (not a test): what a *trained* MergeAR realises, beside the forced-group figures of
``ar_cache``, and how the duplicate rules match the tokenizer's groups on a real code cache.

    python -m mergevq.benchmarks.ar_trained --ckpt outputs/demo/ar_mergear [--raster outputs/demo/ar_raster]
        [--keeps 25,36,49,64] [--budgets strict,soft,off] [--samples 40] [--codes outputs/demo/codes_mergear]

For each K (merge instruction) and budget mode it samples ``--samples`` class-balanced images and
reports the groups realised (mean, max), the peak KV-cache entries per sample (mean, max) and
tokens/s; with ``--raster`` the raster baseline's row at the same settings. With ``--codes`` (a code
cache from ``mergevq.entries.pretokenize``) it reports per K the groups each inference rule finds in the
ground-truth code grids and how often the rule's first occurrences (hence its mask) agree with the
tokenizer's groups. Prints tables and writes JSON (default outputs/bench/ar_trained.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..data.code_cache import CodeCache
from ..models.generate import generate
from ..models.mergear import DUPLICATE_RULES, keep_index, representative, rule_groups
from ..runs.restore import load_trained_generator
from .common import machine


def sample_row(model, labels: torch.Tensor, batch: int, **options) -> dict:
    """Sample labels in batches -> groups / peak KV (mean, max per sample) and tokens/s."""
    groups, peaks, seconds = [], [], 0.0
    for start in range(0, len(labels), batch):
        _, stats = generate(model, labels[start : start + batch], seed=start, **options)
        groups.append(torch.as_tensor(stats["num_groups"]).float())
        peaks.append(stats["peak_cache_per_row"].float())
        seconds += stats["seconds"]
    groups, peaks = torch.cat(groups), torch.cat(peaks)
    return {"groups_mean": float(groups.mean()), "groups_max": int(groups.max()), "peak_kv_mean": float(peaks.mean()),
            "peak_kv_max": int(peaks.max()), "tokens_per_s": len(labels) * model.args.seq_len / seconds}


def trained_rows(ckpt: str, raster: str | None, keeps: list[int], budgets: list[str], samples: int, batch: int,
                 cfg_scale: float) -> list[dict]:
    model, mergear, _, meta, _ = load_trained_generator(ckpt)
    classes = meta["classes"]
    labels = torch.tensor([classes[i % len(classes)] for i in range(samples)])
    common = dict(cfg_scale=cfg_scale)
    rows = []
    if raster:
        raster_model = load_trained_generator(raster)[0]
        rows.append({"generator": "raster", "keep": raster_model.args.seq_len, "budget": "-",
                     **sample_row(raster_model, labels, batch, **common)})
    for keep in keeps:
        for budget in budgets:
            options = dict(mergear=True, keep=int(keep_index(keep, mergear.keep_options)), window=mergear.window,
                           duplicate_rule=mergear.duplicate_rule, budget=budget, budget_keep=keep, **common)
            rows.append({"generator": "mergear", "keep": keep, "budget": budget, "window": mergear.window,
                         "prefix_tokens": model.args.prefix_tokens, **sample_row(model, labels, batch, **options)})
    return rows


def rule_rows(codes_dir: str, limit: int) -> list[dict]:
    """Per K of the cache: the groups each rule finds in the true code grids, and the fraction of
    positions whose first-occurrence flag (which decides every mask column) equals the tokenizer's."""
    cache = CodeCache(codes_dir)
    items = [cache[i] for i in range(min(len(cache), limit))]
    grid = cache.grid
    rows = []
    for keep in sorted({int(item["keep"]) for item in items}):
        subset = [item for item in items if int(item["keep"]) == keep]
        codes = torch.stack([item["grid_codes"] for item in subset])
        true_first = representative(torch.stack([item["groups"] for item in subset]))[1]
        row = {"keep": keep, "images": len(subset)}
        for rule in DUPLICATE_RULES:
            first = representative(rule_groups(codes, grid, rule))[1]
            row[f"{rule}_groups"] = float(first.sum(1).float().mean())
            row[f"{rule}_agreement"] = float((first == true_first).float().mean())
        rows.append(row)
    return rows


def _table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join([" | ".join(columns)] + [" | ".join(fmt(r.get(c, "")) for c in columns) for r in rows])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="a MergeAR training run (or checkpoint dir)")
    parser.add_argument("--raster", help="a raster training run for the baseline row")
    parser.add_argument("--keeps", default=None, help="merge instructions K (default: every keep option)")
    parser.add_argument("--budgets", default="strict,soft,off")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--codes", help="a code cache: measure the duplicate rules on its true code grids")
    parser.add_argument("--limit", type=int, default=2048, help="cache items read for the rule table")
    parser.add_argument("--out", default="outputs/bench/ar_trained.json")
    args = parser.parse_args(argv)
    if not args.ckpt and not args.codes:
        parser.error("give --ckpt (a trained MergeAR run) and/or --codes (a code cache)")
    with torch.no_grad():
        return _run(args)


def _run(args) -> dict:
    result: dict = {"machine": machine()}
    if args.ckpt:
        keeps = ([int(k) for k in args.keeps.split(",")] if args.keeps
                 else list(load_trained_generator(args.ckpt)[1].keep_options))
        result["sampling"] = trained_rows(args.ckpt, args.raster, keeps, args.budgets.split(","), args.samples,
                                          args.batch, args.cfg_scale)
        print(_table(result["sampling"]))
    if args.codes:
        result["rules"] = rule_rows(args.codes, args.limit)
        print(_table(result["rules"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()

"""Benchmark (not a test): raster AR vs MergeAR vs RandAR generation at the same model size and K.

    python -m mergevq.benchmarks.ar_randar [--size tiny] [--grids 16,32] [--keeps 144,256] [--steps auto]

Each route samples whole images the way ``mergevq.entries.sample`` does (model passes, the factorised heads,
sampling by ``sample_categorical``), with the same weights wherever the shapes agree:
raster generates the L codes in L passes; MergeAR the L positions of a K-group sequence in L passes
(``budget=strict``: exactly K groups, eviction window ``--window``); RandAR the K merged tokens in
``--steps`` passes (auto: 64 for K = 144, 88 for K = 256, else ceil(K * 88 / 256)). Decoding to pixels
is not included. Reports forward passes per image, tokens/s (generated tokens: L for raster /
MergeAR, K for RandAR), images/s, peak KV entries and bytes: the fastest of ``--repeats`` rounds
after one warm-up, the routes interleaved within a round so load changes hit all of them alike.
Writes JSON (default outputs/bench/ar_randar.json). ``ar_cache`` measures the caches alone.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..models.generate import generate
from ..models.gpt import GPT
from ..models.positions import default_steps, uniform_positions
from ..models.randar import generate_randar
from .common import fastest_of_rounds, generator_models, kv_bytes, machine

ROUTES = ("raster", "mergear", "randar")


def route_samplers(models: dict[str, GPT], batch: int, keep: int, steps: int, window: int, cfg_scale: float,
                   device: str) -> dict[str, Callable[[int], dict]]:
    """route -> sample(seed) -> generation stats (peak_cache, steps, ...)."""
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    length = models["raster"].args.seq_len
    positions = uniform_positions(batch, keep, length, torch.Generator().manual_seed(0)).to(device)
    options = {"cfg_scale": cfg_scale}
    return {
        "raster": lambda seed: generate(models["raster"], labels, seed=seed, **options)[1],
        "mergear": lambda seed: generate(models["mergear"], labels, seed=seed, keep=0, mergear=True, window=window,
                                         budget="strict", budget_keep=keep, **options)[1],
        "randar": lambda seed: generate_randar(models["randar"], labels, positions, steps, seed=seed, **options)[1],
    }


def bench(size: str, side: int, keep: int, steps: int | None, window: int, batch: int, device: str = "cpu",
          repeats: int = 2, cfg_scale: float = 1.0) -> dict:
    torch.manual_seed(0)
    length = side * side
    steps = steps or default_steps(keep)
    models = generator_models(size, side, keep, device)
    timed = fastest_of_rounds(route_samplers(models, batch, keep, steps, window, cfg_scale, device), device, repeats)
    rows = 2 * batch if cfg_scale != 1.0 else batch
    passes = {"raster": length, "mergear": length, "randar": steps}
    generated = {"raster": length, "mergear": length, "randar": keep}
    row = {"size": size, "device": str(device), "L": length, "K": keep, "window": window, "batch": batch,
           "cfg_scale": cfg_scale, "randar_kv_slots_allocated": 2 * keep}
    for name in ROUTES:
        seconds, stats = timed[name]
        entries = int(stats["peak_cache"])
        row.update({
            f"{name}_passes_per_image": passes[name],
            f"{name}_tokens_per_s": batch * generated[name] / seconds,
            f"{name}_images_per_s": batch / seconds,
            f"{name}_peak_kv_entries": entries,
            f"{name}_kv_bytes": kv_bytes(models[name], entries, rows),
        })
    for name in ("mergear", "randar"):
        row[f"{name}_speedup_vs_raster"] = row[f"{name}_images_per_s"] / row["raster_images_per_s"]
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--grids", default="16,32", help="grid sides: L = side^2")
    parser.add_argument("--keeps", default="144,256")
    parser.add_argument("--steps", default="auto", help="RandAR forward passes; auto: the paper's per K")
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="!= 1: CFG (cond + uncond rows) in every route")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="outputs/bench/ar_randar.json")
    args = parser.parse_args(argv)
    steps = None if args.steps == "auto" else int(args.steps)
    rows = [bench(args.size, int(side), int(keep), steps, args.window, args.batch, args.device, args.repeats,
                  args.cfg_scale)
            for side in args.grids.split(",") for keep in args.keeps.split(",") if int(keep) <= int(side) ** 2]
    print(f"{'L':>5} {'K':>5} {'passes r/m/R':>14} {'img/s raster':>12} {'MergeAR':>9} {'RandAR':>9} "
          f"{'KV raster':>10} {'MergeAR':>9} {'RandAR':>9} {'MergeAR x':>9} {'RandAR x':>9}")
    for r in rows:
        print(f"{r['L']:>5} {r['K']:>5} {r['L']:>5}/{r['L']}/{r['randar_passes_per_image']:<4} "
              f"{r['raster_images_per_s']:>12.2f} {r['mergear_images_per_s']:>9.2f} {r['randar_images_per_s']:>9.2f} "
              f"{r['raster_kv_bytes'] / 2**20:>8.2f}Mi {r['mergear_kv_bytes'] / 2**20:>7.2f}Mi "
              f"{r['randar_kv_bytes'] / 2**20:>7.2f}Mi {r['mergear_speedup_vs_raster']:>8.2f}x "
              f"{r['randar_speedup_vs_raster']:>8.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "results": rows}, indent=2))
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()

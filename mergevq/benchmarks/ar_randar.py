"""Benchmark (not a test): raster AR vs MergeAR vs RandAR sampling at the same model size and K.

    python -m mergevq.benchmarks.ar_randar [--size tiny] [--grids 16,32] [--keeps 144,256] [--steps auto]

Raster and MergeAR decode the L positions (``ar_cache.bench``: one forward pass per position); RandAR
decodes the K merged tokens in ``--steps`` forward passes (auto: 64 for K = 144, 88 for K = 256, else
ceil(K * 88 / 256)) with the same weights. Reports forward passes per image, tokens/s (generated
tokens: L for raster / MergeAR, K for RandAR), images/s, peak KV entries and bytes; best of
``--repeats`` after a warm-up. Writes JSON (default outputs/bench/ar_randar.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..models.gpt import gpt_args
from ..models.positions import default_steps, uniform_positions
from ..models.randar import RandAR, generate_randar
from . import ar_cache


def time_randar(model: RandAR, batch: int, keep: int, steps: int, repeats: int, device: str) -> tuple[float, dict]:
    """Fastest of ``repeats`` RandAR decodes (after one warm-up) -> (seconds, stats)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    positions = uniform_positions(batch, keep, model.args.seq_len, generator).to(device)
    runs = []
    for i in range(max(repeats, 1) + 1):
        ar_cache._sync(torch.device(device))
        start = time.perf_counter()
        _, stats = generate_randar(model, labels, positions, steps, seed=i)
        ar_cache._sync(torch.device(device))
        runs.append((time.perf_counter() - start, stats))
    return min(runs[1:], key=lambda run: run[0])


def bench(size: str, side: int, keep: int, steps: int | None, window: int, batch: int, device: str = "cpu",
          repeats: int = 2) -> dict:
    row = ar_cache.bench(size, side, keep, window, batch, device=device, repeats=repeats)
    length = side * side
    torch.manual_seed(0)
    randar = RandAR(gpt_args(size, grid=(side, side), num_classes=10)).eval().to(device)
    steps = steps or default_steps(keep)
    seconds, stats = time_randar(randar, batch, keep, steps, repeats, device)
    raster_images = row["raster_tokens_per_s"] / length
    randar_images = batch / seconds
    row.update({
        "raster_passes_per_image": length, "mergear_passes_per_image": length, "randar_passes_per_image": steps,
        "raster_images_per_s": raster_images, "mergear_images_per_s": row["mergear_tokens_per_s"] / length,
        "randar_tokens_per_s": batch * keep / seconds, "randar_images_per_s": randar_images,
        "randar_peak_kv_entries": stats["peak_cache"], "randar_kv_slots_allocated": 2 * keep,
        "randar_kv_bytes": ar_cache.kv_bytes(randar, stats["peak_cache"], batch),
        "randar_speedup_vs_raster": randar_images / raster_images,
    })
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--grids", default="16,32", help="grid sides: L = side^2")
    parser.add_argument("--keeps", default="144,256")
    parser.add_argument("--steps", default="auto", help="RandAR forward passes; auto: the paper's per K")
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="outputs/bench/ar_randar.json")
    args = parser.parse_args(argv)
    steps = None if args.steps == "auto" else int(args.steps)
    rows = [bench(args.size, int(side), int(keep), steps, args.window, args.batch, args.device, args.repeats)
            for side in args.grids.split(",") for keep in args.keeps.split(",") if int(keep) <= int(side) ** 2]
    print(f"{'L':>5} {'K':>5} {'passes r/m/R':>14} {'img/s raster':>12} {'MergeAR':>9} {'RandAR':>9} "
          f"{'RandAR tok/s':>12} {'KV raster':>10} {'MergeAR':>9} {'RandAR':>9} {'speedup':>8}")
    for r in rows:
        print(f"{r['L']:>5} {r['K']:>5} {r['L']:>5}/{r['L']}/{r['randar_passes_per_image']:<4} "
              f"{r['raster_images_per_s']:>12.2f} {r['mergear_images_per_s']:>9.2f} {r['randar_images_per_s']:>9.2f} "
              f"{r['randar_tokens_per_s']:>12.1f} {r['raster_kv_bytes'] / 2**20:>8.2f}Mi "
              f"{r['mergear_kv_bytes'] / 2**20:>7.2f}Mi {r['randar_kv_bytes'] / 2**20:>7.2f}Mi "
              f"{r['randar_speedup_vs_raster']:>7.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": ar_cache._machine(), "results": rows}, indent=2))
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()

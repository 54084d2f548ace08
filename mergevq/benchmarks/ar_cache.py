"""Benchmark (not a test): raster AR with a full KV cache vs MergeAR with eviction, same model.

    python -m mergevq.benchmarks.ar_cache [--size tiny] [--grids 16,32] [--keeps 144,256] [--window 16]

For each (L, K) it decodes L tokens for a batch with the raster cache and with the MergeAR cache
(groups forced to a K-group layout of contiguous raster runs, what merging produces along rows),
and reports tokens/s (the fastest of ``--repeats`` interleaved rounds after one untimed warm-up
decode of each, the decoder's cache allocation included), the peak number of live KV entries and
their bytes, and the mean number of KV slots one query attends over (the attention cost per token).
Prints a table and writes JSON (default outputs/bench/ar_cache.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..models.generate import RasterDecoder
from ..models.mergear import MergeARDecoder
from .common import fastest_of_rounds, generator_models, kv_bytes, machine


def run_groups(length: int, keep: int, generator: torch.Generator) -> torch.Tensor:
    """[L] group ids: K contiguous raster runs (random cut points), id = first position of the run."""
    cuts = torch.randperm(length - 1, generator=generator)[: keep - 1].sort().values + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.long), cuts])
    owner = torch.zeros(length, dtype=torch.long)
    owner[starts[1:]] = 1
    return starts[owner.cumsum(0)]


@torch.no_grad()
def decode(decoder, codes: torch.Tensor, groups: torch.Tensor | None) -> tuple[float, object]:
    """Feed codes [B, L] through the decoder -> (mean KV slots attended per query, the decoder). The raster query at
    position l attends P + l + 1 slots, the MergeAR one its span (the slot high-water mark, or up to
    sync_every - 1 more between device reads)."""
    labels = torch.zeros(codes.shape[0], dtype=torch.long, device=codes.device)
    merge = isinstance(decoder, MergeARDecoder)
    attended = 0
    if merge:
        decoder.prefill(labels, torch.zeros_like(labels))
    else:
        decoder.prefill(labels)
    for pos in range(codes.shape[1]):
        if groups is None:
            decoder.decode_one(codes[:, pos])
        else:
            decoder.decode_one(codes[:, pos], known_group=groups[:, pos])
        attended += decoder.span if merge else decoder.prefix + pos + 1
    return attended / codes.shape[1], decoder


def bench(size: str, side: int, keep: int, window: int, batch: int, seed: int = 0, device: str = "cpu",
          repeats: int = 2) -> dict:
    torch.manual_seed(seed)
    length = side * side
    models = generator_models(size, side, keep, device, routes=("raster", "mergear"), copy_head=False)
    raster, mergear = models["raster"], models["mergear"]
    generator = torch.Generator().manual_seed(seed)
    groups = torch.stack([run_groups(length, keep, generator) for _ in range(batch)])
    codes = torch.randint(0, raster.args.codebook_size, (batch, length), generator=generator).gather(1, groups)
    groups, codes = groups.to(device), codes.to(device)
    bound = mergear.args.prefix_tokens + keep + window + 1
    timed = fastest_of_rounds({
        "raster": lambda _: decode(RasterDecoder(raster, batch), codes, None),
        "mergear": lambda _: decode(MergeARDecoder(mergear, batch, window, max_slots=bound), codes, groups),
    }, device, repeats)
    (raster_time, (raster_attended, _)), (merge_time, (merge_attended, decoder)) = timed["raster"], timed["mergear"]
    stats = decoder.stats()
    raster_entries = raster.args.prefix_tokens + length
    return {
        "size": size, "device": str(device), "L": length, "K": keep, "window": window, "batch": batch,
        "raster_tokens_per_s": batch * length / raster_time,
        "mergear_tokens_per_s": batch * length / merge_time,
        "raster_kv_entries": raster_entries,
        "mergear_peak_kv_entries": stats["peak_live"],
        "mergear_kv_slots_allocated": bound,
        "raster_kv_bytes": kv_bytes(raster, raster_entries, batch),
        "mergear_kv_bytes": kv_bytes(mergear, stats["slots_used"], batch),
        "cache_ratio": stats["peak_live"] / raster_entries,
        "raster_attended_per_token": raster_attended,
        "mergear_attended_per_token": merge_attended,
        "attention_ratio": merge_attended / raster_attended,
        "expected_ratio_(K+w)/L": (keep + window) / length,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--grids", default="16,32", help="grid sides: L = side^2")
    parser.add_argument("--keeps", default="144,256")
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="timed decodes after the warm-up; the fastest counts")
    parser.add_argument("--out", default="outputs/bench/ar_cache.json")
    args = parser.parse_args(argv)
    rows = [bench(args.size, int(side), int(keep), args.window, args.batch, device=args.device, repeats=args.repeats)
            for side in args.grids.split(",") for keep in args.keeps.split(",") if int(keep) <= int(side) ** 2]
    header = (f"{'L':>5} {'K':>5} {'raster tok/s':>13} {'MergeAR tok/s':>14} {'raster KV':>10} {'MergeAR KV':>11} "
              f"{'ratio':>6} {'(K+w)/L':>8} {'attn ratio':>10}")
    print(header)
    for r in rows:
        print(f"{r['L']:>5} {r['K']:>5} {r['raster_tokens_per_s']:>13.1f} {r['mergear_tokens_per_s']:>14.1f} "
              f"{r['raster_kv_bytes'] / 2**20:>8.2f}Mi {r['mergear_kv_bytes'] / 2**20:>9.2f}Mi {r['cache_ratio']:>6.3f} "
              f"{r['expected_ratio_(K+w)/L']:>8.3f} {r['attention_ratio']:>10.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "results": rows}, indent=2))
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()

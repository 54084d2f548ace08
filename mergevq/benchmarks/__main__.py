"""MergeVQ benchmark suite (not a test): prints one table per suite and writes JSON.

    python -m mergevq.benchmarks [--suite all|tokenizer|codec|ar|data|flops] [--size tiny|d64]
                                 [--batch N] [--device cpu|cuda] [--out outputs/bench/bench.json]

Suites:
  tokenizer  training step (G-d64 and G+R-d64 at 256 px with --size d64): wall time and peak memory
             of the fast path vs the literal reference path (mergevq/benchmarks/reference.py), each
             measured in a fresh process (see mergevq/benchmarks/step.py for the memory method)
  codec      encode / decode images/s per K for the variants g, gr, r
  ar         raster vs MergeAR sampling: tokens/s and KV-cache bytes (mergevq/benchmarks/ar_cache.py)
  data       three-view photo loader images/s with 0, 1, 2 workers vs the step's images/s
  flops      achieved FLOP/s of the transformer blocks and the whole step vs a matmul probe
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from . import codec, common, components, data, flops
from .step import PATHS, run_subprocess

SUITES = ("tokenizer", "codec", "ar", "data", "flops")
STEP_VARIANTS = ("g", "gr")
CODEC_VARIANTS = ("g", "gr", "r")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mergevq.benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="all", help="all or a comma list of " + ", ".join(SUITES))
    parser.add_argument("--size", default="tiny", choices=common.SIZES)
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 2 on CPU, 8 on CUDA)")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda if available")
    parser.add_argument("--out", default="outputs/bench/bench.json")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (default: 3 CPU tiny, 2 CPU d64, 10 CUDA)")
    parser.add_argument("--variants", default=None, help="tokenizer-step variants (default g,gr)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"tokenizer-step paths (default {','.join(PATHS)}; "
                        "the literal 'reference' is always measured: the speed-ups are against it)")
    parser.add_argument("--components", action=argparse.BooleanOptionalAction, default=True,
                        help="tokenizer suite: also time each component alone")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on for CUDA, off for CPU, as the backends)")
    parser.add_argument("--strict-memory", action="store_true",
                        help="CPU: measure memory in a separate process with glibc caching off (slower)")
    parser.add_argument("--perceptual", action="store_true", help="add LPIPS (random VGG) to the step loss")
    parser.add_argument("--ar-size", default=None, help="GPT size for the ar suite (default tiny; b for d64 on CUDA)")
    parser.add_argument("--ar-grids", default="16,32", help="ar suite grid sides (L = side^2)")
    parser.add_argument("--ar-keeps", default="144,256", help="ar suite keep counts K")
    parser.add_argument("--step-json", default=None,
                        help="data/flops suites: reuse the tokenizer-step rows of an earlier run's JSON")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    args.suites = list(SUITES) if args.suite == "all" else [s.strip() for s in args.suite.split(",")]
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; use all or {', '.join(SUITES)}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    cuda = args.device == "cuda"
    args.batch = args.batch or (8 if cuda else 2)
    args.repeats = args.repeats or (10 if cuda else (3 if args.size == "tiny" else 2))
    args.amp = cuda if args.amp is None else args.amp
    args.step_variants = args.variants.split(",") if args.variants else list(STEP_VARIANTS)
    args.step_paths = [p.strip() for p in args.paths.split(",")]
    if any(p not in PATHS for p in args.step_paths):
        parser.error(f"--paths {args.paths}: use a comma list of {', '.join(PATHS)}")
    if "reference" not in args.step_paths:
        args.step_paths.append("reference")
    args.ar_size = args.ar_size or ("b" if args.size != "tiny" and cuda else "tiny")
    return args


# --------------------------------------------------------------------------- tokenizer step


def _worker_options(args, variant: str, path: str, mode: str) -> dict[str, Any]:
    return {"size": args.size, "variant": variant, "path": path, "mode": mode, "device": args.device,
            "batch": args.batch, "repeats": args.repeats, "amp": args.amp, "perceptual": args.perceptual,
            "threads": args.threads, "warmup": 2 if args.device == "cuda" else 0}


def step_results(args, variants, paths, memory: bool) -> list[dict[str, Any]]:
    """One row per (variant, path), each from a fresh process (plus a memory process with --strict-memory)."""
    rows = []
    for variant in variants:
        for path in paths:
            strict = memory and args.strict_memory and args.device == "cpu"
            row = run_subprocess(_worker_options(args, variant, path, "both" if memory and not strict else "time"))
            if strict:
                mem = run_subprocess(_worker_options(args, variant, path, "memory"))
                for key in ("peak_bytes", "baseline_bytes", "step_peak_bytes", "memory_method"):
                    row[key] = mem[key]
            rows.append(row)
            print(f"  {variant:>3} {path:<9} {row['min_s']:.3f} s/step (best of {len(row['times_s'])})"
                  + (f", step peak {common.mib(row.get('step_peak_bytes')):.0f} MiB" if memory else ""), flush=True)
    return rows


def tokenizer_suite(args) -> dict[str, Any]:
    rows = step_results(args, args.step_variants, args.step_paths, memory=True)
    comparisons = []
    for variant in args.step_variants:
        ref = next(r for r in rows if r["variant"] == variant and r["path"] == "reference")
        for fast in (r for r in rows if r["variant"] == variant and r["path"] != "reference"):
            comparisons.append({
                "variant": variant, "path": fast["path"], "L": fast["positions"], "K": fast["keep"], "batch": fast["batch"],
                "speedup": ref["min_s"] / fast["min_s"],
                "speedup_median": ref["median_s"] / fast["median_s"],
                "step_peak_ratio": fast["step_peak_bytes"] / ref["step_peak_bytes"] if ref.get("step_peak_bytes") else None,
                "peak_ratio": fast["peak_bytes"] / ref["peak_bytes"] if ref.get("peak_bytes") else None,
                "max_abs_loss_diff": max(abs(fast["losses"][k] - ref["losses"][k]) for k in fast["losses"]),
            })
    return {"rows": rows, "comparisons": comparisons,
            "components": components.run(args.size, args.step_variants, args.device, args.batch,
                                         args.repeats if args.device == "cuda" else min(args.repeats, 2), args.amp)
            if args.components else None,
            "goal": "fast >= 2x faster and <= 0.3x peak memory of the literal path"}


def render_tokenizer(result: dict[str, Any]) -> str:
    rows = [dict(r, step_peak_mib=common.mib(r.get("step_peak_bytes")), peak_mib=common.mib(r.get("peak_bytes")),
                 baseline_mib=common.mib(r.get("baseline_bytes")), loss=r["losses"]["total"]) for r in result["rows"]]
    columns = [("variant", "variant"), ("path", "path"), ("L", "L"), ("keep", "K"), ("batch", "batch"),
               ("min_s", "s/step best"), ("median_s", "median"), ("images_per_s", "img/s"), ("step_peak_mib", "step peak MiB"),
               ("baseline_mib", "resident MiB"), ("peak_mib", "process peak MiB"), ("loss", "loss (step 1)")]
    for r in rows:
        r["L"] = r["positions"]
    specs = {"min_s": ".3f", "median_s": ".3f", "images_per_s": ".3f", "step_peak_mib": ".0f", "baseline_mib": ".0f",
             "peak_mib": ".0f", "loss": ".6f"}
    method = result["rows"][0].get("memory_method", "")
    text = common.table(f"Tokenizer training step, fast vs literal (memory: {method})", columns, rows, specs)
    comp_cols = [("variant", "variant"), ("path", "path"), ("K", "K"), ("speedup", "speed-up (best)"), ("speedup_median", "speed-up (median)"),
                 ("step_peak_ratio", "step-peak ratio (fast / ref)"), ("peak_ratio", "process-peak ratio"),
                 ("max_abs_loss_diff", "max |loss diff|")]
    text += "\n" + common.table("Fast / literal", comp_cols, result["comparisons"],
                                {"speedup": ".2f", "speedup_median": ".2f", "step_peak_ratio": ".3f", "peak_ratio": ".3f", "max_abs_loss_diff": ".2e"})
    text += f"\ngoal: {result['goal']}\n\n"
    return text + (components.render(result["components"]) if result["components"] is not None else "")


# --------------------------------------------------------------------------- AR


def ar_suite(args) -> dict[str, Any]:
    from .ar_cache import bench

    quick = args.device == "cpu" and args.ar_size == "tiny"
    batch = 1 if quick else min(args.batch, 4)
    # one token per step through a 4-layer, 128-wide GPT is thousands of tiny ops: a second OpenMP
    # thread only adds spin-wait contention on a small shared CPU
    threads = torch.get_num_threads()
    if quick and not args.threads:
        torch.set_num_threads(1)
    try:
        rows = [bench(args.ar_size, side, keep, window=16, batch=batch, device=args.device)
                for side in _ints(args.ar_grids) for keep in _ints(args.ar_keeps) if keep <= side * side]
    finally:
        used = torch.get_num_threads()
        torch.set_num_threads(threads)
    return {"gpt_size": args.ar_size, "threads": used, "rows": rows}


def _ints(text: str) -> list[int]:
    return [int(v) for v in str(text).split(",") if v.strip()]


def render_ar(result: dict[str, Any]) -> str:
    rows = [dict(r, raster_kv_mib=common.mib(r["raster_kv_bytes"]), mergear_kv_mib=common.mib(r["mergear_kv_bytes"]),
                 speed_ratio=r["mergear_tokens_per_s"] / r["raster_tokens_per_s"]) for r in result["rows"]]
    columns = [("L", "L"), ("K", "K"), ("batch", "batch"), ("raster_tokens_per_s", "raster tok/s"),
               ("mergear_tokens_per_s", "MergeAR tok/s"), ("speed_ratio", "MergeAR / raster"),
               ("raster_kv_mib", "raster KV MiB"), ("mergear_kv_mib", "MergeAR KV MiB"),
               ("cache_ratio", "live-KV ratio"), ("expected_ratio_(K+w)/L", "(K+w)/L"),
               ("attention_ratio", "attended keys ratio")]
    specs = {"attention_ratio": ".3f", "raster_tokens_per_s": ".1f", "mergear_tokens_per_s": ".1f", "speed_ratio": ".2f",
             "raster_kv_mib": ".2f", "mergear_kv_mib": ".2f", "cache_ratio": ".3f", "expected_ratio_(K+w)/L": ".3f"}
    return common.table(f"MergeAR vs raster sampling (GPT {result['gpt_size']}, window 16)", columns, rows, specs)


# --------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "machine": common.machine(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "args": {k: v for k, v in vars(args).items() if k not in ("suites",)} | {"suites": args.suites},
        "suites": {}, "elapsed_s": {},
    }
    print(f"# mergevq benchmarks: size={args.size} device={args.device} batch={args.batch} "
          f"repeats={args.repeats} amp={args.amp}\n# {report['machine']['cpu_model']}, "
          f"{report['machine']['cpu_cores']} cores, torch {torch.__version__}, gpu {report['machine']['gpu']}\n")
    tk_cfg = common.load_group("tokenizer", args.size)
    step_cache: list[dict[str, Any]] | None = None

    def fast_steps() -> list[dict[str, Any]]:
        nonlocal step_cache
        if "tokenizer" in report["suites"]:
            return report["suites"]["tokenizer"]["rows"]
        if step_cache is None and args.step_json:
            earlier = json.loads(Path(args.step_json).read_text())
            step_cache = earlier["suites"]["tokenizer"]["rows"]
            mismatch = [r for r in step_cache if (r["size"], r["batch"], r["device"]) != (args.size, args.batch, args.device)]
            if mismatch:
                raise SystemExit(f"--step-json {args.step_json} holds steps of another size/batch/device")
        if step_cache is None:
            step_cache = step_results(args, args.step_variants, ("fast",), memory=False)
        return step_cache

    for suite in args.suites:
        t0 = time.perf_counter()
        print(f"## {suite}", flush=True)
        if suite == "tokenizer":
            result = tokenizer_suite(args)
            text = render_tokenizer(result)
        elif suite == "codec":
            result = codec.run(args.size, list(CODEC_VARIANTS), args.device, args.batch, args.repeats, args.amp)
            text = codec.render(result)
        elif suite == "ar":
            result = ar_suite(args)
            text = render_ar(result)
        elif suite == "data":
            rates = {r["variant"]: r["images_per_s"] for r in fast_steps() if r["path"] == "fast"}
            batches = 16 if args.size == "tiny" else 12
            result = data.run(tk_cfg["resolution"], tk_cfg["align_size"], args.batch, batches, [0, 1, 2], rates)
            text = data.render(result)
        else:
            first = flops.matmul_peak(args.device)
            rows = []
            for variant in args.step_variants:
                rows += flops.block_rows(args.size, variant, args.device, args.batch, args.repeats, args.amp)
            rows += flops.step_rows(fast_steps())
            probe = flops.best_probe(first, flops.matmul_peak(args.device))
            for row in rows:
                row["fraction_of_peak"] = row["flops_per_s"] / probe["peak_flops_per_s"]
            result = {"probe": probe, "rows": rows}
            text = flops.render(result)
        report["suites"][suite] = result
        report["elapsed_s"][suite] = time.perf_counter() - t0
        print(text, flush=True)
    report["elapsed_s"]["total"] = time.perf_counter() - started
    report["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out} ({report['elapsed_s']['total']:.0f} s)")
    return report


if __name__ == "__main__":
    main()

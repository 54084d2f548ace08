"""Achieved FLOP/s against the machine's measured matmul peak.

The peak is a square matmul probe in the same run (2048^3 fp32 on CPU, 8192^3 bf16 on CUDA, best of
a few). FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions,
attention; CPU fused attention registered by ``common.flop_counter``) and divided by the measured
time: for the transformer blocks alone (the encoder's merging transformer at the nominal K and the
decoder's transformer, forward + backward, fast and literal attention) and for the whole training
step (FLOPs and best time from the tokenizer-step workers).
"""

from __future__ import annotations

from typing import Any

import torch

from . import common, reference


def matmul_peak(device: str, n: int | None = None, repeats: int = 10) -> dict[str, Any]:
    cuda = torch.device(device).type == "cuda"
    n = n or (8192 if cuda else 2048)
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = common.time_calls(lambda: a @ b, device, repeats, warmup=2 if cuda else 1)
    best = min(times)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "flops": 2 * n**3, "best_s": best,
            "peak_flops_per_s": 2 * n**3 / best, "times_s": times}


def _fwd_bwd(fn, params):
    def run():
        for p in params:
            p.grad = None
        out = fn()
        out.float().square().mean().backward()
    return run


def block_rows(size: str, variant: str, device: str, batch: int, repeats: int, amp: bool, seed: int = 0) -> list[dict[str, Any]]:
    from ..models.factory import build_tokenizer, layout

    tk_cfg, var_cfg, q_cfg = common.model_configs(size, variant)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(tk_cfg, var_cfg, q_cfg).to(device).train()
    spec = layout(tk_cfg, var_cfg)
    positions, keep = spec["num_positions"], spec["keep"]
    schedule = tokenizer.schedule(positions, keep)
    width = tokenizer.encoder.width
    gen = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randn(batch, positions, width, generator=gen).to(device)
    grid = torch.randn(batch, width, *spec["grid"], generator=gen).to(device)
    enc, dec = tokenizer.encoder.transformer, tokenizer.decoder.transformer

    def dec_literal():
        x = (grid + dec.pos_embed(grid)).flatten(2).transpose(1, 2)
        for block in dec.blocks:
            x = reference.block_forward(block, x)
        return x

    cases = [
        ("encoder blocks", "fast", lambda: enc(tokens, schedule)[0], enc),
        ("encoder blocks", "reference", lambda: reference.merging_transformer(enc, tokens, schedule)[0], enc),
        ("decoder blocks", "fast", lambda: dec(grid), dec),
        ("decoder blocks", "reference", dec_literal, dec),
    ]
    rows = []
    for name, path, fn, module in cases:
        run = _fwd_bwd(fn, list(module.parameters()))
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            with common.flop_counter() as counter:
                run()
            times = common.time_calls(run, device, repeats)
        flops = counter.get_total_flops()
        best = min(times)
        rows.append({"variant": variant, "what": f"{name} (fwd+bwd, L={positions}, K={keep})", "path": path,
                     "batch": batch, "flops": flops, "time_s": best, "flops_per_s": flops / best})
    return rows


def step_rows(step_results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in step_results:
        if r.get("flops") is None or r.get("min_s") is None:
            continue
        rows.append({"variant": r["variant"], "what": f"training step (L={r['positions']}, K={r['keep']})",
                     "path": r["path"], "batch": r["batch"], "flops": r["flops"], "time_s": r["min_s"],
                     "flops_per_s": r["flops"] / r["min_s"]})
    return rows


COLUMNS = [("variant", "variant"), ("what", "what"), ("path", "path"), ("batch", "batch"), ("gflops", "GFLOP"),
           ("time_s", "time s"), ("gflops_per_s", "GFLOP/s"), ("fraction_of_peak", "of peak")]
SPECS = {"gflops": ".1f", "time_s": ".3f", "gflops_per_s": ".1f", "fraction_of_peak": ".1%"}


def best_probe(*probes: dict[str, Any]) -> dict[str, Any]:
    """The fastest of several probes (taken before and after the measurements: on a shared machine
    a single probe can be slowed by other jobs, which would inflate every fraction of peak)."""
    best = max(probes, key=lambda p: p["peak_flops_per_s"])
    return dict(best, all_probes_flops_per_s=[p["peak_flops_per_s"] for p in probes])


def render(result: dict[str, Any]) -> str:
    probe = result["probe"]
    rows = [dict(r, gflops=r["flops"] / 1e9, gflops_per_s=r["flops_per_s"] / 1e9) for r in result["rows"]]
    title = (f"Achieved FLOP/s (peak: {probe['n']}^3 {probe['dtype']} matmul = "
             f"{probe['peak_flops_per_s'] / 1e9:.1f} GFLOP/s)")
    return common.table(title, COLUMNS, rows, SPECS)

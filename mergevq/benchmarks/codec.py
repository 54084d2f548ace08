"""Encode and decode throughput (images/s) per keep count K for each variant (eval mode, no grad).

Encode = ``tokenizer.encode(x, keep=K)`` (stem, merging transformer, latent head, LFQ codes);
decode = ``tokenizer.decode(tokens)`` (code vectors, gather unmerge, decoder). The scaling with K is
summarised by the time relative to the unmerged K = L and by the log-log slope d log t / d log K.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import common


def _slope(keeps: list[int], times: list[float]) -> float | None:
    """Least-squares slope of log(time) against log(K)."""
    if len(keeps) < 2:
        return None
    xs, ys = [math.log(k) for k in keeps], [math.log(t) for t in times]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else None


@torch.no_grad()
def bench_variant(size: str, variant: str, device: str, batch: int, repeats: int, amp: bool,
                  keeps: list[int] | None = None, seed: int = 0) -> list[dict[str, Any]]:
    from ..models.factory import build_tokenizer, layout

    tk_cfg, var_cfg, q_cfg = common.model_configs(size, variant)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(tk_cfg, var_cfg, q_cfg).to(device).eval()
    spec = layout(tk_cfg, var_cfg)
    positions = spec["num_positions"]
    keeps = keeps or common.codec_keeps(variant, positions, tk_cfg["depth"])
    res = tk_cfg["resolution"]
    gen = torch.Generator().manual_seed(seed + 1)
    x = (torch.rand(batch, 3, res, res, generator=gen) * 2 - 1).to(device)
    rows = []
    for keep in keeps:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            tokens = tokenizer.encode(x, keep=keep)
            # two warm-up calls: the first shapes of a process also pay one-off kernel set-up
            enc = common.time_calls(lambda k=keep: tokenizer.encode(x, keep=k), device, repeats,
                                    warmup=1 if rows else 2)
            dec = common.time_calls(lambda t=tokens: tokenizer.decode(t), device, repeats)
        enc_s, dec_s = min(enc), min(dec)  # best of n
        rows.append({
            "variant": variant, "size": size, "L": positions, "K": keep, "batch": batch,
            "encode_s": enc_s, "decode_s": dec_s,
            "encode_images_per_s": batch / enc_s, "decode_images_per_s": batch / dec_s,
            "encode_times_s": enc, "decode_times_s": dec,
        })
    full = next((r for r in rows if r["K"] == positions), rows[0])
    for row in rows:
        row["encode_time_vs_K=L"] = row["encode_s"] / full["encode_s"]
        row["decode_time_vs_K=L"] = row["decode_s"] / full["decode_s"]
    return rows


def run(size: str, variants: list[str], device: str, batch: int, repeats: int, amp: bool) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    scaling = {}
    for variant in variants:
        vrows = bench_variant(size, variant, device, batch, repeats, amp)
        rows += vrows
        keeps = [r["K"] for r in vrows]
        scaling[variant] = {
            "encode_loglog_slope": _slope(keeps, [r["encode_s"] for r in vrows]),
            "decode_loglog_slope": _slope(keeps, [r["decode_s"] for r in vrows]),
        }
    return {"rows": rows, "scaling": scaling}


COLUMNS = [("variant", "variant"), ("L", "L"), ("K", "K"), ("batch", "batch"),
           ("encode_images_per_s", "encode img/s"), ("encode_time_vs_K=L", "enc t / t(K=L)"),
           ("decode_images_per_s", "decode img/s"), ("decode_time_vs_K=L", "dec t / t(K=L)")]
SPECS = {"encode_images_per_s": ".2f", "decode_images_per_s": ".2f", "encode_time_vs_K=L": ".3f",
         "decode_time_vs_K=L": ".3f"}


def render(result: dict[str, Any]) -> str:
    text = common.table("Encode / decode throughput per K", COLUMNS, result["rows"], SPECS)
    slopes = ", ".join(
        f"{v}: encode {common.fmt(s['encode_loglog_slope'], '.2f')}, decode {common.fmt(s['decode_loglog_slope'], '.2f')}"
        for v, s in result["scaling"].items())
    return text + f"\nlog-log slope of time vs K ({slopes})\n"

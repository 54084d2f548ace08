"""The three places where the fast path departs from the literal one, timed and measured alone
(forward + backward where there is a gradient), at the shapes of the tokenizer step:

- entropy: ``entropy_terms`` (per-bit + two half-codebooks) vs ``entropy_terms_bruteforce``
  (softmax over all 2^bits codes) on N = batch x K latents;
- attention: SDPA vs the explicit softmax(q k^T / sqrt(d) + log size) v, on the encoder's first
  block shape [B, heads, L + 1, head_dim] with a key bias;
- source tracking + unmerge: owner indices re-indexed per merge and a gather vs the dense
  (L + 1) x (L + 1) source matrix merged with amax and the index-put unmerge, through the
  variant's merge schedule (no gradient: the source matrix is not differentiable).

Memory: peak above the pre-call level of this process (CPU: VmHWM after malloc_trim; CUDA:
max_memory_allocated), so it is the component's own working set.
"""

from __future__ import annotations

from typing import Any

import torch

from . import common, reference
from .common import model_configs


def _measure(name: str, variant: str, shape: str, fast, literal, device: str, repeats: int) -> dict[str, Any]:
    row: dict[str, Any] = {"component": name, "variant": variant, "shape": shape}
    for path, fn in (("fast", fast), ("reference", literal)):
        row[f"{path}_peak_bytes"] = common.peak_memory(fn, device)["step_peak_bytes"]  # also the warm-up call
        row[f"{path}_s"] = min(common.time_calls(fn, device, repeats, warmup=0))
    row["speedup"] = row["reference_s"] / row["fast_s"]
    ref_peak = row["reference_peak_bytes"]
    row["peak_ratio"] = row["fast_peak_bytes"] / ref_peak if ref_peak > 0 else None
    return row


def _entropy_case(batch: int, keep: int, bits: int, device: str, gen: torch.Generator):
    from ..models.lfq import entropy_terms, entropy_terms_bruteforce

    z0 = (torch.randn(batch * keep, bits, generator=gen) * 0.1).to(device)

    def run(fn):
        def call():
            z = z0.clone().requires_grad_()
            sample, batch_entropy = fn(z, 0.01)
            (sample - batch_entropy).backward()
        return call

    return run(entropy_terms), run(entropy_terms_bruteforce), f"N={batch * keep}, 2^{bits} codes"


def _attention_case(tokenizer, batch: int, positions: int, device: str, gen: torch.Generator, amp: bool):
    attn = tokenizer.encoder.transformer.blocks[0].attn
    width = tokenizer.encoder.width
    x0 = torch.randn(batch, positions + 1, width, generator=gen).to(device)
    bias = torch.rand(batch, positions + 1, generator=gen).add(1).log().to(device)

    def run(fn):
        def call():
            x = x0.clone().requires_grad_()
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
                out, _ = fn(x)
            out.float().square().mean().backward()
        return call

    shape = f"[{batch}, {attn.num_heads}, {positions + 1}, {width // attn.num_heads}]"
    return run(lambda x: attn(x, bias)), run(lambda x: reference.attention_unfused(attn, x, bias)), shape


def _source_case(schedule, batch: int, positions: int, bits: int, device: str, gen: torch.Generator):
    """Matching (same work on both paths) + source tracking + unmerge of the quantized latents."""
    from ..models.merge import bipartite_match, reindex_owner, unmerge

    metrics = []
    tokens = positions + 1
    for r in schedule:  # one random metric per layer at the token count that layer sees
        metrics.append(torch.randn(batch, tokens, 64, generator=gen).to(device))
        tokens -= max(0, min(r, (tokens - 1) // 2))
    keep = tokens - 1
    z_q = torch.randn(batch, keep, bits, generator=gen).to(device)

    @torch.no_grad()
    def fast():
        owner = torch.arange(1, positions + 1, device=device).expand(batch, -1)
        for metric, r in zip(metrics, schedule):
            plan = bipartite_match(metric, r)
            if plan is not None:
                owner = reindex_owner(owner, plan, metric.shape[1])
        return unmerge(z_q, owner - 1)

    @torch.no_grad()
    def literal():
        source = torch.eye(positions + 1, device=device).expand(batch, -1, -1)
        for metric, r in zip(metrics, schedule):
            merge = reference.bipartite_soft_matching(metric, r)
            if merge is not None:
                source = merge(source, "amax")
        return reference.token_unmerge(z_q, source[:, 1:, 1:])

    return fast, literal, f"L={positions} -> K={keep}, {len(schedule)} layers"


def run(size: str, variants: list[str], device: str, batch: int, repeats: int, amp: bool, seed: int = 0) -> list[dict]:
    from ..models.factory import build_tokenizer, layout

    rows = []
    for variant in variants:
        tk_cfg, var_cfg, q_cfg = model_configs(size, variant)
        torch.manual_seed(seed)
        tokenizer = build_tokenizer(tk_cfg, var_cfg, q_cfg).to(device).train()
        spec = layout(tk_cfg, var_cfg)
        positions, keep, bits = spec["num_positions"], spec["keep"], tk_cfg["z_channels"]
        gen = torch.Generator().manual_seed(seed + 1)
        fast, literal, shape = _entropy_case(batch, keep, bits, device, gen)
        rows.append(_measure("LFQ entropy (fwd+bwd)", variant, shape, fast, literal, device, repeats))
        fast, literal, shape = _attention_case(tokenizer, batch, positions, device, gen, amp)
        rows.append(_measure("attention (fwd+bwd)", variant, shape, fast, literal, device, repeats))
        schedule = tokenizer.schedule(positions, keep)
        fast, literal, shape = _source_case(schedule, batch, positions, bits, device, gen)
        rows.append(_measure("source tracking + unmerge", variant, shape, fast, literal, device, repeats))
        del tokenizer
    return rows


COLUMNS = [("variant", "variant"), ("component", "component"), ("shape", "shape"), ("fast_ms", "fast ms"),
           ("reference_ms", "literal ms"), ("speedup", "speed-up"), ("fast_peak_mib", "fast MiB"),
           ("reference_peak_mib", "literal MiB"), ("peak_ratio", "memory ratio")]
SPECS = {"fast_ms": ".2f", "reference_ms": ".2f", "speedup": ".1f", "fast_peak_mib": ".1f",
         "reference_peak_mib": ".1f", "peak_ratio": ".3f"}


def render(rows: list[dict]) -> str:
    shown = [dict(r, fast_ms=r["fast_s"] * 1e3, reference_ms=r["reference_s"] * 1e3,
                  fast_peak_mib=common.mib(r["fast_peak_bytes"]), reference_peak_mib=common.mib(r["reference_peak_bytes"]))
             for r in rows]
    return common.table("Components alone, fast vs literal (best time; peak above the pre-call level)", COLUMNS, shown, SPECS)

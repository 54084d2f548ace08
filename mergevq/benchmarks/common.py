"""Shared pieces of the benchmark suite: configs, machine description, timers, memory readers,
a FLOP counter that also counts CPU fused attention, the generators of the AR benchmarks, and
table printing."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.flop_counter import (
    FlopCounterMode,
    conv_flop_count,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

CONF = Path(__file__).resolve().parents[2] / "conf"
SIZES = ("tiny", "d64")

# paper/eval K per variant at 256 px (spec 1.2: eval configs k{K}); smaller sizes pick their own
PAPER_KEEPS = {
    ("g", 1024): (1024, 576, 400, 256, 196),
    ("gr", 256): (256, 196, 144, 100, 64),
    ("r", 256): (256, 144, 100, 64, 36),
}


# --------------------------------------------------------------------------- configs


def load_group(group: str, name: str) -> dict[str, Any]:
    """One config group option as a plain dict (model groups have no interpolation)."""
    return yaml.safe_load((CONF / group / f"{name}.yaml").read_text())


def model_configs(size: str, variant: str) -> tuple[dict, dict, dict]:
    """(tokenizer, variant, quantizer) config dicts for a size x variant."""
    if size not in SIZES:
        raise ValueError(f"--size {size!r}: use one of {SIZES}")
    tokenizer = load_group("tokenizer", size)
    quantizer = {k: v for k, v in load_group("quantizer", "lfq").items() if k != "bits"}
    return tokenizer, load_group("variant", variant), quantizer


def loss_config(perceptual: bool) -> dict[str, Any]:
    """The official stage-I loss weights; LPIPS only when asked (random VGG: no weights offline)."""
    loss = load_group("loss", "official")
    if perceptual:
        loss["perceptual_weight"] = loss.get("perceptual_weight", 1.0) or 1.0
        loss["perceptual"] = {"pretrained": False, "backbone_weights": None}
    else:
        loss["perceptual_weight"] = 0.0
    return loss


def codec_keeps(variant: str, positions: int, depth: int) -> list[int]:
    """Keep counts to sweep: the paper's eval K when the grid matches, else up to 5 reachable squares."""
    from ..models.merge import reachable_keeps

    reachable = set(reachable_keeps(positions, depth))
    paper = PAPER_KEEPS.get((variant, positions))
    if paper and all(k in reachable for k in paper):
        return list(paper)
    side = int(round(positions**0.5))
    squares = [s * s for s in range(1, side + 1) if s * s in reachable]
    if len(squares) <= 5:
        return squares[::-1]
    picks = {squares[round(i * (len(squares) - 1) / 4)] for i in range(5)}
    return sorted(picks, reverse=True)


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "memory_gib": _mem_total_gib(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS") if k in os.environ},
        "cuda": torch.version.cuda,
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return info


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------- timing


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], Any], device, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `repeats` calls of fn after `warmup` untimed calls (device synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def fastest_of_rounds(cases: dict[str, Callable[[int], Any]], device, repeats: int) -> dict[str, tuple[float, Any]]:
    """One untimed warm-up call of each case (with round 0), then ``repeats`` rounds that call every case
    once (with the round number, e.g. a seed), interleaved so load changes hit all cases alike
    -> case: (seconds, result) of its fastest call (device synchronised)."""
    for call in cases.values():
        call(0)
    runs: dict[str, list[tuple[float, Any]]] = {name: [] for name in cases}
    for round_ in range(1, max(repeats, 1) + 1):
        for name, call in cases.items():
            sync(device)
            start = time.perf_counter()
            result = call(round_)
            sync(device)
            runs[name].append((time.perf_counter() - start, result))
    return {name: min(r, key=lambda run: run[0]) for name, r in runs.items()}


def summary(times: Sequence[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": [round(t, 6) for t in times]}


# --------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int:
    """High-water RSS of this process (VmHWM; ru_maxrss if /proc is missing)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def malloc_trim() -> bool:
    """Return the free heap memory of every glibc arena to the system (no-op elsewhere)."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


# glibc keeps freed blocks below its (dynamic, up to 32 MiB) mmap threshold in the heap, so RSS
# would not fall back after a step and a second step would reuse that memory without raising the
# high-water mark. A fixed 64 KiB threshold makes every tensor-sized block its own mapping, returned
# on free, so VmHWM follows the live bytes. Set in the environment of the memory subprocesses only.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}


# --------------------------------------------------------------------------- FLOPs


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _conv_backward_flops(grad_out, x, w, _bias, _stride, _padding, _dilation, transposed, _output_padding,
                         _groups, output_mask, out_shape=None, **kwargs) -> int:
    """Input and weight gradients each cost the forward's multiply-adds. torch's own formula ignores
    groups for the weight gradient (a depthwise 3x3 on C channels is counted C times over)."""
    forward = conv_flop_count(x, w, grad_out, transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also counts the CPU fused attention kernels (torch does not register them)
    and counts grouped-convolution backward correctly."""
    aten = torch.ops.aten
    mapping = {aten.convolution_backward: _conv_backward_flops}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


# --------------------------------------------------------------------------- AR generators


def generator_models(size: str, side: int, keep: int, device, routes: Sequence[str] = ("raster", "mergear", "randar"),
                     copy_head: bool = True) -> dict[str, torch.nn.Module]:
    """route -> generator (eval mode) on an L = side^2 grid, sharing the raster model's weights wherever
    the shapes agree (MergeAR adds its [M] table and copy head, RandAR its position instructions)."""
    from ..models.gpt import GPT, gpt_args
    from ..models.mergear import MergeARConfig
    from ..models.randar import RandAR

    base = gpt_args(size, grid=(side, side), num_classes=10)
    raster = GPT(base).eval()
    build = {"mergear": lambda: GPT(MergeARConfig(keep_options=(keep,), copy_head=copy_head).model_args(base)),
             "randar": lambda: RandAR(base)}
    models = {"raster": raster}
    for route in routes:
        if route != "raster":
            models[route] = build[route]().eval()
            models[route].load_state_dict(raster.state_dict(), strict=False)
    return {route: models[route].to(device) for route in routes}


def kv_bytes(model: torch.nn.Module, entries: int, batch: int) -> int:
    """Bytes of ``entries`` key + value entries in every layer for ``batch`` rows."""
    args = model.args
    element = next(model.parameters()).element_size()
    return 2 * args.n_layer * batch * entries * args.dim * element


# --------------------------------------------------------------------------- printing


def fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and spec:
        return format(value, spec)
    return str(value)


def table(title: str, columns: Sequence[tuple[str, str]], rows: Sequence[dict], specs: dict[str, str] | None = None) -> str:
    """Markdown table: columns = (key, header); specs = key -> format spec for floats."""
    specs = specs or {}
    cells = [[fmt(row.get(key), specs.get(key, "")) for key, _ in columns] for row in rows]
    headers = [header for _, header in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
    lines = [f"### {title}", "",
             "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(cell, widths)) + " |" for cell in cells]
    return "\n".join(lines) + "\n"


def mib(n: int | float | None) -> float | None:
    return None if n is None else n / 2**20


def peak_memory(fn: Callable[[], Any], device: str) -> dict[str, Any]:
    """Peak memory of one call of fn above the resident state before it (weights, optimizer state,
    inputs): peak_bytes, baseline_bytes, step_peak_bytes (the difference) and memory_method."""
    sync(device)
    if device == "cuda":
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        method = "torch.cuda.max_memory_allocated"
    else:
        strict = all(os.environ.get(k) == v for k, v in MALLOC_ENV.items())
        trimmed = malloc_trim()
        reset = reset_peak_rss()
        baseline = rss_bytes()
        fn()
        peak = peak_rss_bytes()
        if not reset:
            method = "ru_maxrss (no clear_refs: includes the warm-up step)"
        elif strict:
            method = "VmHWM, glibc mmap threshold 64 KiB"
        else:
            method = "VmHWM after malloc_trim" if trimmed else "VmHWM"
    return {"peak_bytes": peak, "baseline_bytes": baseline, "step_peak_bytes": peak - baseline,
            "memory_method": method}

"""Tokenizer training step, fast path vs the literal reference path, one fresh process per measurement.

    python -m mergevq.benchmarks.step '{"size": "tiny", "variant": "gr", "path": "fast", "mode": "time"}'

The step is the stage-I generator step of ``mergevq.engine.stage1`` without the GAN: the
``Stage1Model`` forward (reconstruction pass at the variant's nominal K plus the alignment branch on
an ``align_size`` view), ``Stage1Criterion.generator`` (L1 reconstruction, LFQ commitment and
entropy, alignment KL against fixed teacher logits; LPIPS with a random VGG only with
``perceptual``), backward and an Adam step. Both paths start from the same weights and inputs.

Every measurement runs in a fresh process: the warm-up step (Adam state created, FLOPs counted),
then one step whose peak memory is measured, then the timed steps. Peak memory: CUDA,
``torch.cuda.max_memory_allocated``; CPU, the RSS high-water mark (VmHWM, reset through Linux
``/proc/self/clear_refs``) after ``malloc_trim(0)`` has returned glibc's cached free blocks, so the
baseline holds only live memory. ``tracemalloc`` does not see torch's allocations. With
``mode='memory'`` and ``common.MALLOC_ENV`` in the environment (``--strict-memory``) glibc returns
every block >= 64 KiB on free, so VmHWM follows the live bytes without allocator caching (it agrees
with the default within ~10-20% at tiny size: the cache-free figure is lower). Reported: the absolute
peak, the resident baseline before the step (weights, Adam state, inputs) and the step's peak above
it (activations, gradients, temporaries): the quantity the two paths differ in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import torch

from . import common, reference

RESULT_PREFIX = "BENCH_RESULT "
# fast_ckpt: with activation checkpointing; fast_ckpt_bf16: also under bf16 autocast (whatever --amp says)
PATHS = ("fast", "fast_ckpt", "fast_ckpt_bf16", "reference")


def build_step(size: str, variant: str, path: str, device: str = "cpu", batch: int = 2,
               perceptual: bool = False, amp: bool = False, seed: int = 0):
    """-> (step() returning the loss logs, info dict). One generator step per call."""
    from ..engine.runner import host_scalars
    from ..engine.stage1 import Stage1Model
    from ..losses.criterion import Stage1Criterion
    from ..models.blocks import set_activation_checkpointing
    from ..models.factory import build_tokenizer, layout

    if path not in PATHS:
        raise ValueError(f"path {path!r}: use one of {PATHS}")
    tk_cfg, var_cfg, q_cfg = common.model_configs(size, variant)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(tk_cfg, var_cfg, q_cfg).to(device).train()
    set_activation_checkpointing(tokenizer, path.startswith("fast_ckpt"))
    amp = amp or path.endswith("bf16")
    spec = layout(tk_cfg, var_cfg)
    keep, positions = spec["keep"], spec["num_positions"]
    loss_cfg = common.loss_config(perceptual)
    loss_cfg["align_weight"] = var_cfg["align_weight"]
    criterion = Stage1Criterion(loss_cfg, has_teacher=True, has_recovery=False).to(device)
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=1e-4, betas=(0.5, 0.9))
    gen = torch.Generator().manual_seed(seed + 1)
    res, align = tk_cfg["resolution"], tk_cfg["align_size"]
    x = (torch.rand(batch, 3, res, res, generator=gen) * 2 - 1).to(device)
    view = (torch.rand(batch, 3, align, align, generator=gen) * 2 - 1).to(device)
    teacher = torch.randn(batch, tk_cfg["align_dim"], generator=gen).to(device)
    if path != "reference":
        model = Stage1Model(tokenizer)

        def forward():
            return model(x, keep, view, positions)
    else:
        def forward():
            return reference.stage1_forward(tokenizer, x, keep, view, positions)

    def step() -> dict[str, float]:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            xrec, aux = forward()
            loss, logs = criterion.generator(x, xrec, aux, None, teacher)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # as the trainer: no gradients held between steps
        return host_scalars(logs)

    info = {
        "size": size, "variant": variant, "path": path, "batch": batch, "resolution": res, "align_size": align,
        "positions": positions, "keep": keep, "amp_bf16": amp, "perceptual": perceptual,
        "params": sum(p.numel() for p in tokenizer.parameters()),
    }
    return step, info


def measure(options: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in this process (see the module docstring); options as in main()."""
    device = options.get("device", "cpu")
    if options.get("threads"):
        torch.set_num_threads(int(options["threads"]))
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    step, info = build_step(options["size"], options["variant"], options["path"], device, options.get("batch", 2),
                            options.get("perceptual", False), options.get("amp", False))
    mode = options.get("mode", "both")
    result: dict[str, Any] = dict(info, mode=mode, device=device, threads=torch.get_num_threads())
    with common.flop_counter() as counter:
        result["losses"] = step()  # warm-up: Adam state, allocator and kernel caches; FLOPs counted here
    result["flops"] = counter.get_total_flops()
    if mode in ("memory", "both"):
        result.update(common.peak_memory(step, device))
    if mode in ("time", "both"):
        times = common.time_calls(step, device, repeats=options.get("repeats", 2), warmup=options.get("warmup", 0))
        result.update(common.summary(times))
        result["images_per_s"] = info["batch"] / result["min_s"]  # best of n (shared CPUs are noisy)
    return result


def run_subprocess(options: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run measure(options) in a fresh interpreter; CPU memory runs get common.MALLOC_ENV."""
    env = dict(os.environ)
    if options.get("mode") == "memory" and options.get("device", "cpu") == "cpu":
        env.update(common.MALLOC_ENV)
    proc = subprocess.run([sys.executable, "-m", "mergevq.benchmarks.step", json.dumps(options)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"benchmark worker failed (rc {proc.returncode}) for {options}:\n{proc.stderr[-4000:]}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit(__doc__)
    result = measure(json.loads(argv[0]))
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

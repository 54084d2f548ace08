"""Benchmark suite correctness (no timings asserted): the literal reference path computes the same
losses and images as the fast path, and the entry point writes the expected JSON."""

import json
import subprocess
import sys

import pytest
import torch
from helpers.models import groups_to_source

from mergevq.benchmarks import reference
from mergevq.benchmarks.common import model_configs
from mergevq.models.factory import build_tokenizer, layout
from mergevq.models.merge import canonical_order, unmerge

TOL = dict(rtol=1e-4, atol=1e-4)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one intra-op thread (see conftest)


def tiny_tokenizer(variant: str, bits: int | None = None):
    tk, var, q = model_configs("tiny", variant)
    if bits is not None:
        tk["z_channels"] = bits
    torch.manual_seed(0)
    tokenizer = build_tokenizer(tk, var, q)
    spec = layout(tk, var)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, tk["resolution"], tk["resolution"], generator=gen) * 2 - 1
    view = torch.rand(2, 3, tk["align_size"], tk["align_size"], generator=gen) * 2 - 1
    return tokenizer, spec, x, view


@pytest.mark.parametrize("variant", ["g", "gr", "r"])
def test_reference_matches_fast_path(variant):
    tokenizer, spec, x, view = tiny_tokenizer(variant)
    tokenizer.train()
    keep, positions = spec["keep"], spec["num_positions"]
    xrec, aux = tokenizer(x, keep)
    xrec_ref, aux_ref = reference.forward(tokenizer, x, keep)

    for name in ("commit", "sample_entropy", "batch_entropy", "entropy", "loss"):
        torch.testing.assert_close(aux_ref["losses"][name], aux["losses"][name], **TOL, msg=name)
    torch.testing.assert_close((x - xrec_ref).abs().mean(), (x - xrec).abs().mean(), **TOL)
    torch.testing.assert_close(xrec_ref, xrec, **TOL)

    # same merge groups: the dense source matrix is a one-hot column per position, and in canonical
    # order it is the fast path's group index
    source = aux_ref["source"]
    assert source.shape == (2, keep, positions)
    assert torch.equal(source.sum(1), torch.ones(2, positions))
    _, groups_ref = canonical_order(source.argmax(1), keep)
    assert torch.equal(groups_ref, aux["groups"])
    assert torch.equal(torch.sort(aux_ref["codes"], dim=1).values, torch.sort(aux["codes"], dim=1).values)

    # alignment branch
    torch.testing.assert_close(reference.align_logits(tokenizer, view, keep, positions),
                               tokenizer.align_logits(view, keep, positions), **TOL)


def test_reference_gradients_match():
    """Same gradients in float64 (in float32 the 2^18-way softmax alone differs by ~1e-4 relative);
    a 2^10 codebook keeps the float64 brute-force softmax cheap (test_lfq covers 18 bits)."""
    tokenizer, spec, x, _ = tiny_tokenizer("gr", bits=10)
    tokenizer.double().train()
    x, keep = x.double(), spec["keep"]

    def grads(forward):
        tokenizer.zero_grad(set_to_none=True)
        xrec, aux = forward(x, keep)
        ((x - xrec).abs().mean() + aux["losses"]["loss"]).backward()
        return {n: p.grad.clone() for n, p in tokenizer.named_parameters() if p.grad is not None}

    fast = grads(tokenizer)
    ref = grads(lambda *a: reference.forward(tokenizer, *a))
    assert fast.keys() == ref.keys()
    for name in fast:
        torch.testing.assert_close(ref[name], fast[name], rtol=1e-6, atol=1e-12, msg=name)


def test_dense_unmerge_equals_gather_unmerge():
    tokenizer, spec, x, _ = tiny_tokenizer("gr")
    tokenizer.eval()
    keep = spec["keep"]
    tokens = tokenizer.encode(x, keep=keep)
    z_q = tokenizer.quantizer.code_vectors(tokens.codes)
    dense = reference.token_unmerge(z_q, groups_to_source(tokens.groups, keep))
    assert torch.equal(dense, unmerge(z_q, tokens.groups))
    with torch.no_grad():
        image_dense = reference.decode(tokenizer.decoder, dense.transpose(1, 2).reshape(2, -1, *tokens.grid))
        image_gather = tokenizer.decode(tokens)
        # the literal path's own source matrix (ToMe order) unmerges to the same latents
        _, aux_ref = reference.forward(tokenizer, x, keep)
    torch.testing.assert_close(image_dense, image_gather, **TOL)
    assert torch.equal(aux_ref["z_l"], dense)


def test_training_step_paths_agree():
    from mergevq.benchmarks.step import build_step, measure

    logs = {path: build_step("tiny", "gr", path)[0]() for path in ("fast", "fast_ckpt", "reference")}
    fast, ref = logs["fast"], logs["reference"]
    assert fast.keys() == ref.keys() >= {"rec", "commit", "entropy", "align", "total"}
    for key in fast:
        assert fast[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-4), key
    assert logs["fast_ckpt"] == pytest.approx(fast, rel=1e-6, abs=1e-6)  # recomputation changes no value

    result = measure({"size": "tiny", "variant": "gr", "path": "fast", "mode": "both", "repeats": 1, "threads": 1})
    assert result["flops"] > 0 and result["min_s"] > 0 and result["step_peak_bytes"] >= 0
    assert (result["keep"], result["positions"]) == (36, 64)
    assert result["losses"] == pytest.approx(fast)


@pytest.mark.slow
def test_entry_point_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "mergevq.benchmarks", "--size", "tiny", "--suite", "ar", "--device", "cpu",
           "--ar-grids", "16", "--ar-keeps", "144", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MergeAR vs raster" in proc.stdout
    report = json.loads(out.read_text())
    assert {"machine", "args", "suites", "elapsed_s"} <= report.keys()
    assert {"cpu_model", "cpu_cores", "torch", "gpu"} <= report["machine"].keys()
    (row,) = report["suites"]["ar"]["rows"]
    assert (row["L"], row["K"]) == (256, 144)
    for key in ("raster_tokens_per_s", "mergear_tokens_per_s", "raster_kv_bytes", "mergear_kv_bytes", "cache_ratio"):
        assert row[key] > 0
    assert row["mergear_kv_bytes"] < row["raster_kv_bytes"]


def test_path_selection_always_keeps_the_literal_reference():
    from mergevq.benchmarks.__main__ import parse_args

    args = parse_args(["--paths", "fast,fast_ckpt", "--no-components", "--device", "cpu"])
    assert args.step_paths == ["fast", "fast_ckpt", "reference"] and args.components is False
    assert parse_args(["--device", "cpu"]).step_paths == ["fast", "fast_ckpt", "fast_ckpt_bf16", "reference"]
    with pytest.raises(SystemExit):
        parse_args(["--paths", "fastest", "--device", "cpu"])

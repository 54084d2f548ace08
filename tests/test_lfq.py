import math
from pathlib import Path

import pytest
import torch

from mergevq.models.lfq import (
    LFQ,
    bits_for_codebook_size,
    bits_to_indices,
    codes_to_vectors,
    entropy_terms,
    entropy_terms_bruteforce,
    indices_to_bits,
    join_codes,
    mean_code_probs,
    sign_quantize,
    split_codes,
)

FIXTURE = Path(__file__).parent / "fixtures" / "official_tiny_g.expected.pt"


@pytest.mark.parametrize("num_bits", [10, 18])
def test_bits_index_round_trip(num_bits):
    idx = torch.randint(0, 2**num_bits, (4, 33))
    bits = indices_to_bits(idx, num_bits)
    assert bits.shape == (4, 33, num_bits) and bits.dtype == torch.bool
    assert torch.equal(bits_to_indices(bits), idx)
    assert torch.equal(bits_to_indices(bits.long()), idx)
    vec = codes_to_vectors(idx, num_bits)
    assert vec.dtype == torch.float32 and set(vec.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(bits_to_indices(vec > 0), idx)


def test_little_endian_hand_example():
    z = torch.tensor([0.3, -1.0, 2.0, 0.0, 0.5])  # bits 1,0,1,0,1 (0.0 is a tie -> bit 0)
    assert bits_to_indices(z > 0).item() == 1 + 4 + 16
    assert codes_to_vectors(torch.tensor(21), 5).tolist() == [1.0, -1.0, 1.0, -1.0, 1.0]


def test_sign_quantize_ties_and_straight_through():
    z = torch.tensor([-2.0, -0.0, 0.0, 1e-8, 3.0], requires_grad=True)
    q = sign_quantize(z)
    assert q.tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0]
    w = torch.randn(5)
    (q * w).sum().backward()
    assert torch.equal(z.grad, w)


@pytest.mark.parametrize("num_bits,n", [(10, 64), (18, 8)])
@pytest.mark.parametrize("scale", [0.01, 1.0, 10.0])
def test_entropy_terms_match_bruteforce(num_bits, n, scale):
    torch.manual_seed(num_bits + int(100 * scale))
    z = (torch.randn(n, num_bits, dtype=torch.float64) * scale).requires_grad_()
    fast, ref = entropy_terms(z), entropy_terms_bruteforce(z)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-9)
    grad_fast = torch.autograd.grad(fast[0] - 0.7 * fast[1], z)[0]
    grad_ref = torch.autograd.grad(ref[0] - 0.7 * ref[1], z)[0]
    torch.testing.assert_close(grad_fast, grad_ref, rtol=1e-3, atol=1e-8)

    # The production dtype (float32) against the float64 reference.
    z32 = z.detach().float().requires_grad_()
    fast32 = entropy_terms(z32)
    for a, b in zip(fast32, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b.detach(), rtol=1e-3, atol=1e-5)
    grad32 = torch.autograd.grad(fast32[0] - 0.7 * fast32[1], z32)[0]
    torch.testing.assert_close(grad32.double(), grad_ref, rtol=1e-3, atol=1e-3 * grad_ref.abs().max().item())


def _official_entropy_loss(z, temperature=0.01, eps=1e-5):
    """The official entropy_loss, term by term, over the full [N, 2^D] logits 2 <z, c>."""
    codebook = codes_to_vectors(torch.arange(2 ** z.shape[-1]), z.shape[-1], z.dtype)
    logits = 2 * torch.einsum("nd,cd->nc", z, codebook)
    probs = torch.softmax(logits / temperature, -1)
    log_probs = torch.log_softmax(logits / temperature + eps, -1)
    avg_probs = probs.mean(0)
    return -(probs * log_probs).sum(-1).mean(), -(avg_probs * torch.log(avg_probs + eps)).sum()


@pytest.mark.parametrize("num_bits,n", [(8, 64), (10, 64), (12, 32), (14, 32), (16, 16), (18, 16)])
@pytest.mark.parametrize("scale", [0.01, 0.1, 1.0])
def test_entropy_terms_equal_the_official_formula(num_bits, n, scale):
    torch.manual_seed(num_bits + int(1000 * scale))
    z = (torch.randn(n, num_bits, dtype=torch.float64) * scale).requires_grad_()
    ref = _official_entropy_loss(z)
    for got in (entropy_terms(z), entropy_terms_bruteforce(z)):
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=0)
    grad_ref = torch.autograd.grad(ref[0] - ref[1], z)[0]
    fast = entropy_terms(z)
    torch.testing.assert_close(torch.autograd.grad(fast[0] - fast[1], z)[0], grad_ref, rtol=1e-4,
                               atol=1e-6 * grad_ref.abs().max().item())
    # float32 (the training dtype) with the default options, against the float64 official formula
    for a, b in zip(entropy_terms(z.detach().float()), ref):
        torch.testing.assert_close(a.double(), b.detach(), rtol=1e-3, atol=0)


def test_entropy_eps_zero_is_the_exact_entropy_and_the_default_is_not():
    torch.manual_seed(0)
    z = torch.randn(64, 18, dtype=torch.float64) * 0.01  # an early-training batch: pbar spread thin
    pbar = mean_code_probs(z)
    exact = -torch.special.xlogy(pbar, pbar).sum()
    sample0, batch0 = entropy_terms(z, eps=0.0)
    torch.testing.assert_close(batch0, exact, rtol=1e-10, atol=0)
    torch.testing.assert_close(entropy_terms_bruteforce(z, eps=0.0)[1], exact, rtol=1e-6, atol=0)
    sample, batch = entropy_terms(z)
    torch.testing.assert_close(sample, sample0)  # the eps shift in log_softmax is a constant
    assert batch < exact - 0.3  # official eps = 1e-5 is far from the exact entropy here
    with pytest.raises(ValueError, match="entropy_eps"):
        LFQ(bits=4, entropy_eps=-1.0)


def test_lfq_entropy_eps_option_reaches_the_loss():
    torch.manual_seed(1)
    z = torch.randn(2, 30, 12) * 0.01
    official, exact = LFQ(bits=12).train(), LFQ(bits=12, entropy_eps=0.0).train()
    assert official.entropy_eps == 1e-5
    batch_official = official(z)[2]["batch_entropy"]
    batch_exact = exact(z)[2]["batch_entropy"]
    torch.testing.assert_close(batch_official, entropy_terms(z.reshape(-1, 12))[1])
    torch.testing.assert_close(batch_exact, entropy_terms(z.reshape(-1, 12), eps=0.0)[1])
    assert batch_official < batch_exact


def test_mean_code_probs_is_the_average_softmax_in_index_order():
    z = torch.randn(16, 7, dtype=torch.float64) * 0.05
    codebook = codes_to_vectors(torch.arange(2**7), 7, torch.float64)
    ref = torch.softmax(2 * z @ codebook.T / 0.01, dim=-1).mean(0)
    torch.testing.assert_close(mean_code_probs(z), ref)


def test_entropy_extremes():
    num_bits = 10
    all_codes = codes_to_vectors(torch.arange(2**num_bits), num_bits)
    sample, batch = entropy_terms(5 * all_codes, eps=0.0)
    torch.testing.assert_close(batch, torch.tensor(num_bits * math.log(2)))
    assert 0 <= sample.item() < 1e-6
    # the official eps: every code at 2^-D gives -log(2^-D + eps)
    torch.testing.assert_close(entropy_terms(5 * all_codes)[1], torch.tensor(-math.log(2.0**-num_bits + 1e-5)))
    # A batch on a single code: batch entropy 0 as well.
    sample, batch = entropy_terms(5 * all_codes[:1].expand(32, -1), eps=0.0)
    assert batch.item() < 1e-6 and sample.item() < 1e-6
    # Tiny |z|: every p_n is uniform, both terms are at their maximum D ln 2.
    sample, batch = entropy_terms(1e-7 * torch.randn(8, num_bits), eps=0.0)
    torch.testing.assert_close(sample, torch.tensor(num_bits * math.log(2)))
    torch.testing.assert_close(batch, torch.tensor(num_bits * math.log(2)))


def test_entropy_terms_ignore_autocast():
    z = torch.randn(32, 18)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sample, batch = entropy_terms(z)
    assert sample.dtype == batch.dtype == torch.float32
    for a, b in zip((sample, batch), entropy_terms(z)):
        torch.testing.assert_close(a, b)


def test_split_join_codes():
    idx = torch.randint(0, 2**18, (3, 50))
    pre, post = split_codes(idx, (6, 12), num_bits=18)
    assert torch.equal(pre, idx & 63) and torch.equal(post, idx >> 6)
    assert int(pre.max()) < 64 and int(post.max()) < 4096
    assert torch.equal(join_codes((pre, post), (6, 12)), idx)
    # Concatenating the part vectors [pre, post] gives the full code vector.
    vec = torch.cat([codes_to_vectors(pre, 6), codes_to_vectors(post, 12)], dim=-1)
    assert torch.equal(vec, codes_to_vectors(idx, 18))
    parts = split_codes(idx, (5, 4, 9))
    assert [int(p.max()) < 2**b for p, b in zip(parts, (5, 4, 9))] == [True] * 3
    assert torch.equal(join_codes(parts, (5, 4, 9)), idx)
    with pytest.raises(ValueError, match="17"):
        split_codes(idx, (6, 11), num_bits=18)
    with pytest.raises(ValueError):
        join_codes((pre,), (6, 12))


def test_lfq_forward_train():
    lfq = LFQ(bits=18).train()
    assert lfq.codebook_size == 2**18
    z = torch.randn(2, 3, 5, 18, requires_grad=True)
    z_q, codes, losses = lfq(z)
    assert z_q.shape == z.shape and codes.shape == (2, 3, 5) and codes.dtype == torch.int64
    assert torch.equal(codes, bits_to_indices(z > 0))
    assert torch.equal(z_q, torch.where(z > 0, 1.0, -1.0))
    assert torch.equal(lfq.code_vectors(codes), z_q.detach())
    torch.testing.assert_close(losses["commit"], ((z.abs() - 1) ** 2).mean())
    sample, batch = entropy_terms(z.reshape(-1, 18))
    torch.testing.assert_close(losses["sample_entropy"], sample)
    torch.testing.assert_close(losses["batch_entropy"], batch)
    torch.testing.assert_close(losses["entropy"], sample - batch)
    torch.testing.assert_close(losses["loss"], 0.25 * losses["commit"] + 0.1 * (sample - batch))
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_lfq_eval_has_zero_entropy_terms():
    lfq = LFQ(bits=6).eval()
    z = torch.randn(4, 10, 6)
    _, _, losses = lfq(z)
    assert losses["sample_entropy"].item() == losses["batch_entropy"].item() == losses["entropy"].item() == 0
    torch.testing.assert_close(losses["loss"], 0.25 * losses["commit"])


def test_lfq_matches_official_codes():
    expected = torch.load(FIXTURE)
    _, codes, _ = LFQ(bits=18).eval()(expected["z"])
    assert torch.equal(codes, expected["codes"])


def test_sync_batch_entropy_single_process(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        z = torch.randn(16, 8, requires_grad=True)
        _, _, losses = LFQ(bits=8, sync_batch_entropy=True).train()(z)
        torch.testing.assert_close(losses["batch_entropy"], entropy_terms(z)[1])
        losses["loss"].backward()
        assert torch.isfinite(z.grad).all()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bits", [0, -3, 31, 2.5, True])
def test_invalid_bits(bits):
    with pytest.raises(ValueError, match=str(bits)):
        LFQ(bits=bits)


def test_codebook_size():
    assert bits_for_codebook_size(2**18) == 18
    assert LFQ(codebook_size=1024).bits == 10
    for n in (1000, 0, 3):
        with pytest.raises(ValueError, match=f"codebook size {n} is not a power of two"):
            bits_for_codebook_size(n)
    with pytest.raises(ValueError, match="1000"):
        LFQ(codebook_size=1000)
    with pytest.raises(ValueError, match="2147483648|31"):
        bits_for_codebook_size(2**31)


def test_wrong_channel_count():
    with pytest.raises(ValueError, match="18"):
        LFQ(bits=18)(torch.randn(2, 17))

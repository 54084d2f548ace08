import math

import pytest
import torch

from mergevq.models.generate import (
    RasterDecoder,
    cfg_logits,
    generate,
    sample_categorical,
    sample_logits,
    top_k_top_p_filter,
)
from mergevq.models.gpt import GPT, GPT_SIZES, ModelArgs, build_gpt
from mergevq.models.lfq import join_codes, split_codes
from mergevq.models.rope import apply_rope, rope_2d

# Measured by building the official taming/modules/transformer/gpt.py (ApexGen-X/MergeVQ @ 5267198)
# on the meta device with factorized_bits [6, 12] and class_num 1000; spec 7.1 rounds them.
OFFICIAL_PARAMS = {"b": 343_570_432, "l": 804_362_240, "xl": 1_486_679_040}
SPEC_PARAMS = {"b": 343.6e6, "l": 804.4e6, "xl": 1486.7e6}
SPEC_FFN = {"b": 2816, "l": 3584, "xl": 4096}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one intra-op thread (see conftest)


def tiny_args(**kw) -> ModelArgs:
    base = dict(dim=32, n_layer=2, n_head=2, intra_layers=1, factorized_bits=(2, 3), num_classes=5, grid=(3, 4))
    return ModelArgs(**{**base, **kw})


def tiny_model(seed: int = 0, dtype=torch.float64, **kw) -> GPT:
    """A tiny eval-mode model whose (normally zero-initialised) heads are random, so logits differ."""
    torch.manual_seed(seed)
    model = GPT(tiny_args(**kw)).to(dtype).eval()
    for head in model.heads:
        torch.nn.init.normal_(head.weight, std=0.5)
    return model


def random_batch(model: GPT, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, model.args.codebook_size, (batch, model.args.seq_len), generator=g)
    labels = torch.randint(0, model.args.num_classes, (batch,), generator=g)
    return codes, labels


# ---- sizes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["b", "l", "xl"])
def test_parameter_counts_match_official(size):
    with torch.device("meta"):
        model = build_gpt(size)
    n = sum(p.numel() for p in model.parameters())
    assert n == OFFICIAL_PARAMS[size]
    assert abs(n - SPEC_PARAMS[size]) / SPEC_PARAMS[size] < 0.005
    assert model.args.hidden_dim == SPEC_FFN[size]
    assert model.args.vocab_sizes == (64, 4096) and model.cls_embedding.num_embeddings == 1001


def test_sizes_registry_and_args_validation():
    assert set(GPT_SIZES) == {"tiny", "b", "l", "xl"}
    assert ModelArgs().factorized_bits == (6, 12) and ModelArgs().codebook_size == 2**18
    assert ModelArgs(vocab_size=16).vocab_sizes == (16,)
    assert ModelArgs(factorized_bits=[6, 12], grid=[8, 8]).grid == (8, 8)  # lists (Hydra) become tuples
    assert ModelArgs(dim=64, ffn_hidden=100).hidden_dim == 100
    with pytest.raises(ValueError):
        ModelArgs(vocab_size=16, factorized_bits=(6, 12))
    with pytest.raises(ValueError):
        ModelArgs(prefix_tokens=2)  # a merge-instruction token needs its table
    with pytest.raises(ValueError):
        ModelArgs(dim=24, n_head=4)  # head_dim 6 is not divisible by 4
    with pytest.raises(KeyError):
        build_gpt("huge")


def test_init_zero_heads_and_initial_loss():
    torch.manual_seed(0)
    model = GPT(tiny_args(dim=128, n_head=4))
    assert all(not h.weight.any() for h in model.heads)
    std = model.layers[0].attention.wqkv.weight.std().item()
    assert abs(std - 0.02) < 0.002
    model.eval()
    codes, labels = random_batch(model)
    out = model.loss(codes, labels)
    assert set(out) == {"loss", "loss_pre", "loss_post"}
    assert out["loss_pre"].item() == pytest.approx(math.log(4))
    assert out["loss_post"].item() == pytest.approx(math.log(8))
    assert out["loss"].item() == pytest.approx(math.log(32))


# ---- training forward ----------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"intra_layers": 0}, {"factorized_bits": None, "vocab_size": 11}])
def test_forward_shapes_loss_and_backward(kw):
    model = tiny_model(dtype=torch.float32, **kw).train()
    codes, labels = random_batch(model)
    logits = model(codes, labels)
    assert tuple(lg.shape for lg in logits) == tuple((3, 12, v) for v in model.args.vocab_sizes)
    out = model.loss(codes, labels, label_smoothing=0.1)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads if g is not None)
    assert model.cls_embedding.weight.grad is not None


def test_teacher_forcing_is_causal():
    """Changing token m leaves logits_pre at positions <= m and logits_post at positions < m unchanged;
    logits_post at m sees the pre part of t_m (intra-token transformer), logits at m + 1 see t_m."""
    model = tiny_model()
    codes, labels = random_batch(model)
    m = 5
    other = codes.clone()
    other[:, m] = (codes[:, m] + 1) % model.args.codebook_size  # changes the pre part (2 bits)
    (pre_a, post_a), (pre_b, post_b) = model(codes, labels), model(other, labels)
    torch.testing.assert_close(pre_a[:, : m + 1], pre_b[:, : m + 1])
    torch.testing.assert_close(post_a[:, :m], post_b[:, :m])
    assert not torch.allclose(post_a[:, m], post_b[:, m])
    assert not torch.allclose(pre_a[:, m + 1], pre_b[:, m + 1])


def test_explicit_causal_mask_equals_default():
    model = tiny_model()
    codes, labels = random_batch(model)
    t = model.args.prefix_tokens + codes.shape[1] - 1
    mask = torch.ones(1, t, t, dtype=torch.bool).tril()
    for a, b in zip(model(codes, labels), model(codes, labels, mask=mask)):
        torch.testing.assert_close(a, b)


def test_class_dropout_uses_null_class():
    model = tiny_model(class_dropout=1.0)
    labels = torch.tensor([0, 3])
    dropped = model.embed_prefix(labels, drop=True)
    null = model.cls_embedding.weight[model.null_class]
    torch.testing.assert_close(dropped[:, 0], null.expand(2, -1))
    torch.testing.assert_close(model.embed_prefix(labels)[:, 0], model.cls_embedding.weight[labels])


# ---- rope -----------------------------------------------------------------------------------------
def test_rope_2d_rows_columns_and_prefix():
    head_dim, grid = 16, (3, 5)
    table = rope_2d(grid, head_dim, prefix=2, zero_prefix=True)
    assert table.shape == (2 + 15, 8, 2)
    assert float(table[:2].abs().max()) == 0  # official: prefix q/k zeroed
    ident = rope_2d(grid, head_dim, prefix=1, zero_prefix=False)
    assert torch.equal(ident[0, :, 0], torch.ones(8)) and float(ident[0, :, 1].abs().max()) == 0
    freqs = 10000.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    r, c = 2, 3  # raster position 13
    angles = torch.cat([r * freqs, c * freqs]).float()
    torch.testing.assert_close(table[2 + 13, :, 0], angles.cos())
    torch.testing.assert_close(table[2 + 13, :, 1], angles.sin())


def test_rope_scores_depend_on_relative_2d_offset():
    grid, head_dim = (6, 6), 16
    table = rope_2d(grid, head_dim, prefix=0).double()
    q, k = torch.randn(2, 1, 1, 1, head_dim, dtype=torch.float64)

    def score(pq, pk):
        rq = apply_rope(q, table[pq : pq + 1])
        rk = apply_rope(k, table[pk : pk + 1])
        return (rq * rk).sum().item()

    pos = lambda r, c: r * grid[1] + c  # noqa: E731
    assert score(pos(1, 2), pos(0, 1)) == pytest.approx(score(pos(4, 5), pos(3, 4)))
    assert score(pos(1, 2), pos(0, 1)) != pytest.approx(score(pos(1, 2), pos(1, 1)))


# ---- KV cache --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [{}, {"zero_prefix_rope": False}, {"intra_layers": 0}, {"factorized_bits": None, "vocab_size": 13},
     {"prefix_tokens": 2, "num_keep_options": 3}],
)
def test_cached_decoding_matches_full_forward(kw):
    model = tiny_model(**kw)
    codes, labels = random_batch(model, batch=2)
    keep = torch.tensor([2, 0]) if model.keep_embedding is not None else None
    full = model(codes, labels, keep)

    calls = []
    model.cls_embedding.register_forward_hook(lambda *_: calls.append(1))
    caches = model.setup_cache(max_batch=4, max_seq=model.args.prefix_tokens + model.args.seq_len)
    pointers = [(c.k.data_ptr(), c.v.data_ptr()) for c in caches]
    with torch.no_grad():
        h = model.prefill(labels, keep)
        for pos in range(codes.shape[1]):
            for a, b in zip(model.head_logits(h, codes[:, pos]), full):
                torch.testing.assert_close(a, b[:, pos], atol=1e-10, rtol=1e-10)
            # the sub-head path used for sampling agrees with teacher forcing
            parts = model.split(codes[:, pos])
            for j in range(model.num_parts):
                torch.testing.assert_close(model.next_part_logits(h, parts[:j]), full[j][:, pos])
            if pos + 1 < codes.shape[1]:
                h = model.decode_one(codes[:, pos], pos)
    assert len(calls) == 1  # the prefix is embedded and run once
    assert [(c.k.data_ptr(), c.v.data_ptr()) for c in model.kv_cache] == pointers
    with pytest.raises(ValueError):
        model.setup_cache(1, 4)
        model.prefill(labels, keep)  # batch 2 > max_batch 1


# ---- sampling utilities ------------------------------------------------------------------------------
def test_top_k_top_p_filter():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    kept = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert kept(top_k_top_p_filter(logits, top_k=2)) == [False, True, False, True]
    assert kept(top_k_top_p_filter(logits, top_p=0.75)) == [False, True, False, True]  # 0.8 >= 0.75
    assert kept(top_k_top_p_filter(logits, top_p=0.85)) == [False, True, True, True]  # 0.95
    assert kept(top_k_top_p_filter(logits, top_p=0.3)) == [False, True, False, False]
    assert kept(top_k_top_p_filter(logits, top_k=3, top_p=0.99)) == [False, True, True, True]
    assert torch.equal(top_k_top_p_filter(logits), logits)

    torch.manual_seed(0)
    x = torch.randn(50, 40)
    for p in (0.1, 0.5, 0.9):
        out = top_k_top_p_filter(x, top_p=p)
        probs = x.softmax(-1)
        kept_mass = (probs * torch.isfinite(out)).sum(-1)
        smallest_kept = torch.where(torch.isfinite(out), probs, torch.inf).min(-1).values
        assert (kept_mass >= p - 1e-6).all()
        assert (kept_mass - smallest_kept < p).all()  # minimal: dropping the least likely falls below p
        dropped = torch.where(torch.isfinite(out), -torch.inf, probs).max(-1).values
        assert (dropped <= smallest_kept).all()  # the nucleus is the most likely tokens


def test_sample_logits_seeded_greedy_and_cfg():
    torch.manual_seed(0)
    logits = torch.randn(8, 30)
    a = sample_logits(logits, generator=torch.Generator().manual_seed(3))
    b = sample_logits(logits, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(sample_logits(logits, top_k=1, generator=torch.Generator().manual_seed(4)),
                       logits.argmax(-1))
    assert torch.equal(sample_logits(logits, temperature=0), logits.argmax(-1))
    uncond = torch.randn(8, 30)
    assert torch.equal(cfg_logits(logits, uncond, 1.0), logits)
    torch.testing.assert_close(cfg_logits(logits, uncond, 3.0), uncond + 3.0 * (logits - uncond))
    counts = torch.bincount(sample_logits(torch.log(torch.tensor([[0.2, 0.8]])).expand(4000, 2),
                                          generator=torch.Generator().manual_seed(0)), minlength=2)
    assert abs(counts[1].item() / 4000 - 0.8) < 0.03


def test_sample_categorical_has_the_multinomial_distribution_and_never_draws_a_zero():
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.6, 0.0], [3.0, 0.0, 1.0, 0.0, 0.0]])  # unnormalised row 2
    n = 100_000
    draws = sample_categorical(probs.repeat_interleave(n, 0), torch.Generator().manual_seed(0)).view(2, n)
    freq = torch.stack([torch.bincount(row, minlength=5) for row in draws]).double() / n
    target = (probs / probs.sum(-1, keepdim=True)).double()
    assert (freq[target == 0] == 0).all()
    assert (freq - target).abs().max() < 0.01  # 5 sigma of the 100k-draw frequencies is 0.0075
    edge = torch.tensor([[0.0, 0.0, 1.0, 0.0]]).expand(1000, 4)  # zeros before and after the one possible index
    assert (sample_categorical(edge, torch.Generator().manual_seed(1)) == 2).all()


# ---- generate -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"factorized_bits": None, "vocab_size": 9}])
def test_generate_shape_range_and_seed(kw):
    model = tiny_model(**kw)
    labels = torch.tensor([0, 4, 2])
    temperature = (1.0, 0.9)[: model.num_parts]
    codes, stats = generate(model, labels, seed=7, cfg_scale=2.0, temperature=temperature, top_p=0.95)
    assert codes.shape == (3, model.args.seq_len) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < model.args.codebook_size
    again, _ = generate(model, labels, seed=7, cfg_scale=2.0, temperature=temperature, top_p=0.95)
    assert torch.equal(codes, again)
    other, _ = generate(model, labels, seed=8, cfg_scale=2.0, temperature=temperature, top_p=0.95)
    assert not torch.equal(codes, other)
    assert stats["tokens_per_s"] > 0 and stats["peak_live"] == 1 + model.args.seq_len - 1
    short, _ = generate(model, labels, steps=5, seed=7, cfg_scale=2.0, cfg_interval=(0.0, 0.5))
    assert short.shape == (3, 5)
    assert model.kv_cache is None and not model.training


def test_generate_greedy_matches_full_forward_argmax():
    """top_k = 1 through the cache is greedy decoding: every part is the argmax of the teacher-forced logits."""
    model = tiny_model()
    labels = torch.tensor([1, 3])
    codes, _ = generate(model, labels, top_k=1, seed=0)
    for part, lg in zip(model.split(codes), model(codes, labels)):
        assert torch.equal(part, lg.argmax(-1))


def test_generate_cfg_scale_one_equals_conditional_and_guidance_changes_samples():
    model = tiny_model()
    labels = torch.tensor([1, 3])
    plain, _ = generate(model, labels, top_k=1)
    interval_off, _ = generate(model, labels, top_k=1, cfg_scale=(3.0, 3.0), cfg_interval=(0.0, 0.0))
    assert torch.equal(plain, interval_off)  # CFG batch, but guidance applied nowhere
    guided, _ = generate(model, labels, top_k=1, cfg_scale=(3.0, 3.0))
    assert not torch.equal(plain, guided)


def test_raster_decoder_rows_with_cfg():
    """With CFG the cache holds [cond; uncond] rows; the uncond half equals a null-class forward."""
    model = tiny_model()
    codes, labels = random_batch(model, batch=2)
    null = torch.full_like(labels, model.null_class)
    full_c, full_u = model(codes, labels), model(codes, null)
    dec = RasterDecoder(model, 2, cfg=True)
    with torch.no_grad():
        h = dec.prefill(labels)
        for pos in range(4):
            lc, lu = model.head_logits(h, torch.cat([codes[:, pos]] * 2))[1].chunk(2)
            torch.testing.assert_close(lc, full_c[1][:, pos])
            torch.testing.assert_close(lu, full_u[1][:, pos])
            h = dec.decode_one(codes[:, pos])


def test_split_join_roundtrip_via_model():
    model = tiny_model()
    codes = torch.arange(32)
    assert torch.equal(model.join(model.split(codes)), codes)
    assert all(torch.equal(a, b) for a, b in zip(model.split(codes), split_codes(codes, (2, 3))))
    assert torch.equal(join_codes(model.split(codes), (2, 3)), codes)

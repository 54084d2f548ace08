import pytest
import torch

from mergevq.models.generate import RasterDecoder, generate
from mergevq.models.gpt import GPT, ModelArgs
from mergevq.models.mergear import (
    MergeARConfig,
    MergeARDecoder,
    keep_index,
    mergear_batch,
    mergear_mask,
    representative,
    token_mask,
)
from mergevq.models.tokens import Tokens

P = 2  # [C] [M]

# The paper's figure (fig/mergeAR_pipeline.jpg): groups P1 P1 P3 P3 P5 P5 P5 P8 P8, w = 2.
FIGURE_GROUPS = torch.tensor([[1, 1, 3, 3, 5, 5, 5, 8, 8]])
# Row l = the query holding token l, column m = token m; 1 = visible (diagonal, the 2 most recent
# tokens, or a first occurrence P1/P3/P5/P8), 0 = future or an evicted duplicate (grey in the figure).
FIGURE_MASK = torch.tensor([
    [1, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 0, 0, 0, 0, 0],
    [1, 0, 1, 1, 1, 0, 0, 0, 0],
    [1, 0, 1, 1, 1, 1, 0, 0, 0],
    [1, 0, 1, 0, 1, 1, 1, 0, 0],
    [1, 0, 1, 0, 1, 1, 1, 1, 0],
    [1, 0, 1, 0, 1, 0, 1, 1, 1],
], dtype=torch.bool)

# Two 4 x 4 grids with many duplicates (K = 5 and K = 4 groups), ids = arbitrary non-negative labels.
GROUPS = torch.tensor([
    [0, 0, 2, 2, 4, 4, 4, 7, 7, 7, 7, 7, 9, 9, 9, 9],
    [3, 1, 1, 1, 1, 5, 5, 5, 5, 5, 5, 5, 5, 5, 1, 6],
])


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one intra-op thread (see conftest)


def tiny_mergear(seed: int = 0, **kw) -> GPT:
    base = dict(dim=32, n_layer=2, n_head=2, intra_layers=1, factorized_bits=(2, 3), num_classes=5,
                grid=(4, 4), prefix_tokens=P, num_keep_options=3)
    torch.manual_seed(seed)
    model = GPT(ModelArgs(**{**base, **kw})).double().eval()
    for head in model.heads:
        torch.nn.init.normal_(head.weight, std=0.5)
    return model


def code_grid(groups: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Per-position codes that are equal inside each group (y_l = code of l's group)."""
    g = torch.Generator().manual_seed(seed)
    per_group = torch.randint(0, 32, (groups.shape[0], int(groups.max()) + 1), generator=g)
    return per_group.gather(1, groups)


# ---- (a) masks ---------------------------------------------------------------------------------------
def test_representative_on_figure():
    rep, is_first = representative(FIGURE_GROUPS)
    assert rep.tolist() == [[0, 0, 2, 2, 4, 4, 4, 7, 7]]
    assert is_first.tolist() == [[True, False, True, False, True, False, False, True, False]]
    rep, _ = representative(GROUPS)
    assert rep[1].tolist() == [0, 1, 1, 1, 1, 5, 5, 5, 5, 5, 5, 5, 5, 5, 1, 15]  # group 1 is not contiguous
    with pytest.raises(ValueError):
        representative(torch.tensor([[0, -1]]))


def test_figure_mask():
    assert torch.equal(token_mask(FIGURE_GROUPS, window=2)[0], FIGURE_MASK)


def test_mergear_mask_layout_with_prefix():
    """Input index P + l holds token l (l <= L - 2); prefix rows causal, prefix columns always visible."""
    mask = mergear_mask(FIGURE_GROUPS, window=2, prefix=P)
    assert mask.shape == (1, P + 8, P + 8)
    expected = torch.zeros(P + 8, P + 8, dtype=torch.bool)
    expected[:P, :P] = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    expected[P:, :P] = True
    expected[P:, P:] = FIGURE_MASK[:8, :8]
    assert torch.equal(mask[0], expected)
    # the last token is only a target: appending a token leaves the earlier rows unchanged
    longer = mergear_mask(torch.cat([FIGURE_GROUPS, torch.tensor([[9]])], 1), window=2, prefix=P)
    assert torch.equal(longer[0, P:, P:], FIGURE_MASK)


def test_large_window_gives_causal_mask():
    t = P + GROUPS.shape[1] - 1
    causal = torch.ones(t, t, dtype=torch.bool).tril().expand(2, t, t)
    assert torch.equal(mergear_mask(GROUPS, window=GROUPS.shape[1], prefix=P), causal)
    distinct = torch.arange(16).expand(2, 16)  # every token a first occurrence ('none')
    assert torch.equal(mergear_mask(distinct, window=0, prefix=P), causal)


# ---- (b) masked full forward == cached incremental decoding with eviction ---------------------------
@pytest.mark.parametrize("window", [0, 2, 5])
@pytest.mark.parametrize("cfg", [False, True])
@pytest.mark.parametrize("sync_every", [1, 4])
def test_eviction_decoding_matches_masked_forward(window, cfg, sync_every):
    model = tiny_mergear()
    codes, labels, keep = code_grid(GROUPS), torch.tensor([1, 4]), torch.tensor([2, 0])
    mask = mergear_mask(GROUPS, window, P)
    full = model(codes, labels, keep, mask)
    full_u = model(codes, torch.full_like(labels, model.null_class), keep, mask)
    tmask = token_mask(GROUPS, window)

    dec = MergeARDecoder(model, 2, window, cfg=cfg, sync_every=sync_every)
    pointers = [(c.k.data_ptr(), c.v.data_ptr()) for c in dec.caches]
    calls = []
    model.cls_embedding.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        h = dec.prefill(labels, keep)
        for pos in range(16):
            targets = torch.cat([codes[:, pos]] * 2) if cfg else codes[:, pos]
            logits = model.head_logits(h, targets)
            for j in range(2):
                cond = logits[j][:2]
                torch.testing.assert_close(cond, full[j][:, pos], atol=1e-10, rtol=1e-10)
                if cfg:
                    torch.testing.assert_close(logits[j][2:], full_u[j][:, pos], atol=1e-10, rtol=1e-10)
            if pos + 1 < 16:
                h = dec.decode_one(codes[:, pos], known_group=GROUPS[:, pos])
                # live entries = the prefix + exactly the keys the mask lets token pos see
                assert dec.live.sum(1).tolist() == (P + tmask[:, pos].sum(-1)).tolist()
                # attention spans the slot high-water mark plus fewer than sync_every dead slots
                assert dec.high <= dec.span < dec.high + sync_every
    assert len(calls) == 1  # the prefix is never recomputed
    assert [(c.k.data_ptr(), c.v.data_ptr()) for c in model.kv_cache] == pointers


# ---- (c) the live cache stays within K + w + prefix ---------------------------------------------------
@pytest.mark.parametrize("window", [0, 1, 3])
def test_live_cache_bound(window):
    model = tiny_mergear()
    groups = torch.cat([GROUPS, torch.zeros(1, 16, dtype=torch.long)])  # third row: one group (K = 1)
    codes, labels, keep = code_grid(groups), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2])
    num_groups = torch.tensor([5, 4, 1])
    dec = MergeARDecoder(model, 3, window)
    with torch.no_grad():
        dec.prefill(labels, keep)
        for pos in range(16):
            if pos < 15:
                dec.decode_one(codes[:, pos], known_group=groups[:, pos])
            else:
                dec.assign(codes[:, pos], known_group=groups[:, pos])  # the last token is never fed
            held = dec.live.sum(1)
            assert (held <= num_groups + window + P + 1).all()  # while the query attends (own entry)
    stats = dec.stats()
    assert stats["num_groups"].tolist() == num_groups.tolist()
    assert (stats["peak_cache_per_row"] <= num_groups + window + P).all()  # held between steps
    assert stats["peak_live"] <= int(num_groups.max()) + window + P + 1
    assert stats["slots_used"] <= int(num_groups.max()) + window + P + 1  # slots are reused
    assert stats["slots_used"] < P + 16
    # the bound is reached: row 2 (one group) holds token 0 + the window (+ its own entry)
    assert int(dec.peak_cache[2]) == 1 + window + P


# ---- (d) w >= L or rule 'none' is the raster GPT ------------------------------------------------------
def test_large_window_decoder_equals_raster_decoder():
    model = tiny_mergear()
    codes, labels, keep = code_grid(GROUPS), torch.tensor([1, 4]), torch.tensor([2, 0])
    raster, merge = RasterDecoder(model, 2), None
    with torch.no_grad():
        hr = raster.prefill(labels, keep)
        outs = []
        for pos in range(15):
            outs.append(hr)
            hr = raster.decode_one(codes[:, pos])
        outs.append(hr)
        model_full = model(codes, labels, keep)  # default causal mask
        merge = MergeARDecoder(model, 2, window=16)
        hm = merge.prefill(labels, keep)
        for pos in range(16):
            torch.testing.assert_close(hm, outs[pos], atol=1e-10, rtol=1e-10)
            torch.testing.assert_close(model.head_logits(hm, codes[:, pos])[1], model_full[1][:, pos])
            if pos < 15:
                hm = merge.decode_one(codes[:, pos], known_group=GROUPS[:, pos])


@pytest.mark.parametrize("rule_window", [("none", 1), ("adjacent", 16), ("same_code_any", 16)])
def test_generate_without_eviction_equals_raster(rule_window):
    rule, window = rule_window
    model = tiny_mergear()
    labels = torch.tensor([0, 3])
    kw = dict(keep=1, seed=5, cfg_scale=(1.5, 2.0), top_p=0.9)
    raster, raster_stats = generate(model, labels, **kw)
    merged, stats = generate(model, labels, mergear=True, window=window, duplicate_rule=rule, **kw)
    assert torch.equal(raster, merged)
    if rule == "none":
        assert stats["num_groups"].tolist() == [16, 16]
        # 15 tokens are fed; the last one was held with the prefix and 14 earlier tokens
        assert stats["peak_cache"] == raster_stats["peak_cache"] == P + 14
        assert stats["peak_live"] == raster_stats["peak_live"] == stats["slots_used"] == P + 15


# ---- duplicate rules, generation ------------------------------------------------------------------------
def test_duplicate_rules_on_hand_codes():
    # 4 x 4 grid, one row of codes per case (only the first 8 positions are assigned)
    codes = torch.tensor([[5, 5, 7, 5, 5, 9, 7, 1]])
    expected = {
        # left neighbour first, then upper: pos 4 (row 1, col 0) = upper pos 0 -> group 0;
        # pos 5 (9) new; pos 6 (7): left 9 no, upper pos 2 = 7 -> group 2; pos 3 (5): left is 7 -> new
        "adjacent": [0, 0, 2, 3, 0, 5, 2, 7],
        "same_code_any": [0, 0, 2, 0, 0, 5, 2, 7],
        "none": [0, 1, 2, 3, 4, 5, 6, 7],
    }
    model = tiny_mergear()
    for rule, groups in expected.items():
        dec = MergeARDecoder(model, 1, window=1, duplicate_rule=rule)
        firsts = [bool(dec.assign(codes[:, pos])) for pos in range(8)]
        assert dec.groups[0, :8].tolist() == groups, rule
        assert firsts == [g == i for i, g in enumerate(groups)], rule
    with pytest.raises(ValueError):
        MergeARDecoder(model, 1, window=1, duplicate_rule="same_code")


@pytest.mark.parametrize("rule", ["adjacent", "same_code_any"])
def test_generate_mergear_range_and_cache_bound(rule):
    model = tiny_mergear(seed=1)
    # favour repeats: a peaked post head makes equal codes frequent
    labels = torch.tensor([0, 2, 4])
    window = 2
    codes, stats = generate(model, labels, keep=torch.tensor([0, 1, 2]), mergear=True, window=window,
                            duplicate_rule=rule, temperature=0.3, seed=0, cfg_scale=2.0)
    assert codes.shape == (3, 16) and 0 <= int(codes.min()) and int(codes.max()) < 32
    groups, k = stats["groups"], stats["num_groups"]
    assert groups.shape == (3, 16)
    assert torch.equal(representative(groups)[1].sum(1), k)
    rep = representative(groups)[0]
    assert torch.equal(codes.gather(1, rep), codes)  # a group shares its code
    assert int(k.min()) < 16  # some duplicates were found and evicted
    assert (stats["peak_cache_per_row"] <= k + window + P).all()
    assert stats["peak_cache"] <= int(k.max()) + window + P
    again, _ = generate(model, labels, keep=torch.tensor([0, 1, 2]), mergear=True, window=window,
                        duplicate_rule=rule, temperature=0.3, seed=0, cfg_scale=2.0)
    assert torch.equal(codes, again)


# ---- training inputs ---------------------------------------------------------------------------------------
def test_mergear_batch_and_loss():
    config = MergeARConfig(window=2, keep_options=(4, 5, 16))
    args = config.model_args(ModelArgs(dim=32, n_layer=2, n_head=2, intra_layers=1, factorized_bits=(2, 3),
                                       num_classes=5, grid=(4, 4)))
    assert args.prefix_tokens == 2 and args.num_keep_options == 3
    torch.manual_seed(0)
    model = GPT(args)
    kept = torch.tensor([[11, 3, 20, 7, 30], [1, 2, 3, 4, 5]])
    dense = torch.tensor([[0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 4, 4, 4, 4],
                          [0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 4]])
    tokens = Tokens(codes=kept, groups=dense, cls=None, grid=(4, 4))
    batch = mergear_batch(tokens, config)
    assert torch.equal(batch["codes"], kept.gather(1, dense))
    assert batch["keep"].tolist() == [1, 1]
    assert torch.equal(batch["mask"], mergear_mask(dense, 2, 2))
    out = model.loss(labels=torch.tensor([0, 1]), **batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.keep_embedding.weight.grad is not None
    assert keep_index([16, 4], config.keep_options).tolist() == [2, 0]
    with pytest.raises(ValueError):
        keep_index(7, config.keep_options)
    with pytest.raises(ValueError):
        MergeARConfig(duplicate_rule="nearest")

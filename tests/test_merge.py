"""Token merging (ToMe bipartite soft matching): schedules, keep candidates, matching invariants,
source tracking against the dense ToMe source matrix, and the merging transformer."""

import math

import pytest
import torch
from helpers.models import groups_to_source

from mergevq.models.encoder import MergingTransformer
from mergevq.models.merge import (
    apply_merge,
    bipartite_match,
    canonical_order,
    keep_candidates,
    layer_counts,
    merge_schedule,
    merge_weighted,
    reachable_keeps,
    reindex_owner,
    unmerge,
)

# spec section 2.5, "Nominal schedules" (L -> K: base r, r_0 .. r_11)
OFFICIAL_SCHEDULES = {
    (256, 144): (10, [12, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 5]),
    (256, 64): (16, [29, 22, 21, 19, 18, 16, 15, 13, 12, 10, 9, 8]),
    (256, 36): (19, [25, 26, 24, 23, 21, 19, 18, 16, 14, 13, 11, 10]),
    (1024, 256): (64, [101, 90, 84, 78, 72, 66, 61, 55, 49, 43, 37, 32]),
    (1024, 576): (38, [54, 53, 50, 46, 43, 39, 36, 32, 29, 25, 22, 19]),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one intra-op thread (see conftest)


def simulate_capped(num_tokens, counts):
    """Tokens left (CLS excluded) when T = L + 1 tokens merge r_l each, capped at (T - 1) // 2."""
    tokens = num_tokens + 1
    for r in counts:
        tokens -= max(0, min(r, (tokens - 1) // 2))
    return tokens - 1


# --------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(("shape", "expected"), list(OFFICIAL_SCHEDULES.items()))
def test_official_schedules(shape, expected):
    num_tokens, keep = shape
    base, counts = expected
    schedule = merge_schedule(num_tokens, keep, depth=12)
    assert schedule == counts
    assert sum(schedule) == num_tokens - keep
    assert simulate_capped(num_tokens, schedule) == keep
    # the table's base r: r_l = int(f + l (2r - 2f) / 11) with f = int(1.5 r) (the spec's
    # floor(1.5 r + l (0.5 r - 1.5 r) / 11) is off by one for odd r), remainder on layer 0
    first = int(1.5 * base)
    reference = [int(first + layer * (2 * base - 2 * first) / 11) for layer in range(12)]
    assert layer_counts(12, base) == reference
    assert reference[1:] == counts[1:]
    assert counts[0] - reference[0] == (num_tokens - keep) - sum(reference)


@pytest.mark.parametrize("num_tokens", [64, 256, 1024])
def test_no_merge_schedule(num_tokens):
    assert merge_schedule(num_tokens, num_tokens) == [0] * 12


@pytest.mark.parametrize("keep", [1, 5, 10])
def test_unreachable_keep_names_reachable_range(keep):
    reachable = reachable_keeps(256)
    assert keep not in reachable
    with pytest.raises(ValueError) as info:
        merge_schedule(256, keep)
    assert f"{min(reachable)}..256" in str(info.value)


@pytest.mark.parametrize("keep", [0, -3, 257, 1000])
def test_keep_outside_token_range_raises(keep):
    with pytest.raises(ValueError, match=r"\[1, 256\]"):
        merge_schedule(256, keep)


def test_reachable_keeps_256_all_accepted_and_exact():
    reachable = reachable_keeps(256)
    assert reachable[-1] == 256 and 144 in reachable and 36 in reachable and 1 not in reachable
    generator = torch.Generator().manual_seed(0)
    metric = torch.randn(1, 257, 8, generator=generator)
    for keep in range(1, 257):
        if keep not in reachable:
            with pytest.raises(ValueError):
                merge_schedule(256, keep)
            continue
        schedule = merge_schedule(256, keep)
        assert len(schedule) == 12 and min(schedule) >= 0
        assert simulate_capped(256, schedule) == keep
        # and the real matching (which applies the cap itself) ends at exactly K
        tokens = metric
        for r in schedule:
            plan = bipartite_match(tokens, r)
            if plan is not None:
                tokens = apply_merge(tokens, plan)
        assert tokens.shape[1] == keep + 1


def test_reachable_keeps_small_depth():
    reachable = reachable_keeps(64, depth=4)
    for keep in reachable:
        schedule = merge_schedule(64, keep, depth=4)
        assert len(schedule) == 4 and simulate_capped(64, schedule) == keep
    # 4 halvings of 64 tokens cannot go below 64 / 2^4 = 4
    assert min(reachable) >= 4


# --------------------------------------------------------------------------- keep candidates


def test_gaussian_candidates_g_plus_r():
    keeps, probs = keep_candidates(256, 144, 6, "gaussian")
    assert keeps == [121, 144, 169, 196, 225, 256]
    assert sum(probs) == pytest.approx(1.0)
    raw = [math.exp(-((j - 1) ** 2) / (2 * 0.5**2)) + 0.05 for j in range(6)]
    assert probs == pytest.approx([w / sum(raw) for w in raw])
    assert max(range(6), key=probs.__getitem__) == 1 and probs[1] == pytest.approx(0.67, abs=0.01)
    # the official deterministic cycle: rand = (batch_idx % 100) * 0.01, first cum >= rand
    cumulative = [round(sum(probs[: j + 1]), 5) for j in range(6)]
    counts = dict.fromkeys(keeps, 0)
    for batch_idx in range(100):
        rand = batch_idx * 0.01
        counts[keeps[next(j for j, c in enumerate(cumulative) if c >= rand)]] += 1
    assert counts == {121: 12, 144: 67, 169: 12, 196: 3, 225: 3, 256: 3}  # spec section 1.3
    for keep in keeps:
        assert keep in reachable_keeps(256)


def test_gaussian_candidates_g():
    keeps, probs = keep_candidates(1024, 256, 9, "gaussian")
    assert keeps == [k * k for k in range(15, 24)]
    assert keeps[0] == 225 and keeps[-1] == 529
    assert sum(probs) == pytest.approx(1.0)
    assert max(range(9), key=probs.__getitem__) == 1
    assert probs[1] == pytest.approx(0.61, abs=0.02)
    assert probs[0] == pytest.approx(0.11, abs=0.01) and probs[2] == pytest.approx(0.11, abs=0.01)
    assert all(0.02 <= p <= 0.035 for p in probs[3:])
    # spec 1.3 per-100-batch frequencies for G: {225: 11, 256: 61, 289: 11, 324..529: 2-3 each}
    cumulative = [round(sum(probs[: j + 1]), 5) for j in range(9)]
    counts = dict.fromkeys(keeps, 0)
    for batch_idx in range(100):
        counts[keeps[next(j for j, c in enumerate(cumulative) if c >= batch_idx * 0.01)]] += 1
    assert [counts[225], counts[256], counts[289]] == [11, 61, 11]
    assert all(counts[k] in (2, 3) for k in keeps[3:])


def test_exponential_and_uniform_candidates():
    keeps, probs = keep_candidates(256, 64, 6, "exponential")
    assert keeps == [64, 81, 100, 121, 144, 169]
    raw = [2 * math.exp(-2 * j) + 0.1 for j in range(6)]
    assert probs == pytest.approx([w / sum(raw) for w in raw])
    assert probs == sorted(probs, reverse=True)
    keeps, probs = keep_candidates(256, 64, 4, "uniform")
    assert keeps == [64, 81, 100, 121] and probs == pytest.approx([0.25] * 4)


@pytest.mark.parametrize("keep", [143, 145, 2, 200])
def test_non_square_keep_raises(keep):
    with pytest.raises(ValueError, match="square"):
        keep_candidates(256, keep, 6, "gaussian")


def test_candidates_beyond_token_range_are_dropped_and_renormalised():
    raw = [math.exp(-((j - 1) ** 2) / (2 * 0.5**2)) + 0.05 for j in range(6)]
    keeps, probs = keep_candidates(256, 225, 6, "gaussian")  # 196, 225, 256 fit; 289.. do not
    assert keeps == [196, 225, 256]
    assert probs == pytest.approx([w / sum(raw[:3]) for w in raw[:3]])
    keeps, probs = keep_candidates(16, 1, 4, "gaussian")  # candidates 0, 1, 4, 9: 0 is below 1
    assert keeps == [1, 4, 9]
    assert probs == pytest.approx([w / sum(raw[1:4]) for w in raw[1:4]])
    assert sum(probs) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="poisson"):
        keep_candidates(256, 144, 6, "poisson")


# --------------------------------------------------------------------------- bipartite matching


def cosine_scores(metric):
    metric = metric / metric.norm(dim=-1, keepdim=True)
    return metric[:, 0::2] @ metric[:, 1::2].transpose(1, 2)


def merge_weighted_loop(x, size, plan):
    """Reference size-weighted merge with explicit loops, output order [kept A..., all B...]."""
    out_x, out_s = [], []
    for b in range(x.shape[0]):
        a_x, b_x, a_s, b_s = x[b, 0::2], x[b, 1::2], size[b, 0::2], size[b, 1::2]
        rows_x = [a_x[i] for i in plan.kept_a[b].tolist()]
        rows_s = [a_s[i] for i in plan.kept_a[b].tolist()]
        for j in range(b_x.shape[0]):
            members = [i for i, d in zip(plan.src_a[b].tolist(), plan.dst_b[b].tolist()) if d == j]
            weight = b_s[j] + sum((a_s[i] for i in members), torch.zeros(1))
            total = b_x[j] * b_s[j] + sum((a_x[i] * a_s[i] for i in members), torch.zeros_like(b_x[j]))
            rows_x.append(total / weight)
            rows_s.append(weight)
        out_x.append(torch.stack(rows_x))
        out_s.append(torch.stack(rows_s))
    return torch.stack(out_x), torch.stack(out_s)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tokens", [17, 18, 65, 64])
@pytest.mark.parametrize("r", [1, 5, 8, 40])
def test_bipartite_invariants(seed, tokens, r):
    generator = torch.Generator().manual_seed(seed * 1000 + tokens * 10 + r)
    batch, channels = 3, 6
    metric = torch.randn(batch, tokens, channels, generator=generator)
    x = torch.randn(batch, tokens, channels, generator=generator, dtype=torch.float64)
    size = torch.randint(1, 5, (batch, tokens, 1), generator=generator).double()
    plan = bipartite_match(metric, r)
    merged = min(r, (tokens - 1) // 2)
    assert plan.merged == merged
    num_a = (tokens + 1) // 2
    assert plan.kept_a.shape == (batch, num_a - merged) and plan.dst_b.shape == (batch, merged)
    # CLS (A[0]) is kept, first, and never merged
    assert (plan.kept_a[:, 0] == 0).all() and not (plan.src_a == 0).any()
    # kept and merged A tokens partition A; kept ones ascending
    assert torch.equal(
        torch.cat([plan.kept_a, plan.src_a], 1).sort(1).values, torch.arange(num_a).expand(batch, -1)
    )
    assert (plan.kept_a.diff(dim=1) > 0).all()
    # each merged A token joins its most similar B token, and the merged ones are the best matched
    scores = cosine_scores(metric)
    best, partner = scores.max(-1)
    assert torch.equal(plan.dst_b, partner.gather(1, plan.src_a))
    if plan.kept_a.shape[1] > 1:
        assert (
            best.gather(1, plan.src_a).min(1).values >= best.gather(1, plan.kept_a[:, 1:]).max(1).values
        ).all()
    assert (plan.dst_b >= 0).all() and (plan.dst_b < tokens // 2).all()

    new_x, new_size = merge_weighted(x, size, plan)
    assert new_x.shape == (batch, tokens - merged, channels) and new_size.shape == (batch, tokens - merged, 1)
    torch.testing.assert_close(new_x[:, 0], x[:, 0])  # CLS untouched (up to x * s / s rounding)
    assert torch.equal(new_size[:, 0], size[:, 0])
    assert torch.equal(new_size.sum(1), size.sum(1))
    torch.testing.assert_close((new_x * new_size).sum(1), (x * size).sum(1))
    ref_x, ref_size = merge_weighted_loop(x, size, plan)
    torch.testing.assert_close(new_x, ref_x)
    assert torch.equal(new_size, ref_size)
    # size None means all ones
    ones_x, ones_size = merge_weighted(x, None, plan)
    ref_x, ref_size = merge_weighted_loop(x, torch.ones_like(size), plan)
    torch.testing.assert_close(ones_x, ref_x)
    assert torch.equal(ones_size, ref_size)


def test_bipartite_no_merge_returns_none():
    metric = torch.randn(2, 9, 4)
    assert bipartite_match(metric, 0) is None
    assert bipartite_match(metric[:, :2], 3) is None  # CLS + 1 token: nothing can merge


# --------------------------------------------------------------------------- source tracking


def merge_loop(x, schedule, generator):
    """Merge x [B, L+1, C] by hand; returns (x, size, owner, dense source S [B, T, L+1])."""
    batch, tokens, channels = x.shape
    positions = tokens - 1
    owner = torch.arange(1, positions + 1).expand(batch, -1)
    source = torch.eye(tokens, dtype=x.dtype).expand(batch, -1, -1).clone()
    size = None
    for r in schedule:
        metric = x.float() + 0.5 * torch.randn(x.shape, generator=generator)
        plan = bipartite_match(metric, r)
        if plan is None:
            continue
        owner = reindex_owner(owner, plan, x.shape[1])
        source = apply_merge(source, plan, "amax")
        x, size = merge_weighted(x, size, plan)
        assert torch.equal(owner, source[:, :, 1:].argmax(dim=1))
    return x, size, owner, source


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(
    ("positions", "schedule"),
    [
        (64, [8, 7, 6, 5, 4, 3]),
        (63, [20, 10, 5, 2, 1, 0]),
        (48, [30, 30, 30, 30]),
        (36, merge_schedule(36, 9, 6)),
    ],
)
def test_owner_matches_dense_source(seed, positions, schedule):
    generator = torch.Generator().manual_seed(seed)
    batch = 3
    x0 = torch.randn(batch, positions + 1, 5, generator=generator, dtype=torch.float64)
    x, size, owner, source = merge_loop(x0, schedule, generator)
    tokens = x.shape[1]
    assert tokens == simulate_capped(positions, schedule) + 1
    assert source.shape == (batch, tokens, positions + 1)
    assert set(source.unique().tolist()) <= {0.0, 1.0}
    # CLS row/col: CLS owns only itself and nothing else owns the CLS column
    assert torch.equal(source[:, 0, 0], torch.ones(batch, dtype=x.dtype))
    assert source[:, 0, 1:].sum() == 0 and source[:, 1:, 0].sum() == 0
    # every position owned by exactly one token
    assert torch.equal(source.sum(1), torch.ones(batch, positions + 1, dtype=x.dtype))
    # owner vector equals the dense argmax, exactly
    assert owner.shape == (batch, positions)
    assert torch.equal(owner, source[:, :, 1:].argmax(dim=1))
    assert owner.min() >= 1 and owner.max() < tokens
    # size of a token = number of positions it owns (CLS: 1); every non-CLS token owns >= 1
    assert torch.equal(size[..., 0], source.sum(-1))
    for b in range(batch):
        counts = torch.bincount(owner[b], minlength=tokens)
        assert torch.equal(counts[1:].to(x.dtype), size[b, 1:, 0])
        assert (counts[1:] >= 1).all()
    # with no block in between, each token is the plain mean of the inputs it owns
    torch.testing.assert_close(x, source @ x0 / source.sum(-1, keepdim=True))


# --------------------------------------------------------------------------- merging transformer


@pytest.fixture(scope="module")
def tiny_transformer():
    torch.manual_seed(0)
    return MergingTransformer(width=32, depth=4, num_heads=2).eval()


def test_merging_transformer_shapes_and_groups(tiny_transformer):
    reachable = reachable_keeps(64, depth=4)
    keeps = sorted({reachable[0], reachable[1], 16, 25, 30, 36, 49, 63, 64} & set(reachable))
    assert len(keeps) >= 7
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 64, 32, generator=generator)
    for keep in keeps:
        schedule = merge_schedule(64, keep, depth=4)
        with torch.no_grad():
            out, groups = tiny_transformer(x, schedule)
        assert out.shape == (3, 1 + keep, 32)
        assert groups.shape == (3, 64) and groups.dtype == torch.long
        for b in range(3):
            assert torch.equal(groups[b].unique(), torch.arange(keep))
        assert torch.isfinite(out).all()
    with torch.no_grad():
        _, groups = tiny_transformer(x, [0, 0, 0, 0])
    assert torch.equal(groups, torch.arange(64).expand(3, -1))


def test_merging_transformer_groups_match_hand_loop(tiny_transformer):
    """The transformer's groups equal the hand loop's dense source matrix argmax on its own plans."""
    schedule = merge_schedule(64, 16, depth=4)
    x = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out, groups = tiny_transformer(x, schedule)
        h = torch.cat([tiny_transformer.cls_token.expand(2, -1, -1), x], 1)
        source = torch.eye(65).expand(2, -1, -1).clone()
        size = None
        for block, r in zip(tiny_transformer.blocks, schedule):
            h, metric = block.attend(h, size)
            plan = bipartite_match(metric, r)
            source = apply_merge(source, plan, "amax")
            h, size = merge_weighted(h, size, plan)
            h = block.feed_forward(h)
    torch.testing.assert_close(out, h)
    assert torch.equal(groups, source[:, 1:, 1:].argmax(dim=1))
    assert torch.equal(size[:, 1:, 0], source[:, 1:, 1:].sum(-1))


# --------------------------------------------------------------------------- canonical order / unmerge


def real_groups(seed, positions=64, keep=16, batch=3):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, positions + 1, 4, generator=generator, dtype=torch.float64)
    _, _, owner, _ = merge_loop(x0, merge_schedule(positions, keep, 6), generator)
    return owner - 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_canonical_order(seed):
    keep = 16
    groups = real_groups(seed, keep=keep)
    order, relabelled = canonical_order(groups, keep)
    batch, positions = groups.shape
    assert order.shape == (batch, keep) and relabelled.shape == groups.shape
    for b in range(batch):
        assert torch.equal(order[b].sort().values, torch.arange(keep))
        first = [int((relabelled[b] == k).nonzero()[0]) for k in range(keep)]
        assert first == sorted(first) and len(set(first)) == keep and first[0] == 0
        # order[k] is the old label of canonical token k
        assert torch.equal(order[b][relabelled[b]], groups[b])
    again_order, again = canonical_order(relabelled, keep)
    assert torch.equal(again, relabelled)
    assert torch.equal(again_order, torch.arange(keep).expand(batch, -1))
    # reordering the tokens with `order` and unmerging with the new labels changes nothing
    tokens = torch.randn(batch, keep, 7, generator=torch.Generator().manual_seed(seed))
    reordered = tokens.gather(1, order[..., None].expand(-1, -1, 7))
    assert torch.equal(unmerge(reordered, relabelled), unmerge(tokens, groups))


@pytest.mark.parametrize("seed", [0, 1])
def test_unmerge_equals_dense_source_product(seed):
    keep = 16
    groups = real_groups(seed, keep=keep)
    source = groups_to_source(groups, keep)
    batch, positions = groups.shape
    assert source.shape == (batch, keep, positions)
    assert torch.equal(source.sum(1), torch.ones(batch, positions))
    tokens = torch.randn(batch, keep, 9, generator=torch.Generator().manual_seed(seed))
    dense = source.transpose(1, 2) @ tokens
    torch.testing.assert_close(unmerge(tokens, groups), dense, rtol=0, atol=0)
    for b in range(batch):
        for position in range(positions):
            assert torch.equal(unmerge(tokens, groups)[b, position], tokens[b, groups[b, position]])

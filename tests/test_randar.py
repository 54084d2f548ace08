"""RandAR over the K merged tokens: teacher forcing vs cached decoding, parallel decoding, positions,
groups from positions, the training batch, overfitting, Source Recovery with position keys."""

from __future__ import annotations

import pytest
import torch

from mergevq.data.randar_batch import randar_batch
from mergevq.models.gpt import gpt_args
from mergevq.models.positions import (
    PositionBank,
    default_steps,
    group_starts,
    nearest_groups,
    parallel_schedule,
    recovered_groups,
    uniform_positions,
)
from mergevq.models.randar import RandAR, RandARDecoder, generate_randar

GRID = (4, 4)


def tiny(position_query: str = "rope", **overrides) -> RandAR:
    torch.manual_seed(0)
    args = gpt_args("tiny", grid=GRID, num_classes=3, factorized_bits=(2, 3), n_layer=2, dim=32, n_head=2,
                    token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0, class_dropout=0.0, **overrides)
    model = RandAR(args, position_query=position_query)
    for head in model.heads:  # heads start at zero: give the logits something to compare
        torch.nn.init.normal_(head.weight, std=0.5)
    return model.eval()


def random_positions(batch: int, keep: int, generator: torch.Generator) -> torch.Tensor:
    """[B, K] distinct positions in a random (generation) order."""
    return torch.stack([torch.randperm(GRID[0] * GRID[1], generator=generator)[:keep] for _ in range(batch)])


@pytest.mark.parametrize("position_query", ["rope", "table", "both"])
def test_teacher_forcing_equals_one_token_decoding(position_query):
    model = tiny(position_query).double()
    g = torch.Generator().manual_seed(1)
    batch, keep = 3, 7
    positions = random_positions(batch, keep, g)
    codes = torch.randint(0, model.args.codebook_size, (batch, keep), generator=g)
    labels = torch.tensor([0, 2, 1])
    reference = model.head_logits(model.hidden(codes, positions, labels), codes)
    decoder = RandARDecoder(model, positions, [1] * keep)
    states = [decoder.start(labels)]
    for i in range(keep - 1):
        states.append(decoder.step(codes[:, i : i + 1]))
    assert decoder.step(codes[:, -1:]) is None and decoder.done
    h = torch.cat(states, 1)
    incremental = model.head_logits(h, codes)
    for ref, inc in zip(reference, incremental):
        torch.testing.assert_close(inc, ref, atol=1e-5, rtol=1e-5)
    assert decoder.stats()["peak_cache"] == 2 * keep  # [C] q_0 t_0 ... q_{K-1}


def reference_greedy(model: RandAR, labels, positions) -> torch.Tensor:
    """Greedy codes by the full teacher-forced forward, one token per pass (no cache)."""
    batch, keep = positions.shape
    codes = torch.zeros(batch, keep, dtype=torch.long)
    for i in range(keep):
        h = model.hidden(codes[:, : i + 1], positions[:, : i + 1], labels)[:, i]
        pre = model.next_part_logits(h).argmax(-1)
        post = model.next_part_logits(h, [pre]).argmax(-1)
        codes[:, i] = model.join([pre, post])
    return codes


def test_parallel_with_steps_equal_k_is_one_at_a_time_and_fewer_steps_run():
    model = tiny().double()
    g = torch.Generator().manual_seed(2)
    positions = random_positions(2, 9, g)
    labels = torch.tensor([1, 2])
    expected = reference_greedy(model, labels, positions)
    codes, stats = generate_randar(model, labels, positions, steps=9, temperature=0.0)
    assert torch.equal(codes, expected) and stats["steps"] == 9
    fast, stats = generate_randar(model, labels, positions, steps=3, temperature=0.0, cfg_scale=[2.0, 1.5])
    assert fast.shape == (2, 9) and stats["steps"] == 3
    assert int(stats["peak_cache_per_row"][0]) < 2 * 9
    assert torch.equal(stats["num_groups"], torch.tensor([9, 9]))


def test_parallel_first_step_queries_match_teacher_forcing():
    """The first step's queries see [C] and earlier queries only: its first one equals teacher forcing."""
    model = tiny().double()
    g = torch.Generator().manual_seed(3)
    positions = random_positions(2, 6, g)
    codes = torch.randint(0, model.args.codebook_size, (2, 6), generator=g)
    labels = torch.tensor([0, 1])
    decoder = RandARDecoder(model, positions, parallel_schedule(6, 2))
    h = decoder.start(labels)
    reference = model.hidden(codes, positions, labels)
    torch.testing.assert_close(h[:, 0], reference[:, 0])
    after = decoder.step(codes[:, : h.shape[1]])  # the next step's first query sees the true prefix
    torch.testing.assert_close(after[:, 0], reference[:, h.shape[1]])


@pytest.mark.parametrize("keep,steps", [(64, 22), (144, 64), (256, 88), (5, 5), (5, 1), (7, 3)])
def test_parallel_schedule(keep, steps):
    sizes = parallel_schedule(keep, steps)
    assert len(sizes) == steps and sum(sizes) == keep and min(sizes) >= 1
    assert sizes[0] <= sizes[-1]  # cosine: few tokens first, many last
    with pytest.raises(ValueError, match="steps"):
        parallel_schedule(keep, keep + 1)


def test_default_steps_paper_values():
    assert default_steps(256) == 88 and default_steps(144) == 64 and default_steps(64) == 22


def canonical_groups(batch: int, keep: int, generator) -> torch.Tensor:
    """Random canonical groups [B, L]: K contiguous raster runs."""
    length = GRID[0] * GRID[1]
    out = []
    for _ in range(batch):
        cuts = torch.randperm(length - 1, generator=generator)[: keep - 1].sort().values + 1
        owner = torch.zeros(length, dtype=torch.long)
        owner[cuts] = 1
        out.append(owner.cumsum(0))
    return torch.stack(out)


def test_randar_batch_codes_positions_and_padding():
    g = torch.Generator().manual_seed(4)
    groups = torch.cat([canonical_groups(1, 5, g), canonical_groups(1, 3, g)])
    keep = torch.tensor([5, 3])
    k_codes = torch.randint(0, 100, (2, 5), generator=g)
    grid_codes = k_codes.gather(1, groups)
    batch = randar_batch(grid_codes, groups, keep, torch.Generator().manual_seed(0))
    starts = group_starts(groups, 5)
    assert batch["valid"].sum(1).tolist() == [5, 3] and not batch["valid"][1, 3:].any()  # pads last
    for b in range(2):
        k = int(keep[b])
        pos, codes = batch["positions"][b, :k], batch["codes"][b, :k]
        assert sorted(pos.tolist()) == starts[b, :k].tolist()  # each group once, at its first position
        assert torch.equal(codes, grid_codes[b, pos])
    other = randar_batch(grid_codes, groups, keep, torch.Generator().manual_seed(1))
    assert not torch.equal(other["positions"][0], batch["positions"][0])  # a fresh order per draw


def test_positions_distinct_and_partition_after_recovery():
    g = torch.Generator().manual_seed(5)
    length, keep = GRID[0] * GRID[1], 6
    for positions in (uniform_positions(8, keep, length, g),
                      PositionBank({keep: group_starts(canonical_groups(20, keep, g), keep)}).draw(8, keep, g)):
        assert all(len(set(row.tolist())) == keep for row in positions) and bool((positions[:, 0] == 0).all())
        logits = torch.randn(8, length, keep, generator=g)
        for groups in (recovered_groups(logits, positions), nearest_groups(positions, GRID)):
            assert groups.shape == (8, length) and int(groups.min()) >= 0 and int(groups.max()) < keep
            owned = torch.zeros(8, keep, dtype=torch.long).scatter_add(1, groups, torch.ones_like(groups))
            assert bool((owned > 0).all())  # every group owns a position, every position has one owner
            assert torch.equal(groups.gather(1, positions), torch.arange(keep).expand(8, keep))
        assert torch.equal(group_starts(recovered_groups(logits, positions), keep), positions)  # canonical


def test_recovery_needs_position_zero():
    with pytest.raises(ValueError, match="position 0"):
        recovered_groups(torch.zeros(1, 16, 2), torch.tensor([[1, 5]]))


def test_tiny_randar_overfits_a_handful_of_images():
    model = tiny().train()
    g = torch.Generator().manual_seed(6)
    groups = canonical_groups(4, 6, g)
    grid_codes = torch.randint(0, model.args.codebook_size, (4, 6), generator=g).gather(1, groups)
    labels, keep = torch.tensor([0, 1, 2, 0]), torch.full((4,), 6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(120):
        batch = randar_batch(grid_codes, groups, keep)
        loss = model.loss(batch["codes"], labels, positions=batch["positions"], valid=batch["valid"])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0]


def test_padded_tokens_do_not_change_the_loss():
    model = tiny()
    g = torch.Generator().manual_seed(7)
    positions = random_positions(1, 4, g)
    codes = torch.randint(0, model.args.codebook_size, (1, 4), generator=g)
    labels = torch.tensor([1])
    plain = model.loss(codes, labels, positions=positions)["loss"]
    padded = model.loss(torch.cat([codes, codes[:, :2]], 1), labels, positions=torch.cat([positions, positions[:, :2]], 1),
                        valid=torch.tensor([[True] * 4 + [False] * 2]))["loss"]
    torch.testing.assert_close(padded, plain)


def test_randar_rejects_a_merge_instruction_prefix():
    with pytest.raises(ValueError, match="one prefix token"):
        RandAR(gpt_args("tiny", grid=GRID, prefix_tokens=2, num_keep_options=2))


def test_source_recovery_overfits_one_batch_with_position_keys():
    from helpers.models import tiny_tokenizer

    from mergevq.models.recovery import fit_recovery

    tokenizer = tiny_tokenizer(0, {"enabled": True, "width": 32, "num_heads": 2})
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(8)) * 2 - 1
    history = fit_recovery(tokenizer, images, keep=16, steps=150, lr=3e-3)
    assert history[-1][0] < 0.3 * history[0][0]
    assert history[-1][1] > 0.9 and history[-1][1] > history[0][1]
    tokens = tokenizer.encode(images, 16)
    with pytest.raises(ValueError, match="starts"):
        tokenizer.recover_groups(tokens.codes)  # position keys need the groups' first positions


def test_evaluator_reports_predicted_groups_beside_true_groups():
    from helpers.models import tiny_tokenizer

    from mergevq.eval.recon import ReconstructionEvaluator

    tokenizer = tiny_tokenizer(0, {"enabled": True, "width": 32, "num_heads": 2})
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(9)) * 2 - 1
    features = lambda x: x.mean((2, 3))  # noqa: E731
    untrained = ReconstructionEvaluator(tokenizer, [16], feature_fn=features, collect_real_features=False)
    untrained.update(images)
    result = untrained.results()[16]
    assert 0 <= result["recovery_accuracy"] < 1 and untrained.features(16, recovered=True).shape == (3, 3)

    encode, last = tokenizer.encode, {}

    def remember(x, keep):
        last["groups"] = encode(x, keep).groups
        return encode(x, keep)

    tokenizer.encode, tokenizer.recover_groups = remember, lambda codes, starts: last["groups"]
    oracle = ReconstructionEvaluator(tokenizer, [16], feature_fn=features, collect_real_features=False)
    oracle.update(images)
    result = oracle.results()[16]  # perfect recovery: the same reconstructions as with the true groups
    assert result["recovery_accuracy"] == 1.0 and result["psnr_recovered"] == result["psnr"]
    assert (oracle.features(16, recovered=True) == oracle.features(16)).all()


def test_randar_benchmark_reports_passes_and_cache(tmp_path):
    from mergevq.benchmarks import ar_randar

    (row,) = ar_randar.main(["--grids", "8", "--keeps", "36", "--batch", "1", "--repeats", "1",
                             "--window", "4", "--out", str(tmp_path / "b.json")])
    assert row["randar_passes_per_image"] == 13 < row["raster_passes_per_image"] == 64  # ceil(36 * 88 / 256)
    assert row["randar_peak_kv_entries"] <= 2 * 36 and row["randar_kv_slots_allocated"] == 72
    # entries held between steps, as sampling.json reports them: P + L - 2 (the last token is never fed); <= P + K + w
    assert row["raster_peak_kv_entries"] == 1 + 64 - 2 and row["mergear_peak_kv_entries"] <= 2 + 36 + 4
    assert row["raster_tokens_per_s"] == pytest.approx(64 * row["raster_images_per_s"])  # generated tokens: L vs K
    assert row["randar_tokens_per_s"] == pytest.approx(36 * row["randar_images_per_s"])
    assert row["randar_speedup_vs_raster"] == pytest.approx(row["randar_images_per_s"] / row["raster_images_per_s"])

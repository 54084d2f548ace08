"""KeepPolicy, the one home of K: the per-step draws are bit-identical to the stage-I trainer's draws
before the policy existed (recorded below as literals from that code: ``KeepSampler(keeps, probs,
seed)(step)`` with keeps/probs derived by the trainer from the config), and every reader agrees."""

from __future__ import annotations

import pytest
import torch
from helpers.models import load_group

from mergevq.eval.tokenizer_eval import default_keeps
from mergevq.models.factory import build_tokenizer, keep_policy, layout
from mergevq.models.keep import KeepPolicy, mix_seed

# (config, seed) -> K of optimizer steps 1..16, as recorded from the trainer before the refactor.
RECORDED = {
    ("tiny_gr", 0): [36, 36, 36, 49, 36, 36, 64, 64, 36, 36, 64, 36, 36, 36, 36, 49],
    ("tiny_gr", 1234): [36, 36, 49, 36, 36, 36, 36, 36, 36, 36, 36, 49, 36, 36, 36, 36],
    ("d64_g", 0): [256, 289, 289, 324, 256, 256, 529, 529, 256, 256, 529, 256, 256, 256, 256, 400],
    ("d64_g", 1234): [289, 289, 484, 256, 256, 289, 256, 256, 256, 256, 289, 441, 256, 256, 289, 289],
    ("d64_r", 0): [64, 64, 64, 81, 64, 64, 144, 144, 64, 64, 144, 64, 64, 64, 64, 100],
    ("d64_r", 1234): [64, 81, 121, 64, 64, 64, 64, 64, 64, 64, 64, 100, 64, 64, 64, 81],
    ("tiny_gr_train_override", 0): [36, 64, 64, 64, 36, 36, 64, 64, 36, 36, 64, 36, 64, 16, 36, 64],
    ("tiny_gr_train_override", 1234): [64, 64, 64, 36, 36, 64, 36, 36, 36, 64, 64, 64, 36, 64, 64, 64],
    ("tiny_gr_train_uniform", 0): [25, 49, 49, 49, 25, 25, 49, 49, 25, 25, 49, 25, 49, 25, 25, 49],
    ("tiny_gr_train_uniform", 1234): [49, 49, 49, 25, 25, 49, 25, 25, 25, 49, 49, 49, 25, 49, 49, 49],
}
CONFIGS = {
    "tiny_gr": ("tiny", "gr", {}),
    "d64_g": ("d64", "g", {}),
    "d64_r": ("d64", "r", {}),
    "tiny_gr_train_override": ("tiny", "gr", {"keep_candidates": [16, 36, 64], "keep_probs": [0.2, 0.3, 0.5]}),
    "tiny_gr_train_uniform": ("tiny", "gr", {"keep_candidates": [25, 49]}),
}


@pytest.mark.parametrize("name, seed", sorted(RECORDED))
def test_draws_are_the_recorded_ones(name, seed):
    size, variant, train = CONFIGS[name]
    policy = keep_policy(load_group("tokenizer", size), load_group("variant", variant))
    policy = policy.for_training(train.get("keep_candidates"), train.get("keep_probs"))
    assert [policy.draw(seed, step) for step in range(1, 17)] == RECORDED[name, seed]


def test_the_built_tokenizer_carries_the_policy_of_its_config():
    tokenizer, variant = load_group("tokenizer", "tiny"), load_group("variant", "gr")
    with torch.device("meta"):
        tok = build_tokenizer(tokenizer, variant)
    policy = tok.keep_policy
    assert policy == keep_policy(tokenizer, variant)
    spec = layout(tokenizer, variant)
    assert (policy.num_positions, policy.nominal) == (spec["num_positions"], spec["keep"]) == (64, 36)
    assert list(policy.candidates) == spec["keep_candidates"] == [25, 36, 49, 64]
    assert policy.nominal == tok.default_keep and abs(sum(policy.probs) - 1) < 1e-12
    run = {"tokenizer": tokenizer, "variant": variant, "train": {}}
    assert default_keeps(run) == [25, 36, 49, 64]  # evaluation asks the same policy


def test_reachable_range_and_check():
    policy = keep_policy(load_group("tokenizer", "tiny"), load_group("variant", "gr"))
    reachable = policy.reachable()
    assert reachable[-1] == 64 and all(a < b for a, b in zip(reachable, reachable[1:]))
    policy.check(reachable[0])
    with pytest.raises(ValueError, match=f"reachable keeps are {reachable[0]}..64"):
        policy.check(reachable[0] - 1)


def test_no_merging_policy():
    tok = build_tokenizer({**load_group("tokenizer", "open_magvit2"), "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1})
    policy = tok.keep_policy
    assert not policy.merges and policy.candidates == (None,)
    assert policy.draw(0, 1) is None
    assert default_keeps({"tokenizer": {"kind": "magvit2"}, "train": {}}) == [None]


def test_probabilities_must_match_the_candidates():
    policy = keep_policy(load_group("tokenizer", "tiny"), load_group("variant", "gr"))
    with pytest.raises(ValueError, match="must match"):
        policy.for_training([16, 36], [1.0])
    with pytest.raises(ValueError, match="sum to 1"):
        KeepPolicy(64, 12, 36, (16, 36), (0.5, 0.6))


def test_mix_seed_is_stable():
    assert mix_seed(0, 1, 7) == mix_seed(0, 1, 7) != mix_seed(0, 2, 7)
    assert mix_seed(3, 4) == 4231634759217372374  # fixed: code caches and resumed runs depend on it

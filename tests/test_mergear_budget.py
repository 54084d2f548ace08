"""MergeAR's one duplicate rule, the copy head and budget-aware decoding (issue 13).

- The code-group rule: training mask and copy targets come from ``code_groups``; a model fed the true
  sequence with the inference rule 'same_code_any' (no ``known_group``) rebuilds them exactly.
- The copy head scored incrementally equals its teacher-forced logits.
- ``budget='strict'`` opens exactly K groups and keeps at most P + K + w (+1) cache entries, with or
  without a copy head (without one the exact copy mass of the token heads decides), on a model
  overfit here to a handful of sequences.
- A config without the new keys (a checkpoint from before them) builds the old model and still samples.
"""

import math

import pytest
import torch

from mergevq.models.budget import code_log_probs, decide
from mergevq.models.generate import generate
from mergevq.models.generator_factory import build_generator
from mergevq.models.gpt import GPT, ModelArgs
from mergevq.models.mergear import (
    MergeARConfig,
    MergeARDecoder,
    code_groups,
    copy_targets,
    mergear_inputs,
    mergear_mask,
    representative,
)

P = 2
GRID = (4, 4)
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed: int = 0, copy_head: bool = True, **kw) -> GPT:
    base = dict(dim=32, n_layer=2, n_head=2, intra_layers=1, factorized_bits=(2, 3), num_classes=5, grid=GRID,
                prefix_tokens=P, num_keep_options=3, copy_head=copy_head)
    torch.manual_seed(seed)
    model = GPT(ModelArgs(**{**base, **kw})).double().eval()
    for module in (*model.heads, *([model.copy_head.wq, model.copy_head.wk] if copy_head else [])):
        torch.nn.init.normal_(module.weight, std=0.5)
    return model


def sequences() -> torch.Tensor:
    """Two 4 x 4 code grids with duplicates that are not spatially contiguous (codes in [0, 32))."""
    return torch.tensor([[3, 3, 9, 9, 3, 17, 17, 9, 30, 30, 3, 17, 30, 5, 5, 3],
                         [1, 2, 1, 2, 2, 2, 1, 1, 8, 8, 8, 2, 1, 1, 8, 8]])


def test_code_groups_and_copy_targets():
    codes = sequences()
    groups = code_groups(codes)
    assert groups[0].tolist() == [0, 0, 2, 2, 0, 5, 5, 2, 8, 8, 0, 5, 8, 13, 13, 0]
    rep, first = representative(groups)
    assert torch.equal(rep, groups) and first.sum(1).tolist() == [5, 3]  # distinct codes
    assert torch.equal(codes.gather(1, groups), codes)
    target = copy_targets(groups)
    assert target[0, :6].tolist() == [0, 1, 0, 3, 1, 0]  # new, copy m=0, new, copy m=2, copy m=0, new


@pytest.mark.parametrize("window", [0, 2, 5])
@pytest.mark.parametrize("cfg", [False, True])
def test_rule_decided_decoding_equals_masked_forward(window, cfg):
    """Fed the true sequence, the decoder's own rule decides the groups: they equal the training
    groups, every step's logits equal the masked full forward, and so do the copy-head logits."""
    model = tiny()
    codes, labels, keep = sequences(), torch.tensor([1, 4]), torch.tensor([2, 0])
    config = MergeARConfig(window=window, keep_options=(4, 9, 16), duplicate_rule="same_code_any",
                           mask_groups="codes", copy_head=True)
    inputs = mergear_inputs(codes, codes * 0, torch.tensor([16, 4]), config)
    assert inputs["keep"].tolist() == [2, 0]
    h_full = model.hidden(codes, labels, keep, inputs["mask"])
    logits_full = model.head_logits(h_full, codes)
    copy_full = model.copy_logits(h_full, inputs["copy_target"] == 0)

    dec = MergeARDecoder(model, 2, window, "same_code_any", cfg=cfg)
    with torch.no_grad():
        h = dec.prefill(labels, keep)
        for pos in range(16):
            logits = model.head_logits(h[:2], codes[:, pos])
            for j in range(2):
                torch.testing.assert_close(logits[j], logits_full[j][:, pos], atol=1e-10, rtol=1e-10)
            copy = dec.copy_logits(h)
            expected = copy_full[:, pos, : 1 + pos]
            assert torch.equal(torch.isinf(copy), torch.isinf(expected))
            finite = torch.isfinite(expected)
            torch.testing.assert_close(copy[finite], expected[finite], atol=1e-10, rtol=1e-10)
            if pos < 15:
                h = dec.decode_one(codes[:, pos])
            else:
                dec.assign(codes[:, pos])
    assert torch.equal(dec.groups, code_groups(codes))
    assert torch.equal(inputs["mask"], mergear_mask(dec.groups, window, P))


def test_tokenizer_groups_option_keeps_the_official_groups():
    codes = torch.tensor([[4, 4, 4, 7]])
    tokenizer_groups = torch.tensor([[0, 0, 1, 2]])  # two groups share code 4
    config = MergeARConfig(window=0, keep_options=(3,), mask_groups="tokenizer", copy_head=True)
    inputs = mergear_inputs(codes, tokenizer_groups, torch.tensor([3]), config)
    assert inputs["copy_target"].tolist() == [[0, 1, 0, 0]]
    by_codes = mergear_inputs(codes, tokenizer_groups, torch.tensor([3]), MergeARConfig(window=0, keep_options=(3,),
                              mask_groups="codes", copy_head=True))
    assert by_codes["copy_target"].tolist() == [[0, 1, 1, 0]]


@torch.no_grad()
def test_code_log_probs_is_the_factorised_probability():
    """The copy mass of the token heads: log p(pre) + log p(post | pre), CFG and temperature included."""
    model = tiny(copy_head=False)
    h = torch.randn(4, 32, dtype=torch.double)  # 2 sequences x [cond; uncond]
    codes = torch.tensor([[0, 31, 9], [17, 17, 2]])
    scales, temps = (1.5, 2.0), (0.7, 1.3)
    got = code_log_probs(model, h, codes, True, True, scales, temps)
    for b in range(2):
        for s in range(3):
            pre, post = model.split(codes[b, s])
            rows = h[[b, b + 2]]
            lp = model.next_part_logits(rows)
            lp = (lp[0] + (scales[0] - 1) * (lp[0] - lp[1])) / temps[0]
            lq = model.next_part_logits(rows, [torch.stack([pre, pre])])
            lq = (lq[0] + (scales[1] - 1) * (lq[0] - lq[1])) / temps[1]
            want = lp.log_softmax(-1)[pre] + lq.log_softmax(-1)[post]
            assert math.isclose(float(got[b, s]), float(want), rel_tol=1e-9)
    # every code's probability sums to one
    all_codes = torch.arange(32).expand(2, 32)
    total = code_log_probs(model, h, all_codes, True, True, scales, temps).exp().sum(-1)
    torch.testing.assert_close(total, torch.ones(2, dtype=total.dtype), atol=1e-6, rtol=0)


def test_decide_strict_forces_copy_and_new():
    logits = torch.tensor([[0.0, 0.0, float("-inf"), 0.0], [5.0, -5.0, float("-inf"), -5.0]])
    keep = torch.tensor([2, 3])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        # row 0: 2 groups open = K -> copy; row 1: 3 positions left for 2 more groups -> free; then forced new
        choice = decide(logits, torch.tensor([2, 1]), keep, left=5, budget="strict", capacity=32, generator=g)
        assert choice[0] in (1, 3)
        forced = decide(logits, torch.tensor([2, 1]), keep, left=2, budget="strict", capacity=32, generator=g)
        assert forced[1] == 0
    with pytest.raises(ValueError):
        decide(logits, torch.tensor([0, 0]), keep, left=1, budget="hard", capacity=32)


def overfit(copy_head: bool, steps: int = 150) -> GPT:
    """A tiny MergeAR overfit to the two sequences (classes 0 and 1, K index 1)."""
    torch.manual_seed(0)
    model = GPT(ModelArgs(dim=32, n_layer=2, n_head=2, intra_layers=1, factorized_bits=(2, 3), num_classes=5,
                          grid=GRID, prefix_tokens=P, num_keep_options=3, copy_head=copy_head, class_dropout=0.0,
                          token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0))
    codes, labels = sequences(), torch.tensor([0, 1])
    config = MergeARConfig(window=2, keep_options=(3, 5, 16), mask_groups="codes", copy_head=copy_head)
    inputs = mergear_inputs(codes, codes, torch.tensor([5, 5]), config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(steps):
        out = model.loss(codes, labels, **inputs)
        first = first or {k: float(v.detach()) for k, v in out.items()}
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    last = {k: float(v.detach()) for k, v in out.items()}
    assert last["loss"] < 0.2 * first["loss"]
    if copy_head:
        assert last["loss_copy"] < 0.2 * first["loss_copy"]
    return model.eval()


@pytest.mark.parametrize("copy_head", [True, False])
def test_strict_budget_on_an_overfit_model(copy_head):
    """Sampled at the sampler's defaults (temperature 1, no top-k, CFG 1.5): exactly K groups for
    every K asked, within the cache bound; K = 5 (the trained one) reproduces the trained groups'
    count; 'soft' follows the model's own decisions (5 groups on the trained prompt)."""
    model = overfit(copy_head)
    labels = torch.tensor([0, 1, 0, 1])
    for keep in (3, 5, 8):
        codes, stats = generate(model, labels, keep=1, mergear=True, window=2, budget="strict", budget_keep=keep,
                                cfg_scale=1.5, seed=1)
        assert stats["num_groups"].tolist() == [keep] * 4
        assert [len(set(row.tolist())) for row in codes] == [keep] * 4
        assert torch.equal(stats["groups"], code_groups(codes))
        assert int(stats["peak_cache_per_row"].max()) <= P + keep + 2
        assert stats["peak_live"] <= P + keep + 2 + 1
    codes, stats = generate(model, labels, keep=1, mergear=True, window=2, budget="soft", cfg_scale=1.0,
                            temperature=0.0, seed=1)
    if copy_head:
        assert torch.equal(codes, sequences().repeat(2, 1))  # greedy codes + the head's copies = the data
        assert stats["num_groups"].tolist() == [5, 3, 5, 3]


def test_checkpoint_config_from_before_the_copy_head_still_samples():
    """A stored generator config without mask_groups/copy_head/duplicate_rule (runs before issue 13)
    builds the old model: tokenizer groups, adjacent rule, no copy head; strict budget still works."""
    old_config = {"ar": {"size": "tiny", "dim": 32, "n_layer": 1, "n_head": 2, "intra_layers": 1},
                  "num_classes": 3, "generator": {"kind": "mergear", "window": 2, "keep_options": None}}
    meta = {"codebook_bits": 5, "grid": [4, 4], "keep": {"choices": [4, 9]}, "keeps": [4, 9]}
    model, mergear = build_generator(old_config, meta)
    assert model.copy_head is None and not mergear.copy_head
    assert mergear.duplicate_rule == "adjacent" and mergear.mask_groups == "tokenizer"
    assert "copy_head.wq.weight" not in model.state_dict()
    model.eval()
    codes, stats = generate(model, torch.tensor([0, 2]), keep=1, mergear=True, window=2,
                            duplicate_rule=mergear.duplicate_rule, budget="strict", budget_keep=9, seed=0)
    assert stats["num_groups"].tolist() == [9, 9] and [len(set(r.tolist())) for r in codes] == [9, 9]
    new_config = {**old_config, "generator": {**old_config["generator"], "copy_head": True, "mask_groups": "codes"}}
    model, mergear = build_generator(new_config, meta)
    assert model.copy_head is not None and mergear.mask_groups == "codes"

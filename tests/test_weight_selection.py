"""DINOv2 weight-selection init (spec section 2.6): select_uniform, weight_selection_init on a tiny
random timm DINOv2-style ViT, and load_teacher_state round trips."""

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from mergevq.models.encoder import (
    MergingTransformer,
    load_teacher_state,
    select_uniform,
    weight_selection_init,
)


def linspace_index(t, s):
    """round(linspace(0, t - 1, s)) in float64 (sizes below are chosen with no .5 ties)."""
    return torch.from_numpy(np.round(np.linspace(0, t - 1, s)).astype(np.int64))


# --------------------------------------------------------------------------- select_uniform


def test_select_uniform_identity():
    weight = torch.randn(12, 7, 3)
    out = select_uniform(weight, (12, 7, 3))
    assert torch.equal(out, weight)
    assert torch.equal(select_uniform(weight, weight.shape), weight)


def test_select_uniform_divisible_takes_every_step():
    assert select_uniform(torch.arange(12), (4,)).tolist() == [0, 3, 6, 9]
    assert select_uniform(torch.arange(12), (6,)).tolist() == [0, 2, 4, 6, 8, 10]
    grid = torch.arange(6 * 8).view(6, 8)
    assert torch.equal(select_uniform(grid, (3, 4)), grid[::2, ::2])
    assert torch.equal(select_uniform(grid, (2, 8)), grid[::3])
    cube = torch.arange(4 * 6 * 9).view(4, 6, 9)
    assert torch.equal(select_uniform(cube, (2, 3, 3)), cube[::2, ::2, ::3])
    # the fused qkv shape of a 64 -> 32 student: rows [192 -> 96] step 2, columns [64 -> 32] step 2
    qkv = torch.arange(192 * 64).view(192, 64)
    assert torch.equal(select_uniform(qkv, (96, 32)), qkv[::2, ::2])


@pytest.mark.parametrize(("t", "s"), [(768, 512), (10, 6), (48, 32), (144, 96), (20, 14), (7, 2), (5, 4)])
def test_select_uniform_non_divisible_uses_rounded_linspace(t, s):
    assert t % s != 0
    index = linspace_index(t, s)
    assert index[0] == 0 and index[-1] == t - 1 and (index.diff() > 0).all()
    out = select_uniform(torch.arange(t), (s,))
    assert torch.equal(out, index)
    # along dim 1 of a 2-D tensor, with the other dim divisible
    values = torch.randn(6, t)
    assert torch.equal(select_uniform(values, (3, s)), values[::2][:, index])


def test_select_uniform_768_to_512_matches_spec_d64():
    """Spec 2.6: d64 takes 512 of 768 channels (768 is not a multiple of 512 -> linspace)."""
    out = select_uniform(torch.arange(768.0), (512,))
    assert out.shape == (512,) and out.unique().numel() == 512
    assert torch.equal(out.long(), linspace_index(768, 512))


def test_select_uniform_errors():
    with pytest.raises(ValueError, match="dims"):
        select_uniform(torch.randn(8), (4, 2))
    with pytest.raises(ValueError, match="dims"):
        select_uniform(torch.randn(8, 4), (8,))
    with pytest.raises(ValueError, match="smaller"):
        select_uniform(torch.randn(8, 4), (8, 5))
    with pytest.raises(ValueError, match="smaller"):
        select_uniform(torch.randn(3), (4,))


# --------------------------------------------------------------------------- weight_selection_init


def tiny_teacher(embed_dim, depth, num_heads, seed=0):
    """Tiny random timm DINOv2 ViT; every tensor re-drawn so no LayerNorm/LayerScale is constant."""
    model = timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=False,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        img_size=28,
    )
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(value.shape, generator=generator) for key, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def teacher64():
    return tiny_teacher(64, 3, 4)


def test_tiny_teacher_has_timm_names(teacher64):
    assert teacher64["cls_token"].shape == (1, 1, 64)
    assert teacher64["blocks.0.attn.qkv.weight"].shape == (192, 64)
    assert teacher64["blocks.2.mlp.fc1.weight"].shape == (256, 64)
    assert "blocks.0.ls1.gamma" in teacher64 and "blocks.3.norm1.weight" not in teacher64


@pytest.mark.parametrize(("teacher_dim", "teacher_heads"), [(64, 4), (48, 4), (32, 2)])
def test_weight_selection_init_copies_selected_slices(teacher_dim, teacher_heads, teacher64):
    teacher = (
        teacher64 if teacher_dim == 64 else tiny_teacher(teacher_dim, 3, teacher_heads, seed=teacher_dim)
    )
    torch.manual_seed(0)
    student = MergingTransformer(width=32, depth=2, num_heads=2)
    before = {key: value.clone() for key, value in student.state_dict().items()}
    keys = weight_selection_init(student, teacher)
    state = student.state_dict()
    # every student tensor is a block weight or the CLS token, and all exist in the 3-block teacher
    assert keys and keys == sorted(state)
    assert "cls_token" in keys and "blocks.1.attn.qkv.weight" in keys
    for key in keys:
        expected = select_uniform(teacher[key], state[key].shape)
        assert torch.equal(state[key], expected), key
        assert not torch.equal(state[key], before[key]), key
    if teacher_dim == 32:  # same width: exact copies (spec: d32 with ViT-S)
        for key in keys:
            assert torch.equal(state[key], teacher[key])


@pytest.mark.parametrize("teacher_dim", [64, 48])
def test_qkv_rows_stay_in_their_third(teacher_dim, teacher64):
    """Checked: the teacher row behind each student qkv row lies in the same third (q, k or v) of the
    fused [3 D, D] weight, the bias follows the same rows, and for 64 -> 32 each third equals the
    per-third selection select_uniform(teacher q|k|v, (32, 32))."""
    teacher = teacher64 if teacher_dim == 64 else tiny_teacher(teacher_dim, 3, 4, seed=teacher_dim)
    student = MergingTransformer(width=32, depth=2, num_heads=2)
    weight_selection_init(student, teacher)
    student_dim = 32
    rows = select_uniform(torch.arange(3 * teacher_dim)[:, None].expand(-1, teacher_dim), (96, 32))[:, 0]
    cols = select_uniform(torch.arange(teacher_dim), (32,))
    for third in range(3):
        chunk = rows[third * student_dim : (third + 1) * student_dim]
        assert (chunk >= third * teacher_dim).all() and (chunk < (third + 1) * teacher_dim).all()
    for block in range(2):
        t_weight = teacher[f"blocks.{block}.attn.qkv.weight"]
        t_bias = teacher[f"blocks.{block}.attn.qkv.bias"]
        s_weight = student.blocks[block].attn.qkv.weight.detach()
        s_bias = student.blocks[block].attn.qkv.bias.detach()
        assert torch.equal(s_weight, t_weight[rows][:, cols])
        assert torch.equal(s_bias, t_bias[rows])
        if teacher_dim % student_dim == 0:
            for t_part, s_part in zip(t_weight.chunk(3), s_weight.chunk(3)):
                assert torch.equal(s_part, select_uniform(t_part, (student_dim, student_dim)))
            for t_part, s_part in zip(t_bias.chunk(3), s_bias.chunk(3)):
                assert torch.equal(s_part, select_uniform(t_part, (student_dim,)))


def test_student_deeper_than_teacher_keeps_extra_blocks(teacher64):
    torch.manual_seed(0)
    student = MergingTransformer(width=32, depth=4, num_heads=2)
    before = {key: value.clone() for key, value in student.state_dict().items()}
    keys = weight_selection_init(student, teacher64)
    assert all(not key.startswith("blocks.3.") for key in keys)
    assert any(key.startswith("blocks.2.") for key in keys)
    for key, value in student.state_dict().items():
        if key.startswith("blocks.3."):
            assert torch.equal(value, before[key])


def test_weight_selection_init_rejects_unrelated_state():
    student = MergingTransformer(width=32, depth=2, num_heads=2)
    with pytest.raises(ValueError, match="no DINOv2 key"):
        weight_selection_init(student, {"encoder.layer.0.weight": torch.zeros(3)})


def test_initialised_student_runs(teacher64):
    student = MergingTransformer(width=32, depth=2, num_heads=2)
    weight_selection_init(student, teacher64)
    with torch.no_grad():
        out, groups = student(torch.randn(2, 16, 32), [3, 2])
    assert out.shape == (2, 1 + 11, 32) and torch.isfinite(out).all()
    assert torch.equal(groups[0].unique(), torch.arange(11))


# --------------------------------------------------------------------------- load_teacher_state


def test_load_teacher_state_missing_path(tmp_path):
    missing = tmp_path / "nowhere" / "dinov2.safetensors"
    with pytest.raises(FileNotFoundError) as info:
        load_teacher_state(str(missing))
    assert str(missing) in str(info.value)


def assert_same_state(loaded, reference):
    assert sorted(loaded) == sorted(reference)
    for key, value in reference.items():
        assert torch.equal(loaded[key], value), key


def test_load_teacher_state_safetensors_round_trip(tmp_path, teacher64):
    path = tmp_path / "teacher.safetensors"
    save_file({key: value.contiguous() for key, value in teacher64.items()}, str(path))
    loaded = load_teacher_state(str(path))
    assert_same_state(loaded, teacher64)
    student = MergingTransformer(width=32, depth=2, num_heads=2)
    keys = weight_selection_init(student, loaded)
    assert torch.equal(
        student.state_dict()[keys[0]], select_uniform(teacher64[keys[0]], student.state_dict()[keys[0]].shape)
    )


@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("suffix", [".pth", ".bin"])
def test_load_teacher_state_torch_round_trip(tmp_path, teacher64, wrap, suffix):
    path = tmp_path / f"teacher{suffix}"
    torch.save({"model": teacher64} if wrap else teacher64, path)
    assert_same_state(load_teacher_state(str(path)), teacher64)

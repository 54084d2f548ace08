"""Stage-I losses and the PatchGAN discriminator.

Every network here is randomly initialised (VGG16 backbones, DINOv2 teachers): the tests check
behaviour and plumbing, not published LPIPS/DINOv2 values. No network access (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergevq.losses import (
    LeCam,
    LPIPSLoss,
    alignment_kl,
    frozen,
    hinge_d_loss,
    load_dino_teacher,
    non_saturating_g_loss,
    reconstruction_loss,
    tiny_random_teacher,
)
from mergevq.models.discriminator import PatchGANDiscriminator

# ---------------------------------------------------------------- discriminator


def test_discriminator_shape_params_init():
    torch.manual_seed(0)
    d = PatchGANDiscriminator()
    n_params = sum(p.numel() for p in d.parameters())
    assert n_params == 2_765_633  # "about 2.8M" (spec 1.2)
    out = d(torch.randn(2, 3, 256, 256))
    assert out.shape == (2, 1, 30, 30)

    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in d.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 5 and [b.num_features for b in bns] == [128, 256, 512]
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]  # no bias before BN
    big = convs[3].weight  # 256 -> 512, 2M weights
    assert abs(big.mean().item()) < 1e-3 and abs(big.std().item() - 0.02) < 5e-4
    for bn in bns:
        assert torch.all(bn.bias == 0)
        assert abs(bn.weight.mean().item() - 1.0) < 0.01 and 0.01 < bn.weight.std().item() < 0.03
    assert "main.0.weight" in d.state_dict() and "main.3.running_mean" in d.state_dict()  # taming names


# ---------------------------------------------------------------- GAN losses


def test_hinge_d_loss_hand_values():
    real = torch.tensor([[2.0, 0.5], [-1.0, 0.0]])  # relu(1 - real) = 0, .5, 2, 1 -> mean .875
    fake = torch.tensor([[-2.0, 0.0], [1.0, 0.5]])  # relu(1 + fake) = 0, 1, 2, 1.5 -> mean 1.125
    assert hinge_d_loss(real, fake).item() == pytest.approx(1.0)


def test_non_saturating_g_loss_averages_patches_before_softplus():
    logits = torch.tensor([[1.0, 3.0, -1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]).view(2, 1, 2, 2)  # means 1, 0
    expected = 0.5 * (math.log1p(math.exp(-1.0)) + math.log(2.0))
    assert non_saturating_g_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    per_patch = F.softplus(-logits).mean().item()  # the other reduction gives a different number
    assert abs(per_patch - expected) > 1e-2


def lecam_formula(real, fake, ema_real, ema_fake):
    return (F.relu(real - ema_fake) ** 2).mean() + (F.relu(ema_real - fake) ** 2).mean()


def test_lecam_updates_ema_then_penalises_in_train_mode():
    lecam = LeCam(decay=0.999).train()
    assert lecam.ema_real.item() == 0 and lecam.ema_fake.item() == 0
    real = torch.tensor([[3.0, 1.0], [2.0, 2.0]])  # mean 2
    fake = torch.tensor([[-1.0, -3.0], [-2.0, -2.0]])  # mean -2
    value = lecam(real, fake)
    ema_real, ema_fake = 0.001 * 2.0, 0.001 * -2.0  # updated BEFORE the penalty
    assert lecam.ema_real.item() == pytest.approx(ema_real)
    assert lecam.ema_fake.item() == pytest.approx(ema_fake)
    assert value.item() == pytest.approx(lecam_formula(real, fake, ema_real, ema_fake).item(), rel=1e-6)

    lecam(real, fake)  # second step keeps moving towards the batch means
    assert lecam.ema_real.item() == pytest.approx(0.999 * ema_real + 0.001 * 2.0)


def test_lecam_does_not_update_in_eval_mode():
    lecam = LeCam(decay=0.5)
    lecam.ema_real.fill_(1.0)
    lecam.ema_fake.fill_(-1.0)
    lecam.eval()
    real = torch.tensor([0.0, -2.0])
    fake = torch.tensor([2.0, 0.0])
    value = lecam(real, fake)
    assert lecam.ema_real.item() == 1.0 and lecam.ema_fake.item() == -1.0
    # relu(real + 1)^2 = 1, 0 -> .5 ; relu(1 - fake)^2 = 0, 1 -> .5
    assert value.item() == pytest.approx(1.0)
    assert set(dict(lecam.named_buffers())) == {"ema_real", "ema_fake"}  # saved with checkpoints


# ---------------------------------------------------------------- gradient isolation (spec 6.4)


def _generator_and_discriminator():
    torch.manual_seed(0)
    generator = nn.Conv2d(3, 3, 3, padding=1)
    disc = PatchGANDiscriminator(ndf=8, n_layers=3)
    xrec = generator(torch.randn(2, 3, 32, 32))
    return generator, disc, xrec


def test_frozen_keeps_generator_adv_gradients_out_of_discriminator():
    generator, disc, xrec = _generator_and_discriminator()
    with frozen(disc):
        loss = non_saturating_g_loss(disc(xrec))
    loss.backward()
    assert all(p.grad is None for p in disc.parameters())
    assert generator.weight.grad is not None and generator.weight.grad.abs().sum() > 0
    assert all(p.requires_grad for p in disc.parameters())  # flags restored


def test_without_frozen_discriminator_gets_gradients():
    generator, disc, xrec = _generator_and_discriminator()
    non_saturating_g_loss(disc(xrec)).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())


def test_frozen_restores_previous_flags_even_on_error():
    disc = PatchGANDiscriminator(ndf=8, n_layers=2)
    first = next(disc.parameters())
    first.requires_grad_(False)
    with pytest.raises(RuntimeError), frozen(disc):
        assert not any(p.requires_grad for p in disc.parameters())
        raise RuntimeError("boom")
    assert first.requires_grad is False
    assert all(p.requires_grad for p in list(disc.parameters())[1:])


# ---------------------------------------------------------------- reconstruction


def test_reconstruction_loss():
    x = torch.zeros(1, 1, 2, 2)
    xrec = torch.tensor([1.0, -1.0, 2.0, 0.0]).view(1, 1, 2, 2)
    assert reconstruction_loss(x, xrec).item() == pytest.approx(1.0)
    assert reconstruction_loss(x, xrec, kind="l2").item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="l1"):
        reconstruction_loss(x, xrec, kind="huber")


# ---------------------------------------------------------------- LPIPS (random VGG16 backbones)


@pytest.fixture(scope="module")
def random_lpips():
    torch.manual_seed(0)
    return LPIPSLoss(pretrained=False)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    noisy = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return x, noisy


@pytest.fixture(scope="module")
def random_vgg16_features(tmp_path_factory):
    """State dict of a RANDOM torchvision vgg16 (features + one classifier tensor, to keep it small)."""
    import torchvision

    torch.manual_seed(123)
    state = torchvision.models.vgg16(weights=None).state_dict()
    keep = {k: v for k, v in state.items() if k.startswith("features.") or k == "classifier.6.bias"}
    return tmp_path_factory.mktemp("vgg"), keep


def test_lpips_random_backbone_behaviour(random_lpips, images):
    x, noisy = images
    assert random_lpips.pretrained is False and random_lpips.backbone_source == "random"
    same = random_lpips(x, x)
    diff = random_lpips(x, noisy)
    assert same.shape == (2,) and diff.shape == (2,)
    assert torch.allclose(same, torch.zeros(2), atol=1e-6)
    assert torch.all(diff > 0)


def test_lpips_is_frozen_but_passes_gradients(random_lpips, images):
    x, noisy = images
    parent = nn.ModuleDict({"lpips": random_lpips}).train()
    assert not any(m.training for m in random_lpips.modules())  # dropout stays off
    xrec = noisy.clone().requires_grad_(True)
    random_lpips(x, xrec).mean().backward()
    assert xrec.grad is not None and xrec.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in parent.parameters())


def test_lpips_missing_backbone_names_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    hub_file = tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"
    with pytest.raises(FileNotFoundError) as err:
        LPIPSLoss()
    msg = str(err.value)
    assert str(hub_file) in msg
    assert "loss.perceptual.backbone_weights=" in msg and "loss.perceptual.pretrained=false" in msg

    missing = tmp_path / "nowhere" / "vgg16.safetensors"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        LPIPSLoss(backbone_weights=str(missing))


@pytest.mark.slow
def test_lpips_loads_backbone_weights_file(random_vgg16_features, random_lpips, images):
    from safetensors.torch import save_file

    folder, state = random_vgg16_features
    path = folder / "vgg16.safetensors"  # the .pth route is covered by the hub-cache test
    save_file(state, str(path))
    loss = LPIPSLoss(backbone_weights=str(path))
    assert loss.pretrained is True and loss.backbone_source == str(path)
    assert torch.equal(loss.net.net.slice5[5].weight, state["features.28.weight"])
    x, noisy = images
    assert not torch.allclose(loss(x, noisy), random_lpips(x, noisy))


def test_lpips_reads_torch_hub_cache(tmp_path, monkeypatch, random_vgg16_features):
    _, state = random_vgg16_features
    hub_file = tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"
    hub_file.parent.mkdir(parents=True)
    torch.save(state, hub_file)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    loss = LPIPSLoss()
    assert loss.pretrained is True and loss.backbone_source == str(hub_file)
    assert torch.equal(loss.net.net.slice1[0].weight, state["features.0.weight"])


# ---------------------------------------------------------------- alignment


def test_alignment_kl_values():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 16, generator=g)
    t = torch.randn(4, 16, generator=g)
    assert alignment_kl(t, t).item() == pytest.approx(0.0, abs=1e-6)
    value = alignment_kl(s, t, tau=4.0)
    assert value.item() > 0
    direct = 16.0 * F.kl_div(F.log_softmax(s / 4, dim=-1), F.softmax(t / 4, dim=-1), reduction="batchmean")
    assert value.item() == pytest.approx(direct.item(), rel=1e-5)
    direct_tau2 = 4.0 * F.kl_div(
        F.log_softmax(s / 2, dim=-1), F.softmax(t / 2, dim=-1), reduction="batchmean"
    )
    assert alignment_kl(s, t, tau=2.0).item() == pytest.approx(direct_tau2.item(), rel=1e-5)


def test_alignment_kl_gradient_only_to_student():
    s = torch.randn(2, 8, requires_grad=True)
    t = torch.randn(2, 8, requires_grad=True)
    alignment_kl(s, t).backward()
    assert s.grad is not None and t.grad is None


def test_tiny_random_teacher_is_frozen():
    teacher = tiny_random_teacher(hidden_size=32)  # RANDOM weights: not DINOv2
    student = nn.Linear(3, 32)
    parent = nn.ModuleDict({"teacher": teacher, "student": student}).train()
    assert student.training
    assert not any(m.training for m in teacher.modules())
    x = torch.randn(2, 3, 224, 224)
    feats = teacher(x)
    assert feats.shape == (2, 32) and not feats.requires_grad
    u = student(x.mean(dim=(2, 3)))
    alignment_kl(u, feats).backward()
    assert student.weight.grad is not None
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert len(list(parent.parameters())) > 2


def test_load_dino_teacher_from_local_dir(tmp_path):
    teacher = tiny_random_teacher(hidden_size=32, num_hidden_layers=1, image_size=56)  # random weights
    teacher.model.save_pretrained(tmp_path / "tiny_dino")
    loaded = load_dino_teacher(tmp_path / "tiny_dino")
    assert not loaded.training
    x = torch.randn(1, 3, 56, 56)
    assert torch.allclose(loaded(x), teacher(x), atol=1e-6)


def test_load_dino_teacher_missing_path(tmp_path):
    missing = tmp_path / "dinov2-base"
    with pytest.raises(FileNotFoundError) as err:
        load_dino_teacher(missing)
    assert str(missing) in str(err.value) and "teacher.path=" in str(err.value)

"""Interop and UX: hub folders, Open-MAGVIT2 imports, merge maps, the reconstruct entry, entry --help.

Fixture ``open_magvit2_ar_tiny.pt``: made once by running the official SEED-Voken GPT
(``src/Open_MAGVIT2/modules/transformer/gpt.py`` at commit b9a17ea) built with ``official_config``
(2 spatial + 2 factorized blocks, width 32, 2 heads, factorized_bits [2, 4], 10 classes, 4x4 grid),
seeded N(0, 0.3) weights (RMSNorm weights 1 + N(0, 0.2)) rounded to fp16, in eval mode, on the stored
tokens (pre [3, 16], post [3, 16], labels [3], one of them the null class 10). It holds the official
state dict (official names, fp16), the tokens and the official ``logits_pre`` / ``logits_post``.
The official code is not part of this project.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import FIXTURES, ROOT
from helpers.models import load_group
from PIL import Image

from mergevq.data.code_cache import CodeCache, CodeCacheWriter, cache_contents
from mergevq.entries.cli import entry_module
from mergevq.entries.reconstruct import task as reconstruct_task
from mergevq.interop.hub import HubGenerator, HubTokenizer, export_run, from_pretrained, save_pretrained
from mergevq.interop.magvit2_import import (
    CheckpointLayoutError,
    infer_tokenizer_config,
    load_open_magvit2_gpt,
    load_open_magvit2_tokenizer,
    official_gpt_state,
)
from mergevq.models.factory import build_tokenizer
from mergevq.models.generator_factory import build_generator
from mergevq.models.gpt import GPT, ModelArgs
from mergevq.models.lfq import join_codes
from mergevq.models.mergear import MergeARConfig, keep_index, mergear_mask
from mergevq.models.positions import group_starts
from mergevq.runs.card import EvaluationCard, write_card
from mergevq.runs.checkpoint import save_checkpoint
from mergevq.runs.restore import load_trained_generator, load_trained_tokenizer
from mergevq.viz import LINE_COLOUR, boundaries, group_pixels, merge_map, merge_strip, segment_layer

RECOVERY = {"enabled": True, "width": 32, "depth": 1, "num_heads": 2, "drop_path": 0.0}
MAGVIT2 = {"kind": "magvit2", "name": "open_magvit2", "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 2,
           "z_channels": 18, "resolution": 32}


def tokenizer_config() -> dict:
    return {"tokenizer": load_group("tokenizer", "tiny"), "variant": load_group("variant", "gr"),
            "quantizer": {"bits": 18}, "recovery": RECOVERY}


def build(config: dict, seed: int):
    torch.manual_seed(seed)
    return build_tokenizer(config["tokenizer"], config["variant"], config["quantizer"], config["recovery"]).eval()


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter (zero-initialised heads and unit norms would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module.eval()


def images(seed: int = 0, n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny tokenizer run with distinct raw and EMA weights (no training)."""
    root = tmp_path_factory.mktemp("tok_run")
    config = {**tokenizer_config(), "data": {"name": "photos"}, "train": {}, "seed": 0}
    save_checkpoint(root / "checkpoints", step=3, models={"tokenizer": build(config, 1), "tokenizer_ema": build(config, 0)},
                    optimizers={}, extra={"step": 3}, metadata={"config": yaml.safe_dump(config)})
    return root


# ------------------------------------------------------------------------------------------ hub


def test_hub_tokenizer_round_trip(tmp_path):
    config = tokenizer_config()
    model = perturb(build(config, 0), 1)
    out = save_pretrained(model, tmp_path / "tok", config=config)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    stored = json.loads((out / "config.json").read_text())
    assert stored == {**config, "tokenizer": {**config["tokenizer"], "encoder_init": None}}

    loaded = from_pretrained(out)
    assert isinstance(loaded, HubTokenizer) and loaded.config == stored and not loaded.model.training
    x = images()
    with torch.no_grad():
        for keep in (16, 36):
            a, b = model.encode(x, keep=keep), loaded.model.encode(x, keep=keep)
            assert torch.equal(a.codes, b.codes) and torch.equal(a.groups, b.groups)
            assert torch.equal(model.decode(a), loaded.model.decode(b))
        starts = group_starts(a.groups, a.codes.shape[1])
        assert torch.equal(model.decode_recovered(a.codes, a.grid, starts),
                           loaded.model.decode_recovered(b.codes, b.grid, starts))


def test_hub_generator_round_trip(tmp_path):
    mergear = MergeARConfig(window=4, keep_options=(4, 9, 16), duplicate_rule="same_code_any", mask_groups="codes",
                            copy_head=True)
    args = mergear.model_args(ModelArgs(dim=32, n_layer=2, n_head=2, intra_layers=1, multiple_of=32,
                                        factorized_bits=(6, 12), num_classes=10, grid=(4, 4)))
    torch.manual_seed(0)
    model = perturb(GPT(args), 2, 0.1)
    out = save_pretrained(model, tmp_path / "gen", mergear=mergear)
    stored = json.loads((out / "config.json").read_text())
    assert stored["mergear"] == {"window": 4, "keep_options": [4, 9, 16], "duplicate_rule": "same_code_any",
                                 "mask_groups": "codes", "copy_head": True}
    assert args.copy_head and "copy_head.wq.weight" in model.state_dict()
    assert ModelArgs(**{k: v for k, v in stored.items() if k != "mergear"}) == args

    loaded = from_pretrained(str(out))
    assert isinstance(loaded, HubGenerator) and loaded.mergear == mergear
    g = torch.Generator().manual_seed(0)
    codes, labels = torch.randint(0, 2**18, (2, 16), generator=g), torch.tensor([3, 10])
    groups = torch.stack([torch.arange(16) // 2, torch.arange(16) // 4])
    keep, mask = keep_index(torch.tensor([9, 4]), mergear.keep_options), mergear_mask(groups, 4, prefix=2)
    with torch.no_grad():
        expected, got = model(codes, labels, keep, mask), loaded.model(codes, labels, keep, mask)
    assert all(torch.equal(a, b) for a, b in zip(expected, got)) and expected[1].abs().max() > 0


def test_hub_checks_the_config(tmp_path):
    config = tokenizer_config()
    model = build(config, 0)
    with pytest.raises(ValueError, match="needs config"):
        save_pretrained(model, tmp_path / "a")
    wrong = {**config, "recovery": None}  # the model has a Source Recovery module
    with pytest.raises(CheckpointLayoutError, match="recovery") as error:
        save_pretrained(model, tmp_path / "b", config=wrong)
    assert error.value.unexpected and not error.value.missing
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path)


def test_export_run_embeds_eval_card(run_dir, tmp_path):
    plain = export_run(run_dir, tmp_path / "plain")
    assert "No evaluation card was found" in (plain / "README.md").read_text()

    card = EvaluationCard(
        metrics={16: {"rfid": 12.3456, "psnr": 21.5}, 36: {"rfid": 7.891, "psnr": 23.25}},
        checkpoint=str(run_dir), checkpoint_sha256="0" * 64, weights="ema", keeps=[16, 36], image_size=32,
        resize="bilinear 32", crop="center 32", num_images=16, reference_stats_sha256=None,
        feature_extractor={"name": "random", "weights_sha256": None, "trained": False}, seeds={"eval": 0},
    )
    _, md = write_card(run_dir / "eval", card)
    out = export_run(run_dir, tmp_path / "hub", weights="ema")
    readme = (out / "README.md").read_text()
    assert readme.startswith("---\nlibrary_name: mergevq")
    assert "## Evaluation" in readme and "### Metrics" in readme  # the card's headings nest one level down
    for line in md.read_text().splitlines():
        if line.startswith("| ") or line.startswith("**WARNING"):
            assert line in readme
    assert "12.3456" in readme and "UNTRAINED" in readme and "step_00000003" in readme

    loaded = from_pretrained(out).model
    reference, _, _ = load_trained_tokenizer(run_dir, "ema")
    x = images(1)
    with torch.no_grad():
        assert torch.equal(loaded(x, keep=36)[0], reference(x, keep=36)[0])


# ------------------------------------------------------------------------------------------ Open-MAGVIT2 tokenizer


def official_tokenizer_state(raw, ema, prefix: str = "", with_ema: bool = True) -> dict:
    """A VQModel-style state dict: raw encoder/decoder, a discriminator, LitEma shadows (dots removed)."""
    state = {prefix + k: v.clone() for k, v in raw.state_dict().items()}
    state[prefix + "loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    if with_ema:
        state[prefix + "model_ema.decay"] = torch.tensor(0.999)
        state[prefix + "model_ema.num_updates"] = torch.tensor(-1, dtype=torch.int32)
        state[prefix + "model_ema.lossdiscriminatormain0weight"] = torch.randn(8, 3, 4, 4)
        state.update({prefix + "model_ema." + k.replace(".", ""): v.clone() for k, v in ema.state_dict().items()})
    return state


@pytest.fixture(scope="module")
def magvit2_pair():
    raw = perturb(build({"tokenizer": MAGVIT2, "variant": None, "quantizer": {"bits": 18}, "recovery": None}, 0), 3)
    ema = perturb(build({"tokenizer": MAGVIT2, "variant": None, "quantizer": {"bits": 18}, "recovery": None}, 0), 4)
    return raw, ema


def test_open_magvit2_tokenizer_import(tmp_path, magvit2_pair):
    raw, ema = magvit2_pair
    path = tmp_path / "imagenet_256_L.ckpt"
    torch.save({"state_dict": official_tokenizer_state(raw, ema), "global_step": 10, "epoch": 1}, path)
    assert infer_tokenizer_config(torch.load(path)["state_dict"], resolution=32) == MAGVIT2
    x = images(2)
    with torch.no_grad():
        for weights, reference in (("auto", ema), ("ema", ema), ("raw", raw)):
            model, config = load_open_magvit2_tokenizer(path, weights=weights, resolution=32)
            assert config["tokenizer"] == MAGVIT2 and config["variant"] is None
            expected, got = reference(x), model(x)
            assert torch.equal(expected[0], got[0]) and torch.equal(expected[1]["codes"], got[1]["codes"])

    # the first stage inside an AR checkpoint (raw weights, no EMA)
    ar = tmp_path / "AR_256_B.ckpt"
    state = official_tokenizer_state(raw, ema, "first_stage_model.", with_ema=False)
    torch.save({"state_dict": {**state, "transformer.norm.weight": torch.ones(4)}}, ar)
    model, _ = load_open_magvit2_tokenizer(ar, resolution=32)
    with torch.no_grad():
        assert torch.equal(model(x)[0], raw(x)[0])
    with pytest.raises(ValueError, match="no model_ema"):
        load_open_magvit2_tokenizer(ar, weights="ema")


def test_open_magvit2_tokenizer_lists_layout_problems(tmp_path, magvit2_pair):
    raw, ema = magvit2_pair
    state = official_tokenizer_state(raw, ema)
    del state["decoder.conv_out.bias"], state["model_ema.decoderconv_outbias"]
    state["encoder.extra.weight"] = torch.zeros(3)
    state["encoder.conv_out.bias"] = torch.zeros(7)
    state["model_ema.encoderconv_outbias"] = torch.zeros(7)
    state["model_ema.encoderfooweight"] = torch.zeros(1)
    path = tmp_path / "broken.ckpt"
    torch.save({"state_dict": state}, path)
    for weights in ("raw", "ema"):
        with pytest.raises(CheckpointLayoutError) as error:
            load_open_magvit2_tokenizer(path, weights=weights, tokenizer=MAGVIT2)
        e = error.value
        assert e.missing == ["decoder.conv_out.bias"]
        assert e.mismatched == ["encoder.conv_out.bias: checkpoint (7,) vs model (18,)"]
        assert "encoder.extra.weight" in e.unexpected
        assert ("model_ema.encoderfooweight" in e.unexpected) == (weights == "ema")
        assert "decoder.conv_out.bias" in str(e) and "encoder.extra.weight" in str(e)


# ------------------------------------------------------------------------------------------ Open-MAGVIT2 AR


@pytest.fixture(scope="module")
def official_ar() -> dict:
    return torch.load(FIXTURES / "open_magvit2_ar_tiny.pt", weights_only=True)


def tiny_ar_args(official_ar) -> ModelArgs:
    c = official_ar["official_config"]
    return ModelArgs(dim=c["dim"], n_layer=c["spatial_n_layer"], n_head=c["n_head"], intra_layers=c["factorized_n_layer"],
                     multiple_of=c["multiple_of"], factorized_bits=tuple(c["factorized_bits"]),
                     num_classes=c["class_num"], grid=(4, 4))


def save_ar(path: Path, gpt_state: dict, extra: dict | None = None) -> Path:
    state = {f"transformer.{k}": v for k, v in gpt_state.items()}
    state["first_stage_model.encoder.conv_in.weight"] = torch.zeros(1)  # the frozen tokenizer (not imported)
    torch.save({"state_dict": {**state, **(extra or {})}, "global_step": 5, "epoch": 0}, path)
    return path


def test_open_magvit2_ar_matches_official_module(tmp_path, official_ar):
    """Logits of the official GPT (stored) == our GPT after import, on the same tokens."""
    path = save_ar(tmp_path / "AR_256_B.ckpt", official_ar["state_dict"])
    model = load_open_magvit2_gpt(path, n_head=official_ar["official_config"]["n_head"], grid=(4, 4))
    expected = tiny_ar_args(official_ar)
    assert model.args.hidden_dim == expected.hidden_dim == 96  # the official find_multiple(int(8 * 32 / 3), 32)
    assert dataclasses.replace(model.args, ffn_hidden=None, multiple_of=expected.multiple_of) == expected
    codes = join_codes((official_ar["pre"], official_ar["post"]), model.args.factorized_bits)
    with torch.no_grad():
        pre, post = model(codes, official_ar["labels"])
    torch.testing.assert_close(pre, official_ar["logits_pre"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(post, official_ar["logits_post"], atol=1e-4, rtol=1e-4)


def test_open_magvit2_ar_import_parity(tmp_path, official_ar):
    """Our GPT -> official names (inverse map) in the official container -> import -> identical logits."""
    torch.manual_seed(0)
    ours = perturb(GPT(tiny_ar_args(official_ar)), 5, 0.1)
    official_names = official_gpt_state(ours)
    assert sorted(official_names) == sorted(official_ar["state_dict"])  # the official module's names
    path = save_ar(tmp_path / "ar.ckpt", official_names, {
        "transformer.spatial_blocks.0.attention.kv_cache.k_cache": torch.zeros(1),  # inference buffer: ignored
    })
    model = load_open_magvit2_gpt(path, n_head=2, grid=(4, 4))
    codes, labels = torch.randint(0, 64, (2, 16)), torch.tensor([1, 10])
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(ours(codes, labels), model(codes, labels)))


def test_open_magvit2_ar_lists_layout_problems(tmp_path, official_ar):
    state = dict(official_ar["state_dict"])
    del state["head.1.weight"]
    state["spatial_blocks.0.attention.bias"] = torch.zeros(3)
    state["factorized_blocks.1.ffn_norm.weight"] = torch.ones(5)
    path = save_ar(tmp_path / "broken.ckpt", state, {"transformer.pos_emb": torch.zeros(2)})
    with pytest.raises(CheckpointLayoutError) as error:
        load_open_magvit2_gpt(path, n_head=2, grid=(4, 4))
    e = error.value
    assert e.missing == ["head.1.weight"]
    assert e.unexpected == ["pos_emb", "spatial_blocks.0.attention.bias"]
    assert e.mismatched == ["factorized_blocks.1.ffn_norm.weight (intra_blocks.1.ffn_norm.weight: checkpoint (5,) "
                            "vs model (32,))"]
    with pytest.raises(ValueError, match="pass n_head"):
        load_open_magvit2_gpt(save_ar(tmp_path / "ok.ckpt", official_ar["state_dict"]))


# ------------------------------------------------------------------------------------------ viz


def test_merge_map_colours_and_range():
    grid, size = (4, 4), (32, 32)
    groups = torch.tensor([0, 0, 1, 1, 0, 2, 2, 1, 3, 2, 4, 4, 3, 3, 4, 4])
    image = torch.rand(3, *size) * 2 - 1
    out = merge_map(image, groups, grid)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1

    layer, pixels = segment_layer(groups, grid, size), group_pixels(groups, grid, size)
    colours = []
    for g in range(5):
        found = layer.permute(1, 2, 0)[pixels == g].unique(dim=0)
        assert found.shape[0] == 1, f"group {g} has {found.shape[0]} colours"
        colours.append(found[0])
    assert torch.stack(colours).unique(dim=0).shape[0] == 5  # one distinct colour per group

    edge = boundaries(pixels)
    assert edge.any() and not edge.all()
    assert torch.allclose(out[:, edge], torch.tensor(LINE_COLOUR)[:, None].expand(3, int(edge.sum())))
    inside = ~edge
    blend = 0.5 * (image + 1) / 2 + 0.5 * layer
    assert torch.allclose(out[:, inside], blend[:, inside], atol=1e-6)

    many = torch.arange(256)  # no merging: 256 groups, 256 distinct colours
    assert segment_layer(many, (16, 16), (16, 16)).reshape(3, -1).T.unique(dim=0).shape[0] == 256

    strip = merge_strip([image, image, image], [groups, torch.arange(16), groups // 2], grid, gap=2)
    assert strip.shape == (3, 32, 3 * 32 + 2 * 2) and 0 <= strip.min() and strip.max() <= 1


# ------------------------------------------------------------------------------------------ entries


def run_module(module: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def write_inputs(folder: Path) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(folder / "wide.png")
    Image.fromarray(rng.integers(0, 256, (48, 48, 4), dtype=np.uint8), "RGBA").save(folder / "alpha.png")
    (folder / "notes.txt").write_text("not an image")


@pytest.mark.slow
def test_reconstruct_entry(run_dir, tmp_path):
    folder, out = tmp_path / "inputs", tmp_path / "out"
    write_inputs(folder)
    proc = run_module("mergevq.entries.reconstruct", f"ckpt={run_dir}", f"input={folder}", "keep=[16,64]",
                      f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("wide", "alpha"):
        for kind in ("recon", "mergemap"):
            with Image.open(out / f"{name}_{kind}.png") as png:
                # 3 panels (input, K=16, K=64) of 32 px upscaled x4, 2 px gaps, a 16 px caption bar
                assert png.size == (3 * 128 + 2 * 2, 128 + 16) and png.mode == "RGB"
    summary = json.loads((out / "reconstruct.json").read_text())
    assert summary["keeps"] == ["16", "64"] and len(summary["images"]) == 2
    assert all(np.isfinite(v) for v in summary["mean_psnr"].values())
    assert "reconstruct" in proc.stderr  # the progress bar (folder input)



def test_reconstruct_input_errors(run_dir, tmp_path, capsys):
    """A missing input path or a folder without images: one 'error:' line and exit status 2."""
    from hydra import compose, initialize_config_dir

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    for name, message in (("nope", "no such file or directory"), ("empty", "contains no image files")):
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("reconstruct", [f"ckpt={run_dir}", f"input={tmp_path / name}", f"run_dir={tmp_path / 'out'}"])
        with pytest.raises(SystemExit) as exit_:
            reconstruct_task(cfg)
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert exit_.value.code == 2 and len(errors) == 1 and message in errors[0] and name in errors[0]


ENTRIES = ("train_tokenizer", "train_ar", "evaluate", "sample", "tokenize", "probe", "reconstruct")


def defaults_groups(entry: str) -> list[str]:
    """Config groups named in conf/<entry>.yaml's defaults list."""
    defaults = yaml.safe_load((ROOT / "conf" / f"{entry}.yaml").read_text()).get("defaults", [])
    groups = []
    for item in defaults:
        if isinstance(item, dict):
            (key,) = item
            groups.append(key.split()[-1].split("@")[0].lstrip("/"))
    return groups


@pytest.mark.slow
def test_entries_help_lists_config_groups():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = {entry: subprocess.Popen([sys.executable, "-m", entry_module(entry), "--help"], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for entry in ENTRIES}
    outputs = {}
    for entry, proc in procs.items():
        outputs[entry], stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{entry}: {stderr[-2000:]}"
        assert "== Configuration groups ==" in outputs[entry], entry
        listed = {line.split(":")[0] for line in outputs[entry].splitlines() if ":" in line}
        assert set(defaults_groups(entry)) <= listed, (entry, defaults_groups(entry))
    assert "input=<image or folder>" in outputs["reconstruct"]  # its hydra.help header


def test_export_generator_run(tmp_path):
    """A MergeAR run (code cache + gpt weights) -> hub folder -> the same logits."""
    writer = CodeCacheWriter(tmp_path / "codes", shard_size=8, meta={"grid": [4, 4], "codebook_bits": 18})
    for keep in (4, 16):
        groups = torch.arange(16).repeat(2, 1) * keep // 16
        writer.add(torch.randint(0, 2**18, (2, keep)), groups, torch.full((2,), keep), torch.tensor([0, 1]),
                   torch.zeros(2, dtype=torch.bool))
    writer.close()
    config = {"codes": str(tmp_path / "codes"), "num_classes": 10, "seed": 0,
              "ar": {"size": "tiny", "factorized_bits": [6, 12], "n_layer": 1, "intra_layers": 1},
              "generator": {"kind": "mergear", "window": 4, "keep_options": None, "duplicate_rule": "adjacent"}}
    run = tmp_path / "ar_run"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "eval_card.md").write_text("# Evaluation card\n\n| metric | value |\n|---|---|\n| gfid | 3.1416 |\n")
    cache = CodeCache(config["codes"])
    gpt, mergear = build_generator(config, {**cache.meta, **cache_contents(cache)})
    save_checkpoint(run / "checkpoints", step=2, models={"gpt": perturb(gpt, 6, 0.1)}, optimizers={},
                    extra={"step": 2}, metadata={"config": yaml.safe_dump(config)})
    out = export_run(run, tmp_path / "hub")
    loaded = from_pretrained(out)
    reference, ref_mergear, _, _, _ = load_trained_generator(run)
    assert isinstance(loaded, HubGenerator) and loaded.mergear == ref_mergear == mergear
    assert loaded.mergear.keep_options == (4, 16) and "3.1416" in (out / "README.md").read_text()
    codes, labels, keep = torch.randint(0, 2**18, (2, 16)), torch.tensor([0, 1]), torch.tensor([0, 1])
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(reference(codes, labels, keep), loaded.model(codes, labels, keep)))

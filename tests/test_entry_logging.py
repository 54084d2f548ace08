"""Logging of the stand-alone entries (sample, evaluate, reconstruct) through the ``logger`` group,
the per-class sample grids and the sampling progress bar. Every entry runs in-process on a tiny
tokenizer run and an untrained one-layer MergeAR written without training."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import ROOT
from helpers.models import TINY_PHOTOS, write_tokenizer_run
from helpers.wandb import read_offline_wandb
from hydra import compose, initialize_config_dir
from PIL import Image

from mergevq.data.code_cache import CodeCache, CodeCacheWriter, cache_contents
from mergevq.entries.evaluate import task as evaluate_task
from mergevq.entries.reconstruct import task as reconstruct_task
from mergevq.entries.sample import task as sample_task
from mergevq.entries.sampling import class_grids
from mergevq.models.generator_factory import build_generator
from mergevq.runs.checkpoint import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one intra-op thread (see conftest)

CLASSES, PER_CLASS, SIZE = [0, 1, 2], 2, 32  # the tiny tokenizer: 32 px images, an 8 x 8 grid


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory) -> Path:
    return write_tokenizer_run(tmp_path_factory.mktemp("tok_run"), TINY_PHOTOS)


@pytest.fixture(scope="module")
def generator_run(tmp_path_factory, tokenizer_run) -> Path:
    """An untrained one-layer MergeAR run over a hand-written code cache (K in {16, 64}, 3 classes)."""
    root = tmp_path_factory.mktemp("ar_run")
    meta = {"grid": [8, 8], "codebook_bits": 18, "tokenizer": {"checkpoint": str(tokenizer_run), "weights": "ema"}}
    writer = CodeCacheWriter(root / "codes", shard_size=8, meta=meta)
    for keep in (16, 64):
        groups = (torch.arange(64) * keep // 64).repeat(3, 1)
        writer.add(torch.randint(0, 2**18, (3, keep)), groups, torch.full((3,), keep), torch.tensor(CLASSES),
                   torch.zeros(3, dtype=torch.bool))
    writer.close()
    config = {"codes": str(root / "codes"), "num_classes": 10, "seed": 0,
              "ar": {"size": "tiny", "factorized_bits": [6, 12], "n_layer": 1, "intra_layers": 1},
              "generator": {"kind": "mergear", "window": 4, "keep_options": None, "duplicate_rule": "adjacent"}}
    cache = CodeCache(config["codes"])
    gpt, _ = build_generator(config, {**cache.meta, **cache_contents(cache)})
    save_checkpoint(root / "run" / "checkpoints", step=1, models={"gpt": gpt}, optimizers={}, extra={"step": 1},
                    metadata={"config": yaml.safe_dump(config)})
    return root / "run"




def run_entry(entry: str, task, run_dir: Path, *overrides: str):
    """The entry's task on its composed config (run dir pinned, no Hydra run) -> its return value."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(entry, overrides=[*overrides, f"run_dir='{run_dir}'"])
    return task(cfg)


def image_index(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "images" / "index.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def table(run_dir: Path, key: str) -> list[dict[str, str]]:
    with open(run_dir / "tables" / f"{key.replace('/', '_')}_00000000.csv", newline="") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------------ sample


def test_class_grids_rows():
    images = torch.rand(6, 3, 4, 5)
    labels = np.array([1, 0, 1, 2, 0, 1])
    grids = class_grids(images, labels)
    assert list(grids) == [0, 1, 2]
    assert {c: tuple(g.shape) for c, g in grids.items()} == {0: (3, 4, 10), 1: (3, 4, 15), 2: (3, 4, 5)}
    for c, grid in grids.items():
        for i, sample in enumerate(images[torch.from_numpy(labels == c)]):
            assert torch.equal(grid[..., i * 5 : (i + 1) * 5], sample)  # the class's i-th sample, in order


SAMPLE_ARGS = (f"per_class={PER_CLASS}", "batch_size=4", "cfg_scale=1.0", "npz=false")


@pytest.mark.slow
def test_sample_logs_to_csv(generator_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MERGEVQ_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sample"
    gfid = run_entry("sample", sample_task, out, f"ckpt={generator_run}", *SAMPLE_ARGS, "logger=csv",
                     "evaluate.enabled=true", "evaluate.features=random", "evaluate.num_reference=8")
    err = capsys.readouterr().err
    assert "sample" in err and "img" in err and "tok_s=" in err  # the progress bar with its postfix

    index = image_index(out)
    rows = {row["key"]: row for row in index}
    assert [row["key"] for row in index[: len(CLASSES)]] == [f"samples/class_{c:04d}" for c in CLASSES]
    for c in CLASSES:
        row = rows[f"samples/class_{c:04d}"]
        assert row["caption"].startswith(f"class {c};") and "cfg_scale=1.0" in row["caption"]
        with Image.open(out / "images" / row["file"]) as png:
            assert png.size == (PER_CLASS * SIZE, SIZE)  # that class's samples in one row
    with Image.open(out / "images" / rows["samples/grid"]["file"]) as png, Image.open(out / "samples.png") as grid:
        assert png.size == grid.size

    (stats,) = table(out, "samples/stats")
    assert float(stats["tokens_per_s"]) > 0 and int(stats["peak_kv_cache_entries"]) > 0
    assert stats["generator"] == "mergear" and stats["keep"] == "64" and stats["cfg_scale"] == "1.0"
    assert int(stats["num_images"]) == len(CLASSES) * PER_CLASS

    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval/gfid"] == pytest.approx(gfid) and "eval/precision" in summary and "eval/recall" in summary
    card = json.loads((out / "eval_card.json").read_text())  # no eval.inception_weights: the card says why
    assert card["metrics"]["inception_score"] is None and card["inception"]["computed"] is False
    assert "eval.inception_weights" in card["inception"]["reason"]
    assert any(w.startswith("IS and sFID not computed") for w in card["warnings"])
    with open(out / "metrics.csv", newline="") as handle:
        assert float(next(csv.DictReader(handle))["eval/gfid"]) == pytest.approx(gfid)


@pytest.mark.slow
def test_sample_card_with_inception_weights(generator_run, tmp_path, monkeypatch):
    """eval.inception_weights: IS and sFID in the card, with the weights' hash; a random network of the
    same architecture is labelled untrained."""
    from mergevq.eval.inception import save_untrained_inception
    from mergevq.runs.card import sha256_file

    monkeypatch.setenv("MERGEVQ_CACHE", str(tmp_path / "cache"))
    weights = save_untrained_inception(tmp_path / "untrained_inception.pth")
    args = (f"ckpt={generator_run}", *SAMPLE_ARGS, "progress=false", "evaluate.enabled=true", "evaluate.features=random",
            "evaluate.num_reference=8")
    with pytest.raises(FileNotFoundError, match="eval.inception_weights"):  # before any sampling
        run_entry("sample", sample_task, tmp_path / "missing", *args, f"eval.inception_weights={tmp_path / 'nope.pth'}")
    assert not (tmp_path / "missing" / "samples.png").exists()
    run_entry("sample", sample_task, tmp_path / "out", *args, f"eval.inception_weights={weights}")
    card = json.loads((tmp_path / "out" / "eval_card.json").read_text())
    metrics, section = card["metrics"], card["inception"]
    assert 1.0 <= metrics["inception_score"] < 1008 and metrics["inception_score_std"] >= 0
    assert metrics["sfid"] >= 0 and np.isfinite(metrics["sfid"])
    assert section["computed"] is True and section["trained"] is False
    assert section["weights_sha256"] == sha256_file(weights)
    assert any("UNTRAINED InceptionV3" in w for w in card["warnings"])
    assert "inception_score" in (tmp_path / "out" / "eval_card.md").read_text()


@pytest.mark.slow
def test_sample_logs_to_wandb(generator_run, tmp_path, wandb_offline, capsys):
    out = tmp_path / "sample"
    run_entry("sample", sample_task, out, f"ckpt={generator_run}", *SAMPLE_ARGS, "logger=wandb", "progress=false")
    assert "tok_s=" not in capsys.readouterr().err

    run = read_offline_wandb(out)
    summary = run["summary"]
    for c in CLASSES:
        image = summary[f"samples/class_{c:04d}"]
        assert image["_type"] == "image-file" and (image["width"], image["height"]) == (PER_CLASS * SIZE, SIZE)
        assert image["caption"].startswith(f"class {c};")
    assert summary["samples/grid"]["_type"] == "image-file"
    assert summary["samples/stats"]["_type"] == "table-file" and summary["samples/stats"]["nrows"] == 1
    assert summary["samples/tokens_per_s"] > 0
    assert run["config"]["task"] == "sample" and run["config"]["per_class"] == PER_CLASS
    assert not (out / "images").exists()  # nothing of the CSV logger


# ------------------------------------------------------------------------------------------ evaluate, reconstruct


def test_evaluate_logs_per_k_table(tokenizer_run, tmp_path):
    out = tmp_path / "eval"
    run_entry("evaluate", evaluate_task, out, f"ckpt={tokenizer_run}", "keeps=[16,64]", "num_images=8",
              "batch_size=8", "features=random", "lpips.enabled=false", f"cache_dir='{tmp_path / 'features'}'",
              "logger=csv")
    card = json.loads((out / "eval_card.json").read_text())
    rows = table(out, "eval/per_k")
    assert [row["keep"] for row in rows] == ["16", "64"]
    assert list(rows[0])[:4] == ["keep", "rfid", "psnr", "ssim"] and "code_usage" in rows[0]
    for row in rows:
        assert float(row["rfid"]) == pytest.approx(card["metrics"][row["keep"]]["rfid"])
    assert [row["key"] for row in image_index(out)] == ["eval/per_k_plot"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval/k64/psnr"] == pytest.approx(card["metrics"]["64"]["psnr"])


def test_reconstruct_logs_pictures(tokenizer_run, tmp_path):
    folder, out = tmp_path / "inputs", tmp_path / "out"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    run_entry("reconstruct", reconstruct_task, out, f"ckpt={tokenizer_run}", f"input='{folder}'", "keep=[16,64]",
              "progress=false", "logger=csv")
    index = image_index(out)
    assert [(row["key"], row["step"]) for row in index] == [
        ("reconstruct/reconstructions", "0"), ("reconstruct/merge_maps", "0"),
        ("reconstruct/reconstructions", "1"), ("reconstruct/merge_maps", "1"),
    ]
    assert index[0]["caption"].startswith("a: input, then K=16") and index[2]["caption"].startswith("b:")
    with Image.open(out / "images" / index[1]["file"]) as logged, Image.open(out / "a_mergemap.png") as written:
        assert np.array_equal(np.asarray(logged), np.asarray(written))
    summary = json.loads((out / "summary.json").read_text())
    psnr = json.loads((out / "reconstruct.json").read_text())["mean_psnr"]
    assert summary == {f"reconstruct/k{k}/mean_psnr": pytest.approx(v) for k, v in psnr.items()}

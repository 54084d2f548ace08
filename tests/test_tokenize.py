"""Stage-II pre-tokenization: the code cache format and the ``mergevq.entries.pretokenize`` entry."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT
from helpers.models import write_tokenizer_run
from safetensors.torch import load_file

from mergevq.data import build_dataset
from mergevq.data.code_cache import (
    CodeCache,
    CodeCacheWriter,
    KeepPerSample,
    is_canonical,
    merge_rank_indexes,
    training_items,
)
from mergevq.entries.pretokenize import check_out_dir
from mergevq.runs.card import sha256_file
from mergevq.runs.restore import load_trained_tokenizer

DATA = {
    "name": "photos", "root": None, "cache_dir": None, "size": 32, "align_size": 28,
    "train_kwargs": {"num_samples": 24, "crop_size": 64, "seed": 0},
    "val_kwargs": {"num_samples": 16, "crop_size": 64, "seed": 1},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tokenizer run with distinct raw and EMA weights (no training)."""
    return write_tokenizer_run(tmp_path_factory.mktemp("tok_run"), DATA)


def fake_batch(batch: int, keep: int, positions: int = 16, seed: int = 0):
    """Random canonical groups [B, L] with `keep` groups and codes [B, keep]."""
    g = torch.Generator().manual_seed(seed)
    groups = torch.stack([torch.cat([torch.arange(keep), torch.randint(0, keep, (positions - keep,), generator=g)])
                          .sort().values for _ in range(batch)])
    codes = torch.randint(0, 2**18, (batch, keep), generator=g)
    return codes, groups


def test_writer_reader_round_trip(tmp_path):
    meta = {"grid": [4, 4], "codebook_bits": 18}
    writer = CodeCacheWriter(tmp_path, shard_size=5, meta=meta)
    expected = []
    for call, (batch, keep) in enumerate([(4, 9), (3, 16), (5, 4)]):  # K differs per call, 12 items
        codes, groups = fake_batch(batch, keep, seed=call)
        labels, flip = torch.arange(batch) + 10 * call, torch.arange(batch) % 2 == 1
        writer.add(codes, groups, torch.full((batch,), keep), labels, flip)
        for b in range(batch):
            expected.append((codes[b].gather(0, groups[b]), groups[b], keep, int(labels[b]), bool(flip[b])))
    assert not (tmp_path / "index.json").exists()  # the index is written last
    writer.close()

    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["index.json", "shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"]
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["num_items"] == 12 and index["num_positions"] == 16 and index["grid"] == [4, 4]
    assert [s["count"] for s in index["shards"]] == [5, 5, 2] and index["codebook_bits"] == 18
    assert index["format_version"] == 1 and "created" in index
    shard = load_file(tmp_path / "shard_00002.safetensors")
    assert shard["grid_codes"].dtype == torch.int32 and shard["groups"].dtype == torch.int16
    assert shard["grid_codes"].shape == (2, 16) and shard["flip"].dtype == torch.bool

    cache = CodeCache(tmp_path)
    assert len(cache) == 12 and cache.meta["num_items"] == 12
    for i, (grid_codes, groups, keep, label, flip) in enumerate(expected):
        item = cache[i]
        assert item["grid_codes"].dtype == torch.int64 and item["grid_codes"].shape == (16,)
        assert torch.equal(item["grid_codes"], grid_codes) and torch.equal(item["groups"], groups)
        assert item["keep"].shape == () and int(item["keep"]) == keep and int(item["label"]) == label
        assert item["flip"].dtype == torch.bool and bool(item["flip"]) == flip and int(item["index"]) == i
    assert torch.equal(cache[-1]["grid_codes"], expected[-1][0])
    with pytest.raises(IndexError):
        cache[12]
    loader = torch.utils.data.DataLoader(cache, batch_size=5, shuffle=True)
    assert sum(batch["grid_codes"].shape[0] for batch in loader) == 12


def test_items_at_chosen_keeps_only(tmp_path):
    """codes_keeps: the raster baseline trains on the K = L items of a cache that also holds merged ones."""
    writer = CodeCacheWriter(tmp_path, shard_size=4, meta={"grid": [4, 4], "keeps_per_image": 3})
    for keep in (4, 9, 16):  # every image at three K
        codes, groups = fake_batch(5, keep, seed=keep)
        writer.add(codes, groups, torch.full((5,), keep), torch.arange(5), torch.zeros(5, dtype=torch.bool), torch.arange(5))
    writer.close()
    cache = CodeCache(tmp_path)
    assert isinstance(training_items(cache), KeepPerSample) and len(training_items(cache)) == 5
    for keeps, expected in (([16], {16}), ([4, 9], {4, 9})):
        items = training_items(cache, keeps)
        torch.manual_seed(0)
        drawn = {int(items[i]["keep"]) for _ in range(8) for i in range(len(items))}
        assert len(items) == 5 and drawn == expected
    with pytest.raises(ValueError, match=r"no item at K in \[25\].*\[4, 9, 16\]"):
        training_items(cache, [25])


def test_writer_rejects_non_canonical_groups(tmp_path):
    writer = CodeCacheWriter(tmp_path, shard_size=5, meta={"grid": [4, 4]})
    codes, groups = fake_batch(2, 4)
    with pytest.raises(ValueError, match="canonical"):
        writer.add(codes, 3 - groups, torch.full((2,), 4), torch.zeros(2), torch.zeros(2))
    assert is_canonical(groups, torch.full((2,), 4)).all()
    assert not is_canonical(groups, torch.full((2,), 5)).any()  # group 4 unused


def test_rank_indexes_merge(tmp_path):
    for rank, batch in ((0, 3), (1, 2)):
        writer = CodeCacheWriter(tmp_path, shard_size=2, meta={"grid": [4, 4]}, rank=rank)
        codes, groups = fake_batch(batch, 4, seed=rank)
        writer.add(codes, groups, torch.full((batch,), 4), torch.zeros(batch), torch.zeros(batch),
                   torch.arange(rank, 2 * batch, 2))
        writer.close()
    merge_rank_indexes(tmp_path, [0, 1])
    assert not list(tmp_path.glob("index_r*.json"))
    cache = CodeCache(tmp_path)
    assert [s["file"] for s in cache.meta["shards"]] == [
        "shard_r0_00000.safetensors", "shard_r0_00001.safetensors", "shard_r1_00000.safetensors"]
    assert sorted(int(cache[i]["index"]) for i in range(len(cache))) == [0, 1, 2, 3, 4]


def test_missing_or_corrupt_index_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "index.json")) as error:
        CodeCache(tmp_path)
    assert "python -m mergevq.entries.pretokenize" in str(error.value)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="index.json"):
        CodeCache(tmp_path)


def run_tokenize(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MERGEVQ_RUN_DIR=str(tmp_path / "hydra_run"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "mergevq.entries.pretokenize", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_tokenize_entry(run_dir, tmp_path):
    out = tmp_path / "codes"
    args = (f"ckpt={run_dir}", f"out={out}", "num_images=12", "keep_range=[16,64]", "flip=true",
            "batch_size=5", "shard_size=10")
    proc = run_tokenize(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]

    cache = CodeCache(out)
    meta = cache.meta
    assert len(cache) == 24 and [s["count"] for s in meta["shards"]] == [10, 10, 4]
    checkpoint = run_dir / "checkpoints" / "step_00000001"
    assert meta["tokenizer"]["weights"] == "ema" and meta["tokenizer"]["weights_file"] == "tokenizer_ema.safetensors"
    assert meta["tokenizer"]["weights_sha256"] == sha256_file(checkpoint / "tokenizer_ema.safetensors")
    assert Path(meta["tokenizer"]["checkpoint"]) == checkpoint.resolve()
    assert meta["grid"] == [8, 8] and meta["num_positions"] == 64 and meta["codebook_bits"] == 18
    assert meta["keep"]["mode"] == "range" and meta["keep"]["choices"] == [16, 25, 36, 49, 64]
    assert meta["flip"] is True and meta["data"]["name"] == "photos" and meta["data"]["num_images"] == 12

    items = [cache[i] for i in range(len(cache))]
    assert sorted((int(it["index"]), bool(it["flip"])) for it in items) == [(i, f) for i in range(12) for f in (0, 1)]
    keeps = {int(it["keep"]) for it in items}
    assert keeps <= {16, 25, 36, 49, 64} and len(keeps) > 1
    for it in items:
        groups, keep = it["groups"], int(it["keep"])
        assert math.isqrt(keep) ** 2 == keep and int(groups.max()) == keep - 1
        assert is_canonical(groups[None], torch.tensor([keep])).all()
        firsts = torch.tensor([int((groups == k).nonzero()[0]) for k in range(keep)])
        assert (firsts[1:] > firsts[:-1]).all()

    # Re-encode with the EMA weights: every item's code grid and groups at its recorded K.
    ema, _, _ = load_trained_tokenizer(run_dir, "ema")
    raw, _, _ = load_trained_tokenizer(run_dir, "raw")
    dataset = build_dataset("photos", "train", size=32, align_size=28, views=("image",), augment=False,
                            **DATA["train_kwargs"])
    differs_from_raw = False
    for it in items:
        image = dataset[int(it["index"])]["image"][None]
        if bool(it["flip"]):
            image = image.flip(-1)
        assert int(it["label"]) == int(dataset[int(it["index"])]["label"])
        tokens = ema.encode(image, keep=int(it["keep"]))
        assert torch.equal(tokens.code_grid()[0], it["grid_codes"]), (int(it["index"]), bool(it["flip"]))
        assert torch.equal(tokens.groups[0], it["groups"])
        differs_from_raw |= not torch.equal(raw.encode(image, keep=int(it["keep"])).code_grid()[0], it["grid_codes"])
    assert differs_from_raw  # the raw weights would give other codes

    # Same seed, same cache; an existing cache is not overwritten silently.
    with pytest.raises(ValueError, match="overwrite=true"):
        check_out_dir(out, overwrite=False)
    again = run_tokenize(tmp_path, *args, "overwrite=true")
    assert again.returncode == 0, again.stderr[-3000:]
    redo = CodeCache(out)
    assert all(torch.equal(redo[i]["grid_codes"], items[i]["grid_codes"]) for i in range(len(redo)))


def test_one_stem_pass_for_several_keeps_gives_the_same_tokens(run_dir):
    """pretokenize keeps_per_image=n runs the stem once per batch: the tokens equal n separate encodes."""
    from mergevq.entries.pretokenize import encode_batch

    tokenizer, _, _ = load_trained_tokenizer(run_dir, "ema")
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    keeps = torch.tensor([16, 64, 25, 16, 36, 64])
    shared = encode_batch(tokenizer, images, keeps, tokenizer.stem_tokens(images))
    separate = encode_batch(tokenizer, images, keeps)
    assert [rows.tolist() for rows, _ in shared] == [rows.tolist() for rows, _ in separate] and len(shared) == 4
    for (_, a), (_, b) in zip(shared, separate):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.groups, b.groups)
        torch.testing.assert_close(a.cls, b.cls)  # the stem ran on other batch sizes: equal to rounding

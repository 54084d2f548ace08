"""Bad inputs and faults a new user meets, each held to its behaviour: exit status 2 and one
``error:`` line naming the key or file (no traceback unless HYDRA_FULL_ERROR=1), and for the cases
that used to lose data or give a wrong result, the data left intact and the result honest.

Every case runs in-process through the entry's task wrapped as ``run_entry`` wraps it
(``one_line_errors``), on tiny runs written without training where possible.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import pytest
import torch
import yaml
from helpers.entries import run_task
from helpers.models import TINY_PHOTOS, write_tokenizer_run
from helpers.runs import BASE as TOKENIZER_BASE
from helpers.runs import train_rows
from hydra import compose, initialize_config_dir
from PIL import Image

from mergevq.data.code_cache import CodeCacheWriter
from mergevq.entries import evaluate, sample, train_ar, train_tokenizer
from mergevq.entries.cli import CONF_DIR, one_line_errors
from mergevq.interop.hub import from_pretrained, save_pretrained
from mergevq.runs.checkpoint import RUN_FORMAT as FORMAT
from mergevq.runs.checkpoint import list_checkpoints, save_checkpoint
from mergevq.runs.runlock import RunLock

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one intra-op thread (see conftest)

# 8 images = 2 steps per epoch, checkpoints at steps 2 and 3.
TOKENIZER = (*TOKENIZER_BASE, "variant=r", "loss.perceptual_weight=0", "data.train_kwargs.num_samples=8",
             "train.max_steps=3", "train.ckpt_every=2", "train.val_every=1000", "train.val_keeps=[36]")
AR = ("backend=cpu", "logger=csv", "num_classes=10", "train.max_steps=2", "train.lr_schedule.warmup_steps=1",
      "train.global_batch_size=4", "train.progress=false", "train.log_every=1", "ar=tiny")
ENTRIES = {"train_tokenizer": (train_tokenizer.task, TOKENIZER), "train_ar": (train_ar.task, AR),
           "sample": (sample.task, ("progress=false",)),
           "evaluate": (evaluate.task, ("features=random", "lpips.enabled=false", "plot=false"))}


def run(entry: str, run_dir: Path, *overrides: str):
    """The entry's task on the composed config, set up as Hydra's run_job does, errors as run_entry shows them."""
    task, base = ENTRIES[entry]
    return run_task(one_line_errors(task), entry, [*base, *overrides, f"run_dir='{run_dir}'"])


def one_line_error(capsys, entry: str, run_dir: Path, *overrides: str) -> str:
    """Run and return the single stderr line of a refused run (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(entry, run_dir, *overrides)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("failures")


@pytest.fixture(scope="module")
def tokenizer_run(work) -> Path:
    return write_tokenizer_run(work / "tokenizer_run", TINY_PHOTOS)


@pytest.fixture(scope="module")
def codes(work, tokenizer_run) -> Path:
    """A 16-item code cache (4 x 4 grid, K in {9, 16}, labels 0..9) written without a tokenizer pass."""
    out = work / "codes"
    meta = {"grid": [4, 4], "codebook_bits": 18, "keep": {"choices": [9, 16]},
            "tokenizer": {"checkpoint": str(tokenizer_run), "weights": "ema"}}
    writer = CodeCacheWriter(out, meta=meta)
    g = torch.Generator().manual_seed(0)
    for keep in (9, 16):
        groups = torch.stack([torch.cat([torch.arange(keep), torch.randint(0, keep, (16 - keep,), generator=g)]).sort().values
                              for _ in range(8)])
        labels = torch.arange(8) + (2 if keep == 16 else 0)
        writer.add(torch.randint(0, 2**18, (8, keep), generator=g), groups, torch.full((8,), keep), labels,
                   torch.zeros(8, dtype=torch.bool))
    writer.close()
    return out


def generator_run(root: Path, codes_value: str) -> Path:
    """A stage-II checkpoint (an untrained tiny MergeAR) whose stored config names ``codes_value``."""
    from mergevq.data.code_cache import CodeCache, cache_contents
    from mergevq.models.generator_factory import build_generator

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train_ar", overrides=[*AR, f"codes='{codes_value}'", "run_dir=unused"])
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(cfg, resolve=True)
    cache = CodeCache(Path(codes_value) if Path(codes_value).is_absolute() else root.parent / codes_value)
    model, _ = build_generator(config, {**cache.meta, **cache_contents(cache)})
    save_checkpoint(root / "checkpoints", 1, {"gpt": model}, {}, {"step": 1},
                    {"format": FORMAT, "config": yaml.safe_dump(config)})
    return root


@pytest.fixture(scope="module")
def ar_run(work, codes) -> Path:
    return generator_run(work / "ar_run", str(codes))


def image_folder(root: Path, readable: int, unreadable: int) -> Path:
    """root/cls/<i>.png: ``readable`` 40-px images and ``unreadable`` files that are not images."""
    (root / "cls").mkdir(parents=True)
    for i in range(readable):
        Image.new("RGB", (40, 40), (30 * i % 255, 80, 160)).save(root / "cls" / f"{i}.png")
    for i in range(unreadable):
        (root / "cls" / f"bad{i}.png").write_bytes(b"not a png")
    return root


# --------------------------------------------------------------------------- the table: one-line refusals

# (entry, overrides; "{x}" filled from the fixtures below) -> words the error line must hold
CASES = {
    "max_steps not an int": ("train_tokenizer", ["train.max_steps=abc"], ["train.max_steps='abc'", "integer >= 1"]),
    "lr not a number": ("train_tokenizer", ["train.lr=fast"], ["train.lr='fast'", "number > 0"]),
    "negative batch": ("train_tokenizer", ["train.global_batch_size=-4"], ["train.global_batch_size=-4"]),
    "warmup beyond max_steps": ("train_tokenizer", ["train.lr_schedule.warmup_steps=10"], ["warmup_steps=10", "train.max_steps=3"]),
    "data.root a file": ("train_tokenizer", ["data.name=folder", "data.root='{file}'"], ["data.root=", "is a file"]),
    "empty folder": ("train_tokenizer", ["data.name=folder", "data.root='{empty}'"], ["data.root=", "no image files"]),
    "codebook size": ("train_tokenizer", ["quantizer.codebook_size=1000"], ["quantizer.codebook_size=1000", "power of two"]),
    "max_bad_steps 0": ("train_tokenizer", ["train.max_bad_steps=0"], ["train.max_bad_steps=0"]),
    "resume missing dir": ("train_tokenizer", ["resume='{missing}'"], ["resume=", "resume=auto|never|<dir>"]),
    "resume a generator run": ("train_tokenizer", ["resume='{ar_ckpt}'"], ["is a checkpoint of train_ar", "resume=never"]),
    "standalone recovery, no tokenizer": ("train_tokenizer", ["recovery.standalone=true"], ["recovery.tokenizer=<", "none is given"]),
    "standalone recovery, missing tokenizer": ("train_tokenizer", ["recovery.standalone=true", "recovery.tokenizer='{missing}'"],
                                               ["recovery.tokenizer={missing} does not exist", "set recovery.tokenizer=<"]),
    "standalone recovery on a generator run": ("train_tokenizer", ["recovery.standalone=true", "recovery.tokenizer='{ar}'"],
                                               ["recovery.tokenizer=", "stage-II generator run"]),
    "standalone recovery, other data.size": ("train_tokenizer", ["recovery.standalone=true", "recovery.tokenizer='{tok}'", "data.size=64"],
                                             ["data.size=64", "set data.size=32"]),
    "num_classes too small": ("train_ar", ["codes='{codes}'", "num_classes=9"], ["class ids [9]", "num_classes=10"]),
    "train_ar max_steps": ("train_ar", ["codes='{codes}'", "train.max_steps=abc"], ["train.max_steps='abc'"]),
    "train_ar no cache": ("train_ar", ["codes='{missing}'"], ["has no index.json", "mergevq.entries.pretokenize"]),
    "sample class = num_classes": ("sample", ["ckpt='{ar}'", "classes=[10]"], ["ids [10]", "null class"]),
    "sample negative class": ("sample", ["ckpt='{ar}'", "classes=[-1]"], ["classes=[-1]", "integer >= 0"]),
    "sample keep not an option": ("sample", ["ckpt='{ar}'", "keep=30"], ["keep=30", "[9, 16]"]),
    "sample cfg_scale < 0": ("sample", ["ckpt='{ar}'", "cfg_scale=-1"], ["cfg_scale=-1"]),
    "sample temperature < 0": ("sample", ["ckpt='{ar}'", "temperature=-1"], ["temperature=-1"]),
    "sample top_k < 0": ("sample", ["ckpt='{ar}'", "top_k=-1"], ["top_k=-1"]),
    "sample per_class 0": ("sample", ["ckpt='{ar}'", "per_class=0"], ["per_class=0"]),
    "sample batch_size 0": ("sample", ["ckpt='{ar}'", "batch_size=0"], ["batch_size=0"]),
    "sample missing ckpt": ("sample", ["ckpt='{missing}'"], ["{missing}", "does not exist"]),
    "sample a tokenizer run": ("sample", ["ckpt='{tok}'"], ["stage-I tokenizer run", "sample takes a stage-II"]),
    "sample relative codes": ("sample", ["ckpt='{ar_rel}'"], ["stored codes=codes", "is not at"]),
    "evaluate unreachable keep": ("evaluate", ["ckpt='{tok}'", "keeps=[3]"], ["keeps=[3]"]),
    "evaluate a generator run": ("evaluate", ["ckpt='{ar}'"], ["stage-II generator run", "evaluate takes a stage-I"]),
    "evaluate missing ckpt": ("evaluate", ["ckpt='{missing}'"], ["no checkpoint under", "does not exist"]),
    "evaluate data.root a file": ("evaluate", ["ckpt='{tok}'", "data.name=folder", "data.root='{file}'"], ["is a file"]),
}


@pytest.fixture(scope="module")
def places(work, tokenizer_run, ar_run, codes) -> dict[str, str]:
    (work / "a_file").write_text("x")
    (work / "empty" / "cls").mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(work)  # the stored relative path resolves from here at write time only
    try:
        relative = generator_run(work / "ar_rel", "codes")
    finally:
        os.chdir(cwd)
    return {"file": str(work / "a_file"), "empty": str(work / "empty"), "missing": str(work / "missing"),
            "codes": str(codes), "ar": str(ar_run), "tok": str(tokenizer_run), "ar_rel": str(relative),
            "ar_ckpt": str(list_checkpoints(ar_run / "checkpoints")[-1])}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, places, case):
    entry, overrides, words = CASES[case]
    line = one_line_error(capsys, entry, tmp_path / "run", *(o.format(**places) for o in overrides))
    missing = [w for w in (w.format(**places) for w in words) if w not in line]
    assert not missing, line
    assert not (tmp_path / "run" / "config.yaml").exists() and not list(tmp_path.glob("run/checkpoints/step_*"))


def test_full_error_shows_the_traceback(tmp_path, monkeypatch, places):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    from mergevq.entries.config_check import ConfigError

    with pytest.raises(ConfigError, match="per_class=0"):
        run("sample", tmp_path / "run", f"ckpt='{places['ar']}'", "per_class=0")


# ------------------------------------------------------------------------- losses that must not happen


def test_second_writer_is_refused_and_a_stale_lock_is_taken_over(tmp_path, capsys, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = RunLock(run_dir)
    holder.acquire()  # another live run (this process, another open file: flock excludes it)
    line = one_line_error(capsys, "train_tokenizer", run_dir, "train.max_steps=1")
    assert f"pid {os.getpid()}" in line and "in use by another run" in line and str(run_dir) in line
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.lock"]  # nothing written by the refused run
    holder.release()

    (run_dir / "run.lock").write_text("pid 999999 host gone\n")  # left by a killed run: no flock on it
    with caplog.at_level(logging.WARNING):
        run("train_tokenizer", run_dir, "train.max_steps=1")
    assert any("stale lock" in r.getMessage() and "pid 999999" in r.getMessage() for r in caplog.records)
    assert not (run_dir / "run.lock").exists() and [c.name for c in list_checkpoints(run_dir / "checkpoints")] == ["step_00000001"]


@pytest.fixture
def trained(tmp_path) -> Path:
    """A stage-I run with checkpoints at steps 2 and 3."""
    run("train_tokenizer", tmp_path / "run")
    return tmp_path / "run"


def lr_of(checkpoint: Path) -> float:
    optim = torch.load(checkpoint / "optim.pt", map_location="cpu", weights_only=True)["optimizers"]
    return optim["opt_g"]["param_groups"][0]["lr"]


def test_resume_refuses_immutable_and_applies_mutable_changes(trained, capsys, caplog):
    before = (trained / "config.yaml").read_text()
    line = one_line_error(capsys, "train_tokenizer", trained, "seed=1", "tokenizer.z_channels=10", "train.max_steps=5")
    assert "seed: checkpoint 0, this run 1" in line and "tokenizer.z_channels: checkpoint 18, this run 10" in line
    assert (trained / "config.yaml").read_text() == before  # the record still tells the truth

    with caplog.at_level(logging.INFO):
        run("train_tokenizer", trained, "train.lr=0.001", "train.max_steps=4")
    applied = [r.getMessage() for r in caplog.records if "applies changed settings" in r.getMessage()]
    assert len(applied) == 1 and "train.lr: checkpoint 0.0001, this run 0.001" in applied[0]
    assert "train.max_steps: checkpoint 3, this run 4" in applied[0]
    step4 = trained / "checkpoints" / "step_00000004"
    assert lr_of(trained / "checkpoints" / "step_00000003") == pytest.approx(1e-4)
    assert lr_of(step4) == pytest.approx(1e-3)  # the optimizer trained at the new lr (constant schedule)
    stored = yaml.safe_load(json.loads((step4 / "state.json").read_text())["metadata"]["config"])
    assert stored["train"]["lr"] == 0.001 and yaml.safe_load((trained / "config.yaml").read_text())["train"]["lr"] == 0.001
    assert [int(r["step"]) for r in train_rows(trained)] == [1, 2, 3, 4]


def test_damaged_checkpoint_is_named_and_resume_falls_back(trained, capsys, caplog, tmp_path):
    last = trained / "checkpoints" / "step_00000003"
    weights = last / "tokenizer_ema.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4096:] = bytes(4096)  # zero a block of weights: the header still parses
    weights.write_bytes(bytes(data))
    line = one_line_error(capsys, "evaluate", tmp_path / "eval", f"ckpt='{last}'")
    assert str(weights) in line and "SHA-256" in line and not (tmp_path / "eval" / "eval_card.json").exists()

    with caplog.at_level(logging.WARNING):
        run("train_tokenizer", trained)  # resume=auto: step 3 is damaged, step 2 is used
    assert any("falls back" in r.getMessage() and "step_00000002" in r.getMessage() and str(weights) in r.getMessage()
               for r in caplog.records)
    assert (last / "tokenizer_ema.safetensors").read_bytes() != bytes(data)  # step 3 written anew

    # A checkpoint of an older version (no hashes) with a truncated optim.pt: the file is named.
    state = json.loads((last / "state.json").read_text())
    del state["files"]
    (last / "state.json").write_text(json.dumps(state))
    optim = last / "optim.pt"
    optim.write_bytes(optim.read_bytes()[:100])
    line = one_line_error(capsys, "train_tokenizer", tmp_path / "other", f"resume='{last}'")
    assert str(optim) in line and "damaged" in line


def test_disk_full_while_checkpointing_names_the_run_dir(trained, capsys, monkeypatch):
    import mergevq.runs.session as session

    real = session.save_checkpoint

    def full_disk(*args, **kwargs):
        def fail():
            raise OSError(28, "No space left on device")

        return real(*args, **{**kwargs, "on_written": fail})

    monkeypatch.setattr(session, "save_checkpoint", full_disk)
    before = (trained / "checkpoints" / "step_00000003" / "tokenizer.safetensors").read_bytes()
    line = one_line_error(capsys, "train_tokenizer", trained, "train.max_steps=4")
    assert str(trained) in line and "No space left" in line and "step_00000003 is intact" in line
    assert [c.name for c in list_checkpoints(trained / "checkpoints")] == ["step_00000002", "step_00000003"]
    assert (trained / "checkpoints" / "step_00000003" / "tokenizer.safetensors").read_bytes() == before
    assert not list((trained / "checkpoints").glob("*.tmp*"))


def test_non_finite_steps_in_a_row_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MERGEVQ_FAULT", "nan_loss:1,2,3")
    line = one_line_error(capsys, "train_tokenizer", tmp_path / "run", "train.max_bad_steps=3")
    assert "3 steps in a row" in line and "train.max_bad_steps=3" in line


def test_unreadable_folder_training_says_so(tmp_path, capsys):
    root = image_folder(tmp_path / "imgs", 0, 8)
    line = one_line_error(capsys, "train_tokenizer", tmp_path / "run", "data.name=folder", f"data.root='{root}'",
                          "~data.train_kwargs", "~data.val_kwargs")
    assert "every one of the 8 image files" in line and "unreadable" in line


def test_evaluation_counts_unreadable_files_and_states_the_split(tmp_path, caplog):
    folder = {**TINY_PHOTOS, "name": "folder", "root": str(image_folder(tmp_path / "imgs", 6, 3)),
              "train_kwargs": {}, "val_kwargs": {}}
    tok = write_tokenizer_run(tmp_path / "tok", folder)
    with caplog.at_level(logging.WARNING):
        run("evaluate", tmp_path / "eval", f"ckpt='{tok}'", "keeps=[36]", "batch_size=4")
    card = json.loads((tmp_path / "eval" / "eval_card.json").read_text())
    assert (card["num_images"], card["num_skipped"], card["held_out"]) == (6, 3, False)
    assert card["metrics"]["36"]["num_images"] == 6  # no image counted twice
    assert "NOT a held-out split" in card["split_note"]
    assert any("NOT held out" in r.getMessage() for r in caplog.records)


def test_stage2_run_stores_the_code_cache_absolute(tmp_path, codes, monkeypatch):
    monkeypatch.chdir(codes.parent)
    run("train_ar", tmp_path / "run", "codes=codes", "train.max_steps=1")
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert stored["codes"] == str(codes.resolve())


def test_hub_config_with_unknown_keys_or_target_is_refused(tmp_path):
    from helpers.models import load_group, tiny_tokenizer

    config = {"tokenizer": load_group("tokenizer", "tiny"), "variant": load_group("variant", "gr"),
              "quantizer": {"bits": 18}, "recovery": None}
    folder = save_pretrained(tiny_tokenizer(0), tmp_path / "hub", config=config)
    assert from_pretrained(folder).config["quantizer"] == {"bits": 18}
    good = json.loads((folder / "config.json").read_text())
    for change, words in ((lambda c: c.update(extra=1, other=2), "unknown keys ['extra', 'other']"),
                          (lambda c: c["tokenizer"].update(_target_="os.system"), "tokenizer._target_")):
        bad = copy.deepcopy(good)
        change(bad)
        (folder / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            from_pretrained(folder)


@pytest.mark.slow
def test_two_real_processes_on_one_run_dir(tmp_path):
    """A second training process on a busy run directory exits 2 with one line naming the first."""
    import subprocess
    import sys
    import time

    from helpers.entries import describe, run_python, subprocess_env

    env = subprocess_env(MERGEVQ_RUN_DIR=str(tmp_path / "run"))
    first = subprocess.Popen([sys.executable, "-m", "mergevq.entries.train_tokenizer", *TOKENIZER, "train.max_steps=100000"],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (tmp_path / "run" / "config.yaml").exists() and time.time() < deadline:
            time.sleep(0.5)
        second = run_python("-m", "mergevq.entries.train_tokenizer", *TOKENIZER, cwd=tmp_path, env=env)
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == 2 and len(lines) == 1, describe(second)
        assert f"pid {first.pid}" in lines[0] and "in use by another run" in lines[0]
    finally:
        first.kill()
        first.wait()


def test_demo_report_of_a_directory_without_a_run_is_one_line(tmp_path, capsys):
    from mergevq.entries.demo_report import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nothing")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2
    assert "no validation results yet" in lines[-1] and "make demo" in lines[-1]

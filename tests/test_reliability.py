"""Reliability of the training platform: kill -9 at named fault points and resume, non-finite steps,
the codebook-collapse alarm, a rank dying under torchrun, unwritable run dirs, atomic checkpoints,
bad inputs (another config, another version, codebook size, missing torch-npu) and safe loading.

Faults come from the ``MERGEVQ_FAULT`` test hook (see ``mergevq.runs.faults.fault_armed``). Runs are
tiny stage-I runs through the entry, in-process or as real processes (helpers from
test_train_tokenizer). Runs whose weights are compared bitwise with a run in another process use one
intra-op thread on both sides.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import time

import pytest
import torch
import yaml
from helpers.entries import describe, run_python, subprocess_env
from helpers.runs import (
    BASE,
    assert_same_modules,
    assert_same_tensors,
    checkpoint_steps,
    compose_run,
    step_dir,
    torchrun,
    train,
    train_rows,
)
from omegaconf import OmegaConf
from torch import nn

import mergevq.engine.stage1 as stage1
import mergevq.models.factory as factory
from mergevq.engine.runner import StepGuard
from mergevq.engine.stage1 import collapse_check
from mergevq.entries.config_check import ConfigError, check_tokenizer_run
from mergevq.runs import checkpoint as ckpt
from mergevq.runs.checkpoint import RUN_FORMAT as FORMAT
from mergevq.runs.checkpoint import CheckpointMismatchError, latest_checkpoint, save_checkpoint
from mergevq.runs.faults import fault_armed
from mergevq.runs.restore import load_trained_tokenizer

# 8 images = 2 steps per epoch; checkpoints and validation at steps 2 and 3 (the last).
RUN = ("variant=r", "loss.perceptual_weight=0", "data.train_kwargs.num_samples=8", "train.max_steps=3",
       "train.ckpt_every=2", "train.val_every=2", "train.val_keeps=[36]")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one intra-op thread (see conftest)


def optimizer_states(checkpoint):
    return torch.load(checkpoint / "optim.pt", map_location="cpu", weights_only=True)["optimizers"]


# ------------------------------------------------------------------------------ 1. kill -9 and resume

KILLS = {"step": "step:3", "validation": "validation:3", "checkpoint_write": "checkpoint_write:3"}


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    """One real process per fault point, SIGKILLed at step 3 (last complete checkpoint: step 2)."""
    root = tmp_path_factory.mktemp("killed")

    def run(point):
        run_dir = root / point
        env = subprocess_env(MERGEVQ_RUN_DIR=str(run_dir), MERGEVQ_FAULT=KILLS[point])
        return run_python("-m", "mergevq.entries.train_tokenizer", *BASE, *RUN, cwd=root, env=env), run_dir

    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(KILLS, pool.map(run, KILLS)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(tmp_path_factory.mktemp("reference") / "run", *RUN)
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILLS))
def test_kill_and_resume_is_bitwise_identical(killed_runs, reference, point):
    proc, run_dir = killed_runs[point]
    assert proc.returncode == -9, describe(proc)  # died by SIGKILL at the fault point
    assert ckpt.list_checkpoints(run_dir / "checkpoints") == [step_dir(run_dir, 2)]
    logged = [int(r["step"]) for r in train_rows(run_dir)]
    if point == "checkpoint_write":
        # Half written: model files but no optimizer state or state.json, under a .tmp name. Make it
        # look complete: it must still never be loaded (and is removed on the next start).
        tmp = run_dir / "checkpoints" / "step_00000003.tmp"
        assert (tmp / "tokenizer.safetensors").is_file() and not (tmp / "state.json").exists()
        (tmp / "state.json").write_text(json.dumps({"format_version": 1, "step": 3}))
        assert latest_checkpoint(run_dir / "checkpoints") == step_dir(run_dir, 2)

    train(run_dir, *RUN)  # resume=auto, no fault
    assert checkpoint_steps(run_dir) == [2, 3]
    assert not list((run_dir / "checkpoints").glob("*.tmp*"))
    assert [int(r["step"]) for r in train_rows(run_dir)] == [*logged, 3]  # resumed at 2, not from scratch
    assert_same_modules(step_dir(reference, 3), step_dir(run_dir, 3))
    expected, resumed = optimizer_states(step_dir(reference, 3)), optimizer_states(step_dir(run_dir, 3))
    for name in ("opt_g", "opt_d"):
        for index, state in expected[name]["state"].items():
            assert_same_tensors(state, resumed[name]["state"][index], f"{name} state {index}")


def test_fault_spec_parsing(monkeypatch):
    monkeypatch.delenv("MERGEVQ_FAULT", raising=False)
    assert not fault_armed("step", 2)
    monkeypatch.setenv("MERGEVQ_FAULT", "step:2:rank1; nan_loss:3,4")
    assert fault_armed("step", 2, rank=1) and not fault_armed("step", 2, rank=0)
    assert fault_armed("nan_loss", 4) and not fault_armed("nan_loss", 5) and not fault_armed("validation", 2)
    monkeypatch.setenv("MERGEVQ_FAULT", "stepp:2")
    with pytest.raises(ValueError, match="unknown fault point 'stepp'"):
        fault_armed("step", 2)


# ------------------------------------------------------------------------------- 2. non-finite steps


class OneProcess:
    """What StepGuard needs of an Accelerator, for one process."""

    device, scaler = torch.device("cpu"), None

    def reduce(self, tensor, reduction):
        return tensor


def guarded_step(guard: StepGuard, model: nn.Module, norm: nn.Module, poison: float | None) -> bool:
    guard.begin(norm)
    loss = model(norm(torch.randn(4, 2))).sum()
    loss.backward()
    guard.watch(loss)
    if poison is not None:
        model.weight.grad[0, 0] = poison
    ok = guard.finite(model.parameters())
    model.zero_grad(set_to_none=True)
    return ok


def test_step_guard_skips_non_finite_gradients_and_stops_after_n():
    model, norm = nn.Linear(2, 1), nn.BatchNorm1d(2)
    guard = StepGuard(OneProcess(), max_bad_steps=2)
    assert not guarded_step(guard, model, norm, math.inf)
    assert torch.equal(norm.running_mean, torch.zeros(2)) and int(norm.num_batches_tracked) == 0  # restored
    assert (guard.skipped, guard.in_a_row) == (1, 1)
    assert guarded_step(guard, model, norm, None)
    assert (guard.skipped, guard.in_a_row) == (1, 0)
    assert not guarded_step(guard, model, norm, math.nan)
    with pytest.raises(FloatingPointError, match=r"train\.max_bad_steps=2.*gradient norm inf") as error:
        guarded_step(guard, model, norm, math.inf)
    assert "\n" not in str(error.value)


def test_nan_step_is_skipped_counted_and_resume_stays_exact(tmp_path, monkeypatch):
    """nan_loss at batch 2: 3 optimizer steps use batches 1, 3 and 4; resuming from step 2 agrees."""
    monkeypatch.setenv("MERGEVQ_FAULT", "nan_loss:2")
    common = (*RUN, "train.val_every=1000", "train.collapse_alarm.every=1")
    straight = train(tmp_path / "straight", *common)
    rows = train_rows(straight)
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert [int(r["train/skipped_steps"]) for r in rows] == [0, 1, 1]
    assert all(math.isfinite(r["train/total"]) for r in rows)
    # Default thresholds: the collapse alarm was checked every step and stayed quiet.
    assert [r["train/collapse_alarm"] for r in rows] == [0, 0, 0] and all(r["train/code_usage"] > 0.1 for r in rows)
    final = step_dir(straight, 3)
    assert json.loads((final / "state.json").read_text())["extra"] == {"step": 3, "skipped_steps": 1}
    optim = optimizer_states(final)
    assert {int(s["step"]) for s in optim["opt_g"]["state"].values()} == {3}  # no update on the skip
    assert optim["sched_g"]["last_epoch"] == 3  # nor a schedule step

    resumed = train(tmp_path / "resumed", *common, "train.interrupt_at=2")
    assert checkpoint_steps(resumed) == [2]
    train(resumed, *common)
    assert_same_modules(final, step_dir(resumed, 3))


def test_bad_steps_in_a_row_stop_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEVQ_FAULT", "nan_loss:2,3")
    with pytest.raises(FloatingPointError) as error:
        train(tmp_path / "run", *RUN, "train.max_bad_steps=2", "train.val_every=1000")
    message = str(error.value)
    assert "\n" not in message and "train.max_bad_steps=2" in message and "nan" in message
    assert [int(r["step"]) for r in train_rows(tmp_path / "run")] == [1]


# ------------------------------------------------------------------------------ 3. collapse alarm


def test_collapse_check_thresholds():
    alarm = {"min_usage": 0.01, "min_batch_entropy": 0.5, "every": 10}
    assert collapse_check(torch.arange(200), 4.0, alarm) == {"code_usage": 1.0, "collapse_alarm": 0.0}
    assert collapse_check(torch.zeros(200, dtype=torch.long), 4.0, alarm)["collapse_alarm"] == 1.0  # usage
    assert collapse_check(torch.arange(200), 0.1, alarm)["collapse_alarm"] == 1.0  # batch entropy


def test_collapse_alarm_fires_with_high_thresholds(tmp_path, caplog):
    run_dir = train(tmp_path / "run", *RUN, "train.max_steps=2", "train.val_every=1000", "train.collapse_alarm.every=1",
                    "train.collapse_alarm.min_usage=1.01", "train.collapse_alarm.min_batch_entropy=1000")
    assert [r["train/collapse_alarm"] for r in train_rows(run_dir)] == [1, 1]
    warnings = [r.getMessage() for r in caplog.records if "collapse alarm" in r.getMessage()]
    assert len(warnings) == 2 and "train.collapse_alarm.min_usage=1.01" in warnings[0]


# --------------------------------------------------------------------------- 4. a rank dies (torchrun)


@pytest.mark.slow
def test_dead_rank_ends_the_job_and_the_run_resumes(tmp_path):
    run_dir, cwd = tmp_path / "run", tmp_path / "cwd"
    cwd.mkdir()
    overrides = ("train.ckpt_every=1", "backend.timeout_s=30")
    proc = torchrun("-m", "mergevq.entries.train_tokenizer", *overrides, cwd=cwd, run_dir=run_dir,
                    MERGEVQ_FAULT="step:2:rank1")
    ended = time.time()
    assert proc.returncode != 0, describe(proc)
    assert checkpoint_steps(run_dir) == [1]  # rank 1 died inside step 2
    # Rank 1 died about a second after the step-1 checkpoint: the job ended soon after, no hang.
    assert ended - step_dir(run_dir, 1).stat().st_mtime < 60, describe(proc)

    proc = torchrun("-m", "mergevq.entries.train_tokenizer", *overrides, cwd=cwd, run_dir=run_dir)
    assert proc.returncode == 0, describe(proc)
    assert checkpoint_steps(run_dir) == [1, 2]
    assert json.loads((step_dir(run_dir, 2) / "state.json").read_text())["world_size"] == 2
    assert [int(r["step"]) for r in train_rows(run_dir)] == [1, 2]  # step 1 was not redone


# ------------------------------------------------------------------ 5. unwritable dirs, atomic saves


def test_unwritable_run_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")  # root ignores chmod; a path under a file fails for anyone
    with pytest.raises(OSError) as error:
        train(blocker / "run")
    message = str(error.value)
    assert "\n" not in message and "hydra.run.dir" in message and str(blocker / "run") in message


def test_failed_save_never_replaces_a_good_checkpoint(tmp_path):
    def disk_full():
        raise OSError(28, "No space left on device")

    def save(step, seed, **kw):
        torch.manual_seed(seed)
        return save_checkpoint(tmp_path, step, {"model": nn.Linear(3, 2)}, {}, {"step": step}, {}, **kw)

    good = save(2, 0)
    expected = ckpt.load_tensors(good, "model")
    for step in (3, 2):  # a newer step, and a re-save of the good one
        with pytest.raises(OSError, match="No space left"):
            save(step, 1, on_written=disk_full)
        assert latest_checkpoint(tmp_path) == good
        assert_same_tensors(ckpt.load_tensors(good, "model"), expected, "the good checkpoint")
    assert sorted(p.name for p in ckpt.cleanup_incomplete(tmp_path)) == ["step_00000002.tmp", "step_00000003.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000002"]


# --------------------------------------------------------------------------------------- 6. bad input


def fake_checkpoint(folder, config: dict, **metadata: str):
    """A checkpoint as a run of ``config`` writes it (its tokenizer built, not trained)."""
    model = factory.build_tokenizer(config["tokenizer"], config["variant"], config["quantizer"], config["recovery"])
    meta = {"format": FORMAT, "config": yaml.safe_dump(config), "git_sha": "test", **metadata}
    return save_checkpoint(folder, 1, {"tokenizer": model, "tokenizer_ema": model}, {}, {"step": 1}, meta)


def run_config(tmp_path, *overrides: str) -> dict:
    return OmegaConf.to_container(compose_run(tmp_path / "unused", *RUN, *overrides), resolve=True)


def test_checkpoint_of_another_config_lists_keys_shapes_and_config(tmp_path):
    other = fake_checkpoint(tmp_path / "other", run_config(tmp_path, "tokenizer.z_channels=10"))
    with pytest.raises(CheckpointMismatchError) as error:
        train(tmp_path / "run", *RUN, f"resume='{other}'")
    message = str(error.value)
    assert "another configuration" in message and "tokenizer.z_channels: checkpoint 10, this run 18" in message
    assert "cannot change on resume" in message and "\n" not in message
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before the run dir records anything


@pytest.mark.parametrize("change", ["format_version", "format"])
def test_checkpoint_of_another_version_names_the_versions(tmp_path, change):
    path = fake_checkpoint(tmp_path / "other", run_config(tmp_path))
    state = json.loads((path / "state.json").read_text())
    if change == "format_version":
        state["format_version"], words = 2, ("format_version 2", "format_version 1", "another version")
    else:
        state["metadata"]["format"], words = "mergevq-run/0", ("'mergevq-run/0'", f"'{FORMAT}'", "another version")
    (path / "state.json").write_text(json.dumps(state))
    for load in (lambda: train(tmp_path / "run", *RUN, f"resume='{path}'"), lambda: load_trained_tokenizer(path)):
        with pytest.raises(ValueError) as error:
            load()
        assert all(word in str(error.value) for word in words), str(error.value)


@pytest.mark.parametrize("override,words", [
    ("quantizer.codebook_size=1000", ("quantizer.codebook_size=1000", "power of two")),
    ("quantizer.codebook_size=1024", ("quantizer.codebook_size=1024", "tokenizer.z_channels=10")),
    ("backend=npu", ("backend=npu", "torch-npu")),
])
def test_bad_setting_is_one_line_error_before_any_model(tmp_path, monkeypatch, capsys, override, words):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the config error")

    monkeypatch.setattr(stage1, "build_tokenizer", no_model)
    with pytest.raises(SystemExit) as exit_info:
        train(tmp_path / "run", *RUN, override)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and all(w in lines[0] for w in words), lines
    assert not (tmp_path / "run").exists()


def test_power_of_two_codebook_size_defines_the_bits(tmp_path):
    config = run_config(tmp_path, f"quantizer.codebook_size={2**18}")
    check_tokenizer_run(config)
    assert factory.build_quantizer(config["quantizer"], 18).codebook_size == 2**18
    with pytest.raises(ConfigError, match="train.max_bad_steps=0"):
        check_tokenizer_run(run_config(tmp_path, "train.max_bad_steps=0"))


# -------------------------------------------------------------------------------------- 7. safe loading


def test_stored_config_target_outside_allow_list_is_refused(tmp_path, monkeypatch):
    config = run_config(tmp_path)
    path = fake_checkpoint(tmp_path / "ckpt", config)
    config["tokenizer"]["_target_"] = "os.system"
    state = json.loads((path / "state.json").read_text())
    state["metadata"]["config"] = yaml.safe_dump(config)
    (path / "state.json").write_text(json.dumps(state))

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built from a refused config")

    monkeypatch.setattr(factory, "build_tokenizer", no_model)
    with pytest.raises(ValueError, match=r"allow-list.*tokenizer\._target_=os\.system"):
        load_trained_tokenizer(path)


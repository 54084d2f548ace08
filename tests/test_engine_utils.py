"""Engine utilities: checkpoints, RNG, EMA, LR schedules, provenance, loggers (W&B offline read-back)."""

from __future__ import annotations

import csv
import json
import math
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.wandb import read_offline_wandb
from safetensors import safe_open
from torch import nn

from mergevq.engine.ema import EMA
from mergevq.engine.schedules import build_scheduler, lr_lambda, optimizer_steps
from mergevq.runs import checkpoint as ckpt
from mergevq.runs import provenance
from mergevq.runs.loggers import (
    CSVLogger,
    NoLogger,
    WandbLogger,
    build_logger,
    wandb_credentials_configured,
)

# ------------------------------------------------------------------------------------------ helpers


def _net(seed: int = 0, width: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, width), nn.BatchNorm1d(width), nn.Linear(width, 2))


def _trained(seed: int = 0):
    """A model + AdamW + LambdaLR after three real steps (so optimizer/BN state is non-trivial)."""
    model = _net(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = build_scheduler(opt, kind="cosine", total_steps=10, warmup_steps=2)
    for _ in range(3):
        model(torch.randn(5, 3)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model, opt, sched


def _assert_same(a, b, where: str = "") -> None:
    """Recursive bitwise equality of (nested) state dicts."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _save(directory: Path, step: int, model: nn.Module, **kw) -> Path:
    return ckpt.save_checkpoint(directory, step, {"model": model}, {}, {"step": step}, {}, **kw)


# --------------------------------------------------------------------------------------- checkpoint


def test_save_latest_load_restores_everything_bitwise(tmp_path):
    model, opt, sched = _trained(0)
    ema = EMA(model, decay=0.9)
    extra = {"step": 3, "epoch": 1, "samples_seen": 15, "sampler": {"k": [4, 9]}}
    metadata = {"config": "lr: 0.01\n", "git_sha": "abc123"}
    saved = ckpt.save_checkpoint(
        tmp_path, 3, {"model": model, "ema": ema}, {"opt": opt, "sched": sched}, extra, metadata
    )
    assert saved == tmp_path / "step_00000003"
    assert sorted(p.name for p in saved.iterdir()) == [
        "ema.safetensors",
        "model.safetensors",
        "optim.pt",
        "rng_rank0.pt",
        "state.json",
    ]
    assert ckpt.latest_checkpoint(tmp_path) == saved
    with safe_open(str(saved / "model.safetensors"), "pt") as f:
        assert f.metadata() == metadata
    # the optimizer file is plain data: loads under weights_only=True
    assert "opt" in torch.load(saved / "optim.pt", weights_only=True)["optimizers"]

    model2, opt2, sched2 = _trained(1)
    ema2 = EMA(model2)
    state = ckpt.load_checkpoint(saved, {"model": model2, "ema": ema2}, {"opt": opt2, "sched": sched2})
    _assert_same(model.state_dict(), model2.state_dict(), "model")
    _assert_same(ema.state_dict(), ema2.state_dict(), "ema")
    _assert_same(opt.state_dict(), opt2.state_dict(), "opt")
    assert sched2.state_dict()["last_epoch"] == 3 and sched2.get_last_lr() == sched.get_last_lr()
    assert state["extra"] == extra and state["metadata"] == metadata and state["step"] == 3
    assert state["rng"] is not None and set(state["rng"]) >= {"python", "numpy", "torch"}
    # the EMA file is a plain model state dict: it loads straight into a bare model
    ckpt.load_checkpoint(saved, {"ema": _net(5)})


def test_strict_mismatch_lists_keys_and_non_strict_loads_the_rest(tmp_path):
    path = _save(tmp_path, 1, _net(0, width=4))
    wider = _net(1, width=6)
    with pytest.raises(ckpt.CheckpointMismatchError) as err:
        ckpt.load_checkpoint(path, {"model": wider})
    assert "0.weight: checkpoint (4, 3) vs model (6, 3)" in str(err.value)
    extra_layer = nn.Sequential(*_net(2), nn.Linear(2, 2))
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"missing: 3\.bias, 3\.weight"):
        ckpt.load_checkpoint(path, {"model": extra_layer})
    state = ckpt.load_checkpoint(path, {"model": extra_layer}, strict=False)
    assert state["load_report"]["model"]["missing"] == ["3.bias", "3.weight"]
    assert torch.equal(extra_layer[0].weight, _net(0)[0].weight)  # the fitting keys were loaded
    with pytest.raises(FileNotFoundError, match="no model 'disc'"):
        ckpt.load_checkpoint(path, {"disc": _net(0)})


def test_keep_last_prunes_oldest_and_resave_replaces(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step, _net(step), keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    # re-save of an existing step: new weights, no leftovers
    new = _net(42)
    path = _save(tmp_path, 5, new, keep_last=2)
    target = _net(0)
    ckpt.load_checkpoint(path, {"model": target})
    _assert_same(new.state_dict(), target.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000005"]


def test_incomplete_dirs_are_ignored_and_cleaned(tmp_path):
    good = _save(tmp_path, 2, _net(0))
    tmp = ckpt.prepare_checkpoint_dir(tmp_path, 9)  # crashed mid-save: has files, even a state.json
    (tmp / "state.json").write_text("{}")
    (tmp_path / "step_00000010").mkdir()  # final name but no state.json
    (tmp_path / "step_00000003.tmp-old").mkdir()
    (tmp_path / "notes.txt").write_text("keep me")
    assert ckpt.latest_checkpoint(tmp_path) == good
    removed = ckpt.cleanup_incomplete(tmp_path)
    assert sorted(p.name for p in removed) == ["step_00000003.tmp-old", "step_00000009.tmp", "step_00000010"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "step_00000002"]
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None

    # crash between "move the old step away" and "rename the new one in": the old one comes back
    (tmp_path / "step_00000002").rename(tmp_path / "step_00000002.tmp-old")
    ckpt.prepare_checkpoint_dir(tmp_path, 2)
    assert ckpt.latest_checkpoint(tmp_path) is None
    assert [p.name for p in ckpt.cleanup_incomplete(tmp_path)] == ["step_00000002.tmp"]
    assert ckpt.latest_checkpoint(tmp_path) == good


def test_rng_capture_restore_reproduces_next_draws(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's legacy state
    state = ckpt.capture_rng()
    first = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    ckpt.write_rank_rng(tmp_path, rank=0, rng=state)
    torch.rand(10), np.random.rand(10), random.random()  # move all generators on
    ckpt.restore_rng(ckpt.load_rng(tmp_path, rank=0))  # via the pickle-free file
    again = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2] == again[2] and first[3] == again[3]
    assert ckpt.load_rng(tmp_path, rank=1) is None


def test_multi_rank_save_with_barrier(tmp_path):
    barrier = threading.Barrier(2)
    model = _net(0)
    results, errors = {}, []

    def rank_main(rank: int) -> None:
        try:
            models = {"model": model} if rank == 0 else {}
            results[rank] = ckpt.save_checkpoint(
                tmp_path, 7, models, {}, {"step": 7}, {}, rank=rank, world_size=2, barrier=barrier.wait
            )
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert results[0] == results[1] == tmp_path / "step_00000007"
    assert ckpt.load_rng(results[0], 1) is not None and ckpt.read_state(results[0])["world_size"] == 2
    # rank 0 refuses to finalize when a rank's RNG file is missing
    tmp = ckpt.prepare_checkpoint_dir(tmp_path, 8)
    ckpt.write_rank_rng(tmp, 0)
    with pytest.raises(RuntimeError, match=r"ranks \[1\]"):
        ckpt.finalize_checkpoint(tmp, 8, {"model": model}, {}, {}, {}, world_size=2)
    with pytest.raises(ValueError, match="barrier"):
        ckpt.save_checkpoint(tmp_path, 9, {}, {}, {}, {}, rank=0, world_size=2)


def test_metadata_must_be_strings(tmp_path):
    with pytest.raises(TypeError, match="dict\\[str, str\\]"):
        ckpt.save_checkpoint(tmp_path, 1, {"model": _net(0)}, {}, {}, {"seed": 3})
    with pytest.raises(ValueError, match="file names"):
        ckpt.save_checkpoint(tmp_path, 1, {"../model": _net(0)}, {}, {}, {})


# ---------------------------------------------------------------------------------------------- EMA


def test_ema_converges_as_decay_power_k_and_swapped_restores_bitwise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).double()
    ema = EMA(model, decay=0.9)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model[1].running_mean.fill_(5.0)
    target = {k: v.clone() for k, v in model.state_dict().items()}
    k = 7
    for _ in range(k):
        ema.update(model)
    for name, _ in model.named_parameters():
        expected = target[name] + (start[name] - target[name]) * 0.9**k
        torch.testing.assert_close(ema.state_dict()[name], expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(ema.state_dict()["1.running_mean"], target["1.running_mean"])  # buffers copied
    assert ema.state_dict()["1.num_batches_tracked"].dtype == torch.long

    with ema.swapped(model):
        _assert_same(model.state_dict(), ema.state_dict())
    _assert_same(model.state_dict(), target)  # originals back, bitwise

    fresh = EMA(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).double())
    fresh.load_state_dict(ema.state_dict())
    _assert_same(fresh.state_dict(), ema.state_dict())


def test_ema_warmup_and_tied_weights():
    model = nn.Linear(2, 2, bias=False)
    assert EMA(model, decay=0.999).current_decay() == 0.999
    warm = EMA(model, decay=0.999, warmup=True)
    assert warm.current_decay() == pytest.approx(0.1)
    warm.update(model)
    assert warm.current_decay() == pytest.approx(2 / 11)

    tied = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    tied[1].weight = tied[0].weight
    ema = EMA(tied, decay=0.5)
    with torch.no_grad():
        tied[0].weight.add_(1.0)
    ema.update(tied)
    assert torch.equal(ema.state_dict()["0.weight"], ema.state_dict()["1.weight"])


# ---------------------------------------------------------------------------------------- schedules


def test_schedule_values():
    const = lr_lambda("constant", total_steps=100, warmup_steps=10, warmup_start=0.1)
    assert [const(s) for s in (0, 5, 10, 99, 500)] == pytest.approx([0.1, 0.55, 1.0, 1.0, 1.0])

    step = lr_lambda("step", total_steps=100, drop_steps=(30, 60), drop_rate=0.5)
    assert [step(s) for s in (0, 29, 30, 59, 60, 99)] == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])

    cos = lr_lambda("cosine", total_steps=110, warmup_steps=10, min_ratio=0.1)
    assert cos(0) == 0.0 and cos(10) == pytest.approx(1.0)
    assert (
        cos(60) == pytest.approx(0.55) and cos(110) == pytest.approx(0.1) and cos(200) == pytest.approx(0.1)
    )

    var = lr_lambda("var", total_steps=1000, warmup_steps=100, warmup_start=0.005, min_ratio=0.1)
    assert var(0) == pytest.approx(0.005) and var(50) == pytest.approx(0.5025)
    assert var(100) == var(149) == 1.0  # hold for 5% of total = 50 steps
    assert var(150) == pytest.approx(1.0) and var(575) == pytest.approx(0.55)
    assert var(1000) == pytest.approx(0.1) and var(2000) == pytest.approx(0.1)

    with pytest.raises(ValueError, match="constant"):
        lr_lambda("linear", total_steps=10)


def test_schedule_reaches_its_end_at_total_optimizer_steps_with_accumulation():
    batches_per_epoch, accumulation, epochs = 10, 4, 3
    total = optimizer_steps(batches_per_epoch, accumulation, epochs)
    assert total == 9  # ceil(10 / 4) = 3 per epoch: the partial last window still steps
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = build_scheduler(opt, kind="cosine", total_steps=total, warmup_steps=2, min_ratio=0.1)
    lrs, steps = [], 0
    for _ in range(epochs):
        for i in range(batches_per_epoch):
            if (i + 1) % accumulation == 0 or i + 1 == batches_per_epoch:  # sync_gradients
                lrs.append(opt.param_groups[0]["lr"])
                opt.step()
                sched.step()
                steps += 1
    assert steps == total
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(1.0) and lrs[-1] > 0.1
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)  # the end value, exactly after the last step


# --------------------------------------------------------------------------------------- provenance


def test_git_sha_dirty_unknown_and_write_provenance(tmp_path, monkeypatch):
    sha = "0123456789abcdef0123456789abcdef01234567"
    answers = {"rev-parse": sha + "\n", "status": " M mergevq/x.py\n", "diff": "+" * 5000}
    monkeypatch.setattr(provenance, "_git", lambda repo, cmd, *a, **k: answers[cmd])
    assert provenance.git_sha(tmp_path) == sha + "-dirty"

    files = provenance.write_provenance(
        tmp_path / "run", "model: tiny\n", repo_dir=tmp_path, max_diff_bytes=100
    )
    assert (
        sorted(p.name for p in (tmp_path / "run").iterdir())
        == sorted(p.name for p in files)
        == [
            "config.yaml",
            "environment.json",
            "git.txt",
            "packages.txt",
        ]
    )
    assert (tmp_path / "run" / "config.yaml").read_text() == "model: tiny\n"
    git_txt = (tmp_path / "run" / "git.txt").read_text()
    assert git_txt.startswith(sha + "-dirty\n") and "M mergevq/x.py" in git_txt
    assert "[diff truncated: 5000 bytes, first 100 kept]" in git_txt and "+" * 101 not in git_txt
    env = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and env["world_size"] >= 1 and "hostname" in env
    packages = (tmp_path / "run" / "packages.txt").read_text().split()
    assert any(p.startswith("torch==") for p in packages) and packages == sorted(packages, key=str.lower)

    answers["status"] = ""
    assert provenance.git_sha(tmp_path) == sha
    monkeypatch.setattr(provenance, "_git", lambda *a, **k: None)
    assert provenance.git_sha(tmp_path) == "unknown"


def test_git_sha_unknown_without_git_binary(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable can be found
    assert provenance.git_sha(tmp_path) == "unknown"


# ------------------------------------------------------------------------------------------ loggers


def test_csv_logger_grows_header_and_writes_files(tmp_path):
    with CSVLogger(tmp_path) as log:
        log.log({"loss": 1.5}, step=0)
        log.log({"loss": 0.25, "lr": torch.tensor(0.001)}, step=1)
        log.log({"fid": 3.0}, step=2)
        log.log_images("val/recon", torch.rand(3, 5, 7), step=2, caption="K=64")
        log.log_table("codes", ["k", "usage"], [[64, 0.5], [144, 0.75]], step=2)
        log.summary({"best_fid": 3.0})
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [
        ["step", "loss", "lr", "fid"],
        ["0", "1.5", "", ""],
        ["1", "0.25", "0.0010000000474974513", ""],
        ["2", "", "", "3.0"],
    ]
    from PIL import Image

    with Image.open(tmp_path / "images" / "val_recon_00000002.png") as im:
        assert im.size == (7, 5) and im.mode == "RGB"
    assert (tmp_path / "images" / "index.csv").read_text().splitlines()[
        1
    ] == "val/recon,2,val_recon_00000002.png,K=64"
    assert (tmp_path / "tables" / "codes_00000002.csv").read_text().splitlines() == [
        "k,usage",
        "64,0.5",
        "144,0.75",
    ]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"best_fid": 3.0}

    resumed = CSVLogger(tmp_path)  # continues the same columns, grows again
    resumed.log({"loss": 0.125, "new": 1}, step=3)
    with open(tmp_path / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert (
        [r["step"] for r in table] == ["0", "1", "2", "3"]
        and table[3]["new"] == "1"
        and table[0]["new"] == ""
    )


def test_build_logger_kinds(tmp_path):
    assert isinstance(build_logger("wandb", tmp_path, is_main_process=False, project="p"), NoLogger)
    assert not (tmp_path / "wandb").exists()
    assert isinstance(build_logger("csv", tmp_path, is_main_process=True), CSVLogger)
    assert isinstance(build_logger("none", tmp_path, is_main_process=True), NoLogger)
    with pytest.raises(ValueError, match=r"'wandb', 'csv', 'none'"):
        build_logger("tensorboard", tmp_path, is_main_process=True)


def test_wandb_credentials_detection(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not wandb_credentials_configured()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password x" + "0" * 39 + "\n")
    (tmp_path / "netrc").chmod(0o600)
    assert wandb_credentials_configured()
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert wandb_credentials_configured()




@pytest.mark.slow
def test_wandb_offline_run_is_read_back(wandb_offline):
    run_dir = wandb_offline
    logger = build_logger(
        "wandb",
        run_dir,
        is_main_process=True,
        project="mergevq-test",
        group="unit",
        tags=("t",),
        config={"lr": 0.001, "model": {"keep": 144}},
    )
    assert logger.mode == "offline"
    for step, loss in enumerate([1.0, 0.5, 0.25]):
        logger.log({"train/loss": loss, "lr": 0.001 * (step + 1)}, step=step)
    logger.log_images("recon", torch.rand(3, 8, 8), step=2, caption="K=64")
    logger.summary({"best/fid": 12.5})
    logger.finish()
    logger.finish()  # idempotent

    got = read_offline_wandb(run_dir)
    assert got["state"] == "finished" and got["run_id"] == logger.run_id
    assert got["config"] == {"lr": 0.001, "model": {"keep": 144}}
    assert [r["train/loss"] for r in got["history"]] == [1.0, 0.5, 0.25]
    assert [r["_step"] for r in got["history"]] == [0, 1, 2]
    assert got["history"][2]["recon._type"] == "image-file"  # merged into the step-2 row
    assert got["summary"]["train/loss"] == 0.25 and got["summary"]["best/fid"] == 12.5
    assert got["summary"]["recon"]["caption"] == "K=64" and got["summary"]["recon"]["width"] == 8
    assert (Path(got["path"]) / got["summary"]["recon"]["path"]).parent.name == "images"


@pytest.mark.slow
def test_transaction_log_reader_spans_blocks(wandb_offline):
    """wandb's reader on a log larger than one 32 KiB block (records split across blocks) and on a torn one."""
    logger = WandbLogger(wandb_offline, project="mergevq-test", config={"text": "x" * 40000})
    for step in range(150):
        logger.log({f"m{i}": step + i / 10 for i in range(8)}, step=step)
    logger.finish()
    run = next((wandb_offline / "wandb").glob("offline-run-*"))
    got = read_offline_wandb(run)
    assert next(run.glob("*.wandb")).stat().st_size > 2 * 32768
    assert len(got["history"]) == 150 and got["history"][-1]["m7"] == pytest.approx(149.7)
    assert got["config"]["text"] == "x" * 40000
    assert math.isclose(got["summary"]["m0"], 149.0)

    # a log cut mid-block (a run still writing, or killed) reads as "running", its complete records kept
    torn = wandb_offline / "torn"
    torn.mkdir()
    (torn / "run-torn.wandb").write_bytes(next(run.glob("*.wandb")).read_bytes()[:70000])
    cut = read_offline_wandb(torn, timeout=0)
    assert cut["state"] == "running"
    assert 0 < len(cut["history"]) < 150 and cut["history"] == got["history"][: len(cut["history"])]


def test_host_scalars_copies_tensor_logs_once_and_keeps_numbers():
    from mergevq.engine.runner import host_scalars

    logs = {"rec": torch.tensor(0.25), "grad_norm": torch.tensor([3.5], dtype=torch.float64), "keep": 36, "lr": 1e-4}
    out = host_scalars(logs)
    assert out == {"rec": 0.25, "grad_norm": 3.5, "keep": 36, "lr": 1e-4}
    assert all(type(v) in (float, int) for v in out.values())
    assert host_scalars({"keep": 36}) == {"keep": 36}

"""Offline W&B for tests: the fixture that keeps every W&B directory inside tmp_path, and reading an
offline run back with wandb's own reader (``wandb leet inspect``, wandb >= 0.31)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch) -> Path:
    """Offline, silent W&B with every side directory inside tmp_path; -> a run directory to use."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    return tmp_path / "run"


def find_wandb_run(path: str | os.PathLike) -> Path:
    """The run folder (the one holding ``run-<id>.wandb``) for ``path``: a run folder, a ``wandb/``
    dir or a run_dir containing ``wandb/``. Picks ``latest-run`` if present, else the newest by name."""
    path = Path(path)
    if any(path.glob("*.wandb")):
        return path
    wandb_dir = path / "wandb" if (path / "wandb").is_dir() else path
    latest = wandb_dir / "latest-run"
    if latest.exists() and any(latest.glob("*.wandb")):
        return latest.resolve()
    runs = sorted(p for p in wandb_dir.glob("*run-*") if p.is_dir() and any(p.glob("*.wandb")))
    if not runs:
        raise FileNotFoundError(f"no W&B run folder under {path}")
    return runs[-1]


def _leet(run: Path, *flags: str) -> str:
    """stdout of ``python -m wandb leet inspect <flags> <run>`` (wandb's own reader of the ``.wandb``
    transaction log, run by its wandb-core binary)."""
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", *flags, str(run)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {' '.join(proc.stderr.split())[:300]}; "
                           "reading offline W&B runs needs wandb >= 0.31 with its wandb-core binary")
    return proc.stdout


def _read_with_leet(run: Path) -> dict[str, Any]:
    top = json.loads(_leet(run, "--summary", "--json"))
    records = [json.loads(line) for line in _leet(run, "--json").splitlines() if line.strip()]
    history = [r["history"]["item"] for r in records if r.get("type") == "history"]
    return {
        "summary": top.get("summary", {}),
        "history": history,
        "config": top.get("config", {}),
        "run_id": top.get("run_id"),
        "state": top.get("state"),
        "path": str(run),
    }


def read_offline_wandb(path: str | os.PathLike, timeout: float = 60.0) -> dict[str, Any]:
    """Read a local (offline) W&B run back with wandb's own reader, for tests and reports.

    path: run_dir given to :class:`WandbLogger`, its ``wandb/`` dir, or a run folder.
    Returns {"summary": {...}, "history": [{...}, ...], "config": {...}, "run_id", "state", "path"}:

    * summary: the latest value of every key, nested dicts for media (``img: {"_type": "image-file",
      "path": ..., "caption": ...}``), plus ``_step``, ``_runtime``, ``_timestamp``.
    * history: one dict per logged step in order, keys flattened with ``.`` (``img._type``), with
      ``_step``, ``_runtime``, ``_timestamp``. Calls at the same step are merged into one row.
    * config: nested, without W&B's internal ``_wandb`` entry.
    * state: "finished" / "failed" once the exit record is in the log, else "running".

    Uses ``wandb leet inspect --summary --json`` and ``wandb leet inspect --json`` (one JSON record per
    line; the ``history`` records carry ``history.item``). ``run.finish()`` can return before
    wandb-core has flushed the log's last block, so this re-reads (every 0.2 s, up to ``timeout``
    seconds) until the run's exit record is there and the file stopped growing; after the timeout it
    returns what it has (state "running", e.g. a killed run).
    """
    run = find_wandb_run(path)
    log_file = next(run.glob("*.wandb"))
    deadline = time.monotonic() + timeout
    while True:
        size = log_file.stat().st_size
        result = _read_with_leet(run)
        done = result["state"] != "running" and log_file.stat().st_size == size
        if done or time.monotonic() >= deadline:
            return result
        time.sleep(0.2)


def read_offline_wandb_runs(run_dir: str | os.PathLike, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Every offline W&B run folder under ``run_dir/wandb`` (one per start of a resumed run, all with
    the run id of ``wandb_run_id.txt``), oldest first, each read by :func:`read_offline_wandb`."""
    folders = sorted(p for p in (Path(run_dir) / "wandb").glob("offline-run-*") if any(p.glob("*.wandb")))
    if not folders:
        raise FileNotFoundError(f"no offline W&B run folder under {run_dir}/wandb")
    return [read_offline_wandb(folder, timeout=timeout) for folder in folders]

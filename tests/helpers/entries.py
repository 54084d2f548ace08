"""Running the commands from tests: compose an entry's config, run its task in-process the way Hydra's
run_job does, and the one runner of real processes (``python ...`` with an offline, one-thread env)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict, read_write

from mergevq.entries.cli import CONF_DIR

from . import ROOT


def compose_entry(entry: str, overrides: Sequence[str], hydra_node: bool = False) -> DictConfig:
    """The composed config of entry ``entry`` (a name in conf/, e.g. train_tokenizer or tokenize)."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(entry, overrides=list(overrides), return_hydra_config=hydra_node)


def run_task(task: Callable[[DictConfig], Any], entry: str, overrides: Sequence[str]) -> Any:
    """``task`` (an entry's ``task``) on its composed config, set up as Hydra's run_job does: HydraConfig
    holds the full config, the task gets it without the ``hydra`` node."""
    cfg = compose_entry(entry, overrides, hydra_node=True)
    task_cfg = copy.deepcopy(cfg)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    HydraConfig.instance().set_config(cfg)
    try:
        return task(task_cfg)
    finally:
        HydraConfig.instance().cfg = None


# Launcher and run-placement variables of the calling shell (or of a test run inside SLURM): a child
# process must not inherit them.
_INHERITED = ("SLURM_", "MERGEVQ_", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child: offline, silent W&B, one thread, this checkout first on
    PYTHONPATH, no launcher or MERGEVQ_* variables; then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_INHERITED)}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.update(extra)
    return env


def run_python(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: float = 300,
               **extra_env: str) -> subprocess.CompletedProcess:
    """``python args...`` (e.g. ``-m``, ``mergevq.entries.sample``, overrides) in a fresh process; its
    output captured as text. env: a whole environment (default ``subprocess_env(**extra_env)``)."""
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env or subprocess_env(**extra_env),
                          capture_output=True, text=True, timeout=timeout)


def describe(proc: subprocess.CompletedProcess) -> str:
    """A failed process's return code and the tails of its output, for an assertion message."""
    return f"rc={proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"

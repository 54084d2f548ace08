"""What produced a run: code version, packages, machine. Written once per run by the main process.

``write_provenance(run_dir, config_text)`` writes, each file atomically (tmp + fsync + replace):

* ``config.yaml``       the resolved config text, as given
* ``git.txt``           ``git_sha`` on the first line; when dirty also ``git status --porcelain`` and the
                        ``git diff HEAD`` of tracked files, capped at ``max_diff_bytes``
* ``packages.txt``      ``installed_packages()``, one ``name==version`` per line
* ``environment.json``  ``environment_info()``
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write_text

# The repository that holds the mergevq package (meaningless, and reported "unknown", when installed
# from a wheel).
PACKAGE_REPO = Path(__file__).resolve().parents[2]


def _git(repo_dir: Path, *args: str, timeout: float = 10.0) -> str | None:
    """stdout of ``git -C repo_dir *args`` or None (git missing, not a repository, error, timeout).

    Read-only: ``GIT_OPTIONAL_LOCKS=0`` stops ``git status`` from refreshing the index.
    """
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        proc = subprocess.run(
            ["git", "-C", str(repo_dir), *args], capture_output=True, text=True, timeout=timeout, env=env
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_sha(repo_dir: Path = PACKAGE_REPO) -> str:
    """HEAD commit of ``repo_dir``, with ``-dirty`` appended when tracked files have uncommitted
    changes (untracked files do not count, as in ``git describe --dirty``); "unknown" when git or
    the repository is unavailable."""
    sha = _git(repo_dir, "rev-parse", "HEAD")
    if not sha or not sha.strip():
        return "unknown"
    status = _git(repo_dir, "status", "--porcelain", "--untracked-files=no")
    return sha.strip() + ("-dirty" if status and status.strip() else "")


def installed_packages() -> list[str]:
    """``name==version`` of every installed distribution, deduplicated, sorted case-insensitively."""
    found = set()
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.add(f"{name}=={dist.version}")
    return sorted(found, key=str.lower)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_info() -> dict[str, Any]:
    """JSON-able description of interpreter, torch, accelerators, host and launch (WORLD_SIZE etc.)."""
    cuda = torch.cuda.is_available()
    npu_mod = getattr(torch, "npu", None)  # present only once torch_npu has been imported
    npu = bool(npu_mod is not None and npu_mod.is_available())
    return {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "argv": list(sys.argv),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "npu_available": npu,
        "npu_devices": npu_mod.device_count() if npu else 0,
        "accelerate": _version("accelerate"),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "rank": int(os.environ.get("RANK", "0")),
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
    }


def _git_report(repo_dir: Path, max_diff_bytes: int) -> str:
    sha = git_sha(repo_dir)
    text = sha + "\n"
    if sha.endswith("-dirty"):
        status = _git(repo_dir, "status", "--porcelain") or ""
        diff = _git(repo_dir, "diff", "HEAD") or ""
        raw = diff.encode("utf-8")
        if len(raw) > max_diff_bytes:
            diff = raw[:max_diff_bytes].decode("utf-8", errors="ignore")
            diff += f"\n[diff truncated: {len(raw)} bytes, first {max_diff_bytes} kept]\n"
        text += f"\n# git status --porcelain\n{status}\n# git diff HEAD\n{diff}"
    return text


def write_provenance(
    run_dir: Path, config_text: str, repo_dir: Path = PACKAGE_REPO, max_diff_bytes: int = 1_000_000
) -> list[Path]:
    """Write config.yaml, git.txt, packages.txt, environment.json into ``run_dir``; return the paths."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "config.yaml": config_text,
        "git.txt": _git_report(repo_dir, max_diff_bytes),
        "packages.txt": "\n".join(installed_packages()) + "\n",
        "environment.json": json.dumps(environment_info(), indent=2, sort_keys=True) + "\n",
    }
    for name, text in files.items():
        atomic_write_text(run_dir / name, text)
    return [run_dir / name for name in files]

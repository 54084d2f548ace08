import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from helpers import FIXTURES  # noqa: E402
from helpers.wandb import wandb_offline  # noqa: E402, F401  (the one W&B fixture)


@pytest.fixture(scope="module")
def one_thread():
    """Many tiny ops (and subprocesses started with OMP_NUM_THREADS=1): one intra-op thread avoids OpenMP
    spin contention on small shared CPUs and gives the same reductions; restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


# ------------------------------------------------------------- two workers that end together

# `make test` and `make test-all` give each file to one worker (--dist loadfile: its module fixtures are built once),
# in collection order (--no-loadscope-reorder). The longest files go first, as measured in CI, so that
# the last file a worker takes is a short one and the two workers end at about the same time.
LONGEST_FILES_FIRST = ("test_study.py", "test_reliability.py", "test_train_tokenizer.py", "test_platform_processes.py",
                       "test_scaleout.py", "test_train_tokenizer_processes.py", "test_failures.py", "test_docs.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


# ------------------------------------------------------------- fast tests start no processes

# `make test` runs `-m "not slow"`: a test (or a fixture it uses) that starts a Python process, a
# launcher or a shell script must be marked slow. Checked at every process start during the run.
_PROCESS_PROGRAMS = ("python", "torchrun", "accelerate", "bash", "sh")
_running: dict[str, pytest.Item | None] = {"item": None}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _running["item"] = item
    yield
    _running["item"] = None


def _starts_a_process_program(args) -> bool:
    import sys

    argv = [args] if isinstance(args, str | bytes | os.PathLike) else list(args)
    if not argv:
        return False
    program = str(argv[0])
    return program == sys.executable or Path(program).name.startswith(_PROCESS_PROGRAMS)


def pytest_configure(config):
    import subprocess

    start = subprocess.Popen.__init__

    def guarded(self, args, *rest, **kwargs):
        item = _running["item"]
        if item is not None and item.get_closest_marker("slow") is None and _starts_a_process_program(args):
            pytest.fail(f"{item.nodeid} starts a process ({args!r:.120}) but is not marked slow: add "
                        "@pytest.mark.slow (make test runs the fast set, -m 'not slow')", pytrace=False)
        start(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = guarded

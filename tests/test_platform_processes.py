"""Real processes: a killed and resumed tiny run keeps one W&B run with a continuous step history, and
two invocations of launch/multinode.sh (node ranks 0 and 1 on 127.0.0.1, one CPU process each; by
arguments) form one world-size-2 job with the losses of a single-node 2-process run; the SLURM
variables give the same two commands."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.wandb import read_offline_wandb_runs

from mergevq.runs.loggers import RUN_ID_FILE

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY = ("tokenizer=tiny", "data=photos", "logger=csv", "train.global_batch_size=4", "loss.perceptual_weight=0",
        "loss.adversarial_weight=0", "train.progress=false", "train.val_batches=1", "data.val_kwargs.num_samples=4",
        "data.train_kwargs.num_samples=16", "train.keep_candidates=[36]", "train.log_every=1", "train.val_every=100")


def env(**extra: str) -> dict[str, str]:
    # WANDB_SERVICE: an in-process W&B test of this pytest run leaves its wandb-core service in the
    # environment; a child that inherits it shares that service, which still holds a killed run's id
    out = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MERGEVQ_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_",
                                "WANDB_SERVICE"))}
    out.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT), **extra)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    with (run_dir / "metrics.csv").open(newline="") as handle:
        return [(int(r["step"]), float(r["train/total"])) for r in csv.DictReader(handle) if r.get("train/total")]


@pytest.mark.slow
def test_stopped_killed_and_resumed_run_is_one_wandb_run(tmp_path):
    """Stopped at step 2 (train.interrupt_at, as a requeue stops it), killed (SIGKILL) inside step 3,
    resumed to step 4: one W&B run id in every run folder, read back with wandb's reader, steps 1, 2
    in the first and 3, 4 in the last (offline, records wandb-core still buffered at a SIGKILL are lost)."""
    run_dir = tmp_path / "run"
    cmd = [PY, "-m", "mergevq.entries.train_tokenizer", *TINY, "logger=wandb", "train.ckpt_every=1", "train.max_steps=4"]
    extra = {"MERGEVQ_RUN_DIR": str(run_dir), "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
             "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache")}

    def train(*overrides: str, **more: str) -> subprocess.CompletedProcess:
        """One run; what it leaves running (wandb-core after a SIGKILL, which detaches into its own
        session) is killed too, as SLURM kills every process of a job that it requeues."""
        proc = subprocess.run([*cmd, *overrides], cwd=ROOT, env=env(**extra, **more), capture_output=True,
                              text=True, timeout=300)
        kill_processes_with_env(f"WANDB_CONFIG_DIR={extra['WANDB_CONFIG_DIR']}")
        return proc

    stopped = train("train.interrupt_at=2")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    killed = train(MERGEVQ_FAULT="step:3")
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = train()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 3 and {f.name.rsplit("-", 1)[1] for f in folders} == {run_id}
    first, *_, last = read_offline_wandb_runs(run_dir, timeout=5)  # the killed run's records may be cut
    assert first["run_id"] == last["run_id"] == run_id and last["state"] == "finished"
    steps = [[int(row["_step"]) for row in r["history"] if "train/total" in row] for r in (first, last)]
    assert steps == [[1, 2], [3, 4]]


def kill_processes_with_env(entry: str, timeout: float = 30.0) -> None:
    """SIGKILL every process whose environment holds ``entry`` (KEY=value) and wait until they are gone."""
    def holders() -> list[int]:
        pids = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            with contextlib.suppress(OSError):
                if entry.encode() in environ.read_bytes().split(b"\0"):
                    pids.append(int(environ.parent.name))
        return [pid for pid in pids if pid != os.getpid()]

    deadline = time.monotonic() + timeout
    while (pids := holders()) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    assert not holders(), f"processes with {entry} outlived SIGKILL"


def multinode(node_rank: int, port: int, run_dir: Path, *flags: str, **extra: str) -> subprocess.Popen:
    accelerate = shutil.which("accelerate", path=str(Path(PY).parent)) or "accelerate"
    cmd = ["bash", "launch/multinode.sh", *flags, "--backend", "cpu", "--config", "launch/accelerate/cpu_2proc.yaml",
           "--accelerate", accelerate, "--run-dir", str(run_dir), "train_tokenizer", *TINY, "train.max_steps=3"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env(ACCELERATE_USE_CPU="1", **extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, f"{shlex.join(proc.args)} ({proc.returncode}):\n{out[-2000:]}\n{err[-4000:]}"


@pytest.mark.slow
def test_two_nodes_on_this_machine_equal_one_node_with_two_processes(tmp_path):
    single = tmp_path / "single"
    wait_all([multinode(0, 0, single, "--nnodes", "1", "--nproc-per-node", "2", "--master-port", str(free_port()))])
    reference = losses(single)
    assert [step for step, _ in reference] == [1, 2, 3]
    # one node, launch/multinode.sh from arguments: two ranks in one gloo group, recorded by run and checkpoint
    assert json.loads((single / "environment.json").read_text())["world_size"] == 2
    states = [json.loads(p.read_text()) for p in (single / "checkpoints").glob("step_*/state.json")]
    assert states and all(state["world_size"] == 2 for state in states)

    port = str(free_port())
    by_hand = tmp_path / "two_nodes"
    wait_all([multinode(rank, 0, by_hand, "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1",
                        "--master-port", port, "--nproc-per-node", "1") for rank in (0, 1)])
    assert losses(by_hand) == reference
    assert '"world_size": 2' in (by_hand / "environment.json").read_text()

    # no options: everything from the SLURM variables gives, per node, the command that just ran by hand
    for rank in (0, 1):
        slurm = multinode(rank, 0, by_hand, "--dry-run", SLURM_NNODES="2", SLURM_NODEID=str(rank),
                          SLURM_GPUS_ON_NODE="1", SLURM_LAUNCH_NODE_IPADDR="127.0.0.1", SLURM_JOB_ID="4242",
                          MASTER_PORT=port)
        hand = multinode(rank, 0, by_hand, "--dry-run", "--nnodes", "2", "--node-rank", str(rank), "--master-addr",
                         "127.0.0.1", "--master-port", port, "--nproc-per-node", "1")
        printed = [proc.communicate(timeout=60)[0] for proc in (slurm, hand)]
        assert printed[0] == printed[1] and f"--machine_rank {rank}" in printed[0], printed

"""The scale-out layer: backends x entries, launchers, the multi-node script, W&B sweep specs, stage-II
presets, and a real tiny 2x2 CPU sweep evaluated and aggregated by ``mergevq.entries.report``.

GPU/NPU execution tests run only where the hardware is (skipped with the reason otherwise). Process
boundaries are real where they are the point: the sweep, its evaluation, the accelerate launch of the
2-process CPU config and the submitit launcher run as subprocesses.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from mergevq.engine.runner import check_device
from mergevq.entries import report
from mergevq.entries.cli import CONF_DIR, entry_module

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENTRIES = ("train_tokenizer", "train_ar", "evaluate", "sample", "tokenize", "probe")
BACKENDS = tuple(sorted(p.stem for p in (CONF_DIR / "backend").glob("*.yaml")))
EXPECTED_BACKENDS = {  # name: (device, mixed precision, collective backend)
    "cpu": ("cpu", "no", "gloo"),
    "gpu": ("cuda", "bf16", "nccl"),
    "multigpu": ("cuda", "bf16", "nccl"),
    "multinode": ("cuda", "bf16", "nccl"),
    "npu": ("npu", "bf16", "hccl"),
}
HAS_CUDA = torch.cuda.is_available()
HAS_TORCH_NPU = importlib.util.find_spec("torch_npu") is not None
# Tiny stage-I settings shared by every training subprocess here.
TINY = (
    "tokenizer=tiny", "data=photos", "logger=csv", "train.global_batch_size=4", "loss.perceptual_weight=0",
    "loss.adversarial_weight=0", "train.progress=false", "train.val_batches=1",
)


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MERGEVQ_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    out.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1", **extra)
    return out


def run(cmd: list[str], timeout: int = 240, **extra_env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def compose_entry(entry: str, overrides: list[str], hydra_node: bool = False):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(entry, overrides=overrides, return_hydra_config=hydra_node)


# ------------------------------------------------------------------------------ backends x entries


def test_backend_group_is_the_expected_set():
    assert set(BACKENDS) == set(EXPECTED_BACKENDS)


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_backend_composes_with_every_entry(entry):
    for backend in BACKENDS:
        cfg = compose_entry(entry, [f"backend={backend}"])
        device, precision, dist = EXPECTED_BACKENDS[backend]
        assert cfg.backend.name == backend
        assert (cfg.backend.device, cfg.backend.mixed_precision, cfg.backend.dist_backend) == (device, precision, dist)
        OmegaConf.to_container(cfg.backend, resolve=True)  # no dangling interpolation


def test_check_device_accepts_cpu():
    check_device({"name": "cpu", "device": "cpu"})


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA device is visible: the no-GPU error cannot occur here")
@pytest.mark.parametrize("backend", ["gpu", "multigpu", "multinode"])
def test_check_device_gpu_without_cuda_is_a_clear_error(backend):
    cfg = compose_entry("train_tokenizer", [f"backend={backend}"])
    with pytest.raises(RuntimeError, match=rf"backend={backend} needs a CUDA device.*backend=cpu"):
        check_device(OmegaConf.to_container(cfg.backend))


@pytest.mark.skipif(HAS_TORCH_NPU, reason="torch_npu is installed: the missing-torch-npu error cannot occur here")
def test_check_device_npu_without_torch_npu_is_a_clear_error():
    cfg = compose_entry("train_tokenizer", ["backend=npu"])
    with pytest.raises(RuntimeError, match=r"torch-npu.*pip install '\.\[npu\]'"):
        check_device(OmegaConf.to_container(cfg.backend))


def test_check_device_unknown_device():
    with pytest.raises(ValueError, match="cpu, cuda or npu"):
        check_device({"name": "x", "device": "tpu"})


# ------------------------------------------------------------------ accelerate configs and launchers


def test_accelerate_configs():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    expected = {  # file: (distributed type, precision, processes, machines)
        "cpu_2proc": (DistributedType.MULTI_GPU, "no", 2, 1),   # torchrun launcher + ACCELERATE_USE_CPU=1
        "gpu": (DistributedType.NO, "bf16", 1, 1),
        "multigpu": (DistributedType.MULTI_GPU, "bf16", 8, 1),
        "multinode": (DistributedType.MULTI_GPU, "bf16", 16, 2),
        "npu": (DistributedType.MULTI_NPU, "bf16", 8, 1),
    }
    found = {p.stem for p in (ROOT / "launch" / "accelerate").glob("*.yaml")}
    assert found == set(expected)
    for name, (kind, precision, processes, machines) in expected.items():
        cfg = load_config_from_file(str(ROOT / "launch" / "accelerate" / f"{name}.yaml"))
        assert (cfg.distributed_type, cfg.mixed_precision, cfg.num_processes, cfg.num_machines) == (
            kind, precision, processes, machines), name
        assert not cfg.use_cpu, f"{name}: use_cpu selects the single-process launcher"
    # the Hydra backend and the accelerate file agree on precision
    for backend in ("gpu", "multigpu", "multinode", "npu"):
        file = {"gpu": "gpu", "multigpu": "multigpu", "multinode": "multinode", "npu": "npu"}[backend]
        cfg = load_config_from_file(str(ROOT / "launch" / "accelerate" / f"{file}.yaml"))
        assert compose_entry("train_tokenizer", [f"backend={backend}"]).backend.mixed_precision == cfg.mixed_precision


@pytest.mark.slow
@pytest.mark.parametrize("script", ["launch/multinode.sh", "launch/slurm_tokenizer.sbatch", "launch/npu_env.sh",
                                    "experiments/sweeps/agent.sbatch"])
def test_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(ROOT / script)]).returncode == 0


def dry_run(*args: str, **environment: str) -> tuple[list[str], str]:
    base = {"PATH": environment.pop("PATH", os.environ["PATH"]), "HOME": os.environ.get("HOME", "/tmp")}
    proc = subprocess.run(["bash", str(ROOT / "launch" / "multinode.sh"), "--dry-run", *args], cwd=ROOT,
                          env={**base, **environment}, capture_output=True, text=True, timeout=30)
    return (shlex.split(proc.stdout) if proc.returncode == 0 else []), proc.stderr + f"\nrc={proc.returncode}"


def expected_command(nnodes, rank, addr, port, total, entry, backend, *overrides, config="multinode.yaml"):
    return ["accelerate", "launch", "--config_file", str(ROOT / "launch" / "accelerate" / config),
            "--num_machines", str(nnodes), "--machine_rank", str(rank), "--main_process_ip", addr,
            "--main_process_port", str(port), "--num_processes", str(total), "-m", entry_module(entry),
            f"backend={backend}", *overrides]


@pytest.mark.slow
def test_multinode_dry_run_explicit_arguments():
    cmd, err = dry_run("--nnodes", "2", "--node-rank", "1", "--master-addr", "node0", "--master-port", "29555",
                       "--nproc-per-node", "8", "train_ar", "experiment=ar_b_mergear_gr", "codes=/c d")
    assert cmd == expected_command(2, 1, "node0", 29555, 16, "train_ar", "multinode", "experiment=ar_b_mergear_gr",
                                   "codes=/c d"), err
    # --key=value spelling, the default entry, NPU backend (its accelerate file), overrides after --
    cmd, err = dry_run("--nnodes=1", "--nproc-per-node=4", "--backend=npu", "--", "train.max_steps=3")
    assert cmd == expected_command(1, 0, "127.0.0.1", 29500, 4, "train_tokenizer", "npu", "train.max_steps=3",
                                   config="npu.yaml"), err


@pytest.mark.slow
def test_multinode_dry_run_from_slurm_variables(tmp_path):
    slurm = {"SLURM_NNODES": "4", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_GPUS_ON_NODE": "8",
             "SLURM_LAUNCH_NODE_IPADDR": "10.1.2.3", "SLURM_JOB_ID": "4242"}
    # no scontrol on PATH: the launch node's address
    cmd, err = dry_run("experiment=tokenizer_256_gr_d64", PATH="/usr/bin:/bin", **slurm)
    assert cmd == ["MERGEVQ_RUN_DIR=outputs/train_tokenizer/slurm_4242",
                   *expected_command(4, 2, "10.1.2.3", 29500, 32, "train_tokenizer", "multinode",
                                     "experiment=tokenizer_256_gr_d64")], err
    # with scontrol: the first host of the node list; "type:count" GPU spelling; MASTER_PORT from the env
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[07-10]" ] && printf "gpu07\\ngpu08\\ngpu09\\ngpu10\\n"\n')
    (fake / "scontrol").chmod(0o755)
    cmd, err = dry_run("evaluate", "ckpt=outputs/x", PATH=f"{fake}:/usr/bin:/bin",
                       **{**slurm, "SLURM_GPUS_ON_NODE": "h100:4", "MASTER_PORT": "29600"})
    assert cmd[1:] == expected_command(4, 2, "gpu07", 29600, 16, "evaluate", "multinode", "ckpt=outputs/x"), err
    # arguments win over SLURM variables
    cmd, err = dry_run("--node-rank", "0", "--master-addr", "head", "--run-dir", "/shared/run", **slurm)
    assert cmd == ["MERGEVQ_RUN_DIR=/shared/run", *expected_command(4, 0, "head", 29500, 32, "train_tokenizer", "multinode")], err


@pytest.mark.slow
def test_multinode_errors_and_help():
    for args, message in [
        (("--nnodes", "2", "--nproc-per-node", "8"), "no master address"),
        (("--nnodes", "2", "--node-rank", "2", "--master-addr", "a", "--nproc-per-node", "1"), "not below"),
        (("--nnodes", "1"), "processes per node unknown"),
        (("--nproc-per-node", "1", "not_an_entry"), "unknown entry"),
        (("--bogus",), "unknown option"),
    ]:
        cmd, err = dry_run(*args, PATH="/usr/bin:/bin")
        assert not cmd and "rc=2" in err and message in err, (args, err)
    proc = subprocess.run(["bash", str(ROOT / "launch" / "multinode.sh"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--master-addr" in proc.stdout and "SLURM_NODEID" in proc.stdout


def test_hydra_launcher_presets_compose(monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install hydra-submitit-launcher")
    for name in ("MERGEVQ_SLURM_PARTITION", "MERGEVQ_SLURM_QOS", "MERGEVQ_SLURM_ACCOUNT"):
        monkeypatch.delenv(name, raising=False)
    slurm = compose_entry("train_tokenizer", ["hydra/launcher=slurm"], hydra_node=True).hydra.launcher
    assert slurm._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (slurm.tasks_per_node, slurm.nodes, slurm.partition, slurm.qos, slurm.account) == (1, 1, None, None, None)
    assert slurm.max_num_timeout > 0 and slurm.signal_delay_s > 0 and slurm.setup
    monkeypatch.setenv("MERGEVQ_SLURM_PARTITION", "gpu-long")
    ddp = compose_entry("train_ar", ["hydra/launcher=slurm_ddp", "hydra.launcher.gpus_per_node=4"], hydra_node=True).hydra
    assert ddp.launcher.partition == "gpu-long" and ddp.launcher.tasks_per_node == 4
    assert set(ddp.job.env_set) == {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert ddp.job.env_set.RANK == "3"
    local = compose_entry("train_tokenizer", ["hydra/launcher=local_submitit"], hydra_node=True).hydra.launcher
    assert local._target_.endswith("submitit_launcher.LocalLauncher")
    # the training entries resume from the run directory: what a requeued job relies on
    for entry in ("train_tokenizer", "train_ar"):
        assert compose_entry(entry, []).resume == "auto"


# ------------------------------------------------------------------------ experiment presets


PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_experiment_preset_composes(preset):
    entry = "train_ar" if preset.startswith(("ar_", "demo_ar", "demo_randar")) else "train_tokenizer"
    extra = ["codes=/tmp/codes"] if entry == "train_ar" else []
    cfg = compose_entry(entry, [f"experiment={preset}", *extra])
    assert cfg.task == entry


@pytest.mark.parametrize("preset,size,generator,accum,window", [
    ("ar_b_raster_gr", "b", "raster", 2, None),
    ("ar_b_mergear_gr", "b", "mergear", 2, 16),
    ("ar_b_raster_g", "b", "raster", 4, None),
    ("ar_b_mergear_g", "b", "mergear", 4, 32),
    ("ar_b_openmagvit2", "b", "raster", 2, None),
    ("ar_l_openmagvit2", "l", "raster", 2, None),
    ("ar_xl_openmagvit2", "xl", "raster", 2, None),
])
def test_stage2_presets_official_hyperparameters(preset, size, generator, accum, window):
    cfg = compose_entry("train_ar", [f"experiment={preset}", "codes=/tmp/codes"])
    train = cfg.train
    assert (cfg.ar.size, cfg.generator.kind, train.grad_accum) == (size, generator, accum)
    if window is not None:
        assert cfg.generator.window == window
    steps_per_epoch = 1_281_167 // 768
    assert (train.global_batch_size, train.lr, list(train.betas), train.weight_decay, train.grad_clip) == (
        768, 3e-4, [0.9, 0.95], 0.05, 1.0)
    assert train.max_steps == 300 * steps_per_epoch and train.lr_schedule.warmup_steps == 6 * steps_per_epoch
    assert (train.lr_schedule.kind, train.lr_schedule.warmup_start, train.lr_schedule.min_ratio) == ("var", 0.005, 0.1)
    assert cfg.num_classes == 1000 and cfg.backend.name == "multigpu" and cfg.logger.group == preset
    assert OmegaConf.is_missing(compose_entry("train_ar", [f"experiment={preset}"]), "codes")


@pytest.mark.slow
def test_stage2_preset_cli_composes():
    """What the brief asks a user to check: the entry prints the composed job config."""
    proc = run([PY, "-m", "mergevq.entries.train_ar", "experiment=ar_b_mergear_g", "codes=/tmp/x", "--cfg", "job"], timeout=60)
    job = yaml.safe_load(proc.stdout)
    assert job["generator"]["kind"] == "mergear" and job["codes"] == "/tmp/x" and job["train"]["max_steps"] == 500400


# -------------------------------------------------------------------------- W&B sweep specs


def hydra_sweep_values(name: str) -> dict[str, list]:
    params = yaml.safe_load((CONF_DIR / "sweep" / f"{name}.yaml").read_text())["hydra"]["sweeper"]["params"]
    parser = OverridesParser.create()
    out = {}
    for key, text in params.items():
        override = parser.parse_override(f"{key}={text}")
        out[key] = list(override.sweep_iterator())
    return out


def wandb_value(key: str, value) -> object:
    """A W&B parameter value as Hydra parses what ${args_no_hyphens} renders (key=value)."""
    return OverridesParser.create().parse_override(f"{key}={value}").value()


@pytest.mark.parametrize("name", ["merge_ratio", "codebook"])
def test_wandb_sweep_matches_hydra_sweep(name):
    spec = yaml.safe_load((ROOT / "experiments" / "sweeps" / f"{name}.yaml").read_text())
    assert spec["command"][-1] == "${args_no_hyphens}"
    assert spec["command"][:6] == ["accelerate", "launch", "--config_file", "launch/accelerate/multigpu.yaml", "-m",
                                   "mergevq.entries.train_tokenizer"]
    assert (ROOT / spec["command"][3]).is_file() and spec["method"] == "grid" and spec["program"]
    swept = {k: v["values"] for k, v in spec["parameters"].items() if "values" in v}
    hydra = hydra_sweep_values(name)
    assert set(swept) == set(hydra)
    for key, values in swept.items():
        assert [wandb_value(key, v) for v in values] == hydra[key], key
    hydra_cfg = yaml.safe_load((CONF_DIR / "sweep" / f"{name}.yaml").read_text())
    assert spec["parameters"]["logger.group"]["value"] == hydra_cfg["logger"]["group"]
    # every rendered point is a valid override set for the command's preset
    fixed = [a for a in spec["command"][6:-1]]
    point = [f"{k}={v['values'][0] if 'values' in v else v['value']}" for k, v in spec["parameters"].items()]
    cfg = compose_entry("train_tokenizer", [*fixed, *point])
    assert cfg.logger.kind == "wandb" and cfg.logger.group == hydra_cfg["logger"]["group"]


# ------------------------------------------------------------------- report on synthetic cards


def fake_card(path: Path, kind: str, metrics: dict, checkpoint: Path, keeps: list) -> None:
    path.mkdir(parents=True, exist_ok=True)
    card = {"kind": kind, "metrics": metrics, "checkpoint": str(checkpoint), "keeps": keeps, "weights": "ema",
            "num_images": 10, "feature_extractor": {"name": "inception", "trained": True}}
    (path / "eval_card.json").write_text(json.dumps(card))


def fake_run(run: Path, config: dict, overrides: list[str] | None) -> Path:
    checkpoint = run / "checkpoints" / "step_00000010"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text(json.dumps({"step": 10, "metadata": {"config": yaml.safe_dump(config)}}))
    if overrides is not None:
        (run / ".hydra").mkdir()
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    return checkpoint


def test_report_fallbacks_codebook_and_probe_plots(tmp_path, capsys):
    root = tmp_path / "sweep"
    for i, bits in enumerate((10, 18)):
        config = {"tokenizer": {"z_channels": bits, "name": "d64"}, "quantizer": {"entropy_weight": 0.1}}
        # job 0 has overrides.yaml; job 1 does not (its value is read from the checkpoint's config)
        ckpt = fake_run(root / str(i), config, [f"tokenizer.z_channels={bits}", "+x=1"] if i == 0 else None)
        fake_card(root / str(i) / "eval", "tokenizer",
                  {"144": {"rfid": 2.0 + i, "psnr": 20.0, "code_usage": 0.5 * (i + 1)},
                   "256": {"rfid": 1.0 + i, "psnr": 21.0, "code_usage": 0.4 * (i + 1)}}, ckpt, [144, 256])
        fake_card(root / str(i) / "probe", "linear_probe",
                  {"144": {"cls_top1": 0.5, "mean_top1": 0.4, "cls_train_top1": 0.9}}, ckpt, [144])
    ar_ckpt = fake_run(root / "ar", {"ar": {"size": "b"}, "generator": {"kind": "mergear"}}, ["generator=mergear"])
    fake_card(root / "ar" / "samples", "generator", {"gfid": 3.25, "is": 253.8}, ar_ckpt, [256])

    assert report.main([str(root), "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [(r["run"], r["kind"], r["K"]) for r in rows] == [
        ("0", "tokenizer", "144"), ("0", "tokenizer", "256"), ("1", "tokenizer", "144"), ("1", "tokenizer", "256"),
        ("0", "linear_probe", "144"), ("1", "linear_probe", "144"), ("ar", "generator", "256")]
    assert [r["tokenizer.z_channels"] for r in rows[:4]] == ["10", "10", "18", "18"]  # 18 from the stored config
    assert rows[0]["x"] == "1" and rows[-1]["generator"] == "mergear" and float(rows[-1]["gfid"]) == 3.25
    for name in ("rfid_vs_k", "usage_vs_bits", "probe_top1_vs_k"):
        assert (out / f"{name}.png").stat().st_size > 1000, name
    md = (out / "report.md").read_text()
    assert "## tokenizer" in md and "## linear_probe" in md and "## generator" in md and "usage_vs_bits.png" in md
    assert "| ar | 256 |" in capsys.readouterr().out
    assert report.main([str(tmp_path / "out")]) == 1  # no cards there


# ----------------------------------------------------------- the tiny 2x2 CPU sweep, end to end


GRID = {"train.keep_candidates": ["[36]", "[64]"], "tokenizer.z_channels": ["10", "18"]}


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """python -m mergevq.entries.train_tokenizer -m over a 2x2 grid (keep-K list x LFQ bits), every job evaluated
    (one multirun of mergevq.entries.evaluate over the 4 run dirs, each at its own trained K), then the report."""
    root = tmp_path_factory.mktemp("sweep")
    grid = [f"{k}={','.join(v)}" for k, v in GRID.items()]
    run([PY, "-m", "mergevq.entries.train_tokenizer", "-m", *grid, *TINY, "backend=cpu", "train.max_steps=2",
         "data.val_kwargs.num_samples=8"], MERGEVQ_SWEEP_DIR=str(root))
    jobs = sorted((p for p in root.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    assert len(jobs) == 4
    run([PY, "-m", "mergevq.entries.evaluate", "-m", f"ckpt={','.join(str(j) for j in jobs)}", "features=random",
         "lpips.enabled=false", "num_images=8", "batch_size=8", "plot=false", f"cache_dir={root / 'features'}"],
        MERGEVQ_SWEEP_DIR=str(root / "eval"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # python -m mergevq.entries.report ROOT, in-process
        assert report.main([str(root)]) == 0
    return root, jobs, printed.getvalue()


@pytest.mark.slow
def test_tiny_sweep_report_matches_cards(tiny_sweep):
    root, jobs, stdout = tiny_sweep
    cards = {}
    for card_path in (root / "eval").glob("*/eval_card.json"):
        card = json.loads(card_path.read_text())
        cards[Path(card["checkpoint"]).parents[1].name] = card
    assert sorted(cards) == ["0", "1", "2", "3"]

    rows = list(csv.DictReader((root / "report.csv").open()))
    assert len(rows) == 4
    seen = set()
    for row in rows:
        job = root / row["run"]
        assert job in jobs
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))
        point = tuple(row[k] for k in GRID)
        assert point == tuple(overrides[k] for k in GRID)
        seen.add(point)
        card = cards[row["run"]]
        (keep, metrics), = card["metrics"].items()
        assert row["K"] == keep == overrides["train.keep_candidates"].strip("[]")
        assert float(row["rfid"]) == metrics["rfid"] and float(row["psnr"]) == metrics["psnr"]
        assert float(row["code_usage"]) == metrics["code_usage"]
        assert row["tokenizer"] == "tiny" and row["features"] == "random-conv (untrained)"
    assert seen == {(a, b) for a in GRID["train.keep_candidates"] for b in GRID["tokenizer.z_channels"]}

    md = (root / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert len(table) == 4
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        card = cards[cells[0]]
        (keep, metrics), = card["metrics"].items()
        assert cells[1] == keep and cells[2] == f"[{keep}]"
        assert f"{metrics['rfid']:.4f}" in cells and f"{metrics['psnr']:.4f}" in cells
    assert "Shared overrides:" in md and "`tokenizer=tiny`" in md
    assert all(line in stdout for line in table)  # the table is printed
    for name in ("rfid_vs_k", "usage_vs_bits"):  # z_channels 10 vs 18: a codebook sweep
        assert (root / f"{name}.png").stat().st_size > 1000


# ----------------------------------------------------------------- multi-process launchers on CPU


def tiny_single_job(backend: str | None = "cpu", *extra: str) -> list[str]:
    """One optimizer step of the tiny tokenizer; backend None: left to the launcher (multinode.sh)."""
    return [*TINY, *([f"backend={backend}"] if backend else []), "train.max_steps=1", "train.keep_candidates=[36]",
            "data.val_kwargs.num_samples=4", *extra]


@pytest.mark.slow
def test_submitit_local_launcher_runs_ddp_job(tmp_path):
    """hydra/launcher=local_submitit_ddp: the submitit launcher without SLURM, 2 tasks mapped to ranks."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install hydra-submitit-launcher")
    sweep = tmp_path / "sweep"
    run([PY, "-m", "mergevq.entries.train_tokenizer", "-m", "hydra/launcher=local_submitit_ddp", *tiny_single_job()],
        MERGEVQ_SWEEP_DIR=str(sweep))
    job = sweep / "0"
    assert json.loads((job / "environment.json").read_text())["world_size"] == 2
    assert (job / ".hydra" / "overrides.yaml").is_file() and list((sweep / ".submitit").glob("*/*_0_log.out"))
    assert json.loads(next((job / "checkpoints").glob("step_*/state.json")).read_text())["world_size"] == 2


# -------------------------------------------------------------- hardware that is not here: skipped


def gpu_run(tmp_path: Path, *extra: str) -> Path:
    run_dir = tmp_path / "run"
    run([PY, "-m", "mergevq.entries.train_tokenizer", *tiny_single_job("gpu", *extra)], MERGEVQ_RUN_DIR=str(run_dir))
    return run_dir


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none visible on this machine)")
def test_gpu_backend_trains_one_step(tmp_path):
    run_dir = gpu_run(tmp_path)
    info = json.loads((run_dir / "environment.json").read_text())
    assert info["cuda_available"] and info["world_size"] == 1
    assert list((run_dir / "checkpoints").glob("step_00000001/tokenizer.safetensors"))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_multigpu_accelerate_launch_two_gpus(tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(PY).parent)) or "accelerate"
    run_dir = tmp_path / "run"
    run([accelerate, "launch", "--config_file", "launch/accelerate/multigpu.yaml", "--num_processes", "2",
         "-m", "mergevq.entries.train_tokenizer", *tiny_single_job("multigpu")], MERGEVQ_RUN_DIR=str(run_dir))
    assert json.loads((run_dir / "environment.json").read_text())["world_size"] == 2


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TORCH_NPU, reason="needs torch-npu and an Ascend NPU (pip install '.[npu]' on an Ascend host)")
def test_npu_backend_trains_one_step(tmp_path):
    run_dir = tmp_path / "run"
    run([PY, "-m", "mergevq.entries.train_tokenizer", *tiny_single_job("npu")], MERGEVQ_RUN_DIR=str(run_dir))
    assert json.loads((run_dir / "environment.json").read_text())["npu_available"]

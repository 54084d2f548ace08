"""Stage I across real process boundaries: ``torchrun`` with two ranks (they agree, and a resumed
2-process run reaches the uninterrupted run's weights bit for bit) and a Hydra multirun sweep."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml
from helpers import runs
from helpers.entries import describe, run_python, subprocess_env
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # every test here starts processes


# --------------------------------------------------------------------------------- 4. two processes

# Runs the real entry under torchrun; after training, each rank writes the modules it holds in
# memory, so the test can compare rank 0, rank 1 and the checkpoint that rank 0 wrote.
RANK_DUMP = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from safetensors.torch import save_file
    import mergevq.engine.stage1 as stage1
    from mergevq.entries.train_tokenizer import main

    def dump_after_fit(cfg, session):
        trainer = stage1.Stage1Trainer(cfg, session)
        result = trainer.fit()
        out = Path(os.environ["RANK_DUMP_DIR"]) / f"rank{trainer.acc.process_index}"
        out.mkdir(parents=True)
        for name, module in trainer.checkpoint_modules().items():
            state = module if isinstance(module, dict) else module.state_dict()
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()},
                      str(out / f"{name}.safetensors"))
        return result

    stage1.train_tokenizer = dump_after_fit
    main()
    """
)

def test_two_processes_agree_and_resume(tmp_path):
    first, second, dumps = tmp_path / "run_first", tmp_path / "run_resumed", tmp_path / "dumps"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = runs.torchrun("-m", "mergevq.entries.train_tokenizer", cwd=cwd, run_dir=first)
    assert proc.returncode == 0, describe(proc)

    # World size 2, recorded in the run's environment and in each checkpoint, with both ranks' RNG.
    assert json.loads((first / "environment.json").read_text())["world_size"] == 2
    assert runs.checkpoint_steps(first) == [1, 2]
    for step in (1, 2):
        ckpt = runs.step_dir(first, step)
        assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2
        assert (ckpt / "rng_rank0.pt").is_file() and (ckpt / "rng_rank1.pt").is_file()
    # One run directory, one .hydra (rank 0's); rank 1 wrote nothing into its working directory;
    # one writer of the metrics (one row per step).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "run_first"]
    assert list(cwd.iterdir()) == []
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob(".hydra")] == [Path("run_first/.hydra")]
    assert [int(r["step"]) for r in runs.train_rows(first)] == [1, 2]

    # Resume the 2-process run from its step-1 checkpoint in a second 2-process launch: it reaches
    # rank 0's step-2 weights of the uninterrupted run exactly, and both ranks hold those weights.
    resume = f"resume='{runs.step_dir(first, 1)}'"
    proc = runs.torchrun(str(write_script(tmp_path / "cwd2", RANK_DUMP)), resume, cwd=tmp_path / "cwd2",
                    run_dir=second, RANK_DUMP_DIR=str(dumps))
    assert proc.returncode == 0, describe(proc)
    assert runs.checkpoint_steps(second) == [2]
    runs.assert_same_modules(runs.step_dir(first, 2), runs.step_dir(second, 2))
    runs.assert_same_modules(runs.step_dir(second, 2), dumps / "rank0")
    runs.assert_same_modules(dumps / "rank0", dumps / "rank1", ("tokenizer", "tokenizer_ema", "lecam"))
    # The discriminator's parameters agree too; only its BatchNorm running statistics are per rank
    # (no SyncBatchNorm: DDP broadcasts rank 0's buffers before each forward, and rank 0 saves).
    d0, d1 = (load_file(str(dumps / f"rank{r}" / "discriminator.safetensors")) for r in (0, 1))
    per_rank = {k for k in d0 if k.endswith(("running_mean", "running_var"))}
    assert per_rank
    runs.assert_same_tensors({k: v for k, v in d0.items() if k not in per_rank},
                        {k: v for k, v in d1.items() if k not in per_rank}, "discriminator without BN statistics")
    assert [int(r["step"]) for r in runs.train_rows(second)] == [2]


def write_script(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run_with_dump.py"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------ 5. multirun


def test_multirun_sweep_over_keep(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_python(
        "-m", "mergevq.entries.train_tokenizer", "-m", "train.keep_candidates=[36],[64]", *runs.BASE,
        "variant=gr", "loss.perceptual_weight=0", "train.max_steps=2",
        cwd=tmp_path, env=subprocess_env(MERGEVQ_SWEEP_DIR=str(sweep)),
    )
    assert proc.returncode == 0, describe(proc)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    seen = []
    for job in jobs:
        config = yaml.safe_load((job / "config.yaml").read_text())
        keeps = config["train"]["keep_candidates"]
        seen.append(keeps)
        assert config["run_dir"] == str(job)
        assert f"train.keep_candidates={keeps}".replace(" ", "") in (job / ".hydra" / "overrides.yaml").read_text().replace(" ", "")
        assert runs.checkpoint_steps(job) == [2]
        assert (runs.step_dir(job, 2) / "tokenizer.safetensors").is_file()
        assert [int(r["keep"]) for r in runs.read_csv(job / "val_per_k.csv")] == keeps
        assert {int(r["train/keep"]) for r in runs.train_rows(job)} == set(keeps)
    assert sorted(seen) == [[36], [64]]
    assert (sweep / "multirun.yaml").is_file()

"""Source Recovery trained alone on a frozen tokenizer (``recovery.standalone=true``, paper Table A2):
in-process runs of the stage-I entry on a tiny tokenizer run written without training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.entries import compose_entry, run_task
from helpers.models import write_tokenizer_run
from helpers.runs import BASE, assert_same_modules, read_csv, step_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from mergevq.entries import evaluate, train_tokenizer
from mergevq.entries.config_check import standalone_recovery_config
from mergevq.runs.restore import load_trained_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one intra-op thread (see conftest)

SMALL = ("recovery.width=32", "recovery.num_heads=2")
STEPS = 24
COMMON = (*BASE, "recovery.standalone=true", *SMALL, "recovery.optimizer.lr=1e-2", "train.keep_candidates=[16]",
          "train.val_keeps=[16]", "train.val_every=1000")
STANDALONE = (*COMMON, f"train.max_steps={STEPS}", f"train.ckpt_every={STEPS}")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny G+R tokenizer run without a Source Recovery module (raw and EMA weights differ)."""
    return write_tokenizer_run(tmp_path_factory.mktemp("source") / "tokenizer_run")


@pytest.fixture(scope="module")
def standalone_run(tmp_path_factory, source) -> Path:
    run_dir = tmp_path_factory.mktemp("standalone") / "run"
    run_task(train_tokenizer.task, "train_tokenizer", [*STANDALONE, f"recovery.tokenizer='{source}'", f"run_dir='{run_dir}'"])
    return run_dir


def test_the_tokenizer_stays_bit_identical_and_only_recovery_is_added(standalone_run, source):
    frozen = load_file(str(step_dir(source, 1) / "tokenizer_ema.safetensors"))  # recovery.tokenizer_weights=ema
    for name in ("tokenizer", "tokenizer_ema"):
        saved = load_file(str(step_dir(standalone_run, STEPS) / f"{name}.safetensors"))
        recovery = {k for k in saved if k.startswith("recovery.")}
        assert recovery and set(saved) - recovery == set(frozen), name
        changed = [k for k in frozen if not torch.equal(saved[k], frozen[k])]
        assert not changed, f"{name}: frozen weights changed: {changed[:3]}"
    state = json.loads((step_dir(standalone_run, STEPS) / "state.json").read_text())
    assert sorted(state["models"]) == ["tokenizer", "tokenizer_ema"]


def test_recovery_loss_goes_down_and_accuracy_up(standalone_run):
    rows = train_rows_of(standalone_run)
    assert len(rows) == STEPS and {r["train/keep"] for r in rows} == {16.0}
    first, last = rows[:5], rows[-5:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "train/recovery") < 0.9 * mean(first, "train/recovery")
    assert mean(last, "train/recovery_acc") > mean(first, "train/recovery_acc") + 0.1
    assert rows[0]["train/lr"] == pytest.approx(1e-2)  # recovery.optimizer.lr, not train.lr
    (val,) = read_csv(standalone_run / "val_per_k.csv")
    assert int(float(val["keep"])) == 16 and 0 < float(val["recovery_accuracy"]) <= 1


def train_rows_of(run_dir: Path) -> list[dict[str, float]]:
    rows = [r for r in read_csv(run_dir / "metrics.csv") if r.get("train/recovery")]
    return [{k: float(v) for k, v in r.items() if v != ""} for r in rows]


def test_the_run_stores_the_frozen_architecture_and_loads_as_a_tokenizer(standalone_run, source):
    tokenizer, config, _ = load_trained_tokenizer(standalone_run)
    assert config["recovery"]["enabled"] and config["recovery"]["standalone"]
    assert Path(config["recovery"]["tokenizer"]) == step_dir(source, 1).resolve()
    assert tokenizer.recovery is not None and tokenizer.recovery.embed.out_features == 32
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    tokens = tokenizer.encode(images, 16)
    from mergevq.models.positions import group_starts

    groups = tokenizer.recover_groups(tokens.codes, group_starts(tokens.groups, 16))  # the RandAR sampling route
    assert groups.shape == tokens.groups.shape and int(groups.max()) < 16


def test_evaluate_reports_recovery_on_the_standalone_run(standalone_run, tmp_path):
    run_task(evaluate.task, "evaluate", [f"ckpt='{standalone_run}'", "features=random", "lpips.enabled=false",
                                          "plot=false", "keeps=[16]", "num_images=4", "batch_size=4",
                                          f"run_dir='{tmp_path / 'eval'}'"])
    card = json.loads((tmp_path / "eval" / "eval_card.json").read_text())
    row = card["metrics"]["16"]
    assert 0 < row["recovery_accuracy"] <= 1 and "psnr_recovered" in row and "psnr" in row
    (val,) = read_csv(standalone_run / "val_per_k.csv")  # the run's own validation: the same 4 held-out images
    assert row["recovery_accuracy"] == pytest.approx(float(val["recovery_accuracy"]))


def test_standalone_adopts_the_frozen_architecture(tmp_path, source):
    """The source's tokenizer/variant/quantizer replace the composed ones; a source recovery module's
    shape wins over the configured one; data.size follows the frozen tokenizer."""
    with_recovery = write_tokenizer_run(tmp_path / "with_recovery", recovery={"enabled": True, "width": 32, "num_heads": 2, "depth": 1})
    composed = compose_entry("train_tokenizer", [*BASE, "variant=r", "tokenizer.resolution=64", "recovery.standalone=true",
                                                 f"recovery.tokenizer='{with_recovery}'", "recovery.width=64", "run_dir=x"])
    config = standalone_recovery_config(OmegaConf.to_container(composed, resolve=True))
    assert config["variant"]["name"] == "gr" and config["tokenizer"]["resolution"] == 32 and config["data"]["size"] == 32
    assert (config["recovery"]["width"], config["recovery"]["depth"], config["recovery"]["num_heads"]) == (32, 1, 2)
    fresh = standalone_recovery_config(OmegaConf.to_container(compose_entry(
        "train_tokenizer", [*BASE, "recovery.standalone=true", f"recovery.tokenizer='{source}'", "recovery.width=64", "run_dir=x"]),
        resolve=True))
    assert fresh["recovery"]["enabled"] and fresh["recovery"]["width"] == 64  # no module there: the configured shape


def test_frozen_tokenizer_has_no_gradients_and_stays_in_eval_mode(source):
    from mergevq.engine.recovery_stage import frozen_tokenizer

    tokenizer = frozen_tokenizer({"tokenizer": str(source), "tokenizer_weights": "raw", "width": 32, "num_heads": 2})
    raw = load_file(str(step_dir(source, 1) / "tokenizer.safetensors"))
    assert all(torch.equal(tokenizer.state_dict()[k], v) for k, v in raw.items())
    for name, parameter in tokenizer.named_parameters():
        assert parameter.requires_grad == name.startswith("recovery."), name
    for name, module in tokenizer.named_modules():
        assert module.training == name.startswith("recovery"), name


def test_an_interrupted_standalone_run_resumes_to_the_same_weights(tmp_path, source):
    def run(run_dir: Path, *extra: str) -> None:
        run_task(train_tokenizer.task, "train_tokenizer", [*COMMON, "train.max_steps=4", "train.ckpt_every=2",
                                                           f"recovery.tokenizer='{source}'", *extra, f"run_dir='{run_dir}'"])

    run(tmp_path / "straight")
    run(tmp_path / "resumed", "train.interrupt_at=3")
    assert not step_dir(tmp_path / "resumed", 4).exists()
    run(tmp_path / "resumed")  # resume=auto from step 2
    assert_same_modules(step_dir(tmp_path / "straight", 4), step_dir(tmp_path / "resumed", 4), names=("tokenizer",))

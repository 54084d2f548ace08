"""The small-scale reproduction study: python -m mergevq.entries.study [scale=cpu|smoke|gpu] [backend=gpu]

One experiment set made of the existing entries, each run in its own process with its own run directory
under ``work_dir``: three tokenizers (G, G+R, R) trained alike, evaluated at every reachable K and
linearly probed; the generation routes (raster, MergeAR strict / soft, RandAR) on the G+R tokenizer;
the merge-ratio and codebook sweeps. A stage whose output exists is skipped, so a killed study continues
where it stopped (training stages resume from their checkpoints). Then
:mod:`mergevq.entries.study_results` writes the tables, plots and JSON of ``results_dir``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .cli import run_entry

STAGES_FILE = "stages.json"


@dataclass(frozen=True)
class Stage:
    """One entry run: ``python -m mergevq.entries.<entry> <args>`` writing into ``work_dir/<out>``.

    ``expects`` (relative to work_dir) must exist after the stage. A finished stage leaves
    ``work_dir/logs/<name>.done`` and is skipped from then on. ``sweep``: ``out`` is a Hydra multirun
    directory. ``resumes``: a training run that continues from its checkpoints, so an unfinished ``out``
    is kept; any other unfinished ``out`` is removed before the stage runs again. ``args`` may be a
    function of work_dir for stages whose arguments depend on what earlier stages wrote."""

    name: str
    entry: str
    args: Sequence[str] | Callable[[Path], Sequence[str]]
    out: str
    expects: str
    sweep: bool = False
    resumes: bool = False
    group: str = field(default="", compare=False)


def evaluation_keeps(variant: str) -> list[int]:
    """Every square K the variant's tiny merge schedule reaches (the study's evaluation keeps)."""
    import yaml

    from ..models.factory import layout
    from .cli import CONF_DIR
    from .pretokenize import reachable_square_keeps

    tokenizer = yaml.safe_load((CONF_DIR / "tokenizer" / "tiny.yaml").read_text())
    positions = layout(tokenizer, yaml.safe_load((CONF_DIR / "variant" / f"{variant}.yaml").read_text()))["num_positions"]
    return reachable_square_keeps(positions, tokenizer["depth"], 1, positions)


def _list(values: Sequence[Any]) -> str:
    return "[" + ",".join(str(v) for v in values) + "]"


def sweep_jobs(sweep_dir: Path) -> list[str]:
    """The job directories of a Hydra multirun (0, 1, ...), in job order."""
    jobs = [p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return [str(p) for p in sorted(jobs, key=lambda p: int(p.name))]


def plan(config: Mapping[str, Any]) -> list[Stage]:
    """The study's stages, in the order they run."""
    scale = config["scale"]
    common = [f"backend={config['backend']['name']}", *config.get("extra", [])]
    tokenizer_common = [
        f"experiment={config['base_experiment']}", f"data={config['dataset']}", f"seed={config['seed']}",
        f"train.max_steps={scale['tokenizer_steps']}", f"train.lr_schedule.warmup_steps={scale['tokenizer_warmup']}",
        f"loss.disc_start={scale['disc_start']}",
        f"train.val_every={scale['tokenizer_steps']}", f"train.ckpt_every={scale['tokenizer_steps']}",
        "train.progress=false", *common,
    ]
    stages: list[Stage] = []
    for variant in config["variants"]:
        keeps = evaluation_keeps(variant)
        run = f"tok_{variant}"
        stages.append(Stage(f"train_{variant}", "train_tokenizer", [f"variant={variant}", f"train.val_keeps={_list(keeps)}",
                                                                     *tokenizer_common],
                            run, f"{run}/checkpoints/step_{scale['tokenizer_steps']:08d}", resumes=True, group="reconstruction"))
        stages.append(Stage(f"evaluate_{variant}", "evaluate", [f"ckpt={{work}}/{run}", f"keeps={_list(keeps)}",
                                                              f"num_images={scale['eval_images']}", "lpips.enabled=false",
                                                              f"features={config['features']}", *common],
                            f"{run}/eval", f"{run}/eval/eval_card.json", group="reconstruction"))
        probe = scale["probe"]
        stages.append(Stage(f"probe_{variant}", "probe", [f"ckpt={{work}}/{run}", f"keeps={_list(keeps)}",
                                                        f"train_images={probe['train_images']}", f"test_images={probe['test_images']}",
                                                        f"epochs={probe['epochs']}", "progress=false", *common],
                            f"{run}/probe", f"{run}/probe/eval_card.json", group="representation"))
    stages += generation_stages(config, common)
    for sweep in config["sweeps"]:
        stages += sweep_stages(sweep, config, tokenizer_common)
    return stages


def generation_stages(config: Mapping[str, Any], common: list[str]) -> list[Stage]:
    """One code cache of the generation tokenizer (each training image at four K), the three generators
    (raster on the cache's K = L items, MergeAR and RandAR on the items at the K they sample at), four
    samplings with gFID and class accuracy."""
    scale = config["scale"]
    tokenizer, keep = f"{{work}}/tok_{config['generation_variant']}", scale["generation_keep"]
    lo, hi = scale["keep_range"]
    images = [] if scale["codes_images"] is None else [f"num_images={scale['codes_images']}"]
    stages = [Stage("codes", "pretokenize", [f"ckpt={tokenizer}", "out={work}/codes", f"keep_range=[{lo},{hi}]",
                                             "keeps_per_image=4", "batch_size=256", *images, "overwrite=true", *common],
                    "logs/codes", "codes/index.json")]
    ar_common = [f"train.global_batch_size={scale['ar_batch']}", "train.progress=false",
                 f"train.lr_schedule.warmup_steps={scale['ar_warmup']}",
                 f"seed={config['seed']}", f"num_classes={config['num_classes']}", *common]
    for name, preset, generator, keeps, steps in (("ar_raster", "demo_ar", "raster", hi, scale["ar_steps"]),
                                                  ("ar_mergear", "demo_ar", "mergear", keep, scale["ar_steps"]),
                                                  ("ar_randar", "demo_randar", "randar", keep, scale["randar_steps"])):
        stages.append(Stage(name, "train_ar", [f"experiment={preset}", "codes={work}/codes", f"generator={generator}",
                                               f"codes_keeps=[{keeps}]", f"train.max_steps={steps}",
                                               f"train.ckpt_every={steps}", *ar_common],
                            name, f"{name}/checkpoints/step_{steps:08d}", resumes=True, group="generation"))
    sample_common = [f"per_class={scale['per_class']}", f"cfg_scale={scale['cfg_scale']}", "evaluate.enabled=true",
                     f"evaluate.num_reference={scale['num_reference']}", f"evaluate.features={config['features']}",
                     "progress=false", "batch_size=50", *common]
    for name, run, extra in (("samples_raster", "ar_raster", []),
                             ("samples_mergear_strict", "ar_mergear", [f"keep={keep}", "budget=strict"]),
                             ("samples_mergear_soft", "ar_mergear", [f"keep={keep}", "budget=soft"]),
                             ("samples_randar", "ar_randar", [f"keep={keep}"])):
        stages.append(Stage(name, "sample", [f"ckpt={{work}}/{run}", *extra, *sample_common], name, f"{name}/eval_card.json",
                            group="generation"))
    return stages


SWEEP_KEEPS = {"merge_ratio": [16, 25, 36, 49, 64], "codebook": [36]}


def sweep_stages(sweep: str, config: Mapping[str, Any], tokenizer_common: list[str]) -> list[Stage]:
    """The Hydra multirun of conf/sweep/<sweep>.yaml at the study's sweep length, every job evaluated,
    then mergevq.entries.report over the sweep directory."""
    scale = config["scale"]
    steps = scale["sweep_steps"]
    out = f"sweep_{sweep}"
    train = [f"sweep={sweep}", *[a for a in tokenizer_common if not a.startswith(("train.max_steps", "train.val_every",
                                                                                    "train.ckpt_every", "loss.disc_start"))],
             f"train.max_steps={steps}", f"train.val_every={steps}", f"train.ckpt_every={steps}",
             f"loss.disc_start={steps + 1}", "train.val_keeps=null", "recovery.enabled=false"]

    def evaluate_args(work: Path) -> list[str]:
        jobs = ",".join(sweep_jobs(work / out))
        return ["-m", f"ckpt={jobs}", f"keeps={_list(SWEEP_KEEPS[sweep])}", f"num_images={scale['sweep_eval_images']}",
                "lpips.enabled=false", f"features={config['features']}", f"backend={config['backend']['name']}"]

    return [
        Stage(f"sweep_{sweep}", "train_tokenizer", train, out, f"{out}/0/checkpoints", sweep=True, resumes=True, group="sweeps"),
        Stage(f"sweep_{sweep}_eval", "evaluate", evaluate_args, f"{out}/eval", f"{out}/eval/0/eval_card.json", sweep=True,
              group="sweeps"),
        Stage(f"sweep_{sweep}_report", "report", [f"{{work}}/{out}", "--out", f"{{work}}/{out}/report"], f"{out}/report",
              f"{out}/report/report.md", group="sweeps"),
    ]


def stage_command(stage: Stage, work: Path) -> list[str]:
    args = stage.args(work) if callable(stage.args) else stage.args
    return [sys.executable, "-m", f"mergevq.entries.{stage.entry}", *[a.replace("{work}", str(work)) for a in args]]


def run_stage(stage: Stage, work: Path) -> float:
    """Run one stage (unless done) -> its wall seconds (0 when skipped). Its output goes to work/logs/<name>.log."""
    out, marker = work / stage.out, work / "logs" / f"{stage.name}.done"
    if marker.exists():
        return 0.0
    if out.exists() and not stage.resumes:
        shutil.rmtree(out)
    env = {k: v for k, v in os.environ.items() if k not in ("MERGEVQ_RUN_DIR", "MERGEVQ_SWEEP_DIR")}
    if stage.entry != "report":
        env["MERGEVQ_SWEEP_DIR" if stage.sweep else "MERGEVQ_RUN_DIR"] = str(out)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("WANDB_MODE", "offline")
    log = work / "logs" / f"{stage.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = stage_command(stage, work)
    start = time.perf_counter()
    with log.open("w") as handle:
        handle.write(" ".join(command) + "\n")
        handle.flush()
        code = subprocess.call(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if code != 0 or not (work / stage.expects).exists():
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        from ..errors import UserError

        raise UserError(f"study stage {stage.name} failed (exit {code}): {tail[0]}; full log: {log}; "
                        f"fix it and run the same command again (finished stages are skipped)")
    marker.write_text(f"{seconds:.1f}\n")
    return seconds


def check_work_dir(work: Path, config: Mapping[str, Any]) -> None:
    """A work_dir holds one study: the settings that shape its stages are stored at the first run and must
    match later ones (otherwise finished stages of another study would be skipped as if they were these)."""
    from ..errors import UserError

    keys = ("scale", "backend", "dataset", "num_classes", "base_experiment", "variants", "generation_variant", "seed",
            "features", "extra")
    current = json.loads(json.dumps({k: config.get(k) for k in keys}))
    stored_path = work / "study.json"
    if not stored_path.is_file():
        stored_path.write_text(json.dumps(current, indent=2))
        return
    stored = json.loads(stored_path.read_text())
    changed = [k for k in keys if stored.get(k) != current[k]]
    if changed:
        raise UserError(f"work_dir {work} holds a study with other settings ({', '.join(changed)} {'differ' if len(changed) > 1 else 'differs'}): "
                        f"set work_dir=<a new folder>, or remove {work} to start this one from scratch")


def run_study(config: Mapping[str, Any]) -> dict[str, Any]:
    """Every stage of :func:`plan`, then the results -> the stage times (also in work_dir/stages.json)."""
    from .study_results import write_results

    work = Path(config["work_dir"]).resolve()
    work.mkdir(parents=True, exist_ok=True)
    check_work_dir(work, config)
    times_path = work / STAGES_FILE
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    stages = plan(config)
    for index, stage in enumerate(stages, 1):
        print(f"[study {index}/{len(stages)}] {stage.name} ...", flush=True)
        seconds = run_stage(stage, work)
        if seconds:
            times[stage.name] = {"seconds": round(seconds, 1), "group": stage.group}
            times_path.write_text(json.dumps(times, indent=2))
        print(f"[study {index}/{len(stages)}] {stage.name}: " + (f"{seconds:.0f} s" if seconds else "done before, skipped"), flush=True)
    paths = write_results(config, work, Path(config["results_dir"]), times)
    print(f"results: {paths['readme']}")
    return times


def task(cfg: DictConfig) -> None:
    run_study(OmegaConf.to_container(cfg, resolve=True))


def main() -> None:
    run_entry("study", task)


if __name__ == "__main__":
    main()

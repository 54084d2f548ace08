"""Evaluate a tokenizer checkpoint: python -m mergevq.entries.evaluate ckpt=RUN_DIR [keeps=[36,64]] [features=random]

Writes the evaluation card (eval_card.json / .md) and per_k.png; with logger=csv|wandb also the
eval/per_k table, the plot and eval/k{K}/{metric} summary scalars.

Several processes shard the data: ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 -m mergevq.entries.evaluate ...
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .cli import run_entry
from .config_check import check_evaluate_run


def task(cfg: DictConfig) -> float:
    from ..engine.runner import build_accelerator, seed_everything
    from ..eval.tokenizer_eval import evaluate_tokenizer, log_per_k
    from ..runs.loggers import logger_from_config

    config = OmegaConf.to_container(cfg, resolve=True)
    check_evaluate_run(config)  # checkpoint kind, keeps, data folder: before any model or data is loaded
    if config["lpips"]["enabled"] and config["lpips"]["pretrained"]:
        from ..losses.perceptual import hub_vgg16_path

        path = Path(config["lpips"].get("backbone_weights") or hub_vgg16_path()).expanduser()
        if not path.is_file():
            print(f"error: lpips.backbone_weights: no VGG16 weights at {path}: set lpips.backbone_weights=<file>, "
                  "lpips.pretrained=false (random backbone, labelled) or lpips.enabled=false", file=sys.stderr)
            raise SystemExit(2)
    seed_everything(config["seed"])
    accelerator = build_accelerator(config["backend"])
    run_dir = Path(config["run_dir"])
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        shared = [str(run_dir)]
        broadcast_object_list(shared, from_process=0)
        run_dir = Path(shared[0])
    card = evaluate_tokenizer(config, accelerator, run_dir)
    if card:  # rank 0
        with logger_from_config(config, run_dir) as logger:
            log_per_k(logger, card)
    rfids = [m["rfid"] for m in card.get("metrics", {}).values()]
    return min(rfids) if rfids else float("nan")


def main() -> None:
    run_entry("evaluate", task)


if __name__ == "__main__":
    main()

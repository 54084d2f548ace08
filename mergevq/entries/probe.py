"""Linear probe: python -m mergevq.entries.probe ckpt=RUN_DIR [keeps=[16,36,64]] [kinds=[cls,mean]]"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .cli import run_entry


def task(cfg: DictConfig) -> float:
    from ..engine.runner import seed_everything
    from ..eval.probe_run import probe_tokenizer

    config = OmegaConf.to_container(cfg, resolve=True)
    seed_everything(config["seed"])
    card = probe_tokenizer(config, Path(config["run_dir"]))
    return max(v for row in card["metrics"].values() for k, v in row.items() if k.endswith("_top1") and "train" not in k)


def main() -> None:
    run_entry("probe", task)


if __name__ == "__main__":
    main()

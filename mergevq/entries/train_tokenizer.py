"""Stage I entry: python -m mergevq.entries.train_tokenizer [experiment=...] [key=value ...]

Source Recovery alone on a frozen tokenizer (paper Table A2):
python -m mergevq.entries.train_tokenizer recovery.standalone=true recovery.tokenizer=<tokenizer run dir> [train.max_steps=...]

Multi-process on CPU: ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 -m mergevq.entries.train_tokenizer ...
"""

from __future__ import annotations

import logging
import sys

from omegaconf import DictConfig, OmegaConf

from .cli import run_entry
from .config_check import ConfigError, check_tokenizer_run, standalone_recovery_config

log = logging.getLogger("mergevq")


def task(cfg: DictConfig) -> float:
    from ..engine.runner import world_info
    from ..runs.session import RunSession
    from .objective import objective, with_metric_validated

    config = OmegaConf.to_container(cfg, resolve=True)
    standalone = bool(config["recovery"].get("standalone"))
    try:
        if standalone:  # the frozen tokenizer's architecture, before anything reads it
            config = standalone_recovery_config(config)
        config = with_metric_validated(config)
        check_tokenizer_run(config, world_size=world_info()[1])
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if standalone:
        from ..engine.recovery_stage import train_recovery as train_tokenizer

        cfg = OmegaConf.create(config)  # the stored config is the one that runs
    else:
        from ..engine.stage1 import train_tokenizer

        cfg.train.val_keeps = config["train"]["val_keeps"]
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task)
    session = RunSession(
        config["run_dir"], {**config, "overrides": overrides}, OmegaConf.to_yaml(cfg, resolve=True),
        keep_last=config["train"]["keep_last"],
    )
    with session:  # releases the run-directory lock
        final = train_tokenizer(config, session)
    log.info("finished: %s", {k: round(v, 4) for k, v in final.items()})
    return objective(config, final, session.run_dir)


def main() -> None:
    run_entry("train_tokenizer", task)


if __name__ == "__main__":
    main()

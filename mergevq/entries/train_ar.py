"""Stage II entry: python -m mergevq.entries.train_ar codes=<code cache> [generator=mergear|raster] [ar=tiny|b|l|xl]"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .cli import run_entry
from .config_check import check_ar_run

log = logging.getLogger("mergevq")


def task(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    from ..engine.stage2 import train_ar
    from ..runs.session import RunSession

    config = OmegaConf.to_container(cfg, resolve=True)
    if not (Path(config["codes"]) / "index.json").is_file():
        print(f"error: codes={config['codes']} has no index.json: write one with "
              "python -m mergevq.entries.pretokenize ckpt=<tokenizer run> out=<dir>", file=sys.stderr)
        raise SystemExit(2)
    cfg.codes = config["codes"] = str(Path(config["codes"]).expanduser().resolve())  # stored absolute: sampling works from anywhere
    check_ar_run(config)
    session = RunSession(config["run_dir"], {**config, "overrides": list(HydraConfig.get().overrides.task)},
                         OmegaConf.to_yaml(cfg, resolve=True), keep_last=config["train"]["keep_last"])
    with session:  # releases the run-directory lock
        final = train_ar(config, session)
    log.info("finished: %s", {k: round(v, 4) for k, v in final.items()})
    return final.get("loss", float("nan"))


def main() -> None:
    run_entry("train_ar", task)


if __name__ == "__main__":
    main()

"""Sample a stage-II generator: python -m mergevq.entries.sample ckpt=AR_RUN [per_class=50] [evaluate.enabled=true]

Writes samples.png (one row per class), samples.npz (arr_0 uint8 NHWC, labels, codes) and
sampling.json (every sampling setting, tokens/s, peak KV-cache entries); with evaluate.enabled an
evaluation card with gFID / precision / recall against the held-out split (and IS / sFID with
eval.inception_weights). With logger=csv|wandb the
per-class sample rows, the grid, a samples/stats table and the eval/* scores go to that logger.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .cli import run_entry


def task(cfg: DictConfig) -> float:
    import logging

    from ..engine.runner import build_accelerator, seed_everything
    from ..runs.loggers import logger_from_config
    from .sampling import log_samples, sample_images, write_samples

    config = OmegaConf.to_container(cfg, resolve=True)
    if config["evaluate"]["enabled"] and config["eval"]["inception_weights"]:
        from ..eval.inception import check_weights_file

        check_weights_file(config["eval"]["inception_weights"])  # fail before sampling, not after
    seed_everything(config["seed"])
    accelerator = build_accelerator(config["backend"])
    run_dir = Path(config["run_dir"])
    result = sample_images(config, accelerator.device)
    paths = write_samples(result, run_dir, config["per_class"], config["grid_png"], config["npz"])
    logging.getLogger("mergevq").info("samples: %s; %s", run_dir, result["stats"])
    with logger_from_config(config, run_dir) as logger:
        log_samples(logger, result, paths.get("grid"))
        if not config["evaluate"]["enabled"]:
            return float("nan")
        from ..eval.generator_run import evaluate_samples

        card = evaluate_samples(config, result, run_dir)
        scores = {f"eval/{k}": v for k, v in card["metrics"].items() if isinstance(v, int | float)}
        logger.log(scores, step=0)
        logger.summary(scores)
        return float(card["metrics"]["gfid"])


def main() -> None:
    run_entry("sample", task)


if __name__ == "__main__":
    main()

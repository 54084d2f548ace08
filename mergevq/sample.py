"""Sample a stage-II generator: python -m mergevq.sample ckpt=AR_RUN [per_class=50] [evaluate.enabled=true]

Writes samples.png (one row per class), samples.npz (arr_0 uint8 NHWC, labels, codes) and
sampling.json (every sampling setting, tokens/s, peak KV-cache entries); with evaluate.enabled an
evaluation card with gFID / precision / recall against the held-out split.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .cli import run_entry


def task(cfg: DictConfig) -> float:
    import logging

    from .engine.runner import build_accelerator, seed_everything
    from .sampling import sample_images, write_samples

    config = OmegaConf.to_container(cfg, resolve=True)
    seed_everything(config["seed"])
    accelerator = build_accelerator(config["backend"])
    run_dir = Path(config["run_dir"])
    result = sample_images(config, accelerator.device)
    write_samples(result, run_dir, config["per_class"], config["grid_png"], config["npz"])
    logging.getLogger("mergevq").info("samples: %s; %s", run_dir, result["stats"])
    if config["evaluate"]["enabled"]:
        from .eval.generator_run import evaluate_samples

        card = evaluate_samples(config, result, run_dir)
        return float(card["metrics"]["gfid"])
    return float("nan")


def main() -> None:
    run_entry("sample", task)


if __name__ == "__main__":
    main()

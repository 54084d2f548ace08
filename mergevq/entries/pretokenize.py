"""Pre-tokenize a dataset for stage II with a frozen tokenizer (EMA weights by default):

    python -m mergevq.entries.pretokenize ckpt=RUN_DIR out=DIR [keep_range=[144,256] keep_distribution=exponential] [flip=true]
        [keeps_per_image=4]

Writes a code cache (``mergevq.data.code_cache``): per image the code grid [L] (the code of the group
owning each raster position), the canonical groups [L], K, the label and whether it was flipped.
Images get the deterministic evaluation transform (resize the shorter side to S, center crop S); with
flip=true the mirrored image is encoded as a second item. K is fixed (keep=K), the tokenizer's nominal
K (keep=null, keep_range=null) or drawn per item from the reachable perfect squares in keep_range,
seeded by (seed, image index, flip), so a re-run gives the same cache. With keeps_per_image=n the
image is encoded at n distinct K (drawn without replacement; all of them when n >= their number), one
item each; stage II then draws one of an image's K per sample and epoch (``KeepPerSample``).

Several processes shard the images (rank r takes indices r::world) and write their own shards;
rank 0 merges the indexes: ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 -m mergevq.entries.pretokenize ...
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..models.keep import mix_seed
from ..models.merge import merge_schedule, reachable_keeps
from .cli import run_entry

log = logging.getLogger(__name__)
KEEP_DISTRIBUTIONS = ("uniform", "exponential")


# --------------------------------------------------------------------------------------------- keep K


@dataclass
class KeepPlan:
    """How K is chosen per item. mode: 'fixed' | 'nominal' | 'range'; choices/probs: the candidate Ks
    (ascending) and their probabilities; for 'range' each item draws from them with a generator seeded
    by (seed, image index, flip)."""

    mode: str
    choices: list[int]
    probs: list[float]
    seed: int = 0
    range: list[int] | None = None
    distribution: str | None = None
    nominal: int | None = None

    def draw(self, index: int, flip: bool) -> int:
        if len(self.choices) == 1:
            return self.choices[0]
        rng = np.random.default_rng(mix_seed(self.seed, int(index), int(flip)))
        return self.choices[int(rng.choice(len(self.choices), p=np.asarray(self.probs)))]

    def draw_many(self, index: int, flip: bool, count: int) -> list[int]:
        """count distinct K for one item (all choices when count >= their number), ascending; count 1
        is ``draw``. Drawn without replacement with the same seeded generator."""
        if count <= 1:
            return [self.draw(index, flip)]
        if count >= len(self.choices):
            return list(self.choices)
        rng = np.random.default_rng(mix_seed(self.seed, int(index), int(flip)))
        picked = rng.choice(len(self.choices), size=count, replace=False, p=np.asarray(self.probs))
        return [self.choices[int(j)] for j in sorted(picked)]

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "sampler": "choices[numpy.random.default_rng(mergevq.engine.runner.mix_seed("
                "seed, index, int(flip))).choice(len(choices), p=probs)]"}


def reachable_square_keeps(num_positions: int, depth: int, low: int, high: int) -> list[int]:
    """Perfect squares K in [low, high] that the merge schedule of ``depth`` layers reaches from L."""
    reachable = set(reachable_keeps(num_positions, depth))
    roots = range(math.isqrt(max(low, 1) - 1) + 1, math.isqrt(high) + 1)
    return [r * r for r in roots if r * r in reachable]


def keep_probs(count: int, distribution: str) -> list[float]:
    """uniform: 1/n each; exponential: p_j ~ 2 exp(-2 j) + 0.1 over the ascending candidates j
    (the stage-I 'exponential' cand_distribution weights, favouring small K)."""
    if distribution == "uniform":
        weights = [1.0] * count
    elif distribution == "exponential":
        weights = [2.0 * math.exp(-2.0 * j) + 0.1 for j in range(count)]
    else:
        raise ValueError(f"keep_distribution={distribution!r}: use one of {', '.join(KEEP_DISTRIBUTIONS)}")
    total = sum(weights)
    return [w / total for w in weights]


def build_keep_plan(cfg: Mapping[str, Any], tokenizer: nn.Module, num_positions: int) -> KeepPlan:
    """The KeepPlan for the config keys keep / keep_range / keep_distribution (ValueError if unusable).

    The tokenizer's ``keep_policy`` gives its merge depth (None: no merging) and nominal K; L is the
    encoder's positions at the data's size."""
    keep, keep_range, distribution = cfg.get("keep"), cfg.get("keep_range"), cfg.get("keep_distribution")
    policy = tokenizer.keep_policy
    depth = policy.depth
    nominal = num_positions if depth is None else (policy.nominal or num_positions)
    if keep is not None and keep_range is not None:
        raise ValueError(f"set either keep={keep} or keep_range={list(keep_range)}, not both")
    if keep_range is not None:
        if len(keep_range) != 2 or keep_range[0] > keep_range[1]:
            raise ValueError(f"keep_range={list(keep_range)}: give [min, max] with min <= max")
        low, high = int(keep_range[0]), int(keep_range[1])
        if depth is None:
            choices = [num_positions] if low <= num_positions <= high else []
        else:
            choices = reachable_square_keeps(num_positions, depth, low, high)
        if not choices:
            raise ValueError(f"keep_range=[{low}, {high}] holds no perfect square K that this tokenizer reaches "
                             f"from L={num_positions} positions")
        return KeepPlan("range", choices, keep_probs(len(choices), distribution), int(cfg.get("seed", 0)),
                        [low, high], distribution, nominal)
    if keep is not None:
        keep = int(keep)
        if depth is None and keep != num_positions:
            raise ValueError(f"this tokenizer does not merge: keep must be null or {num_positions}, got {keep}")
        if depth is not None:
            merge_schedule(num_positions, keep, depth)  # ValueError naming the reachable range
        return KeepPlan("fixed", [keep], [1.0], int(cfg.get("seed", 0)), nominal=nominal)
    return KeepPlan("nominal", [nominal], [1.0], int(cfg.get("seed", 0)), nominal=nominal)


# --------------------------------------------------------------------------------------------- data


class IndexedImages(Dataset):
    """The chosen indices of a dataset -> {image [3, S, S], label int64 [], index int64 []}."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.dataset[self.indices[i]]
        return {"image": item["image"], "label": item["label"], "index": torch.tensor(self.indices[i])}


def token_grid(tokenizer: nn.Module, size: int) -> tuple[int, int]:
    """(h, w) of the token grid for S x S inputs."""
    if hasattr(tokenizer.encoder, "grid_size"):  # Open-MAGVIT2
        return tuple(tokenizer.encoder.grid_size(size, size))
    return tuple(tokenizer.grid(torch.empty(1, 3, size, size, device="meta")))


def cache_files(out: Path) -> list[Path]:
    """Files of an earlier code cache in out (shards, indexes, their .tmp leftovers)."""
    return sorted([*out.glob("shard_*.safetensors*"), *out.glob("index*.json*")]) if out.is_dir() else []


def check_out_dir(out: Path, overwrite: bool) -> None:
    stale = cache_files(out)
    if stale and not overwrite:
        raise ValueError(f"out={out} already holds a code cache ({stale[0].name}, ...): choose another out "
                         "or pass overwrite=true")


def clear_out_dir(out: Path) -> None:
    """Remove an earlier cache's files (index first, so an interrupted run never looks complete)."""
    from ..data.code_cache import INDEX_FILE

    stale = cache_files(out)
    (out / INDEX_FILE).unlink(missing_ok=True)
    for path in stale:
        path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------------------------- task


def encode_batch(tokenizer: nn.Module, images: torch.Tensor, keeps: torch.Tensor, stem: torch.Tensor | None = None):
    """images [B, 3, S, S], keeps [B] -> [(rows [n], Tokens)] with one encode call per distinct K.

    stem: the MergeVQ tokenizer's ``stem_tokens(images)`` [B, L, C], computed once for every K."""
    out = []
    for keep in keeps.unique().tolist():
        rows = (keeps == keep).nonzero().squeeze(1)
        index = rows.to(images.device)
        with torch.no_grad():
            if stem is None:
                tokens = tokenizer.encode(images[index], keep=int(keep))
            else:
                tokens = tokenizer.encode(images[index], keep=int(keep), stem=stem[index])
        out.append((rows, tokens))
    return out


def tokenize(cfg: Mapping[str, Any], accelerator) -> dict[str, Any]:
    """cfg: the ``tokenize`` config (plain dict). Returns the cache index on rank 0, {} elsewhere."""
    from ..data import build_dataset
    from ..data.code_cache import CodeCacheWriter, merge_rank_indexes
    from ..eval.tokenizer_eval import eval_data_config
    from ..runs.integrity import sha256_file
    from ..runs.restore import WEIGHT_NAMES, load_trained_tokenizer

    tokenizer, run_cfg, checkpoint = load_trained_tokenizer(cfg["ckpt"], cfg["weights"])
    tokenizer.to(accelerator.device).eval()
    data = eval_data_config(run_cfg, cfg.get("data"))
    kwargs = dict(data.get(f"{'train' if cfg['split'] == 'train' else 'val'}_kwargs") or {})
    dataset = build_dataset(data["name"], cfg["split"], root=data.get("root"), cache_dir=data.get("cache_dir"),
                            size=data["size"], align_size=data["align_size"], views=("image",), augment=False,
                            **kwargs)
    grid = token_grid(tokenizer, data["size"])
    num_positions = grid[0] * grid[1]
    out = Path(cfg["out"]).expanduser()
    try:  # usage errors: one line on every rank, before anything is written
        plan = build_keep_plan(cfg, tokenizer, num_positions)
        check_out_dir(out, bool(cfg.get("overwrite")))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    rank, world = accelerator.process_index, accelerator.num_processes
    accelerator.wait_for_everyone()  # every rank checked out before rank 0 clears it
    if accelerator.is_main_process:
        clear_out_dir(out)
    accelerator.wait_for_everyone()

    total = min(len(dataset), cfg.get("num_images") or len(dataset))
    per_image = min(max(int(cfg.get("keeps_per_image") or 1), 1), len(plan.choices))
    weights_file = checkpoint / f"{WEIGHT_NAMES[cfg['weights']]}.safetensors"
    meta = {
        "grid": list(grid),
        "codebook_bits": int(tokenizer.quantizer.bits),
        "codebook_size": 2 ** int(tokenizer.quantizer.bits),
        "tokenizer": {
            "checkpoint": str(checkpoint.resolve()),
            "weights": cfg["weights"],
            "weights_file": weights_file.name,
            "weights_sha256": sha256_file(weights_file),
            "config": {k: run_cfg.get(k) for k in ("tokenizer", "variant", "quantizer", "recovery")},
        },
        "data": {**data, "split": cfg["split"], "dataset_kwargs": kwargs, "num_images": total,
                 "transform": f"resize shorter side {data['size']} (bilinear), center crop {data['size']}"},
        "keep": plan.describe(),
        "flip": bool(cfg["flip"]),
        "keeps_per_image": per_image,
        "seed": int(cfg.get("seed", 0)),
    }
    writer = CodeCacheWriter(out, cfg["shard_size"], meta, rank=None if world == 1 else rank)
    shard = IndexedImages(dataset, list(range(rank, total, world)))
    loader = DataLoader(shard, batch_size=cfg["batch_size"], shuffle=False, num_workers=cfg.get("num_workers", 0))
    batches = loader
    if accelerator.is_main_process:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc=f"tokenize {cfg['split']} ({plan.mode} K {plan.choices[0]}..{plan.choices[-1]})",
                       unit="batch", dynamic_ncols=True)
    views = (False, True) if cfg["flip"] else (False,)
    for batch in batches:
        images = batch["image"].to(accelerator.device)
        for flip in views:
            x = images.flip(-1) if flip else images
            draws = [plan.draw_many(i, flip, per_image) for i in batch["index"].tolist()]
            stem = tokenizer.stem_tokens(x) if per_image > 1 and hasattr(tokenizer, "stem_tokens") else None
            for round_ in range(per_image):  # round r encodes every image at its r-th K
                keeps = torch.tensor([d[round_] for d in draws], dtype=torch.long)
                for rows, tokens in encode_batch(tokenizer, x, keeps, stem):
                    writer.add(tokens.codes, tokens.groups, keeps[rows], batch["label"][rows],
                               torch.full((len(rows),), flip), batch["index"][rows])
    writer.close()
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return {}
    if world > 1:
        merge_rank_indexes(out, list(range(world)))
    from ..data.code_cache import CodeCache

    index = CodeCache(out).meta
    log.info("code cache: %d items (%d images%s) in %d shards at %s", index["num_items"], total,
             " + flips" if cfg["flip"] else "", len(index["shards"]), out)
    return index


def task(cfg: DictConfig) -> int:
    from ..engine.runner import build_accelerator, seed_everything

    config = OmegaConf.to_container(cfg, resolve=True)
    seed_everything(config["seed"])
    accelerator = build_accelerator(config["backend"])
    return int(tokenize(config, accelerator).get("num_items", 0))


def main() -> None:
    run_entry("tokenize", task)


if __name__ == "__main__":
    main()

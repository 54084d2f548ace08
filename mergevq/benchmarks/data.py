"""Three-view loader throughput: ``build_dataset('photos', 'train', size, align_size, views=all three)``
through a DataLoader with N workers, against the training step's images/s.

For each N it records the time to the first batch (worker start-up, photo decoding) and the
steady-state images/s over the following batches. ``headroom`` = loader images/s / step images/s:
below 1 the loader starves the step. On a CPU-only machine the workers and the step share the same
cores, so the isolated loader rate is an upper bound of what it delivers during training.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..data import VIEW_KEYS, build_dataset


def loader_rate(size: int, align_size: int, batch: int, workers: int, batches: int, seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    dataset = build_dataset("photos", "train", size=size, align_size=align_size, views=VIEW_KEYS,
                            num_samples=batch * (batches + 1))
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, shuffle=False, drop_last=True,
                        pin_memory=torch.cuda.is_available())
    start = time.perf_counter()
    iterator = iter(loader)
    first_batch = next(iterator)
    first = time.perf_counter() - start
    count = 0
    steady_start = time.perf_counter()
    for item in iterator:
        count += item["image"].shape[0]
    steady = time.perf_counter() - steady_start
    shapes = {key: list(first_batch[key].shape[1:]) for key in VIEW_KEYS}
    del iterator, loader
    return {"workers": workers, "batch": batch, "images": count, "first_batch_s": first,
            "images_per_s": count / steady if steady > 0 else None, "view_shapes": shapes}


def run(size: int, align_size: int, batch: int, batches: int, worker_counts: list[int],
        step_images_per_s: dict[str, float]) -> dict[str, Any]:
    rows = []
    for workers in worker_counts:
        row = loader_rate(size, align_size, batch, workers, batches)
        for name, rate in step_images_per_s.items():
            row[f"headroom_{name}"] = None if row["images_per_s"] is None else row["images_per_s"] / rate
        rows.append(row)
    return {"size": size, "align_size": align_size, "rows": rows, "step_images_per_s": step_images_per_s,
            "starves": {name: [r["workers"] for r in rows if (r[f"headroom_{name}"] or 0) < 1]
                        for name in step_images_per_s}}


def render(result: dict[str, Any]) -> str:
    from . import common

    steps = result["step_images_per_s"]
    columns = [("workers", "workers"), ("batch", "batch"), ("first_batch_s", "first batch s"),
               ("images_per_s", "loader img/s")]
    columns += [(f"headroom_{name}", f"/ step {name} ({rate:.2f} img/s)") for name, rate in steps.items()]
    specs = {key: ".2f" for key, _ in columns if key not in ("workers", "batch")}
    title = f"Three-view loader (photos, {result['size']} px + 2 x {result['align_size']} px views)"
    text = common.table(title, columns, result["rows"], specs)
    starving = {name: workers for name, workers in result["starves"].items() if workers}
    verdict = ("the loader starves the step at workers = " + str(starving)) if starving else \
        "the loader outpaces the step at every worker count (headroom > 1)"
    return text + f"\n{verdict}\n"

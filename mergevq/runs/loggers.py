"""Experiment loggers behind one small interface.

``build_logger(kind, run_dir, is_main_process, **kwargs)`` gives a :class:`WandbLogger`,
:class:`CSVLogger` or :class:`NoLogger` (always NoLogger on non-main ranks); :func:`logger_from_config`
builds the one an entry's ``logger`` config group asks for. Steps are optimizer steps (0 for the
one-shot entries: sample, evaluate, reconstruct) and must not decrease (W&B drops rows logged at an
earlier step).

A W&B run of a training entry survives resume and requeue: rank 0 keeps its id in
``run_dir/wandb_run_id.txt`` and passes ``id=..., resume="allow"``; runs are named from the Hydra
overrides (``hydra:job.override_dirname``) unless ``logger.name`` is set.
"""

from __future__ import annotations

import abc
import csv
import json
import netrc
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch

from .atomic import atomic_write_csv, atomic_write_text

LOGGER_KINDS = ("wandb", "csv", "none")
# Run metadata every logger option accepts (conf/logger/*.yaml); W&B uses them, the CSV logger records them.
RUN_INFO_KEYS = ("project", "entity", "group", "tags", "name", "mode", "job_type")
RUN_ID_FILE = "wandb_run_id.txt"

ImageLike = torch.Tensor | str | os.PathLike


def _scalar(value: Any) -> Any:
    """Tensor / numpy scalars -> Python numbers; other values unchanged."""
    if isinstance(value, torch.Tensor | np.ndarray | np.generic):
        return value.item()
    return value


def image_to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] (or [1, H, W]) float tensor in [0, 1] -> [H, W, 3] uint8 array (values clamped)."""
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected an image tensor [3, H, W] in [0, 1], got shape {tuple(image.shape)}")
    x = image.detach().float().cpu().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.expand(3, -1, -1).permute(1, 2, 0).contiguous().numpy()


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


class RunLogger(abc.ABC):
    """Interface of every logger. Usable as a context manager (``finish()`` on exit)."""

    @abc.abstractmethod
    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Scalars at optimizer step ``step``."""

    @abc.abstractmethod
    def log_images(self, key: str, image: ImageLike, step: int, caption: str = "") -> None:
        """One image: a tensor [3, H, W] in [0, 1] or the path of a PNG file."""

    @abc.abstractmethod
    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        """A small table (rows of plain values)."""

    @abc.abstractmethod
    def summary(self, metrics: Mapping[str, Any]) -> None:
        """Final / best values of the run (merged with earlier summaries)."""

    @abc.abstractmethod
    def finish(self) -> None:
        """Flush and close; idempotent."""

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


class NoLogger(RunLogger):
    """Discards everything (non-main ranks, ``logger=none``)."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_images(self, key: str, image: ImageLike, step: int, caption: str = "") -> None:
        pass

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        pass

    def summary(self, metrics: Mapping[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class CSVLogger(RunLogger):
    """Plain files under ``run_dir``.

    * ``metrics.csv``: column ``step`` then metric keys in order of first appearance; one row per
      ``log`` call, empty cells for keys not logged in that call. When a new key appears the file is
      rewritten (atomically) with the union of columns. An existing file is continued (resume).
    * ``images/{key}_{step:08d}.png`` (key with ``/`` etc. replaced by ``_``; a PNG already in
      ``images/`` is indexed where it is), captions in ``images/index.csv`` (key, step, file, caption).
    * ``tables/{key}_{step:08d}.csv``; ``summary.json`` (merged across calls).
    * ``logger.json``: the run metadata given (``RUN_INFO_KEYS``: group, tags, name, ...), so a preset
      or sweep written for W&B runs with ``logger=csv`` and keeps its grouping.
    """

    def __init__(self, run_dir: str | os.PathLike, filename: str = "metrics.csv", **run_info: Any):
        unknown = sorted(set(run_info) - set(RUN_INFO_KEYS))
        if unknown:
            raise ValueError(f"logger=csv has no option {', '.join(unknown)}; its options: {', '.join(RUN_INFO_KEYS)}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_info = {k: list(v) if isinstance(v, list | tuple) else v for k, v in run_info.items()}
        atomic_write_text(self.run_dir / "logger.json", json.dumps({"kind": "csv", **self.run_info}, indent=2) + "\n")
        self.path = self.run_dir / filename
        self.columns: list[str] = ["step"]
        if self.path.is_file() and self.path.stat().st_size > 0:
            with open(self.path, newline="") as f:
                self.columns = next(csv.reader(f))

    def _rewrite_with(self, columns: list[str]) -> None:
        rows: list[dict[str, str]] = []
        if self.path.is_file():
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
        atomic_write_csv(self.path, columns, rows)
        self.columns = columns

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        new = [k for k in metrics if k not in self.columns]
        if new or not self.path.is_file():
            self._rewrite_with(self.columns + new)
        row = {"step": step, **{k: _scalar(v) for k, v in metrics.items()}}
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow(row)

    def log_images(self, key: str, image: ImageLike, step: int, caption: str = "") -> None:
        from PIL import Image

        folder = self.run_dir / "images"
        folder.mkdir(exist_ok=True)
        file = folder / f"{_safe_name(key)}_{step:08d}.png"
        if isinstance(image, torch.Tensor):
            Image.fromarray(image_to_uint8(image)).save(file)
        elif Path(image).resolve().parent == folder.resolve():
            file = Path(image)  # already an image of this run: index it, no second copy
        else:
            shutil.copyfile(image, file)
        index = folder / "index.csv"
        is_new = not index.is_file()
        with open(index, "a", newline="") as f:
            writer = csv.writer(f)
            if is_new:
                writer.writerow(["key", "step", "file", "caption"])
            writer.writerow([key, step, file.name, caption])

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        folder = self.run_dir / "tables"
        folder.mkdir(exist_ok=True)
        with open(folder / f"{_safe_name(key)}_{step:08d}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows([[_scalar(v) for v in row] for row in rows])

    def summary(self, metrics: Mapping[str, Any]) -> None:
        file = self.run_dir / "summary.json"
        merged = json.loads(file.read_text()) if file.is_file() else {}
        merged.update({k: _scalar(v) for k, v in metrics.items()})
        atomic_write_text(file, json.dumps(merged, indent=2, sort_keys=True) + "\n")

    def finish(self) -> None:
        pass  # every call closes its files


def wandb_credentials_configured() -> bool:
    """True when ``WANDB_API_KEY`` is set or the netrc file (``$NETRC`` or ``~/.netrc``) has an
    entry for the W&B host (``WANDB_BASE_URL``, default api.wandb.ai)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger(RunLogger):
    """Weights & Biases run whose files live in ``run_dir/wandb/``.

    mode: "online" | "offline" | "disabled"; default ``$WANDB_MODE``, else online when credentials are
    configured (:func:`wandb_credentials_configured`), else offline (sync later with ``wandb sync``).
    ``init_kwargs`` go to ``wandb.init`` (e.g. ``id=..., resume="allow"`` to continue a run).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        project: str,
        entity: str | None = None,
        group: str | None = None,
        tags: Sequence[str] = (),
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        mode: str | None = None,
        **init_kwargs: Any,
    ):
        import wandb

        self._wandb = wandb
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.mode = (
            mode
            or os.environ.get("WANDB_MODE")
            or ("online" if wandb_credentials_configured() else "offline")
        )
        self.run = wandb.init(
            dir=str(self.run_dir),
            project=project,
            entity=entity,
            group=group,
            tags=list(tags),
            name=name or None,
            config=dict(config) if config is not None else None,
            mode=self.mode,
            **init_kwargs,
        )
        self._finished = False

    @property
    def run_id(self) -> str:
        return self.run.id

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log({k: _scalar(v) for k, v in metrics.items()}, step=step)

    def log_images(self, key: str, image: ImageLike, step: int, caption: str = "") -> None:
        data = image_to_uint8(image) if isinstance(image, torch.Tensor) else str(image)
        self.run.log({key: self._wandb.Image(data, caption=caption or None)}, step=step)

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        table = self._wandb.Table(columns=list(columns), data=[[_scalar(v) for v in row] for row in rows])
        self.run.log({key: table}, step=step)

    def summary(self, metrics: Mapping[str, Any]) -> None:
        self.run.summary.update({k: _scalar(v) for k, v in metrics.items()})

    def finish(self) -> None:
        if not self._finished:
            self._finished = True
            self.run.finish()


def build_logger(kind: str, run_dir: str | os.PathLike, is_main_process: bool, **kwargs: Any) -> RunLogger:
    """``kind`` in LOGGER_KINDS; kwargs go to the logger (WandbLogger: project, entity, ...).
    Non-main processes always get a :class:`NoLogger`."""
    if kind not in LOGGER_KINDS:
        raise ValueError(f"unknown logger kind {kind!r}; expected one of {LOGGER_KINDS}")
    if not is_main_process or kind == "none":
        return NoLogger()
    if kind == "csv":
        return CSVLogger(run_dir, **kwargs)
    return WandbLogger(run_dir, **kwargs)


def persistent_run_id(run_dir: str | os.PathLike, fresh: bool = False) -> str:
    """The W&B run id kept in ``run_dir/wandb_run_id.txt``: read when it is there (a resumed or
    requeued run continues the same W&B run), else (or with ``fresh``) a new one, written first."""
    file = Path(run_dir) / RUN_ID_FILE
    if file.is_file() and not fresh:
        stored = file.read_text().strip()
        if re.fullmatch(r"[a-z0-9]{1,64}", stored):
            return stored
    import uuid

    run_id = uuid.uuid4().hex[:12]
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(file, run_id + "\n")
    return run_id


def hydra_run_name() -> str | None:
    """``hydra:job.override_dirname`` of the running Hydra job (e.g. ``train.keep_candidates=[36]``),
    or None outside Hydra or without overrides."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().job.override_dirname or None
    except (ImportError, ValueError):  # HydraConfig.get() raises ValueError when no job runs
        return None


def logger_from_config(
    config: Mapping[str, Any], run_dir: str | os.PathLike, is_main_process: bool = True
) -> RunLogger:
    """The logger an entry's resolved ``config`` asks for: its ``logger`` group (``kind`` plus that
    logger's options; absent means ``none``). ``name: null`` becomes the Hydra overrides
    (:func:`hydra_run_name`). A W&B run also gets the whole ``config`` as its run config and
    ``job_type=config["task"]`` (train_ar, sample, evaluate, ...) to tell entries apart; for a training
    entry (its config has ``resume``) rank 0 keeps the run id in the run directory and passes
    ``id=..., resume="allow"``, so ``resume=auto`` and requeues continue one W&B run
    (``resume=never`` starts a new one)."""
    options = dict(config.get("logger") or {"kind": "none"})
    kind = options.pop("kind")
    if options.get("name") is None and "name" in options:
        options["name"] = hydra_run_name()
    if kind == "wandb":
        options["config"] = config
        if config.get("task"):
            options.setdefault("job_type", config["task"])
        if is_main_process and "resume" in config:
            options.setdefault("id", persistent_run_id(run_dir, fresh=config["resume"] == "never"))
            options.setdefault("resume", "allow")
    return build_logger(kind, run_dir, is_main_process, **options)


# ------------------------------------------------------------------------------ reading offline runs

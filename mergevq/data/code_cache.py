"""Pre-tokenized stage-II data: per-image code grids of a frozen tokenizer, stored as safetensors shards.

Shapes: N images in a shard, L = h * w raster positions, K kept tokens (may differ per image).

Layout of a cache directory (written by ``python -m mergevq.entries.pretokenize ckpt=... out=DIR``)::

    shard_00000.safetensors   grid_codes [N, L] int32  code of the group owning each position
                              groups     [N, L] int16 (int32 when L > 32767) canonical group labels
                                         in [0, K): group k's first raster position increases with k
                              keep       [N] int32      K of the image (number of distinct groups)
                              label      [N] int64      class label
                              flip       [N] bool       the image was mirrored horizontally
                              index      [N] int64      index of the source image in the dataset
    index.json                see ``CodeCacheWriter``; written last, so a cache without it is incomplete

Every file is written to ``<name>.tmp-<pid>`` and renamed (``mergevq.runs.atomic``). One process writes
``shard_NNNNN`` + ``index.json``; with several processes rank r writes ``shard_rR_NNNNN`` +
``index_rR.json`` and, after a barrier, rank 0 calls ``merge_rank_indexes`` to write ``index.json``.
"""

from __future__ import annotations

import bisect
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from ..runs.atomic import atomic_write, atomic_write_text

FORMAT_VERSION = 1
KIND = "mergevq-code-cache"
INDEX_FILE = "index.json"
FIELDS = ("grid_codes", "groups", "keep", "label", "flip", "index")
CREATE_HINT = "create it with `python -m mergevq.entries.pretokenize ckpt=<tokenizer run or checkpoint dir> out=<dir>`"


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def is_canonical(groups: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """groups [B, L], keep [B] -> [B] bool: labels lie in [0, keep), each is used, and the first raster
    position of group k increases with k (the order ``Tokens`` uses)."""
    batch, positions = groups.shape
    size = max(int(keep.max()), int(groups.max()) + 1) if batch else 1
    if batch and int(groups.min()) < 0:
        return torch.zeros(batch, dtype=torch.bool)
    first = torch.full((batch, size), positions, dtype=torch.long)
    first = first.scatter_reduce(1, groups, torch.arange(positions).expand(batch, -1), reduce="amin")
    slot = torch.arange(size).expand(batch, -1)
    used = slot < keep[:, None]
    increasing = torch.ones(batch, size, dtype=torch.bool)
    increasing[:, 1:] = first[:, 1:] > first[:, :-1]
    return ((first < positions) == used).all(1) & (increasing | ~used).all(1)


def rank_index_file(rank: int) -> str:
    return f"index_r{rank}.json"


class CodeCacheWriter:
    """Accumulates encoded images and writes them as shards of ``shard_size`` items.

    meta: JSON-able description copied into the index (``mergevq.entries.pretokenize`` passes grid,
        codebook_bits, tokenizer {checkpoint, weights, weights_sha256, ...}, data, keep, flip).
        When it holds ``grid`` (h, w), every image must have h * w positions.
    rank: None for a single writer (``shard_NNNNN``, ``index.json``); r for one of several
        processes (``shard_rR_NNNNN``, ``index_rR.json``; see ``merge_rank_indexes``).

    The index (``index.json``) holds ``meta`` plus: format_version, kind, num_items,
    shards [{file, count}], num_positions (L), dtypes, created (UTC ISO time).
    """

    def __init__(self, out_dir: str | Path, shard_size: int = 10000, meta: Mapping[str, Any] | None = None,
                 rank: int | None = None):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size, self.meta, self.rank = shard_size, dict(meta or {}), rank
        self.shards: list[dict[str, Any]] = []
        self.num_positions: int | None = None
        self.num_items = 0
        self._pending: dict[str, list[torch.Tensor]] = {name: [] for name in FIELDS}
        self._pending_count = 0
        self._closed = False

    # ------------------------------------------------------------------ writing
    def add(self, codes: torch.Tensor, groups: torch.Tensor, keep: torch.Tensor, labels: torch.Tensor,
            flip: torch.Tensor, indices: torch.Tensor | None = None) -> None:
        """codes [B, K] (row b uses its first keep[b] entries), groups [B, L] in [0, keep[b]),
        keep [B], labels [B], flip [B] bool, indices [B] source-dataset indices (default: running count)."""
        if self._closed:
            raise RuntimeError("CodeCacheWriter.add after close()")
        codes, groups = codes.detach().long().cpu(), groups.detach().long().cpu()
        batch, positions = groups.shape
        keep = torch.as_tensor(keep).detach().long().cpu().reshape(-1)
        if codes.dim() != 2 or codes.shape[0] != batch or keep.shape[0] != batch:
            raise ValueError(f"codes {tuple(codes.shape)}, groups {tuple(groups.shape)} and keep "
                             f"{tuple(keep.shape)} must share the batch dimension")
        self._check_positions(positions)
        if batch and (int(keep.max()) > codes.shape[1] or not bool(is_canonical(groups, keep).all())):
            raise ValueError("groups must be canonical labels in [0, keep[b]) (group k's first raster position "
                             "increasing with k, every group used) and keep <= codes.shape[1]")
        if codes.numel() and int(codes.max()) > torch.iinfo(torch.int32).max:
            raise ValueError("codes do not fit in int32")
        if indices is None:
            indices = torch.arange(self.num_items + self._pending_count,
                                   self.num_items + self._pending_count + batch)
        values = {
            "grid_codes": codes.gather(1, groups).to(torch.int32),
            "groups": groups.to(torch.int16 if positions <= torch.iinfo(torch.int16).max else torch.int32),
            "keep": keep.to(torch.int32),
            "label": torch.as_tensor(labels).detach().reshape(-1).long().cpu(),
            "flip": torch.as_tensor(flip).detach().reshape(-1).bool().cpu(),
            "index": torch.as_tensor(indices).detach().reshape(-1).long().cpu(),
        }
        wrong = [name for name, value in values.items() if value.shape[0] != batch]
        if wrong:
            raise ValueError(f"{wrong} must have one entry per image ({batch})")
        start = 0
        while start < batch:  # split across shard boundaries
            take = min(batch - start, self.shard_size - self._pending_count)
            for name, value in values.items():
                self._pending[name].append(value[start : start + take])
            self._pending_count += take
            start += take
            if self._pending_count == self.shard_size:
                self._flush()

    def _check_positions(self, positions: int) -> None:
        if self.num_positions is None:
            grid = self.meta.get("grid")
            if grid is not None and math.prod(grid) != positions:
                raise ValueError(f"groups have {positions} positions but meta grid {grid} has {math.prod(grid)}")
            self.num_positions = positions
        elif positions != self.num_positions:
            raise ValueError(f"groups have {positions} positions, earlier batches {self.num_positions}")

    def _shard_name(self, number: int) -> str:
        prefix = "shard_" if self.rank is None else f"shard_r{self.rank}_"
        return f"{prefix}{number:05d}.safetensors"

    def _flush(self) -> None:
        if self._pending_count == 0:
            return
        tensors = {field: torch.cat(parts).contiguous() for field, parts in self._pending.items()}
        file = self._shard_name(len(self.shards))
        _atomic_save_tensors(self.out_dir / file, tensors, {"format": KIND, "version": str(FORMAT_VERSION)})
        self.shards.append({"file": file, "count": self._pending_count})
        self.num_items += self._pending_count
        self._pending = {field: [] for field in FIELDS}
        self._pending_count = 0

    def index(self) -> dict[str, Any]:
        """The index describing what has been flushed so far."""
        return {
            **self.meta,
            "format_version": FORMAT_VERSION,
            "kind": KIND,
            "num_items": self.num_items,
            "shards": list(self.shards),
            "num_positions": self.num_positions,
            "dtypes": {"grid_codes": "int32", "groups": "int16 (int32 when L > 32767)", "keep": "int32",
                       "label": "int64", "flip": "bool", "index": "int64"},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def close(self) -> Path:
        """Flush the last (partial) shard and write the index (atomically) -> its path."""
        self._flush()
        self._closed = True
        name = INDEX_FILE if self.rank is None else rank_index_file(self.rank)
        path = self.out_dir / name
        atomic_write_text(path, json.dumps(self.index(), indent=2, default=str))
        return path

    def __enter__(self) -> CodeCacheWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None and not self._closed:
            self.close()


def merge_rank_indexes(out_dir: str | Path, ranks: Sequence[int], remove: bool = True) -> Path:
    """Combine ``index_rR.json`` of the given ranks (in that order) into ``index.json`` -> its path.

    The ranks must agree on everything but shards, num_items and created; positions of ranks
    that wrote nothing (num_positions None) are ignored.
    """
    out_dir = Path(out_dir)
    parts = [read_index(out_dir / rank_index_file(r)) for r in ranks]
    if not parts:
        raise ValueError("merge_rank_indexes needs at least one rank")
    varying = ("shards", "num_items", "created", "num_positions")
    reference = {k: v for k, v in parts[0].items() if k not in varying}
    for rank, part in zip(ranks, parts):
        if {k: v for k, v in part.items() if k not in varying} != reference:
            raise ValueError(f"{out_dir / rank_index_file(rank)} describes a different cache than rank {ranks[0]}")
    positions = {p["num_positions"] for p in parts if p["num_positions"] is not None}
    if len(positions) > 1:
        raise ValueError(f"ranks disagree on the number of positions: {sorted(positions)}")
    merged = {
        **parts[0],
        "num_items": sum(p["num_items"] for p in parts),
        "shards": [shard for p in parts for shard in p["shards"]],
        "num_positions": positions.pop() if positions else None,
        "ranks": len(parts),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = out_dir / INDEX_FILE
    atomic_write_text(path, json.dumps(merged, indent=2, default=str))
    if remove:
        for rank in ranks:
            (out_dir / rank_index_file(rank)).unlink(missing_ok=True)
    return path


def read_index(path: str | Path) -> dict[str, Any]:
    """Parse an index file; a missing or unreadable one raises FileNotFoundError/ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no code cache index at {path}: {CREATE_HINT}")
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"code cache index {path} is unreadable ({error}); {CREATE_HINT}") from error
    missing = [k for k in ("format_version", "num_items", "shards") if not isinstance(index, dict) or k not in index]
    if missing:
        raise ValueError(f"code cache index {path} lacks {missing} (not a mergevq code cache?); {CREATE_HINT}")
    if index["format_version"] > FORMAT_VERSION:
        raise ValueError(f"code cache {path} has format {index['format_version']}, this code reads "
                         f"<= {FORMAT_VERSION}: update mergevq or re-create the cache")
    return index


class CodeCache(Dataset):
    """Dataset over a code cache directory; item i ->
    {grid_codes int64 [L], groups int64 [L], keep int64 [], label int64 [], flip bool [], index int64 []}.

    Shards are opened lazily with ``safe_open`` (memory-mapped; one row is read per item), so random
    access is cheap and DataLoader workers each open their own handles after fork/spawn.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._meta = read_index(self.directory / INDEX_FILE)
        counts = [int(s["count"]) for s in self._meta["shards"]]
        if sum(counts) != self._meta["num_items"]:
            raise ValueError(f"{self.directory / INDEX_FILE}: shard counts sum to {sum(counts)}, "
                             f"num_items is {self._meta['num_items']}; {CREATE_HINT}")
        self._ends = [sum(counts[: i + 1]) for i in range(len(counts))]
        missing = [s["file"] for s in self._meta["shards"] if not (self.directory / s["file"]).is_file()]
        if missing:
            raise FileNotFoundError(f"code cache {self.directory} misses shards {missing[:3]}"
                                    f"{' ...' if len(missing) > 3 else ''}; {CREATE_HINT}")
        self._handles: dict[int, Any] = {}

    @property
    def meta(self) -> dict[str, Any]:
        """The parsed index.json."""
        return self._meta

    @property
    def num_positions(self) -> int:
        return int(self._meta["num_positions"])

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self._meta["grid"])

    def __len__(self) -> int:
        return int(self._meta["num_items"])

    def _handle(self, shard: int):
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.directory / self._meta["shards"][shard]["file"]), framework="pt")
        return self._handles[shard]

    def locate(self, i: int) -> tuple[int, int]:
        """Item index -> (shard number, row in that shard)."""
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range for a code cache of {len(self)} items")
        shard = bisect.bisect_right(self._ends, i)
        return shard, i - (self._ends[shard - 1] if shard else 0)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        shard, row = self.locate(int(i))
        handle = self._handle(shard)
        item = {name: handle.get_slice(name)[row : row + 1][0] for name in FIELDS}
        out = {name: item[name].long() for name in ("grid_codes", "groups", "keep", "label", "index")}
        out["flip"] = item["flip"].bool()
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}  # file handles do not travel to spawned workers
        return state


class KeepPerSample(Dataset):
    """One item per (source image, flip) of a cache that holds several K per image
    (``mergevq.entries.pretokenize keeps_per_image=n``): each access returns one of that image's items, picked
    with torch's global RNG, which ``SeededItems`` seeds by (seed, epoch, index), so K is drawn
    afresh per sample and epoch and a resumed run draws the same. ``keeps`` restricts the items to those
    K (e.g. the raster baseline trains on the K = L items of a cache that also holds merged ones); an
    image without an item at those K is left out."""

    def __init__(self, cache: CodeCache, keeps: Sequence[int] | None = None):
        self.cache = cache
        wanted = None if keeps is None else {int(k) for k in keeps}
        items: dict[tuple[int, bool], list[int]] = {}
        start = 0
        for shard in cache.meta["shards"]:
            with safe_open(str(cache.directory / shard["file"]), framework="pt") as handle:
                keys = zip(handle.get_tensor("index").tolist(), handle.get_tensor("flip").tolist(),
                           handle.get_tensor("keep").tolist())
                for offset, (index, flip, keep) in enumerate(keys):
                    if wanted is None or keep in wanted:
                        items.setdefault((index, flip), []).append(start + offset)
            start += int(shard["count"])
        if not items:
            raise ValueError(f"the code cache {cache.directory} holds no item at K in {sorted(wanted)}: "
                             f"its K are {cache_contents(cache)['keeps']}")
        self.items = [items[key] for key in sorted(items)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        choices = self.items[i]
        return self.cache[choices[int(torch.randint(len(choices), ())) if len(choices) > 1 else 0]]


def training_items(cache: CodeCache, keeps: Sequence[int] | None = None) -> Dataset:
    """What stage II iterates: ``KeepPerSample`` when the cache holds several K per image or only the
    items at ``keeps`` are wanted, else the cache itself."""
    if keeps is not None or int(cache.meta.get("keeps_per_image", 1)) > 1:
        return KeepPerSample(cache, keeps)
    return cache


def cache_contents(cache: CodeCache) -> dict[str, list[int]]:
    """The keep counts and class labels present in a code cache (read from the shards' small tensors)."""
    from safetensors import safe_open

    keeps, labels = set(), set()
    for shard in cache.meta["shards"]:
        with safe_open(str(cache.directory / shard["file"]), framework="pt") as handle:
            keeps.update(handle.get_tensor("keep").tolist())
            labels.update(handle.get_tensor("label").tolist())
    return {"keeps": sorted(int(k) for k in keeps), "classes": sorted(int(c) for c in labels)}

"""Content checks of checkpoint files: SHA-256 per file (recorded in state.json at write time,
compared at load) and damaged-file errors that name the file."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

log = logging.getLogger(__name__)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_checked(file: Path, load: Callable[[], Any]) -> Any:
    """``load()``, with a damaged file's error (truncated zip, incomplete safetensors header) naming it."""
    try:
        return load()
    except (OSError, RuntimeError, ValueError, EOFError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise CheckpointError(f"{file} is damaged and cannot be read ({' '.join(str(error).split())[:160]}): "
                              "use another checkpoint") from None


def verify_files(path: Path, names: list[str], state: Mapping[str, Any]) -> None:
    """Compare the named files of checkpoint ``path`` with the SHA-256 recorded in its state.json;
    a mismatch raises :class:`CheckpointError` naming the file. Old checkpoints without hashes pass."""
    path = Path(path)
    recorded = state.get("files")
    if recorded is None:
        log.info("%s was written without content hashes (an older mergevq): its files are not verified", path)
        return
    for name in names:
        file = path / name
        if name in recorded and file.is_file() and sha256_file(file) != recorded[name]:
            raise CheckpointError(f"{file} does not match the SHA-256 recorded when it was written (the file is "
                                  "damaged or was changed): use another checkpoint")

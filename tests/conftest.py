import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


def load_group(group: str, name: str) -> dict:
    """One config group option as a plain dict (interpolations are not needed by model groups)."""
    return yaml.safe_load((ROOT / "conf" / group / f"{name}.yaml").read_text())


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES

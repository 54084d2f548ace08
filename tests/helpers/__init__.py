"""Shared test helpers (import as ``from helpers.X import ...``; tests/ is on sys.path):

* ``helpers.models``: the tiny tokenizer, a tokenizer run directory without training, config groups
* ``helpers.entries``: compose an entry's config, run its task in-process, run a module in a subprocess
* ``helpers.wandb``: the offline W&B fixture (also in conftest) and reading an offline run back
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"

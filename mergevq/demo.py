"""`make demo` (first stage of the pipeline): reconstruct held-out photos with the tiny G+R tokenizer at
several K and write a grid PNG. The weights are randomly initialised until the training job lands,
so the reconstructions show the mechanics (merging, quantization, unmerging), not quality; the
output says so.

    python -m mergevq.demo [out=outputs/demo] [keeps=25,36,49,64]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import yaml
from torchvision.utils import save_image

from .data import build_dataset
from .models.factory import build_tokenizer

CONF = Path(__file__).resolve().parents[1] / "conf"


def _group(group: str, name: str) -> dict:
    return yaml.safe_load((CONF / group / f"{name}.yaml").read_text())


def main(argv: list[str]) -> Path:
    options = dict(arg.split("=", 1) for arg in argv)
    out = Path(options.get("out", "outputs/demo"))
    keeps = [int(k) for k in options.get("keeps", "25,36,49,64").split(",")]
    torch.manual_seed(0)
    tok = build_tokenizer(_group("tokenizer", "tiny"), _group("variant", "gr"), {"bits": 18}).eval()
    data = build_dataset("photos", "val", size=32, num_samples=8, crop_size=64)
    x = torch.stack([data[i]["image"] for i in range(len(data))])
    rows = [x]
    with torch.no_grad():
        for keep in keeps:
            tokens = tok.encode(x, keep=keep)
            rows.append(tok.decode(tokens).clamp(-1, 1))
            print(f"K={keep:4d}: codes {tuple(tokens.codes.shape)}, groups {tuple(tokens.groups.shape)}")
    out.mkdir(parents=True, exist_ok=True)
    grid = out / "reconstructions_untrained.png"
    save_image(torch.cat(rows) * 0.5 + 0.5, grid, nrow=len(x))
    print(f"wrote {grid} (rows: originals, then K={keeps}; UNTRAINED random weights)")
    return grid


if __name__ == "__main__":
    main(sys.argv[1:])

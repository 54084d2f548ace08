"""`make demo`'s report: per_k.md, generation.json with the class-accuracy keys, and index.html with
every picture, checked (slow) in headless Chromium as a reader would see it."""

import csv
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from mergevq.entries.demo_report import GENERATION_KEYS, per_class_rows, report
from mergevq.runs.browser import find_chromium, render

KEEPS = (16, 25, 36, 64)
ROUTES = {"raster": None, "mergear": 36, "randar": 36}


def png(path, width=64, height=32, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def demo_dir(root):
    """What the demo's runs leave behind, with made-up numbers (the page, not the models, is tested)."""
    run = root / "demo"
    run.mkdir(parents=True)
    with (run / "val_per_k.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["keep", "psnr", "l1", "code_usage"])
        writer.writerows([[k, 20 + k / 32, 0.1, 0.5] for k in KEEPS])
    png(run / "images" / "reconstructions_step00000800.png", 256, 160, 1)
    png(run / "images" / "merge_maps_step00000800.png", 256, 160, 2)
    png(run / "eval" / "per_k.png", 120, 80, 3)
    metrics = {str(k): {"rfid": 30 - k / 4, "psnr": 20 + k / 32, "ssim": 0.7, "class_accuracy": 0.8,
                        "psnr_recovered": 19.0, "class_accuracy_recovered": 0.78, "recovery_accuracy": 0.7} for k in KEEPS}
    write(run / "eval" / "eval_card.json", {"metrics": metrics, "num_images": 40, "warnings": [],
                                             "feature_extractor": {"name": "tf-inception"},
                                             "classifier": {"held_out_accuracy": 0.91, "original_class_accuracy": 0.92}})
    for index, (route, keep) in enumerate(ROUTES.items()):
        folder = run / f"samples_{route}"
        png(folder / "samples.png", 200, 200, 10 + index)
        write(folder / "sampling.json", {"keep": keep, "positions": 64, "steps": 64 if route != "randar" else 13,
                                         "num_samples": 200, "tokens_per_s": 1000.0, "images_per_s": 16.0,
                                         "groups_mean": float(keep or 64), "groups_max": keep or 64,
                                         "peak_kv_mean": 41.0, "peak_kv_max": 44, "prefix_tokens": 1, "window": None})
        write(folder / "eval_card.json", {"metrics": {"gfid": 120.0, "precision": 0.3, "recall": 0.1,
                                                      "class_accuracy": 0.7 - index / 20},
                                          "classifier_accuracy": 0.91, "reference": {"num_images": 400},
                                          "class_accuracy": {"per_class": {"0": 0.7, "1": (4 + index) / 10}}})
    return run


def test_report_writes_every_table_and_the_page(tmp_path):
    run = demo_dir(tmp_path)
    report(run)
    rows = json.loads((run / "generation.json").read_text())
    assert [r["generator"] for r in rows] == list(ROUTES)
    for row in rows:
        assert set(GENERATION_KEYS) <= set(row) and row["classifier_accuracy"] == 0.91
        assert row["class_accuracy"] is not None and row["num_samples"] == 200
    assert rows[0]["keep"] == 64  # the raster baseline keeps every position
    markdown = (run / "per_k.md").read_text()
    assert "class_accuracy_recovered" in markdown and "originals: 0.9200" in markdown
    page = (run / "index.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert {"reconstructions.png", "images/merge_maps_step00000800.png", "eval/per_k.png",
            *(f"samples_{route}/samples.png" for route in ROUTES)} == set(sources)
    assert all((run / src).is_file() for src in sources)
    assert "class accuracy 0.700" in page and "Generation routes" in page
    assert per_class_rows(rows) == [{"class": 0, "raster": 0.7, "mergear": 0.7, "randar": 0.7},
                                    {"class": 1, "raster": 0.4, "mergear": 0.5, "randar": 0.6}]
    assert "Class accuracy per class" in page


def test_page_without_samples_or_evaluation_still_has_the_tokenizer(tmp_path):
    run = demo_dir(tmp_path)
    for folder in ["eval", *(f"samples_{route}" for route in ROUTES)]:
        shutil.rmtree(run / folder)
    report(run)
    page = (run / "index.html").read_text()
    assert re.findall(r'<img src="([^"]+)"', page) == ["reconstructions.png", "images/merge_maps_step00000800.png"]
    assert not (run / "generation.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(find_chromium() is None, reason="needs Chromium (.ci/run installs Debian's chromium)")
def test_page_renders_with_every_image_in_chromium(tmp_path):
    run = demo_dir(tmp_path)
    report(run)
    seen = render(run / "index.html", tmp_path / "index.png", height=1600)
    assert len(seen.images) == 6 and not seen.missing, seen.images
    assert seen.console == []
    assert seen.screenshot is not None and Image.open(seen.screenshot).size == (1280, 1600)
    (run / "samples_mergear" / "samples.png").unlink()  # the check can fail: a missing picture is seen
    assert render(run / "index.html").missing == ["samples_mergear/samples.png"]

import gzip
import io
import logging
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mergevq.data import (
    DATASETS,
    PHOTO_NAMES,
    FashionMNIST,
    ImageFolderDataset,
    Photos,
    build_dataset,
    fetch_fashion_mnist,
    read_idx,
    three_views,
    to_rgb,
    val_views,
)
from mergevq.data.fashion_mnist import SYSTEM_DIR, _has_files
from mergevq.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def _noise(h, w, c=3, seed=0):
    shape = (h, w, c) if c > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ---------------------------------------------------------------- transforms

def test_three_views_shapes_and_ranges():
    torch.manual_seed(0)
    blocks = np.kron(_noise(5, 7) // 128 * 255, np.ones((10, 10, 1), np.uint8))  # 50x70, black/white
    out = three_views(size=32, align_size=28)(Image.fromarray(blocks))
    assert set(out) == {"image", "image_aug_w", "image_aug_s"}
    assert out["image"].shape == (3, 32, 32)
    assert out["image_aug_w"].shape == out["image_aug_s"].shape == (3, 28, 28)
    assert all(v.dtype == torch.float32 for v in out.values())
    for key in ("image", "image_aug_s"):
        assert out[key].min() >= -1 and out[key].max() <= 1
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    unnorm = out["image_aug_w"] * std + mean
    assert unnorm.min() >= -1e-5 and unnorm.max() <= 1 + 1e-5
    # large black and white blocks survive resizing: both ends of the range are reached
    assert out["image"].min() < -0.9 and out["image"].max() > 0.9


def test_only_requested_views_are_built():
    views = three_views(32, 28, views=("image",))
    assert list(views.pipelines) == ["image"]
    assert set(views(Image.fromarray(_noise(40, 40)))) == {"image"}
    with pytest.raises(ValueError, match="image_aug_w"):
        three_views(32, 28, views=("image", "nope"))


def test_small_image_is_resized_up_to_every_crop():
    out = three_views(32, 28)(Image.fromarray(_noise(7, 10)))
    assert out["image"].shape == (3, 32, 32) and out["image_aug_w"].shape == (3, 28, 28)
    assert val_views(32)(Image.fromarray(_noise(5, 3)))["image"].shape == (3, 32, 32)


def test_val_view_is_deterministic_center_crop():
    img = Image.fromarray(_noise(40, 60))  # resized to 32x48: the centre crop leaves 8 px per side
    a, b = val_views(32)(img)["image"], val_views(32)(img)["image"]
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    # a left/right mirrored input gives the mirrored output: the crop is centred
    c = val_views(32)(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))["image"]
    torch.testing.assert_close(c, a.flip(-1), atol=2 / 255, rtol=0)


def test_recon_view_has_no_flip_and_student_view_flips():
    # a 32x32 image is not resized and its only 32-crop is itself: the recon view is the identity
    arr = _noise(32, 32)
    img = Image.fromarray(arr)
    expected = torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1
    torch.manual_seed(0)
    for _ in range(8):
        torch.testing.assert_close(three_views(32, 32, views=("image",))(img)["image"], expected)
    # the strong view with scale 1 on a square image is a flip or not; over 20 draws both happen
    student = three_views(32, 32, views=("image_aug_s",)).pipelines["image_aug_s"]
    student.transforms[0].scale = (1.0, 1.0)  # square input: the crop is then the whole image
    flips = {bool(torch.allclose(student(img), expected.flip(-1), atol=1e-5)) for _ in range(20)}
    assert flips == {True, False}


def test_to_rgb_modes():
    sixteen = Image.fromarray(np.array([[0, 257, 32896, 65535]], dtype=np.uint16))
    assert sixteen.mode == "I;16"
    assert np.array(to_rgb(sixteen))[0, :, 0].tolist() == [0, 1, 128, 255]
    assert np.array(to_rgb(Image.new("RGBA", (2, 2), (10, 20, 30, 0)))).tolist() == [[[255] * 3] * 2] * 2
    assert to_rgb(Image.new("RGBA", (1, 1), (10, 20, 30, 255))).getpixel((0, 0)) == (10, 20, 30)
    assert to_rgb(Image.new("CMYK", (1, 1), (0, 255, 0, 0))).getpixel((0, 0)) == (255, 0, 255)
    assert to_rgb(Image.new("L", (1, 1), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert to_rgb(Image.new("LA", (1, 1), (77, 255))).getpixel((0, 0)) == (77, 77, 77)
    assert to_rgb(Image.new("F", (1, 1), 0.5)).getpixel((0, 0)) == (128, 128, 128)
    assert to_rgb(Image.new("1", (1, 1), 1)).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("RGB", (1, 1), (1, 2, 3)).convert("P")
    assert to_rgb(palette).mode == "RGB" and to_rgb(palette).size == (1, 1)


# ---------------------------------------------------------------- photos

def test_photos_split_disjoint_and_crops_seeded():
    train, val = Photos("train", 30, crop_size=64, seed=1), Photos("val", 10, crop_size=64, seed=1)
    train_labels = {train[i][1] for i in range(len(train))}
    val_labels = {val[i][1] for i in range(len(val))}
    assert len(val_labels) == 2 and len(train_labels) == len(PHOTO_NAMES) - 2
    assert not train_labels & val_labels
    img, _ = train[5]
    assert img.mode == "RGB" and img.size == (64, 64)
    assert np.array_equal(np.array(img), np.array(Photos("train", 30, 64, seed=1)[5][0]))
    assert not np.array_equal(np.array(img), np.array(Photos("train", 30, 64, seed=2)[5][0]))
    with pytest.raises(IndexError):
        train[30]
    with pytest.raises(ValueError, match="split"):
        Photos("test")


# ---------------------------------------------------------------- class folders

def _save(img, path, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt)


@pytest.fixture
def messy_tree(tmp_path):
    """root/{a,b,c}: 8 readable images in many modes, 2 unreadable, class c empty."""
    root = tmp_path / "tree"
    a = root / "a"
    _save(Image.fromarray(_noise(40, 48)), a / "rgb.JPG")
    _save(Image.fromarray(_noise(40, 48, 1)), a / "gray.png")
    _save(Image.fromarray(_noise(40, 48)).convert("CMYK"), a / "cmyk.jpg")
    _save(Image.fromarray(_noise(40, 48, 1).astype(np.uint16) * 257), a / "sixteen.png")
    _save(Image.fromarray(_noise(40, 48, 4)), a / "rgba.png")
    _save(Image.fromarray(_noise(6, 8)), a / "tiny.png")
    _save(Image.fromarray(_noise(40, 48)).convert("P"), a / "sub" / "palette.gif")
    (a / "corrupt.jpg").write_bytes(b"definitely not an image" * 10)
    buf = io.BytesIO()
    Image.fromarray(_noise(64, 64)).save(buf, "JPEG")
    (a / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (a / "notes.txt").write_text("ignored")
    _save(Image.fromarray(_noise(30, 30)), root / "b" / "one.png")
    (root / "c").mkdir()
    return root


def test_folder_dataset_skips_unreadable_files(messy_tree, caplog):
    assert Image.open(messy_tree / "a" / "sixteen.png").mode == "I;16"
    with caplog.at_level(logging.WARNING):
        ds = build_dataset("folder", "train", root=messy_tree, size=32, align_size=28)
    assert any("has no images" in r.getMessage() and str(messy_tree / "c") in r.getMessage()
               for r in caplog.records)
    assert len(ds) == 10
    with caplog.at_level(logging.WARNING):
        items = [ds[i] for i in range(len(ds))]
    assert ds.num_skipped == 2
    warned = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    for bad in ("corrupt.jpg", "truncated.jpg"):
        assert any(str(messy_tree / "a" / bad) in msg for msg in warned)
    for item in items:
        assert item["image"].shape == (3, 32, 32) and item["image_aug_s"].shape == (3, 28, 28)
        assert item["label"].dtype == torch.int64 and item["label"].item() in (0, 1)
    assert sum(item["label"].item() == 1 for item in items) >= 1
    batch = next(iter(DataLoader(ds, batch_size=len(ds))))  # a whole epoch in one batch
    assert batch["image"].shape == (10, 3, 32, 32) and batch["label"].shape == (10,)
    assert ds.num_skipped == 2  # known-bad files are not counted twice


def test_folder_uses_split_subfolder_and_eval_view(messy_tree, tmp_path):
    _save(Image.fromarray(_noise(20, 20)), tmp_path / "split" / "val" / "x" / "v.png")
    _save(Image.fromarray(_noise(20, 20)), tmp_path / "split" / "train" / "x" / "t.png")
    ds = build_dataset("folder", "val", root=tmp_path / "split", size=32)
    assert len(ds) == 1 and set(ds[0]) == {"image", "label"}


def test_empty_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match=str(tmp_path / "empty")):
        ImageFolderDataset(tmp_path / "empty")
    with pytest.raises(ValueError, match="no images"):
        build_dataset("folder", root=tmp_path / "empty")


def test_build_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="fashion_mnist, photos, folder, imagenet"):
        build_dataset("cifar10")
    with pytest.raises(FileNotFoundError, match="data.root="):
        build_dataset("folder")
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*data.root="):
        build_dataset("imagenet", root=missing, cache_dir=tmp_path)
    (missing / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=f"{missing / 'val'}"):
        build_dataset("imagenet", "val", root=missing, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="split"):
        build_dataset("photos", "holdout")
    assert DATASETS == ("fashion_mnist", "photos", "folder", "imagenet")


def test_imagenet_file_list_is_cached(tmp_path):
    root, cache = tmp_path / "imagenet", tmp_path / "cache"
    for wnid in ("n01440764", "n01443537"):
        for i in range(2):
            _save(Image.fromarray(_noise(20, 24, seed=i)), root / "train" / wnid / f"{wnid}_{i}.JPEG")
    ds = build_dataset("imagenet", "train", root=root, cache_dir=cache, size=16, align_size=16,
                       views=("image",))
    lists = list((cache / "filelists").glob("train-*.txt"))
    assert len(lists) == 1
    assert lists[0].read_text().splitlines()[0] == "n01440764/n01440764_0.JPEG\t0"
    assert len(ds) == 4 and [ds[i]["label"].item() for i in range(4)] == [0, 0, 1, 1]
    assert set(ds[0]) == {"image", "label"}
    # a new image appears, but the cached list is reused
    _save(Image.fromarray(_noise(20, 24)), root / "train" / "n01443537" / "new.JPEG")
    assert len(build_dataset("imagenet", "train", root=root, cache_dir=cache, views=("image",))) == 4


def test_photos_through_builder():
    ds = build_dataset("photos", "val", size=32, num_samples=4, crop_size=48)
    item = ds[0]
    assert set(item) == {"image", "label"} and item["image"].shape == (3, 32, 32)
    assert ds.num_skipped == 0


# ---------------------------------------------------------------- Fashion-MNIST

def test_read_idx_round_trip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + np.array(arr.shape, ">u4").tobytes()
    with gzip.open(tmp_path / "x-idx3-ubyte.gz", "wb") as f:
        f.write(header + arr.tobytes())
    assert np.array_equal(read_idx(tmp_path / "x-idx3-ubyte.gz"), arr)
    (tmp_path / "short").write_bytes(header + arr.tobytes()[:-1])
    with pytest.raises(ValueError, match="bytes"):
        read_idx(tmp_path / "short")


def test_fetch_error_says_run_apt_get_update(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "apt-get"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'E: Unable to locate package dataset-fashion-mnist' >&2\nexit 100\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    with pytest.raises(RuntimeError, match=r"(?s)Unable to locate.*apt-get update"):
        fetch_fashion_mnist(tmp_path / "cache", system_dir=tmp_path / "none")


def _apt_can_download() -> bool:
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb") and shutil.which("apt-cache")):
        return False
    probe = subprocess.run(["apt-cache", "show", "dataset-fashion-mnist"], capture_output=True)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    if _apt_can_download():  # exercise the real fetch, even where the package is installed
        return fetch_fashion_mnist(cache, system_dir=cache / "no-system-files")
    if _has_files(SYSTEM_DIR):
        return fetch_fashion_mnist(cache)
    pytest.skip(f"Fashion-MNIST unavailable: {SYSTEM_DIR} lacks the IDX files and `apt-get download "
                "dataset-fashion-mnist` is not possible (no apt, or no package lists: run `apt-get update`)")


def test_fashion_mnist_fetch_and_read(fashion_dir):
    assert fetch_fashion_mnist(fashion_dir.parent, system_dir=fashion_dir.parent / "none") == fashion_dir
    ds = FashionMNIST(fashion_dir, "test")
    assert len(ds) == 10_000
    labels = set()
    for i in range(0, 10_000, 500):
        img, label = ds[i]
        assert img.mode == "RGB" and img.size == (32, 32)
        arr = np.array(img)
        assert arr[:2].max() == 0 and arr[:, -2:].max() == 0 and arr[2:30, 2:30].max() > 0
        labels.add(label)
    assert labels <= set(range(10)) and len(labels) >= 5
    item = build_dataset("fashion_mnist", "val", root=fashion_dir, size=32)[0]
    assert item["image"].shape == (3, 32, 32) and 0 <= item["label"].item() <= 9

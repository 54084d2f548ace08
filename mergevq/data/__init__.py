"""Datasets and view transforms: Fashion-MNIST (Debian package), shipped photos, class folders, ImageNet.

The names load on first use (PEP 562), so that ``mergevq.data.code_cache`` (stage II) imports
without torchvision."""

import importlib

_HOMES = {
    "datasets": ("DATASETS", "LabelledViews", "build_dataset", "build_transform", "default_cache_dir"),
    "fashion_mnist": ("FashionMNIST", "fetch_fashion_mnist", "read_idx"),
    "folder": ("ImageFolderDataset", "cached_file_list", "imagenet", "scan_class_folders"),
    "photos": ("PHOTO_NAMES", "VAL_PHOTOS", "Photos"),
    "transforms": ("VIEW_KEYS", "Views", "three_views", "to_rgb", "val_views"),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)


def __dir__() -> list[str]:
    return __all__

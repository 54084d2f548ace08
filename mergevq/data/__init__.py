"""Datasets and view transforms: Fashion-MNIST (Debian package), shipped photos, class folders, ImageNet."""

from mergevq.data.datasets import DATASETS, LabelledViews, build_dataset, build_transform, default_cache_dir
from mergevq.data.fashion_mnist import FashionMNIST, fetch_fashion_mnist, read_idx
from mergevq.data.folder import ImageFolderDataset, cached_file_list, imagenet, scan_class_folders
from mergevq.data.photos import PHOTO_NAMES, VAL_PHOTOS, Photos
from mergevq.data.transforms import VIEW_KEYS, Views, three_views, to_rgb, val_views

__all__ = [
    "DATASETS", "PHOTO_NAMES", "VAL_PHOTOS", "VIEW_KEYS", "FashionMNIST", "ImageFolderDataset",
    "LabelledViews", "Photos", "Views", "build_dataset", "build_transform", "cached_file_list",
    "default_cache_dir", "fetch_fashion_mnist", "imagenet", "read_idx", "scan_class_folders",
    "three_views", "to_rgb", "val_views",
]

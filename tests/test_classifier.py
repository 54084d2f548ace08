"""Class accuracy: the metric, the pixel classifier, its cache, and (slow) the Fashion-MNIST classifier's
held-out accuracy."""

import json

import pytest
import torch
from torch.utils.data import Dataset

from mergevq.eval import classifier as clf


def test_class_accuracy_counts_hits_overall_and_per_class():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 0, 0])
    scores = clf.class_accuracy(predicted, labels, num_classes=4)
    assert scores["class_accuracy"] == pytest.approx(3 / 6)
    assert scores["per_class"] == {0: 0.5, 1: 1.0, 2: 0.0}  # class 3 has no images: no entry
    assert scores["num_images"] == 6 and scores["trend_only"]
    assert not clf.class_accuracy(torch.zeros(1000), torch.zeros(1000))["trend_only"]
    with pytest.raises(ValueError, match="differ in shape"):
        clf.class_accuracy(torch.zeros(3), torch.zeros(4))


def test_classifier_maps_uint8_and_unit_range_alike():
    model = clf.PixelClassifier(num_classes=3, width=8).eval()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    floats = images.float() / 127.5 - 1
    assert model(floats).shape == (5, 3)
    assert torch.equal(clf.predict(model, images), clf.predict(model, floats))


class Stripes(Dataset):
    """Two classes a CNN separates at once: horizontal vs vertical stripes (random phase)."""

    def __init__(self, count: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 2, (count,), generator=generator)
        self.phases = torch.randint(0, 4, (count,), generator=generator)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        line = ((torch.arange(16) + self.phases[index]) // 2 % 2).float() * 2 - 1  # period 4
        grid = line[:, None].expand(16, 16) if self.labels[index] == 0 else line[None, :].expand(16, 16)
        return {"image": grid.expand(3, 16, 16).clone(), "label": self.labels[index]}


def test_trained_classifier_is_cached_and_verified(tmp_path, monkeypatch, one_thread):
    recipe = clf.ClassifierRecipe(width=8, epochs=2, batch_size=32)
    first = clf.load_or_train(Stripes(256, 0), Stripes(128, 1), "stripes", 2, tmp_path, recipe)
    assert first.accuracy > 0.95 and first.card["test_images"] == 128
    card_files = list(tmp_path.glob("*.json"))
    assert len(card_files) == 1 and json.loads(card_files[0].read_text())["held_out_accuracy"] == first.accuracy

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier was trained again")

    monkeypatch.setattr(clf, "train_classifier", no_training)
    again = clf.load_or_train(Stripes(256, 0), Stripes(128, 1), "stripes", 2, tmp_path, recipe)
    images = torch.stack([Stripes(64, 2)[i]["image"] for i in range(64)])
    assert torch.equal(again.predict(images), first.predict(images))

    with pytest.raises(AssertionError, match="trained again"):  # other training images: another key
        clf.load_or_train(Stripes(256, 5), Stripes(128, 1), "stripes", 2, tmp_path, recipe)
    weights = next(tmp_path.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # damaged in place: retrained, never used
    with pytest.raises(AssertionError, match="trained again"):
        clf.load_or_train(Stripes(256, 0), Stripes(128, 1), "stripes", 2, tmp_path, recipe)


def test_recipe_from_config_refuses_unknown_keys():
    assert clf.recipe_from({"enabled": "auto", "epochs": 1}).epochs == 1
    with pytest.raises(ValueError, match="epoch"):
        clf.recipe_from({"epoch": 1})


@pytest.mark.slow
def test_fashion_mnist_classifier_tells_classes(tmp_path):
    """The classifier of the demo and study: >= 90% on the held-out split; real held-out images scored
    as samples of their own class >= 90%, of shuffled classes about 10%."""
    from mergevq.data import build_dataset

    data = {"name": "fashion_mnist", "size": 32, "align_size": 28}
    model = clf.classifier_for(data, tmp_path)
    assert model.accuracy >= 0.90, model.card
    test = build_dataset("fashion_mnist", "val", size=32, align_size=28, views=("image",))
    images, labels = clf.dataset_images(test, limit=2000)
    assert model.score(images, labels)["class_accuracy"] >= 0.90
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    assert 0.05 <= model.score(images, shuffled)["class_accuracy"] <= 0.15

"""SeededItems draws each item's randomness from (seed, epoch, index) alone, on the CPU generator."""

import torch
from torch.utils.data import Dataset

from mergevq.engine.runner import SeededItems, mix_seed


class RandomItems(Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int):
        return torch.rand(3), torch.randint(0, 1000, (2,)), torch.randperm(5)


def test_items_equal_a_fresh_manual_seed_per_item_and_leave_the_global_rng_alone():
    items = SeededItems(RandomItems(), seed=7)
    items.epoch = 2
    torch.manual_seed(123)
    before = torch.get_rng_state()
    got = [items[i] for i in reversed(range(6))][::-1]  # order of access does not matter
    assert torch.equal(torch.get_rng_state(), before)
    for index, item in enumerate(got):
        torch.manual_seed(mix_seed(7, 2, index))
        for drawn, expected in zip(item, RandomItems()[index], strict=True):
            assert torch.equal(drawn, expected)
    items.epoch = 3
    assert not torch.equal(items[0][0], got[0][0])

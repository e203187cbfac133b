from itertools import combinations
from math import comb

import pytest

from dcal_lib.data import Split
from dcal_lib.pairs import make_pairs

# twins (3, 2 images), a triplet (2, 3, 4), an unpaired id (3) and twins where one has a single image (4, 1)
COUNTS = {"a1": 3, "a2": 2, "b1": 2, "b2": 3, "b3": 4, "c": 3, "d1": 4, "d2": 1}
GROUPS = (("a1", "a2"), ("b1", "b2", "b3"), ("c",), ("d1", "d2"))


@pytest.fixture
def split():
    return Split("test", {i: [f"/x/{i}/{k}.jpg" for k in range(n)] for i, n in COUNTS.items()}, GROUPS)


def test_pair_counts_by_hand(split):
    n = COUNTS
    genuine = sum(comb(k, 2) for k in n.values())  # 3+1+1+3+6+3+6+0 = 23
    twin = n["a1"] * n["a2"] + n["b1"] * n["b2"] + n["b1"] * n["b3"] + n["b2"] * n["b3"] + n["d1"] * n["d2"]
    group_sizes = [sum(n[i] for i in g) for g in GROUPS]
    total = sum(n.values())
    general_all = (total**2 - sum(s**2 for s in group_sizes)) // 2  # (22^2 - 140) / 2 = 172
    assert (genuine, twin, general_all) == (23, 36, 172)

    pairs = make_pairs(split, seed=0)
    kinds = [p.kind for p in pairs]
    assert kinds.count("genuine") == genuine
    assert kinds.count("twin") == twin
    assert kinds.count("general") == genuine  # default: as many as genuine pairs

    everything = make_pairs(split, seed=0, n_general=10_000)
    assert sum(p.kind == "general" for p in everything) == general_all


def test_pair_kinds_are_right(split):
    samples = split.samples()
    pairs = make_pairs(split, seed=1, n_general=10_000)
    keys = [(p.a, p.b) for p in pairs]
    assert len(set(keys)) == len(keys)  # no pair twice, whatever its kind
    for p in pairs:
        (_, la, ga), (_, lb, gb) = samples[p.a], samples[p.b]
        assert p.a < p.b and p.group == ga
        assert p.kind == {(True, True): "genuine", (False, True): "twin", (False, False): "general"}[
            (la == lb, ga == gb)
        ]
    # every cross-image pair of the split is covered exactly once when all general pairs are asked for
    assert set(keys) == set(combinations(range(len(samples)), 2))


def test_general_sample_is_seeded(split):
    def general(seed):
        return [(p.a, p.b) for p in make_pairs(split, seed=seed) if p.kind == "general"]

    assert general(0) == general(0)
    assert general(0) != general(1)

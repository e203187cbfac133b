"""Verification pairs of one split: genuine, twin impostor and general impostor.

Indices refer to ``split.samples()``. Every pair is stored once with ``a < b``; its ``group`` is the
sibling group of ``a`` and decides the pair's cross-validation fold.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from itertools import combinations, product

import numpy as np

KINDS = ("genuine", "twin", "general")


@dataclass(frozen=True)
class Pair:
    a: int
    b: int
    kind: str  # "genuine" | "twin" | "general"
    group: int  # sibling group of image a


def make_pairs(split, seed: int = 0, n_general: int | None = None) -> list[Pair]:
    """All genuine pairs, all twin-impostor pairs, and a seeded sample of general-impostor pairs.

    Twin pairs cover every pair of distinct ids inside a sibling group, so a triplet gives three id pairs.
    General pairs are drawn uniformly without replacement from all image pairs whose ids lie in different
    sibling groups; ``n_general`` defaults to the number of genuine pairs and is capped at what exists.
    """
    samples = split.samples()
    by_label: dict[int, list[int]] = defaultdict(list)
    by_group: dict[int, set[int]] = defaultdict(set)
    for i, (_, label, group) in enumerate(samples):
        by_label[label].append(i)
        by_group[group].add(label)

    pairs = []
    for _, idx in sorted(by_label.items()):
        group = samples[idx[0]][2]
        pairs += [Pair(a, b, "genuine", group) for a, b in combinations(idx, 2)]
    for group, labels in sorted(by_group.items()):
        for la, lb in combinations(sorted(labels), 2):
            twins = product(by_label[la], by_label[lb])
            pairs += [Pair(min(a, b), max(a, b), "twin", group) for a, b in twins]
    n_genuine = sum(p.kind == "genuine" for p in pairs)
    groups = np.array([g for _, _, g in samples], dtype=np.int64)
    pairs += _general_pairs(groups, n_genuine if n_general is None else n_general, seed)
    return pairs


def _general_pairs(groups: np.ndarray, n: int, seed: int) -> list[Pair]:
    """Uniform sample without replacement of image pairs from different sibling groups.

    With the images ordered by group, the partners of position p from other groups that come after it
    form one contiguous run [end of p's group, N), so every cross-group pair has a linear index and a
    plain ``choice`` over those indices samples exactly, without rejection or enumeration.
    """
    order = np.argsort(groups, kind="stable")
    g = groups[order]
    end = np.searchsorted(g, g, side="right")  # exclusive end of each position's group
    per_pos = len(g) - end
    offsets = np.r_[0, np.cumsum(per_pos)]
    total = int(offsets[-1])
    n = min(n, total)
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
    pos = np.searchsorted(offsets, chosen, side="right") - 1
    partner = end[pos] + (chosen - offsets[pos])
    a, b = order[pos], order[partner]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    return [Pair(int(x), int(y), "general", int(groups[x])) for x, y in zip(lo, hi, strict=True)]


def pair_arrays(pairs: list[Pair]) -> dict[str, np.ndarray]:
    """Column view of a pair list: a, b, kind, group as arrays (for vectorised scoring)."""
    return {
        "a": np.array([p.a for p in pairs], dtype=np.int64),
        "b": np.array([p.b for p in pairs], dtype=np.int64),
        "kind": np.array([p.kind for p in pairs]),
        "group": np.array([p.group for p in pairs], dtype=np.int64),
    }

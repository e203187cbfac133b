"""Synthetic twin data: the user's format, warning-free, siblings alike, unrelated ids different."""
import itertools
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcal_lib.data import TwinBatchSampler, load_splits, verify_images
from dcal_lib.synthetic import make_demo_data


def test_demo_data_loads_cleanly(demo_data):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train, test = load_splits(demo_data)
    for split in (train, test):
        verify_images(split)
        assert any(len(g) == 3 for g in split.groups) and all(len(g) > 1 for g in split.groups)
        assert all(4 <= len(p) <= 8 for p in split.images.values())
        assert all(len(i) == 5 and i.isdigit() for i in split.ids)
        paths = [p for ps in split.images.values() for p in ps]
        assert all(Path(p).is_absolute() and Path(p).parent.parent == demo_data.resolve() / "images"
                   for p in paths)
        with Image.open(paths[0]) as im:
            assert im.size == (64, 64) and im.mode == "RGB" and im.format == "JPEG"
    assert len(train.ids) + len(test.ids) == 24 and not set(train.ids) & set(test.ids)
    triplet = next(g for g in test.groups if len(g) == 3)
    pairs = json.loads((demo_data / "test_twin_pairs.json").read_text())
    assert sum(set(p) <= set(triplet) for p in pairs) == 3  # a triplet is written as three pairs


def test_siblings_share_geometry_unrelated_ids_do_not(demo_data):
    train, _ = load_splits(demo_data)
    mean = {i: np.mean([np.asarray(Image.open(p), np.float32) for p in ps], axis=0)
            for i, ps in train.images.items()}
    mad = lambda a, b: float(np.abs(mean[a] - mean[b]).mean())  # noqa: E731
    siblings = [mad(a, b) for g in train.groups for a, b in itertools.combinations(g, 2)]
    unrelated = [mad(a, b) for a, b in itertools.combinations(train.ids, 2)
                 if train.group_of[a] != train.group_of[b]]
    print(f"mean abs difference of id-mean images: siblings {np.mean(siblings):.1f}, "
          f"unrelated {np.mean(unrelated):.1f}")
    assert np.mean(siblings) < 0.5 * np.mean(unrelated)
    assert min(siblings) > 0  # the marks still tell siblings apart


def test_demo_sampler_coverage(demo_data):
    train, _ = load_splits(demo_data)
    sampler = TwinBatchSampler(train, batch_size=32, images_per_id=4, seed=0)
    drawn = [i for batch in sampler for i, _ in batch]
    n = len(train.samples())
    assert set(drawn) == set(range(n))
    want = sum(len(g) * 4 * math.ceil(max(len(train.images[i]) for i in g) / 4) for g in train.groups)
    assert len(drawn) == want
    print(f"demo coverage ratio {len(drawn) / n:.3f} ({len(drawn)} draws / {n} images, "
          f"{len(sampler)} batches)")


def test_generation_is_fast_and_deterministic(tmp_path):
    a = make_demo_data(tmp_path / "a", ids=15, seed=3)
    b = make_demo_data(tmp_path / "b", ids=15, seed=3)
    assert a.pop("seconds") < 10 and b.pop("seconds") < 10
    assert a == b == {"train_ids": 10, "train_images": a["train_images"], "train_groups": 4,
                      "test_ids": 5, "test_images": a["test_images"], "test_groups": 2}
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    assert len(files) == a["train_images"] + a["test_images"]
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    with pytest.raises(ValueError, match="ids=14"):
        make_demo_data(tmp_path / "c", ids=14)

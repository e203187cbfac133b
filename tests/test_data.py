"""Data layer: validation errors on real malformed inputs, path resolution, groups, sampler, transforms."""
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcal_lib import data
from dcal_lib.data import (
    DataError,
    DataWarning,
    FaceDataset,
    Split,
    TwinBatchSampler,
    build_transform,
    load_image,
    load_split,
    load_splits,
    split_val,
    summarize,
    verify_images,
)

CFG = {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3), "interpolation": "bilinear"}


def write_index(d, split, info, pairs):
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{split}_dataset_infor.json").write_text(json.dumps(info))
    (d / f"{split}_twin_pairs.json").write_text(json.dumps(pairs))


def make_images(root, counts: dict[str, int], size=8) -> dict[str, list[str]]:
    """Writes root/<id>/<id>_<k>.png (random pixels) and returns the index with absolute paths."""
    rng = np.random.default_rng(0)
    info = {}
    for pid, n in counts.items():
        (root / pid).mkdir(parents=True, exist_ok=True)
        info[pid] = []
        for k in range(n):
            path = root / pid / f"{pid}_{k}.png"
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
            info[pid].append(str(path))
    return info


@pytest.fixture
def ds(tmp_path):
    """A valid split: (data_dir, info) with a pair A-B and a pair C-D."""
    info = make_images(tmp_path / "img", {"A": 2, "B": 3, "C": 2, "D": 2})
    write_index(tmp_path, "train", info, [["A", "B"], ["C", "D"]])
    return tmp_path, info


# ------------------------------------------------------------------------------------------- validation
def test_malformed_json_names_file_and_line(tmp_path):
    write_index(tmp_path, "train", {}, [])
    text = '{\n"A": ["a.png"],\n"B": ["b.png"]\n"C": ["c.png"]\n}'  # missing comma on line 3
    (tmp_path / "train_dataset_infor.json").write_text(text)
    with pytest.raises(DataError, match=r"train_dataset_infor\.json: invalid JSON at line 4"):
        load_split(tmp_path, "train")


def test_missing_file_names_it(tmp_path):
    with pytest.raises(DataError, match=r"train_dataset_infor\.json not found"):
        load_split(tmp_path, "train")


@pytest.mark.parametrize("info, pairs, match", [
    (["A"], [], r"dataset_infor\.json: expected a non-empty object"),
    ({}, [], r"dataset_infor\.json: expected a non-empty object"),
    ({"A": "a.png"}, [], r"id 'A' maps to str"),
    ({"A": ["a.png", 3]}, [], r"id 'A' has a non-path entry 3"),
    ({"A": ["a.png"]}, {"A": "B"}, r"twin_pairs\.json: expected a list"),
    ({"A": ["a.png"], "B": ["b.png"]}, [["A", "B", "A"]], r"entry 0 is \['A', 'B', 'A'\]"),
    ({"1": ["a.png"], "2": ["b.png"]}, [[1, 2]], r"entry 0 is \[1, 2\].*strings"),
])
def test_wrong_types(tmp_path, info, pairs, match):
    write_index(tmp_path, "train", info, pairs)
    with pytest.raises(DataError, match=match):
        load_split(tmp_path, "train")


def test_empty_image_list(ds):
    d, info = ds
    write_index(d, "train", info | {"E": []}, [["A", "B"]])
    with pytest.raises(DataError, match=r"id 'E' has an empty image list"):
        load_split(d, "train")


def test_duplicate_paths_also_through_another_prefix(ds):
    d, info = ds
    write_index(d, "train", info | {"D": info["D"] + [info["A"][0]]}, [["A", "B"], ["C", "D"]])
    with pytest.raises(DataError, match=r"1 duplicate image paths: .*A_0\.png \(id D; also listed for id A"):
        load_split(d, "train")
    kaggle = "/kaggle/input/nd-twin/faces_448/A/A_1.png"  # the same file as info["A"][1]
    write_index(d, "train", info | {"A": info["A"] + [kaggle]}, [["A", "B"], ["C", "D"]])
    with pytest.raises(DataError, match=r"duplicate image paths: /kaggle/input/nd-twin/faces_448/A/A_1\.png"):
        load_split(d, "train", image_root=d / "img")


def test_pair_id_not_in_dataset(ds):
    d, info = ds
    write_index(d, "train", info, [["A", "B"], ["C", "Z"]])
    with pytest.raises(DataError, match=r"train_twin_pairs\.json: entry 1 names id 'Z', which is not in "
                                        r"train_dataset_infor\.json"):
        load_split(d, "train")


def test_id_paired_with_itself(ds):
    d, info = ds
    write_index(d, "train", info, [["A", "B"], ["C", "C"]])
    with pytest.raises(DataError, match=r"entry 1 pairs id 'C' with itself"):
        load_split(d, "train")


def test_unresolved_paths_count_first_few_and_hint(ds):
    d, info = ds
    missing = [f"/somewhere/else/X/x{k}.png" for k in range(7)]
    write_index(d, "train", info | {"X": missing}, [["A", "B"], ["C", "D"], ["X", "A"]])
    with pytest.raises(DataError) as e:
        load_split(d, "train", image_root=d / "img")
    msg = str(e.value)
    assert "7 of 16 image paths could not be resolved" in msg
    assert all(p in msg for p in missing[:5]) and missing[5] not in msg
    assert "(not found)" in msg and "Set image_root" in msg


def test_train_test_overlap_is_an_error(ds):
    d, info = ds
    write_index(d, "test", {"C": info["C"], "D": info["D"]}, [["C", "D"]])
    with pytest.raises(DataError, match=r"2 ids are in both train and test \(C, D\)"):
        load_splits(d)


def test_warnings_for_unpaired_ids_and_single_images(ds):
    d, info = ds
    write_index(d, "train", info | make_images(d / "img", {"E": 1}), [["A", "B"]])
    with pytest.warns(DataWarning) as rec:
        split = load_split(d, "train")
    msgs = [str(w.message) for w in rec]
    assert any("3 ids are in no pair" in m and "C, D, E" in m for m in msgs)
    assert any("1 ids have fewer than 2 images (E)" in m for m in msgs)
    assert split.groups == (("A", "B"), ("C",), ("D",), ("E",))


def test_valid_split_loads_without_warnings(ds):
    d, info = ds
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split = load_split(d, "train")
    assert split.images == info and split.ids == ["A", "B", "C", "D"]


# ----------------------------------------------------------------------------------------- resolution
@pytest.fixture
def walks(monkeypatch):
    calls = []
    real = os.walk
    monkeypatch.setattr(data.os, "walk", lambda top, *a, **k: calls.append(top) or real(top, *a, **k))
    return calls


@pytest.mark.filterwarnings("ignore::dcal_lib.data.DataWarning")  # one image per id
def test_three_resolution_routes_and_one_walk(tmp_path, walks):
    root = tmp_path / "root"
    info = make_images(root, {"A": 1, "B": 1})
    info |= make_images(root / "deep" / "sub", {"C": 1, "D": 1})  # file names C_0.png, D_0.png, no C/ at top
    index = {
        "A": info["A"],                                             # literal
        "B": ["/kaggle/input/nd-twin/nd-twin/faces_448/B/B_0.png"],  # <id>/<file> under root
        "C": ["/home/u/Work/Dataset/ND_TWIN_Dataset_224/C/C_0.png"],  # unique file name under root
        "D": ["D_0.png"],
    }
    write_index(tmp_path, "train", index, [["A", "B"], ["C", "D"]])
    split = load_split(tmp_path, "train", image_root=root)
    assert split.images == {"A": info["A"], "B": [str(root / "B" / "B_0.png")],
                            "C": [str(root / "deep/sub/C/C_0.png")], "D": [str(root / "deep/sub/D/D_0.png")]}
    assert walks == [root]
    walks.clear()
    write_index(tmp_path, "test", {"E": ["/elsewhere/E_0.png"], "F": ["/x/F/F_0.png"]}, [["E", "F"]])
    make_images(root / "deep", {"E": 1})
    make_images(root / "deeper", {"F": 1})
    load_splits(tmp_path, image_root=root)
    assert walks == [root]  # one walk shared by both splits
    walks.clear()
    write_index(tmp_path, "train", {k: index[k] for k in "AB"}, [["A", "B"]])
    load_split(tmp_path, "train", image_root=root)
    assert walks == []  # no walk when no path needs it


def test_data_dir_is_the_root_when_image_root_is_unset(tmp_path):
    make_images(tmp_path / "faces_224", {"A": 2, "B": 2})
    index = {i: [f"/kaggle/input/x/faces_448/{i}/{i}_{k}.png" for k in range(2)] for i in "AB"}
    write_index(tmp_path, "train", index, [["A", "B"]])
    split = load_split(tmp_path, "train")
    assert split.images["B"] == [str(tmp_path / "faces_224/B/B_0.png"), str(tmp_path / "faces_224/B/B_1.png")]


def test_missing_image_root_is_named(ds):
    with pytest.raises(DataError, match=r"image_root /no/such/folder is not a folder"):
        load_split(ds[0], "train", image_root="/no/such/folder")


def test_ambiguous_file_name_is_unresolved(tmp_path):
    make_images(tmp_path / "faces_224", {"A": 1, "B": 1})
    make_images(tmp_path / "faces_448", {"A": 1})
    write_index(tmp_path, "train", {"A": ["/k/in/A/A_0.png"], "B": ["/k/in/B/B_0.png"]}, [["A", "B"]])
    with pytest.raises(DataError, match=r"(?s)1 of 2 image paths.*/k/in/A/A_0\.png \(ambiguous: 2 files nam"):
        load_split(tmp_path, "train")


# ----------------------------------------------------------------------------------------- groups & val
def test_triplets_and_chains_are_one_group(tmp_path):
    info = make_images(tmp_path / "img", dict.fromkeys("ABCDEFGH", 2))
    pairs = [["B", "C"], ["A", "B"], ["A", "C"], ["E", "D"], ["F", "G"], ["G", "H"]]
    write_index(tmp_path, "train", info, pairs)
    split = load_split(tmp_path, "train")
    assert split.groups == (("A", "B", "C"), ("D", "E"), ("F", "G", "H"))
    assert split.group_of == {"A": 0, "B": 0, "C": 0, "D": 1, "E": 1, "F": 2, "G": 2, "H": 2}
    samples = split.samples()
    assert samples[:3] == [(info["A"][0], 0, 0), (info["A"][1], 0, 0), (info["B"][0], 1, 0)]
    assert samples[-1] == (info["H"][1], 7, 2)
    assert "8 ids, 16 images; images per id min 2, median 2, max 2" in summarize(split)
    assert "sibling groups: 1 of 2 ids, 2 of 3 ids; unpaired ids: 0" in summarize(split)


def hand_split(counts: dict[str, int], groups) -> Split:
    return Split("train", {i: [f"{i}/{k}.png" for k in range(n)] for i, n in sorted(counts.items())}, groups)


def test_summarize_counts():
    split = hand_split({"A": 4, "B": 9, "C": 5, "D": 1}, (("A", "B"), ("C",), ("D",)))
    assert summarize(split) == ("train: 4 ids, 19 images; images per id min 1, median 4.5, max 9\n"
                                "  sibling groups: 1 of 2 ids; unpaired ids: 2")


def test_split_val_holds_out_whole_groups_deterministically():
    groups = tuple((f"{g}a", f"{g}b") for g in range(10)) + (("9c", "9d", "9e"), ("z",))
    split = hand_split({i: 3 for g in groups for i in g}, groups)
    train, val = split_val(split, 3, seed=1)
    assert len(val.groups) == 3 and all(len(g) > 1 for g in val.groups)
    assert set(train.groups) | set(val.groups) == set(groups) and not set(train.groups) & set(val.groups)
    assert set(train.images) | set(val.images) == set(split.images)
    assert not set(train.images) & set(val.images)
    assert list(val.images) == sorted(val.images) and val.name == "val"
    assert split_val(split, 3, seed=1)[1] == val
    assert len({split_val(split, 3, seed=s)[1].groups for s in range(8)}) > 1
    assert split_val(split, 0, seed=1) == (split, None)
    with pytest.raises(ValueError, match="val_groups=11"):
        split_val(split, 11, seed=1)


# ----------------------------------------------------------------------------------------------- images
def test_undecodable_images_are_named(ds):
    d, info = ds
    Path(info["B"][1]).write_bytes(b"not an image")
    good = Path(info["C"][0]).read_bytes()
    Path(info["C"][0]).write_bytes(good[: len(good) // 2])  # truncated PNG
    with pytest.raises(DataError, match=rf"cannot decode image {info['B'][1]}"):
        load_image(info["B"][1])
    with pytest.raises(DataError) as e:
        verify_images(load_split(d, "train"))
    assert "2 of 9 images cannot be decoded" in str(e.value)
    assert info["B"][1] in str(e.value) and info["C"][0] in str(e.value) and info["A"][0] not in str(e.value)
    assert load_image(info["A"][0]).mode == "RGB"


def test_eval_transform_matches_hand_normalisation():
    img = Image.new("RGB", (20, 10), (51, 102, 204))
    x = build_transform(CFG, (6, 12), train=False)(img)
    assert x.shape == (3, 6, 12)
    want = [(c / 255 - m) / s for c, m, s in zip((51, 102, 204), CFG["mean"], CFG["std"], strict=True)]
    assert torch.allclose(x, torch.tensor(want).view(3, 1, 1).expand(3, 6, 12), atol=1e-5)
    assert build_transform(CFG, 16, train=True)(img).shape == (3, 16, 16)


def test_train_transform_never_flips():
    arr = np.full((32, 32, 3), 220, np.uint8)
    arr[:, :12] = 30  # dark left side: a flip would move it right
    tf = build_transform(CFG, 32, train=True)
    for seed in range(20):
        torch.manual_seed(seed)
        x = tf(Image.fromarray(arr))
        assert x[:, :, :10].mean() < x[:, :, 22:].mean()


def test_augmentation_is_seeded_per_sample_whatever_the_worker_count(tmp_path):
    info = make_images(tmp_path, {"A": 3, "B": 2, "C": 5}, size=24)
    split = Split("train", info, (("A", "B"), ("C",)))
    sampler = TwinBatchSampler(split, batch_size=8, images_per_id=2, seed=0)
    dataset = FaceDataset(split.samples(), build_transform(CFG, 16, train=True))

    def run(workers):
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers)
        return [b for b in loader]

    torch.manual_seed(1)
    single = run(0)
    torch.manual_seed(2)
    multi = run(2)
    assert len(single) == len(multi) == len(sampler)
    for (x0, y0, g0), (x1, y1, g1) in zip(single, multi, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1) and torch.equal(g0, g1)
    i, seed = next(iter(sampler))[0]
    assert torch.equal(dataset[(i, seed)][0], dataset[(i, seed)][0])
    assert not torch.equal(dataset[(i, seed)][0], dataset[(i, seed + 1)][0])  # augmentation is active
    assert dataset[i][1:] == (split.samples()[i][1], split.samples()[i][2])


# ---------------------------------------------------------------------------------------------- sampler
SAMPLER_COUNTS = {"A": 5, "B": 9, "C": 3, "D": 4, "E": 12, "F": 2, "G": 6, "H": 7, "I": 4, "J": 8}
SAMPLER_GROUPS = (("A", "B", "C"), ("D", "E"), ("F", "G"), ("H",), ("I", "J"))


def test_sampler_batches_hold_whole_groups_contiguously():
    split = hand_split(SAMPLER_COUNTS, SAMPLER_GROUPS)
    samples, k = split.samples(), 4
    batches = list(TwinBatchSampler(split, batch_size=16, images_per_id=k, seed=0))
    for batch in batches:
        assert len(batch) <= 16
        items = [(split.ids[samples[i][1]], i) for i, _ in batch]
        while items:  # the batch is a run of blocks: one whole group x K images per id, contiguous
            group = SAMPLER_GROUPS[split.group_of[items[0][0]]]
            block, items = items[: k * len(group)], items[k * len(group):]
            assert [pid for pid, _ in block] == [pid for pid in group for _ in range(k)]
            for pid in group:  # an image repeats inside a block only when the id has fewer than K
                assert len({i for p, i in block if p == pid}) == min(k, SAMPLER_COUNTS[pid])


def test_sampler_covers_every_image_about_once():
    split = hand_split(SAMPLER_COUNTS, SAMPLER_GROUPS)
    k = 4
    sampler = TwinBatchSampler(split, batch_size=16, images_per_id=k, seed=0)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        drawn = [i for b in sampler for i, _ in b]
        assert set(drawn) == set(range(len(split.samples())))
        # hand count: each group appears ceil(max member images / K) times, K images per member
        want = sum(len(g) * k * math.ceil(max(SAMPLER_COUNTS[i] for i in g) / k) for g in SAMPLER_GROUPS)
        assert len(drawn) == want == 100
    print(f"coverage ratio {want / len(split.samples()):.3f}")  # 100 / 60


def test_sampler_is_deterministic_and_resumable():
    split = hand_split(SAMPLER_COUNTS, SAMPLER_GROUPS)
    a, b = (TwinBatchSampler(split, batch_size=24, images_per_id=4, seed=7) for _ in range(2))
    assert list(a) == list(b) and len(a) == len(list(a))
    a.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 != list(b) and len(a) == len(epoch1)
    c = TwinBatchSampler(split, batch_size=24, images_per_id=4, seed=99)
    c.load_state_dict(a.state_dict())
    assert a.state_dict() == {"seed": 7, "epoch": 1} and list(c) == epoch1
    seeds = [s for batch in epoch1 for _, s in batch]
    assert len(set(seeds)) > 0.95 * len(seeds)


def test_sampler_rejects_a_batch_smaller_than_the_largest_group():
    split = hand_split(SAMPLER_COUNTS, SAMPLER_GROUPS)
    with pytest.raises(ValueError, match=r"batch_size=11 cannot hold the largest sibling group \(3 ids\)"):
        TwinBatchSampler(split, batch_size=11, images_per_id=4, seed=0)

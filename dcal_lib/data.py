"""Data layer: the user's JSON index -> validated splits, sibling groups, twin-aware batches, transforms.

The real index holds absolute paths from other machines, so every path is resolved here (literal
path, then `<id>/<file>` under the image root, then a unique file name under it) and every problem is
reported at load time instead of hours into a run.
"""
import json
import os
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import ConfigError

SHOW = 5  # offending items listed in an error message


class DataError(ValueError):
    """Invalid dataset; the message names the file / id / path and says what to do."""


class DataWarning(UserWarning):
    """Usable but notable dataset content: ids in no pair, ids with fewer than 2 images."""


def _few(items) -> str:
    items = list(items)
    more = f", ... ({len(items) - SHOW} more)" if len(items) > SHOW else ""
    return ", ".join(map(str, items[:SHOW])) + more


@dataclass(frozen=True)
class Split:
    name: str                             # "train" | "test" | "val"
    images: dict[str, list[str]]          # id -> resolved existing paths; ids sorted
    groups: tuple[tuple[str, ...], ...]   # sibling groups (connected components); unpaired = singletons

    @property
    def ids(self) -> list[str]:
        return sorted(self.images)

    @property
    def group_of(self) -> dict[str, int]:
        return {i: g for g, members in enumerate(self.groups) for i in members}

    def samples(self) -> list[tuple[str, int, int]]:
        """(path, label = index in ids, group index), in id order."""
        group_of = self.group_of
        return [(p, label, group_of[i]) for label, i in enumerate(self.ids) for p in self.images[i]]


# ----------------------------------------------------------------------------------------------- loading
def _read_json(path: Path):
    if not path.is_file():
        raise DataError(f"{path} not found: data_dir must hold {{split}}_dataset_infor.json and "
                        "{split}_twin_pairs.json for the train and test splits")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}; "
                        "fix the file") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); re-save it as UTF-8 JSON") from e


def _check_index(info, pairs, info_file: Path, pairs_file: Path) -> list[tuple[str, str]]:
    """Type and consistency checks of the two JSON files; returns the pairs as tuples."""
    if not isinstance(info, dict) or not info:
        raise DataError(f"{info_file}: expected a non-empty object mapping person id -> list of image "
                        f"paths, got {json.dumps(info)[:60] if info else 'nothing'}")
    for pid, paths in info.items():
        if not isinstance(paths, list):
            raise DataError(f"{info_file}: id {pid!r} maps to {type(paths).__name__}; "
                            "expected a list of image paths")
        if not paths:
            raise DataError(f"{info_file}: id {pid!r} has an empty image list; add its images or "
                            "remove the id")
        bad = [p for p in paths if not isinstance(p, str) or not p]
        if bad:
            raise DataError(f"{info_file}: id {pid!r} has a non-path entry {bad[0]!r}; "
                            "image paths must be non-empty strings")
    if not isinstance(pairs, list):
        raise DataError(f"{pairs_file}: expected a list of [id, id] pairs, got {type(pairs).__name__}")
    out = []
    for k, pair in enumerate(pairs):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"{pairs_file}: entry {k} is {pair!r}; each entry must be a list of two "
                            "person ids written as strings")
        a, b = pair
        if a == b:
            raise DataError(f"{pairs_file}: entry {k} pairs id {a!r} with itself; remove that entry")
        for x in pair:
            if x not in info:
                raise DataError(f"{pairs_file}: entry {k} names id {x!r}, which is not in "
                                f"{info_file.name}; add its images there or remove the pair")
        out.append((a, b))
    return out


def _sibling_groups(ids, pairs) -> tuple[tuple[str, ...], ...]:
    """Connected components of the pair graph (triplets come as three pairs), sorted."""
    parent = {i: i for i in ids}

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        parent[find(a)] = find(b)
    comps = defaultdict(list)
    for i in sorted(ids):
        comps[find(i)].append(i)
    return tuple(sorted(tuple(c) for c in comps.values()))


class _Resolver:
    """Maps a path as written to an existing file. Walks the root at most once, and only if needed."""

    def __init__(self, data_dir, image_root):
        if image_root is not None and not Path(image_root).is_dir():
            raise DataError(f"image_root {image_root} is not a folder; pass the folder holding the images")
        self.given = image_root is not None
        self.root, self._by_name = Path(data_dir if image_root is None else image_root), None

    def __call__(self, path: str) -> tuple[str | None, str]:
        if os.path.isfile(path):
            return path, ""
        parts = path.replace("\\", "/").rsplit("/", 2)
        candidate = self.root.joinpath(*parts[-2:])
        if candidate.is_file():
            return str(candidate), ""
        if self._by_name is None:
            self._by_name = defaultdict(list)
            for folder, _, files in os.walk(self.root):
                for f in files:
                    self._by_name[f].append(os.path.join(folder, f))
        hits = self._by_name.get(parts[-1], [])
        if len(hits) == 1:
            return hits[0], ""
        if hits:
            return None, f"ambiguous: {len(hits)} files named {parts[-1]} ({_few(hits)})"
        return None, "not found"


def load_split(data_dir, split: str, image_root=None) -> Split:
    """Read, validate and resolve one split; warns (DataWarning) on unpaired ids and ids with < 2 images.
    Paths are resolved under image_root, or under data_dir when it is not set."""
    return _load(data_dir, split, _Resolver(data_dir, image_root))


def _load(data_dir, split: str, resolve: _Resolver) -> Split:
    data_dir = Path(data_dir)
    info_file, pairs_file = data_dir / f"{split}_dataset_infor.json", data_dir / f"{split}_twin_pairs.json"
    info, raw_pairs = _read_json(info_file), _read_json(pairs_file)
    pairs = _check_index(info, raw_pairs, info_file, pairs_file)
    images, unresolved, seen, dups = {}, [], {}, []
    for pid in sorted(info):
        images[pid] = []
        for raw in info[pid]:
            found, why = resolve(raw)
            if found is None:
                unresolved.append(f"{raw} ({why})")
                continue
            key = os.path.abspath(found)
            if key in seen:
                dups.append(f"{raw} (id {pid}; also listed for id {seen[key]})")
            seen[key] = pid
            images[pid].append(found)
    if unresolved:
        where = f"image_root {resolve.root}" if resolve.given else f"data_dir {data_dir} (image_root not set)"
        raise DataError(
            f"{info_file}: {len(unresolved)} of {sum(map(len, info.values()))} image paths could not be "
            f"resolved (literal path, then <id>/<file name> under {where}, then a unique file name under "
            "it):\n  " + "\n  ".join(unresolved[:SHOW]) + ("\n  ..." if len(unresolved) > SHOW else "")
            + "\nSet image_root (--image-root) to the folder that holds the <id>/ image folders.")
    if dups:
        raise DataError(f"{info_file}: {len(dups)} duplicate image paths: {_few(dups)}; "
                        "list each image once, under its own id")
    paired = {i for pair in pairs for i in pair}
    unpaired = [i for i in images if i not in paired]
    if unpaired:
        warnings.warn(f"{split}: {len(unpaired)} ids are in no pair of {pairs_file.name} ({_few(unpaired)}); "
                      "they are used as ordinary identities without a twin", DataWarning, stacklevel=3)
    few = [i for i, paths in images.items() if len(paths) < 2]
    if few:
        warnings.warn(f"{split}: {len(few)} ids have fewer than 2 images ({_few(few)}); they give no "
                      "genuine pair", DataWarning, stacklevel=3)
    return Split(split, images, _sibling_groups(images, pairs))


def load_splits(data_dir, image_root=None) -> tuple[Split, Split]:
    """(train, test), sharing one walk of the image root; shared ids are an error (open-set verification)."""
    resolve = _Resolver(data_dir, image_root)
    train, test = _load(data_dir, "train", resolve), _load(data_dir, "test", resolve)
    shared = sorted(set(train.images) & set(test.images))
    if shared:
        raise DataError(f"{data_dir}: {len(shared)} ids are in both train and test ({_few(shared)}); "
                        "test ids must be unseen in training: remove them from one split")
    return train, test


def split_val(train: Split, val_groups: int, seed: int) -> tuple[Split, Split | None]:
    """Hold out whole sibling groups (of 2+ ids, so validation has twin pairs); 0 = no validation."""
    if val_groups == 0:
        return train, None
    multi = [g for g in train.groups if len(g) > 1]
    if not 0 < val_groups < len(multi):
        raise ConfigError(f"val_groups={val_groups}: {train.name} has {len(multi)} sibling groups; "
                         f"use 0 .. {len(multi) - 1} so training keeps at least one")
    chosen = {multi[i] for i in np.random.default_rng(seed).choice(len(multi), val_groups, replace=False)}

    def sub(name, groups):
        return Split(name, {i: train.images[i] for i in sorted(i for g in groups for i in g)}, tuple(groups))

    return (sub("train", [g for g in train.groups if g not in chosen]),
            sub("val", [g for g in train.groups if g in chosen]))


# ------------------------------------------------------------------------------------------------ images
def load_image(path) -> Image.Image:
    """RGB image; DataError naming the path when it cannot be decoded."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image {path} ({e}); replace the file or remove it from the "
                        "dataset JSON") from e


def _decode_problem(path) -> str | None:
    try:
        load_image(path)
    except DataError as e:
        return f"{path} ({e.__cause__})"
    return None


def verify_images(split: Split) -> None:
    """Decode every image up front so a long run never dies on a bad file; lists all failures."""
    paths = [p for p, _, _ in split.samples()]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        bad = [m for m in pool.map(_decode_problem, paths) if m]
    if bad:
        raise DataError(f"{split.name}: {len(bad)} of {len(paths)} images cannot be decoded:\n  "
                        + "\n  ".join(bad) + "\nReplace these files or remove them from the dataset JSON.")


def summarize(split: Split) -> str:
    counts = sorted(len(v) for v in split.images.values())
    sizes = Counter(len(g) for g in split.groups)
    groups = ", ".join(f"{n} of {s} ids" for s, n in sorted(sizes.items()) if s > 1) or "none"
    return (f"{split.name}: {len(counts)} ids, {sum(counts)} images; images per id min {counts[0]}, "
            f"median {np.median(counts):g}, max {counts[-1]}\n"
            f"  sibling groups: {groups}; unpaired ids: {sizes.get(1, 0)}")


def build_transform(data_config: dict, img_size: int | tuple[int, int], train: bool):
    """Resize (+ light augmentation when training) and normalise. No horizontal flip: it would erase
    the left/right position of moles and facial asymmetries that tell twins apart."""
    from torchvision.transforms import v2  # its random ops draw from the torch RNG only

    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    interp = v2.InterpolationMode(data_config.get("interpolation", "bicubic"))
    steps = [v2.Resize(size, interpolation=interp, antialias=True)]
    if train:
        steps += [v2.RandomAffine(degrees=5, translate=(0.04, 0.04), scale=(0.95, 1.05),
                                  interpolation=v2.InterpolationMode.BILINEAR),
                  v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.1)]
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
              v2.Normalize(list(data_config["mean"]), list(data_config["std"]))]
    return v2.Compose(steps)


class FaceDataset(torch.utils.data.Dataset):
    """Items are (image tensor, label, group). Indexed by (i, seed), the augmentation is seeded per
    sample, so it is the same for any worker count and after a resume."""

    def __init__(self, samples, transform):
        self.samples, self.transform = list(samples), transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        i, seed = index if isinstance(index, tuple) else (index, None)
        path, label, group = self.samples[i]
        image = load_image(path)
        if seed is None:
            return self.transform(image), label, group
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), label, group


# ------------------------------------------------------------------------------------------------ sampler
def _chunks(rng, idx: list[int], k: int, n: int) -> list[list[int]]:
    """n chunks of k images of one id: every image once before any repeat, and a repeat inside a chunk
    only when the id has fewer than k images."""
    chunks, pool = [], []
    for _ in range(n):
        chunk = []
        while len(chunk) < k:
            if not pool:
                perm = rng.permutation(idx).tolist()
                pool = [i for i in perm if i not in chunk] or perm
            chunk.append(pool.pop())
        chunks.append(chunk)
    return chunks


class TwinBatchSampler:
    """Batches of whole sibling groups x K images per id, so twins are always side by side.

    Each group appears ceil(max member images / K) times per epoch, as a contiguous block (nn.DataParallel
    shards batches contiguously, so siblings stay on one device). Yields lists of (sample index, seed).
    """

    def __init__(self, split: Split, batch_size: int, images_per_id: int, seed: int):
        largest = max(len(g) for g in split.groups)
        if images_per_id < 1 or batch_size < images_per_id * largest:
            raise ConfigError(f"batch_size={batch_size} cannot hold the largest sibling group ({largest} ids) "
                             f"x images_per_id={images_per_id}; use batch_size >= "
                             f"{max(images_per_id, 1) * largest} and images_per_id >= 1")
        self.batch_size, self.k, self.seed, self.epoch = batch_size, images_per_id, seed, 0
        by_label = defaultdict(list)
        for n, (_, label, _) in enumerate(split.samples()):
            by_label[label].append(n)
        label_of = {i: n for n, i in enumerate(split.ids)}
        self._groups = [[by_label[label_of[i]] for i in g] for g in split.groups]
        self._cache = (None, [])

    def _batches(self) -> list[list[tuple[int, int]]]:
        if self._cache[0] == self.epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        blocks = []
        for members in self._groups:
            n = -(-max(map(len, members)) // self.k)
            per_id = [_chunks(rng, m, self.k, n) for m in members]
            blocks += [[i for chunks in per_id for i in chunks[a]] for a in range(n)]
        batches, batch = [], []
        for b in rng.permutation(len(blocks)):
            if len(batch) + len(blocks[b]) > self.batch_size:
                batches.append(batch)
                batch = []
            batch += blocks[b]
        batches.append(batch)
        seeds = iter(rng.integers(0, 2**31 - 1, size=sum(map(len, batches))).tolist())
        self._cache = (self.epoch, [[(i, next(seeds)) for i in b] for b in batches])
        return self._cache[1]

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])

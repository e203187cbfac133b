"""Synthetic twin faces in the user's exact format, for tests and the demo.

Siblings share every geometric parameter and the skin tone; each id differs from its siblings only by
a few small marks (moles, freckles, a scar, a slightly raised or lowered brow end). Unrelated ids differ
in geometry and are easy; telling twins apart needs the fine local cues DCAL is meant to find.
"""
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SS = 4  # drawn SS times larger, then downsampled: keeps 1-pixel marks smooth


def _family(rng) -> dict:
    """Face geometry and colours shared by all siblings; lengths are fractions of the image side."""
    u = rng.uniform
    hair = [[20, 15, 12], [70, 45, 25], [120, 85, 50], [190, 160, 110]][rng.integers(4)]
    return dict(
        skin=u() * np.array([-115, -120, -120]) + [235, 200, 175] + u(-8, 8, 3), hair=hair + u(-10, 10, 3),
        cy=u(0.50, 0.56), rx=u(0.28, 0.36), ry=u(0.36, 0.44), hair_cut=u(15, 40),
        eye_y=u(0.40, 0.47), eye_dx=u(0.11, 0.16), eye_rx=u(0.035, 0.055), eye_ry=u(0.018, 0.03),
        iris=u(20, 140, 3), brow_dy=u(0.05, 0.08), brow_w=u(0.05, 0.08), brow_tilt=u(-0.015, 0.025),
        brow_thick=u(0.012, 0.025), nose_len=u(0.10, 0.16), nose_w=u(0.03, 0.06),
        mouth_y=u(0.68, 0.76), mouth_w=u(0.08, 0.14), smile=u(-0.015, 0.03),
        lip=u([120, 40, 40], [200, 90, 90]),
    )


def _marks(rng, fam) -> dict:
    """The few small id-specific details that separate siblings."""
    marks = []
    for _ in range(rng.integers(2, 5)):
        a, r = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0.05, 0.8))
        x, y = 0.5 + r * fam["rx"] * np.cos(a), fam["cy"] + r * fam["ry"] * np.sin(a)
        marks.append((rng.choice(["mole", "mole", "freckles", "scar"]), x, y, rng.uniform(0, np.pi)))
    return dict(marks=marks, brow=rng.uniform(-0.012, 0.012, 2))


def _draw(fam, idm, size, bg) -> Image.Image:
    s = size * SS
    img = Image.new("RGB", (s, s), bg)
    d = ImageDraw.Draw(img)
    f = lambda *v: tuple(int(round(x * s)) for x in v)  # noqa: E731
    col = lambda c, k=1.0: tuple(int(min(255, max(0, x * k))) for x in c)  # noqa: E731
    cx, cy, rx, ry = 0.5, fam["cy"], fam["rx"], fam["ry"]
    d.rectangle(f(cx - rx * 0.45, cy + ry * 0.6, cx + rx * 0.45, 1.0), fill=col(fam["skin"], 0.85))  # neck
    for ex in (cx - rx, cx + rx):  # ears
        d.ellipse(f(ex - 0.04, cy - 0.06, ex + 0.04, cy + 0.06), fill=col(fam["skin"], 0.9))
    head = f(cx - rx, cy - ry, cx + rx, cy + ry)
    d.ellipse(head, fill=col(fam["skin"]))
    d.chord(head, 180 + fam["hair_cut"], 360 - fam["hair_cut"], fill=col(fam["hair"]))
    for side, brow in zip((-1, 1), idm["brow"], strict=True):
        ex, ey = cx + side * fam["eye_dx"], fam["eye_y"]
        d.ellipse(f(ex - fam["eye_rx"], ey - fam["eye_ry"], ex + fam["eye_rx"], ey + fam["eye_ry"]),
                  fill=(235, 235, 230))
        ir = fam["eye_ry"] * 0.95
        d.ellipse(f(ex - ir, ey - ir, ex + ir, ey + ir), fill=col(fam["iris"]))
        d.ellipse(f(ex - ir / 2, ey - ir / 2, ex + ir / 2, ey + ir / 2), fill=(15, 15, 15))
        by, w, t = ey - fam["brow_dy"], fam["brow_w"], fam["brow_tilt"]
        inner, outer = (ex - side * w, by + t), (ex + side * w, by - t + brow)  # the id moves the outer end
        d.line(f(*inner, *outer), fill=col(fam["hair"], 0.8), width=int(fam["brow_thick"] * s))
    ny, nw = fam["eye_y"] + fam["nose_len"], fam["nose_w"]
    d.polygon(f(cx, fam["eye_y"] + 0.03, cx - nw, ny, cx + nw, ny), fill=col(fam["skin"], 0.82))
    xs = np.linspace(-1, 1, 9)
    mouth = [(cx + x * fam["mouth_w"], fam["mouth_y"] - fam["smile"] * (1 - x * x)) for x in xs]
    d.line([f(*p) for p in mouth], fill=col(fam["lip"]), width=max(1, int(0.02 * s)), joint="curve")
    for kind, x, y, a in idm["marks"]:
        if kind == "mole":
            r = 0.014
            d.ellipse(f(x - r, y - r, x + r, y + r), fill=(70, 40, 25))
        elif kind == "freckles":
            for k in range(4):
                px, py, r = x + 0.025 * np.cos(a + 1.7 * k), y + 0.02 * np.sin(a + 2.3 * k), 0.008
                d.ellipse(f(px - r, py - r, px + r, py + r), fill=col(fam["skin"], 0.6))
        else:
            dx, dy = 0.035 * np.cos(a), 0.035 * np.sin(a)
            d.line(f(x - dx, y - dy, x + dx, y + dy), fill=col(fam["skin"] * [1.0, 0.75, 0.75], 1.1),
                   width=max(1, int(0.01 * s)))
    return img


def _image(rng, fam, idm, size) -> Image.Image:
    """One capture: small shift, rotation, brightness change and sensor noise."""
    bg = tuple(int(v) for v in rng.uniform(90, 170) + rng.uniform(-15, 15, 3))
    img = _draw(fam, idm, size, bg)
    shift = rng.uniform(-0.03, 0.03, 2) * size * SS
    img = img.rotate(rng.uniform(-4, 4), resample=Image.BILINEAR, translate=tuple(shift), fillcolor=bg)
    arr = np.asarray(img.resize((size, size), Image.LANCZOS), dtype=np.float32)
    arr = arr * rng.uniform(0.88, 1.12) + rng.normal(0, 3, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _group_sizes(n: int) -> list[int]:
    """Twin pairs plus one triplet (two when n is even, to use every id)."""
    triplets = 1 if n % 2 else 2
    return [3] * triplets + [2] * ((n - 3 * triplets) // 2)


def make_demo_data(out, ids: int = 24, size: int = 64, seed: int = 0) -> dict:
    """Write out/{train,test}_dataset_infor.json, out/{train,test}_twin_pairs.json and out/images/<id>/.

    Every id is paired and has 4-8 images, so the result loads without warnings; train and test ids
    are disjoint. Returns the counts and the generation time.
    """
    if ids < 15:
        raise ValueError(f"ids={ids}: use at least 15 so each split holds a triplet and twin pairs")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_test = ids // 3
    summary = {}
    for split, n, first in (("train", ids - n_test, 90001), ("test", n_test, 95001)):
        info, pairs, next_id = {}, [], first
        sizes = _group_sizes(n)
        for g in sizes:
            fam = _family(rng)
            members = [str(next_id + m) for m in range(g)]
            next_id += g
            pairs += [[a, b] for k, a in enumerate(members) for b in members[k + 1:]]
            for pid in members:
                idm, folder = _marks(rng, fam), out / "images" / pid
                folder.mkdir(parents=True, exist_ok=True)
                info[pid] = []
                for k in range(rng.integers(4, 9)):
                    path = (folder / f"{pid}d{k + 1}.jpg").resolve()
                    _image(rng, fam, idm, size).save(path, quality=95)
                    info[pid].append(str(path))
        (out / f"{split}_dataset_infor.json").write_text(json.dumps(info, indent=1))
        (out / f"{split}_twin_pairs.json").write_text(json.dumps(pairs))
        summary |= {f"{split}_ids": n, f"{split}_images": sum(map(len, info.values())),
                    f"{split}_groups": len(sizes)}
    return summary | {"seconds": round(time.perf_counter() - t0, 3)}

"""Where the model looks and where it sees two faces differ: attention maps, pair views, `verify`.

Per image: the SA attention rollout (CLS row over all blocks), the patches GLCA selects as queries and
its read-out attention. Per pair: a difference map of the final patch tokens. The faces are aligned,
so patch i covers the same face region in both images and a per-patch comparison is meaningful.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from .checkpoint import load_checkpoint, unwrap_state_dict
from .config import Config
from .data import build_transform, load_image
from .model import build_model, combine_features, data_config

THRESHOLD_SOURCE = "validation twin EER"
NO_THRESHOLD = ("no threshold in checkpoint {checkpoint} (trained with val_groups=0): no decision. To get one, "
                "train with val_groups > 0, or run `python -m dcal_lib evaluate --checkpoint {checkpoint} "
                "--data-dir DATA` and compare the score with twin.eer_threshold in its metrics.json")


def load_model(checkpoint, device=None):
    """(model in eval mode on `device`, its evaluation transform, the checkpoint dict).

    The weights come from the checkpoint, so pretrained ones are never fetched (offline machines).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = load_checkpoint(checkpoint)
    cfg = dataclasses.replace(Config(**ckpt["config"]), pretrained=False, pretrained_path="")
    model = build_model(cfg, ckpt["num_classes"])
    model.load_state_dict(unwrap_state_dict(ckpt["model"]))
    model.to(device).eval()
    return model, build_transform(data_config(model), cfg.img_size, train=False), ckpt


@contextmanager
def eval_mode(model):
    """No dropout / drop-path while explaining; the caller's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield next(model.parameters()).device
    finally:
        model.train(was_training)


def _unit_max(m: np.ndarray) -> np.ndarray:
    """Each map divided by its own maximum; an all-zero map stays zero (no NaN)."""
    peak = m.reshape(len(m), -1).max(1).reshape(-1, *[1] * (m.ndim - 1))
    return m / np.where(peak > 0, peak, 1.0)


@torch.no_grad()
def image_maps(model, images: torch.Tensor) -> dict:
    """Patch-grid maps of a batch of normalised images, numpy arrays shaped (B, gh, gw):

    "rollout"   SA attention rollout of the CLS token over the patches, divided by its maximum (in [0, 1]);
    "glca_mask" True on the patches GLCA selects as queries;
    "glca_attn" attention of the GLCA read-out over the patches, divided by its maximum (in [0, 1]);
    plus "tokens" (B, gh*gw, D), the final-normed SA patch tokens, "grid" (gh, gw), and "features", the
    branch features (torch) that `model.combine_features` turns into the verification embedding.
    A model trained without GLCA has no "glca_*" maps. Dividing by the maximum keeps each image's
    pattern readable; the raw rollout mass on the patches is not comparable across images anyway.
    """
    with eval_mode(model) as device:
        ex = model.explain(images.to(device))
    B, (gh, gw) = len(images), ex["grid"]
    out = {"rollout": _unit_max(ex["rollout"].float().cpu().numpy()).reshape(B, gh, gw),
           "tokens": ex["patch_tokens"].float().cpu().numpy(), "grid": (gh, gw), "features": ex["features"]}
    if "glca_idx" in ex:
        mask = np.zeros((B, gh * gw), dtype=bool)
        np.put_along_axis(mask, ex["glca_idx"].cpu().numpy(), True, axis=1)
        out["glca_mask"] = mask.reshape(B, gh, gw)
        out["glca_attn"] = _unit_max(ex["glca_attn"].float().cpu().numpy()).reshape(B, gh, gw)
    return out


def upsample(grid_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A (gh, gw) map resized bilinearly to an image's (H, W), for overlaying on the face."""
    t = torch.as_tensor(grid_map, dtype=torch.float32)[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def difference_map(tokens_a: np.ndarray, tokens_b: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Per-patch cosine dissimilarity 1 - cos(a_i, b_i) of two images' patch tokens (Np, D), as (gh, gw).

    In [0, 2]; zero for an image with itself. High where the model sees the two faces differ.
    """
    a = torch.as_tensor(tokens_a, dtype=torch.float32)
    b = torch.as_tensor(tokens_b, dtype=torch.float32)
    d = 1.0 - F.cosine_similarity(a, b, dim=-1, eps=1e-12)
    return d.clamp(0.0, 2.0).reshape(grid).numpy()


def decide(score: float, threshold: float | None) -> str | None:
    """Accept at or above the threshold, as the evaluation's twin FAR/FRR count it."""
    if threshold is None:
        return None
    return "same person" if score >= threshold else "different people"


def _overlay(fig, ax, face, heat, title, label, cmap, vmax=1.0):
    """Heat map over the face, more opaque where it is higher, so low regions leave the face visible."""
    norm = Normalize(0.0, vmax)
    sm = ScalarMappable(norm, cmap)
    rgba = sm.to_rgba(heat)
    rgba[..., 3] = 0.1 + 0.6 * np.clip(norm(heat), 0.0, 1.0)
    ax.imshow(face)
    ax.imshow(rgba)
    fig.colorbar(sm, ax=ax, fraction=0.046, pad=0.03, label=label)
    ax.set_title(title, fontsize=10)


def pair_view(model, transform, path_a, path_b, threshold=None, out=None, title=None,
              embedding: str = "sa+glca") -> Figure:
    """The two faces in two rows (A, B): face, rollout, GLCA selection + attention, difference map.

    The suptitle gives the cosine score of `embedding` against `threshold` (the checkpoint's deployment
    threshold, the validation twin EER) and the decision. Saved to `out` (PNG) when given.
    """
    return _pair_figure(model, transform, path_a, path_b, threshold, out, title, embedding)[0]


def _pair_figure(model, transform, path_a, path_b, threshold, out, title, embedding) -> tuple[Figure, float]:
    paths = [Path(path_a), Path(path_b)]
    images = [load_image(p) for p in paths]
    batch = torch.stack([transform(im) for im in images])
    maps = image_maps(model, batch)
    e = combine_features(maps["features"], embedding)
    score = float(e[0] @ e[1])
    size = tuple(model.backbone.patch_embed.img_size)  # (H, W)
    faces = [np.asarray(im.resize(size[::-1], Image.BICUBIC)) for im in images]
    gh, gw = maps["grid"]
    diff = difference_map(maps["tokens"][0], maps["tokens"][1], (gh, gw))
    diff_up = upsample(diff, size)

    fig = Figure(figsize=(14, 8), dpi=120, layout="constrained")
    axes = fig.subplots(2, 4)
    ph, pw = size[0] / gh, size[1] / gw
    for row, (name, path, face) in enumerate(zip("AB", paths, faces, strict=True)):
        ax = axes[row]
        ax[0].imshow(face)
        ax[0].set_title(f"{name}: {path.parent.name}/{path.name}", fontsize=10)
        _overlay(fig, ax[1], face, upsample(maps["rollout"][row], size), "SA attention rollout (CLS)",
                 "rollout / max", "jet")
        if "glca_attn" in maps:
            _overlay(fig, ax[2], face, upsample(maps["glca_attn"][row], size),
                     f"GLCA: {int(maps['glca_mask'][row].sum())} query patches (boxes), read-out attention",
                     "GLCA attention / max", "jet")
            for i, j in zip(*np.nonzero(maps["glca_mask"][row]), strict=True):
                ax[2].add_patch(Rectangle((j * pw - 0.5, i * ph - 0.5), pw, ph, fill=False, ec="white", lw=1.5))
        else:
            ax[2].imshow(face)
            ax[2].set_title("model trained without GLCA", fontsize=10)
        _overlay(fig, ax[3], face, diff_up, "where A and B differ (patch tokens)", "1 - cos(A, B) per patch",
                 "Reds", vmax=max(float(diff.max()), 1e-6))
        for a in ax:
            a.set_xticks([])
            a.set_yticks([])

    decision = decide(score, threshold)
    if decision is None:
        verdict = "no threshold in checkpoint: no decision"
    else:
        verdict = f"threshold {threshold:.3f} ({THRESHOLD_SOURCE}) → {decision}"
    head = f"{title}\n" if title else ""
    fig.suptitle(f"{head}cosine score ({embedding}) {score:.3f}, {verdict}", fontsize=13)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
    return fig, score


def pair_view_from_checkpoint(checkpoint, path_a, path_b, out=None, embedding: str = "sa+glca") -> Figure:
    """`pair_view` for a checkpoint file, at its deployment threshold (for notebooks)."""
    model, transform, ckpt = load_model(checkpoint)
    return pair_view(model, transform, path_a, path_b, ckpt.get("threshold"), out, embedding=embedding)


def verify(checkpoint, path_a, path_b, out=None, embedding: str = "sa+glca") -> dict:
    """Are the faces in two images the same person? Prints and returns score, threshold and decision.

    The decision uses the checkpoint's deployment threshold (validation twin EER); without one, the
    score comes with decision None and a message on how to get a threshold. The pair view is written
    to `out`, default `<run dir>/verify/<a>__<b>.png` beside the checkpoint's `checkpoints/` folder.
    """
    path_a, path_b = Path(path_a), Path(path_b)
    for p in (path_a, path_b):
        load_image(p)  # a DataError naming the file, before the model is loaded
    model, transform, ckpt = load_model(checkpoint)
    threshold = ckpt.get("threshold")
    if out is None:
        name = f"{path_a.parent.name}_{path_a.stem}__{path_b.parent.name}_{path_b.stem}.png"
        out = Path(checkpoint).parent.parent / "verify" / name
    score = _pair_figure(model, transform, path_a, path_b, threshold, out, None, embedding)[1]
    decision = decide(score, threshold)
    if decision is None:
        message = NO_THRESHOLD.format(checkpoint=checkpoint)
    else:
        message = f"decision: {decision} (threshold {threshold:.4f}, {THRESHOLD_SOURCE})"
    print(f"cosine score ({embedding}): {score:.4f}\n{message}\npair view: {out}")
    return {"score": score, "threshold": threshold, "decision": decision, "figure": str(out), "message": message}


def gallery(model, transform, split, pairs, scores, threshold, out_dir, n: int = 4,
            embedding: str = "sa+glca") -> list[Path]:
    """Pair views of the `n` hardest twin impostors (highest scores) and the `n` hardest genuine pairs
    (lowest scores) of `split`, written to `out_dir`; the errors the threshold is most likely to make.

    `pairs` index `split.samples()` and `scores` are their cosine scores (as the evaluation computed them).
    """
    samples, ids = split.samples(), split.ids
    scores = np.asarray(scores)
    out_dir = Path(out_dir)
    written = []
    for kind, name, sign in (("twin", "twin_impostor", -1), ("genuine", "genuine", 1)):
        idx = [i for i, p in enumerate(pairs) if p.kind == kind]
        idx = sorted(idx, key=lambda i: sign * scores[i])[:n]
        for rank, i in enumerate(idx, 1):
            (pa, la, _), (pb, lb, _) = samples[pairs[i].a], samples[pairs[i].b]
            what = "twin impostor (different people)" if kind == "twin" else "genuine pair (same person)"
            title = f"hardest {what} #{rank} of the {split.name} split: ids {ids[la]} vs {ids[lb]}"
            path = out_dir / f"{name}_{rank:02d}_score{scores[i]:+.3f}.png"
            pair_view(model, transform, pa, pb, threshold, path, title, embedding)
            written.append(path)
    return written


def sibling_pair_paths(split, group_index: int) -> tuple[str, str]:
    """First image of each of the first two ids of sibling group `group_index` (a twin impostor pair)."""
    multi = [g for g, members in enumerate(split.groups) if len(members) > 1]
    if not 0 <= group_index < len(split.groups) or len(split.groups[group_index]) < 2:
        raise ValueError(f"{split.name} split: sibling group {group_index} is not a group of 2+ ids; "
                         f"choose one of {multi[:10]}{' ...' if len(multi) > 10 else ''} "
                         f"({len(multi)} groups)")
    a, b = split.groups[group_index][:2]
    return split.images[a][0], split.images[b][0]

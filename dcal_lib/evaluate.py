"""Verification evaluation: embed each image once, score all pairs by cosine similarity, report and plot.

The per-epoch validation of training (``evaluate_split``) and the standalone evaluation of a checkpoint
(``evaluate_checkpoint``) share the pair construction, the folds and the metrics, so their numbers
are comparable. Pairs are always drawn with seed 0, so every checkpoint is scored on the same pairs.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve
from torch.utils.data import DataLoader

from .config import Config, ConfigError
from .data import FaceDataset, load_split, split_val
from .explain import eval_mode, gallery, load_model
from .metrics import assign_folds, far_key, verification_metrics
from .pairs import Pair, make_pairs, pair_arrays
from .tracking import make_tracker

PAIR_SEED = 0
COLORS = {"genuine": "tab:green", "twin": "tab:red", "general": "tab:blue"}


@torch.no_grad()
def embed_split(model, split, transform, batch_size, device, kind="sa+glca", num_workers=0) -> np.ndarray:
    """Unit-norm embeddings of ``split.samples()`` in order, (n_images, D) float32.

    fp16 autocast on CUDA only: the features are normalised in float32 inside ``model.embed``.
    """
    device = torch.device(device)
    net = getattr(model, "module", model)  # a DataParallel wrapper has no .embed
    loader = DataLoader(FaceDataset(split.samples(), transform), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    out = []
    with eval_mode(net), torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        for images, _, _ in loader:
            out.append(net.embed(images.to(device, non_blocking=True), kind).float().cpu())
    return torch.cat(out).numpy()


def score_pairs(embeddings: np.ndarray, pairs: list[Pair]) -> np.ndarray:
    """Cosine similarity of each pair (the embeddings are unit-norm)."""
    cols = pair_arrays(pairs)
    return np.einsum("ij,ij->i", embeddings[cols["a"]], embeddings[cols["b"]]).astype(np.float64)


def pair_metrics(pairs: list[Pair], scores: np.ndarray, split_name: str = "") -> dict:
    """{"twin", "general", "all"}: genuine pairs against each impostor kind, on one fold partition."""
    cols = pair_arrays(pairs)
    folds = assign_folds(cols["group"])
    genuine = cols["kind"] == "genuine"
    impostors = {"twin": cols["kind"] == "twin", "general": cols["kind"] == "general", "all": ~genuine}
    out = {}
    for name, imp in impostors.items():
        sel = genuine | imp
        try:
            out[name] = verification_metrics(scores[sel], genuine[sel], folds[sel])
        except ValueError as e:
            raise ValueError(f"{split_name} split, genuine vs {name} impostor pairs: {e}") from e
    return out


def evaluate_split(model, split, transform, device, kind="sa+glca", batch_size=64) -> dict:
    """Metrics dict of ``pair_metrics`` for one split (what training validates with every epoch)."""
    emb = embed_split(model, split, transform, batch_size, device, kind)
    pairs = make_pairs(split, seed=PAIR_SEED)
    return pair_metrics(pairs, score_pairs(emb, pairs), split.name)


def evaluate_checkpoint(checkpoint, data_dir, image_root=None, split="test", out=None,
                        embedding="sa+glca", batch_size=64, device=None, gallery_n=4) -> dict:
    """Evaluate a training checkpoint on a split and write metrics, pairs, embeddings and plots to ``out``.

    ``out`` defaults to ``<run dir>/eval`` with the run dir two levels above the checkpoint
    (``<run>/checkpoints/last.pt``). ``split="val"`` rebuilds the run's validation groups from the train
    split with the checkpoint's ``val_groups`` and ``seed``. The ``gallery_n`` hardest twin impostors and
    genuine pairs are drawn into ``out/attention``. Returns what ``metrics.json`` holds.
    """
    checkpoint = Path(checkpoint)
    out = Path(out) if out else checkpoint.parent.parent / "eval"
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, transform, ckpt = load_model(checkpoint, device)
    cfg = Config(**ckpt["config"])
    if split == "val":  # the groups training held out, re-derived from the run's own settings
        data = split_val(load_split(data_dir, "train", image_root), cfg.val_groups, cfg.seed)[1]
        if data is None:
            raise ConfigError(f"{checkpoint} was trained with val_groups=0: there is no val split; use test")
    else:
        data = load_split(data_dir, split, image_root)

    emb = embed_split(model, data, transform, batch_size, device, embedding)
    pairs = make_pairs(data, seed=PAIR_SEED)
    scores = score_pairs(emb, pairs)
    metrics = pair_metrics(pairs, scores, data.name)
    metrics.update(checkpoint=str(checkpoint), epoch=ckpt.get("epoch"), embedding=embedding, split=split)
    kinds = pair_arrays(pairs)["kind"]
    if ckpt.get("threshold") is not None:
        t = float(ckpt["threshold"])
        metrics["deployment"] = {
            "threshold": t,
            "source": "validation twin EER",
            "twin_far": float(np.mean(scores[kinds == "twin"] >= t)),
            "twin_frr": float(np.mean(scores[kinds == "genuine"] < t)),
        }

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    samples = data.samples()
    paths = [p for p, _, _ in samples]
    with open(out / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path_a", "path_b", "kind", "score"])
        w.writerows([paths[p.a], paths[p.b], p.kind, f"{s:.6f}"] for p, s in zip(pairs, scores, strict=True))
    ids = data.ids
    np.savez_compressed(out / "embeddings.npz", ids=np.array([ids[label] for _, label, _ in samples]),
                        paths=np.array(paths), embeddings=emb)
    title = f"{data.name} split, {embedding} embedding, epoch {ckpt.get('epoch')}"
    plot_roc(scores, kinds, metrics, title).savefig(out / "roc.png", dpi=120)
    plot_scores(scores, kinds, metrics, title).savefig(out / "scores.png", dpi=120)
    if gallery_n:
        gallery(model, transform, data, pairs, scores, ckpt.get("threshold"), out / "attention", n=gallery_n,
                embedding=embedding)
    log_to_training_run(ckpt, metrics, out)
    return metrics


def log_to_training_run(ckpt: dict, metrics: dict, out: Path) -> None:
    """The evaluation joins the tracked run that produced the checkpoint: metrics, metrics.json, plots.

    A tracker that cannot be reached (another machine, no key) warns once and nothing else happens.
    """
    cfg = Config(**ckpt["config"])
    if cfg.tracker == "none" or not ckpt.get("tracker_run_id"):
        return
    tracker = make_tracker(cfg.tracker, run_name=cfg.run_name, run_dir=cfg.run_dir, mlflow_uri=cfg.mlflow_uri,
                           wandb_project=cfg.wandb_project, wandb_entity=cfg.wandb_entity,
                           run_id=ckpt["tracker_run_id"])
    split = metrics["split"]
    tracker.log_metrics({f"{split}/{kind}_{key}": metrics[kind][key] for kind in ("twin", "general", "all")
                         for key in ("auc", "eer", "accuracy") if metrics[kind][key] is not None},
                        ckpt.get("global_step", 0))
    for name in ("metrics.json", "roc.png", "scores.png"):
        tracker.log_artifact(out / name)
    tracker.finish()


def plot_roc(scores: np.ndarray, kinds: np.ndarray, metrics: dict, title: str) -> Figure:
    """Twin and general ROC on a log false-accept axis, where the operating points of interest lie."""
    fig = Figure(figsize=(6.4, 5.6), layout="constrained")
    ax = fig.add_subplot()
    genuine = kinds == "genuine"
    floor = 1.0
    for name in ("twin", "general"):
        sel = genuine | (kinds == name)
        fpr, tpr, _ = roc_curve(genuine[sel], scores[sel])
        floor = min(floor, 1.0 / (~genuine[sel]).sum())
        m = metrics[name]
        label = f"genuine vs {name} (AUC {m['auc']:.3f}, EER {100 * m['eer']:.1f}%)"
        ax.plot(np.maximum(fpr, floor / 2), tpr, color=COLORS[name], lw=2, label=label)
    grid = np.logspace(np.log10(floor / 2), 0, 200)
    ax.plot(grid, grid, color="grey", ls="--", lw=1, label="chance (TAR = FAR)")
    ax.set_xscale("log")
    ax.set_xlim(floor / 2, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false accept rate (FAR, log scale)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.set_title(f"ROC: {title}", fontsize=10)
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.12)
    fig.legend(loc="outside lower center", fontsize=9, ncols=1, frameon=False)
    return fig


def plot_scores(scores: np.ndarray, kinds: np.ndarray, metrics: dict, title: str) -> Figure:
    """Score histograms per pair kind (density: the kinds have very different counts)."""
    fig = Figure(figsize=(9.0, 4.6), layout="constrained")
    ax = fig.add_subplot()
    bins = np.linspace(scores.min(), scores.max(), 41)
    for name in ("genuine", "twin", "general"):
        s = scores[kinds == name]
        ax.hist(s, bins=bins, density=True, histtype="stepfilled", alpha=0.15, color=COLORS[name])
        ax.hist(s, bins=bins, density=True, histtype="step", lw=2, color=COLORS[name],
                label=f"{name} (n={len(s)})")
    t = metrics["twin"]["eer_threshold"]
    ax.axvline(t, color="black", ls="--", lw=1.5, label=f"twin EER threshold {t:.3f}")
    if "deployment" in metrics:
        d = metrics["deployment"]["threshold"]
        ax.axvline(d, color="purple", ls=":", lw=2, label=f"deployment threshold {d:.3f} (validation)")
    ax.set_xlabel("cosine similarity of the pair's embeddings")
    ax.set_ylabel("density")
    ax.set_title(f"Pair scores: {title}", fontsize=10)
    fig.legend(loc="outside right upper", fontsize=9, frameon=False)
    return fig


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def format_summary(metrics: dict) -> str:
    """A few lines for the end of a run: the twin numbers first, then general impostors."""
    lines = []
    if "split" in metrics:
        lines.append(f"{metrics['split']} split, {metrics['embedding']} embedding, epoch {metrics['epoch']}")
    for name, head in (("twin", "Twin"), ("general", "General")):
        m = metrics[name]
        acc = "n/a" if m["accuracy"] is None else f"{_pct(m['accuracy'])} ± {_pct(m['accuracy_std'])}"
        tar = m[far_key(1e-2)]
        tar = "n/a (fewer than 100 impostor pairs)" if tar is None else _pct(tar)
        lines.append(
            f"{head} ({m['n_genuine']} genuine vs {m['n_impostor']} {name} impostor pairs): "
            f"AUC {m['auc']:.4f}  EER {_pct(m['eer'])} (threshold {m['eer_threshold']:.4f})  "
            f"TAR@FAR=1e-2 {tar}  accuracy {acc}"
        )
    if "deployment" in metrics:
        d = metrics["deployment"]
        lines.append(f"Deployment threshold {d['threshold']:.4f} ({d['source']}): "
                     f"twin FAR {_pct(d['twin_far'])}, FRR {_pct(d['twin_frr'])}")
    return "\n".join(lines)

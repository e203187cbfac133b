"""Verification metrics for one genuine-vs-impostor score set (higher score = more likely the same person).

Conventions, so every number can be reproduced by hand:
- A pair is accepted as "same person" when ``score >= threshold``.
- EER: the ROC is traversed from the strictest threshold down; the equal-error point is linearly
  interpolated between the two operating points where FPR - FNR changes sign. The reported threshold
  is interpolated between those two points' thresholds with the same fraction.
- TAR@FAR: the highest TPR among the ROC operating points whose FPR <= FAR, i.e. the TPR at the lowest
  threshold that still keeps the false-accept rate within the budget. No interpolation: the budget is never
  exceeded. A FAR below 1 / n_impostor cannot be resolved by the data and is reported as None.
- Accuracy: k-fold, folds disjoint by sibling group (LFW-style); for each fold the threshold maximises
  accuracy on the other folds and is applied to the held-out fold. Reported as the unweighted mean and
  population standard deviation over folds.
"""
from __future__ import annotations

import re

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def far_key(far: float) -> str:
    """Metric key for a FAR level: 1e-2 -> "tar@far=1e-2"."""
    return "tar@far=" + re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{far:.0e}")


def verification_metrics(scores, labels, folds=None, far_levels=(1e-1, 1e-2, 1e-3)) -> dict:
    """AUC, EER (+ threshold), TAR at each FAR, fold accuracy and pair counts.

    ``labels`` is 1 for genuine pairs and 0 for impostor pairs. ``folds`` is one fold id per pair
    (see ``assign_folds``); without it ``accuracy`` and ``accuracy_std`` are None.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be 1-D of equal length")
    n_genuine = int(labels.sum())
    n_impostor = int(labels.size - n_genuine)
    if n_genuine == 0 or n_impostor == 0:
        raise ValueError(
            f"verification metrics need genuine and impostor pairs; got {n_genuine} genuine and "
            f"{n_impostor} impostor (use a split with at least one id with 2+ images and 2+ ids)"
        )
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf; check the embeddings")

    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    eer, eer_threshold = _eer(fpr, tpr, thresholds)
    out = {"auc": float(roc_auc_score(labels, scores)), "eer": eer, "eer_threshold": eer_threshold}
    for far in far_levels:
        estimable = far >= 1.0 / n_impostor
        out[far_key(far)] = float(tpr[fpr <= far].max()) if estimable else None
    if folds is None:
        out["accuracy"] = out["accuracy_std"] = None
    else:
        out["accuracy"], out["accuracy_std"] = _fold_accuracy(scores, labels, np.asarray(folds))
    out["n_genuine"] = n_genuine
    out["n_impostor"] = n_impostor
    return out


def _eer(fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray) -> tuple[float, float]:
    """Equal error rate and its threshold, interpolated where FPR crosses FNR."""
    diff = fpr - (1.0 - tpr)                    # -1 at the strictest point, +1 at the loosest
    i = int(np.argmax(diff >= 0))               # first point at or past the crossing (i >= 1)
    if diff[i] == 0:
        return float(fpr[i]), float(thresholds[i])
    frac = diff[i - 1] / (diff[i - 1] - diff[i])
    eer = fpr[i - 1] + frac * (fpr[i] - fpr[i - 1])
    # sklearn's first threshold is +inf (accept nothing); interpolating from it is meaningless.
    hi = thresholds[i - 1] if np.isfinite(thresholds[i - 1]) else thresholds[i]
    return float(eer), float(hi + frac * (thresholds[i] - hi))


def _best_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """Threshold maximising accuracy of ``score >= t``, midway between the best score and the next lower."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[s[1:] != s[:-1], True]         # last position of each run of equal scores
    tp = np.cumsum(y)[last]                     # accepted genuine when t = that score
    fp = np.cumsum(~y)[last]
    n_imp = (~y).sum()
    correct = np.r_[n_imp, tp + (n_imp - fp)]   # entry 0: accept nothing; entry j: t = distinct[j - 1]
    best = int(np.argmax(correct))
    distinct = s[last]
    if best == 0:
        return float("inf")
    if best == len(distinct):
        return float("-inf")
    return float((distinct[best - 1] + distinct[best]) / 2.0)


def _fold_accuracy(scores: np.ndarray, labels: np.ndarray, folds: np.ndarray) -> tuple[float, float]:
    if folds.shape != scores.shape:
        raise ValueError(f"folds {folds.shape} must have one fold id per pair {scores.shape}")
    fold_ids = np.unique(folds)
    if len(fold_ids) < 2:
        raise ValueError("fold accuracy needs at least 2 folds (at least 2 sibling groups with pairs)")
    accs = []
    for k in fold_ids:
        test = folds == k
        t = _best_threshold(scores[~test], labels[~test])
        accs.append(np.mean((scores[test] >= t) == labels[test]))
    return float(np.mean(accs)), float(np.std(accs))


def assign_folds(groups, n_folds: int = 10, seed: int = 0) -> np.ndarray:
    """One fold id per pair such that every pair of a sibling group lands in the same fold.

    Groups are shuffled (seeded), then dealt largest first to the fold holding the fewest pairs so far,
    which keeps folds balanced by pair count while a group never straddles two folds.
    """
    groups = np.asarray(groups)
    uniq, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    perm = np.random.default_rng(seed).permutation(len(uniq))
    perm = perm[np.argsort(-counts[perm], kind="stable")]
    load = np.zeros(n_folds, dtype=np.int64)
    fold_of_group = np.empty(len(uniq), dtype=np.int64)
    for g in perm:
        f = int(np.argmin(load))
        fold_of_group[g] = f
        load[f] += counts[g]
    return fold_of_group[inverse.reshape(-1)]

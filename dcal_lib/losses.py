"""Verification losses: a cosine-margin identity loss, batch-hard triplet, uncertainty weighting."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class IdentityHead(nn.Module):
    """Classifier over the training identities.

    `cosface` puts an additive angular margin on the target logit (s·(cos θ − m)), which shapes
    the normalised embedding used for open-set verification; `softmax` is the paper's plain
    linear classifier with cross-entropy, kept for the ablation.
    """

    def __init__(self, dim: int, num_classes: int, kind: str = "cosface", s: float = 30.0, m: float = 0.35):
        super().__init__()
        self.kind, self.s, self.m = kind, s, m
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.normal_(self.weight, std=0.01)
        self.bias = nn.Parameter(torch.zeros(num_classes)) if kind == "softmax" else None

    def forward(self, feat: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        feat = feat.float()
        if self.kind == "softmax":
            return F.cross_entropy(F.linear(feat, self.weight.float(), self.bias.float()), labels)
        cos = F.linear(F.normalize(feat, dim=1), F.normalize(self.weight.float(), dim=1))
        logits = self.s * (cos - self.m * F.one_hot(labels, cos.shape[1]))
        return F.cross_entropy(logits, labels)


def batch_hard_triplet(feat: torch.Tensor, labels: torch.Tensor, margin: float = 0.3) -> torch.Tensor:
    """Hardest positive vs hardest negative per anchor, in cosine distance.

    The twin-aware sampler puts siblings in the same batch, so the hardest negative is usually
    the twin. Anchors without a positive or a negative in the batch are left out.
    """
    f = F.normalize(feat.float(), dim=1)
    dist = 1.0 - f @ f.t()
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos, neg = same & ~eye, ~same
    hardest_pos = dist.masked_fill(~pos, float("-inf")).amax(1)
    hardest_neg = dist.masked_fill(~neg, float("inf")).amin(1)
    valid = pos.any(1) & neg.any(1)
    if not valid.any():
        return feat.sum() * 0.0
    return F.relu(hardest_pos[valid] - hardest_neg[valid] + margin).mean()


def uncertainty_weighted(losses: torch.Tensor, log_vars: torch.Tensor) -> torch.Tensor:
    """Σ ½(exp(−w_b)·L_b + w_b): learnt per-branch weights (FairMOT); the total may go negative."""
    return 0.5 * (torch.exp(-log_vars) * losses + log_vars).sum()

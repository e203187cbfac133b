import math

import torch
import torch.nn.functional as F

from dcal_lib.losses import IdentityHead, batch_hard_triplet, uncertainty_weighted


def test_cosface_matches_hand_computation():
    torch.manual_seed(0)
    head = IdentityHead(4, 3, "cosface", s=30.0, m=0.35)
    feat, labels = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    w = head.weight.detach()
    expected = 0.0
    for f, y in zip(feat, labels, strict=True):
        cos = [float(f @ w[c] / (f.norm() * w[c].norm())) for c in range(3)]
        logits = [30.0 * (c - 0.35 * (i == y)) for i, c in enumerate(cos)]
        expected += -logits[y] + math.log(sum(math.exp(v) for v in logits))
    assert math.isclose(head(feat, labels).item(), expected / 5, rel_tol=1e-5)


def test_softmax_head_is_plain_cross_entropy():
    head = IdentityHead(4, 3, "softmax")
    feat, labels = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    ref = F.cross_entropy(feat @ head.weight.t() + head.bias, labels)
    assert torch.allclose(head(feat, labels), ref)


def test_batch_hard_triplet_matches_a_loop():
    torch.manual_seed(0)
    feat, labels = torch.randn(7, 5), torch.tensor([0, 0, 1, 1, 1, 2, 3])
    f = F.normalize(feat, dim=1)
    losses = []
    for i in range(7):
        pos = [1 - float(f[i] @ f[j]) for j in range(7) if j != i and labels[j] == labels[i]]
        neg = [1 - float(f[i] @ f[j]) for j in range(7) if labels[j] != labels[i]]
        if pos and neg:
            losses.append(max(0.0, max(pos) - min(neg) + 0.3))
    assert math.isclose(batch_hard_triplet(feat, labels, 0.3).item(), sum(losses) / len(losses), rel_tol=1e-5)
    assert batch_hard_triplet(feat[:1], labels[:1]).item() == 0.0


def test_uncertainty_weighting():
    losses, w = torch.tensor([2.0, 1.0]), torch.tensor([0.0, math.log(2.0)])
    assert math.isclose(uncertainty_weighted(losses, w).item(), 0.5 * (2.0 + 0.5 + math.log(2.0)), rel_tol=1e-6)

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from dcal_lib.metrics import assign_folds, verification_metrics


def _random_scores(seed, n_gen=300, n_imp=700):
    rng = np.random.default_rng(seed)
    # rounding creates ties, the case where hand-written ROC code usually goes wrong
    scores = np.round(np.r_[rng.normal(0.8, 1, n_gen), rng.normal(0, 1, n_imp)], 1)
    labels = np.r_[np.ones(n_gen, int), np.zeros(n_imp, int)]
    return scores, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_and_tar_agree_with_sklearn_roc(seed):
    scores, labels = _random_scores(seed)
    m = verification_metrics(scores, labels, far_levels=(0.1, 0.01, 0.005))
    assert m["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    # Mann-Whitney form of the AUC, independent of any ROC code
    gen, imp = scores[labels == 1], scores[labels == 0]
    diff = gen[:, None] - imp[None, :]
    assert m["auc"] == pytest.approx((diff > 0).mean() + 0.5 * (diff == 0).mean(), abs=1e-12)
    fpr, tpr, _ = roc_curve(labels, scores)  # sklearn's default (intermediate points dropped)
    for far, key in [(0.1, "tar@far=1e-1"), (0.01, "tar@far=1e-2"), (0.005, "tar@far=5e-3")]:
        assert m[key] == pytest.approx(tpr[fpr <= far].max(), abs=1e-12)
    assert (m["n_genuine"], m["n_impostor"]) == (300, 700)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eer_threshold_is_an_operating_point_around_the_eer(seed):
    scores, labels = _random_scores(seed)
    m = verification_metrics(scores, labels)
    t = m["eer_threshold"]
    far = np.mean(scores[labels == 0] >= t)
    frr = np.mean(scores[labels == 1] < t)
    assert min(far, frr) <= m["eer"] <= max(far, frr)
    assert abs(far - frr) < 0.1  # tied scores make the ROC steps about this coarse


def test_perfect_separation():
    scores = np.array([0.9, 0.8, 0.75, 0.3, 0.2, -0.1])
    labels = np.array([1, 1, 1, 0, 0, 0])
    m = verification_metrics(scores, labels, folds=np.array([0, 1, 2, 0, 1, 2]))
    assert m["eer"] == 0.0 and m["auc"] == 1.0
    t = m["eer_threshold"]
    assert (scores[labels == 1] >= t).all() and (scores[labels == 0] < t).all()
    assert m["tar@far=1e-1"] is None  # 3 impostor pairs cannot resolve a 10 % false-accept rate
    assert m["accuracy"] == 1.0 and m["accuracy_std"] == 0.0


def test_eer_interpolation_by_hand():
    # Operating points (FPR, FNR) as the threshold falls: 0.9 -> (0, 2/3), 0.8 -> (1/3, 2/3),
    # 0.5 (a genuine and an impostor tie) -> (2/3, 1/3). FPR - FNR goes -1/3 -> +1/3, so the
    # crossing is halfway along that diagonal step: EER = 1/2, threshold = (0.8 + 0.5) / 2.
    scores = np.array([0.9, 0.5, 0.2, 0.8, 0.5, 0.1])
    labels = np.array([1, 1, 1, 0, 0, 0])
    m = verification_metrics(scores, labels)
    assert m["eer"] == pytest.approx(0.5)
    assert m["eer_threshold"] == pytest.approx(0.65)


def test_eer_of_two_unit_gaussians():
    d, n = 2.0, 200_000
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(d, 1, n), rng.normal(0, 1, n)]
    labels = np.r_[np.ones(n), np.zeros(n)]
    m = verification_metrics(scores, labels)
    phi = 0.5 * (1 + math.erf(-d / 2 / math.sqrt(2)))  # Phi(-d/2) = 0.1587
    sigma = math.sqrt(phi * (1 - phi) / n)  # about 0.0008
    assert m["eer"] == pytest.approx(phi, abs=5 * sigma)
    assert m["eer_threshold"] == pytest.approx(d / 2, abs=0.02)
    # TAR at FAR f for this model is Phi(d - z_{1-f}); z_{0.9} = 1.2816
    assert m["tar@far=1e-1"] == pytest.approx(0.5 * (1 + math.erf((d - 1.2816) / math.sqrt(2))), abs=0.01)


def test_tar_at_far_by_hand():
    imp = [0.9, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.0, -0.1, -0.2]
    gen = [0.95, 0.85, 0.6, 0.45, 0.35]
    scores = np.array(gen + imp)
    labels = np.array([1] * 5 + [0] * 10)
    m = verification_metrics(scores, labels, far_levels=(0.1, 0.2, 0.01))
    # FAR <= 0.1 allows one of ten impostors: lowest such threshold is 0.6 (0.5 would accept two),
    # which accepts 0.95, 0.85, 0.6 -> 3 / 5.
    assert m["tar@far=1e-1"] == pytest.approx(0.6)
    # FAR <= 0.2 allows two: threshold 0.45 accepts four of five genuine pairs.
    assert m["tar@far=2e-1"] == pytest.approx(0.8)
    # one impostor is 10 %: a 1 % rate cannot be measured on ten impostor pairs
    assert m["tar@far=1e-2"] is None


def test_not_estimable_levels_follow_the_impostor_count():
    rng = np.random.default_rng(0)
    for n_imp, expected in [(50, [True, False, False]), (100, [True, True, False]), (1000, [True] * 3)]:
        scores = np.r_[rng.normal(1, 1, 20), rng.normal(0, 1, n_imp)]
        labels = np.r_[np.ones(20), np.zeros(n_imp)]
        m = verification_metrics(scores, labels)
        got = [m[k] is not None for k in ("tar@far=1e-1", "tar@far=1e-2", "tar@far=1e-3")]
        assert got == expected, n_imp


def test_fold_accuracy_by_hand():
    # fold 0 alone: accuracies of "score >= t" peak uniquely at t = 0.8 (5 of 6) -> threshold
    # midway to the next lower score, (0.8 + 0.65) / 2 = 0.725. Fold 1 alone peaks at 0.74 ->
    # (0.74 + 0.5) / 2 = 0.62. Fold 0 at 0.62: 0.4 rejected, impostor 0.65 accepted -> 4/6.
    # Fold 1 at 0.725: only 0.05 rejected wrongly -> 5/6. Mean 0.75, std 1/12.
    scores = np.array([0.9, 0.8, 0.4, 0.65, 0.55, 0.3, 0.75, 0.74, 0.05, 0.5, 0.1, 0.0])
    labels = np.array([1, 1, 1, 0, 0, 0] * 2)
    folds = np.array([0] * 6 + [1] * 6)
    m = verification_metrics(scores, labels, folds=folds)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["accuracy_std"] == pytest.approx(1 / 12)
    assert verification_metrics(scores, labels)["accuracy"] is None


def test_input_errors_are_explained():
    with pytest.raises(ValueError, match="genuine and impostor"):
        verification_metrics([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="NaN"):
        verification_metrics([np.nan, 0.2], [1, 0])
    with pytest.raises(ValueError, match="at least 2 folds"):
        verification_metrics([0.1, 0.2], [1, 0], folds=[3, 3])


def test_folds_never_split_a_sibling_group():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 60, size=31)  # like the test split: 31 twin groups of uneven size
    groups = np.repeat(rng.permutation(1000)[:31], sizes)
    rng.shuffle(groups)
    folds = assign_folds(groups, n_folds=10, seed=3)
    assert folds.shape == groups.shape
    for g in np.unique(groups):
        assert len(np.unique(folds[groups == g])) == 1
    load = np.bincount(folds, minlength=10)
    assert len(load) == 10 and load.min() > 0
    assert load.max() - load.min() <= sizes.max()
    assert (assign_folds(groups, 10, seed=3) == folds).all()
    assert not (assign_folds(groups, 10, seed=4) == folds).all()


def test_fewer_groups_than_folds():
    folds = assign_folds(np.array([7, 7, 9, 9, 9]), n_folds=10)
    assert folds[0] == folds[1] and folds[2] == folds[3] == folds[4] and folds[0] != folds[2]

"""Evaluation metrics against hand-computed values, scipy and (if installed) sklearn."""

import itertools

import jax
import numpy as np
import pytest
from scipy import stats

from numpyro_svae.metrics import (
    adjusted_rand_index,
    best_label_matching,
    confusion_matrix,
    gaussian_masked_loglik,
    masked_rmse,
    random_gap_mask,
    regimes_used,
    segmentation_accuracy,
)


def test_confusion_matrix_matches_hand_count():
    pred = np.array([0, 0, 1, 2, 2, 2])
    true = np.array([1, 1, 0, 0, 0, 1])
    expected = np.array([[0, 2], [1, 0], [2, 1]])
    np.testing.assert_array_equal(confusion_matrix(pred, true), expected)
    np.testing.assert_array_equal(
        confusion_matrix(pred, true, num_pred=4, num_true=3)[:3, :2], expected
    )


@pytest.mark.parametrize("perm", list(itertools.permutations(range(3))))
def test_best_label_matching_of_permuted_labels_matches_identity(perm):
    rng = np.random.default_rng(0)
    true = rng.integers(0, 3, size=(4, 50))
    pred = np.asarray(perm)[true]
    match = best_label_matching(pred, true)
    assert match.accuracy == 1.0
    # the mapping inverts the permutation
    np.testing.assert_array_equal(match.mapping[np.asarray(perm)], np.arange(3))
    np.testing.assert_array_equal(match.relabeled, true)
    assert segmentation_accuracy(pred, true) == 1.0


def test_best_label_matching_more_predicted_labels_matches_hand_count():
    # C = [[1, 0], [1, 0], [0, 2]]: one of pred 0/1 goes to true 0, pred 2 to true 1
    pred = np.array([0, 1, 2, 2])
    true = np.array([0, 0, 1, 1])
    match = best_label_matching(pred, true)
    assert match.accuracy == pytest.approx(0.75)
    assert match.mapping[2] == 1
    assert sorted(match.mapping[:2].tolist()) == [-1, 0]
    assert np.sum(match.relabeled == true) == 3


def test_best_label_matching_fewer_predicted_labels_matches_hand_count():
    pred = np.array([[0, 0, 0], [0, 0, 0]])
    true = np.array([[0, 0, 1], [2, 0, 0]])
    match = best_label_matching(pred, true, num_pred=1, num_true=3)
    np.testing.assert_array_equal(match.mapping, [0])
    assert match.accuracy == pytest.approx(4 / 6)


def test_segmentation_accuracy_with_fixed_mapping_matches_hand_count():
    pred = np.array([0, 1, 1, 2])
    true = np.array([1, 0, 0, 0])
    assert segmentation_accuracy(pred, true, mapping=np.array([1, 0, -1])) == 0.75


def test_adjusted_rand_index_matches_hand_computation():
    # contingency [[2, 0, 0], [0, 1, 1]]: index 1, sum_a 2, sum_b 1, C(4, 2) = 6
    # ARI = (1 - 2/6) / (3/2 - 2/6) = 4/7
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)
    assert adjusted_rand_index([2, 2, 0, 0, 1], [0, 0, 1, 1, 3]) == pytest.approx(1.0)
    assert adjusted_rand_index([0, 0, 0], [1, 1, 1]) == 1.0


def test_adjusted_rand_index_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics", reason="sklearn is an optional oracle")
    rng = np.random.default_rng(1)
    cases = [
        (rng.integers(0, 4, (3, 40)), rng.integers(0, 3, (3, 40))),
        (rng.integers(0, 2, 200), rng.integers(0, 5, 200)),
        (np.zeros(10, int), np.arange(10)),
        (np.arange(10), np.arange(10)),
    ]
    true = rng.integers(0, 3, 300)
    noisy = np.where(rng.random(300) < 0.2, rng.integers(0, 3, 300), (true + 1) % 3)
    cases.append((noisy, true))
    for pred, true in cases:
        expected = metrics.adjusted_rand_score(true.ravel(), pred.ravel())
        assert adjusted_rand_index(pred, true) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_regimes_used_matches_hand_count():
    labels = np.array([[0] * 50 + [3] * 45 + [1] * 5])  # label 2 unused
    assert regimes_used(labels, threshold=0.01) == 3
    assert regimes_used(labels, threshold=0.1) == 2
    assert regimes_used(labels[0], threshold=0.0) == 3
    marg = np.zeros((2, 10, 4))
    marg[..., 0] = 0.9
    marg[..., 1] = 0.08
    marg[..., 2] = 0.02
    assert regimes_used(marg, threshold=0.05) == 2
    assert regimes_used(marg[0], threshold=0.01) == 3


def test_masked_rmse_matches_hand_computation():
    x = np.zeros((2, 3, 2))
    xp = np.zeros((2, 3, 2))
    xp[0, 1] = [3.0, 4.0]  # masked frame
    xp[1, 2] = [100.0, 100.0]  # observed frame: ignored
    mask = np.array([[True, False, True], [True, False, True]])
    # masked entries: (3, 4) and (0, 0) -> sqrt((9 + 16) / 4)
    assert masked_rmse(x, xp, mask) == pytest.approx(2.5)
    # entry-level mask and a single sequence [T, Dx]
    entry = np.ones((3, 2), bool)
    entry[1, 0] = False
    assert masked_rmse(x[0], xp[0], entry) == pytest.approx(3.0)


def test_gaussian_masked_loglik_matches_scipy():
    rng = np.random.default_rng(2)
    x, mean = rng.normal(size=(2, 3, 5, 2))
    var = rng.uniform(0.5, 2.0, size=(3, 5, 2))
    mask = rng.random((3, 5)) < 0.5
    mask[0, 0] = False
    expected = stats.norm.logpdf(x, mean, np.sqrt(var))[~mask].mean()
    assert gaussian_masked_loglik(x, mean, var, mask) == pytest.approx(expected, rel=1e-12)
    # broadcast variance [Dx]
    v = np.array([0.7, 1.3])
    expected = stats.norm.logpdf(x, mean, np.sqrt(v))[~mask].mean()
    assert gaussian_masked_loglik(x, mean, v, mask) == pytest.approx(expected, rel=1e-12)


def test_metrics_raise_naming_the_argument():
    x = np.zeros((2, 5, 3))
    mask = np.ones((2, 5), bool)
    mask[0, 0] = False
    with pytest.raises(ValueError, match="`pred`"):
        best_label_matching(np.zeros((2, 2, 2), int), np.zeros((2, 2, 2), int))
    with pytest.raises(ValueError, match="`pred` must have the same shape as `true`"):
        adjusted_rand_index(np.zeros(4, int), np.zeros(5, int))
    with pytest.raises(ValueError, match="`x_pred`"):
        masked_rmse(x, x[:, :4], mask)
    with pytest.raises(ValueError, match="`mask`"):
        masked_rmse(x, x, mask[:, :4])
    with pytest.raises(ValueError, match="no masked"):
        masked_rmse(x, x, np.ones((2, 5), bool))
    with pytest.raises(ValueError, match="`var`"):
        gaussian_masked_loglik(x, x, np.ones(4), mask)
    with pytest.raises(ValueError, match="`var` must be positive"):
        gaussian_masked_loglik(x, x, np.zeros(3), mask)
    with pytest.raises(ValueError, match="`num_true`"):
        best_label_matching([0, 1, 2], [0, 1, 2], num_true=2)
    with pytest.raises(ValueError, match="`threshold`"):
        regimes_used([0, 1], threshold=2.0)
    with pytest.raises(ValueError, match="`max_len`"):
        random_gap_mask(0, 2, 20, min_len=10, max_len=30)


@pytest.mark.parametrize("num_gaps", [1, 3])
def test_random_gap_mask_matches_requested_gaps(num_gaps):
    N, T, lo, hi = 50, 200, 10, 30
    mask = random_gap_mask(jax.random.key(3), N, T, min_len=lo, max_len=hi, num_gaps=num_gaps)
    assert mask.shape == (N, T) and mask.dtype == bool
    missing = (~mask).sum(axis=1)
    assert missing.min() >= lo and missing.max() <= num_gaps * hi
    if num_gaps == 1:
        # exactly one contiguous run per sequence
        edges = np.diff(np.concatenate([np.ones((N, 1), bool), mask], axis=1).astype(int), axis=1)
        np.testing.assert_array_equal((edges == -1).sum(axis=1), 1)
        assert missing.min() < missing.max()  # lengths vary
    # int seeds are reproducible and raw keys are accepted
    np.testing.assert_array_equal(random_gap_mask(7, N, T), random_gap_mask(7, N, T))
    np.testing.assert_array_equal(
        random_gap_mask(jax.random.PRNGKey(7), N, T), random_gap_mask(7, N, T)
    )

"""Evaluation metrics for segmentation and imputation (numpy / scipy; no model dependency).

Conventions
-----------
- Label arrays are integer arrays of shape ``[T]`` or ``[N, T]``; metrics pool all frames of
  all sequences (they flatten over ``N``).
- Data arrays are ``[T, Dx]`` or ``[N, T, Dx]``.
- Masks are boolean with **True = observed**; imputation metrics are computed on the entries
  where the mask is False (the held-out, masked entries). A mask may be frame-level
  (``x.shape[:-1]``) or entry-level (``x.shape``).

These functions take concrete arrays (numpy or JAX) and return Python floats / numpy arrays;
they are meant for evaluation outside the training graph, not for use under ``jax.jit``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from numpyro_svae._linalg import LOG_2PI

__all__ = [
    "LabelMatching",
    "best_label_matching",
    "segmentation_accuracy",
    "confusion_matrix",
    "adjusted_rand_index",
    "regimes_used",
    "masked_rmse",
    "gaussian_masked_loglik",
    "random_gap_mask",
]


class LabelMatching(NamedTuple):
    """Result of :func:`best_label_matching`."""

    mapping: np.ndarray  # [num_pred] true label assigned to each predicted label, -1 if none
    accuracy: float  # fraction of frames whose mapped predicted label equals the true label
    relabeled: np.ndarray  # [T] or [N, T] predicted labels mapped into the true label space


def _as_labels(name: str, labels) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim not in (1, 2):
        raise ValueError(f"`{name}` must have shape [T] or [N, T]; got {list(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"`{name}` must not be empty; got shape {list(arr.shape)}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"`{name}` must hold integer labels; got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.min() < 0:
        raise ValueError(f"`{name}` must hold non-negative labels; got minimum {arr.min()}")
    return arr


def _check_same_shape(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"`{name_a}` must have the same shape as `{name_b}` = {list(b.shape)}; "
            f"got {list(a.shape)}"
        )


def _num_labels(name: str, labels: np.ndarray, num: int | None) -> int:
    observed = int(labels.max()) + 1
    if num is None:
        return observed
    if num < observed:
        raise ValueError(
            f"`{name}` = {num} is smaller than the largest label + 1 = {observed}"
        )
    return int(num)


def confusion_matrix(
    pred, true, num_pred: int | None = None, num_true: int | None = None
) -> np.ndarray:
    """Contingency table of predicted against true labels.

    Parameters
    ----------
    pred : array [T] or [N, T]
        Predicted integer labels in ``0 .. num_pred - 1``.
    true : array, same shape as ``pred``
        True integer labels in ``0 .. num_true - 1``.
    num_pred, num_true : int, optional
        Numbers of labels (default: largest label + 1).

    Returns
    -------
    np.ndarray [num_pred, num_true]
        ``C[i, j]`` = number of frames with predicted label ``i`` and true label ``j``.

    Raises
    ------
    ValueError
        If the shapes differ, labels are negative or exceed the given numbers.
    """
    pred = _as_labels("pred", pred)
    true = _as_labels("true", true)
    _check_same_shape("pred", pred, "true", true)
    kp = _num_labels("num_pred", pred, num_pred)
    kt = _num_labels("num_true", true, num_true)
    counts = np.zeros((kp, kt), dtype=np.int64)
    np.add.at(counts, (pred.ravel(), true.ravel()), 1)
    return counts


def best_label_matching(
    pred, true, num_pred: int | None = None, num_true: int | None = None
) -> LabelMatching:
    """One-to-one matching of predicted to true labels that maximises accuracy (Hungarian).

    Solves the linear assignment problem on the confusion matrix with
    :func:`scipy.optimize.linear_sum_assignment`. When ``num_pred > num_true`` the surplus
    predicted labels stay unmatched (mapped to ``-1``) and their frames count as errors; when
    ``num_pred < num_true`` some true labels receive no predicted label.

    Parameters
    ----------
    pred : array [T] or [N, T]
        Predicted integer labels (e.g. Viterbi or argmax regimes); flattened over ``N``.
    true : array, same shape as ``pred``
        Ground-truth integer labels.
    num_pred, num_true : int, optional
        Numbers of predicted / true labels (default: largest label + 1). Pass them when some
        labels may be unused.

    Returns
    -------
    LabelMatching
        ``mapping [num_pred]`` (true label for each predicted label, ``-1`` if unmatched),
        ``accuracy`` (float in [0, 1]) and ``relabeled`` (``pred`` mapped, same shape).

    Raises
    ------
    ValueError
        If ``pred`` and ``true`` differ in shape or are not 1-D / 2-D integer label arrays.
    """
    counts = confusion_matrix(pred, true, num_pred, num_true)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    mapping = np.full(counts.shape[0], -1, dtype=np.int64)
    mapping[rows] = cols
    pred_arr = _as_labels("pred", pred)
    relabeled = mapping[pred_arr]
    accuracy = float(counts[rows, cols].sum() / counts.sum())
    return LabelMatching(mapping=mapping, accuracy=accuracy, relabeled=relabeled)


def segmentation_accuracy(
    pred,
    true,
    num_pred: int | None = None,
    num_true: int | None = None,
    *,
    mapping=None,
) -> float:
    """Frame accuracy of a segmentation after the best one-to-one relabelling.

    Parameters
    ----------
    pred, true : array [T] or [N, T]
        Predicted and true integer labels (same shape).
    num_pred, num_true : int, optional
        Numbers of labels, see :func:`best_label_matching`.
    mapping : array [num_pred], optional
        A fixed mapping (e.g. found on training data) to apply instead of re-matching; entries
        ``-1`` count as errors.

    Returns
    -------
    float
        Fraction of frames whose (mapped) predicted label equals the true label.

    Raises
    ------
    ValueError
        On shape mismatches or a ``mapping`` too short for the predicted labels.
    """
    if mapping is None:
        return best_label_matching(pred, true, num_pred, num_true).accuracy
    pred = _as_labels("pred", pred)
    true = _as_labels("true", true)
    _check_same_shape("pred", pred, "true", true)
    mapping = np.asarray(mapping)
    if mapping.ndim != 1 or mapping.shape[0] <= pred.max():
        raise ValueError(
            f"`mapping` must have shape [num_pred] with num_pred > {pred.max()}; "
            f"got {list(mapping.shape)}"
        )
    return float(np.mean(mapping[pred] == true))


def _comb2(n):
    """n choose 2, elementwise, in exact integers."""
    n = np.asarray(n, dtype=object)
    return n * (n - 1) // 2


def adjusted_rand_index(pred, true) -> float:
    """Adjusted Rand index (Hubert & Arabie, 1985) from the contingency table.

    ``ARI = (sum_ij C(n_ij, 2) - E) / (1/2 (sum_i C(a_i, 2) + sum_j C(b_j, 2)) - E)`` with
    ``E = sum_i C(a_i, 2) sum_j C(b_j, 2) / C(n, 2)``, ``a``/``b`` the row/column sums.
    Invariant to relabelling; 1 for identical partitions, about 0 for independent ones. When
    the denominator vanishes (e.g. both labellings put every frame in one cluster) it returns
    1.0, matching ``sklearn.metrics.adjusted_rand_score``.

    Parameters
    ----------
    pred, true : array [T] or [N, T]
        Integer labels (same shape), flattened over sequences.

    Returns
    -------
    float

    Raises
    ------
    ValueError
        On shape mismatches or non-integer labels.

    References
    ----------
    Hubert, L. and Arabie, P. (1985). Comparing partitions. Journal of Classification 2.
    """
    pred = _as_labels("pred", pred)
    true = _as_labels("true", true)
    _check_same_shape("pred", pred, "true", true)
    # relabel to dense ranges so unused label ids cost nothing
    _, p = np.unique(pred.ravel(), return_inverse=True)
    _, t = np.unique(true.ravel(), return_inverse=True)
    counts = confusion_matrix(p, t)
    n = int(counts.sum())
    sum_ij = int(_comb2(counts).sum())
    sum_a = int(_comb2(counts.sum(axis=1)).sum())
    sum_b = int(_comb2(counts.sum(axis=0)).sum())
    total = int(_comb2(n))
    if total == 0:
        return 1.0
    # multiply through by C(n, 2) so everything stays an exact integer
    num = sum_ij * total - sum_a * sum_b
    den = (sum_a + sum_b) * total - 2 * sum_a * sum_b
    if den == 0:
        return 1.0
    return float(2 * num / den)


def regimes_used(marginals_or_labels, threshold: float = 0.01) -> int:
    """Number of regimes that occupy at least a ``threshold`` fraction of frames.

    Parameters
    ----------
    marginals_or_labels : array
        Either integer labels ``[T]`` / ``[N, T]`` (hard assignments), or float posterior
        marginals ``[T, K]`` / ``[N, T, K]`` (soft assignments; the last axis is the regime).
        Integer (or bool) dtype selects the first reading, floating dtype the second.
    threshold : float
        Minimum fraction of frames (for marginals: average posterior mass per frame) for a
        regime to count as used, in ``[0, 1]``.

    Returns
    -------
    int
        The number of regimes whose occupancy is ``>= threshold`` (and > 0).

    Raises
    ------
    ValueError
        If ``threshold`` is outside [0, 1] or the array has an unsupported shape.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"`threshold` must lie in [0, 1]; got {threshold}")
    arr = np.asarray(marginals_or_labels)
    if np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_):
        labels = _as_labels("marginals_or_labels", arr)
        occupancy = np.bincount(labels.ravel()) / labels.size
    else:
        if arr.ndim not in (2, 3) or arr.shape[-1] == 0:
            raise ValueError(
                "`marginals_or_labels` with a float dtype must be marginals of shape [T, K] or "
                f"[N, T, K]; got {list(arr.shape)}"
            )
        occupancy = arr.reshape(-1, arr.shape[-1]).mean(axis=0)
    return int(np.sum((occupancy >= threshold) & (occupancy > 0)))


def _masked_entries(x_true, others: dict, mask) -> tuple[np.ndarray, dict, np.ndarray]:
    """Validate shapes and return x, the other arrays broadcast to x, and an entry-level
    boolean array that is True on the held-out (mask == False) entries."""
    x = np.asarray(x_true, dtype=np.float64)
    if x.ndim not in (2, 3):
        raise ValueError(f"`x_true` must have shape [T, Dx] or [N, T, Dx]; got {list(x.shape)}")
    out = {}
    for name, (value, allow_broadcast) in others.items():
        v = np.asarray(value, dtype=np.float64)
        if v.shape != x.shape:
            if not allow_broadcast:
                raise ValueError(
                    f"`{name}` must have the shape of `x_true` = {list(x.shape)}; "
                    f"got {list(v.shape)}"
                )
            try:
                v = np.broadcast_to(v, x.shape)
            except ValueError:
                raise ValueError(
                    f"`{name}` must have the shape of `x_true` = {list(x.shape)} or broadcast "
                    f"to it; got {list(v.shape)}"
                ) from None
        out[name] = v
    m = np.asarray(mask)
    if m.shape == x.shape[:-1]:
        m = np.broadcast_to(m[..., None], x.shape)
    elif m.shape != x.shape:
        raise ValueError(
            f"`mask` must have shape {list(x.shape[:-1])} (frames) or {list(x.shape)} (entries) "
            f"to match `x_true`; got {list(m.shape)}"
        )
    held_out = ~m.astype(bool)
    if not held_out.any():
        raise ValueError("`mask` has no masked (False) entries to evaluate")
    return x, out, held_out


def masked_rmse(x_true, x_pred, mask) -> float:
    """Root-mean-square error over the masked (held-out) entries.

    Parameters
    ----------
    x_true : array [T, Dx] or [N, T, Dx]
        Ground-truth data.
    x_pred : array, same shape as ``x_true``
        Imputed / reconstructed data.
    mask : bool array [T] / [N, T] (per frame) or the shape of ``x_true`` (per entry)
        The observation mask given to the model (the convention of `predict.impute`):
        True / 1 = observed, these entries are NOT scored; False / 0 = held out, and only
        these entries are scored.  A per-frame mask scores every channel of its False
        frames.

    Returns
    -------
    float
        ``sqrt(mean_{masked entries} (x_true - x_pred)^2)``.

    Raises
    ------
    ValueError
        On shape mismatches (naming the argument) or when nothing is masked.
    """
    x, others, held_out = _masked_entries(x_true, {"x_pred": (x_pred, False)}, mask)
    err = (x - others["x_pred"])[held_out]
    return float(np.sqrt(np.mean(err**2)))


def gaussian_masked_loglik(x_true, mean, var, mask) -> float:
    """Average Gaussian log density per masked entry, with a diagonal predictive variance.

    ``mean_{masked (n, t, d)} log N(x[n, t, d] | mean[n, t, d], var[n, t, d])``

    Parameters
    ----------
    x_true : array [T, Dx] or [N, T, Dx]
        Ground-truth data.
    mean : array, same shape as ``x_true``
        Predictive means.
    var : array broadcastable to ``x_true`` (e.g. same shape, ``[Dx]`` or a scalar)
        Predictive variances, > 0.
    mask : bool array [T] / [N, T] (per frame) or the shape of ``x_true`` (per entry)
        The observation mask given to the model (the convention of `predict.impute`):
        True / 1 = observed, these entries are NOT scored; False / 0 = held out, and only
        these entries are scored.  A per-frame mask scores every channel of its False
        frames.

    Returns
    -------
    float
        Mean log-likelihood per masked scalar entry (nats).

    Raises
    ------
    ValueError
        On shape mismatches, non-positive variances at masked entries, or nothing masked.
    """
    x, others, held_out = _masked_entries(
        x_true, {"mean": (mean, False), "var": (var, True)}, mask
    )
    v = others["var"][held_out]
    if np.any(~(v > 0)):
        raise ValueError("`var` must be positive at every masked entry")
    r = x[held_out] - others["mean"][held_out]
    return float(np.mean(-0.5 * (LOG_2PI + np.log(v) + r**2 / v)))


def random_gap_mask(
    key_or_seed, N: int, T: int, min_len: int = 10, max_len: int = 30, num_gaps: int = 1
) -> np.ndarray:
    """Draw an observation mask with ``num_gaps`` contiguous missing windows per sequence.

    Each gap has a length uniform on ``{min_len, ..., max_len}`` and a start uniform over the
    positions where it fits inside ``[0, T)``. Gaps of one sequence are drawn independently and
    may overlap (the masked total can then be shorter than the sum of the lengths).

    Parameters
    ----------
    key_or_seed : int or jax PRNG key
        A Python/numpy integer seed, or a JAX key (typed ``jax.random.key`` or raw).
    N, T : int
        Number of sequences and steps.
    min_len, max_len : int
        Inclusive range of gap lengths (frames); ``1 <= min_len <= max_len <= T``.
    num_gaps : int
        Number of gaps per sequence (>= 1).

    Returns
    -------
    np.ndarray [N, T] bool
        True = observed, False = masked.

    Raises
    ------
    ValueError
        If the sizes are inconsistent (naming the argument).
    """
    import jax

    for name, value in (("N", N), ("T", T), ("num_gaps", num_gaps), ("min_len", min_len)):
        if int(value) < 1:
            raise ValueError(f"`{name}` must be >= 1; got {value}")
    if max_len < min_len:
        raise ValueError(f"`max_len` must be >= `min_len` = {min_len}; got {max_len}")
    if max_len > T:
        raise ValueError(f"`max_len` must be <= `T` = {T}; got {max_len}")
    if isinstance(key_or_seed, int | np.integer):
        key = jax.random.key(int(key_or_seed))
    else:
        key = key_or_seed
    k_len, k_start = jax.random.split(key)
    lengths = np.asarray(
        jax.random.randint(k_len, (N, num_gaps), min_len, max_len + 1), dtype=np.int64
    )
    u = np.asarray(jax.random.uniform(k_start, (N, num_gaps)), dtype=np.float64)
    starts = np.minimum(np.floor(u * (T - lengths + 1)).astype(np.int64), T - lengths)
    t = np.arange(T)[None, None, :]
    inside = (t >= starts[..., None]) & (t < (starts + lengths)[..., None])  # [N, G, T]
    return ~inside.any(axis=1)

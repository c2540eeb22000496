"""Windowing and standardisation helpers shared by the dataset loaders.

All helpers work on plain NumPy arrays and return ``float32`` data, ``int32`` labels and
``bool`` masks. Sequences may have different lengths, so most helpers take a *list* of
``[T_i, Dx]`` arrays rather than one stacked array.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "SequenceDataset",
    "Windows",
    "apply_standardizer",
    "fit_standardizer",
    "make_windows",
    "pad_sequences",
]


class SequenceDataset(NamedTuple):
    """A train/test pair of fixed-length sequence batches with per-frame labels.

    The split is made on whole sequences (or clips) *before* windowing, so no frame of a
    test sequence ever appears in a training window. ``mean``/``std`` are computed from
    the training frames only and have already been applied to both ``train_x`` and
    ``test_x`` (they are ``0``/``1`` when standardisation was switched off).
    """

    train_x: np.ndarray  # [N, T, Dx] float32 standardised training windows
    train_labels: np.ndarray  # [N, T] int32 per-frame class index (-1 on padded steps)
    test_x: np.ndarray  # [M, T, Dx] float32 standardised test windows
    test_labels: np.ndarray  # [M, T] int32
    mean: np.ndarray  # [Dx] float32 training mean that was subtracted
    std: np.ndarray  # [Dx] float32 training standard deviation that was divided out
    label_names: tuple[str, ...]  # [C] name of class index c
    channel_names: tuple[str, ...]  # [Dx] name of channel d
    train_mask: np.ndarray  # [N, T] bool, False on padding (all True with drop_remainder)
    test_mask: np.ndarray  # [M, T] bool
    train_source: np.ndarray  # [N] int32 index of the source sequence of each window
    test_source: np.ndarray  # [M] int32


class Windows(NamedTuple):
    """Fixed-length windows cut from a list of sequences (see :func:`make_windows`)."""

    x: np.ndarray  # [M, W, Dx] float32 (zeros on padded steps)
    labels: np.ndarray | None  # [M, W] int32 (-1 on padded steps), None without labels
    mask: np.ndarray  # [M, W] bool, True on real frames
    source: np.ndarray  # [M] int32 index of the sequence each window was cut from
    start: np.ndarray  # [M] int32 first frame of the window within its sequence


def _as_list(sequences, name: str) -> list[np.ndarray]:
    """Turn ``[N, T, Dx]`` or a list of ``[T_i, Dx]`` arrays into a list of 2-D arrays."""
    if isinstance(sequences, np.ndarray) and sequences.ndim == 3:
        seqs = list(sequences)
    else:
        seqs = [np.asarray(s) for s in sequences]
    for i, s in enumerate(seqs):
        if s.ndim != 2:
            raise ValueError(
                f"`{name}` must hold [T, Dx] sequences; element {i} has shape {list(s.shape)}"
            )
    if seqs and len({s.shape[1] for s in seqs}) != 1:
        raise ValueError(
            f"`{name}` sequences must share Dx; got {sorted({s.shape[1] for s in seqs})}"
        )
    return seqs


def _label_list(labels, seqs: list[np.ndarray]) -> list[np.ndarray] | None:
    if labels is None:
        return None
    labs = [np.asarray(lab) for lab in labels]
    if len(labs) != len(seqs):
        raise ValueError(f"`labels` must hold {len(seqs)} sequences to match `x`; got {len(labs)}")
    for i, (lab, s) in enumerate(zip(labs, seqs, strict=True)):
        if lab.shape != (s.shape[0],):
            raise ValueError(
                f"`labels[{i}]` must have shape [T] = [{s.shape[0]}] to match `x[{i}]`; "
                f"got {list(lab.shape)}"
            )
    return labs


def fit_standardizer(
    sequences: Sequence[np.ndarray] | np.ndarray, *, min_std: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation over every frame of the given sequences.

    Call it on the *training* sequences only, then :func:`apply_standardizer` to both splits.

    Parameters
    ----------
    sequences : list of [T_i, Dx] arrays, or [N, T, Dx]
        Training data.
    min_std : float
        Floor on the standard deviation, so a constant channel is not divided by zero.

    Returns
    -------
    mean, std : [Dx] float32 arrays
    """
    seqs = _as_list(sequences, "sequences")
    if not seqs:
        raise ValueError("`sequences` is empty; cannot fit a standardiser")
    frames = np.concatenate([s.astype(np.float64) for s in seqs], axis=0)
    mean = frames.mean(axis=0)
    std = np.maximum(frames.std(axis=0), min_std)
    return mean.astype(np.float32), std.astype(np.float32)


def apply_standardizer(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Return ``(x - mean) / std`` as float32; ``x`` is ``[..., Dx]``, ``mean``/``std`` ``[Dx]``."""
    x = np.asarray(x)
    if x.shape[-1] != np.shape(mean)[-1]:
        raise ValueError(
            f"`x` must have a last axis of size Dx = {np.shape(mean)[-1]} to match `mean`; "
            f"got shape {list(x.shape)}"
        )
    return ((x.astype(np.float64) - mean) / std).astype(np.float32)


def make_windows(
    sequences: Sequence[np.ndarray] | np.ndarray,
    labels: Sequence[np.ndarray] | np.ndarray | None = None,
    *,
    window: int,
    stride: int | None = None,
    drop_remainder: bool = True,
) -> Windows:
    """Cut sequences into windows of ``window`` frames, ``stride`` frames apart.

    Windows never cross a sequence boundary. With ``drop_remainder=True`` frames after the
    last full window are dropped (as are sequences shorter than ``window``); with ``False``
    the last, partial window of each sequence is zero-padded, its label set to ``-1`` and
    its mask to False.

    Parameters
    ----------
    sequences : list of [T_i, Dx] arrays, or [N, T, Dx]
    labels : list of [T_i] int arrays, or [N, T], optional
    window : int
        Window length ``W`` (frames).
    stride : int, optional
        Step between window starts; defaults to ``window`` (non-overlapping windows).
    drop_remainder : bool
        Drop (True) or pad (False) the tail that does not fill a whole window.

    Returns
    -------
    Windows
        ``x [M, W, Dx]``, ``labels [M, W]`` (or None), ``mask [M, W]``, ``source [M]``,
        ``start [M]``.

    Raises
    ------
    ValueError
        If ``window`` or ``stride`` is not a positive integer, or labels do not match.
    """
    if not isinstance(window, int | np.integer) or window < 1:
        raise ValueError(f"`window` must be a positive int; got {window!r}")
    stride = window if stride is None else stride
    if not isinstance(stride, int | np.integer) or stride < 1:
        raise ValueError(f"`stride` must be a positive int; got {stride!r}")
    seqs = _as_list(sequences, "sequences")
    labs = _label_list(labels, seqs)
    dx = seqs[0].shape[1] if seqs else 0

    xs, ls, ms, src, st = [], [], [], [], []
    for i, s in enumerate(seqs):
        t_len = s.shape[0]
        starts = list(range(0, t_len - window + 1, stride))
        if not drop_remainder:
            # one more (padded) window when frames remain after the last full one
            nxt = starts[-1] + stride if starts else 0
            if nxt < t_len and (not starts or starts[-1] + window < t_len):
                starts.append(nxt)
        for a in starts:
            n = min(window, t_len - a)
            xw = np.zeros((window, dx), np.float32)
            xw[:n] = s[a : a + n]
            mw = np.zeros(window, bool)
            mw[:n] = True
            xs.append(xw)
            ms.append(mw)
            src.append(i)
            st.append(a)
            if labs is not None:
                lw = np.full(window, -1, np.int32)
                lw[:n] = labs[i][a : a + n]
                ls.append(lw)
    x = np.stack(xs) if xs else np.zeros((0, window, dx), np.float32)
    mask = np.stack(ms) if ms else np.zeros((0, window), bool)
    lab_out = None
    if labs is not None:
        lab_out = np.stack(ls) if ls else np.zeros((0, window), np.int32)
    return Windows(x, lab_out, mask, np.asarray(src, np.int32), np.asarray(st, np.int32))


def pad_sequences(
    sequences: Sequence[np.ndarray], labels: Sequence[np.ndarray] | None = None
) -> Windows:
    """Stack whole sequences into one batch, zero-padding each to the longest length.

    Returns a :class:`Windows` with one window per sequence (``start`` all zero).
    """
    seqs = _as_list(sequences, "sequences")
    if not seqs:
        raise ValueError("`sequences` is empty")
    t_max = max(s.shape[0] for s in seqs)
    return make_windows(seqs, labels, window=t_max, stride=t_max, drop_remainder=False)


def split_windows(
    train_seqs: list[np.ndarray],
    train_labels: list[np.ndarray],
    test_seqs: list[np.ndarray],
    test_labels: list[np.ndarray],
    *,
    label_names: tuple[str, ...],
    channel_names: tuple[str, ...],
    window: int | None,
    stride: int | None,
    drop_remainder: bool,
    standardize: bool,
) -> SequenceDataset:
    """Standardise with training statistics, then window both splits (shared by loaders)."""
    if standardize:
        mean, std = fit_standardizer(train_seqs)
    else:
        dx = train_seqs[0].shape[1]
        mean, std = np.zeros(dx, np.float32), np.ones(dx, np.float32)
    train_seqs = [apply_standardizer(s, mean, std) for s in train_seqs]
    test_seqs = [apply_standardizer(s, mean, std) for s in test_seqs]

    def cut(seqs, labs):
        if window is None:
            return pad_sequences(seqs, labs)
        return make_windows(seqs, labs, window=window, stride=stride, drop_remainder=drop_remainder)

    tr = cut(train_seqs, train_labels)
    if test_seqs:
        te = cut(test_seqs, test_labels)
    else:  # no held-out sequences: empty test arrays with the train window length
        w, dx = tr.x.shape[1:]
        te = Windows(
            np.zeros((0, w, dx), np.float32),
            np.zeros((0, w), np.int32),
            np.zeros((0, w), bool),
            np.zeros(0, np.int32),
            np.zeros(0, np.int32),
        )
    return SequenceDataset(
        train_x=tr.x,
        train_labels=tr.labels,
        test_x=te.x,
        test_labels=te.labels,
        mean=mean,
        std=std,
        label_names=tuple(label_names),
        channel_names=tuple(channel_names),
        train_mask=tr.mask,
        test_mask=te.mask,
        train_source=tr.source,
        test_source=te.source,
    )

"""BasicMotions: smartwatch IMU clips of four activities, stitched into switching sequences.

The UEA/UCR "BasicMotions" archive problem (Clements, via the UEA multivariate archive) has
80 clips (40 train, 40 test) of 100 frames at 10 Hz from a wrist-worn smartwatch: a 3-axis
accelerometer and a 3-axis gyroscope (6 channels), each clip one of four activities
(standing, walking, running, badminton). The files ship inside the ``aeon`` wheel
(BSD-3-Clause), installed with the optional extra ``pip install "numpyro_svae[data]"``; they
are read from disk, never downloaded.

A clip holds a single activity, so to get sequences whose regime *switches* we concatenate
several clips of different activities (:func:`build_switching_sequences`), separately for
the train clips and the test clips, so no test clip ever reaches a training sequence.
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import NamedTuple

import numpy as np

from numpyro_svae.datasets._windows import (
    SequenceDataset,
    apply_standardizer,
    fit_standardizer,
    split_windows,
)

__all__ = [
    "BASIC_MOTIONS_CHANNELS",
    "BASIC_MOTIONS_LABELS",
    "SwitchingSequences",
    "basic_motions_clips",
    "build_switching_sequences",
    "load_basic_motions",
    "read_ts_file",
]

BASIC_MOTIONS_LABELS = ("Standing", "Walking", "Running", "Badminton")
# Channel order of the archive: accelerometer x, y, z then gyroscope x, y, z.
BASIC_MOTIONS_CHANNELS = ("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z")


class SwitchingSequences(NamedTuple):
    """Clips concatenated into longer sequences whose activity switches at clip boundaries."""

    x: np.ndarray  # [S, L*T, Dx] float32 concatenated clips
    labels: np.ndarray  # [S, L*T] int32 per-frame activity of the clip it came from
    clip_index: np.ndarray  # [S, L] int32 which input clip fills each slot


def _aeon_data_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("aeon")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "BasicMotions is read from the files shipped with the `aeon` package, which is not "
            'installed; install it with `pip install "numpyro_svae[data]"` (or `pip install '
            "aeon`), or pass `data_dir=` pointing at a folder holding BasicMotions_TRAIN.ts"
        )
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def read_ts_file(path: str | pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an equal-length multivariate ``.ts`` file (sktime/aeon text format).

    Each data line holds ``Dx`` comma-separated channels separated by ``:``, then the class
    label after the last ``:``.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    x : [N, T, Dx] float32
    labels : [N] array of str (class label as written in the file)

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        On a malformed line (naming the file and line number).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no .ts file at {path}")
    xs, labels = [], []
    in_data = False
    with path.open() as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if not in_data:
                if line.lower().startswith("@data"):
                    in_data = True
                continue
            parts = line.split(":")
            if len(parts) < 2:
                raise ValueError(f"{path}, line {lineno}: expected `ch1:ch2:...:label`")
            try:
                chans = [np.array(p.split(","), dtype=np.float64) for p in parts[:-1]]
            except ValueError as e:
                raise ValueError(f"{path}, line {lineno}: non-numeric value ({e})") from None
            if len({c.shape[0] for c in chans}) != 1:
                raise ValueError(f"{path}, line {lineno}: channels have different lengths")
            if xs and (len(chans), chans[0].shape[0]) != xs[0].shape[::-1]:
                raise ValueError(
                    f"{path}, line {lineno}: expected {xs[0].shape[1]} channels of length "
                    f"{xs[0].shape[0]}; got {len(chans)} of length {chans[0].shape[0]}"
                )
            xs.append(np.stack(chans, axis=1))
            labels.append(parts[-1].strip())
    if not xs:
        raise ValueError(f"{path}: no `@data` section or no data lines")
    return np.stack(xs).astype(np.float32), np.asarray(labels)


def basic_motions_clips(
    split: str, *, data_dir: str | pathlib.Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The raw BasicMotions clips of one split.

    Parameters
    ----------
    split : {"train", "test"}
    data_dir : str or Path, optional
        Folder holding ``BasicMotions_TRAIN.ts`` / ``BasicMotions_TEST.ts`` (or a
        ``BasicMotions`` sub-folder); defaults to the copy inside the installed ``aeon``.

    Returns
    -------
    x : [40, 100, 6] float32 raw clips (accelerometer then gyroscope)
    labels : [40] int32 index into :data:`BASIC_MOTIONS_LABELS`

    Raises
    ------
    ImportError
        If ``data_dir`` is not given and ``aeon`` is not installed.
    FileNotFoundError
        If the file is missing.
    """
    if split not in ("train", "test"):
        raise ValueError(f"`split` must be 'train' or 'test'; got {split!r}")
    root = _aeon_data_dir() if data_dir is None else pathlib.Path(data_dir)
    if (root / "BasicMotions").is_dir():
        root = root / "BasicMotions"
    x, names = read_ts_file(root / f"BasicMotions_{split.upper()}.ts")
    lookup = {n.lower(): i for i, n in enumerate(BASIC_MOTIONS_LABELS)}
    unknown = sorted({n for n in names if n.lower() not in lookup})
    if unknown:
        raise ValueError(f"unexpected BasicMotions class labels {unknown}")
    labels = np.asarray([lookup[n.lower()] for n in names], np.int32)
    return x, labels


def build_switching_sequences(
    clips: np.ndarray,
    clip_labels: np.ndarray,
    *,
    clips_per_sequence: int = 4,
    num_sequences: int | None = None,
    seed: int = 0,
) -> SwitchingSequences:
    """Concatenate clips into sequences whose activity changes at every clip boundary.

    Deterministic given ``seed``. Each slot draws an activity among those different from the
    previous slot's (so consecutive clips always switch activity), with probability
    proportional to its number of unused clips, then an unused clip of that activity at
    random; a clip is reused only when no allowed activity has an unused clip left. Up to 50
    draws are tried and the first that reuses no clip (else the one that reuses fewest) is
    kept, so with the default ``num_sequences`` every clip is used exactly once.

    Parameters
    ----------
    clips : [C, T, Dx]
    clip_labels : [C] int
    clips_per_sequence : int
        ``L``, number of clips per sequence.
    num_sequences : int, optional
        ``S``; defaults to ``C // L`` (each clip used about once).
    seed : int
        Seed of the NumPy generator that orders the clips.

    Returns
    -------
    SwitchingSequences
        ``x [S, L*T, Dx]``, per-frame ``labels [S, L*T]``, ``clip_index [S, L]``.
    """
    clips = np.asarray(clips)
    clip_labels = np.asarray(clip_labels)
    if clips.ndim != 3:
        raise ValueError(f"`clips` must have shape [C, T, Dx]; got {list(clips.shape)}")
    if clip_labels.shape != clips.shape[:1]:
        raise ValueError(
            f"`clip_labels` must have shape [C] = [{clips.shape[0]}]; got {list(clip_labels.shape)}"
        )
    if clips_per_sequence < 1:
        raise ValueError(f"`clips_per_sequence` must be >= 1; got {clips_per_sequence}")
    if num_sequences is None:
        num_sequences = max(1, clips.shape[0] // clips_per_sequence)
    rng = np.random.default_rng(seed)
    best, best_reuse = None, None
    # the greedy pass can paint itself into a corner (only one activity left unused); a few
    # deterministic retries from the same generator find an order that uses each clip once
    for _ in range(50):
        index, reuse = _draw_clip_order(rng, clip_labels, num_sequences, clips_per_sequence)
        if best is None or reuse < best_reuse:
            best, best_reuse = index, reuse
        if reuse == 0:
            break
    index = best
    t = clips.shape[1]
    x = clips[index].reshape(num_sequences, clips_per_sequence * t, clips.shape[2])
    labels = np.repeat(clip_labels[index], t, axis=1).astype(np.int32)
    return SwitchingSequences(x.astype(np.float32), labels, index)


def _draw_clip_order(
    rng: np.random.Generator, clip_labels: np.ndarray, num_sequences: int, length: int
) -> tuple[np.ndarray, int]:
    """One greedy draw of clip indices ``[S, L]`` and how many clips it had to reuse."""
    classes = np.unique(clip_labels)
    used = np.zeros(clip_labels.shape[0], bool)
    index = np.zeros((num_sequences, length), np.int32)
    reuse = 0
    for s in range(num_sequences):
        prev = None
        for j in range(length):
            allowed = [c for c in classes if c != prev] or list(classes)
            remaining = np.array([np.sum(~used & (clip_labels == c)) for c in allowed], float)
            if remaining.sum() > 0:
                # weight by what is left so the activities run out together
                c = allowed[rng.choice(len(allowed), p=remaining / remaining.sum())]
                pool = np.flatnonzero((clip_labels == c) & ~used)
            else:
                c = allowed[rng.integers(len(allowed))]
                pool = np.flatnonzero(clip_labels == c)
                reuse += 1
            i = int(rng.choice(pool))
            used[i] = True
            index[s, j] = i
            prev = c
    return index, reuse


def load_basic_motions(
    *,
    window: int | None = None,
    stride: int | None = None,
    clips_per_sequence: int = 4,
    num_train_sequences: int | None = None,
    num_test_sequences: int | None = None,
    seed: int = 0,
    standardize: bool = True,
    drop_remainder: bool = True,
    data_dir: str | pathlib.Path | None = None,
) -> SequenceDataset:
    """BasicMotions as switching-activity sequences, standardised and optionally windowed.

    Preprocessing, in order:

    1. read the 40 train and 40 test clips (``[100, 6]`` each, 10 Hz);
    2. stitch train clips into train sequences and test clips into test sequences with
       :func:`build_switching_sequences` (seeds ``seed`` and ``seed + 1``); the split is the
       archive's own clip split, made before anything else, so nothing leaks;
    3. standardise every channel with the mean and standard deviation of the *train clips*;
    4. if ``window`` is given, cut each sequence into windows (:func:`make_windows`),
       otherwise return the whole sequences (``T = 100 * clips_per_sequence``).

    Parameters
    ----------
    window : int, optional
        Window length in frames; None keeps whole sequences.
    stride : int, optional
        Step between windows (defaults to ``window``).
    clips_per_sequence : int
        Clips (activity segments) per stitched sequence.
    num_train_sequences, num_test_sequences : int, optional
        Default ``40 // clips_per_sequence`` each.
    seed : int
        Seed of the stitching.
    standardize : bool
        Apply step 3 (``mean``/``std`` are 0/1 otherwise).
    drop_remainder : bool
        See :func:`make_windows`.
    data_dir : str or Path, optional
        Folder with the ``.ts`` files; defaults to the copy inside ``aeon``.

    Returns
    -------
    SequenceDataset
        ``train_x [N, T, 6]`` float32, ``train_labels [N, T]`` int32 index into
        ``label_names = ("Standing", "Walking", "Running", "Badminton")``, likewise for test;
        ``train_source`` is the stitched sequence each window came from.

    Raises
    ------
    ImportError
        If ``aeon`` is not installed and ``data_dir`` is not given.

    References
    ----------
    Bagnall et al., "The UEA multivariate time series classification archive, 2018",
    arXiv:1811.00075 (BasicMotions).
    """
    tr_x, tr_y = basic_motions_clips("train", data_dir=data_dir)
    te_x, te_y = basic_motions_clips("test", data_dir=data_dir)
    tr = build_switching_sequences(
        tr_x,
        tr_y,
        clips_per_sequence=clips_per_sequence,
        num_sequences=num_train_sequences,
        seed=seed,
    )
    te = build_switching_sequences(
        te_x,
        te_y,
        clips_per_sequence=clips_per_sequence,
        num_sequences=num_test_sequences,
        seed=seed + 1,
    )
    data = split_windows(
        list(tr.x),
        list(tr.labels),
        list(te.x),
        list(te.labels),
        label_names=BASIC_MOTIONS_LABELS,
        channel_names=BASIC_MOTIONS_CHANNELS,
        window=window,
        stride=stride,
        drop_remainder=drop_remainder,
        standardize=False,
    )
    if not standardize:
        return data
    # statistics of the train clips themselves (not of the stitched sequences, which may
    # repeat a clip), applied to both splits
    mean, std = fit_standardizer(tr_x)
    return data._replace(
        train_x=apply_standardizer(data.train_x, mean, std) * data.train_mask[..., None],
        test_x=apply_standardizer(data.test_x, mean, std) * data.test_mask[..., None],
        mean=mean,
        std=std,
    )

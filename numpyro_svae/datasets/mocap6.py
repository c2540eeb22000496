"""The CMU "mocap6" exercise-segmentation benchmark and a parser for raw CMU AMC files.

mocap6 (Fox, Hughes, Sudderth & Jordan 2014; curated by M. Hughes, BSD-2-Clause; CMU data
free for research use) holds six CMU motion-capture trials of subjects 13 and 14 doing 12
exercises, labelled frame by frame. ``mocap6.mat`` stores 12 joint-angle channels at 10 fps
(block averages of the 120 fps capture, zero mean per sequence); ``amc/`` holds the raw
120 fps AMC files with all 62 degrees of freedom. ``load_amc`` (12-frame block means)
reproduces the released ``X``: row ``i`` of the ``.mat`` sequence is block ``i + 1`` (block 0
serves as ``Xprev``), centred per channel; only the last row, which the release builds from
the incomplete final block, differs. Its labels are ``truelabels/<trial>.txt`` (one per
block ``0..T``) without the first entry.
The data are never shipped with this package: every loader takes the folder as an argument.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from numpyro_svae.datasets._windows import SequenceDataset, split_windows

__all__ = [
    "AMCMotion",
    "CMU_SKELETON_DOFS",
    "MOCAP6_SEQUENCES",
    "MotionSequence",
    "downsample_motion",
    "load_amc",
    "load_mocap6",
    "parse_amc",
]

MOCAP6_SEQUENCES = ("13_29", "13_30", "13_31", "14_06", "14_14", "14_20")

# Degrees of freedom of each bone of the standard CMU skeleton, in AMC line order (the
# ASF files of the CMU database; the same list as mocap6's amc/SkeletonJoints.key).
CMU_SKELETON_DOFS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("root", ("tx", "ty", "tz", "rx", "ry", "rz")),
    ("lowerback", ("rx", "ry", "rz")),
    ("upperback", ("rx", "ry", "rz")),
    ("thorax", ("rx", "ry", "rz")),
    ("lowerneck", ("rx", "ry", "rz")),
    ("upperneck", ("rx", "ry", "rz")),
    ("head", ("rx", "ry", "rz")),
    ("rclavicle", ("ry", "rz")),
    ("rhumerus", ("rx", "ry", "rz")),
    ("rradius", ("rx",)),
    ("rwrist", ("ry",)),
    ("rhand", ("rx", "rz")),
    ("rfingers", ("rx",)),
    ("rthumb", ("rx", "rz")),
    ("lclavicle", ("ry", "rz")),
    ("lhumerus", ("rx", "ry", "rz")),
    ("lradius", ("rx",)),
    ("lwrist", ("ry",)),
    ("lhand", ("rx", "rz")),
    ("lfingers", ("rx",)),
    ("lthumb", ("rx", "rz")),
    ("rfemur", ("rx", "ry", "rz")),
    ("rtibia", ("rx",)),
    ("rfoot", ("rx", "rz")),
    ("rtoes", ("rx",)),
    ("lfemur", ("rx", "ry", "rz")),
    ("ltibia", ("rx",)),
    ("lfoot", ("rx", "rz")),
    ("ltoes", ("rx",)),
)
_CMU_DOFS = dict(CMU_SKELETON_DOFS)


class AMCMotion(NamedTuple):
    """One raw AMC file: every frame's values of every bone's degrees of freedom."""

    frames: np.ndarray  # [T, C] float32 DOF values (degrees; root translation in ASF units)
    frame_numbers: np.ndarray  # [T] int32 frame numbers as written in the file (1, 2, ...)
    bone_names: tuple[str, ...]  # [B] bones in file order
    bone_dofs: tuple[int, ...]  # [B] number of values on each bone's line
    channel_names: tuple[str, ...]  # [C] "bone.dof" (e.g. "root.ty"); "bone.i" if unknown


class MotionSequence(NamedTuple):
    """A (possibly downsampled) motion sequence with optional per-frame labels."""

    x: np.ndarray  # [T', C] float32
    labels: np.ndarray | None  # [T'] int32 per-frame label, or None
    frame_rate: float  # frames per second of x
    channel_names: tuple[str, ...]  # [C]


def _need_path(path, what: str) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def parse_amc(path: str | pathlib.Path) -> AMCMotion:
    """Parse an Acclaim motion-capture (AMC) file.

    The format: comment lines (``#``) and keyword lines (``:FULLY-SPECIFIED``,
    ``:DEGREES``), then for every frame a line with the frame number alone followed by one
    line per bone, ``bone v1 v2 ...``. Every frame must list the same bones, in the same
    order, with the same number of values, and frame numbers must count up by one.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    AMCMotion
        ``frames [T, C]`` with ``C`` the total number of DOFs (62 for the CMU skeleton).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        On a malformed file, naming the file and the line number.
    """
    path = _need_path(path, "AMC file")
    frames: list[list[float]] = []
    numbers: list[int] = []
    bones: list[str] = []
    dofs: list[int] = []
    current: list[float] | None = None
    slot = 0  # index of the next expected bone within the current frame

    def fail(lineno: int, msg: str):
        raise ValueError(f"{path}, line {lineno}: {msg}")

    def close_frame(lineno: int):
        if current is None:
            return
        if not current:
            fail(lineno, f"frame {numbers[-1]} has no bone lines")
        if frames and slot != len(bones):
            fail(lineno, f"frame {numbers[-1]} has {slot} bones; expected {len(bones)}")
        frames.append(current)

    with path.open() as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith(":"):
                if numbers:
                    fail(lineno, f"keyword {line!r} after the first frame")
                continue
            tokens = line.split()
            if len(tokens) == 1 and tokens[0].lstrip("-").isdigit():
                close_frame(lineno)
                n = int(tokens[0])
                if numbers and n != numbers[-1] + 1:
                    fail(lineno, f"frame number {n} does not follow frame {numbers[-1]}")
                numbers.append(n)
                current, slot = [], 0
                continue
            if current is None:
                fail(lineno, f"expected a frame number before bone data; got {line[:40]!r}")
            name, vals = tokens[0], tokens[1:]
            try:
                values = [float(v) for v in vals]
            except ValueError:
                fail(lineno, f"non-numeric value on the line of bone {name!r}")
            if len(frames) == 0:  # the first frame defines the bone layout
                if name in bones:
                    fail(lineno, f"bone {name!r} listed twice in frame {numbers[-1]}")
                if not values:
                    fail(lineno, f"bone {name!r} has no values")
                bones.append(name)
                dofs.append(len(values))
            else:
                if slot >= len(bones) or name != bones[slot]:
                    want = bones[slot] if slot < len(bones) else "a frame number"
                    fail(lineno, f"expected bone {want!r} in frame {numbers[-1]}; got {name!r}")
                if len(values) != dofs[slot]:
                    fail(lineno, f"bone {name!r} has {len(values)} values; expected {dofs[slot]}")
            current.extend(values)
            slot += 1
    if current is None:
        raise ValueError(f"{path}: no frames found (not an AMC file?)")
    close_frame(lineno)

    channel_names = []
    for b, d in zip(bones, dofs, strict=True):
        known = _CMU_DOFS.get(b)
        names = known if known is not None and len(known) == d else tuple(str(i) for i in range(d))
        channel_names.extend(f"{b}.{n}" for n in names)
    return AMCMotion(
        frames=np.asarray(frames, np.float32),
        frame_numbers=np.asarray(numbers, np.int32),
        bone_names=tuple(bones),
        bone_dofs=tuple(dofs),
        channel_names=tuple(channel_names),
    )


def downsample_motion(
    x: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    factor: int = 12,
    keep_partial: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Average blocks of ``factor`` consecutive frames (120 fps -> 10 fps for ``factor=12``).

    Labels are carried along. They may be given

    * per raw frame (length ``T``): each block gets its most frequent label (ties: the
      smallest label), or
    * already at the low rate, one per block: length ``T // factor`` or ``T // factor + 1``
      (mocap6's ``truelabels/`` carry one label per block including the incomplete last
      one); label ``i`` belongs to block ``i`` and any label beyond the last block kept is
      dropped.

    Parameters
    ----------
    x : [T, C]
        Raw frames.
    labels : [T] or [T // factor] or [T // factor + 1] int, optional
    factor : int
        Frames per block.
    keep_partial : bool
        Keep a last block of fewer than ``factor`` frames (averaged over the frames it has).

    Returns
    -------
    x_low : [T', C] float32
        Block means, ``T' = T // factor`` (``ceil(T / factor)`` with ``keep_partial``).
    labels_low : [T'] int32 or None

    Raises
    ------
    ValueError
        If ``labels`` has none of the accepted lengths.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"`x` must have shape [T, C]; got {list(x.shape)}")
    if not isinstance(factor, int | np.integer) or factor < 1:
        raise ValueError(f"`factor` must be a positive int; got {factor!r}")
    t = x.shape[0]
    n_full = t // factor
    n_out = -(-t // factor) if keep_partial else n_full
    starts = np.arange(n_out) * factor
    used = x[: t if keep_partial else n_full * factor].astype(np.float64)
    sums = np.add.reduceat(used, starts, axis=0) if n_out else used[:0]
    counts = np.minimum(starts + factor, t) - starts
    x_low = (sums / counts[:, None]).astype(np.float32) if n_out else x[:0].astype(np.float32)
    if labels is None:
        return x_low, None
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] not in (t, n_full, n_full + 1):
        raise ValueError(
            f"`labels` must have shape [T] = [{t}] (one per raw frame) or "
            f"[{n_full}] / [{n_full + 1}] (one per block of {factor}); "
            f"got {list(labels.shape)}"
        )
    labels = labels.astype(np.int64)
    if labels.shape[0] == t and factor > 1:
        out = np.empty(n_out, np.int32)
        for i, a in enumerate(starts):
            vals, cnt = np.unique(labels[a : a + factor], return_counts=True)
            out[i] = vals[np.argmax(cnt)]
        return x_low, out
    if labels.shape[0] < n_out:
        raise ValueError(
            f"`labels` has {labels.shape[0]} block labels but keep_partial=True makes {n_out} "
            "blocks; give one label per raw frame or one per block including the partial one"
        )
    return x_low, labels[:n_out].astype(np.int32)


def load_amc(
    path: str | pathlib.Path,
    *,
    labels: np.ndarray | str | pathlib.Path | None = None,
    factor: int = 12,
    frame_rate: float = 120.0,
    keep_partial: bool = False,
) -> MotionSequence:
    """Read a raw CMU AMC file and downsample it, carrying per-frame labels along.

    Parameters
    ----------
    path : str or Path
        The ``.amc`` file (e.g. ``<mocap6>/amc/13_29.amc``).
    labels : array or path, optional
        Labels per raw frame or per low-rate frame (see :func:`downsample_motion`), or the
        path of a whitespace-separated integer file such as ``<mocap6>/truelabels/13_29.txt``
        (kept as written, i.e. 1-based for mocap6).
    factor : int
        Downsampling factor; 12 turns the 120 fps capture into 10 fps, 1 keeps every frame.
    frame_rate : float
        Frame rate of the file.
    keep_partial : bool
        See :func:`downsample_motion`.

    Returns
    -------
    MotionSequence
        ``x [T', 62]`` block means, ``labels [T']`` or None, ``frame_rate / factor``.

    Raises
    ------
    FileNotFoundError
        If ``path`` (or a labels path) does not exist.
    ValueError
        If the file is malformed (file and line named) or the labels have the wrong length.
    """
    motion = parse_amc(path)
    if isinstance(labels, str | pathlib.Path):
        lab_path = _need_path(labels, "labels file")
        try:
            labels = np.loadtxt(lab_path, dtype=np.int64, ndmin=1)
        except ValueError as e:
            msg = f"{lab_path}: labels must be whitespace-separated ints ({e})"
            raise ValueError(msg) from None
    x, lab = downsample_motion(motion.frames, labels, factor=factor, keep_partial=keep_partial)
    return MotionSequence(x, lab, frame_rate / factor, motion.channel_names)


def _read_mocap6_mat(path: pathlib.Path):
    import scipy.io

    mat_path = path / "mocap6.mat" if path.is_dir() else path
    _need_path(mat_path, "mocap6.mat")
    try:
        m = scipy.io.loadmat(mat_path, squeeze_me=True, struct_as_record=False)
        seqs = np.atleast_1d(m["DataBySeq"])
        names = [str(s.filename) for s in seqs]
        xs = [np.asarray(s.X, np.float32) for s in seqs]
        zs = [np.asarray(s.TrueZ, np.int32).reshape(-1) - 1 for s in seqs]  # 1-based in file
        actions = tuple(str(a) for a in np.atleast_1d(m["ActionNames"]))
        channels = tuple(str(c) for c in np.atleast_1d(m["ChannelNames"]))
    except (KeyError, AttributeError, ValueError, TypeError) as e:
        raise ValueError(f"{mat_path}: not a mocap6 .mat file ({type(e).__name__}: {e})") from None
    for n, x, z in zip(names, xs, zs, strict=True):
        if x.ndim != 2 or z.shape != (x.shape[0],):
            raise ValueError(
                f"{mat_path}: sequence {n} has X of shape {list(x.shape)} and TrueZ of shape "
                f"{list(z.shape)}; expected [T, Dx] and [T]"
            )
    return names, xs, zs, actions, channels


def load_mocap6(
    path: str | pathlib.Path,
    *,
    test_sequences: Sequence[str] = ("14_14",),
    window: int | None = None,
    stride: int | None = None,
    standardize: bool = True,
    drop_remainder: bool = True,
) -> SequenceDataset:
    """The 12-channel, 10 fps mocap6 benchmark with per-frame exercise labels.

    Preprocessing, in order:

    1. read the six sequences of ``mocap6.mat`` (``X`` as released: 10 fps block means of
       12 joint angles, each channel zero-mean within its sequence; labels ``TrueZ - 1``);
    2. split by whole sequences: ``test_sequences`` (default ``("14_14",)``, whose 6
       exercises all occur in the other five) form the test set, the rest the train set;
    3. standardise each channel with the mean and standard deviation of the train frames;
    4. cut windows (:func:`make_windows`) when ``window`` is given, otherwise zero-pad the
       whole sequences to the longest one (``*_mask`` marks the real frames, padded labels
       are ``-1``).

    Parameters
    ----------
    path : str or Path
        The mocap6 folder (holding ``mocap6.mat``) or the ``.mat`` file itself.
    test_sequences : sequence of str
        Trial names (see :data:`MOCAP6_SEQUENCES`) held out for testing; may be empty.
    window, stride, drop_remainder : see :func:`make_windows`.
    standardize : bool
        Apply step 3 (``mean``/``std`` are 0/1 otherwise).

    Returns
    -------
    SequenceDataset
        ``train_x [N, T, 12]`` float32, ``train_labels [N, T]`` int32 in ``0..11`` indexing
        ``label_names`` (JumpJack, Jog, ..., ToeTouchTwoHands), ``channel_names`` as in the
        file; ``train_source``/``test_source`` index the trials in :data:`MOCAP6_SEQUENCES` order.

    Raises
    ------
    FileNotFoundError
        If ``path`` or ``mocap6.mat`` does not exist.
    ValueError
        If the file is not a mocap6 file or a test sequence name is unknown.

    References
    ----------
    Fox, Hughes, Sudderth & Jordan, "Joint modeling of multiple time series via the beta
    process with application to motion capture segmentation", AOAS 8(3), 2014.
    """
    path = _need_path(path, "mocap6 folder")
    names, xs, zs, actions, channels = _read_mocap6_mat(path)
    if isinstance(test_sequences, str):
        test_sequences = (test_sequences,)
    unknown = sorted(set(test_sequences) - set(names))
    if unknown:
        raise ValueError(f"`test_sequences` names unknown trials {unknown}; known: {names}")
    train = [i for i, n in enumerate(names) if n not in test_sequences]
    test = [i for i, n in enumerate(names) if n in test_sequences]
    if not train:
        raise ValueError("`test_sequences` holds out every sequence; nothing left to train on")
    data = split_windows(
        [xs[i] for i in train],
        [zs[i] for i in train],
        [xs[i] for i in test],
        [zs[i] for i in test],
        label_names=actions,
        channel_names=channels,
        window=window,
        stride=stride,
        drop_remainder=drop_remainder,
        standardize=standardize,
    )
    # report sources as indices into the file's sequence order, not into each split
    return data._replace(
        train_source=np.asarray(train, np.int32)[data.train_source],
        test_source=np.asarray(test, np.int32)[data.test_source],
    )

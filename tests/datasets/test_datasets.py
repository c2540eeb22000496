"""Dataset loaders, windowing helpers and the synthetic SLDS generator.

Oracles: hand slicing and plain NumPy statistics for the helpers; the released mocap6.mat
for the AMC parser and downsampler; the generating parameters for the synthetic data.
BasicMotions tests skip without ``aeon``; mocap6 tests skip without the mocap6 data folder.
"""

import importlib.util
import pathlib
import shutil

import jax
import numpy as np
import pytest
import scipy.io

from numpyro_svae.datasets import (
    BASIC_MOTIONS_LABELS,
    CMU_SKELETON_DOFS,
    MOCAP6_SEQUENCES,
    apply_standardizer,
    basic_motions_clips,
    build_switching_sequences,
    downsample_motion,
    emission_mean,
    fit_standardizer,
    load_amc,
    load_basic_motions,
    load_mocap6,
    make_windows,
    parse_amc,
    read_ts_file,
    synthetic_slds,
)
from numpyro_svae.datasets import basic_motions as bm_module

HAS_AEON = importlib.util.find_spec("aeon") is not None
needs_aeon = pytest.mark.skipif(not HAS_AEON, reason="aeon (optional extra `data`) not installed")

# float32 data with values up to ~100 degrees: ~1e-5 relative rounding per entry
F32_ATOL = 1e-3


def _rows(x):
    """Set of the byte strings of the frames (last axis) of x, for exact membership tests."""
    x = np.ascontiguousarray(x, np.float32)
    return {r.tobytes() for r in x.reshape(-1, x.shape[-1])}


# ----------------------------------------------------------------------------- windows


def test_make_windows_matches_manual_slicing():
    rng = np.random.default_rng(0)
    seqs = [rng.normal(size=(10, 3)), rng.normal(size=(7, 3)), rng.normal(size=(3, 3))]
    labs = [np.arange(10), np.arange(7) + 100, np.arange(3) + 200]
    w = make_windows(seqs, labs, window=4, stride=2)
    expect = [(0, a) for a in (0, 2, 4, 6)] + [(1, a) for a in (0, 2)]
    assert list(zip(w.source.tolist(), w.start.tolist(), strict=True)) == expect
    for i, (s, a) in enumerate(expect):
        np.testing.assert_array_equal(w.x[i], seqs[s][a : a + 4].astype(np.float32))
        np.testing.assert_array_equal(w.labels[i], labs[s][a : a + 4])
    assert w.x.dtype == np.float32 and w.labels.dtype == np.int32 and w.mask.all()

    p = make_windows(seqs, labs, window=4, stride=2, drop_remainder=False)
    # seq 1 (T=7) gains a window at 4 with 3 real frames; seq 2 (T=3) one padded window
    assert (1, 4) in zip(p.source.tolist(), p.start.tolist(), strict=True)
    last = p.x.shape[0] - 1
    assert p.source[last] == 2 and p.mask[last].tolist() == [True] * 3 + [False]
    assert p.labels[last, 3] == -1 and np.all(p.x[last, 3] == 0)
    assert p.mask.sum() >= w.mask.sum()


def test_fit_standardizer_matches_numpy_concatenation():
    rng = np.random.default_rng(1)
    seqs = [rng.normal(3.0, 2.0, size=(n, 4)) for n in (5, 9, 13)]
    mean, std = fit_standardizer(seqs)
    allf = np.concatenate(seqs)
    np.testing.assert_allclose(mean, allf.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, allf.std(0), rtol=1e-6)
    z = apply_standardizer(allf, mean, std)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(0), 1.0, atol=1e-5)
    # a constant channel is not divided by zero
    _, std_c = fit_standardizer([np.ones((4, 2))])
    assert np.all(std_c > 0)


def test_make_windows_errors_name_the_argument():
    x = [np.zeros((5, 2))]
    with pytest.raises(ValueError, match="`window`"):
        make_windows(x, window=0)
    with pytest.raises(ValueError, match="`stride`"):
        make_windows(x, window=2, stride=0)
    with pytest.raises(ValueError, match=r"`labels\[0\]` must have shape \[T\] = \[5\]"):
        make_windows(x, [np.zeros(4)], window=2)
    with pytest.raises(ValueError, match="share Dx"):
        make_windows([np.zeros((5, 2)), np.zeros((5, 3))], window=2)
    with pytest.raises(ValueError, match="`Dx` = 2|Dx = 2"):
        apply_standardizer(np.zeros((3, 4)), np.zeros(2), np.ones(2))


# ------------------------------------------------------------------------- BasicMotions


@needs_aeon
def test_basic_motions_clips_shapes_and_labels():
    for split in ("train", "test"):
        x, y = basic_motions_clips(split)
        assert x.shape == (40, 100, 6) and x.dtype == np.float32
        assert y.dtype == np.int32
        np.testing.assert_array_equal(np.bincount(y, minlength=4), [10, 10, 10, 10])


@needs_aeon
def test_build_switching_sequences_is_deterministic_and_switches():
    x, y = basic_motions_clips("train")
    a = build_switching_sequences(x, y, clips_per_sequence=4, seed=3)
    b = build_switching_sequences(x, y, clips_per_sequence=4, seed=3)
    c = build_switching_sequences(x, y, clips_per_sequence=4, seed=4)
    np.testing.assert_array_equal(a.clip_index, b.clip_index)
    np.testing.assert_array_equal(a.x, b.x)
    assert not np.array_equal(a.clip_index, c.clip_index)
    assert a.x.shape == (10, 400, 6) and a.labels.shape == (10, 400)
    # every clip used once, consecutive clips of different activities
    np.testing.assert_array_equal(np.sort(a.clip_index.ravel()), np.arange(40))
    assert np.all(np.diff(y[a.clip_index], axis=1) != 0)
    # per-frame labels and data are those of the clip in each slot
    for s in range(2):
        for j in range(4):
            i = a.clip_index[s, j]
            np.testing.assert_array_equal(a.x[s, 100 * j : 100 * (j + 1)], x[i])
            assert np.all(a.labels[s, 100 * j : 100 * (j + 1)] == y[i])


@needs_aeon
def test_load_basic_motions_shapes_dtypes_and_train_stats():
    d = load_basic_motions(window=50)
    assert d.train_x.shape == (80, 50, 6) and d.test_x.shape == (80, 50, 6)
    assert d.train_x.dtype == np.float32 and d.train_labels.dtype == np.int32
    assert d.train_labels.shape == (80, 50) and d.train_mask.all()
    assert d.label_names == BASIC_MOTIONS_LABELS and len(d.channel_names) == 6
    assert set(np.unique(d.train_labels)) == {0, 1, 2, 3}
    raw_train, _ = basic_motions_clips("train")
    mean, std = fit_standardizer(raw_train)
    np.testing.assert_allclose(d.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(d.std, std, rtol=1e-6)
    # each train clip is used once, so the train windows are standardised exactly
    np.testing.assert_allclose(d.train_x.reshape(-1, 6).mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(d.train_x.reshape(-1, 6).std(0), 1.0, atol=1e-4)
    full = load_basic_motions()
    assert full.train_x.shape == (10, 400, 6)


@needs_aeon
def test_basic_motions_no_test_clip_in_train_windows():
    d = load_basic_motions(window=30, stride=10, drop_remainder=False)
    raw_tr, _ = basic_motions_clips("train")
    raw_te, _ = basic_motions_clips("test")
    train_rows = _rows(d.train_x[d.train_mask])
    test_clip_rows = _rows(apply_standardizer(raw_te, d.mean, d.std))
    train_clip_rows = _rows(apply_standardizer(raw_tr, d.mean, d.std))
    assert not train_rows & test_clip_rows
    assert train_rows <= train_clip_rows  # positive control: the comparison can match


@needs_aeon
def test_basic_motions_standardisation_ignores_test_data(tmp_path):
    src = pathlib.Path(importlib.util.find_spec("aeon").submodule_search_locations[0])
    src = src / "datasets" / "data" / "BasicMotions"
    shutil.copy(src / "BasicMotions_TRAIN.ts", tmp_path)
    # a test file with every value scaled: train statistics and train data must not move
    lines = (src / "BasicMotions_TEST.ts").read_text().splitlines()
    out = []
    for line in lines:
        if line and not line.startswith(("@", "#")):
            *chans, lab = line.split(":")
            chans = [",".join(str(10 * float(v) + 5) for v in c.split(",")) for c in chans]
            line = ":".join([*chans, lab])
        out.append(line)
    (tmp_path / "BasicMotions_TEST.ts").write_text("\n".join(out))
    ref = load_basic_motions(window=50)
    mod = load_basic_motions(window=50, data_dir=tmp_path)
    np.testing.assert_array_equal(mod.mean, ref.mean)
    np.testing.assert_array_equal(mod.std, ref.std)
    np.testing.assert_array_equal(mod.train_x, ref.train_x)
    assert not np.allclose(mod.test_x, ref.test_x)


def test_basic_motions_without_aeon_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        bm_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "aeon" else real(name, *a),
    )
    with pytest.raises(ImportError, match=r'pip install "numpyro_svae\[data\]"'):
        load_basic_motions()


def test_read_ts_file_errors_name_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ts"):
        read_ts_file(tmp_path / "nope.ts")
    bad = tmp_path / "bad.ts"
    bad.write_text("@problemName x\n@data\n1,2,3:4,5,6:a\n1,2,x:4,5,6:b\n")
    with pytest.raises(ValueError, match=r"bad\.ts, line 4"):
        read_ts_file(bad)
    bad.write_text("@data\n1,2,3:4,5,6:a\n1,2:4,5:b\n")
    with pytest.raises(ValueError, match=r"bad\.ts, line 3"):
        read_ts_file(bad)
    ok = tmp_path / "ok.ts"
    ok.write_text("# c\n@data\n1,2,3:4,5,6:a\n7,8,9:1,1,1:b\n")
    x, y = read_ts_file(ok)
    np.testing.assert_array_equal(x[1], [[7, 1], [8, 1], [9, 1]])
    assert y.tolist() == ["a", "b"]


# ------------------------------------------------------------------------------- mocap6


def _mat(path):
    return scipy.io.loadmat(path / "mocap6.mat", squeeze_me=True, struct_as_record=False)


def test_load_mocap6_shapes_labels_and_train_stats(mocap6_path):
    d = load_mocap6(mocap6_path)
    assert d.train_x.shape == (5, 446, 12) and d.test_x.shape == (1, 387, 12)
    assert d.train_x.dtype == np.float32 and d.train_labels.dtype == np.int32
    assert len(d.label_names) == 12 and d.label_names[0] == "JumpJack"
    assert d.channel_names[0] == "root.ty"
    names = list(MOCAP6_SEQUENCES)
    assert d.test_source.tolist() == [names.index("14_14")]
    assert names.index("14_14") not in d.train_source.tolist()
    seqs = {str(s.filename): s for s in _mat(mocap6_path)["DataBySeq"]}
    train_raw = [seqs[names[i]].X for i in d.train_source]
    mean, std = fit_standardizer(train_raw)
    # the channel means are ~1e-2 (each sequence is centred), hence an absolute tolerance
    np.testing.assert_allclose(d.mean, mean, atol=1e-6)
    np.testing.assert_allclose(d.std, std, rtol=1e-6)
    for row, i in enumerate(d.train_source):
        s = seqs[names[i]]
        t = s.X.shape[0]
        np.testing.assert_allclose(d.train_x[row, :t] * d.std + d.mean, s.X, atol=F32_ATOL)
        np.testing.assert_array_equal(d.train_labels[row, :t], s.TrueZ - 1)
        assert d.train_mask[row, :t].all() and not d.train_mask[row, t:].any()
        assert np.all(d.train_labels[row, t:] == -1)


def test_mocap6_windows_never_mix_train_and_test(mocap6_path):
    d = load_mocap6(mocap6_path, test_sequences=("13_30", "14_20"), window=40, stride=20)
    names = list(MOCAP6_SEQUENCES)
    assert set(d.test_source.tolist()) == {names.index("13_30"), names.index("14_20")}
    assert not set(d.train_source.tolist()) & set(d.test_source.tolist())
    assert d.train_x.shape[1:] == (40, 12) and d.train_mask.all()
    assert not _rows(d.train_x) & _rows(d.test_x)
    assert d.train_labels.min() >= 0 and d.train_labels.max() <= 11


def test_parse_amc_reads_the_cmu_skeleton(mocap6_path):
    m = parse_amc(mocap6_path / "amc" / "13_30.amc")
    assert m.frames.shape == (2465, 62) and m.frames.dtype == np.float32
    np.testing.assert_array_equal(m.frame_numbers, np.arange(1, 2466))
    assert m.bone_names == tuple(b for b, _ in CMU_SKELETON_DOFS)
    assert m.channel_names[:2] == ("root.tx", "root.ty") and m.channel_names[-1] == "ltoes.rx"
    # first frame, first and last bones, as written in the file
    lines = (mocap6_path / "amc" / "13_30.amc").read_text().splitlines()
    first = [ln.strip() for ln in lines].index("1")
    root = [float(v) for v in lines[first + 1].split()[1:]]
    np.testing.assert_allclose(m.frames[0, :6], root, rtol=1e-6)


def test_load_amc_matches_mocap6_mat(mocap6_path):
    seq = next(s for s in _mat(mocap6_path)["DataBySeq"] if str(s.filename) == "13_30")
    channels = list(_mat(mocap6_path)["ChannelNames"])
    amc = load_amc(
        mocap6_path / "amc" / "13_30.amc", labels=mocap6_path / "truelabels" / "13_30.txt"
    )
    assert amc.frame_rate == 10.0 and amc.x.shape == (205, 62) and amc.labels.shape == (205,)
    # mat row i = block i + 1 (block 0 is its Xprev), centred over all rows; the release
    # builds its last row from the incomplete final block, so that row is left out and the
    # centring shows as one constant offset per channel
    x = amc.x[1:, [amc.channel_names.index(c) for c in channels]]
    diff = x - seq.X[:-1]
    np.testing.assert_allclose(diff - diff.mean(0), 0.0, atol=F32_ATOL)
    np.testing.assert_array_equal(amc.labels[1:], seq.TrueZ[:-1])
    partial = load_amc(mocap6_path / "amc" / "13_30.amc", keep_partial=True)
    assert partial.x.shape == (206, 62) and partial.labels is None
    np.testing.assert_allclose(partial.x[:205], amc.x, atol=F32_ATOL)


def test_amc_errors_name_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.amc"):
        parse_amc(tmp_path / "missing.amc")
    good = ":FULLY-SPECIFIED\n:DEGREES\n1\nroot 0 1 2\nlbone 3\n2\nroot 4 5 6\nlbone 7\n"
    f = tmp_path / "m.amc"
    f.write_text(good)
    m = parse_amc(f)
    np.testing.assert_array_equal(m.frames, [[0, 1, 2, 3], [4, 5, 6, 7]])
    assert m.channel_names == ("root.0", "root.1", "root.2", "lbone.0")
    cases = {
        "root 4 5\n": r"m\.amc, line 7: bone 'root' has 2 values; expected 3",
        "root 4 x 6\n": r"m\.amc, line 7: non-numeric",
        "head 4 5 6\n": r"m\.amc, line 7: expected bone 'root'",
    }
    for bad_line, msg in cases.items():
        f.write_text(good.replace("root 4 5 6\n", bad_line))
        with pytest.raises(ValueError, match=msg):
            parse_amc(f)
    f.write_text(good.replace("\n2\n", "\n3\n"))
    with pytest.raises(ValueError, match=r"m\.amc, line 6: frame number 3"):
        parse_amc(f)
    f.write_text(good.replace("lbone 7\n", ""))
    with pytest.raises(ValueError, match=r"m\.amc.*frame 2 has 1 bones"):
        parse_amc(f)
    f.write_text(good.replace("root 0 1 2\nlbone 3\n", ""))
    with pytest.raises(ValueError, match=r"m\.amc.*frame 1 has no bone lines"):
        parse_amc(f)
    f.write_text("just some text\n")
    with pytest.raises(ValueError, match=r"m\.amc, line 1"):
        parse_amc(f)


def test_downsample_motion_carries_labels():
    x = np.arange(14, dtype=np.float32)[:, None] * [1.0, 2.0]
    raw_labels = np.array([0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 4])
    xd, ld = downsample_motion(x, raw_labels, factor=4)
    np.testing.assert_allclose(xd[:, 0], [1.5, 5.5, 9.5])
    np.testing.assert_array_equal(ld, [0, 2, 3])  # majority of each block, ties -> smallest
    xp, lp = downsample_motion(x, raw_labels, factor=4, keep_partial=True)
    np.testing.assert_allclose(xp[-1], [12.5, 25.0])
    np.testing.assert_array_equal(lp, [0, 2, 3, 4])
    _, lb = downsample_motion(x, np.array([7, 8, 9, 10]), factor=4)  # already per block
    np.testing.assert_array_equal(lb, [7, 8, 9])
    _, lb = downsample_motion(x, np.array([7, 8, 9]), factor=4)
    np.testing.assert_array_equal(lb, [7, 8, 9])
    with pytest.raises(ValueError, match=r"`labels` must have shape \[T\] = \[14\]"):
        downsample_motion(x, np.zeros(5), factor=4)


def test_mocap_loaders_error_on_missing_paths(tmp_path, mocap6_path):
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        load_mocap6(tmp_path / "no_such_dir")
    with pytest.raises(FileNotFoundError, match="mocap6.mat"):
        load_mocap6(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing.txt"):
        load_amc(mocap6_path / "amc" / "13_30.amc", labels=tmp_path / "nothing.txt")
    with pytest.raises(ValueError, match="`labels` must have shape"):
        load_amc(mocap6_path / "amc" / "13_30.amc", labels=np.zeros(100, int))
    with pytest.raises(ValueError, match="unknown trials"):
        load_mocap6(mocap6_path, test_sequences=("99_99",))
    with pytest.raises(ValueError, match="not a mocap6"):
        scipy.io.savemat(tmp_path / "mocap6.mat", {"foo": np.zeros(3)})
        load_mocap6(tmp_path)


# ---------------------------------------------------------------------------- synthetic


def test_synthetic_slds_is_deterministic():
    kw = dict(num_sequences=3, num_timesteps=40)
    a, b = synthetic_slds(0, **kw), synthetic_slds(0, **kw)
    for f in ("x", "z", "k"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    np.testing.assert_array_equal(a.params.A, b.params.A)
    assert not np.array_equal(a.x, synthetic_slds(1, **kw).x)
    ka = synthetic_slds(jax.random.key(5), **kw)
    kb = synthetic_slds(jax.random.key(5), **kw)
    np.testing.assert_array_equal(ka.x, kb.x)
    assert not np.array_equal(ka.x, synthetic_slds(jax.random.key(6), **kw).x)


@pytest.mark.parametrize("nonlinear,latent_dim", [(True, 2), (False, 3)])
def test_synthetic_slds_matches_its_generating_parameters(nonlinear, latent_dim):
    N, T, K, D, Dx = 20, 150, 3, latent_dim, 6
    d = synthetic_slds(
        7, num_sequences=N, num_timesteps=T, num_regimes=K, latent_dim=D, obs_dim=Dx,
        nonlinear=nonlinear, self_transition=0.9, dynamics_noise_std=0.1, obs_noise_std=0.2,
    )  # fmt: skip
    p = d.params
    assert d.x.shape == (N, T, Dx) and d.z.shape == (N, T, D) and d.k.shape == (N, T)
    assert d.x.dtype == np.float32 and d.z.dtype == np.float32 and d.k.dtype == np.int32
    assert d.k.min() >= 0 and d.k.max() < K
    np.testing.assert_allclose(p.P.sum(-1), 1.0, rtol=1e-6)
    # stable, regime-specific dynamics with fixed points c_k = (I - A_k)^-1 b_k
    radii = np.abs(np.linalg.eigvals(p.A)).max(-1)
    assert np.all(radii < 1) and len(set(np.round(radii, 4))) == K
    np.testing.assert_allclose(np.einsum("kij,kj->ki", np.eye(D) - p.A, p.centers), p.b, atol=1e-5)
    # k[:, t] governs z[:, t-1] -> z[:, t]: the residuals are the dynamics noise
    kt = d.k[:, 1:]
    resid = d.z[:, 1:] - np.einsum("ntij,ntj->nti", p.A[kt], d.z[:, :-1]) - p.b[kt]
    _assert_variance(resid, 0.1**2)
    _assert_variance(d.x - emission_mean(p.emission, d.z), 0.2**2)
    # self-transition frequency against P[k, k] = 0.9 (binomial standard error)
    stay = (d.k[:, 1:] == d.k[:, :-1]).ravel()
    zscore = (stay.mean() - 0.9) / np.sqrt(0.9 * 0.1 / stay.size)
    assert abs(zscore) < 5


def _assert_variance(resid, var):
    """z-score of the mean of squared Gaussian residuals against var (SE from the sample)."""
    sq = np.asarray(resid, np.float64).ravel() ** 2
    zscore = (sq.mean() - var) / (sq.std() / np.sqrt(sq.size))
    assert abs(zscore) < 5, zscore


def test_synthetic_slds_errors_name_the_argument():
    with pytest.raises(ValueError, match="`num_sequences`"):
        synthetic_slds(0, num_sequences=0, num_timesteps=5)
    with pytest.raises(ValueError, match="`latent_dim`"):
        synthetic_slds(0, num_sequences=1, num_timesteps=5, latent_dim=1)
    with pytest.raises(ValueError, match="`self_transition`"):
        synthetic_slds(0, num_sequences=1, num_timesteps=5, self_transition=1.5)
    with pytest.raises(TypeError, match="`key_or_seed`"):
        synthetic_slds(np.float32(0.5), num_sequences=1, num_timesteps=5)

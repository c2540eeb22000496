"""The real-data benchmark's imputation protocol (``bench/bench_real.py``: gap masks, the
multi-mask task and its scores) and the seeds summary (``bench/real_seeds.py``).  Pure
NumPy; no model is fitted."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from numpyro_svae import cli

_BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    """A script of bench/ as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", _BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load("bench_real")


def _runs(row: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of the False runs of a bool row."""
    out, start = [], None
    for t, v in enumerate(row):
        if not v and start is None:
            start = t
        if v and start is not None:
            out.append((start, t))
            start = None
    if start is not None:
        out.append((start, len(row)))
    return out


def _data(lengths, T=120, Dx=3, seed=0) -> cli.Data:
    rng = np.random.default_rng(seed)
    valid = np.zeros((len(lengths), T), bool)
    for n, length in enumerate(lengths):
        valid[n, :length] = True
    x = rng.normal(size=(len(lengths), T, Dx)).astype(np.float32)
    return cli.Data(x, None, valid, x, None, valid, ())


def test_gap_mask_places_gaps_inside_real_frames(bench):
    valid = _data([120, 90]).test_mask
    for seed in (0, 1, (3, 2)):
        obs = bench.gap_mask(seed, valid, gaps=3)
        assert obs.shape == valid.shape
        assert not (obs & ~valid).any()  # padding stays unobserved
        for n in range(2):
            length = int(valid[n].sum())
            gaps = _runs(obs[n, :length])
            assert len(gaps) == 3  # separate runs: an observed frame between any two
            for a, b in gaps:
                assert 10 <= b - a <= 30
                assert a >= 1 and b <= length - 1  # observed frames on both sides
    np.testing.assert_array_equal(bench.gap_mask(5, valid, 3), bench.gap_mask(5, valid, 3))


def test_impute_task_tiles_copies_and_keeps_the_single_mask_first(bench):
    data = _data([120, 90])
    task = bench.impute_task(data, seed=7, gaps=2, masks=3)
    N = data.test_x.shape[0]
    assert task.x.shape == (3 * N,) + data.test_x.shape[1:] and task.masks == 3
    for m in range(3):
        np.testing.assert_array_equal(task.x[m * N:(m + 1) * N], data.test_x)
        np.testing.assert_array_equal(task.valid[m * N:(m + 1) * N], data.test_mask)
    # mask 0 is the single-mask protocol's; the others are independent draws
    np.testing.assert_array_equal(task.observed[:N], bench.gap_mask(7, data.test_mask, 2))
    assert not np.array_equal(task.observed[:N], task.observed[N:2 * N])
    assert not np.array_equal(task.observed[N:2 * N], task.observed[2 * N:])
    one = bench.impute_task(data, seed=7, gaps=2, masks=1)
    np.testing.assert_array_equal(one.observed, task.observed[:N])
    # more masks extend fewer: mask m does not depend on how many are drawn
    two = bench.impute_task(data, seed=7, gaps=2, masks=2)
    np.testing.assert_array_equal(two.observed, task.observed[:2 * N])
    with pytest.raises(ValueError, match="impute_masks must be >= 1"):
        bench.impute_task(data, seed=7, gaps=2, masks=0)


def test_imputation_scores_pool_hidden_entries_and_split_by_mask(bench):
    data = _data([120, 90], Dx=2)
    task = bench.impute_task(data, seed=1, gaps=2, masks=2)
    N = data.test_x.shape[0]
    offsets = np.repeat(np.array([0.5, 2.0]), N)[:, None, None]
    mean = task.x + offsets
    mean[~task.valid] = 1e6  # padding is never scored, whatever the prediction
    scores, per_mask = bench.imputation_scores(task, mean, None)
    np.testing.assert_allclose(per_mask, [0.5, 2.0], rtol=1e-6)
    hidden = (~task.observed & task.valid).reshape(2, N, -1).sum(axis=(1, 2))
    pooled = np.sqrt((hidden[0] * 0.25 + hidden[1] * 4.0) / hidden.sum())
    np.testing.assert_allclose(scores["impute_rmse"], pooled, rtol=1e-6)
    assert scores["impute_loglik"] is None
    # with a variance: the Gaussian log density per hidden entry, in closed form
    var = np.full_like(task.x, 0.5)
    scores, _ = bench.imputation_scores(task, mean, var)
    sq = (hidden[0] * 0.25 + hidden[1] * 4.0) / hidden.sum()
    np.testing.assert_allclose(scores["impute_loglik"],
                               -0.5 * np.log(2 * np.pi * 0.5) - 0.5 * sq / 0.5, rtol=1e-6)


def test_real_seeds_pairs_masks_within_and_across_seeds(tmp_path):
    rs = _load("real_seeds")
    per = {0: ([0.8, 0.9, 0.7], [0.85, 0.8, 0.75]), 1: ([0.6, 0.7, 0.5], [0.65, 0.75, 0.6])}
    paths = []
    for seed, (slds, lds) in per.items():
        rows = [{"dataset": "mocap6", "model": m, "impute_rmse": float(np.mean(v))}
                for m, v in (("slds_svae", slds), ("lds_svae", lds))]
        rows.append({"dataset": "basic_motions", "model": "slds_svae", "impute_rmse": 1.0})
        run = {"config": {"seed": seed}, "timings": {
            "slds_svae": {"impute_rmse_per_mask": slds},
            "lds_svae": {"impute_rmse_per_mask": lds}}}
        p = tmp_path / f"s{seed}.json"
        p.write_text(json.dumps({"rows": rows, "runs": {"mocap6": run}}))
        paths.append(p)
    out = rs.collect(paths)
    assert [(r["seed"], r["model"]) for r in out["rows"]] == [
        (0, "slds_svae"), (0, "lds_svae"), (1, "slds_svae"), (1, "lds_svae")]
    s0 = out["paired"]["per_seed"]["0"]["lds_svae"]
    np.testing.assert_allclose(s0["mean_diff"], np.mean([-0.05, 0.1, -0.05]))
    assert s0["wins"] == 2 and s0["masks"] == 3
    pooled = out["paired"]["pooled"]["lds_svae"]
    d = np.array([-0.05, 0.1, -0.05, -0.05, -0.05, -0.1])
    np.testing.assert_allclose(pooled["mean_diff"], d.mean())
    np.testing.assert_allclose(pooled["se"], d.std(ddof=1) / np.sqrt(6))
    assert pooled["wins"] == 5 and pooled["masks"] == 6
    with pytest.raises(SystemExit, match="seed 0 given twice"):
        rs.collect([paths[0], paths[0]])
    with pytest.raises(SystemExit, match="no 'other' run"):
        rs.collect(paths, "other")


def test_bench_real_refuses_load_state_without_a_folder_or_out(bench, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--load-state", str(tmp_path / "nothing"), "--out", str(tmp_path / "o.json")])
    assert e.value.code == 2 and "--load-state: no folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        bench.main(["--load-state", str(tmp_path)])
    assert e.value.code == 2 and "need --out" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()

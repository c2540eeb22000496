"""Reliability of the `numpyro-svae` command: data that cannot be swapped, weak inputs
refused before compilation, checkpoints that survive Ctrl-C / SIGTERM / a killed process.

The trained-run tests share one tiny LDS run (module fixture; one compilation), and every
further fit has the same configuration, so it reuses the compiled step and evaluation."""

import json
import os
import pathlib
import shutil
import signal
import tempfile
import time

import numpy as np
import pytest

from numpyro_svae import cli, cli_checks

STEPS = 4
OPTS = ["--family", "lds", "--D", "1", "--hidden", "4", "--max-iters", "1", "--fast",
        "--no-progress", "--checkpoint-every", "2"]


def _run(capsys, argv):
    code = cli.main(argv)
    cap = capsys.readouterr()
    return code, cap.err


def _one_line_error(code, err):
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("numpyro-svae: error: "), err
    assert "Traceback" not in err


def _tiny(path, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    x = np.cumsum(rng.normal(size=(5, 8, 2)), axis=1).astype(np.float32)
    np.savez(path, x=scale * x + (scale - 1.0), labels=(x[..., 0] > 0).astype(np.int32))


def _meta(folder):
    return json.loads((folder / "checkpoint.json").read_text())


def _losses(folder):
    with np.load(folder / "checkpoint.npz", allow_pickle=False) as f:
        return np.asarray(f["losses"])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A run fitted from `work/` with relative --dataset and --out paths."""
    root = tmp_path_factory.mktemp("rel")
    (root / "data").mkdir()
    (root / "work").mkdir()
    _tiny(root / "data" / "tiny.npz")
    here = os.getcwd()
    os.chdir(root / "work")
    try:
        code = cli.main(["fit", "--dataset", "../data/tiny.npz", "--steps", str(STEPS),
                         *OPTS, "--out", "run"])
    finally:
        os.chdir(here)
    assert code == 0
    return root


@pytest.fixture
def no_compile(monkeypatch):
    """Fail the test if the command gets as far as building (and compiling) a model."""
    def refuse(*a, **k):
        raise AssertionError("the check should have come before building the model")

    monkeypatch.setattr(cli, "build", refuse)


# ------------------------------------------------------------------------------------------
# weak inputs: one line, exit 2, before any compilation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, words", [((4, 1, 2), ["T = 1", "T >= 2", "`x`"]),
                                          ((4, 6, 0), ["Dx = 0", "at least one channel"])])
def test_too_short_sequences_and_no_channels_are_refused(tmp_path, capsys, no_compile, shape,
                                                         words):
    f = tmp_path / "weak.npz"
    np.savez(f, x=np.zeros(shape, np.float32))
    code, err = _run(capsys, ["fit", "--dataset", str(f), "--out", str(tmp_path / "o")])
    _one_line_error(code, err)
    assert all(w in err for w in words) and "weak.npz" in err, err
    assert not (tmp_path / "o").exists()


def test_files_that_are_not_npz_archives_are_refused_without_pickle_advice(
        tmp_path, capsys, no_compile):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x80\x04 this is no zip archive")
    npy = tmp_path / "plain.npz"  # a .npy under a .npz name
    with open(npy, "wb") as fh:
        np.save(fh, np.zeros((4, 6, 2)))
    objects = tmp_path / "objects.npz"
    np.savez(objects, x=np.array([{"a": 1}, None], dtype=object))
    text = tmp_path / "text.npz"
    np.savez(text, x=np.array([[["a", "b"]]]))
    for f, words in ((garbage, "not a valid .npz"), (npy, "not a valid .npz"),
                     (objects, "pickled Python objects"), (text, "must hold numbers")):
        code, err = _run(capsys, ["fit", "--dataset", str(f), "--out", str(tmp_path / "o")])
        _one_line_error(code, err)
        assert words in err and f.name in err, err
        assert "allow_pickle" not in err and "trust" not in err, err


def _unwritable_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    for cand in (ro, pathlib.Path("/sys")):  # root writes anywhere but a read-only mount
        try:
            tempfile.TemporaryDirectory(dir=cand).cleanup()
        except OSError:
            return cand
    pytest.skip("no unwritable folder here (root, and /sys is writable)")


def test_unwritable_out_is_refused_before_training(tmp_path, capsys, no_compile):
    data = tmp_path / "tiny.npz"
    _tiny(data)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    try:
        ro = _unwritable_folder(tmp_path)
        cases = ((a_file / "run", "is a file, not a folder"),
                 (a_file / "deeper" / "run", "is a file, not a folder"),
                 (a_file, "is a file, not a run folder"),
                 (ro / "run", "not writable"))
        for out, words in cases:
            code, err = _run(capsys, ["fit", "--dataset", str(data), "--out", str(out)])
            _one_line_error(code, err)
            assert "--out" in err and words in err, err
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "ro", "tiny.npz"]
    code, err = _run(capsys, ["fit", "--dataset", str(data), "--checkpoint-every", "-1",
                              "--out", str(tmp_path / "o")])
    _one_line_error(code, err)
    assert "--checkpoint-every must be >= 0" in err


def test_fingerprint_follows_the_arrays_not_the_file_bytes(tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    _tiny(a)
    with np.load(a) as f:
        np.savez_compressed(b, **{k: f[k] for k in f.files})  # same arrays, other bytes
    fp = cli.data_fingerprint
    assert fp(cli._load_file(str(a))) == fp(cli._load_file(str(b)))
    _tiny(b, scale=2.0)  # standardises to the same arrays, but it is other data
    np.testing.assert_allclose(cli._load_file(str(a)).train_x, cli._load_file(str(b)).train_x,
                               atol=1e-5)
    assert fp(cli._load_file(str(a))) != fp(cli._load_file(str(b)))
    with np.load(a) as f:
        np.savez(b, x=f["x"], labels=1 - f["labels"])  # relabelled
    assert fp(cli._load_file(str(a))) != fp(cli._load_file(str(b)))
    named = cli.Data(np.zeros((1, 2, 1)), None, np.ones((1, 2), bool), np.ones((1, 2, 1)),
                     None, np.ones((1, 2), bool), ())
    assert len(fp(named)) == 64 and fp(named) != fp(named._replace(test_x=np.zeros((1, 2, 1))))


# ------------------------------------------------------------------------------------------
# the data of a run cannot be swapped; paths are absolute
# ------------------------------------------------------------------------------------------


def test_run_stores_absolute_paths_and_evaluates_from_anywhere(fitted, tmp_path, capsys,
                                                               monkeypatch):
    run, data = fitted / "work" / "run", fitted / "data" / "tiny.npz"
    meta = _meta(run)
    assert meta["config"]["dataset"] == str(data) and os.path.isabs(meta["config"]["dataset"])
    assert meta["data"]["path"] == str(data) and len(meta["data"]["fingerprint"]) == 64
    assert meta["complete"] is True and meta["step"] == STEPS
    monkeypatch.chdir(tmp_path)  # another folder: the stored path is absolute
    assert cli.main(["evaluate", str(run)]) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out)["heldout_bound_per_frame"])

    moved = tmp_path / "moved.npz"
    os.replace(data, moved)
    try:
        code, err = _run(capsys, ["evaluate", str(run)])
        _one_line_error(code, err)
        assert "absolute path" in err and str(data) in err and "--dataset" in err, err
        # the same data elsewhere, given relative to this folder
        assert cli.main(["evaluate", str(run), "--dataset", "moved.npz"]) == 0
        capsys.readouterr()
    finally:
        os.replace(moved, data)


def test_swapped_data_is_refused_by_evaluate_and_resume(fitted, tmp_path, capsys):
    run, data = fitted / "work" / "run", fitted / "data" / "tiny.npz"
    stored = _meta(run)["data"]["fingerprint"]
    original = data.read_bytes()
    other = tmp_path / "other.npz"
    _tiny(other, scale=3.0)  # the same after standardisation, but not the same data
    new = cli.data_fingerprint(cli._load_file(str(other)))
    resume = ["fit", "--resume", "--dataset", str(data), "--steps", "6", *OPTS,
              "--out", str(run)]
    try:
        data.write_bytes(other.read_bytes())
        for argv in (["evaluate", str(run)], resume):
            code, err = _run(capsys, argv)
            _one_line_error(code, err)
            assert stored[:16] in err and new[:16] in err and str(data) in err, err
    finally:
        data.write_bytes(original)
    code, err = _run(capsys, ["evaluate", str(run), "--dataset", str(other)])  # explicit
    _one_line_error(code, err)
    assert stored[:16] in err and new[:16] in err and "other.npz" in err
    code, err = _run(capsys, [*resume[:3], str(other), *resume[4:]])
    _one_line_error(code, err)
    assert stored[:16] in err and new[:16] in err
    assert _meta(run)["step"] == STEPS  # nothing changed

    # the same data at another path resumes (the fingerprint decides, not the path)
    copy_run, copy_data = tmp_path / "run", tmp_path / "copy.npz"
    shutil.copytree(run, copy_run)
    shutil.copy(data, copy_data)
    assert cli.main([*resume[:3], str(copy_data), *resume[4:-1], str(copy_run)]) == 0
    capsys.readouterr()
    assert _meta(copy_run)["step"] == 6 and _meta(copy_run)["data"]["path"] == str(copy_data)


# ------------------------------------------------------------------------------------------
# lost work: checkpoints on interruption and every N steps; stale staging folders
# ------------------------------------------------------------------------------------------


def _interrupt_at(monkeypatch, call, signum):
    """Deliver `signum` to this process during the `call`-th training step."""
    original, calls = cli.Run.update, [0]

    def update(self, x, local_kl_weight=None):
        step = original(self, x, local_kl_weight)

        def interrupted(state):
            calls[0] += 1
            if calls[0] == call:
                signal.raise_signal(signum)
            return step(state)

        return interrupted

    monkeypatch.setattr(cli.Run, "update", update)
    return lambda: monkeypatch.setattr(cli.Run, "update", original)


def test_interrupted_fit_saves_a_checkpoint_and_resume_completes_it(fitted, tmp_path, capsys,
                                                                    monkeypatch):
    data = str(fitted / "data" / "tiny.npz")
    out = tmp_path / "run"
    fit = ["fit", "--dataset", data, "--steps", "7", *OPTS, "--out", str(out)]
    undo = _interrupt_at(monkeypatch, 4, signal.SIGINT)  # Ctrl-C in step 4
    code, err = _run(capsys, fit)
    undo()
    assert code == 130 and "checkpoint at step 3 of 7" in err and "--resume" in err, err
    assert "step 2/7, loss" in err  # --no-progress: one line per checkpoint
    assert "Traceback" not in err
    meta = _meta(out)
    assert meta["step"] == 3 and meta["complete"] is False and meta["data"]["fingerprint"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.json", "checkpoint.npz"]
    assert not list(tmp_path.glob(".run.partial-*"))

    undo = _interrupt_at(monkeypatch, 2, signal.SIGTERM)  # kill during the resume
    code, err = _run(capsys, [*fit, "--resume"])
    undo()
    assert code == 130 and "checkpoint at step 4 of 7" in err, err
    assert _meta(out)["step"] == 4 and not list(tmp_path.glob(".run.partial-*"))

    assert cli.main([*fit, "--resume"]) == 0
    capsys.readouterr()
    whole = tmp_path / "whole"  # the same run without interruptions
    assert cli.main([*fit[:-1], str(whole)]) == 0
    capsys.readouterr()
    assert _meta(out)["step"] == 7 and _meta(out)["complete"] is True
    assert json.loads((out / "metrics.json").read_text())["steps"] == 7
    np.testing.assert_allclose(_losses(out), _losses(whole), rtol=1e-5)


def test_stale_staging_folders_are_removed_and_a_killed_runs_checkpoint_is_kept(
        fitted, tmp_path, capsys):
    out = tmp_path / "run"
    dead = tmp_path / ".run.partial-999999999-abc"  # a PID that is not running
    old = tmp_path / f".run.partial-{os.getpid()}-old"  # alive, but untouched for 2 days
    live = tmp_path / f".run.partial-{os.getpid()}-new"  # a run going on now
    for p in (dead, old, live):
        p.mkdir()
        (p / "report.md").write_text("half")
    two_days = time.time() - 2 * 24 * 3600
    os.utime(old / "report.md", (two_days, two_days))
    os.utime(old, (two_days, two_days))
    assert set(cli_checks.stale_stages(out)) == {dead, old}
    code, err = _run(capsys, ["fit", "--dataset", str(tmp_path / "nothing.npz"),
                              "--out", str(out)])
    assert code == 2 and "nothing.npz" in err
    assert not dead.exists() and not old.exists() and live.exists()
    shutil.rmtree(live)

    # a process killed outright (no handler runs) leaves its periodic checkpoint behind
    killed = tmp_path / ".run.partial-999999999-xyz"
    killed.mkdir()
    for name in ("checkpoint.json", "checkpoint.npz"):
        shutil.copy(fitted / "work" / "run" / name, killed / name)
    fit = ["fit", "--dataset", str(fitted / "data" / "tiny.npz"), "--steps", "6", *OPTS,
           "--out", str(out)]
    code, err = _run(capsys, fit)
    _one_line_error(code, err)
    assert f"step {STEPS}" in err and "--resume" in err and killed.exists()
    code, err = _run(capsys, [*fit, "--resume"])
    assert code == 0 and f"checkpoint at step {STEPS}" in err, err
    assert _meta(out)["step"] == 6 and not killed.exists()
    np.testing.assert_array_equal(_losses(out)[:STEPS], _losses(fitted / "work" / "run"))


def test_train_interruption_keeps_the_last_completed_step():
    class Stub:
        def init(self, seed, x):
            return 0

        def update(self, x):
            def step(state):
                if state == 3:
                    raise KeyboardInterrupt
                return state + 1, float(state)
            return step

    data = cli.Data(np.zeros((1, 3, 1)), None, np.ones((1, 3), bool), np.zeros((1, 3, 1)),
                    None, np.ones((1, 3), bool), ())
    seen = []
    with pytest.raises(cli_checks.TrainingInterrupted) as info:
        cli.train(Stub(), data, cli.FitConfig(), steps=6, progress=False,
                  callback=lambda k, st, losses: seen.append((k, st, len(losses))))
    assert isinstance(info.value, KeyboardInterrupt)
    assert info.value.state == 3 and list(info.value.losses) == [0.0, 1.0, 2.0]
    assert seen == [(1, 1, 1), (2, 2, 2), (3, 3, 3)]


def test_deferred_signals_hold_ctrl_c_until_the_block_ends():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with cli_checks.deferred_signals():
            signal.raise_signal(signal.SIGINT)
            done.append("written")
    assert done == ["written"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

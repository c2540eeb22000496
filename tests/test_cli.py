"""The `numpyro-svae` command: clear one-line errors (exit 2), safe atomic checkpoints."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_svae import cli


def _run(capsys, argv):
    code = cli.main(argv)
    err = capsys.readouterr().err
    return code, err


def test_fit_on_missing_file_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _run(capsys, ["fit", "--dataset", str(tmp_path / "nothing.npz"),
                              "--out", str(out), "--no-progress"])
    assert code == 2
    assert err.count("\n") == 1 and "nothing.npz" in err and "Traceback" not in err
    assert not out.exists()
    assert not list(tmp_path.glob(".run.partial-*"))


def test_malformed_npz_and_bad_labels_are_reported(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    code, err = _run(capsys, ["fit", "--dataset", str(bad), "--out", str(tmp_path / "o")])
    assert code == 2 and "bad.npz" in err
    f = tmp_path / "lab.npz"
    np.savez(f, x=np.zeros((4, 10, 3), np.float32), labels=np.zeros((4, 9), int))
    code, err = _run(capsys, ["fit", "--dataset", str(f), "--out", str(tmp_path / "o")])
    assert code == 2 and "`labels`" in err and "[4, 10]" in err


def test_mocap6_needs_a_path_and_a_real_folder(tmp_path, capsys):
    code, err = _run(capsys, ["fit", "--dataset", "mocap6", "--out", str(tmp_path / "o")])
    assert code == 2 and "--data-path" in err
    code, err = _run(capsys, ["fit", "--dataset", "mocap6", "--data-path",
                              str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert code == 2 and "nowhere" in err


def test_existing_output_folder_requires_resume(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    code, err = _run(capsys, ["fit", "--dataset", "synthetic", "--out", str(tmp_path / "o")])
    assert code == 2 and "--resume" in err


def test_evaluate_on_non_run_folder(tmp_path, capsys):
    code, err = _run(capsys, ["evaluate", str(tmp_path)])
    assert code == 2 and "checkpoint.json" in err


def _state():
    return {"a": jnp.arange(6.0).reshape(2, 3), "b": (jnp.ones(2, jnp.int32),
                                                     jax.random.PRNGKey(3))}


def test_checkpoint_round_trip_is_exact(tmp_path):
    cfg = cli.FitConfig(dataset="synthetic")
    st = _state()
    cli.save_checkpoint(tmp_path, st, cfg, 7, np.array([3.0, 2.0]))
    back, step, losses = cli.load_checkpoint(tmp_path, st, cfg)
    assert step == 7 and np.array_equal(losses, [3.0, 2.0])
    for a, b in zip(jax.tree_util.tree_leaves(st), jax.tree_util.tree_leaves(back), strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    assert not list(tmp_path.glob("*.tmp"))
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    assert meta["config"]["dataset"] == "synthetic"


def test_corrupted_checkpoint_is_detected(tmp_path):
    cfg = cli.FitConfig(dataset="synthetic")
    cli.save_checkpoint(tmp_path, _state(), cfg, 1, np.zeros(1))
    p = tmp_path / "checkpoint.npz"
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(cli.CLIError, match="corrupted"):
        cli.load_checkpoint(tmp_path, _state(), cfg)


def test_incompatible_checkpoint_names_the_difference(tmp_path):
    cli.save_checkpoint(tmp_path, _state(), cli.FitConfig(dataset="synthetic", K=3), 1,
                        np.zeros(1))
    with pytest.raises(cli.CLIError, match="K: checkpoint 3 vs now 5"):
        cli.load_checkpoint(tmp_path, _state(), cli.FitConfig(dataset="synthetic", K=5))
    with pytest.raises(cli.CLIError, match="shape"):
        cli.load_checkpoint(tmp_path, {"a": jnp.zeros((3, 3)), "b": _state()["b"]},
                            cli.FitConfig(dataset="synthetic", K=3))

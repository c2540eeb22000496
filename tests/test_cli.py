"""The `numpyro-svae` command: clear one-line errors (exit 2), safe atomic checkpoints."""

import dataclasses
import hashlib
import json
import os

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


def test_npz_nan_frames_become_missing_and_labels_must_be_integers(tmp_path, capsys):
    x = np.ones((5, 6, 2), np.float32)
    x[0, 2, 1] = np.nan
    f = tmp_path / "nan.npz"
    np.savez(f, x=x, labels=np.zeros((5, 6), np.float32))
    d = cli._load_file(str(f))
    assert d.train_labels.dtype.kind == "i" and np.isfinite(d.train_x).all()
    assert not d.train_mask[0, 2] and d.train_mask.sum() == 4 * 6 - 1
    np.savez(f, x=x, labels=np.full((5, 6), 0.5))
    code, err = _run(capsys, ["fit", "--dataset", str(f), "--out", str(tmp_path / "o")])
    assert code == 2 and "integers" in err
    code, err = _run(capsys, ["fit", "--dataset", "synthetic", "--K", "0",
                              "--out", str(tmp_path / "o")])
    assert code == 2 and "--K must be >= 1" in err


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


# ------------------------------------------------------------------------------------------
# end to end: fit, fit --resume, evaluate on a tiny run (one process: compilations shared)
# ------------------------------------------------------------------------------------------


def _tiny_data(path):
    from numpyro_svae import datasets

    s = datasets.synthetic_slds(0, num_sequences=4, num_timesteps=20, num_regimes=2,
                                latent_dim=2, obs_dim=3)
    np.savez(path, x=np.asarray(s.x, np.float32), labels=np.asarray(s.k))


def _leaves(folder):
    with np.load(folder / "checkpoint.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


class _StubRun:
    """Duck-typed `cli.Run` whose step returns the scripted losses (state = step count)."""

    def __init__(self, losses):
        self.losses = list(losses)

    def init(self, seed, x):
        return 0

    def update(self, x):
        return lambda state: (state + 1, self.losses[state])


def test_train_keeps_going_over_skipped_steps_and_stops_on_a_run_of_them():
    data = cli.Data(np.zeros((1, 3, 1)), None, np.ones((1, 3), bool), np.zeros((1, 3, 1)),
                    None, np.ones((1, 3), bool), ())
    cfg = cli.FitConfig()
    bad = [1.0, np.nan, np.inf, 0.5] + [0.25] * 2
    state, losses = cli.train(_StubRun(bad), data, cfg, steps=6, progress=False)
    assert state == 6 and np.isnan(losses[1]) and np.isinf(losses[2]) and losses[-1] == 0.25
    assert cli._last_finite(losses) == 0.25 and cli._last_finite([np.nan]) is None
    n = cli.MAX_SKIPPED_IN_A_ROW
    with pytest.raises(cli.CLIError, match=f"{n + 1} steps in a row.*step {n + 2}"):
        cli.train(_StubRun([1.0] + [np.nan] * (n + 5)), data, cfg, steps=n + 5,
                  progress=False)


@pytest.mark.slow  # ~80 s on an idle 2-core machine: an LDS-SVAE, an AR-HMM, an SLDS-SVAE
def test_fit_with_switching_init_resume_evaluate_end_to_end(tmp_path, capsys, monkeypatch):
    """`fit --init arhmm --freeze-networks --natural-step guarded`, `fit --resume`, `evaluate`
    on a tiny run (one process, so the compilations are shared).

    The initialisation runs once (not on resume) and is reported; both stages' optimizers
    get their guide (the guarded step, `SVAEGuide.retract(guarded=True)`); the SLDS steps move
    q(theta) but not the frozen networks; incompatible resumes fail before anything runs;
    the run folder (metrics, report, plots, ArviZ file) is complete; `evaluate` recomputes
    the metrics; a corrupted checkpoint is one clear error line.  (One test instead of two:
    a separate random-start run cost another SLDS compilation; the
    random start of `fit` is the HMM test's below and the LDS stage's here.)"""
    import arviz as az

    from numpyro_svae import optim

    built, original = [], optim.natural_gradient  # the guide each stage's `build` passes

    def recording(**kw):
        built.append(kw.get("guide"))
        return original(**kw)

    monkeypatch.setattr(optim, "natural_gradient", recording)
    data = tmp_path / "tiny.npz"
    _tiny_data(data)
    out = tmp_path / "run"
    opts = ["--dataset", str(data), "--K", "2", "--D", "2", "--hidden", "8",
            "--max-iters", "2", "--fast", "--no-progress", "--out", str(out),
            "--init", "arhmm", "--init-steps", "4", "--freeze-networks", "--warm-start",
            "--natural-step", "guarded"]
    assert cli.main(["fit", "--steps", "2", *opts]) == 0
    capsys.readouterr()
    meta1 = json.loads((out / "checkpoint.json").read_text())
    ck1 = _leaves(out)
    assert meta1["step"] == 2 and ck1["losses"].shape == (2,)
    m1 = json.loads((out / "metrics.json").read_text())
    assert m1["init"] == "arhmm" and m1["init_steps"] == 4 and m1["init_warmup_steps"] == 2
    assert np.isfinite(m1["init_final_loss"])
    cfg = cli.FitConfig(**meta1["config"])
    assert (cfg.init, cfg.init_steps, cfg.freeze_networks) == ("arhmm", 4, True)
    assert cfg.natural_step == "guarded" and cfg.warm_start
    # both stages (LDS-SVAE, SLDS-SVAE) are guarded: their own guide goes to the optimizer
    assert len(built) == 2 and all(g is not None for g in built)
    d = cli.load_data(cfg)
    n, t = d.train_x.shape[:2]  # every step of the training latents is segmented
    assert sum(m1["init_frames_per_regime"]) == n * t
    assert sum(m1["init_transitions_per_regime"]) == n * (t - 1)

    # incompatible resumes fail fast (before any data or compilation) and change nothing
    code, err = _run(capsys, ["fit", "--resume", "--steps", "4", *opts[:2], "--K", "3",
                              *opts[4:]])
    assert code == 2 and "K: checkpoint 2 vs now 3" in err and err.count("\n") == 1
    code, err = _run(capsys, ["fit", "--resume", "--steps", "4", *opts[:-1], "linear"])
    assert code == 2 and "natural_step: checkpoint 'guarded' vs now 'linear'" in err, err
    assert json.loads((out / "checkpoint.json").read_text()) == meta1

    run = cli.build(cfg, d)  # the command's own (cached) run
    template = run.template(cfg.seed, d.train_x)
    p1 = run.svi.get_params(cli.load_checkpoint(out, template, cfg)[0])
    # --warm-start: the SLDS stage's q(k) starts from the AR-HMM segmentation (the stages
    # again, in this process: compiled already; deterministic)
    from numpyro_svae.guide import WARM_START_SITE

    seeded = cli.switching_start(run, d, cfg, progress=False)[0].mutable_state[WARM_START_SITE]
    q = np.asarray(seeded["marginals"])
    assert np.asarray(seeded["valid"]).all()
    np.testing.assert_allclose(q.max(-1), 0.99 + 0.01 / cfg.K, rtol=1e-6)
    per = m1["init_frames_per_regime"] if q.shape[1] == t else m1["init_transitions_per_regime"]
    np.testing.assert_array_equal(np.bincount(q.argmax(-1).ravel(), minlength=cfg.K), per)

    assert cli.main(["fit", "--resume", "--steps", "4", *opts]) == 0
    capsys.readouterr()
    meta2 = json.loads((out / "checkpoint.json").read_text())
    ck2 = _leaves(out)
    assert meta2["step"] == 4 and ck2["losses"].shape == (4,)
    np.testing.assert_array_equal(ck2["losses"][:2], ck1["losses"])  # the trace grows
    assert np.all(np.isfinite(ck2["losses"]))
    # the optimizer's step counter continued (2 -> 4) rather than restarting
    counters = [k for k in ck1 if ck1[k].shape == () and ck1[k].dtype.kind in "iu"]
    assert any(int(ck1[k]) == 2 and int(ck2[k]) == 4 for k in counters)
    assert not list(tmp_path.glob(".run.partial-*"))
    p2 = run.svi.get_params(cli.load_checkpoint(out, template, cfg)[0])
    moved = {k for k in p1 if any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(p1[k]), jax.tree.leaves(p2[k]), strict=True))}
    nets = {k for k in p1 if k.startswith(("encoder", "decoder"))}
    assert nets and not moved & nets  # frozen
    assert any(k.startswith("qtheta$dynamics") for k in moved)  # natural-gradient steps

    # the run folder
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("heldout_bound_per_frame", "impute_rmse", "impute_loglik", "ari",
                 "accuracy", "final_loss"):
        assert np.isfinite(metrics[name]), name
    assert metrics["steps"] == 4 and 1 <= metrics["regimes_used"] <= 2
    assert {k: v for k, v in metrics.items() if k.startswith("init")} == {
        k: v for k, v in m1.items() if k.startswith("init")}  # carried over, not run again
    report = (out / "report.md").read_text()
    assert "heldout_bound_per_frame" in report and "steps=4" in report
    assert "init=arhmm (init_steps=4, freeze_networks=True)" in report
    assert "natural_step=guarded" in report and "warm_start=True" in report
    for png in ("elbo.png", "reconstruction.png", "regimes.png", "transition_matrix.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"({png})" in report
    idata = az.from_netcdf(str(out / "posterior.nc"))
    assert "posterior" in idata.groups() or "posterior" in getattr(idata, "children", {})
    assert idata["sample_stats"]["loss"].shape == (4,)

    # evaluate recomputes the same held-out metrics
    code = cli.main(["evaluate", str(out)])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0
    for name in ("heldout_bound_per_frame", "impute_rmse", "ari", "accuracy"):
        np.testing.assert_allclose(printed[name], metrics[name], rtol=1e-5)

    # a corrupted checkpoint: one clear line, exit 2, for evaluate and for resume
    p = out / "checkpoint.npz"
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    p.write_bytes(bytes(raw))
    for argv in (["evaluate", str(out)], ["fit", "--resume", "--steps", "6", *opts]):
        code, err = _run(capsys, argv)
        assert code == 2 and "corrupted" in err and err.count("\n") == 1, argv
        assert "Traceback" not in err
    assert (out / "report.md").exists() and not list(tmp_path.glob(".run.partial-*"))


@pytest.mark.slow  # ~60 s on a loaded 2-core machine, mostly XLA compilation
def test_fit_hmm_family_end_to_end(tmp_path, capsys):
    """`fit --family hmm`: training, held-out evaluation (imputation, importance-weighted
    bound), ArviZ export with regime draws, plots and the report."""
    import arviz as az

    data = tmp_path / "tiny.npz"
    _tiny_data(data)
    out = tmp_path / "run"
    code = cli.main(["fit", "--family", "hmm", "--steps", "2", "--dataset", str(data),
                     "--K", "2", "--D", "2", "--hidden", "8", "--max-iters", "2", "--fast",
                     "--no-progress", "--out", str(out)])
    capsys.readouterr()
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "hmm_svae"
    for name in ("heldout_bound_per_frame", "impute_rmse", "impute_loglik", "ari",
                 "accuracy", "final_loss"):
        assert np.isfinite(metrics[name]), name
    assert 1 <= metrics["regimes_used"] <= 2
    report = (out / "report.md").read_text()
    assert "HMM-SVAE" in report and "family=hmm" in report
    for png in ("elbo.png", "reconstruction.png", "regimes.png", "transition_matrix.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    idata = az.from_netcdf(str(out / "posterior.nc"))
    k = idata["posterior"]["k"]  # one regime per step for an HMM: [chain, draw, N, T]
    assert k.dims[-2:] == ("sequence", "regime_step") and k.shape[-1] == 20
    assert {"mu", "Sigma", "P", "pi0"} <= set(idata["posterior"].data_vars)


def test_switching_init_options_are_checked_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "run"
    for argv, msg in (
            (["--family", "lds", "--init", "arhmm"], "--init arhmm needs --family slds"),
            (["--freeze-networks"], "--freeze-networks needs --init arhmm"),
            (["--init", "arhmm", "--init-steps", "0"], "--init-steps must be >= 1"),
            (["--window", "50"], "--window applies to --dataset mocap6 only"),
            (["--family", "hmm", "--warm-start"], "--warm-start needs --family slds"),
            (["--K", "1", "--warm-start"], "--warm-start needs --family slds with --K >= 2")):
        code, err = _run(capsys, ["fit", "--dataset", str(tmp_path / "nothing.npz"),
                                  "--out", str(out), *argv])
        assert code == 2 and msg in err and err.count("\n") == 1, (argv, err)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_natural_step_is_checked_also_for_configs_built_in_code():
    from numpyro_svae import optim

    assert cli.NATURAL_STEPS == optim.NATURAL_STEPS
    cli._check_config(cli.FitConfig(natural_step="exact"))
    with pytest.raises(cli.CLIError, match="--natural-step must be one of linear, exact, guarded; "
                                           "got 'exactly'"):
        cli._check_config(cli.FitConfig(natural_step="exactly"))


def test_natgrad_schedule_decays_over_the_run_steps_and_not_in_the_init_stage(
        tmp_path, capsys, monkeypatch):
    """`--natgrad-schedule cosine`: the rate falls from --natgrad-lr to 0 over --steps (the
    SLDS steps after --init arhmm; the LDS-SVAE stage keeps a constant rate); a resume to
    more steps builds the longer decay; a resume with the other schedule is refused."""
    cli._check_config(cli.FitConfig(natgrad_schedule="cosine"))
    with pytest.raises(cli.CLIError, match="--natgrad-schedule must be one of constant, "
                                           "cosine; got 'linear'"):
        cli._check_config(cli.FitConfig(natgrad_schedule="linear"))
    assert cli.natgrad_rate(cli.FitConfig(natgrad_lr=0.05)) == {"natgrad_lr": 0.05}
    cfg = cli.FitConfig(family="slds", K=2, D=2, hidden=4, natgrad_lr=0.05, steps=10,
                        natgrad_schedule="cosine", init="arhmm", init_steps=7)
    sched = cli.natgrad_rate(cfg)["schedule"]
    np.testing.assert_allclose([float(sched(i)) for i in (0, 5, 10, 25)],
                               [0.05, 0.025, 0.0, 0.0], atol=1e-8)
    stage = cli.init_stage_config(cfg)
    assert (stage.family, stage.K, stage.steps, stage.init, stage.freeze_networks,
            stage.natgrad_schedule) == ("lds", 1, 7, "random", False, "constant")
    assert cfg.identity()["natgrad_schedule"] == "cosine"  # part of the resume check

    from numpyro_svae import optim

    rates, original = [], optim.natural_gradient

    def recording(**kw):
        rates.append(kw.get("schedule", kw.get("natgrad_lr")))
        return original(**kw)

    monkeypatch.setattr(optim, "natural_gradient", recording)
    path = tmp_path / "tiny.npz"
    _tiny_data(path)
    cfg = dataclasses.replace(cfg, dataset=str(path))
    data = cli.load_data(cfg)
    run10 = cli.build(cfg, data)
    assert cli.build(cfg, data) is run10 and len(rates) == 1  # cached
    run20 = cli.build(dataclasses.replace(cfg, steps=20), data)  # a resume to 20 steps
    assert run20 is not run10 and float(rates[-1](10)) == pytest.approx(0.025)
    cli.build(dataclasses.replace(cfg, natgrad_schedule="constant", steps=30), data)
    assert rates[-1] == 0.05

    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.npz").write_bytes(b"state")
    (out / "checkpoint.json").write_text(json.dumps(
        {"version": cli.CHECKPOINT_VERSION, "sha256": hashlib.sha256(b"state").hexdigest(),
         "config": dataclasses.asdict(cfg)}))
    cli.check_checkpoint(out, dataclasses.replace(cfg, steps=40))  # more steps: compatible
    with pytest.raises(cli.CLIError, match="natgrad_schedule: checkpoint 'cosine' vs now "
                                           "'constant'"):
        cli.check_checkpoint(out, dataclasses.replace(cfg, natgrad_schedule="constant"))


def test_mocap6_training_windows_keep_the_held_out_trial_whole(mocap6_path):
    whole = cli.load_data(cli.FitConfig(dataset="mocap6", data_path=str(mocap6_path)))
    win = cli.load_data(cli.FitConfig(dataset="mocap6", data_path=str(mocap6_path),
                                      window=100))
    assert win.train_x.shape[1:] == (100, whole.train_x.shape[2])
    assert win.train_x.shape[0] > whole.train_x.shape[0]
    assert win.train_mask.all() and win.train_labels.shape == win.train_x.shape[:2]
    np.testing.assert_array_equal(win.test_x, whole.test_x)
    np.testing.assert_array_equal(win.test_mask, whole.test_mask)


def test_xla_cpu_defaults_are_added_before_backends_exist_and_respect_the_user(monkeypatch):
    from jax._src import xla_bridge

    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=true --xla_foo=1")
    assert cli._set_xla_cpu_defaults()
    flags = os.environ["XLA_FLAGS"].split()
    assert flags == ["--xla_cpu_use_fusion_emitters=true", "--xla_foo=1"]
    monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1")
    assert cli._set_xla_cpu_defaults()
    assert os.environ["XLA_FLAGS"].split() == ["--xla_foo=1", *cli.XLA_CPU_DEFAULTS]
    monkeypatch.delenv("XLA_FLAGS")
    assert cli._set_xla_cpu_defaults()
    assert os.environ["XLA_FLAGS"].split() == list(cli.XLA_CPU_DEFAULTS)
    # once JAX has its backends, XLA will not read the variable again: leave it alone
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1")
    assert not cli._set_xla_cpu_defaults()
    assert os.environ["XLA_FLAGS"] == "--xla_foo=1"

"""`numpyro_svae.fit` (module `fitting`): staged training, stopping rule, restarts, input checks."""

import warnings

import jax
import numpy as np
import pytest

from numpyro_svae import models
from numpyro_svae.datasets.synthetic import synthetic_slds
from numpyro_svae.fit_stages import run_stage
from numpyro_svae.fitting import FitWarning, Stage, best_restart, fit, plateaued

N, T, DX, K, D = 6, 30, 3, 2, 2
KW = dict(K=K, D=D, hidden=(8,))


@pytest.fixture(scope="module")
def x():
    d = synthetic_slds(0, num_sequences=N, num_timesteps=T, num_regimes=K, latent_dim=D,
                       obs_dim=DX)
    return 3.0 * np.asarray(d.x, np.float32) + 5.0  # not standardised: fit does it


# ------------------------------------------------------------------------------------------
# pure pieces
# ------------------------------------------------------------------------------------------


def _plateau_curve(n_fall=200, n_flat=300, seed=0):
    rng = np.random.default_rng(seed)
    fall = 10.0 + 5.0 * np.exp(-np.arange(n_fall) / 20.0)
    return np.concatenate([fall, np.full(n_flat, fall[-1])]) + 0.01 * rng.normal(
        size=n_fall + n_flat)


def test_plateaued_stops_on_a_plateau_and_not_while_falling():
    losses = _plateau_curve()
    stops = [s for s in range(1, len(losses) + 1) if plateaued(losses[:s], 20, 1e-3)]
    assert stops, "the rule never fired on a flat tail"
    first = stops[0]
    assert 100 < first < 260  # after the fall has flattened, well before the end
    falling = 10.0 + 5.0 * np.exp(-np.arange(100) / 200.0)  # slow steady fall
    assert not plateaued(falling, 20, 1e-3)
    assert not plateaued(losses[:39], 20, 1e-3)  # fewer than 2 windows
    rising = np.linspace(1.0, 2.0, 40)
    assert plateaued(rising, 20, 1e-3)  # no improvement at all
    with_nan = losses[:first].copy()
    with_nan[-5:] = np.nan  # skipped steps are left out, not propagated
    assert plateaued(with_nan, 20, 1e-3)
    with pytest.raises(ValueError, match="window"):
        plateaued(losses, 0, 1e-3)


def test_run_stage_stops_early_on_a_plateau_and_after_steps_keep_failing():
    curve = iter(_plateau_curve() * 90.0)  # total loss of 90 frames

    def step(state, w):
        return state + 1, next(curve)

    state, losses, s = run_stage(step, 0, Stage(max_steps=500, window=20, tol=1e-3),
                                 name="train", frames=90, progress=False)
    assert s.stop_reason == "converged" and s.steps == state == len(losses) < 300
    np.testing.assert_allclose(s.final_loss, np.mean(losses[-20:]))
    _, _, s = run_stage(step, 0, Stage(max_steps=30, window=20), name="t", frames=90,
                        progress=False)
    assert s.stop_reason == "max_steps" and s.steps == 30
    weights = []

    def nan_step(state, w):
        weights.append(float(w))
        return state, float("nan") if len(weights) > 3 else 1.0

    with pytest.raises(RuntimeError, match="standardised"):
        run_stage(nan_step, 0, Stage(max_steps=100, kl_warmup=0.02, kl_weight=0.1), name="w",
                  frames=1, progress=False, max_bad_steps=5)
    assert len(weights) == 8  # 3 good steps, then 5 bad ones in a row
    np.testing.assert_allclose(weights[:3], [0.1, 0.1, 1.0])  # 2 KL warm-up steps


def test_best_restart_picks_the_largest_finite_validation_elbo():
    assert best_restart([-5.0, np.nan, -4.2, -4.5]) == 2
    assert best_restart([-1.0]) == 0
    with pytest.raises(ValueError, match="finite"):
        best_restart([np.nan, np.nan])


# ------------------------------------------------------------------------------------------
# bad input: clear errors before any compilation
# ------------------------------------------------------------------------------------------


def test_bad_inputs_raise_value_errors_naming_the_argument(x):
    slds = models.slds_model
    bad = x.copy()
    bad[1, 4, 0] = np.nan
    with pytest.raises(ValueError, match="`x` has NaN"):
        fit(slds, bad, model_kwargs=KW, progress=False)
    mask = np.ones((N, T), bool)
    mask[2, 5] = False
    bad[2, 5, 1] = np.nan
    with pytest.raises(ValueError, match="`x` has NaN"):  # [1, 4] is still observed
        fit(slds, bad, model_kwargs=KW, mask=mask, progress=False)
    with pytest.raises(ValueError, match="`x` must be"):
        fit(slds, x[None], model_kwargs=KW, progress=False)
    with pytest.raises(ValueError, match="T >= 2"):
        fit(slds, x[:, :1], model_kwargs=KW, progress=False)
    with pytest.raises(ValueError, match="calling the model with `x` of shape"):
        fit(slds, x[:, 0], model_kwargs=KW, progress=False)
    with pytest.raises(ValueError, match="`val_fraction`"):
        fit(slds, x, model_kwargs=KW, val_fraction=0.1, progress=False)
    with pytest.raises(ValueError, match="`mask` must have shape"):
        fit(slds, x, model_kwargs=KW, mask=np.ones((N, T + 1), bool), progress=False)
    with pytest.raises(ValueError, match="init`='arhmm' needs a model with regimes"):
        fit(models.lds_model, x, model_kwargs=dict(D=D, hidden=(8,)), init="arhmm",
            progress=False)
    with pytest.raises(ValueError, match="`restarts`"):
        fit(slds, x, model_kwargs=KW, restarts=2, val_fraction=0.0, progress=False)
    with pytest.raises(ValueError, match="kl_warmup"):
        fit(slds, x, model_kwargs=KW, warmup=Stage(kl_warmup=1.0), progress=False)
    with pytest.raises(ValueError, match=r"model_kwargs\['T'\]"):
        fit(slds, x, model_kwargs=dict(KW, T=T + 1), progress=False)


# ------------------------------------------------------------------------------------------
# whole fits
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_fit_of_an_slds_runs_every_stage_and_keeps_the_best_restart(x):
    mask = np.ones((N, T), bool)
    mask[0, 10:14] = False
    xm = x.copy()
    xm[0, 10:14] = np.nan  # missing entries may hold NaN
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fit(models.slds_model, xm, model_kwargs=KW, mask=mask, key=0, progress=False)
    s = res.summary
    assert [st.name for st in s.stages] == ["warmup", "switch", "train"]
    assert s.init == "arhmm"
    for st in s.stages:
        assert st.stop_reason in ({"init"} if st.name == "switch" else
                                  {"converged", "max_steps"})
        assert np.isfinite(st.final_loss)
    assert sum(frames for frames in s.stages[1].info["frames_per_regime"]) == (N - 1) * T
    assert len(res.losses) == sum(st.steps for st in s.stages)
    assert s.stages[2].start == s.stages[0].steps
    leaves = jax.tree.leaves(res.params)
    assert leaves and all(np.all(np.isfinite(np.asarray(a))) for a in leaves)
    # restarts: the chosen one has the best validation ELBO
    assert len(s.restarts) == 2
    scores = [r.val_elbo for r in s.restarts]
    assert np.all(np.isfinite(scores)) and s.chosen == best_restart(scores)
    assert s.val_elbo == scores[s.chosen] and s.stages == s.restarts[s.chosen].stages
    assert np.isfinite(s.baseline) and s.regimes_used in (1, 2)
    assert len(s.val_index) == 1 and len(s.train_index) == N - 1
    # standardised with the training sequences' statistics
    tr = xm[s.train_index][mask[s.train_index]]
    np.testing.assert_allclose(res.mean, tr.mean(0), rtol=1e-4)
    np.testing.assert_allclose(res.std, tr.std(0), rtol=1e-4)
    assert res.model_kwargs["N"] == N - 1 and res.model_kwargs["mask"].shape == (N - 1, T)
    raised = [str(w.message) for w in caught if issubclass(w.category, FitWarning)]
    assert set(raised) == set(s.warnings)
    post = res.guide.posterior(res.params, res.transform(np.nan_to_num(xm)), mask=mask,
                               **dict(KW, N=N, T=T, Dx=DX))
    assert post.regime_marginals.shape == (N, T, K)


@pytest.mark.slow
def test_lds_runs_only_the_stages_that_apply(x):
    res = fit(models.lds_model, x, model_kwargs=dict(D=D, hidden=(8,)), restarts=1,
              warmup=Stage(max_steps=40, kl_warmup=0.5, window=10),
              train=Stage(max_steps=40, natgrad_schedule="cosine", window=10), progress=False)
    s = res.summary
    assert [st.name for st in s.stages] == ["warmup", "train"]
    assert s.init == "random" and s.regimes_used is None
    assert len(s.restarts) == 1 and s.chosen == 0 and np.isfinite(s.val_elbo)
    assert len(res.losses) == sum(st.steps for st in s.stages) <= 80
    assert np.all(np.isfinite(res.losses))
    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(res.params))

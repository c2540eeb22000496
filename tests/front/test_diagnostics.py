"""Tests of `numpyro_svae.diagnostics`: ArviZ export (summary, forest plot, NetCDF round
trip) on the linear-Gaussian LDS of `test_predict`, and the matplotlib helpers."""

from functools import partial

import arviz as az
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure

from numpyro_svae.diagnostics import (
    plot_elbo,
    plot_imputation,
    plot_reconstruction,
    plot_regimes,
    plot_transition_matrix,
    to_inference_data,
)
from numpyro_svae.expfam.dirichlet import DirichletStandard
from numpyro_svae.guide import SVAEGuide
from numpyro_svae.predict import Imputation
from tests.front.test_predict import (
    exact_encoder,
    lg_model,
    lg_params,
    simulate,
    slds_problem,  # noqa: F401  (module fixture)
)


@pytest.fixture(scope="module")
def idata_problem():
    N, T = 4, 6
    x = jnp.asarray(simulate(np.random.default_rng(1), N, T), jnp.float32)
    guide = SVAEGuide(partial(lg_model, N=N, T=T), encoder=exact_encoder,
                      encoder_params={"g": jnp.ones(())})
    params = lg_params(guide, x, N, T)
    return dict(N=N, T=T, x=x, guide=guide, params=params)


def test_to_inference_data_summary_forest_and_netcdf_round_trip(idata_problem, tmp_path):
    p = idata_problem
    N, T, S = p["N"], p["T"], 50
    mask = np.ones((N, T), bool)
    mask[:, 2] = False
    losses = np.linspace(10.0, 1.0, 30)
    idata = to_inference_data(p["guide"], p["params"], p["x"], num_draws=S,
                              rng_key=jax.random.key(0), losses=losses, mask=jnp.asarray(mask))
    groups = set(idata.groups())
    assert {"posterior", "posterior_predictive", "observed_data", "sample_stats",
            "constant_data", "variational"} <= groups
    post = idata.posterior
    assert post["Q"].shape == (1, S, 2, 2) and post["Ab"].shape == (1, S, 2, 3)
    assert post["z"].dims == ("chain", "draw", "sequence", "time", "latent")
    assert "k" not in post  # an LDS has no regime chain
    assert idata.posterior_predictive["x"].shape == (1, S, N, T, 2)
    np.testing.assert_allclose(idata.observed_data["x"].values[mask], np.asarray(p["x"])[mask])
    np.testing.assert_array_equal(idata.sample_stats["loss"].values, losses)
    assert idata.variational["latent_mean"].shape == (N, T, 2)
    # q(theta) is concentrated at the truth: the draws of Q average to it
    np.testing.assert_allclose(post["Q"].values.mean((0, 1)), np.diag([0.3, 0.2]), atol=5e-3)

    summary = az.summary(idata, var_names=["Q", "m0"], kind="stats")
    assert summary.shape[0] == 4 + 2 and np.all(np.isfinite(summary["mean"].values))
    assert az.summary(idata, var_names=["Ab"]).shape[0] == 6
    axes = az.plot_forest(idata, var_names=["m0"])
    fig = axes.ravel()[0].figure
    fig.savefig(tmp_path / "forest.png")
    plt.close(fig)

    path = tmp_path / "idata.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    assert set(back.groups()) == groups
    np.testing.assert_array_equal(back.posterior["Q"].values, post["Q"].values)
    np.testing.assert_array_equal(back.variational["latent_sd"].values,
                                  idata.variational["latent_sd"].values)


def test_plots_return_figures_and_save_pngs(tmp_path):
    rng = np.random.default_rng(0)
    N, T, Dx, K, S = 2, 30, 3, 3, 20
    q = rng.dirichlet(np.ones(K), size=(N, T))
    truth = np.argmax(q, -1)
    truth[:, :2] = -1  # padding
    x = rng.normal(size=(N, T, Dx))
    mask = np.ones((N, T, Dx), bool)
    mask[:, 10:15] = False
    samples = x[None] + 0.1 * rng.normal(size=(S, N, T, Dx))
    imp = Imputation(samples, samples.mean(0), np.quantile(samples, 0.05, 0),
                     np.quantile(samples, 0.95, 0), x, np.zeros((S, N, T), np.int32),
                     np.zeros((S, N, T, 2)), mask)
    alpha = rng.uniform(0.5, 5.0, size=(K, K))
    made = {
        "regimes": plot_regimes(q, truth, sequence=1, path=tmp_path / "regimes.png"),
        "regimes_plain": plot_regimes(q[0], path=tmp_path / "regimes_plain.png"),
        "recon": plot_reconstruction(x, imp.mean, lower=imp.lower, upper=imp.upper,
                                     path=tmp_path / "recon.png"),
        "impute": plot_imputation(x, imp, x_true=x, channels=[0, 2],
                                  path=tmp_path / "impute.png"),
        "elbo": plot_elbo(np.linspace(5, 1, 200) + rng.normal(size=200) * 0.1,
                          path=tmp_path / "elbo.png"),
        "trans": plot_transition_matrix(DirichletStandard(alpha), path=tmp_path / "trans.png"),
    }
    for name, fig in made.items():
        assert isinstance(fig, Figure)
        png = tmp_path / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # E[P] of a Dirichlet q: rows of alpha normalised
    assert isinstance(plot_transition_matrix(alpha / alpha.sum(-1, keepdims=True)), Figure)


def test_plot_validation_errors():
    with pytest.raises(ValueError, match="`P`"):
        plot_transition_matrix(np.ones((2, 3)))
    with pytest.raises(ValueError, match="`channels`"):
        plot_reconstruction(np.zeros((5, 2)), np.zeros((5, 2)), channels=[3])
    with pytest.raises(ValueError, match="`sequence`"):
        plot_regimes(np.full((2, 4, 3), 1 / 3), sequence=5)
    with pytest.raises(ValueError, match="`losses`"):
        plot_elbo([])


@pytest.mark.slow
def test_to_inference_data_slds_has_regimes_and_expected_P(slds_problem, tmp_path):  # noqa: F811
    p = slds_problem
    N, T, K, S = p["N"], p["T"], p["K"], 20
    idata = to_inference_data(p["guide"], p["params"], p["x"], num_draws=S,
                              rng_key=jax.random.key(5), posterior_predictive=False)
    assert "posterior_predictive" not in idata.groups()
    assert idata.posterior["k"].shape == (1, S, N, T)  # leading-regime layout: Tk = T
    assert idata.posterior["P"].shape == (1, S, K, K)
    EP = idata.variational["expected_P"].values
    np.testing.assert_allclose(EP.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(idata.posterior["P"].values.mean((0, 1)), EP, atol=0.25)
    marg = idata.variational["regime_marginals"].values
    assert marg.shape == (N, T, K)
    assert isinstance(plot_transition_matrix(idata, path=tmp_path / "P.png"), Figure)
    assert isinstance(plot_regimes(marg, path=tmp_path / "r.png"), Figure)
    assert np.isfinite(az.summary(idata, var_names=["P"], kind="stats")["mean"]).all()

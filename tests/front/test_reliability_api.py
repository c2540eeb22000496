"""Reliability of the public API: non-finite parameters and data are refused with clear
errors on eager calls, the encoder's default key, and the plots' padding and colours.

Tiny SLDS (N = 2, T = 6, K = 2, D = 2, Dx = 3) with freshly initialised parameters; the
refusals happen before any compilation, so these tests are quick.
"""

from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib.colors import to_rgba
from numpyro import handlers

import numpyro_svae.guide as guide_module
from numpyro_svae import models
from numpyro_svae.diagnostics import _regime_color, plot_reconstruction, plot_regimes
from numpyro_svae.guide import SVAEGuide, check_finite_params
from numpyro_svae.metrics import gaussian_masked_loglik, masked_rmse
from numpyro_svae.nn import GaussianPotentialEncoder
from numpyro_svae.predict import forecast, importance_weighted_bound, impute

N, T, K, D, DX = 2, 6, 2, 2, 3


@pytest.fixture(scope="module")
def tiny():
    model = partial(models.slds_model, N=N, T=T, Dx=DX, K=K, D=D, hidden=(4,))
    enc = GaussianPotentialEncoder(obs_dim=DX, latent_dim=D, hidden=(4,), key=jax.random.key(1))
    guide = SVAEGuide(model, encoder=enc)
    x = jax.random.normal(jax.random.key(0), (N, T, DX))
    st = guide._setup((x,), {})
    with handlers.seed(rng_seed=0):
        tr = handlers.trace(lambda: (guide._qtheta(st), guide._encoder_fn())).get_trace()
    with handlers.seed(rng_seed=1):
        mtr = handlers.trace(model).get_trace(x)
    params = {k: s["value"] for t in (tr, mtr) for k, s in t.items() if s["type"] == "param"}
    return dict(guide=guide, x=x, params=params)


def _entry_points(guide, x):
    key = jax.random.key(0)
    return {
        "SVAEGuide.posterior": lambda p, xx=x: guide.posterior(p, xx),
        "SVAEGuide.sample_posterior": lambda p, xx=x: guide.sample_posterior(key, p, xx),
        "impute": lambda p, xx=x: impute(guide, p, xx, num_samples=2, rng_key=key),
        "forecast": lambda p, xx=x: forecast(guide, p, xx, horizon=2, num_samples=2,
                                             rng_key=key),
        "importance_weighted_bound": lambda p, xx=x: importance_weighted_bound(
            guide, p, xx, num_samples=2, rng_key=key),
    }


def test_nonfinite_params_refused_with_sites_named(tiny):
    params = tiny["params"]
    site = "qtheta$dynamics.M"
    bad = dict(params, **{site: params[site].at[0, 0, 0].set(jnp.nan)})
    # an inf inside the encoder's parameter pytree is found too
    enc = params["encoder$params"]
    leaves, treedef = jax.tree_util.tree_flatten(enc)
    leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.inf)
    bad["encoder$params"] = jax.tree_util.tree_unflatten(treedef, leaves)
    for caller, fn in _entry_points(tiny["guide"], tiny["x"]).items():
        with pytest.raises(ValueError) as err:
            fn(bad)
        msg = str(err.value)
        assert msg.startswith(caller), msg
        assert site in msg and "encoder$params" in msg, msg
        assert "qtheta$P.u" not in msg  # finite sites are not blamed
        assert "diverged" in msg and "skipped_steps" in msg, msg
        assert "contains NaN" not in msg  # not the internal error


def test_params_check_is_silent_on_traced_values_and_absent_from_training(tiny, monkeypatch):
    params = tiny["params"]
    bad = dict(params, **{"qtheta$P.u": params["qtheta$P.u"] * jnp.nan})
    # under the caller's jit nothing is concrete: nothing can be (or is) raised
    out = jax.jit(lambda p: (check_finite_params(p, "f"), p["qtheta$P.u"])[1])(bad)
    assert not np.all(np.isfinite(np.asarray(out)))
    # SVI's traced guide calls do not run the check at all
    calls = []
    monkeypatch.setattr(guide_module, "check_finite_params",
                        lambda p, c: calls.append(c))
    guide, x = tiny["guide"], tiny["x"]

    def traced(p):
        with handlers.trace() as tr, handlers.seed(rng_seed=0), handlers.substitute(data=p):
            guide(x)
        return {n: s["value"] for n, s in tr.items() if s["type"] == "sample"}

    jax.eval_shape(traced, params)
    assert calls == []


def test_nan_at_observed_entry_refused_naming_argument_and_index(tiny):
    guide, params = tiny["guide"], tiny["params"]
    x_bad = tiny["x"].at[1, 2, 0].set(jnp.nan)
    for caller, fn in _entry_points(guide, x_bad).items():
        with pytest.raises(ValueError, match="sequence 1, step 2, dim 0") as err:
            fn(params)
        msg = str(err.value)
        if caller.startswith("SVAEGuide"):
            assert "observed site 'x'" in msg, msg
        else:
            assert "`x`" in msg and "mask" in msg, msg


def test_nan_at_masked_entry_is_accepted(tiny):
    guide, params = tiny["guide"], tiny["params"]
    x_bad = tiny["x"].at[1, 2, 0].set(jnp.nan)
    mask = np.ones((N, T, DX), bool)
    mask[1, 2, 0] = False
    post = guide.posterior(params, x_bad, mask=jnp.asarray(mask))
    assert np.all(np.isfinite(np.asarray(post.latent_mean)))


def test_encoder_key_defaults_to_key_zero():
    a = GaussianPotentialEncoder(obs_dim=DX, latent_dim=D, hidden=(4,))
    b = GaussianPotentialEncoder(obs_dim=DX, latent_dim=D, hidden=(4,), key=jax.random.key(0))
    c = GaussianPotentialEncoder(obs_dim=DX, latent_dim=D, hidden=(4,), key=jax.random.key(3))
    la, lb, lc = (jax.tree_util.tree_leaves(eqx.filter(e, eqx.is_array)) for e in (a, b, c))
    assert all(np.array_equal(u, v) for u, v in zip(la, lb, strict=True))
    assert not all(np.array_equal(u, v) for u, v in zip(la, lc, strict=True))


def test_metrics_score_only_entries_where_mask_is_false():
    x = np.zeros((T, DX))
    pred = np.zeros((T, DX))
    pred[0] = 100.0  # a huge error at an observed frame: not scored
    pred[3, 1] = 2.0  # the one held-out entry
    mask = np.ones((T, DX), bool)
    mask[3, 1] = False
    assert masked_rmse(x, pred, mask) == pytest.approx(2.0)
    assert gaussian_masked_loglik(x, pred, 1.0, mask) == pytest.approx(
        -0.5 * (np.log(2 * np.pi) + 4.0))


def test_reconstruction_plot_skips_padding_and_unobserved_data():
    rng = np.random.default_rng(0)
    x, recon = rng.normal(size=(N, T, DX)), rng.normal(size=(N, T, DX))
    mask = np.ones((N, T), bool)
    mask[1, 4:] = False  # sequence 1 has length 4, then padding
    entry = np.broadcast_to(mask[..., None], x.shape).copy()
    entry[1, 1, 0] = False  # one missing entry inside the sequence
    fig = plot_reconstruction(x, recon, lower=recon - 1, upper=recon + 1, sequence=1,
                              mask=entry, channels=[0, 1])
    for c, ax in zip([0, 1], fig.axes, strict=True):
        data, rec = ax.lines
        assert len(data.get_xdata()) == 4 and len(rec.get_xdata()) == 4
        np.testing.assert_allclose(rec.get_ydata(), recon[1, :4, c])
        want = x[1, :4, c].copy()
        if c == 0:
            want[1] = np.nan  # not drawn as data
        np.testing.assert_allclose(np.asarray(data.get_ydata(), float), want)
        band = ax.collections[0].get_paths()[0].vertices
        assert band[:, 0].max() <= 3


def test_regimes_plot_skips_padding_and_colours_agree_across_panels():
    Tk = T  # leading-regime form: one regime variable per step
    q = np.full((Tk, K), 0.1)
    q[[0, 1, 2], 0] = q[[3, 4, 5], 1] = 0.9
    truth = np.array([1, 1, 1, 0, 0, -1])  # regimes swapped: matching maps 0 -> 1, 1 -> 0
    mask = np.ones((T, DX), bool)
    mask[5:] = False  # the last step is padding
    fig = plot_regimes(q, truth, mask=mask)
    ribbon_ax, bands_ax = fig.axes
    img = np.asarray(ribbon_ax.images[0].get_array())
    assert img.shape[:2] == (2, 5)  # two rows, padding cut
    bands = bands_ax.collections
    assert len(bands) == K
    for poly in bands:
        assert poly.get_paths()[0].vertices[:, 0].max() <= 4
    pred = np.argmax(q[:5], -1)
    for t in range(5):
        # the ribbon's predicted row has the colour of that regime's q(k) band ...
        np.testing.assert_allclose(img[0, t], bands[pred[t]].get_facecolor()[0])
        # ... and, matched, that of the true label it stands for
        np.testing.assert_allclose(img[1, t], to_rgba(_regime_color(truth[t])))
    np.testing.assert_allclose(bands[0].get_facecolor()[0], _regime_color(1))
    # without matching every panel uses the regime's own index
    fig = plot_regimes(q, truth, mask=mask, match=False)
    bands = fig.axes[1].collections
    for k in range(K):
        np.testing.assert_allclose(bands[k].get_facecolor()[0], _regime_color(k))

"""Classical baselines (dynamax Gaussian HMM / AR-HMM) on small synthetic data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("dynamax", reason="dynamax is an optional oracle / baseline dependency")

from dynamax.hidden_markov_model import hmm_smoother  # noqa: E402

from numpyro_svae.baselines import (  # noqa: E402
    fit_arhmm,
    fit_gaussian_hmm,
    heldout_loglik_per_frame,
    impute,
    interpolate,
    posterior_marginals,
    segment,
)
from numpyro_svae.metrics import random_gap_mask, segmentation_accuracy  # noqa: E402
from tests._tol import tol  # noqa: E402

N, T, DX, K = 4, 100, 3, 2


def _sticky_states(rng, stay=0.95):
    """Two-state sticky Markov chains [N, T] (numpy: no compilation)."""
    z = np.zeros((N, T), dtype=np.int64)
    z[:, 0] = rng.integers(0, K, N)
    for t in range(1, T):
        switch = rng.random(N) > stay
        z[:, t] = np.where(switch, 1 - z[:, t - 1], z[:, t - 1])
    return z


@pytest.fixture(scope="module")
def hmm_data():
    """States [N, T] and emissions [N, T, Dx] of a well-separated sticky 2-state Gaussian HMM."""
    rng = np.random.default_rng(11)
    z = _sticky_states(rng)
    means = np.array([[2.0, 2.0, 0.0], [-2.0, -2.0, 0.0]])
    x = means[z] + rng.normal(size=(N, T, DX))
    return z, x.astype(np.float32)


@pytest.fixture(scope="module")
def ar_data():
    """States and emissions of a 2-regime AR(1) HMM whose regimes differ in drift:
    x_t = 0.8 x_{t-1} + b_{z_t} + 0.3 eps_t, b = +-1."""
    rng = np.random.default_rng(13)
    z = _sticky_states(rng)
    b = np.array([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    x = np.zeros((N, T, DX))
    prev = np.zeros((N, DX))
    for t in range(T):
        prev = 0.8 * prev + b[z[:, t]] + np.sqrt(0.1) * rng.normal(size=(N, DX))
        x[:, t] = prev
    return z, x.astype(np.float32)


@pytest.fixture(scope="module")
def hmm_fit(hmm_data):
    return fit_gaussian_hmm(hmm_data[1], K, key=jax.random.key(0), num_iters=15)


@pytest.fixture(scope="module")
def ar_fit(ar_data):
    return fit_arhmm(ar_data[1], K, key=jax.random.key(1), num_lags=1, num_iters=15)


def test_gaussian_hmm_segmentation_matches_true_states(hmm_data, hmm_fit):
    z, x = hmm_data
    labels = segment(hmm_fit, x)
    assert labels.shape == (N, T)
    assert segmentation_accuracy(labels, z, num_pred=K, num_true=K) > 0.9
    marg = posterior_marginals(hmm_fit, x)
    assert marg.shape == (N, T, K)
    np.testing.assert_allclose(marg.sum(-1), 1.0, **tol(marg.dtype))
    assert hmm_fit.log_probs.shape == (15,)


def test_arhmm_segmentation_matches_true_states(ar_data, ar_fit):
    z, x = ar_data
    labels = segment(ar_fit, x)
    assert labels.shape == (N, T)
    assert segmentation_accuracy(labels, z, num_pred=K, num_true=K) > 0.9


def test_heldout_loglik_matches_dynamax_marginal_log_prob(hmm_data, hmm_fit, ar_data, ar_fit):
    x = jnp.asarray(hmm_data[1])
    lp = jax.vmap(lambda xn: hmm_fit.model.marginal_log_prob(hmm_fit.params, xn))(x)
    expected = float(lp.sum() / (N * T))
    assert heldout_loglik_per_frame(hmm_fit, x) == pytest.approx(expected, rel=tol(x.dtype)["rtol"])

    # AR-HMM: dynamax's own lagged inputs, with the pre-sample frame = the first frame
    x = jnp.asarray(ar_data[1])
    model = ar_fit.model
    lp = jax.vmap(
        lambda xn: model.marginal_log_prob(
            ar_fit.params, xn, inputs=model.compute_inputs(xn, prev_emissions=xn[:1])
        )
    )(x)
    expected = float(lp.sum() / (N * T))
    assert heldout_loglik_per_frame(ar_fit, x) == pytest.approx(expected, rel=tol(x.dtype)["rtol"])


def test_gaussian_hmm_impute_matches_dynamax_smoother(hmm_data, hmm_fit):
    _, x = hmm_data
    mask = random_gap_mask(5, N, T, num_gaps=2)
    x_nan = np.where(mask[..., None], x, np.nan)
    xhat = impute(hmm_fit, x_nan, mask)
    assert xhat.shape == (N, T, DX)
    np.testing.assert_array_equal(xhat[mask], x[mask])

    # oracle: public dynamax emission densities, zero log-likelihood at masked frames
    model, params = hmm_fit.model, hmm_fit.params

    def oracle(xn, mn):
        ll = jax.vmap(
            lambda xt: jax.vmap(lambda k: model.emission_distribution(params, k).log_prob(xt))(
                jnp.arange(K)
            )
        )(xn)
        ll = jnp.where(mn[:, None], ll, 0.0)
        q = hmm_smoother(
            params.initial.probs, params.transitions.transition_matrix, ll
        ).smoothed_probs
        return q @ params.emissions.means

    expected = np.asarray(jax.vmap(oracle)(jnp.asarray(x), jnp.asarray(mask)))
    np.testing.assert_allclose(xhat[~mask], expected[~mask], **tol(xhat.dtype))


def test_arhmm_impute_keeps_observed_and_rolls_dynamics(ar_data, ar_fit):
    _, x = ar_data
    mask = random_gap_mask(6, N, T)
    mask[:, 0] = True  # gaps start after the first frame here
    xhat = impute(ar_fit, np.where(mask[..., None], x, np.nan), mask)
    assert xhat.shape == (N, T, DX) and np.all(np.isfinite(xhat))
    np.testing.assert_array_equal(xhat[mask], x[mask])
    # the first masked frame of each gap is the posterior-mean one-step prediction
    em = ar_fit.params.emissions
    for n in range(N):
        t = int(np.argmin(mask[n]))
        pred_k = np.einsum("kdi,i->kd", em.weights, x[n, t - 1]) + em.biases  # [K, Dx]
        # the step is a convex combination of the regimes' predictions
        lo, hi = pred_k.min(0), pred_k.max(0)
        assert np.all(xhat[n, t] >= lo - 1e-4) and np.all(xhat[n, t] <= hi + 1e-4)


def test_interpolate_is_exact_on_linear_data():
    t = np.arange(40.0)
    slope = np.array([[0.5, -1.0], [2.0, 0.1]])  # [N, Dx]
    x = 3.0 + slope[:, None, :] * t[None, :, None]  # [N, T, Dx]
    mask = np.ones((2, 40), bool)
    mask[0, 5:17] = False
    mask[0, 20:21] = False
    mask[1, 10:38] = False
    xhat = interpolate(np.where(mask[..., None], x, np.nan), mask)
    np.testing.assert_allclose(xhat, x, rtol=1e-12, atol=1e-12)
    # edges: nearest observed value
    mask[1, :4] = False
    mask[1, 38:] = False
    xhat = interpolate(x, mask)
    np.testing.assert_allclose(xhat[1, :4], np.broadcast_to(x[1, 4], (4, 2)))
    np.testing.assert_allclose(xhat[1, 38:], np.broadcast_to(x[1, 9], (2, 2)))


def test_baselines_raise_naming_the_argument(hmm_fit):
    x = np.zeros((2, 10, DX))
    with pytest.raises(ValueError, match="`x`"):
        segment(hmm_fit, np.zeros((2, 10, DX + 1)))
    with pytest.raises(ValueError, match="`train_x`"):
        fit_gaussian_hmm(np.zeros((10, DX)), K, key=jax.random.key(0))
    with pytest.raises(ValueError, match="`mask`"):
        impute(hmm_fit, x, np.ones((2, 9), bool))
    with pytest.raises(ValueError, match="at least one observed"):
        interpolate(x, np.zeros((2, 10), bool))
    with pytest.raises(ValueError, match="`num_lags`"):
        fit_arhmm(x, K, key=jax.random.key(0), num_lags=0)

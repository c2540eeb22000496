"""Tests of `numpyro_svae.predict`: imputation, forecasting and the importance-weighted bound.

Oracle: a linear-Gaussian LDS with a fixed linear decoder, exact encoder potentials and a
q(theta) concentrated on the true parameters (dof and precision scales 1e6).  Then the
posterior predictive of the missing entries and log p(x | theta) are dense Gaussian
computations (`_dense_moments`), independent of the message-passing code.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.contrib.control_flow import scan
from scipy.stats import multivariate_normal

from numpyro_svae import models
from numpyro_svae.expfam.mniw import MNIWStandard, mniw_to_natural, mniw_to_unconstrained
from numpyro_svae.expfam.niw import NIWStandard, niw_to_natural, niw_to_unconstrained
from numpyro_svae.guide import SVAEGuide
from numpyro_svae.nn import GaussianPotentialEncoder
from numpyro_svae.predict import (
    Forecast,
    Imputation,
    forecast,
    importance_weighted_bound,
    impute,
    per_frame,
)

# ------------------------------------------------------------------------------------------
# the conjugate linear-Gaussian problem
# ------------------------------------------------------------------------------------------

D = 2
A_TRUE = np.array([[0.9, 0.2], [-0.2, 0.85]])
B_TRUE = np.array([0.1, -0.1])
Q_TRUE = np.diag([0.3, 0.2])
M0_TRUE = np.array([0.5, -0.5])
S0_TRUE = np.eye(2)
C_DIAG = np.array([1.0, 0.7])  # x_t = C z_t + e, C = diag(C_DIAG)
SIGMA = 0.5
CONC = 1e6  # dof / precision scale of q(theta): theta ~ its mean up to O(1e-3)


def lg_model(x=None, *, N, T, mask=None):
    eye = jnp.eye(D)
    M0 = jnp.concatenate([0.9 * eye, jnp.zeros((D, 1))], axis=1)
    Q = numpyro.sample("Q", dist.InverseWishart(D + 2.0, eye))
    Ab = numpyro.sample("Ab", dist.MatrixNormal(M0, jnp.linalg.cholesky(Q), jnp.eye(D + 1)))
    S0 = numpyro.sample("S0", dist.InverseWishart(D + 2.0, eye))
    m0 = numpyro.sample("m0", dist.MultivariateNormal(jnp.zeros(D), 10.0 * S0))
    with numpyro.plate("sequences", N):
        z0 = numpyro.sample("z0", dist.MultivariateNormal(m0, S0))

    def step(z_prev, _):
        with numpyro.plate("sequences", N):
            z = numpyro.sample("z", dist.MultivariateNormal(z_prev @ Ab[:, :D].T + Ab[:, D], Q))
        return z, z

    _, zs = scan(step, z0, None, length=T - 1)
    z_all = jnp.concatenate([z0[None], zs], axis=0).swapaxes(0, 1)
    d = dist.Normal(z_all * jnp.asarray(C_DIAG, z_all.dtype), SIGMA)
    if mask is not None:
        m = mask if mask.ndim == 3 else mask[..., None]
        d = d.mask(jnp.broadcast_to(m.astype(bool), z_all.shape))
    with numpyro.plate("sequences", N):
        numpyro.sample("x", d.to_event(2), obs=x)


def exact_encoder(params, x, m):
    """Exact likelihood potentials of x_t = C z_t + e (scaled by params['g'] to perturb)."""
    m = jnp.broadcast_to(m[:, None] if m.ndim == 1 else m, x.shape).astype(x.dtype)
    c = jnp.asarray(C_DIAG, x.dtype)
    R = params["g"] * m * c**2 / SIGMA**2 + 1e-12
    return R, R * m * x / c


def lg_params(guide, x, N, T, g=1.0):
    """Guide parameters with q(theta) concentrated at the true values."""
    st = guide._setup((x,), dict(N=N, T=T))
    with handlers.seed(rng_seed=0):
        tr = handlers.trace(lambda: guide._qtheta(st)).get_trace()
    shapes = {k: s["value"].shape for k, s in tr.items() if s["type"] == "param"}
    f = x.dtype
    niw = niw_to_unconstrained(niw_to_natural(NIWStandard(
        jnp.asarray(CONC * S0_TRUE, f), jnp.asarray(M0_TRUE, f), jnp.asarray(CONC, f),
        jnp.asarray(CONC, f))))
    M = np.concatenate([A_TRUE, B_TRUE[:, None]], 1)
    mniw = mniw_to_unconstrained(mniw_to_natural(MNIWStandard(
        jnp.asarray(CONC * Q_TRUE, f)[None], jnp.asarray(M, f)[None],
        jnp.asarray(CONC * np.eye(D + 1), f)[None], jnp.full((1,), CONC, f))))
    params = {f"qtheta$init_state.{k}": v for k, v in niw._asdict().items()}
    params.update({f"qtheta$dynamics.{k}": v for k, v in mniw._asdict().items()})
    params = {k: jnp.reshape(v, shapes[k]) for k, v in params.items()}
    params["encoder$params"] = {"g": jnp.asarray(g, f)}
    return params


def dense_moments(T, latent=False):
    """Mean [T*D] and covariance of x_{1:T} (time-major, then channel) under the true LDS;
    with `latent`, those of z_{1:T} and the matrix C of x = C z + e as well."""
    mz = [M0_TRUE]
    cov = [S0_TRUE]
    for _ in range(T - 1):
        mz.append(A_TRUE @ mz[-1] + B_TRUE)
        cov.append(A_TRUE @ cov[-1] @ A_TRUE.T + Q_TRUE)
    Sz = np.zeros((T * D, T * D))
    for t in range(T):
        for s in range(t, T):
            blk = np.linalg.matrix_power(A_TRUE, s - t) @ cov[t]  # Cov(z_s, z_t)
            Sz[s * D:(s + 1) * D, t * D:(t + 1) * D] = blk
            Sz[t * D:(t + 1) * D, s * D:(s + 1) * D] = blk.T
    C = np.kron(np.eye(T), np.diag(C_DIAG))
    if latent:
        return np.concatenate(mz), Sz, C
    return C @ np.concatenate(mz), C @ Sz @ C.T + SIGMA**2 * np.eye(T * D)


def simulate(rng, N, T):
    mu, S = dense_moments(T)
    return rng.multivariate_normal(mu, S, size=N).reshape(N, T, D)


@pytest.fixture(scope="module")
def lg_problem():
    """Shared data, guide and oracle for the float64 tests (built inside enable_x64)."""
    N, T = 200, 8
    with jax.enable_x64(True):
        x = jnp.asarray(simulate(np.random.default_rng(0), N, T))
        model = partial(lg_model, N=N, T=T)
        guide = SVAEGuide(model, encoder=exact_encoder, encoder_params={"g": jnp.ones(())})
        params = lg_params(guide, x, N, T)
    return dict(N=N, T=T, x=np.asarray(x), guide=guide, params=params, model=model)


# ------------------------------------------------------------------------------------------
# imputation against the exact conditional Gaussian
# ------------------------------------------------------------------------------------------


def test_impute_matches_exact_conditional_and_band_is_calibrated(lg_problem):
    p = lg_problem
    N, T = p["N"], p["T"]
    gap = np.arange(3, 6)
    mask = np.ones((N, T), bool)
    mask[:, gap] = False
    S = 200
    with jax.enable_x64(True):
        x = jnp.asarray(p["x"])
        x_in = jnp.where(jnp.asarray(mask)[..., None], x, jnp.nan)  # NaN at missing: allowed
        imp = impute(p["guide"], p["params"], x_in, jnp.asarray(mask), num_samples=S,
                     rng_key=jax.random.key(1), N=N, T=T)
        assert isinstance(imp, Imputation)
        assert imp.samples.shape == (S, N, T, D) and imp.samples.dtype == jnp.float64
        assert imp.regimes.shape == (S, N, T - 1) and imp.latents.shape == (S, N, T, D)
        np.testing.assert_array_equal(np.asarray(imp.filled)[mask], p["x"][mask])

    # oracle: x_mis | x_obs for every sequence (same pattern), dense Gaussian conditioning
    mu, Sig = dense_moments(T)
    flat_mask = np.repeat(mask[0], D)
    o, m = np.flatnonzero(flat_mask), np.flatnonzero(~flat_mask)
    K = Sig[np.ix_(m, o)] @ np.linalg.inv(Sig[np.ix_(o, o)])
    xf = p["x"].reshape(N, T * D)
    cond_mean = mu[m] + (xf[:, o] - mu[o]) @ K.T  # [N, |m|]
    cond_var = np.diag(Sig[np.ix_(m, m)] - K @ Sig[np.ix_(o, m)])

    samples = np.asarray(imp.samples).reshape(S, N, T * D)[:, :, m]
    # mean of the draws: z-score against the sample's own standard error
    se = samples.std(0) / np.sqrt(S)
    z_mean = (samples.mean(0) - cond_mean) / se
    assert np.max(np.abs(z_mean)) < 5
    # variance of the draws (pooled over sequences; the conditional variance is the same)
    pooled = ((samples - samples.mean(0)) ** 2).mean(axis=(0, 1)) * S / (S - 1)
    se_var = cond_var * np.sqrt(2.0 / (N * (S - 1)))
    assert np.max(np.abs(pooled - cond_var) / se_var) < 5

    # calibration of the 90 % band: per-sequence coverage, sequences independent
    lo = np.asarray(imp.lower).reshape(N, T * D)[:, m]
    hi = np.asarray(imp.upper).reshape(N, T * D)[:, m]
    cover = ((xf[:, m] >= lo) & (xf[:, m] <= hi)).mean(1)
    z_cov = (cover.mean() - 0.9) / (cover.std(ddof=1) / np.sqrt(N))
    assert abs(z_cov) < 5


# ------------------------------------------------------------------------------------------
# importance-weighted bound against the exact log-likelihood
# ------------------------------------------------------------------------------------------


def test_iw_bound_matches_exact_loglik(lg_problem):
    """Exact potentials and theta ~ its mean: every weight is p(x | theta)."""
    p = lg_problem
    N, T = p["N"], p["T"]
    mu, Sig = dense_moments(T)
    exact = multivariate_normal(mu, Sig).logpdf(p["x"].reshape(N, T * D))
    with jax.enable_x64(True):
        x = jnp.asarray(p["x"])
        iw = importance_weighted_bound(p["guide"], p["params"], x, num_samples=16,
                                       rng_key=jax.random.key(2), N=N, T=T)
        pert = lg_params(p["guide"], x, N, T, g=0.3)  # over-dispersed q(z): a loose proposal
        iw_pert = importance_weighted_bound(p["guide"], pert, x, num_samples=16,
                                            rng_key=jax.random.key(3), N=N, T=T)
    assert iw.log_weights.shape == (16, N) and iw.global_log_weights.shape == (16,)
    # theta_s deviates from the truth by O(CONC^-1/2) = 1e-3 relative, which moves
    # log p(x | theta_s) by a few 1e-2 nats for T * Dx = 16 entries; the average over s less
    np.testing.assert_allclose(np.asarray(iw.predictive), exact, atol=3e-2)
    np.testing.assert_allclose(np.asarray(iw.log_weights), np.broadcast_to(exact, (16, N)),
                               atol=0.15)
    np.testing.assert_allclose(np.asarray(iw.per_frame), np.asarray(iw.bound) / T, rtol=1e-12)
    assert np.all(np.asarray(iw.frames) == T)
    # the global weight log p(theta)/q(theta) is very negative for a concentrated q(theta)
    assert np.all(np.asarray(iw.bound) < np.asarray(iw.predictive))

    # loose proposal: below the exact value and rising with S, on average over sequences.
    # The IWAE estimate with s samples is averaged over the 16 / s disjoint blocks.
    lw = np.asarray(iw_pert.log_weights)
    means = []
    for s in (1, 2, 4, 8, 16):
        blocks = lw.reshape(16 // s, s, N)
        est = np.logaddexp.reduce(blocks, axis=1) - np.log(s)  # [16 / s, N]
        gap = est - exact
        means.append(gap.mean())
        assert gap.mean() + 5 * gap.std(ddof=1) / np.sqrt(gap.size) < 0 or s == 16
        assert gap.mean() < 0
    assert np.all(np.diff(means) > 0), means
    np.testing.assert_allclose(np.asarray(iw_pert.predictive),
                               np.logaddexp.reduce(lw, axis=0) - np.log(16), rtol=1e-12)


def test_forecast_mean_matches_exact_prediction(lg_problem):
    """E[x_{T+h} | x] = C (A^h E[z_T | x] + sum_{j<h} A^j b), by dense conditioning."""
    p = lg_problem
    N, T, H, S = p["N"], p["T"], 12, 200
    with jax.enable_x64(True):  # same shapes as the IW test: its compiled mean field is reused
        x = jnp.asarray(p["x"])
        fc = forecast(p["guide"], p["params"], x, horizon=H, num_samples=S,
                      rng_key=jax.random.key(4), N=N, T=T)
    assert fc.samples.shape == (S, N, H, D) and fc.latents.shape == (S, N, H, D)
    assert np.all(np.asarray(fc.regimes) == 0)
    mz, Sz, C = dense_moments(T, latent=True)
    Sx = C @ Sz @ C.T + SIGMA**2 * np.eye(T * D)
    last = slice((T - 1) * D, T * D)
    gain = Sz[last] @ C.T @ np.linalg.inv(Sx)
    xf = np.asarray(x, np.float64).reshape(N, T * D)
    m = mz[last] + (xf - C @ mz) @ gain.T  # [N, D] E[z_T | x]
    exact = []
    for _ in range(H):
        m = m @ A_TRUE.T + B_TRUE
        exact.append(m * C_DIAG)
    exact = np.stack(exact, 1)  # [N, H, D]
    draws = np.asarray(fc.samples, np.float64)
    z = (draws.mean(0) - exact) / (draws.std(0) / np.sqrt(S))
    assert np.max(np.abs(z)) < 5


def test_per_frame_counts_observed_frames():
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0]], bool)
    out = np.asarray(per_frame(jnp.array([-4.0, -1.0]), mask))
    assert out[0] == -2.0 and np.isnan(out[1])
    out3 = np.asarray(per_frame(jnp.array([-4.0, -1.0]), np.stack([mask, ~mask], -1)))
    np.testing.assert_allclose(out3, [-1.0, -0.25])
    with pytest.raises(ValueError, match="`mask`"):
        per_frame(jnp.zeros(3), mask)


# ------------------------------------------------------------------------------------------
# the SLDS (float32, freshly initialised parameters): shapes, regimes, validation
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slds_problem():
    N, T, Dx, K, Dl = 3, 10, 3, 2, 2
    kw = dict(N=N, T=T, Dx=Dx, K=K, D=Dl, hidden=(8,))
    model = partial(models.slds_model, **kw)
    enc = GaussianPotentialEncoder(obs_dim=Dx, latent_dim=Dl, hidden=(8,), key=jax.random.key(1))
    guide = SVAEGuide(model, encoder=enc)
    x = jax.random.normal(jax.random.key(0), (N, T, Dx))
    st = guide._setup((x,), {})
    with handlers.seed(rng_seed=0):  # q(theta) and encoder parameters, no mean field
        tr = handlers.trace(lambda: (guide._qtheta(st), guide._encoder_fn())).get_trace()
    with handlers.seed(rng_seed=1):
        mtr = handlers.trace(model).get_trace(x)
    params = {k: s["value"] for t in (tr, mtr) for k, s in t.items() if s["type"] == "param"}
    return dict(N=N, T=T, Dx=Dx, K=K, D=Dl, x=x, guide=guide, params=params)


@pytest.mark.slow
def test_slds_impute_and_forecast_shapes(slds_problem):
    p = slds_problem
    N, T, Dx = p["N"], p["T"], p["Dx"]
    mask = np.ones((N, T, Dx), bool)
    mask[:, 4:7, :2] = False  # entry-level mask
    imp = impute(p["guide"], p["params"], p["x"], jnp.asarray(mask), num_samples=6,
                 rng_key=jax.random.key(2))
    assert imp.samples.shape == (6, N, T, Dx) and imp.mean.shape == (N, T, Dx)
    assert imp.regimes.shape == (6, N, T) and imp.regimes.dtype == jnp.int32  # leading regime
    assert np.all((np.asarray(imp.regimes) >= 0) & (np.asarray(imp.regimes) < p["K"]))
    assert np.all(np.isfinite(np.asarray(imp.samples)))
    assert np.all(np.asarray(imp.lower) <= np.asarray(imp.upper))
    np.testing.assert_array_equal(np.asarray(imp.mask), mask)

    # pooled restarts = the single-start imputations on the split keys, put together
    pooled = impute(p["guide"], p["params"], p["x"], jnp.asarray(mask), num_samples=6,
                    num_restarts=2, rng_key=jax.random.key(5))
    parts = [impute(p["guide"], p["params"], p["x"], jnp.asarray(mask), num_samples=3,
                    rng_key=k) for k in jax.random.split(jax.random.key(5), 2)]
    for field in ("samples", "regimes", "latents"):
        np.testing.assert_array_equal(
            np.asarray(getattr(pooled, field)),
            np.concatenate([np.asarray(getattr(q, field)) for q in parts]))
    np.testing.assert_allclose(np.asarray(pooled.mean),
                               (np.asarray(parts[0].mean) + np.asarray(parts[1].mean)) / 2,
                               rtol=1e-5, atol=1e-6)
    assert not np.array_equal(np.asarray(parts[0].mean), np.asarray(parts[1].mean))
    hidden = ~mask
    np.testing.assert_array_equal(np.asarray(pooled.filled)[hidden],
                                  np.asarray(pooled.mean)[hidden])
    np.testing.assert_array_equal(np.asarray(pooled.filled)[mask], np.asarray(p["x"])[mask])

    fc = forecast(p["guide"], p["params"], p["x"], horizon=T + 3, num_samples=5,
                  rng_key=jax.random.key(3))
    assert isinstance(fc, Forecast)
    assert fc.samples.shape == (5, N, T + 3, Dx) and fc.latents.shape == (5, N, T + 3, p["D"])
    assert fc.regimes.shape == (5, N, T + 3)
    assert np.all(np.isfinite(np.asarray(fc.samples)))

    iw = importance_weighted_bound(p["guide"], p["params"], p["x"], num_samples=4,
                                   rng_key=jax.random.key(4), proposal="conditional")
    assert iw.bound.shape == (N,) and iw.total.shape == ()
    assert np.all(np.isfinite(np.asarray(iw.bound)))


def test_predict_validation_errors(lg_problem):
    p = lg_problem
    g, prm, x = p["guide"], p["params"], jnp.asarray(p["x"])
    with pytest.raises(ValueError, match="`mask`"):
        impute(g, prm, x, jnp.ones((2, 2)), rng_key=jax.random.key(0))
    with pytest.raises(ValueError, match="NaN"):
        impute(g, prm, x.at[0, 0, 0].set(jnp.nan), rng_key=jax.random.key(0))
    with pytest.raises(ValueError, match="`num_samples`"):
        impute(g, prm, x, num_samples=0, rng_key=jax.random.key(0))
    with pytest.raises(ValueError, match="`num_restarts`"):
        impute(g, prm, x, num_restarts=0, rng_key=jax.random.key(0))
    with pytest.raises(ValueError, match="multiple of `num_restarts`"):
        impute(g, prm, x, num_samples=5, num_restarts=2, rng_key=jax.random.key(0))
    with pytest.raises(ValueError, match="`horizon`"):
        forecast(g, prm, x, horizon=0, rng_key=jax.random.key(0))
    with pytest.raises(ValueError, match="`proposal`"):
        importance_weighted_bound(g, prm, x, proposal="prior", rng_key=jax.random.key(0))
    with pytest.raises(TypeError, match="SVAEGuide"):
        impute(object(), prm, x, rng_key=jax.random.key(0))

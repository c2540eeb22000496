"""Expected SLDS potentials and the two mean-field messages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import multivariate_normal

from numpyro_svae.meanfield.potentials import (
    hmm_to_lds_potentials,
    lds_expected_potentials,
    lds_to_hmm_log_potentials,
    slds_expected_potentials,
)
from tests._tol import tol

D, K, T = 2, 3, 4


def _point_mass_stats(key, bias=True):
    """Statistics of a q(theta) that is a point mass at (mu, tau, A_k, b_k, Lambda_k)."""
    ks = jax.random.split(key, 5)
    A = 0.5 * jax.random.normal(ks[0], (K, D, D))
    b = jax.random.normal(ks[1], (K, D)) if bias else jnp.zeros((K, D))
    U = jax.random.normal(ks[2], (K, D, D))
    Lam = U @ jnp.swapaxes(U, -1, -2) + jnp.eye(D)
    X = jnp.concatenate([A, b[:, :, None]], -1) if bias else A  # [K, D, Din]
    mniw = (-0.5 * Lam, jnp.swapaxes(X, -1, -2) @ Lam,
            -0.5 * jnp.swapaxes(X, -1, -2) @ Lam @ X, 0.5 * jnp.linalg.slogdet(Lam)[1])
    mu = jax.random.normal(ks[3], (D,))
    tau = jnp.array([[2.0, 0.3], [0.3, 1.0]])
    niw = (-0.5 * tau, tau @ mu, -0.5 * mu @ tau @ mu, 0.5 * jnp.linalg.slogdet(tau)[1])
    return niw, mniw, (A, b, Lam, mu, tau)


@pytest.mark.parametrize("bias", [True, False])
def test_expected_potentials_match_gaussian_logpdf(bias):
    with jax.enable_x64(True):
        niw, mniw, (A, b, Lam, mu, tau) = _point_mass_stats(jax.random.key(0), bias)
        log_pi0 = jnp.log(jnp.ones(K) / K)
        log_P = jnp.log(jnp.full((K, K), 1.0 / K))
        g = slds_expected_potentials(niw, mniw, log_pi0, log_P)
        z = np.asarray(jax.random.normal(jax.random.key(1), (T, D)))
        # a deterministic q(z) = delta(z): E[zz'] = zz'
        eta = lds_to_hmm_log_potentials(z, z[:, :, None] * z[:, None, :],
                                        z[:-1, :, None] * z[1:, None, :], g)
        cov = np.linalg.inv(np.asarray(Lam))
        for t in range(T - 1):
            for k in range(K):
                ref = multivariate_normal(np.asarray(A[k] @ z[t] + b[k]), cov[k]).logpdf(z[t + 1])
                np.testing.assert_allclose(eta[t, k], ref, **tol(jnp.float64))
        ref0 = multivariate_normal(np.asarray(mu), np.linalg.inv(np.asarray(tau))).logpdf(z[0])
        got0 = -0.5 * z[0] @ g.J_init @ z[0] + g.h_init @ z[0] + g.c_init
        np.testing.assert_allclose(got0, ref0, **tol(jnp.float64))


def test_hmm_to_lds_matches_regime_potentials_for_one_hot_marginals():
    with jax.enable_x64(True):
        niw, mniw, _ = _point_mass_stats(jax.random.key(2))
        g = slds_expected_potentials(niw, mniw, jnp.zeros(K), jnp.zeros((K, K)))
        ks = jnp.array([0, 2, 1])
        q = jax.nn.one_hot(ks, K)
        R, r = jnp.ones((T, D)), jnp.zeros((T, D))
        pot, const = hmm_to_lds_potentials(q, g, R, r)
        for name in ("J11", "J12", "J22", "h1", "h2"):
            np.testing.assert_allclose(getattr(pot, name), getattr(g, name)[ks],
                                       **tol(jnp.float64))
        np.testing.assert_allclose(const, g.c_init + jnp.sum(g.c[ks]), **tol(jnp.float64))
        # mixed marginals: weighted sums (linearity)
        q2 = jax.random.dirichlet(jax.random.key(3), jnp.ones(K), (T - 1,))
        pot2, _ = hmm_to_lds_potentials(q2, g, R, r)
        np.testing.assert_allclose(pot2.J12[1], sum(q2[1, k] * g.J12[k] for k in range(K)),
                                   **tol(jnp.float64))


def test_expected_potentials_from_expfam_statistics_are_consistent():
    from numpyro_svae.expfam.mniw import MNIWStandard, mniw_expected_stats, mniw_to_natural
    from numpyro_svae.expfam.niw import NIWStandard, niw_expected_stats, niw_to_natural

    with jax.enable_x64(True):
        S = jnp.broadcast_to(jnp.eye(D), (K, D, D))
        M = 0.3 * jax.random.normal(jax.random.key(4), (K, D, D + 1))
        V = jnp.broadcast_to(10.0 * jnp.eye(D + 1), (K, D + 1, D + 1))
        nu = jnp.full((K,), D + 3.0)
        ms = mniw_expected_stats(mniw_to_natural(MNIWStandard(S, M, V, nu)))
        ns = niw_expected_stats(niw_to_natural(NIWStandard(jnp.eye(D), jnp.zeros(D),
                                                           jnp.asarray(1.0), jnp.asarray(D + 2.0))))
        g = slds_expected_potentials(ns, ms, jnp.zeros(K), jnp.zeros((K, K)))
        assert g.J11.shape == (K, D, D) and g.h1.shape == (K, D) and g.c.shape == (K,)
        # E[A' Lambda A] - E[A' Lambda] E[Lambda]^-1 E[Lambda A] = D V^-1 block: PSD
        gap = g.J11 - g.J12 @ jnp.linalg.solve(g.J22, jnp.swapaxes(g.J12, -1, -2))
        assert np.all(np.linalg.eigvalsh(np.asarray(gap)) > -1e-10)
        g1 = lds_expected_potentials(ns, jax.tree_util.tree_map(lambda x: x[0], tuple(ms)))
        assert g1.J11.shape == (1, D, D)
        np.testing.assert_allclose(g1.J12[0], g.J12[0], **tol(jnp.float64))


def test_expected_potentials_bad_inputs_raise_value_error():
    niw, mniw, _ = _point_mass_stats(jax.random.key(5))
    with pytest.raises(ValueError, match="E_log_P"):
        slds_expected_potentials(niw, mniw, jnp.zeros(K), jnp.zeros((K, K + 1)))
    with pytest.raises(ValueError, match="mniw_stats.Xt_Lambda"):
        slds_expected_potentials(niw, (mniw[0], mniw[1][:, :, :1]) + mniw[2:], jnp.zeros(K),
                                 jnp.zeros((K, K)))
    with pytest.raises(ValueError, match="niw_stats.tau_mu"):
        slds_expected_potentials((niw[0], niw[1].at[0].set(jnp.nan)) + niw[2:], mniw,
                                 jnp.zeros(K), jnp.zeros((K, K)))

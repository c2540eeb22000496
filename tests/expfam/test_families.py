"""One contract swept over every family: grad A = E[t], KL, round trips, sampling, batching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_svae import expfam as E
from tests._tol import tol
from tests.expfam._cases import (
    FAMILIES,
    FAMILY_IDS,
    JITTED,
    assert_tree_close,
    mc_zscores,
    natural,
    stack,
)

families = pytest.mark.parametrize("fam", FAMILIES, ids=FAMILY_IDS)


@families
def test_expected_stats_matches_grad_log_normalizer(fam):
    with jax.enable_x64(True):
        for seed in (0, 1):
            eta = natural(fam, seed)
            g = JITTED[fam.name].grad_log_normalizer(eta)
            mu = JITTED[fam.name].expected_stats(eta)
            assert len(mu) == len(eta)
            for a, b in zip(g, mu, strict=True):
                np.testing.assert_allclose(a, b, **tol(jnp.float64))


@families
def test_expected_stats_float32_matches_float64(fam):
    eta32 = natural(fam, 0)
    assert jax.tree.leaves(eta32)[0].dtype == jnp.float32
    J = JITTED[fam.name]
    mu32 = J.expected_stats(eta32)
    g32 = J.grad_log_normalizer(eta32)
    with jax.enable_x64(True):
        mu64 = J.expected_stats(natural(fam, 0))
    for a, b, c in zip(mu32, g32, mu64, strict=True):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, c, **tol(jnp.float32))
        np.testing.assert_allclose(b, c, **tol(jnp.float32))


@families
def test_expected_stats_matches_own_sampler_monte_carlo(fam, key):
    with jax.enable_x64(True):
        J = JITTED[fam.name]
        eta = natural(fam, 0)
        z = mc_zscores(J.sample_stats(key, eta, (20000,)), J.expected_stats(eta))
        assert np.all(np.abs(z) < 5), z


@families
def test_kl_is_nonnegative_and_zero_on_itself(fam):
    with jax.enable_x64(True):
        J = JITTED[fam.name]
        q, p = natural(fam, 0), natural(fam, 1)
        assert float(J.kl(q, p)) > 0.0
        assert float(J.kl(p, q)) > 0.0
        assert abs(float(J.kl(q, q))) < 1e-10


@families
def test_kl_matches_monte_carlo_of_log_density_ratio(fam, key):
    # log q(theta) - log p(theta) = <eta_q - eta_p, t(theta)> - A_q + A_p (base measure cancels)
    with jax.enable_x64(True):
        J = JITTED[fam.name]
        q, p = natural(fam, 0), natural(fam, 1)
        t = J.sample_stats(jax.random.fold_in(key, 1), q, (20000,))
        diff = [a - b for a, b in zip(q, p, strict=True)]
        ratio = sum(
            jnp.sum((d * x).reshape(x.shape[0], -1), -1)
            for d, x in zip(diff, t, strict=True)
        ) - J.log_normalizer(q) + J.log_normalizer(p)
        z = mc_zscores((ratio,), (J.kl(q, p),))
        assert np.all(np.abs(z) < 5), z


@families
def test_standard_natural_round_trip_matches_identity(fam):
    with jax.enable_x64(True):
        std = fam.standard(0)
        back = JITTED[fam.name].to_standard(fam.to_natural(std))
        assert_tree_close(back, jax.tree.map(jnp.asarray, std), **tol(jnp.float64))


@families
def test_unconstrained_round_trip_matches_identity(fam):
    with jax.enable_x64(True):
        J = JITTED[fam.name]
        eta = natural(fam, 0)
        u = J.to_u(eta)
        for natgrad in (True, False):
            assert_tree_close(J.from_u(u, natgrad=natgrad), eta, **tol(jnp.float64))
        # u -> eta -> u from a random u (strict upper triangles are dead: zero them first)
        rng = np.random.default_rng(3)
        u_rand = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=np.shape(x))), u)
        u_rand = type(u)(*(jnp.tril(x) if f else x for x, f in zip(u_rand, fam.u_tril,
                                                                   strict=True)))
        assert_tree_close(J.to_u(J.from_u(u_rand)), u_rand, **tol(jnp.float64))


@families
def test_batched_call_matches_unbatched_calls(fam):
    with jax.enable_x64(True):
        J = JITTED[fam.name]
        items = [natural(fam, s) for s in (0, 1, 2)]
        p = natural(fam, 4)

        @jax.jit
        def batched(etas, ps):
            return (fam.log_normalizer(etas), fam.expected_stats(etas), fam.entropy(etas),
                    fam.kl(etas, ps), fam.from_u(fam.to_u(etas)))

        A, mu, H, kl, back = batched(stack(items), stack([p] * 3))
        for i, eta in enumerate(items):
            one = jax.tree.map(lambda x, i=i: x[i], (A, mu, H, kl, back))
            want = (J.log_normalizer(eta), J.expected_stats(eta), J.entropy(eta), J.kl(eta, p),
                    eta)
            for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(want), strict=True):
                np.testing.assert_allclose(a, b, **tol(jnp.float64))
        # raw (legacy uint32) keys are accepted as well as typed ones
        draws = J.sample(jax.random.PRNGKey(1), stack(items), (5,))
        for x in jax.tree.leaves(draws):
            assert x.shape[:2] == (5, 3) and bool(jnp.all(jnp.isfinite(x)))


def test_dirichlet_transition_matrix_rows_match_single_rows():
    with jax.enable_x64(True):
        J = JITTED["dirichlet"]
        alpha = jnp.asarray([[5.0, 1.0, 0.5], [0.5, 4.0, 1.0], [1.0, 1.0, 3.0]])
        eta = E.dirichlet_to_natural(E.DirichletStandard(alpha))
        assert J.log_normalizer(eta).shape == (3,)
        # same shapes and key type as the batched test: no new compile
        P = J.sample(jax.random.PRNGKey(2), eta, (5,))
        assert P.shape == (5, 3, 3)
        np.testing.assert_allclose(P.sum(-1), 1.0, **tol(jnp.float64))
        for i in range(3):
            row = E.DirichletNatural(eta.eta[i])
            np.testing.assert_allclose(
                J.expected_stats(eta).log_pi[i], J.expected_stats(row).log_pi,
                **tol(jnp.float64)
            )


def test_expectations_are_rescaled_stats():
    with jax.enable_x64(True):
        niw = natural(FAMILIES[0], 0)
        S, m, lam, nu = E.niw_to_standard(niw)
        ex = E.niw_expectations(E.niw_expected_stats(niw))
        E_tau = nu * jnp.linalg.inv(S)
        np.testing.assert_allclose(ex.tau, E_tau, **tol(jnp.float64))
        np.testing.assert_allclose(ex.tau_mu, E_tau @ m, **tol(jnp.float64))
        np.testing.assert_allclose(ex.mu_tau_mu, 2 / lam + m @ E_tau @ m, **tol(jnp.float64))
        mn = natural(FAMILIES[1], 0)
        S, M, V, nu = E.mniw_to_standard(mn)
        ex = E.mniw_expectations(E.mniw_expected_stats(mn))
        E_L = nu * jnp.linalg.inv(S)
        np.testing.assert_allclose(ex.Lambda, E_L, **tol(jnp.float64))
        np.testing.assert_allclose(ex.Xt_Lambda, M.T @ E_L, **tol(jnp.float64))
        np.testing.assert_allclose(
            ex.Xt_Lambda_X, 2 * jnp.linalg.inv(V) + M.T @ E_L @ M, **tol(jnp.float64)
        )
        assert ex.Xt_Lambda.shape == (3, 2) and ex.Xt_Lambda_X.shape == (3, 3)

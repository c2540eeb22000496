"""HMM / GMM with Gaussian latents iid given the regime, through the same fixed-point machinery."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_svae.meanfield.fixed_point import FixedPointOptions
from numpyro_svae.meanfield.iid import mf_fixed_point_iid, mf_sample_iid
from numpyro_svae.meanfield.potentials import iid_expected_potentials
from tests.meanfield._problems import random_encoder

T, D, K = 5, 2, 2
TIGHT = dict(max_iters=300, rtol=1e-13, adjoint_max_iters=600, adjoint_tol=1e-13)


def _globals(key):
    k1, k2, k3 = jax.random.split(key, 3)
    tau = jnp.eye(D) * jnp.array([1.0, 2.0])[:, None, None]
    mu = 2.0 * jax.random.normal(k1, (K, D))
    stats = (-0.5 * tau, jnp.einsum("kij,kj->ki", tau, mu),
             -0.5 * jnp.einsum("ki,kij,kj->k", mu, tau, mu) - 0.1,
             0.5 * jnp.linalg.slogdet(tau)[1] - 0.05)
    log_pi = jax.nn.log_softmax(jax.random.normal(k2, (K,)))
    log_P = jax.nn.log_softmax(jax.random.normal(k3, (K, K)) + 2 * jnp.eye(K), -1)
    return iid_expected_potentials(stats, log_pi, log_P)


@pytest.mark.slow
def test_gmm_implicit_grad_matches_unrolled_and_kl_matches_monte_carlo(key):
    with jax.enable_x64(True):
        gi = _globals(jax.random.key(1))
        R, r = random_encoder(jax.random.key(2), T, D)
        init = jax.random.dirichlet(jax.random.key(3), jnp.ones(K), (T,))
        W = jax.random.normal(jax.random.key(4), (T, D))
        kz, kk = jax.random.split(key)
        S = 4000

        def loss(R, r, gi, solver):
            res, info = mf_fixed_point_iid(R, r, gi, init_marginals=init, chain=False,
                                           options=FixedPointOptions(solver=solver, **TIGHT))
            return jnp.sum(res.Ez * W) + jnp.sum(res.marginals[:, 0]) + res.local_kl, (res, info)

        @jax.jit
        def both(R, r, gi):
            (v, (res, info)), g1 = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(
                R, r, gi, "richardson")
            _, g2 = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(R, r, gi, "unrolled")
            # Monte Carlo E_q[log q(z) + log q(k) - log p(z, k)], z ~ q(z), k_t ~ q(k_t) iid
            z = mf_sample_iid(kz, res, num_samples=S)
            k = jax.random.categorical(kk, jnp.log(res.marginals), shape=(S, T))

            def term(z, k):
                log_qz = jnp.sum(jax.scipy.stats.multivariate_normal.logpdf(z, res.Ez, res.cov))
                log_qk = jnp.sum(jnp.log(res.marginals[jnp.arange(T), k]))
                log_pz = jnp.sum(-0.5 * jnp.einsum("ti,tij,tj->t", z, gi.J[k], z)
                                 + jnp.sum(gi.h[k] * z, -1) + gi.c[k])
                return log_qz + log_qk - jnp.sum(gi.log_pi0[k]) - log_pz

            vals = jax.vmap(term)(z, k)
            return g1, g2, res, info, jnp.mean(vals), jnp.std(vals) / jnp.sqrt(S)

        g1, g2, res, info, mc, se = both(R, r, gi)
        assert bool(info.converged)
        f1 = jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(g1)])
        f2 = jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(g2)])
        np.testing.assert_allclose(f1, f2, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(res.marginals, res.used_marginals, atol=1e-9)
        assert float(res.local_kl) >= 0.0
        assert abs(float((mc - res.local_kl) / se)) < 5


def test_hmm_iid_fixed_point_reached_matches_one_more_update():
    with jax.enable_x64(True):
        gi = _globals(jax.random.key(1))
        R, r = random_encoder(jax.random.key(2), T, D, full=True)
        res, info = jax.jit(lambda R, r, gi: mf_fixed_point_iid(
            R, r, gi, init_key=jax.random.key(3), chain=True,
            options=FixedPointOptions(max_iters=300, rtol=1e-13)))(R, r, gi)
        assert bool(info.converged)
        np.testing.assert_allclose(res.marginals, res.used_marginals, atol=1e-9)
        assert float(res.local_kl) >= 0.0
        np.testing.assert_allclose(jnp.sum(res.trans_counts), T - 1, rtol=1e-12)


def test_iid_bad_inputs_raise_value_error():
    gi = _globals(jax.random.key(1))
    R, r = random_encoder(jax.random.key(2), T, D)
    with pytest.raises(ValueError, match="globals.h"):
        mf_fixed_point_iid(R, r, gi._replace(h=gi.h[:, :1]), init_key=jax.random.key(0))
    with pytest.raises(ValueError, match="node_r"):
        mf_fixed_point_iid(R, r.at[0, 0].set(jnp.inf), gi, init_key=jax.random.key(0))

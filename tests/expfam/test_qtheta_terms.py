"""``*_qtheta_terms``: q(theta) statistics, KL and natural gradients from standard parameters.

The oracle is the natural-parameter path the guide used before (``*_from_unconstrained`` +
``straight_through`` + ``prior_kl_natgrad_form``, and plain autodiff through
``*_expected_stats`` / ``*_kl`` without natural gradients), which is exact in float64.  The
float32 case is the state that made long mocap6 runs NaN: an MNIW regime with ``|M| ~ 700``,
``V ~ 100 I`` and ``S`` of order 0.01, where ``eta1 = S + M V M'`` is ~1e8.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_svae import expfam as E
from numpyro_svae.expfam.dirichlet import dirichlet_qtheta_terms
from numpyro_svae.expfam.mniw import mniw_qtheta_terms
from numpyro_svae.expfam.niw import niw_qtheta_terms
from tests._tol import tol
from tests.expfam._cases import assert_tree_close, mocap6_mniw_state


def _spd(rng, n, batch, scale=1.0):
    A = rng.normal(size=batch + (n, n))
    return scale * (A @ np.swapaxes(A, -1, -2) / n + np.eye(n))


def _mniw_case(rng):
    K, D, Din = 3, 2, 3
    q = E.MNIWStandard(jnp.asarray(_spd(rng, D, (K,), 2.0)),
                       jnp.asarray(rng.normal(size=(K, D, Din))),
                       jnp.asarray(_spd(rng, Din, (K,), 3.0)),
                       jnp.asarray(D + 3.0 + rng.uniform(size=K)))
    p = E.MNIWStandard(jnp.asarray(_spd(rng, D, ())), jnp.asarray(rng.normal(size=(D, Din))),
                       jnp.asarray(0.5 * _spd(rng, Din, ())), jnp.asarray(D + 1.5))
    opts = dict(jitter_S=1e-3, jitter_V=1e-4)
    u = E.mniw_to_unconstrained(E.mniw_to_natural(q), **opts)
    return (mniw_qtheta_terms, E.mniw_from_unconstrained, E.mniw_to_natural,
            E.mniw_expected_stats, E.mniw_log_normalizer, E.mniw_kl, u, p, opts)


def _niw_case(rng):
    K, D = 3, 2
    q = E.NIWStandard(jnp.asarray(_spd(rng, D, (K,), 2.0)), jnp.asarray(rng.normal(size=(K, D))),
                      jnp.asarray(0.5 + rng.uniform(size=K)),
                      jnp.asarray(D + 2.0 + rng.uniform(size=K)))
    p = E.NIWStandard(jnp.asarray(_spd(rng, D, ())), jnp.asarray(rng.normal(size=D)),
                      jnp.asarray(0.7), jnp.asarray(D + 1.0))
    u = E.niw_to_unconstrained(E.niw_to_natural(q))
    return (niw_qtheta_terms, E.niw_from_unconstrained, E.niw_to_natural, E.niw_expected_stats,
            E.niw_log_normalizer, E.niw_kl, u, p, {})


def _dirichlet_case(rng):
    q = E.DirichletStandard(jnp.asarray(0.3 + 3.0 * rng.uniform(size=(2, 4))))
    p = E.DirichletStandard(jnp.asarray(0.5 + rng.uniform(size=4)))
    u = E.dirichlet_to_unconstrained(E.dirichlet_to_natural(q))
    return (dirichlet_qtheta_terms, E.dirichlet_from_unconstrained, E.dirichlet_to_natural,
            E.dirichlet_expected_stats, E.dirichlet_log_normalizer, E.dirichlet_kl, u, p, {})


CASES = {"mniw": _mniw_case, "niw": _niw_case, "dirichlet": _dirichlet_case}


@pytest.mark.parametrize("natgrad", [True, False], ids=["natgrad", "plain"])
@pytest.mark.parametrize("name", list(CASES))
def test_qtheta_terms_match_natural_parameter_path(name, natgrad):
    with jax.enable_x64(True):
        rng = np.random.default_rng(7)
        terms, from_u, to_nat, es, lognorm, kl, u, p, opts = CASES[name](rng)
        eta_shape = from_u(u, natgrad=False, **opts)
        eta0 = jax.tree.map(lambda a, b: jnp.broadcast_to(a, b.shape), to_nat(p), eta_shape)
        w = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), es(eta_shape))

        def oracle(v):
            eta = from_u(v, natgrad=natgrad, **opts)
            if natgrad:
                mu = E.straight_through(es, eta)
                k = E.prior_kl_natgrad_form(eta, eta0, es, lognorm)
            else:
                mu, k = es(eta), jnp.sum(kl(eta, eta0))
            # a nonlinear function of the statistics, so cotangents differ per leaf
            return E.tree_vdot(w, jax.tree.map(jnp.sin, mu)) + 1.7 * k

        def ours(v):
            _, mu, k = terms(v, p, natgrad=natgrad, **opts)
            return E.tree_vdot(w, jax.tree.map(jnp.sin, mu)) + 1.7 * k

        v_or, g_or = jax.value_and_grad(oracle)(u)
        v_us, g_us = jax.value_and_grad(ours)(u)
        np.testing.assert_allclose(v_us, v_or, **tol(jnp.float64))
        # gradients: rounding of the two paths differs by a few ulps of the largest entries
        assert_tree_close(g_us, g_or, rtol=1e-7, atol=1e-7)
        std, _, _ = terms(u, p, natgrad=natgrad, **opts)
        assert_tree_close(to_nat(std), eta_shape, **tol(jnp.float64))


def test_mniw_qtheta_terms_float32_where_natural_path_is_nan():
    """The mocap6 NaN state: float32 statistics and KL match float64 to ~1e-4."""
    rng = np.random.default_rng(0)
    q = mocap6_mniw_state(rng)
    D, Din = q[1].shape
    p = [np.eye(D), np.zeros((D, Din)), 1e-3 * np.eye(Din), np.array(D + 2.0)]
    opts = dict(jitter_S=1e-5, jitter_V=1e-6)

    def run(dtype, new):
        qs = E.MNIWStandard(*(jnp.asarray(a, dtype) for a in q))
        ps = E.MNIWStandard(*(jnp.asarray(a, dtype) for a in p))
        u = E.mniw_to_unconstrained(E.mniw_to_natural(qs), **opts) if dtype == jnp.float64 \
            else jax.tree.map(lambda a: a.astype(dtype), run.u64)
        if new:
            _, mu, k = mniw_qtheta_terms(u, ps, **opts)
        else:
            eta = E.mniw_from_unconstrained(u, **opts)
            mu = E.straight_through(E.mniw_expected_stats, eta)
            k = E.prior_kl_natgrad_form(eta, E.mniw_to_natural(ps), E.mniw_expected_stats,
                                        E.mniw_log_normalizer)
        return u, [np.asarray(a, np.float64) for a in mu], float(k)

    with jax.enable_x64(True):
        run.u64, ref, k_ref = run(jnp.float64, True)
        run.u64 = jax.tree.map(np.asarray, run.u64)
    _, old, k_old = run(jnp.float32, False)
    _, new, k_new = run(jnp.float32, True)
    # the natural-parameter path recovers S = eta1 - M V M' and loses it entirely
    assert not (np.isfinite(k_old) and all(np.all(np.isfinite(a)) for a in old))
    assert np.isfinite(k_new)
    # float32 with the rounding-level ridge of psd_cholesky_ridged (16 eps x the largest
    # diagonal entry; S here has condition number ~100): ~1e-4 relative at most
    assert abs(k_new - k_ref) <= 3e-4 * abs(k_ref)
    for a, b in zip(new, ref, strict=True):
        assert np.max(np.abs(a - b)) <= 3e-4 * np.max(np.abs(b))


def test_mniw_qtheta_terms_natural_gradient_is_finite_in_float32():
    """Natural gradients in u at the same state are finite and match float64 (the backward
    pass maps cotangents to standard-parameter tangents without recovering S)."""
    rng = np.random.default_rng(1)
    D, Din = 3, 4
    M = 200.0 * rng.normal(size=(D, Din))
    A = rng.normal(size=(Din, Din))
    q = [0.02 * np.eye(D), M, A @ A.T + 50.0 * np.eye(Din), np.array(9.0)]
    p = [np.eye(D), np.zeros((D, Din)), 1e-3 * np.eye(Din), np.array(D + 2.0)]
    opts = dict(jitter_S=1e-5, jitter_V=1e-6)

    def grad(dtype, u=None):
        qs = E.MNIWStandard(*(jnp.asarray(a, dtype) for a in q))
        ps = E.MNIWStandard(*(jnp.asarray(a, dtype) for a in p))
        if u is None:
            u = E.mniw_to_unconstrained(E.mniw_to_natural(qs), **opts)
        # the KL alone: its natural gradient in u is the step to the prior
        g = jax.grad(lambda v: mniw_qtheta_terms(v, ps, **opts)[2])(u)
        return u, g

    with jax.enable_x64(True):
        u64, g64 = grad(jnp.float64)
        u64 = jax.tree.map(np.asarray, u64)
        g64 = jax.tree.map(np.asarray, g64)
    _, g32 = grad(jnp.float32, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), u64))
    for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g64), strict=True):
        a = np.asarray(a, np.float64)
        assert np.all(np.isfinite(a))
        assert np.max(np.abs(a - b)) <= 1e-3 * (1.0 + np.max(np.abs(b)))


def test_mniw_statistics_finite_for_rank_deficient_column_precision_float32():
    """A regime whose latents never move along one direction: V = sum u u' + 1e-6 I spans
    eigenvalues ~1e-6 .. 5e4, beyond what float32 can factor after forming L L' + jitter.
    The statistics, log-normaliser and KL stay finite (ridge at the rounding level), and the
    ridged factor reproduces V to float32 rounding of its largest entries."""
    rng = np.random.default_rng(3)
    D, Din, n = 3, 5, 400
    u = rng.normal(size=(n, Din)) * np.array([10.0, 3.0, 1.0, 0.0, 1.0])  # direction 3: none
    u[:, 4] = 1.0  # the bias input
    V64 = u.T @ u + 1e-6 * np.eye(Din)
    L = np.linalg.cholesky(V64 - 1e-6 * np.eye(Din)
                           + 1e-9 * np.eye(Din)).astype(np.float32)
    V32 = jnp.asarray(L) @ jnp.asarray(L).T + 1e-6 * jnp.eye(Din, dtype=jnp.float32)
    q = E.MNIWStandard(jnp.eye(D, dtype=jnp.float32) * 30.0,
                       jnp.asarray(rng.normal(size=(D, Din)), jnp.float32), V32,
                       jnp.asarray(400.0, jnp.float32))
    p = E.MNIWStandard(jnp.eye(D, dtype=jnp.float32), jnp.zeros((D, Din), jnp.float32),
                       1e-3 * jnp.eye(Din, dtype=jnp.float32), jnp.asarray(D + 2.0, jnp.float32))
    from numpyro_svae._linalg import psd_cholesky_ridged
    from numpyro_svae.expfam.mniw import (
        mniw_expected_stats_standard,
        mniw_kl_standard,
        mniw_log_normalizer_standard,
    )

    Lr = np.asarray(psd_cholesky_ridged(V32), np.float64)
    assert np.all(np.isfinite(Lr))
    assert np.max(np.abs(Lr @ Lr.T - V64)) <= 1e-5 * np.max(np.abs(V64))
    stats = mniw_expected_stats_standard(q)
    assert all(np.all(np.isfinite(np.asarray(a))) for a in stats)
    assert np.isfinite(float(mniw_log_normalizer_standard(q)))
    assert np.isfinite(float(mniw_kl_standard(q, p)))

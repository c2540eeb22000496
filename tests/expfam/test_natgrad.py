"""Natural gradients: straight-through map, prior-KL form, Fisher preconditioning, VB updates."""

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
    from_min,
    natural,
    stack,
    to_min,
)

families = pytest.mark.parametrize("fam", FAMILIES, ids=FAMILY_IDS)


def _weights(like, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=np.shape(x))), like)


def _smooth_loss(w, mu):
    """A nonlinear loss of the mean parameters (non-symmetric weights on matrix leaves)."""
    return sum(jnp.sum(jnp.sin(a * b)) for a, b in zip(w, mu, strict=True))


def test_straight_through_matches_value_and_identity_jacobian():
    with jax.enable_x64(True):
        eta = natural(FAMILIES[0], 0)
        st = E.straight_through(E.niw_expected_stats, eta)
        assert isinstance(st, E.NIWStats)
        assert_tree_close(st, E.niw_expected_stats(eta), **tol(jnp.float64))
        ct = E.NIWStats(*_weights(eta, 0))
        _, vjp = jax.vjp(lambda e: E.straight_through(E.niw_expected_stats, e), eta)
        (back,) = vjp(ct)
        assert_tree_close(back, E.NIWNatural(*ct), **tol(jnp.float64))


@families
def test_prior_kl_natgrad_form_gradient_matches_eta_minus_eta0(fam):
    with jax.enable_x64(True):
        J = JITTED[fam.name]
        q, p = natural(fam, 0), natural(fam, 1)

        def kl(e):
            return E.prior_kl_natgrad_form(e, p, fam.expected_stats, fam.log_normalizer)

        val, g = jax.jit(jax.value_and_grad(kl))(q)
        np.testing.assert_allclose(val, J.kl(q, p), **tol(jnp.float64))
        assert_tree_close(g, jax.tree.map(lambda a, b: a - b, q, p), **tol(jnp.float64))


@families
def test_natgrad_vjp_matches_explicit_fisher_preconditioning(fam):
    """custom-VJP gradient = G_u^-1 grad_u L with G_u = J' F J, in minimal coordinates.

    u keeps only lower-triangular entries of its raw matrices and eta only the lower triangle
    of its symmetric matrices, so J (d eta_min / d u_min) is square and invertible.  The loss
    is a nonlinear f(ST(E[t])) with non-symmetric weights (exercising the cotangent
    symmetrisation) plus the prior KL.  Also: the plain variant (natgrad=False) returns
    J' g_eta, which differs from the natural gradient.
    """
    with jax.enable_x64(True):
        J = JITTED[fam.name]
        eta, eta0 = natural(fam, 0), natural(fam, 1)
        u = J.to_u(eta)
        w = _weights(fam.expected_stats(eta), 7)

        def u_of(vec):
            return from_min(vec, u, fam.u_tril, symmetric=False)

        def plain_loss(vec):
            e = fam.from_u(u_of(vec), natgrad=False)
            return _smooth_loss(w, fam.expected_stats(e)) + fam.kl(e, eta0)

        def eta_min(vec):
            return to_min(fam.from_u(u_of(vec), natgrad=False), fam.eta_sym)

        def A_min(evec):
            return fam.log_normalizer(from_min(evec, eta, fam.eta_sym, symmetric=True))

        def st_loss(uu, natgrad):
            return st_loss_eta(fam.from_u(uu, natgrad=natgrad))

        def st_loss_eta(e):
            mu = E.straight_through(fam.expected_stats, e)
            kl = E.prior_kl_natgrad_form(e, eta0, fam.expected_stats, fam.log_normalizer)
            return _smooth_loss(w, mu) + kl

        @jax.jit
        def compute(u, umin):
            grad_u = jax.grad(plain_loss)(umin)
            Jac = jax.jacfwd(eta_min)(umin)
            F = jax.hessian(A_min)(to_min(eta, fam.eta_sym))
            G = Jac.T @ F @ Jac
            # plain variant (natgrad=False) with ST: J_T' g_eta, g_eta the eta-space cotangent
            g_eta = jax.grad(lambda e: st_loss_eta(e))(fam.from_u(u, natgrad=False))
            _, vjp = jax.vjp(lambda uu: fam.from_u(uu, natgrad=False), u)
            return (jnp.linalg.solve(G, grad_u), jax.grad(st_loss)(u, True), Jac,
                    jax.grad(st_loss)(u, False), vjp(g_eta)[0])

        want, got_full, Jac, plain_full, plain_ref = compute(u, to_min(u, fam.u_tril))
        assert_tree_close(plain_full, plain_ref, rtol=1e-8, atol=1e-10)
        assert float(jnp.max(jnp.abs(to_min(plain_full, fam.u_tril) - want))) > 1e-3
        assert Jac.shape[0] == Jac.shape[1]
        # dead (strict upper) coordinates receive exactly zero
        for g, f in zip(got_full, fam.u_tril, strict=True):
            if f:
                np.testing.assert_array_equal(jnp.triu(g, 1), 0.0)
        # G_u is built from a Hessian and solved: a few digits are lost to its conditioning
        np.testing.assert_allclose(to_min(got_full, fam.u_tril), want, rtol=1e-7, atol=1e-9)


# ------------------------------------------------------------------------------------------
# one natural-gradient step with learning rate 1 = the conjugate (VB) update
# ------------------------------------------------------------------------------------------


def _natgrad_step_checks(fam, eta_q, eta0, stats):
    """eta-space step is exact; u-space gradient maps to the same eta direction."""

    def loss(e):
        mu = E.straight_through(fam.expected_stats, e)
        kl = E.prior_kl_natgrad_form(e, eta0, fam.expected_stats, fam.log_normalizer)
        return -E.tree_vdot(mu, stats) + kl

    @jax.jit
    def run(eta_q):
        g = jax.grad(loss)(eta_q)
        u = fam.to_u(eta_q)
        g_u = jax.grad(lambda uu: loss(fam.from_u(uu, natgrad=True)))(u)
        _, d_eta = jax.jvp(lambda uu: fam.from_u(uu, natgrad=False), (u,), (g_u,))
        eps = 1e-8
        small = fam.from_u(jax.tree.map(lambda a, b: a - eps * b, u, g_u))
        return g, d_eta, small

    g, d_eta, small = run(eta_q)
    stepped = jax.tree.map(lambda a, b: a - b, eta_q, g)
    target = jax.tree.map(lambda a, b: a + b, eta0, stats)
    assert_tree_close(stepped, target, **tol(jnp.float64))
    # u-space: J_T g_u equals the eta-space natural gradient exactly
    assert_tree_close(d_eta, g, **tol(jnp.float64))
    # and a small SGD step in u moves eta by -eps g to first order (O(eps^2) residual; eps = 1e-8
    # balances it against rounding in the difference quotient)
    for a, b, c in zip(small, eta_q, g, strict=True):
        np.testing.assert_allclose((a - b) / 1e-8, -c, rtol=1e-4, atol=1e-4)
    return stepped


def test_natgrad_step_equals_vb_update_niw_gaussian_data():
    with jax.enable_x64(True):
        D, n = 2, 25
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=(n, D)) @ np.array([[1.0, 0.3], [0.0, 0.5]]) + 1.0)
        m0, lam0, nu0, S0 = jnp.zeros(D), 0.5, D + 2.0, 2.0 * jnp.eye(D)
        eta0 = E.niw_to_natural(E.NIWStandard(S0, m0, jnp.asarray(lam0), jnp.asarray(nu0)))
        stats = E.NIWNatural(x.T @ x, x.sum(0), jnp.asarray(float(n)), jnp.asarray(float(n)))
        post = _natgrad_step_checks(FAMILIES[0], natural(FAMILIES[0], 3), eta0, stats)
        # textbook NIW posterior
        xbar = x.mean(0)
        C = (x - xbar).T @ (x - xbar)
        lam_n = lam0 + n
        m_n = (lam0 * m0 + n * xbar) / lam_n
        S_n = S0 + C + lam0 * n / lam_n * jnp.outer(xbar - m0, xbar - m0)
        want = E.NIWStandard(S_n, m_n, jnp.asarray(lam_n), jnp.asarray(nu0 + n))
        assert_tree_close(E.niw_to_standard(post), want, **tol(jnp.float64))


def test_natgrad_step_equals_vb_update_mniw_regression():
    with jax.enable_x64(True):
        D, n = 2, 30
        rng = np.random.default_rng(1)
        z = rng.normal(size=(n, D))
        zt = jnp.asarray(np.concatenate([z, np.ones((n, 1))], 1))  # [n, Din]
        X_true = np.array([[0.9, 0.1, 0.5], [-0.2, 0.8, -0.3]])
        y = jnp.asarray(np.asarray(zt) @ X_true.T + 0.1 * rng.normal(size=(n, D)))
        S0, V0, nu0 = 2.0 * jnp.eye(D), 0.1 * jnp.eye(D + 1), D + 2.0
        M0 = jnp.concatenate([0.9 * jnp.eye(D), jnp.zeros((D, 1))], 1)
        eta0 = E.mniw_to_natural(E.MNIWStandard(S0, M0, V0, jnp.asarray(nu0)))
        stats = E.MNIWNatural(y.T @ y, zt.T @ y, zt.T @ zt, jnp.asarray(float(n)))
        post = _natgrad_step_checks(FAMILIES[1], natural(FAMILIES[1], 3), eta0, stats)
        V_n = V0 + zt.T @ zt
        M_n = jnp.linalg.solve(V_n, V0 @ M0.T + zt.T @ y).T
        S_n = S0 + y.T @ y + M0 @ V0 @ M0.T - M_n @ V_n @ M_n.T
        want = E.MNIWStandard(S_n, M_n, V_n, jnp.asarray(nu0 + n))
        assert_tree_close(E.mniw_to_standard(post), want, **tol(jnp.float64))


def test_natgrad_step_equals_vb_update_dirichlet_counts():
    with jax.enable_x64(True):
        alpha0 = jnp.asarray([0.5, 0.5, 2.0])
        counts = jnp.asarray([3.0, 0.0, 7.0])
        eta0 = E.dirichlet_to_natural(E.DirichletStandard(alpha0))
        post = _natgrad_step_checks(FAMILIES[2], natural(FAMILIES[2], 3), eta0,
                                    E.DirichletNatural(counts))
        np.testing.assert_allclose(E.dirichlet_to_standard(post).alpha, alpha0 + counts,
                                   **tol(jnp.float64))


@families
def test_large_natgrad_steps_stay_in_domain(fam):
    """SGD in u with lr = 1 and 10 on a loss with huge statistics keeps eta valid."""
    eta, eta0 = natural(fam, 0), natural(fam, 1)
    stats = jax.tree.map(lambda x: 200.0 * x, natural(fam, 2))

    @jax.jit
    def step(u, lr):
        def loss(uu):
            e = fam.from_u(uu)
            mu = E.straight_through(fam.expected_stats, e)
            kl = E.prior_kl_natgrad_form(e, eta0, fam.expected_stats, fam.log_normalizer)
            return -E.tree_vdot(mu, stats) + kl

        g = jax.grad(loss)(u)
        return jax.tree.map(lambda a, b: a - lr * b, u, g)

    u = JITTED[fam.name].to_u(eta)
    for lr in (1.0, 1.0, 0.5, 1.0, 1.0):
        u = step(u, lr)
        e = JITTED[fam.name].from_u(u)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in e)
        fam.to_natural(JITTED[fam.name].to_standard(e))  # validates: raises if out of domain


def test_natgrad_vjp_under_vmap_matches_per_regime():
    """MNIW with a leading K axis: vmapped natural gradients = per-regime ones."""
    with jax.enable_x64(True):
        fam = FAMILIES[1]
        etas = stack([natural(fam, s) for s in (0, 1)])
        w = _weights(natural(fam, 0), 2)

        def loss(u):  # linear in eta: the cotangent on eta is w itself
            return E.tree_vdot(w, E.mniw_from_unconstrained(u))

        u = E.mniw_to_unconstrained(etas)
        g_batched = jax.jit(jax.vmap(jax.grad(loss)))(u)
        grad = jax.jit(jax.grad(loss))
        for k in range(2):
            u_k = jax.tree.map(lambda x, k=k: x[k], u)
            assert_tree_close(jax.tree.map(lambda x, k=k: x[k], g_batched), grad(u_k),
                              **tol(jnp.float64))


def test_mniw_without_bias_matches_grad_and_keeps_square_eta2_unsymmetrised():
    """Din = D (no bias column): eta2 = V M' is square but not symmetric; the natural-gradient
    VJP must symmetrise only eta1 and eta3."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        D = 2
        std = E.MNIWStandard(3.0 * jnp.eye(D) + 0.5, jnp.asarray(rng.normal(size=(D, D))),
                             jnp.asarray([[2.0, 0.3], [0.3, 1.0]]), jnp.asarray(4.5))
        eta = E.mniw_to_natural(std)
        w = _weights(eta, 4)

        @jax.jit
        def run(eta):
            g = jax.grad(E.mniw_log_normalizer)(eta)
            u = E.mniw_to_unconstrained(eta)
            g_u = jax.grad(lambda uu: E.tree_vdot(w, E.mniw_from_unconstrained(uu)))(u)
            w_sym = E.MNIWNatural(0.5 * (w[0] + w[0].T), w[1], 0.5 * (w[2] + w[2].T), w[3])
            _, want = jax.jvp(E.mniw_to_unconstrained, (eta,), (w_sym,))
            return g, E.mniw_expected_stats(eta), g_u, want

        g, mu, g_u, want = run(eta)
        assert eta.eta2.shape == (D, D)
        for a, b in zip(g, mu, strict=True):
            np.testing.assert_allclose(a, b, **tol(jnp.float64))
        assert_tree_close(g_u, want, **tol(jnp.float64))

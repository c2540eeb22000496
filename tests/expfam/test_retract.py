"""Exact natural-coordinate steps (``*_natural_step``, ``*_retract``).

Oracles: the natural parameters themselves in float64 (``eta(std) + J dstd`` formed and
converted back with ``*_to_standard``), the conjugate update ``(1 - rho) eta + rho eta_target``
and the linearised SGD step ``u + du`` it must agree with to first order.  The float32 case
is the mocap6 state where the natural-parameter path loses ``S`` (``|M| ~ 700``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_svae import expfam as E
from numpyro_svae.expfam.dirichlet import dirichlet_retract
from numpyro_svae.expfam.mniw import _std_to_eta, mniw_natural_step, mniw_retract
from numpyro_svae.expfam.niw import niw_natural_step, niw_retract
from tests.expfam._cases import assert_tree_close, mocap6_mniw_state

MNIW_OPTS = dict(jitter_S=1e-3, jitter_V=1e-4)


def _spd(rng, n, batch, scale=1.0):
    A = rng.normal(size=batch + (n, n))
    return scale * (A @ np.swapaxes(A, -1, -2) / n + np.eye(n))


def _mniw(rng, K=3, D=2, Din=3):
    return E.MNIWStandard(jnp.asarray(_spd(rng, D, (K,), 2.0)),
                          jnp.asarray(rng.normal(size=(K, D, Din))),
                          jnp.asarray(_spd(rng, Din, (K,), 3.0)),
                          jnp.asarray(D + 3.0 + rng.uniform(size=K)))


def _niw(rng, K=3, D=2):
    return E.NIWStandard(jnp.asarray(_spd(rng, D, (K,), 2.0)),
                         jnp.asarray(rng.normal(size=(K, D))),
                         jnp.asarray(0.5 + rng.uniform(size=K)),
                         jnp.asarray(D + 2.0 + rng.uniform(size=K)))


def _small_tangent(rng, std, scale=0.1):
    def leaf(a):
        d = scale * rng.normal(size=a.shape)
        if a.ndim >= 2 and a.shape[-1] == a.shape[-2]:
            d = 0.5 * (d + np.swapaxes(d, -1, -2))
        return jnp.asarray(d)
    return jax.tree.map(leaf, std)


@pytest.mark.parametrize("family", ["mniw", "niw"])
def test_natural_step_is_the_natural_parameter_step(family):
    """``*_natural_step(std, dstd)`` = ``to_standard(eta(std) + d eta[dstd])`` in float64."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        if family == "mniw":
            std, step, to_eta, to_std = _mniw(rng), mniw_natural_step, _std_to_eta, \
                E.mniw_to_standard
        else:
            std, step, to_std = _niw(rng), niw_natural_step, E.niw_to_standard
            to_eta = E.niw_to_natural
        dstd = _small_tangent(rng, std)
        eta, deta = jax.jvp(to_eta, (std,), (dstd,))
        want = to_std(jax.tree.map(jnp.add, eta, deta))
        assert_tree_close(step(std, dstd), want, rtol=1e-10, atol=1e-10)


def _u_and_grad_to_target(family, rng, rho):
    """u of q, and the SGD step ``-rho g_u`` with ``g_u`` the natural gradient of the
    conjugate objective whose optimum is a target q* (``g_eta = eta - eta*``)."""
    if family == "mniw":
        q, qt = _mniw(rng), _mniw(rng)
        to_u = lambda s: E.mniw_to_unconstrained(s, **MNIW_OPTS)
        from_u = lambda v: E.mniw_from_unconstrained(v, **MNIW_OPTS)
        to_nat, retract = E.mniw_to_natural, lambda v, d: mniw_retract(v, d, **MNIW_OPTS)
    elif family == "niw":
        q, qt = _niw(rng), _niw(rng)
        to_u, from_u = E.niw_to_unconstrained, E.niw_from_unconstrained
        to_nat, retract = E.niw_to_natural, niw_retract
    else:
        q = E.DirichletStandard(jnp.asarray(0.3 + 3.0 * rng.uniform(size=(2, 4))))
        qt = E.DirichletStandard(jnp.asarray(0.05 + 3.0 * rng.uniform(size=(2, 4))))
        to_u, from_u = E.dirichlet_to_unconstrained, E.dirichlet_from_unconstrained
        to_nat, retract = E.dirichlet_to_natural, dirichlet_retract
    u, eta_t = to_u(to_nat(q)), to_nat(qt)
    # <eta, sg(g)> has the natural-gradient VJP (d u / d eta) g through `from_u`
    g_eta = jax.tree.map(jnp.subtract, to_nat(q), eta_t)
    g_u = jax.grad(lambda v: E.tree_vdot(from_u(v), g_eta))(u)
    du = jax.tree.map(lambda a: -rho * a, g_u)
    return u, du, to_nat(q), eta_t, from_u, retract


@pytest.mark.parametrize("rho", [0.3, 1.0])
@pytest.mark.parametrize("family", ["mniw", "niw", "dirichlet"])
def test_retract_lands_on_the_conjugate_update(family, rho):
    """A natural-gradient SGD step of size rho on the conjugate objective is exactly
    ``(1 - rho) eta + rho eta*``; the linearised step ``u + du`` is not (for rho = 1)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        u, du, eta, eta_t, from_u, retract = _u_and_grad_to_target(family, rng, rho)
        u_new, t = retract(u, du)
        np.testing.assert_array_equal(np.asarray(t), 1.0)
        want = jax.tree.map(lambda a, b: (1 - rho) * a + rho * b, eta, eta_t)
        assert_tree_close(from_u(u_new), want, rtol=1e-8, atol=1e-8)
        if rho == 1.0 and family != "dirichlet":  # the straight line in u misses it
            lin = from_u(jax.tree.map(jnp.add, u, du))
            err = max(float(jnp.max(jnp.abs(a - b)))
                      for a, b in zip(jax.tree.leaves(lin), jax.tree.leaves(want), strict=True))
            assert err > 1e-3


@pytest.mark.parametrize("family", ["mniw", "niw", "dirichlet"])
def test_retract_agrees_with_linear_step_to_first_order(family):
    """For a tiny step the retraction and ``u + du`` differ by O(|du|^2)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        errs = []
        for rho in (1e-3, 1e-4):
            u, du, *_, retract = _u_and_grad_to_target(family, rng, rho)
            u_new, _ = retract(u, du)
            lin = jax.tree.map(jnp.add, u, du)
            size = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(du))
            err = max(float(jnp.max(jnp.abs(jnp.tril(a) - jnp.tril(b)) if a.ndim >= 2 and
                                   a.shape[-1] == a.shape[-2] else jnp.abs(a - b)))
                      for a, b in zip(jax.tree.leaves(u_new), jax.tree.leaves(lin), strict=True))
            errs.append(err / size)
            rng = np.random.default_rng(2)  # same q, target: only the step size changes
        assert errs[1] < 0.2 * errs[0] + 1e-9  # the relative error shrinks with the step


def test_retract_halves_per_regime_outside_the_domain():
    """A step that would make one regime's V indefinite is halved for that regime only;
    a step that is invalid at every size leaves the regime where it is."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        q = _mniw(rng, K=3)
        u = E.mniw_to_unconstrained(q, **MNIW_OPTS)
        std = q
        # standard-coordinate tangents: regime 0 fine, regime 1 V -> V - 1.5 V (halve once
        # to V - 0.75 V), regime 2 nu pushed far below D - 1 at every size tried
        dstd = jax.tree.map(jnp.zeros_like, std)
        dstd = dstd._replace(V=dstd.V.at[0].set(0.1 * std.V[0]).at[1].set(-1.5 * std.V[1]),
                             nu=dstd.nu.at[2].set(-1e6))
        # the u-step whose tangent is dstd: (d u / d std) dstd
        _, du = jax.jvp(lambda s: E.mniw_to_unconstrained(s, **MNIW_OPTS), (std,), (dstd,))
        u_new, t = mniw_retract(u, du, **MNIW_OPTS)
        np.testing.assert_allclose(np.asarray(t), [1.0, 0.5, 0.0])
        new = E.mniw_to_standard(E.mniw_from_unconstrained(u_new, **MNIW_OPTS))
        np.testing.assert_allclose(new.V[0], 1.1 * std.V[0], rtol=1e-8)
        np.testing.assert_allclose(new.V[1], 0.25 * std.V[1], rtol=1e-8)
        assert_tree_close(jax.tree.map(lambda a: a[2], new), jax.tree.map(lambda a: a[2], std),
                          rtol=1e-8, atol=1e-8)


def test_mniw_retract_float32_where_natural_parameters_lose_S():
    """The mocap6 state (``|M| ~ 700``, ``V ~ 100 I``, ``S ~ 0.01``): a float32 step to
    a target lands within float32 rounding of the float64 step, while forming ``eta``
    in float32 and converting back misses ``S`` by more than a tenth of its size."""
    rng = np.random.default_rng(0)
    q = mocap6_mniw_state(rng)
    D, Din = q[1].shape
    opts = dict(jitter_S=1e-5, jitter_V=1e-6)
    dstd = [0.002 * np.eye(D), 0.002 * rng.normal(size=(D, Din)), 5.0 * np.eye(Din),
            np.array(1.0)]

    def run(dtype):
        std = E.MNIWStandard(*(jnp.asarray(a, dtype) for a in q))
        d = E.MNIWStandard(*(jnp.asarray(a, dtype) for a in dstd))
        u = E.mniw_to_unconstrained(std, **opts)
        _, du = jax.jvp(lambda s: E.mniw_to_unconstrained(s, **opts), (std,), (d,))
        u_new, t = mniw_retract(u, du, **opts)
        return u_new, t, mniw_natural_step(std, d).S

    with jax.enable_x64(True):
        u64, t64, S_ref = run(jnp.float64)
        u64, S_ref = jax.tree.map(np.asarray, u64), np.asarray(S_ref)
    u32, t32, _ = run(jnp.float32)
    assert float(t32) == 1.0 and float(t64) == 1.0  # the step is inside the domain
    for a, b in zip(jax.tree.leaves(u32), jax.tree.leaves(u64), strict=True):
        assert np.max(np.abs(np.asarray(a, np.float64) - b)) <= 1e-3 * (1 + np.max(np.abs(b)))
    # the natural-parameter route in float32 loses S (error of the order of S itself)
    std32 = E.MNIWStandard(*(jnp.asarray(a, jnp.float32) for a in q))
    d32 = E.MNIWStandard(*(jnp.asarray(a, jnp.float32) for a in dstd))
    eta, deta = jax.jvp(_std_to_eta, (std32,), (d32,))
    S_nat = np.asarray(E.mniw_to_standard(jax.tree.map(jnp.add, eta, deta)).S, np.float64)
    assert not np.max(np.abs(S_nat - S_ref)) <= 0.1 * np.max(np.abs(S_ref))


@pytest.mark.parametrize("family", ["mniw", "niw", "dirichlet"])
def test_guarded_step_keeps_the_straight_line_where_it_is_accurate(family):
    """Small steps: ``guarded=True`` returns ``u + du`` itself (bit for bit), ``t = 1``."""
    with jax.enable_x64(True):
        u, du, *_ = _u_and_grad_to_target(family, np.random.default_rng(4), 1e-2)
        retract = {"mniw": lambda v, d, **k: mniw_retract(v, d, **MNIW_OPTS, **k),
                   "niw": niw_retract, "dirichlet": dirichlet_retract}[family]
        u_new, t = retract(u, du, guarded=True)
        np.testing.assert_array_equal(np.asarray(t), 1.0)
        for a, b in zip(jax.tree.leaves(u_new), jax.tree.leaves(jax.tree.map(jnp.add, u, du)),
                        strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_guarded_step_takes_the_exact_step_where_the_straight_line_overshoots(dtype):
    """The mocap6 failure (docs/design.md, the optimizer): a concentration at its softplus
    floor that the natural gradient pushes up.  SGD on ``u`` moves ``u`` by
    ``dalpha / sigmoid(u)``, so ``alpha`` jumps from ~0 to ~1e7; the exact step adds
    ``dalpha``.  The guard takes the exact step for that row only and keeps the straight line
    for the healthy row."""
    with jax.enable_x64(dtype == jnp.float64):
        floor = 0.01
        u = E.DirichletUnconstrained(jnp.asarray([[-18.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype))
        dalpha = jnp.asarray([[0.3, -0.1, 0.0], [0.2, -0.2, 0.1]], dtype)  # natural step
        du = E.DirichletUnconstrained(dalpha / jax.nn.sigmoid(u.u))  # first-order SGD step
        alpha = lambda v: jax.nn.softplus(v.u) + floor
        lin = alpha(E.DirichletUnconstrained(u.u + du.u))
        assert float(lin[0, 0]) > 1e6  # the straight line overshoots by seven orders
        ex, t_ex = dirichlet_retract(u, du, min_concentration=floor)
        got, t = dirichlet_retract(u, du, min_concentration=floor, guarded=True)
        np.testing.assert_array_equal(np.asarray(t), 1.0)
        np.testing.assert_allclose(alpha(got)[0], alpha(u)[0] + dalpha[0],
                                   rtol=1e-5 if dtype == jnp.float32 else 1e-10)
        np.testing.assert_array_equal(got.u[0], ex.u[0])
        np.testing.assert_array_equal(got.u[1], u.u[1] + du.u[1])  # healthy row: SGD
        assert got.u.dtype == dtype


def test_guarded_step_takes_the_exact_step_for_a_non_finite_straight_line():
    with jax.enable_x64(True):
        u = E.DirichletUnconstrained(jnp.asarray([[1.0, 2.0]]))
        du = E.DirichletUnconstrained(jnp.asarray([[jnp.inf, 0.0]]))
        got, _ = dirichlet_retract(u, du, guarded=True)
        ex, _ = dirichlet_retract(u, du)
        np.testing.assert_array_equal(got.u, ex.u)

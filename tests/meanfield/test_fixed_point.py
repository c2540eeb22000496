"""Generic implicit fixed-point solver on a toy two-block contraction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_svae.meanfield.fixed_point import FixedPointOptions, fixed_point
from tests._tol import tol


def _step(w, th, aux):
    W, b = th
    x, y = w
    x = jnp.tanh(W @ y + b)
    y = jnp.tanh(W.T @ x - b * aux)
    return (x, y), 1.0 + jnp.sum(x**2) + jnp.sum(y**2)


def _parallel(w, th, aux):
    W, b = th
    x, y = w
    return (jnp.tanh(W @ y + b), jnp.tanh(W.T @ x - b * aux))


def _loss(th, solver, max_iters=200, **kw):
    w0 = (jnp.zeros(3, th[0].dtype), jnp.zeros(3, th[0].dtype))
    opts = FixedPointOptions(max_iters=max_iters, rtol=1e-14, solver=solver,
                             adjoint_max_iters=500, adjoint_tol=1e-14, **kw)
    (x, y), info = fixed_point(_step, _parallel, th, jnp.ones((), th[0].dtype), w0, options=opts)
    return jnp.sum(jnp.sin(x)) + jnp.sum(y * jnp.arange(3.0)), info


def _theta():
    W = 0.4 * jax.random.normal(jax.random.key(1), (3, 3))
    b = jnp.array([0.3, -0.2, 0.5])
    return W, b


_grad = jax.jit(jax.grad(lambda th, s: _loss(th, s)[0]), static_argnums=1)


@pytest.mark.parametrize("solver", ["richardson", "gmres", "bicgstab"])
def test_toy_implicit_grad_matches_unrolled_and_finite_differences(solver):
    with jax.enable_x64(True):
        th = _theta()
        g_imp = _grad(th, solver)
        g_unr = _grad(th, "unrolled")
        for a, b in zip(g_imp, g_unr, strict=True):
            np.testing.assert_allclose(a, b, **tol(jnp.float64))
        # central finite differences along a random direction of each leaf
        f = jax.jit(lambda th: _loss(th, "richardson")[0])
        eps = 1e-6
        for i, leaf in enumerate(th):
            d = jax.random.normal(jax.random.key(7 + i), leaf.shape)
            tp = list(th)
            tm = list(th)
            tp[i] = leaf + eps * d
            tm[i] = leaf - eps * d
            fd = (f(tuple(tp)) - f(tuple(tm))) / (2 * eps)
            # FD truncation/rounding error ~ eps^2 + 1e-16 / eps
            np.testing.assert_allclose(jnp.sum(g_imp[i] * d), fd, rtol=1e-7, atol=1e-8)


def test_toy_forced_fallback_matches_onestep():
    with jax.enable_x64(True):
        th = _theta()
        f = jax.jit(jax.grad(lambda th, s, kw: _loss(th, s, **dict(kw))[0]), static_argnums=(1, 2))
        one = f(th, "onestep", (("max_iters", 3),))
        cap = f(th, "richardson", (("max_iters", 3),))  # unconverged forward -> fallback
        tiny = f(th, "richardson", (("fallback_residual", 0.0),))
        one200 = f(th, "onestep", ())
        for a, b, c, d in zip(one, cap, tiny, one200, strict=True):
            np.testing.assert_allclose(a, b, **tol(jnp.float64))
            np.testing.assert_allclose(c, d, **tol(jnp.float64))


def test_toy_forward_info_and_float32():
    th = _theta()  # float32
    val, info = jax.jit(lambda th: _loss(th, "richardson", max_iters=2))(th)
    assert int(info.num_iters) == 2 and not bool(info.converged) and bool(info.used_fallback)
    g = _grad(th, "richardson")
    assert all(x.dtype == jnp.float32 and np.all(np.isfinite(x)) for x in g)


def test_toy_nan_cotangent_does_not_reach_parameters():
    with jax.enable_x64(True):
        th = _theta()

        def bad(th):
            w0 = (jnp.zeros(3), jnp.zeros(3))
            (x, y), _ = fixed_point(_step, _parallel, th, jnp.ones(()), w0)
            return jnp.sum(jnp.sqrt(x - 10.0))  # NaN cotangent

        g = jax.jit(jax.grad(bad))(th)
        assert all(np.all(np.isfinite(x)) for x in g)


def test_options_are_validated():
    th = _theta()
    with pytest.raises(ValueError, match="solver"):
        _loss(th, "newton")
    with pytest.raises(ValueError, match="max_iters"):
        _loss(th, "richardson", max_iters=0)


def test_probe_gradient_reports_backward_diagnostics():
    with jax.enable_x64(True):
        th = _theta()
        w0 = (jnp.zeros(3), jnp.zeros(3))

        def f(probe, fallback_residual):
            opts = FixedPointOptions(max_iters=200, rtol=1e-14, adjoint_max_iters=500,
                                     adjoint_tol=1e-14, fallback_residual=fallback_residual)
            (x, y), _ = fixed_point(_step, _parallel, th, jnp.ones(()), w0, options=opts,
                                    probe=probe)
            return jnp.sum(jnp.sin(x)) + jnp.sum(y)

        g = jax.jit(jax.grad(f), static_argnums=1)
        ok = g(jnp.zeros(2), 1e2)
        forced = g(jnp.zeros(2), 0.0)
        assert float(ok[0]) < 1e-10 and float(ok[1]) == 0.0
        assert float(forced[0]) < 1e-10 and float(forced[1]) == 1.0

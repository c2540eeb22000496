"""`lds_expected_stats`: smoother values, and a reverse rule from forward mode that must equal
plain reverse-mode autodiff through `lds_smoother` (float64) and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_svae.messages import LDSPotentials, lds_expected_stats, lds_smoother


def _spd(rng, *batch, D, scale=1.0):
    A = rng.normal(size=(*batch, D, D))
    return scale * (A @ np.swapaxes(A, -1, -2) + D * np.eye(D))


def _potentials(rng, T, D, full_R, dtype=np.float64):
    R = _spd(rng, T, D=D) if full_R else np.abs(rng.normal(size=(T, D))) + 0.1
    pot = LDSPotentials(
        J_init=_spd(rng, D=D), h_init=rng.normal(size=D), J11=_spd(rng, T - 1, D=D, scale=0.3),
        J12=0.3 * rng.normal(size=(T - 1, D, D)), J22=_spd(rng, T - 1, D=D),
        h1=rng.normal(size=(T - 1, D)), h2=rng.normal(size=(T - 1, D)), R=R,
        r=rng.normal(size=(T, D)))
    return LDSPotentials(*(jnp.asarray(x, dtype) for x in pot))


def _objective(stats_fn, W, mask):
    """A scalar touching every output, so that every cotangent is non-zero."""
    w_logz, w_z, w_zz, w_zn = W

    def f(pot):
        s = stats_fn(pot, mask)
        return (w_logz * s.log_normalizer + jnp.sum(w_z * s.Ez) + jnp.sum(w_zz * s.Ezz)
                + jnp.sum(w_zn * s.Ezz_next))

    return f


def _weights(rng, T, D):
    return (0.7, jnp.asarray(rng.normal(size=(T, D))), jnp.asarray(rng.normal(size=(T, D, D))),
            jnp.asarray(rng.normal(size=(T - 1, D, D))))


@pytest.mark.parametrize("T,D,full_R,masked", [
    (7, 3, False, False), (7, 3, True, True), (2, 2, True, False), (1, 2, False, False),
    (5, 1, False, True)])
def test_values_and_gradient_equal_reverse_mode_through_the_smoother(T, D, full_R, masked):
    with jax.enable_x64(True):
        rng = np.random.default_rng(T * 10 + D)
        pot = _potentials(rng, T, D, full_R)
        mask = jnp.asarray(rng.random(T) > 0.4) if masked else None
        W = _weights(rng, T, D)
        ours, ref = _objective(lds_expected_stats, W, mask), _objective(lds_smoother, W, mask)
        np.testing.assert_allclose(ours(pot), ref(pot), rtol=1e-13)
        g_ours, g_ref = jax.grad(ours)(pot), jax.grad(ref)(pot)
        for name, a, b in zip(LDSPotentials._fields, g_ours, g_ref, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11, err_msg=name)


def test_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        T, D = 5, 2
        pot = _potentials(rng, T, D, full_R=False)
        f = _objective(lds_expected_stats, _weights(rng, T, D), None)
        g = jax.grad(f)(pot)
        for name in ("h1", "J12", "R"):
            d = jnp.asarray(rng.normal(size=getattr(pot, name).shape))
            eps = 1e-6
            up = f(pot._replace(**{name: getattr(pot, name) + eps * d}))
            dn = f(pot._replace(**{name: getattr(pot, name) - eps * d}))
            np.testing.assert_allclose((up - dn) / (2 * eps), jnp.sum(getattr(g, name) * d),
                                       rtol=1e-6, err_msg=name)


def test_float32_batched_under_jit_close_to_float64():
    rng = np.random.default_rng(5)
    B, T, D = 3, 20, 4
    with jax.enable_x64(True):
        pots64 = [jax.tree.map(np.asarray, _potentials(rng, T, D, full_R=False))
                  for _ in range(B)]
        W = jax.tree.map(np.asarray, _weights(rng, T, D))

    def batched(pots, dtype):
        stacked = jax.tree.map(lambda *x: jnp.asarray(np.stack(x), dtype), *pots)
        f = _objective(lds_expected_stats, jax.tree.map(lambda w: jnp.asarray(w, dtype), W),
                       None)
        return jax.jit(jax.grad(lambda p: jnp.sum(jax.vmap(f)(p))))(stacked)

    with jax.enable_x64(True):
        g64 = batched(pots64, jnp.float64)
    g32 = batched(pots64, jnp.float32)
    for name, a, b in zip(LDSPotentials._fields, g32, g64, strict=True):
        assert a.dtype == jnp.float32
        a, b = np.asarray(a, np.float64), np.asarray(b)
        assert np.max(np.abs(a - b)) < 1e-3 * (np.max(np.abs(b)) + 1e-12), name


def test_bad_input_names_the_argument():
    rng = np.random.default_rng(0)
    pot = _potentials(rng, 4, 2, full_R=False, dtype=np.float32)
    with pytest.raises(TypeError, match="LDSPotentials"):
        lds_expected_stats(tuple(pot))
    with pytest.raises(ValueError, match="mask"):
        lds_expected_stats(pot, jnp.ones(3))

"""Structured mean field for the SLDS: fixed point, KL, implicit gradients, special cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_svae.meanfield.fixed_point import FixedPointOptions
from numpyro_svae.meanfield.kl import mf_sample
from numpyro_svae.meanfield.potentials import SLDSGlobalPotentials, lds_to_hmm_log_potentials
from numpyro_svae.meanfield.slds import mf_fixed_point
from numpyro_svae.messages.hmm import HMMPotentials, hmm_sample
from numpyro_svae.messages.lds import lds_smoother
from tests._tol import tol
from tests.meanfield._problems import random_encoder, random_globals

T, D, K = 6, 2, 2
TIGHT = dict(max_iters=300, rtol=1e-13, adjoint_max_iters=600, adjoint_tol=1e-13)


def _problem(seed=0, full=False, dtype=None):
    g = random_globals(jax.random.key(100 + seed), D, K, dtype=dtype)
    R, r = random_encoder(jax.random.key(200 + seed), T, D, full=full, dtype=dtype)
    return R, r, g


def _loss_fn(solver, opts=TIGHT, leading=False):
    """Linear functional of every output of q plus the local KL."""
    W = jax.random.normal(jax.random.key(5), (T, D))
    V = jax.random.normal(jax.random.key(6), (T, D, D))
    Tk = T if leading else T - 1
    U = jax.random.normal(jax.random.key(7), (Tk, K))

    def loss(R, r, g, init, mask):
        res, info = mf_fixed_point(
            R, r, g, mask=mask, init_marginals=init, leading_regime=leading,
            options=FixedPointOptions(solver=solver, **opts),
        )
        val = (jnp.sum(res.Ez * W.astype(R.dtype)) + jnp.sum(res.Ezz * V.astype(R.dtype))
               + jnp.sum(res.marginals * U.astype(R.dtype)) + res.local_kl)
        return val, (info, res.marginals, res.used_marginals, res.local_kl)

    return loss


def _init(seed=3, leading=False):
    Tk = T if leading else T - 1
    return jax.random.dirichlet(jax.random.key(seed), jnp.ones(K), (Tk,))


@jax.jit
def _all_grads(R, r, g, init, mask):
    """One compilation for every gradient compared below."""
    out = {}
    for name, solver, opts in (
        ("implicit", "richardson", TIGHT),
        ("unrolled", "unrolled", TIGHT),
        ("onestep", "onestep", TIGHT),
        ("tiny", "richardson", dict(TIGHT, fallback_residual=0.0)),
    ):
        loss = _loss_fn(solver, opts)
        (val, info), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
            R, r, g, init, mask)
        out[name] = (val, info, grads)
    return out


@pytest.fixture(scope="module")
def grads64():
    with jax.enable_x64(True):
        R, r, g = _problem()
        init = _init()
        mask = jnp.ones((T,)).at[2].set(0.0)
        return (R, r, g, init, mask), _all_grads(R, r, g, init, mask)


def _flat(grads):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(grads)])


def test_fixed_point_reached_matches_one_more_block_update(grads64):
    # `marginals` is the block update applied to the returned fixed point `used_marginals`
    _, out = grads64
    info, q_next, q_star, kl = out["implicit"][1]
    assert bool(info.converged) and int(info.num_iters) < TIGHT["max_iters"]
    np.testing.assert_allclose(q_next, q_star, atol=1e-9)
    assert float(kl) >= 0.0


def test_implicit_grad_matches_unrolled(grads64):
    _, out = grads64
    assert bool(out["implicit"][1][0].converged)
    np.testing.assert_allclose(out["implicit"][0], out["unrolled"][0], **tol(jnp.float64))
    a, b = _flat(out["implicit"][2]), _flat(out["unrolled"][2])
    # both are exact up to the forward tolerance 1e-13 and the adjoint tolerance
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # the one-step gradient differs: the test is not vacuous
    assert np.max(np.abs(_flat(out["onestep"][2]) - a)) > 1e-4


def test_implicit_grad_matches_finite_differences(grads64):
    (R, r, g, init, mask), out = grads64
    g_imp = out["implicit"][2]
    with jax.enable_x64(True):
        f = jax.jit(lambda R, r, g: _loss_fn("richardson")(R, r, g, init, mask)[0])
        args = [R, r, g]
        eps = 1e-5
        # one random central difference per field (encoder R, r and every global potential)
        fields = [(0, None), (1, None)] + [(2, n) for n in SLDSGlobalPotentials._fields]
        for i, (pos, name) in enumerate(fields):
            x = args[pos] if name is None else getattr(args[pos], name)
            gx = g_imp[pos] if name is None else getattr(g_imp[pos], name)
            d = jax.random.normal(jax.random.key(50 + i), jnp.shape(x))
            if name in ("J_init", "J11", "J22") or (pos == 0 and x.ndim == 3):
                d = 0.5 * (d + jnp.swapaxes(d, -1, -2))

            def shifted(s):
                a = list(args)
                a[pos] = x + s * d if name is None else a[pos]._replace(**{name: x + s * d})
                return f(*a)

            fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
            # FD error ~ eps^2 * f''' + 1e-16 / eps
            np.testing.assert_allclose(jnp.sum(gx * d), fd, rtol=1e-5, atol=1e-6,
                                       err_msg=f"field {name or ['R', 'r'][pos]}")


def test_capped_estimator_matches_onestep_when_forced(grads64):
    _, out = grads64
    # fallback_residual = 0 forces v = g; the unconverged-forward fallback (max_iters=1) runs
    # the same select and is covered in test_fixed_point.py
    np.testing.assert_allclose(_flat(out["tiny"][2]), _flat(out["onestep"][2]),
                               **tol(jnp.float64))


@pytest.mark.slow
def test_local_kl_matches_monte_carlo(key):
    """E_q[log q(z) + log q(k) - log p(z, k)] by sampling z ~ q(z), k ~ q(k)."""
    with jax.enable_x64(True):
        R, r, g = _problem(seed=1)
        kz, kk = jax.random.split(key)
        S = 4000
        mc, se, kl = jax.jit(lambda R, r, g: _mc_kl(R, r, g, kz, kk, S))(R, r, g)
        assert abs(float((mc - kl) / se)) < 5
        assert float(kl) >= 0.0


def _mc_kl(R, r, g, kz, kk, S):
    """Closed-form local KL and its Monte Carlo estimate (one jit)."""
    res, _ = mf_fixed_point(R, r, g, init_key=jax.random.key(4),
                            options=FixedPointOptions(max_iters=5))
    z = mf_sample(kz, res, num_samples=S)
    pot = res.lds_potentials

    def log_psi_z(z):
        J12 = pot.J12
        v = -0.5 * z[0] @ pot.J_init @ z[0] + pot.h_init @ z[0]
        v += jnp.sum(-0.5 * jnp.einsum("ti,tij,tj->t", z[:-1], pot.J11, z[:-1])
                     + jnp.einsum("ti,tij,tj->t", z[:-1], J12, z[1:])
                     - 0.5 * jnp.einsum("ti,tij,tj->t", z[1:], pot.J22, z[1:])
                     + jnp.sum(pot.h1 * z[:-1], -1) + jnp.sum(pot.h2 * z[1:], -1))
        v += jnp.sum(-0.5 * pot.R * z**2 + pot.r * z)
        return v - res.lds_log_normalizer

    eta_z = lambda z: (  # noqa: E731  per-sample log transition densities [T-1, K]
        -0.5 * jnp.einsum("kij,ti,tj->tk", g.J11, z[:-1], z[:-1])
        + jnp.einsum("kij,ti,tj->tk", g.J12, z[:-1], z[1:])
        - 0.5 * jnp.einsum("kij,ti,tj->tk", g.J22, z[1:], z[1:])
        + z[:-1] @ g.h1.T + z[1:] @ g.h2.T + g.c)
    # q(k): the HMM with node potentials eta(E stats); sample it
    eta = lds_to_hmm_log_potentials(res.Ez, res.Ezz, res.Ezz_next, g)
    ks = hmm_sample(kk, HMMPotentials(g.log_pi0, g.log_P, eta), num_samples=S)

    def sample_term(z, k):
        ar = jnp.arange(T - 1)
        log_qk = (g.log_pi0[k[0]] + jnp.sum(g.log_P[k[:-1], k[1:]]) + jnp.sum(eta[ar, k])
                  - res.hmm_log_normalizer)
        log_p = (g.log_pi0[k[0]] + jnp.sum(g.log_P[k[:-1], k[1:]])
                 - 0.5 * z[0] @ g.J_init @ z[0] + g.h_init @ z[0] + g.c_init
                 + jnp.sum(eta_z(z)[ar, k]))
        return log_psi_z(z) + log_qk - log_p

    vals = jax.vmap(sample_term)(z, ks)
    return jnp.mean(vals), jnp.std(vals) / jnp.sqrt(S), res.local_kl


def test_lds_case_matches_lds_smoother():
    with jax.enable_x64(True):
        R, r, g = _problem()
        g1 = jax.tree_util.tree_map(lambda x: x, g)._replace(
            J11=g.J11[:1], J12=g.J12[:1], J22=g.J22[:1], h1=g.h1[:1], h2=g.h2[:1], c=g.c[:1],
            log_pi0=jnp.zeros(1), log_P=jnp.zeros((1, 1)))
        mask = jnp.array([1, 1, 0, 1, 1, 0], bool)
        res, info = mf_fixed_point(R, r, g1, mask=mask)
        from numpyro_svae.messages.lds import LDSPotentials
        rep = lambda x: jnp.broadcast_to(x, (T - 1,) + x.shape[1:])  # noqa: E731
        pot = LDSPotentials(g.J_init, g.h_init, rep(g.J11[:1]), rep(g.J12[:1]), rep(g.J22[:1]),
                            rep(g.h1[:1]), rep(g.h2[:1]), R, r)
        post = lds_smoother(pot, mask)
        for name in ("Ez", "Ezz", "Ezz_next", "cov"):
            np.testing.assert_array_equal(getattr(res, name), getattr(post, name))
        np.testing.assert_array_equal(res.lds_log_normalizer, post.log_normalizer)
        assert float(res.local_kl) >= 0.0 and int(info.num_iters) == 1


# not marked slow (~10 s): a slow mark would run it first, apart from the other users of the
# module fixture `grads64`, which then builds twice (~20 s each)
def test_vmap_over_batch_matches_python_loop(grads64):
    (R0, r0, g, init0, mask), out0 = grads64
    with jax.enable_x64(True):
        R1, r1 = random_encoder(jax.random.key(9), T, D)
        Rs, rs = jnp.stack([R0, R1]), jnp.stack([r0, r1])
        inits = jnp.stack([init0, _init(seed=11)])
        loss = _loss_fn("richardson")

        def total(Rs, rs, g):
            vals, aux = jax.vmap(loss, in_axes=(0, 0, None, 0, None))(Rs, rs, g, inits, mask)
            return jnp.sum(vals), aux[0]

        (v, infos), gb = jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True))(
            Rs, rs, g)
        assert infos.num_iters.shape == (2,)
        out1 = _all_grads(R1, r1, g, inits[1], mask)  # compiled already by the fixture
        singles = [out0["implicit"][2], out1["implicit"][2]]
    for n, gn in enumerate(singles):
        np.testing.assert_allclose(gb[0][n], gn[0], **tol(jnp.float64))
        np.testing.assert_allclose(gb[1][n], gn[1], **tol(jnp.float64))
    acc = jax.tree_util.tree_map(jnp.add, singles[0][2], singles[1][2])
    np.testing.assert_allclose(_flat(gb[2]), _flat(acc), **tol(jnp.float64))


@pytest.mark.slow
def test_float32_leading_regime_and_full_precision_run():
    R, r, g = _problem(full=True, dtype=jnp.float32)
    init = _init(leading=True)
    loss = _loss_fn("richardson", dict(max_iters=20), leading=True)
    (val, aux), gr = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        R, r, g, init, jnp.ones((T,)))
    info, q, q_used, kl = aux
    assert val.dtype == jnp.float32 and q.shape == (T, K)
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(gr))
    assert float(kl) > -1e-3  # KL >= 0 up to float32 rounding of O(100) log normalisers


def test_bad_inputs_raise_value_error():
    R, r, g = _problem()
    with pytest.raises(ValueError, match="node_R"):
        mf_fixed_point(R[:, :1], r, g, init_key=jax.random.key(0))
    with pytest.raises(ValueError, match="node_r"):
        mf_fixed_point(R, r.at[0, 0].set(jnp.nan), g, init_key=jax.random.key(0))
    with pytest.raises(ValueError, match="globals.J12"):
        mf_fixed_point(R, r, g._replace(J12=g.J12[:, :1]), init_key=jax.random.key(0))
    with pytest.raises(ValueError, match="globals.log_P"):
        mf_fixed_point(R, r, g._replace(log_P=g.log_P.at[0, 0].set(jnp.inf)),
                       init_key=jax.random.key(0))
    with pytest.raises(ValueError, match="init_marginals"):
        mf_fixed_point(R, r, g, init_marginals=jnp.ones((T, K)))
    with pytest.raises(ValueError, match="init_key"):
        mf_fixed_point(R, r, g)

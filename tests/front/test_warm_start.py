"""`SVAEGuide(warm_start=True)`: q(k) carried between SVI steps in a mutable site."""

import jax
import numpy as np
import pytest
from numpyro.infer import SVI

from numpyro_svae.elbo import SVAE_ELBO
from numpyro_svae.guide import DIAGNOSTICS_SITE, WARM_START_SITE, SVAEGuide
from numpyro_svae.nn import GaussianPotentialEncoder
from numpyro_svae.optim import natural_gradient
from tests.front.test_guide import slds_model

N, T, K, D, DX = 3, 6, 2, 2, 4
KW = dict(N=N, T=T, K=K, D=D, Dx=DX, hidden=(8,))


def test_warm_start_state_restarts_the_mean_field_at_its_fixed_point():
    """After a step the state holds each sequence's q(k) (valid, normalised); a second loss
    evaluation at the same parameters starts from that fixed point, so every sequence stops
    after two block updates (the first change is measured against nothing)."""
    x = np.random.default_rng(0).normal(size=(N, T, DX)).astype(np.float32)
    enc = GaussianPotentialEncoder(obs_dim=DX, latent_dim=D, hidden=(8,), key=jax.random.key(1))
    guide = SVAEGuide(slds_model, encoder=enc, warm_start=True, max_iters=50, rtol=1e-6)
    svi = SVI(slds_model, guide, natural_gradient(natgrad_lr=0.1), loss=SVAE_ELBO())
    state = svi.init(jax.random.key(0), x, **KW)
    init = state.mutable_state[WARM_START_SITE]
    assert init["marginals"].shape == (N, T, K)  # leading regime k0: Tk = T
    assert not np.any(init["valid"])
    params = svi.get_params(state)
    elbo = SVAE_ELBO()
    # the loss alone (no gradient: a small compile), as SVI.update calls it
    loss = jax.jit(lambda ms: elbo.loss_with_mutable_state(
        jax.random.key(1), {**params, **ms}, slds_model, guide, x, **KW)["mutable_state"])
    ms = loss(state.mutable_state)
    warm = ms[WARM_START_SITE]
    assert np.all(warm["valid"])
    np.testing.assert_allclose(np.sum(warm["marginals"], -1), 1.0, rtol=1e-5)
    first = ms[DIAGNOSTICS_SITE]
    assert float(first["converged_frac"]) == 1.0
    second = loss(ms)[DIAGNOSTICS_SITE]  # the same parameters: restart at the fixed point
    assert float(second["num_iters_max"]) <= 2.0 < float(first["num_iters_max"])


def test_best_of_warm_and_random_keeps_the_better_fixed_point_per_sequence():
    """`warm_start="best"`: per sequence, the fixed point (of the warm start and of a fresh
    random start) with the smaller `surrogate` (= the larger mean-field objective), all its
    outputs together; the plain warm start's result where the warm start is better."""
    import jax.numpy as jnp

    from numpyro_svae.guide import _batched_mean_field_warm_impl
    from numpyro_svae.meanfield.fixed_point import FixedPointOptions
    from tests.meanfield._problems import random_encoder, random_globals

    B, Tm, Km = 6, 8, 3
    with jax.enable_x64(True):
        g = random_globals(jax.random.key(4), D, Km, extra=0.5)
        Rs, rs = zip(*(random_encoder(jax.random.key(10 + n), Tm, D) for n in range(B)),
                     strict=True)
        R, r = jnp.stack(Rs), jnp.stack(rs)
        mask = jnp.ones((B, Tm), bool)
        keys = jax.random.split(jax.random.key(7), B)
        # warm starts: a poor one-regime q(k) for half the sequences, none (random) for one
        init_q = jnp.broadcast_to(jnp.eye(Km)[jnp.arange(B) % Km][:, None, :], (B, Tm, Km))
        valid = jnp.arange(B) != 0
        opts = FixedPointOptions(max_iters=3, rtol=0.0)  # few updates: starts stay apart
        kw = dict(options=opts, leading=True, init_concentration=0.1)
        warm = _batched_mean_field_warm_impl(R, r, g, mask, keys, init_q, valid, **kw)
        fresh = _batched_mean_field_warm_impl(R, r, g, mask, keys, init_q,
                                             jnp.zeros(B, bool), **kw)
        best = _batched_mean_field_warm_impl(R, r, g, mask, keys, init_q, valid,
                                            best_of_random=True, **kw)
        sw, sf = np.asarray(warm[0].surrogate), np.asarray(fresh[0].surrogate)
        take = sf < sw
        assert take.any() and (~take).any(), (sw, sf)  # both cases occur in this problem
        np.testing.assert_array_equal(np.asarray(best[0].surrogate), np.where(take, sf, sw))
        for a, b, c in zip(jax.tree.leaves(best), jax.tree.leaves(fresh),
                           jax.tree.leaves(warm), strict=True):
            sel = take.reshape((B,) + (1,) * (np.ndim(a) - 1))
            np.testing.assert_array_equal(np.asarray(a), np.where(sel, b, c))
    enc = GaussianPotentialEncoder(obs_dim=DX, latent_dim=D, hidden=(8,), key=jax.random.key(1))
    assert SVAEGuide(slds_model, encoder=enc, warm_start="best").warm_start == "best"
    with pytest.raises(ValueError, match="`warm_start` must be False, True or 'best'"):
        SVAEGuide(slds_model, encoder=enc, warm_start="always")

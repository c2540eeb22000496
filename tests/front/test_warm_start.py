"""`SVAEGuide(warm_start=True)`: q(k) carried between SVI steps in a mutable site."""

import jax
import numpy as np
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

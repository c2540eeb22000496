"""Default networks: shapes, positivity, masking, NumPyro registration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers

from numpyro_svae.nn import GaussianPotentialEncoder, decoder


@pytest.mark.parametrize("bidirectional", [False, True])
def test_encoder_shapes_and_positive_precision(key, bidirectional):
    k_net, k_x = jax.random.split(key)
    enc = GaussianPotentialEncoder(obs_dim=3, latent_dim=2, hidden=(8, 8),
                                   bidirectional=bidirectional, key=k_net)
    x = 10.0 * jax.random.normal(k_x, (7, 3))
    R, r = enc(x)
    assert R.shape == (7, 2) and r.shape == (7, 2)
    assert bool(jnp.all(R > 0)) and bool(jnp.all(jnp.isfinite(r)))
    # batched over sequences by vmap, under jit, with a per-step or per-entry mask
    xs = jnp.stack([x, x])
    R2, _ = jax.jit(jax.vmap(enc))(xs, jnp.ones((2, 7)))
    np.testing.assert_allclose(R2[0], R, rtol=1e-5, atol=1e-6)
    R3, _ = jax.vmap(enc)(xs, jnp.ones((2, 7, 3), bool))
    assert R3.shape == (2, 7, 2)


def test_encoder_ignores_values_at_missing_entries(key):
    enc = GaussianPotentialEncoder(obs_dim=3, latent_dim=2, hidden=(8,), key=key)
    x = jnp.ones((5, 3))
    mask = jnp.array([1, 1, 0, 1, 1], bool)
    a = enc(x, mask)
    b = enc(x.at[2].set(jnp.nan), mask)
    np.testing.assert_allclose(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1])


def test_encoder_bidirectional_sees_the_future(key):
    enc = GaussianPotentialEncoder(obs_dim=1, latent_dim=1, hidden=(4,), bidirectional=True,
                                   key=key)
    x = jnp.zeros((6, 1))
    R0, _ = enc(x)
    R1, _ = enc(x.at[5].set(3.0))
    assert not np.allclose(R0[0], R1[0])  # step 0 depends on step 5 through the backward GRU


def test_encoder_bad_shapes_raise(key):
    enc = GaussianPotentialEncoder(obs_dim=3, latent_dim=2, hidden=(8,), key=key)
    with pytest.raises(ValueError, match="x"):
        enc(jnp.ones((5, 4)))
    with pytest.raises(ValueError, match="mask"):
        enc(jnp.ones((5, 3)), jnp.ones((4,)))
    with pytest.raises(ValueError, match="latent_dim"):
        GaussianPotentialEncoder(obs_dim=3, latent_dim=0, key=key)


def test_decoder_registers_params_and_maps_shapes():
    def model(z):
        return decoder("dec", latent_dim=2, obs_dim=3, hidden=(8,), init_scale=0.5)(z)

    z = jnp.ones((4, 5, 2))
    tr = handlers.trace(handlers.seed(model, 0)).get_trace(z)
    assert tr["dec$params"]["type"] == "param"
    loc, scale = handlers.seed(model, 0)(z)
    assert loc.shape == (4, 5, 3) and scale.shape == (4, 5, 3)
    np.testing.assert_allclose(scale, 0.5, rtol=1e-5)
    # substituted parameters are used (this is how SVI trains them)
    params = tr["dec$params"]["value"]
    params2 = jax.tree.map(lambda a: a * 0.0, params)
    loc2, _ = handlers.substitute(handlers.seed(model, 1), data={"dec$params": params2})(z)
    np.testing.assert_allclose(loc2, 0.0)
    with pytest.raises(ValueError, match="dec"):
        handlers.seed(model, 0)(jnp.ones((4, 3)))

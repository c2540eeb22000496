"""Small random SLDS problems shared by the mean-field tests."""

import jax
import jax.numpy as jnp

from numpyro_svae.meanfield.potentials import SLDSGlobalPotentials

LOG_2PI = 1.8378770664093453


def random_globals(key, D=2, K=2, extra=0.1, dtype=None):
    """Expected potentials of K random stable regimes, with PSD 'uncertainty' added to J11."""
    dtype = dtype or jnp.result_type(float)
    ks = jax.random.split(key, 8)
    A = 0.9 * jax.random.orthogonal(ks[0], D, shape=(K,), dtype=dtype) + 0.1 * jax.random.normal(
        ks[1], (K, D, D), dtype
    )
    b = 0.5 * jax.random.normal(ks[2], (K, D), dtype)
    Lq = 0.3 * jax.random.normal(ks[3], (K, D, D), dtype) + jnp.eye(D, dtype=dtype)
    Lam = Lq @ jnp.swapaxes(Lq, -1, -2) + 0.5 * jnp.eye(D, dtype=dtype)
    U = jax.random.normal(ks[4], (K, D, D), dtype)
    J11 = jnp.einsum("kji,kjl,klm->kim", A, Lam, A) + extra * U @ jnp.swapaxes(U, -1, -2)
    J12 = jnp.einsum("kji,kjl->kil", A, Lam)
    h1 = -jnp.einsum("kji,kjl,kl->ki", A, Lam, b)
    h2 = jnp.einsum("kij,kj->ki", Lam, b)
    logdet = jnp.linalg.slogdet(Lam)[1]
    c = -0.5 * jnp.einsum("ki,kij,kj->k", b, Lam, b) + 0.5 * logdet - 0.5 * D * LOG_2PI - extra
    tau = jnp.eye(D, dtype=dtype) * 1.5
    mu = jax.random.normal(ks[5], (D,), dtype)
    c_init = -0.5 * mu @ tau @ mu + 0.5 * jnp.linalg.slogdet(tau)[1] - 0.5 * D * LOG_2PI - 0.05
    Pl = jax.random.normal(ks[6], (K, K), dtype) + 2.0 * jnp.eye(K, dtype=dtype)
    log_P = jax.nn.log_softmax(Pl, axis=-1) - 0.05
    log_pi0 = jax.nn.log_softmax(jax.random.normal(ks[7], (K,), dtype)) - 0.05
    return SLDSGlobalPotentials(tau, tau @ mu, c_init, J11, J12, Lam, h1, h2, c, log_pi0, log_P)


def random_encoder(key, T=6, D=2, full=False, dtype=None):
    dtype = dtype or jnp.result_type(float)
    k1, k2 = jax.random.split(key)
    r = 2.0 * jax.random.normal(k1, (T, D), dtype)
    if full:
        U = 0.5 * jax.random.normal(k2, (T, D, D), dtype)
        R = U @ jnp.swapaxes(U, -1, -2) + 0.5 * jnp.eye(D, dtype=dtype)
    else:
        R = 0.5 + jax.random.uniform(k2, (T, D), dtype)
    return R, r

"""Shared numerics for positive-definite matrices.

Every PD solve, log-determinant and inverse in the library goes through these helpers so
that symmetrisation and Cholesky factorisation happen in one place.
All functions act on the trailing two axes and broadcast over leading ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve, solve_triangular

Array = jax.Array

LOG_2PI = 1.8378770664093453  # log(2 pi)


def symmetrize(A: Array) -> Array:
    """Return (A + A^T) / 2 over the trailing two axes.  A: [..., D, D]."""
    return 0.5 * (A + jnp.swapaxes(A, -1, -2))


def psd_cholesky(A: Array) -> Array:
    """Lower Cholesky factor of the symmetrised matrix.  A: [..., D, D] -> [..., D, D]."""
    return jnp.linalg.cholesky(symmetrize(A))


def psd_cholesky_ridged(A: Array) -> Array:
    """Lower Cholesky factor of ``sym(A) + r I`` with ``r = 16 eps max_i A_ii`` (no gradient
    through ``r``).  A: [..., D, D] -> [..., D, D].

    For parameter matrices built as ``L L' + jitter I`` in float32: the product's rounding
    error (~``eps ||L||^2``) can exceed a small jitter and leave the matrix indefinite (a
    regime whose latents never move along some direction gets a column precision with
    eigenvalues from ~0 to 5e4; mocap6, D = 8).  The ridge is at the level of that rounding
    error (relative 2e-6 in float32, 4e-15 in float64)."""
    A = symmetrize(A)
    eps = jnp.finfo(A.dtype).eps
    top = jnp.max(jnp.abs(jnp.diagonal(A, axis1=-2, axis2=-1)), axis=-1)
    r = jax.lax.stop_gradient(16.0 * eps * top)
    return jnp.linalg.cholesky(A + r[..., None, None] * jnp.eye(A.shape[-1], dtype=A.dtype))


def psd_solve(A: Array, b: Array) -> Array:
    """Solve A x = b for PD A by Cholesky.  A: [..., D, D]; b: [..., D] or [..., D, M]."""
    L = psd_cholesky(A)
    if b.ndim == A.ndim - 1:
        return cho_solve((L, True), b[..., None])[..., 0]
    return cho_solve((L, True), b)


def chol_solve(L: Array, b: Array) -> Array:
    """Solve (L L^T) x = b given the lower Cholesky factor L.  b: [..., D] or [..., D, M]."""
    if b.ndim == L.ndim - 1:
        return cho_solve((L, True), b[..., None])[..., 0]
    return cho_solve((L, True), b)


def chol_logdet(L: Array) -> Array:
    """log|L L^T| = 2 sum log diag L.  L: [..., D, D] -> [...]."""
    return 2.0 * jnp.sum(jnp.log(jnp.diagonal(L, axis1=-2, axis2=-1)), axis=-1)


def psd_logdet(A: Array) -> Array:
    """log-determinant of a PD matrix via Cholesky.  A: [..., D, D] -> [...]."""
    return chol_logdet(psd_cholesky(A))


def psd_inv(A: Array) -> Array:
    """Inverse of a PD matrix by Cholesky solves, symmetrised.  A: [..., D, D]."""
    L = psd_cholesky(A)
    eye = jnp.broadcast_to(jnp.eye(A.shape[-1], dtype=A.dtype), A.shape)
    return symmetrize(cho_solve((L, True), eye))


def chol_inv_transpose_solve(L: Array, eps: Array) -> Array:
    """Return L^{-T} eps: a draw with covariance (L L^T)^{-1} from standard normal eps."""
    return solve_triangular(L, eps[..., None], lower=True, trans="T")[..., 0]


def multidigamma(a: Array, D: int) -> Array:
    """sum_{i=0}^{D-1} digamma((a - i) / 1)  evaluated as sum psi(a - i/2).

    Used for E log|Wishart|: sum_i psi((nu - i) / 2) = multidigamma(nu / 2, D).
    """
    i = jnp.arange(D, dtype=jnp.result_type(a, float))
    return jnp.sum(jax.scipy.special.digamma(jnp.expand_dims(a, -1) - i / 2.0), axis=-1)


def multigammaln(a: Array, D: int) -> Array:
    """log of the multivariate gamma function Gamma_D(a), broadcast over `a`."""
    return jax.scipy.special.multigammaln(a, D)

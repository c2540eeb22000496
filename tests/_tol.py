"""One dtype-keyed tolerance table for numeric comparisons (one place for every tolerance)."""

import jax.numpy as jnp

# float64: comparisons of exact algorithms that differ only by rounding.
# float32: Kalman/forward-backward recursions lose ~3-4 digits over long chains.
TOL = {
    jnp.dtype("float64"): dict(rtol=1e-8, atol=1e-8),
    jnp.dtype("float32"): dict(rtol=2e-3, atol=2e-3),
}


def tol(dtype) -> dict:
    """Tolerances for arrays of `dtype`."""
    return TOL[jnp.dtype(dtype)]

"""Expected statistics of a Gaussian chain with a reverse-mode rule from forward mode.

The smoothed statistics ``s = (E z_t, E z_t z_t', E z_t z_{t+1}')`` are (linear images of) the
gradient of the chain's log normaliser ``A`` with respect to its natural parameters, so the
Jacobian of ``s`` is a Hessian of ``A`` and therefore symmetric: a vector-Jacobian product
equals a Jacobian-vector product in a suitably placed direction (``docs/math.md``, "Reverse
mode through the smoother").  Reverse mode through the smoother's ``lax.scan`` stores every
intermediate of the unrolled small-matrix kernels and replays them transposed, one small
operation at a time; forward mode reruns the filter with tangents instead, about 3x cheaper
at ``D = 8`` on CPU.  The structured mean field's implicit gradient applies this product
once per adjoint iteration, which makes it the main cost of an SLDS training step.

Pure JAX, unbatched (``vmap`` over sequences).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from numpyro_svae.messages.lds import LDSPotentials, lds_smoother

Array = jax.Array

__all__ = ["LDSStats", "lds_expected_stats"]


class LDSStats(NamedTuple):
    """Log normaliser and smoothed expected statistics of one Gaussian chain."""

    log_normalizer: Array  # []  log integral of psi (includes T*D/2 log 2 pi)
    Ez: Array  # [T, D]      E[z_t]
    Ezz: Array  # [T, D, D]   E[z_t z_t']
    Ezz_next: Array  # [T-1, D, D] E[z_t z_{t+1}']


def _sym(A: Array) -> Array:
    return 0.5 * (A + jnp.swapaxes(A, -1, -2))


def _stats_of(pot: LDSPotentials, method: str) -> LDSStats:
    post = lds_smoother(pot, method=method)
    return LDSStats(post.log_normalizer, post.Ez, post.Ezz, post.Ezz_next)


def _grad_log_normalizer(pot: LDSPotentials, Ez: Array, Ezz: Array, Ezz_next: Array):
    """``dA / d(potentials)`` from the statistics (each field: its coefficient's expectation)."""
    half = -0.5 * Ezz
    R = half if pot.R.ndim == 3 else jnp.diagonal(half, axis1=-2, axis2=-1)
    return LDSPotentials(J_init=half[0], h_init=Ez[0], J11=half[:-1], J12=Ezz_next,
                         J22=half[1:], h1=Ez[:-1], h2=Ez[1:], R=R, r=Ez)


def _direction(pot: LDSPotentials, g_Ez: Array, g_Ezz: Array, g_Ezz_next: Array):
    """``P' g``: a potential direction whose gradient image is the statistics cotangent.

    With ``s = P dA/d(pot)`` (``E z_t`` read off ``r_t``, ``E z_t z_t'`` off ``J11_t`` for
    ``t < T`` and off ``J22_{T-1}`` for the last step, ``E z_t z_{t+1}'`` off ``J12_t``), the
    product ``g' ds = g' P H dpot`` has the vector-Jacobian product ``H P' g``.
    """
    d = jax.tree.map(jnp.zeros_like, pot)
    Gzz = -2.0 * _sym(g_Ezz)
    if pot.r.shape[0] == 1:
        return d._replace(J_init=Gzz[0], r=g_Ez)
    J22 = d.J22.at[-1].set(Gzz[-1])
    return d._replace(J11=Gzz[:-1], J12=g_Ezz_next, J22=J22, r=g_Ez)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _stats(pot: LDSPotentials, method: str) -> LDSStats:
    return _stats_of(pot, method)


def _stats_fwd(pot, method):
    out = _stats_of(pot, method)
    return out, (pot, out)


def _stats_bwd(method, res, ct):
    pot, out = res
    d = _direction(pot, ct.Ez, ct.Ezz, ct.Ezz_next)
    _, dout = jax.jvp(lambda p: _stats_of(p, method), (pot,), (d,))
    hess = _grad_log_normalizer(pot, dout.Ez, dout.Ezz, dout.Ezz_next)
    grad = _grad_log_normalizer(pot, out.Ez, out.Ezz, out.Ezz_next)
    return (jax.tree.map(lambda h, g: h + ct.log_normalizer * g, hess, grad),)


_stats.defvjp(_stats_fwd, _stats_bwd)


def lds_expected_stats(
    potentials: LDSPotentials, mask: Array | None = None, *, method: str = "auto"
) -> LDSStats:
    """Log normaliser and smoothed statistics of a Gaussian chain, with a cheap gradient.

    The values equal `numpyro_svae.messages.lds_smoother`'s.  Reverse-mode derivatives use
    the symmetry of the log normaliser's Hessian (one forward-mode pass of the smoother per
    vector-Jacobian product, instead of reverse mode through its scans); forward-mode
    differentiation (``jax.jvp``) of this function is not supported: use `lds_smoother`.

    Parameters
    ----------
    potentials : LDSPotentials
        Chain potentials for one sequence (``R`` diagonal ``[T, D]`` or full ``[T, D, D]``).
    mask : Array, optional
        ``[T]`` bool or 0/1; masked steps carry no node potential.  Not differentiated.
    method : {"auto", "sequential", "parallel"}
        As for `lds_smoother`.

    Returns
    -------
    LDSStats
        ``log_normalizer []``, ``Ez [T, D]``, ``Ezz [T, D, D]``, ``Ezz_next [T-1, D, D]``.

    Raises
    ------
    ValueError, TypeError
        As `lds_smoother` (shapes; for concrete inputs, finiteness and definiteness).
    """
    if not isinstance(potentials, LDSPotentials):
        raise TypeError(f"`potentials` must be an LDSPotentials; got {type(potentials).__name__}")
    if mask is not None:
        T = jnp.shape(potentials.r)[0]
        if jnp.shape(mask) != (T,):
            raise ValueError(f"`mask` must have shape [T] = [{T}]; got {list(jnp.shape(mask))}")
        m = jax.lax.stop_gradient(jnp.asarray(mask).astype(jnp.result_type(potentials.r)))
        R = potentials.R * (m[:, None] if potentials.R.ndim == 2 else m[:, None, None])
        potentials = potentials._replace(R=R, r=potentials.r * m[:, None])
    return _stats(potentials, method)

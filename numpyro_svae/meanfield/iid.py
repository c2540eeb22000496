"""Mean field for latents iid given the regime: HMM with Gaussian latents, and the GMM.

``z_t | k_t ~ N(mu_k, tau_k^-1)`` (one NIW per regime); the regimes form a Markov chain
(``chain=True``) or are iid with weights ``pi`` (``chain=False``: the GMM of Johnson et al.
2016).  ``q(z) q(k)`` with ``q(z) = prod_t q(z_t)`` Gaussian; the same `fixed_point` machinery
(Gauss-Seidel forward, implicit capped backward, unrolled reference) as the SLDS.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_svae._linalg import (
    LOG_2PI,
    chol_inv_transpose_solve,
    chol_logdet,
    chol_solve,
    psd_cholesky,
    psd_inv,
)
from numpyro_svae.meanfield.fixed_point import (
    DEFAULT_OPTIONS,
    FixedPointInfo,
    FixedPointOptions,
    fixed_point,
)
from numpyro_svae.meanfield.kl import encoder_expected_log_potential, iid_local_kl
from numpyro_svae.meanfield.potentials import IIDGlobalPotentials
from numpyro_svae.messages.hmm import HMMPotentials, hmm_smoother

Array = jax.Array

__all__ = ["IIDResult", "mf_fixed_point_iid", "mf_sample_iid"]


class IIDResult(NamedTuple):
    """Mean-field posterior of one sequence with regime-conditional iid latents."""

    Ez: Array  # [T, D]
    Ezz: Array  # [T, D, D]
    cov: Array  # [T, D, D]
    marginals: Array  # [T, K]
    trans_counts: Array  # [K, K]  (zeros for the GMM)
    gauss_log_normalizer: Array  # []
    discrete_log_normalizer: Array  # []
    local_kl: Array  # []
    surrogate: Array  # []
    used_marginals: Array  # [T, K] the q(k) that built q(z)
    J: Array  # [T, D, D] precisions of q(z_t)
    h: Array  # [T, D]    linear potentials of q(z_t)


class _State(NamedTuple):
    Ez: Array  # [T, D]
    Ezz: Array  # [T, D, D]
    marginals: Array  # [T, K]


def _full(R: Array) -> Array:
    return R[..., :, None] * jnp.eye(R.shape[-1], dtype=R.dtype) if R.ndim == 2 else R


def _gauss(q, R, r, gi):
    J = jnp.einsum("tk,kij->tij", q, gi.J) + _full(R)
    h = q @ gi.h + r
    L = psd_cholesky(J)
    Ez = chol_solve(L, h)
    cov = psd_inv(J)
    Ezz = cov + Ez[:, :, None] * Ez[:, None, :]
    D = r.shape[-1]
    logZ = jnp.sum(0.5 * jnp.sum(h * Ez, -1) - 0.5 * chol_logdet(L) + 0.5 * D * LOG_2PI)
    return J, h, Ez, Ezz, cov, logZ


def _eta(Ez, Ezz, gi):
    return -0.5 * jnp.einsum("kij,tij->tk", gi.J, Ezz) + Ez @ gi.h.T + gi.c


def _discrete(eta, gi, chain: bool):
    if chain:
        post = hmm_smoother(HMMPotentials(gi.log_pi0, gi.log_P, eta))
        return post.marginals, post.trans_counts, post.log_normalizer
    logits = gi.log_pi0 + eta
    lse = jax.scipy.special.logsumexp(logits, axis=-1)
    K = eta.shape[-1]
    return jnp.exp(logits - lse[:, None]), jnp.zeros((K, K), eta.dtype), jnp.sum(lse)


def _masked(R, r, m):
    Rm = R * (m[:, None] if R.ndim == 2 else m[:, None, None])
    return Rm, r * m[:, None]


def _make_maps(chain: bool):
    def step(omega, theta, mask):
        R, r, gi = theta
        R, r = _masked(R, r, mask)
        _, _, Ez, Ezz, _, logZz = _gauss(omega.marginals, R, r, gi)
        eta = _eta(Ez, Ezz, gi)
        q, _, logZk = _discrete(eta, gi, chain)
        kl = iid_local_kl(Ez, Ezz, logZz, eta, omega.marginals, logZk, R, r, gi.c)
        return _State(Ez, Ezz, q), kl

    def parallel(omega, theta, mask):
        R, r, gi = theta
        R, r = _masked(R, r, mask)
        _, _, Ez, Ezz, _, _ = _gauss(omega.marginals, R, r, gi)
        q, _, _ = _discrete(_eta(omega.Ez, omega.Ezz, gi), gi, chain)
        return _State(Ez, Ezz, q)

    return step, parallel


_MAPS = {True: _make_maps(True), False: _make_maps(False)}


def mf_fixed_point_iid(
    node_R: Array,
    node_r: Array,
    globals: IIDGlobalPotentials,
    *,
    mask: Array | None = None,
    init_key: Array | None = None,
    init_marginals: Array | None = None,
    options: FixedPointOptions = DEFAULT_OPTIONS,
    chain: bool = True,
    init_concentration: float = 0.1,
    probe: Array | None = None,
) -> tuple[IIDResult, FixedPointInfo]:
    """Mean field ``q(z) q(k)`` for latents iid given the regimes (HMM or GMM prior).

    Parameters
    ----------
    node_R : Array
        ``[T, D]`` diagonal or ``[T, D, D]`` encoder precisions.
    node_r : Array
        ``[T, D]``.
    globals : IIDGlobalPotentials
        From `iid_expected_potentials`.
    mask, init_key, init_marginals, options, init_concentration, probe
        As in `mf_fixed_point` (``init_marginals`` is ``[T, K]``).
    chain : bool
        ``True``: regimes form an HMM (``log_pi0``, ``log_P``); ``False``: iid with
        ``E log pi = log_pi0`` (GMM).

    Returns
    -------
    (IIDResult, FixedPointInfo)

    Raises
    ------
    ValueError
        Wrong shapes, NaN/inf in concrete inputs, missing initialisation.
    """
    if jnp.ndim(node_r) != 2:
        raise ValueError(f"`node_r` must have shape [T, D]; got {list(jnp.shape(node_r))}")
    T, D = jnp.shape(node_r)
    if jnp.shape(node_R) not in ((T, D), (T, D, D)):
        raise ValueError(f"`node_R` must have shape [T, D] or [T, D, D]; got "
                         f"{list(jnp.shape(node_R))}")
    if not isinstance(globals, IIDGlobalPotentials):
        raise TypeError(f"`globals` must be an IIDGlobalPotentials; got {type(globals).__name__}")
    K = jnp.shape(globals.c)[0]
    shapes = {"J": (K, D, D), "h": (K, D), "c": (K,), "log_pi0": (K,), "log_P": (K, K)}
    for name, shp in shapes.items():
        if jnp.shape(getattr(globals, name)) != shp:
            raise ValueError(f"`globals.{name}` must have shape {list(shp)}; got "
                             f"{list(jnp.shape(getattr(globals, name)))}")
    if mask is not None and jnp.shape(mask) != (T,):
        raise ValueError(f"`mask` must have shape [T] = [{T}]; got {list(jnp.shape(mask))}")
    if (init_key is None) == (init_marginals is None):
        raise ValueError("pass exactly one of `init_key` or `init_marginals`")
    if init_marginals is not None and jnp.shape(init_marginals) != (T, K):
        raise ValueError(f"`init_marginals` must have shape [T, K] = [{T}, {K}]; got "
                         f"{list(jnp.shape(init_marginals))}")
    named = {"node_R": node_R, "node_r": node_r, **{f"globals.{n}": getattr(globals, n)
                                                    for n in globals._fields}}
    for name, x in named.items():
        if not isinstance(x, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(x))):
            raise ValueError(f"`{name}` contains NaN or inf")

    dtype = jnp.result_type(node_R, node_r, *globals)
    R, r = jnp.asarray(node_R, dtype), jnp.asarray(node_r, dtype)
    gi = IIDGlobalPotentials(*(jnp.asarray(x, dtype) for x in globals))
    m = jnp.ones((T,), dtype) if mask is None else jnp.asarray(mask).astype(dtype)
    if init_marginals is None:
        q0 = jax.random.dirichlet(init_key, jnp.full((K,), init_concentration, dtype), (T,),
                                  dtype=dtype)
    else:
        q0 = jnp.asarray(init_marginals, dtype)
    omega0 = _State(jnp.zeros((T, D), dtype), jnp.zeros((T, D, D), dtype),
                    jax.lax.stop_gradient(q0))
    step, parallel = _MAPS[chain]
    omega, info = fixed_point(step, parallel, (R, r, gi), m, omega0, options=options, probe=probe)

    Rm, rm = _masked(R, r, m)
    q_used = omega.marginals
    J, h, Ez, Ezz, cov, logZz = _gauss(q_used, Rm, rm, gi)
    eta = _eta(Ez, Ezz, gi)
    q, counts, logZk = _discrete(eta, gi, chain)
    kl = iid_local_kl(Ez, Ezz, logZz, eta, q_used, logZk, Rm, rm, gi.c)
    enc = encoder_expected_log_potential(Rm, rm, Ez, Ezz)
    return IIDResult(Ez, Ezz, cov, q, counts, logZz, logZk, kl, kl - enc, q_used, J, h), info


def mf_sample_iid(key: Array, result: IIDResult, *, num_samples: int | None = None) -> Array:
    """Reparameterised draws ``z_t ~ q(z_t)`` (``[T, D]`` or ``[S, T, D]``)."""
    L = psd_cholesky(result.J)
    mean = chol_solve(L, result.h)
    S = 1 if num_samples is None else num_samples
    eps = jax.random.normal(key, (S,) + mean.shape, mean.dtype)
    z = mean + jax.vmap(lambda e: chol_inv_transpose_solve(L, e))(eps)
    return z[0] if num_samples is None else z

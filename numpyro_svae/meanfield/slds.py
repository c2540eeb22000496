"""Structured mean field ``q(z) q(k)`` for the SLDS, differentiated implicitly.

Block coordinate ascent (Gauss-Seidel: LDS smoother given ``q(k)``, then HMM smoother given
``q(z)``) runs inside `fixed_point.fixed_point`, whose custom VJP applies the implicit
function theorem to the parallel (Jacobi) map on ``omega = (E z, E zz', E z z_next', q(k))``.
After the loop one more *differentiable* block update is made from the returned ``q(k)``:
it gives ``q(z)`` (statistics, log normaliser, the chain potentials used for sampling),
``q(k)`` (marginals, transition counts, log normaliser) and the exact local KL of that pair.

docs/math.md §4, §6, §7.  Pure JAX, unbatched; ``vmap`` over sequences.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_svae.meanfield.fixed_point import (
    DEFAULT_OPTIONS,
    FixedPointInfo,
    FixedPointOptions,
    fixed_point,
)
from numpyro_svae.meanfield.kl import encoder_expected_log_potential, slds_local_kl
from numpyro_svae.meanfield.potentials import (
    SLDSGlobalPotentials,
    hmm_to_lds_potentials,
    lds_to_hmm_log_potentials,
    validate_globals,
)
from numpyro_svae.messages.hmm import HMMPotentials, hmm_smoother
from numpyro_svae.messages.lds import (
    LDSPotentials,
    LDSSampler,
    lds_smoother_with_sampler,
)
from numpyro_svae.messages.lds_stats import lds_expected_stats

Array = jax.Array

__all__ = ["MFResult", "MFInfo", "MFState", "mf_fixed_point", "mf_local_kl", "mf_block_update"]

MFInfo = FixedPointInfo


class MFState(NamedTuple):
    """Fixed-point variables ``omega`` (one sequence)."""

    Ez: Array  # [T, D]
    Ezz: Array  # [T, D, D]
    Ezz_next: Array  # [T-1, D, D]
    marginals: Array  # [Tk, K]   Tk = T-1, or T with leading_regime


class MFResult(NamedTuple):
    """Mean-field posterior of one sequence."""

    Ez: Array  # [T, D]       E_q[z_t]
    Ezz: Array  # [T, D, D]    E_q[z_t z_t']
    Ezz_next: Array  # [T-1, D, D]  E_q[z_t z_{t+1}']
    cov: Array  # [T, D, D]    Cov_q[z_t]
    marginals: Array  # [Tk, K]  q(k_t) (the HMM update given q(z))
    trans_counts: Array  # [K, K] sum_t q(k_t = i, k_{t+1} = j)
    lds_log_normalizer: Array  # []  log Z of q(z)'s chain
    hmm_log_normalizer: Array  # []  log Z of q(k)'s chain
    local_kl: Array  # []  KL(q(z) q(k) || p(z, k | E theta))
    surrogate: Array  # []  local_kl - E_q sum_t log l_phi(z_t)  (= minus the inner objective)
    used_marginals: Array  # [Tk, K] the q(k) that built q(z)
    lds_potentials: LDSPotentials  # q(z)'s chain (masked encoder potentials included)
    sampler: LDSSampler | None = None  # backward-sampling kernels of that chain (mf_sample)


# ----------------------------------------------------------------------------------------------
# one sequence: blocks


def _masked(R: Array, r: Array, mask: Array) -> tuple[Array, Array]:
    if R.ndim == 2:
        return R * mask[:, None], r * mask[:, None]
    return R * mask[:, None, None], r * mask[:, None]


def _lds_block(q: Array, R: Array, r: Array, g: SLDSGlobalPotentials, leading: bool):
    # the expected statistics with the Hessian-symmetric reverse rule: the implicit
    # gradient's adjoint iterations differentiate this block once per iteration
    qt = q[1:] if leading else q
    pot, _ = hmm_to_lds_potentials(qt, g, R, r)
    return pot, lds_expected_stats(pot)


def _final_lds_block(q, R, r, g: SLDSGlobalPotentials, leading: bool):
    """`_lds_block` that also keeps the filter's sampling kernels (the ELBO's z draw then
    needs no second filter: fewer smoother copies for XLA to compile, less work per step)."""
    qt = q[1:] if leading else q
    pot, _ = hmm_to_lds_potentials(qt, g, R, r)
    post, sampler = lds_smoother_with_sampler(pot)
    return pot, post, sampler


def _hmm_block(Ez, Ezz, Ezz_next, g: SLDSGlobalPotentials, leading: bool, pairwise=False):
    eta = lds_to_hmm_log_potentials(Ez, Ezz, Ezz_next, g)
    node = jnp.concatenate([jnp.zeros_like(eta[:1]), eta], 0) if leading else eta
    return eta, hmm_smoother(HMMPotentials(g.log_pi0, g.log_P, node))


def _kl(post, eta, q, hmm_logZ, R, r, g, leading):
    qt = q[1:] if leading else q
    return slds_local_kl(post.Ez, post.Ezz, post.log_normalizer, eta, qt, hmm_logZ, R, r, g.c,
                         g.c_init)


def _make_maps(leading: bool):
    def step(omega: MFState, theta, mask):
        R, r, g = theta
        R, r = _masked(R, r, mask)
        _, post = _lds_block(omega.marginals, R, r, g, leading)
        eta, hmm = _hmm_block(post.Ez, post.Ezz, post.Ezz_next, g, leading)
        kl = _kl(post, eta, omega.marginals, hmm.log_normalizer, R, r, g, leading)
        return MFState(post.Ez, post.Ezz, post.Ezz_next, hmm.marginals), kl

    def parallel(omega: MFState, theta, mask):
        R, r, g = theta
        R, r = _masked(R, r, mask)
        _, post = _lds_block(omega.marginals, R, r, g, leading)
        _, hmm = _hmm_block(omega.Ez, omega.Ezz, omega.Ezz_next, g, leading)
        return MFState(post.Ez, post.Ezz, post.Ezz_next, hmm.marginals)

    return step, parallel


_MAPS = {False: _make_maps(False), True: _make_maps(True)}


def mf_block_update(
    marginals: Array,
    node_R: Array,
    node_r: Array,
    globals: SLDSGlobalPotentials,
    *,
    mask: Array | None = None,
    leading_regime: bool = False,
) -> tuple[Array, Array]:
    """One Gauss-Seidel block update ``q(k) -> q(z) -> q(k)``; returns ``(q(k) [Tk, K], KL [])``.

    Exposed for tests and diagnostics (a fixed point satisfies ``update(q) == q``).
    """
    T = node_r.shape[0]
    m = jnp.ones((T,), node_r.dtype) if mask is None else jnp.asarray(mask).astype(node_r.dtype)
    omega = MFState(jnp.zeros_like(node_r), None, None, marginals)
    new, kl = _MAPS[leading_regime][0](omega, (node_R, node_r, globals), m)
    return new.marginals, kl


# ----------------------------------------------------------------------------------------------
# validation


def _shape(x) -> str:
    return "[" + ", ".join(str(s) for s in jnp.shape(x)) + "]"


def _validate(node_R, node_r, g, mask, init_key, init_marginals, leading):
    if jnp.ndim(node_r) != 2:
        raise ValueError(f"`node_r` must have shape [T, D]; got {_shape(node_r)}")
    T, D = jnp.shape(node_r)
    if T < 2:
        raise ValueError(f"`node_r` must have T >= 2 steps; got {_shape(node_r)}")
    if jnp.shape(node_R) not in ((T, D), (T, D, D)):
        raise ValueError(
            f"`node_R` must have shape [T, D] = [{T}, {D}] (diagonal) or [T, D, D] = "
            f"[{T}, {D}, {D}] (full); got {_shape(node_R)}"
        )
    K, _ = validate_globals(g, D)
    if mask is not None and jnp.shape(mask) != (T,):
        raise ValueError(f"`mask` must have shape [T] = [{T}]; got {_shape(mask)}")
    Tk = T if leading else T - 1
    if init_key is not None and init_marginals is not None:
        raise ValueError("pass either `init_key` or `init_marginals`, not both")
    if K > 1 and init_key is None and init_marginals is None:
        raise ValueError("one of `init_key` or `init_marginals` is required when K > 1")
    if init_marginals is not None and jnp.shape(init_marginals) != (Tk, K):
        raise ValueError(
            f"`init_marginals` must have shape [Tk, K] = [{Tk}, {K}]; got {_shape(init_marginals)}"
        )
    for name, x in (("node_R", node_R), ("node_r", node_r), ("init_marginals", init_marginals)):
        if x is None or isinstance(x, jax.core.Tracer):
            continue
        if not np.all(np.isfinite(np.asarray(x))):
            raise ValueError(f"`{name}` contains NaN or inf")
    return T, D, K, Tk


# ----------------------------------------------------------------------------------------------
# public entry


def mf_fixed_point(
    node_R: Array,
    node_r: Array,
    globals: SLDSGlobalPotentials,
    *,
    mask: Array | None = None,
    init_key: Array | None = None,
    init_marginals: Array | None = None,
    options: FixedPointOptions = DEFAULT_OPTIONS,
    leading_regime: bool = False,
    init_concentration: float = 0.1,
    probe: Array | None = None,
) -> tuple[MFResult, FixedPointInfo]:
    """Structured mean-field posterior ``q(z) q(k)`` of one SLDS sequence.

    Parameters
    ----------
    node_R : Array
        ``[T, D]`` diagonal or ``[T, D, D]`` full encoder precisions ``R_t`` (PSD).
    node_r : Array
        ``[T, D]`` encoder linear potentials ``r_t``.
    globals : SLDSGlobalPotentials
        Expected prior potentials (`slds_expected_potentials`).
    mask : Array, optional
        ``[T]`` (bool or 0/1); masked steps carry no encoder potential.  Not differentiated.
    init_key : Array, optional
        Key for the initial ``q(k)``: iid ``Dirichlet(init_concentration)`` per step.
    init_marginals : Array, optional
        ``[Tk, K]`` initial ``q(k)`` (not differentiated).  Exactly one of the two is required
        when ``K > 1``.
    options : FixedPointOptions
        Iteration caps, tolerances and the gradient ``solver`` (static).
    leading_regime : bool
        ``False``: ``Tk = T - 1`` regimes, one per transition (the paper).  ``True``: ``Tk = T``
        and ``k_1`` has no continuous effect (it only sets the law of ``k_2``).
    init_concentration : float
        Dirichlet concentration of the random initialisation.
    probe : Array, optional
        ``[2]`` zeros; its gradient is ``[relative adjoint residual, fallback flag]`` of the
        backward pass (implicit solvers only).

    Returns
    -------
    (MFResult, MFInfo)
        ``MFInfo.adjoint_residual`` is NaN (the backward has not run yet; see ``probe``) and
        ``MFInfo.used_fallback`` is the forward-predictable fallback (capped solvers that did
        not converge).

    Raises
    ------
    ValueError
        Wrong shapes, NaN/inf in concrete inputs, missing/duplicate initialisation.

    Notes
    -----
    ``K = 1`` is the LDS: a single smoother call, no loop; then ``log_pi0`` and ``log_P`` are
    ignored (the regime is certain) and the KL is that of the LDS.

    References
    ----------
    docs/math.md §4 (loop), §6 (KL), §7 (implicit gradient).
    """
    T, D, K, Tk = _validate(node_R, node_r, globals, mask, init_key, init_marginals,
                            leading_regime)
    dtype = jnp.result_type(node_R, node_r, *globals)
    R = jnp.asarray(node_R, dtype)
    r = jnp.asarray(node_r, dtype)
    g = SLDSGlobalPotentials(*(jnp.asarray(x, dtype) for x in globals))
    m = jnp.ones((T,), dtype) if mask is None else jnp.asarray(mask).astype(dtype)
    Rm, rm = _masked(R, r, m)

    if K == 1:
        q = jnp.ones((Tk, 1), dtype)
        pot, post, sampler = _final_lds_block(q, Rm, rm, g, leading_regime)
        const = g.c_init + (T - 1) * g.c[0]
        enc = encoder_expected_log_potential(Rm, rm, post.Ez, post.Ezz)
        kl = enc - post.log_normalizer - const
        zero = jnp.zeros((), dtype)
        res = MFResult(post.Ez, post.Ezz, post.Ezz_next, post.cov, q,
                       jnp.full((1, 1), Tk - 1, dtype), post.log_normalizer, zero, kl,
                       kl - enc, q, pot, sampler)
        info = FixedPointInfo(jnp.ones((), jnp.int32), jnp.ones((), bool), zero, zero,
                              jnp.zeros((), bool))
        return res, info

    if init_marginals is None:
        alpha = jnp.full((K,), init_concentration, dtype)
        q0 = jax.random.dirichlet(init_key, alpha, shape=(Tk,), dtype=dtype)
    else:
        q0 = jnp.asarray(init_marginals, dtype)
    q0 = jax.lax.stop_gradient(q0)
    omega0 = MFState(
        jnp.zeros((T, D), dtype), jnp.zeros((T, D, D), dtype), jnp.zeros((T - 1, D, D), dtype), q0
    )
    step, parallel = _MAPS[leading_regime]
    omega, info = fixed_point(step, parallel, (R, r, g), m, omega0, options=options, probe=probe)

    # the final, differentiable block update from the fixed-point q(k)
    q_used = omega.marginals
    pot, post, sampler = _final_lds_block(q_used, Rm, rm, g, leading_regime)
    eta, hmm = _hmm_block(post.Ez, post.Ezz, post.Ezz_next, g, leading_regime)
    kl = _kl(post, eta, q_used, hmm.log_normalizer, Rm, rm, g, leading_regime)
    enc = encoder_expected_log_potential(Rm, rm, post.Ez, post.Ezz)
    res = MFResult(
        Ez=post.Ez,
        Ezz=post.Ezz,
        Ezz_next=post.Ezz_next,
        cov=post.cov,
        marginals=hmm.marginals,
        trans_counts=hmm.trans_counts,
        lds_log_normalizer=post.log_normalizer,
        hmm_log_normalizer=hmm.log_normalizer,
        local_kl=kl,
        surrogate=kl - enc,
        used_marginals=q_used,
        lds_potentials=pot,
        sampler=sampler,
    )
    return res, info


def mf_local_kl(result: MFResult) -> Array:
    """The local KL ``KL(q(z) q(k) || p(z, k | E[theta]))`` of a result (scalar, >= 0)."""
    return result.local_kl

"""Log-space forward-backward for discrete Markov chains (the regime chain of the SLDS).

The chain has ``T`` variables ``k_1..k_T`` in ``{0..K-1}`` and the unnormalised log density

    log psi(k) = log_init[k_1] + sum_{t=1}^{T-1} log_trans[t][k_t, k_{t+1}] + sum_t log_lik[t, k_t]

with ``log_trans`` either time-homogeneous ``[K, K]`` or time-varying ``[T-1, K, K]``. None of the
potentials needs to be normalised: the mean field feeds ``E[log pi_0]`` and ``E[log P]`` from
Dirichlets (sub-normalised) and arbitrary real node log-potentials. ``-inf`` entries (forbidden
initial states, transitions or emissions) are allowed everywhere and give neither NaN values nor
NaN gradients, as long as at least one path has non-zero weight.

Numerics: all recursions run on *normalised* log messages (each row has logsumexp 0), so no
quantity grows with ``T``; the log normaliser is accumulated as the sum of per-step log
increments ``log p(step t | steps < t)``. This keeps float32 accurate on long chains.

Two algorithms compute identical outputs (``svae_math.md`` section 2.5):

- ``hmm_smoother_sequential``: ``lax.scan`` forward filter and backward pass, ``O(T K^2)``.
- ``hmm_smoother_parallel``: ``lax.associative_scan`` over log-space ``K x K`` matrices (a
  log-semiring matrix product), ``O(T K^3)`` work and ``O(log T)`` depth, for GPU/TPU.

Marginals, pairwise marginals and transition counts are computed in closed form from the
forward and backward messages (no autodiff); ``hmm_expected_stats_by_grad`` is the reference
that obtains them as gradients of the log normaliser.

All functions are unbatched (one sequence); callers ``vmap``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

__all__ = [
    "HMMPotentials",
    "HMMPosterior",
    "hmm_filter",
    "hmm_log_normalizer",
    "hmm_smoother",
    "hmm_smoother_sequential",
    "hmm_smoother_parallel",
    "hmm_sample",
    "hmm_expected_stats_by_grad",
]

_METHODS = ("auto", "sequential", "parallel")


class HMMPotentials(NamedTuple):
    """Log-potentials of a discrete chain (none needs to be normalised)."""

    log_init: Array  # [K]                    initial log-potential of k_1
    log_trans: Array  # [K, K] or [T-1, K, K]  log-potential of (k_t = i, k_{t+1} = j)
    log_lik: Array  # [T, K]                 node log-potentials


class HMMPosterior(NamedTuple):
    """Posterior summaries of a discrete chain."""

    log_normalizer: Array  # []           log sum_k psi(k)
    marginals: Array  # [T, K]            q(k_t = i)
    trans_counts: Array  # [K, K]         sum_t q(k_t = i, k_{t+1} = j)
    pairwise: Array | None  # [T-1, K, K] q(k_t = i, k_{t+1} = j) when requested, else None
    filtered_log: Array  # [T, K]         log q(k_t | steps <= t): alpha_t normalised per row


# ------------------------------------------------------------------------------------------
# validation and small helpers
# ------------------------------------------------------------------------------------------


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_potentials(potentials: HMMPotentials) -> tuple[HMMPotentials, int, int]:
    """Shape/value checks at the boundary; returns float arrays with the common dtype, T, K."""
    if not hasattr(potentials, "log_init") or not hasattr(potentials, "log_trans") or not hasattr(
        potentials, "log_lik"
    ):
        raise TypeError(
            f"`potentials` must be an HMMPotentials(log_init, log_trans, log_lik); "
            f"got {type(potentials).__name__}"
        )
    log_init = jnp.asarray(potentials.log_init)
    log_trans = jnp.asarray(potentials.log_trans)
    log_lik = jnp.asarray(potentials.log_lik)
    if log_init.ndim != 1:
        raise ValueError(
            f"`log_init` must have shape [K] (ndim 1); got shape {list(log_init.shape)}"
        )
    K = log_init.shape[0]
    if K < 1:
        raise ValueError("`log_init` must have at least one state; got shape [0]")
    if log_lik.ndim != 2 or log_lik.shape[1] != K or log_lik.shape[0] < 1:
        raise ValueError(
            f"`log_lik` must have shape [T, K] with K = {K} (from `log_init`) and T >= 1; "
            f"got shape {list(log_lik.shape)}"
        )
    T = log_lik.shape[0]
    if log_trans.shape not in ((K, K), (T - 1, K, K)):
        raise ValueError(
            f"`log_trans` must have shape [K, K] = [{K}, {K}] or [T-1, K, K] = "
            f"[{T - 1}, {K}, {K}]; got shape {list(log_trans.shape)}"
        )
    dtype = jnp.result_type(float, log_init, log_trans, log_lik)
    arrays = {"log_init": log_init, "log_trans": log_trans, "log_lik": log_lik}
    for name, x in arrays.items():
        if _is_concrete(x) and x.size:
            xn = np.asarray(x)
            if np.isnan(xn).any() or np.isposinf(xn).any():
                raise ValueError(
                    f"`{name}` contains NaN or +inf; log-potentials must be real or -inf"
                )
    out = HMMPotentials(*(arrays[n].astype(dtype) for n in HMMPotentials._fields))
    return out, T, K


def _check_method(method: str) -> str:
    if method not in _METHODS:
        raise ValueError(f"`method` must be one of {_METHODS}; got {method!r}")
    if method == "auto":
        return "parallel" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else (
            "sequential"
        )
    return method


def _lse(x: Array, axis=-1) -> Array:
    """logsumexp that returns -inf (with zero gradient, not NaN) when all entries are -inf."""
    m = lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))
    s = jnp.sum(jnp.exp(x - m), axis=axis, keepdims=True)
    # s == 0 only when every entry is -inf; a NaN input keeps propagating (NaN != 0)
    nonzero = s != 0
    out = jnp.where(nonzero, jnp.log(jnp.where(nonzero, s, jnp.ones_like(s))) + m, -jnp.inf)
    return jnp.squeeze(out, axis=axis)


def _normalize_log(x: Array, axis=-1) -> Array:
    """x - logsumexp(x) over `axis` (a log-softmax that tolerates -inf entries)."""
    return x - jnp.expand_dims(_lse(x, axis=axis), axis)


def _trans_seq(log_trans: Array, T: int) -> Array:
    """Time-varying view [T-1, K, K] of homogeneous or time-varying transitions."""
    if log_trans.ndim == 2:
        return jnp.broadcast_to(log_trans, (T - 1,) + log_trans.shape)
    return log_trans


def _log_increments(filtered_log: Array, lt: Array, pot: HMMPotentials) -> Array:
    """log p(step t | steps < t) for t = 1..T-1 from the normalised filtered messages. [T-1]"""
    pred = _lse(filtered_log[:-1, :, None] + lt, axis=1)  # [T-1, K]
    return _lse(pred + pot.log_lik[1:], axis=-1)


# ------------------------------------------------------------------------------------------
# forward filters
# ------------------------------------------------------------------------------------------


def _filter_sequential(pot: HMMPotentials, lt: Array) -> tuple[Array, Array]:
    a0 = pot.log_init + pot.log_lik[0]
    c0 = _lse(a0)
    f0 = a0 - c0

    def step(f, inputs):
        log_trans_t, log_lik_next = inputs
        a = _lse(f[:, None] + log_trans_t, axis=0) + log_lik_next
        c = _lse(a)
        f_next = a - c
        return f_next, (f_next, c)

    _, (fs, cs) = lax.scan(step, f0, (lt, pot.log_lik[1:]))
    filtered_log = jnp.concatenate([f0[None], fs], axis=0)
    return c0 + jnp.sum(cs), filtered_log


def _log_matmul(A: Array, B: Array) -> Array:
    """Log-semiring product C[i, j] = lse_k A[i, k] + B[k, j], batched; rescaled so max C = 0.

    The rescaling (a constant shift, with stop_gradient) does not change any normalised output
    and keeps the entries O(1) on long chains.
    """
    C = _lse(A[..., :, :, None] + B[..., None, :, :], axis=-2)
    m = lax.stop_gradient(jnp.max(C, axis=(-2, -1), keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))
    return C - m


def _filter_parallel(pot: HMMPotentials, lt: Array) -> tuple[Array, Array]:
    K = pot.log_init.shape[0]
    a0 = _normalize_log(pot.log_init + pot.log_lik[0])
    # element 0: every row equals alpha_1, so row 0 of each prefix product is alpha_t
    first = jnp.broadcast_to(a0[None, :], (K, K))
    elems = jnp.concatenate([first[None], lt + pot.log_lik[1:, None, :]], axis=0)  # [T, K, K]
    prefix = lax.associative_scan(_log_matmul, elems)
    filtered_log = _normalize_log(prefix[:, 0, :])
    c0 = _lse(pot.log_init + pot.log_lik[0])
    return c0 + jnp.sum(_log_increments(filtered_log, lt, pot)), filtered_log


# ------------------------------------------------------------------------------------------
# backward passes (return normalised log beta [T, K])
# ------------------------------------------------------------------------------------------


def _backward_sequential(pot: HMMPotentials, lt: Array) -> Array:
    K = pot.log_init.shape[0]
    b_last = jnp.zeros((K,), pot.log_lik.dtype)

    def step(b_next, inputs):
        log_trans_t, log_lik_next = inputs
        b = _normalize_log(_lse(log_trans_t + (log_lik_next + b_next)[None, :], axis=1))
        return b, b

    _, bs = lax.scan(step, b_last, (lt, pot.log_lik[1:]), reverse=True)
    return jnp.concatenate([bs, b_last[None]], axis=0)


def _messages_parallel(pot: HMMPotentials, lt: Array) -> tuple[Array, Array, Array]:
    """Forward and backward messages from ONE associative scan (half the compiled code).

    The backward messages are suffix products ``S_t = E_t ... E_{T-1}`` of the elements
    ``E_t = log_trans_t + log_lik_{t+1}`` (``E_{T-1} = 0``: a column of log-ones), and
    ``beta_t = S_t[:, 0]``. Transposed, ``S_t^T`` is a *prefix* product of the reversed,
    transposed elements, so both directions run as prefix products stacked on a leading axis;
    in each, row 0 of the prefix product is the message.

    Returns ``(log_normalizer [], filtered_log [T, K], log_beta [T, K])``.
    """
    K = pot.log_init.shape[0]
    a0 = _normalize_log(pot.log_init + pot.log_lik[0])
    steps = lt + pot.log_lik[1:, None, :]  # [T-1, K, K] E_t for t < T-1
    fwd = jnp.concatenate([jnp.broadcast_to(a0, (1, K, K)), steps], axis=0)
    bwd = jnp.concatenate(
        [jnp.zeros((1, K, K), steps.dtype), jnp.swapaxes(steps, -1, -2)[::-1]], axis=0
    )
    prefix = lax.associative_scan(_log_matmul, jnp.stack([fwd, bwd]), axis=1)  # [2, T, K, K]
    filtered_log = _normalize_log(prefix[0, :, 0, :])
    log_beta = _normalize_log(prefix[1, ::-1, 0, :])
    c0 = _lse(pot.log_init + pot.log_lik[0])
    log_z = c0 + jnp.sum(_log_increments(filtered_log, lt, pot))
    return log_z, filtered_log, log_beta


# ------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------


def hmm_filter(potentials: HMMPotentials, *, method: str = "auto") -> tuple[Array, Array]:
    """Forward filter in log space: the log normaliser and normalised log forward messages.

    Parameters
    ----------
    potentials : HMMPotentials
        ``log_init [K]``, ``log_trans [K, K]`` or ``[T-1, K, K]``, ``log_lik [T, K]``; need not
        be normalised, may contain ``-inf``. One sequence (``vmap`` for batches).
    method : {"auto", "sequential", "parallel"}
        ``"auto"`` is sequential on CPU and parallel on GPU/TPU. Static.

    Returns
    -------
    log_normalizer : Array []
        ``log sum_k psi(k)``.
    filtered_log : Array [T, K]
        ``log alpha_t - logsumexp(log alpha_t)``: the log of ``q(k_t | steps <= t)``.

    Raises
    ------
    ValueError
        On wrong shapes, or NaN / +inf in concrete (non-traced) inputs.

    Warnings
    --------
    Under ``jit``/``vmap`` the values are traced and not checked: a NaN in any input then
    propagates to NaN in every output, and a chain whose total weight is zero (all paths
    ``-inf``) gives ``log_normalizer = -inf`` and NaN messages.
    """
    pot, T, _ = _check_potentials(potentials)
    method = _check_method(method)
    lt = _trans_seq(pot.log_trans, T)
    if method == "parallel":
        return _filter_parallel(pot, lt)
    return _filter_sequential(pot, lt)


def hmm_log_normalizer(potentials: HMMPotentials, *, method: str = "auto") -> Array:
    """Log normaliser ``log sum_k exp(log_init[k_1] + sum log_trans + sum log_lik)``.

    Parameters
    ----------
    potentials : HMMPotentials
        ``log_init [K]``, ``log_trans [K, K]`` or ``[T-1, K, K]``, ``log_lik [T, K]``.
    method : {"auto", "sequential", "parallel"}
        Algorithm for the forward pass (static).

    Returns
    -------
    Array []
        The log normaliser; its gradient is the expected sufficient statistics
        (``hmm_expected_stats_by_grad``).

    Raises
    ------
    ValueError
        As ``hmm_filter``.
    """
    return hmm_filter(potentials, method=method)[0]


def _posterior(pot: HMMPotentials, lt: Array, log_z: Array, filtered_log: Array,
               log_beta: Array, pairwise: bool) -> HMMPosterior:
    marginals = jnp.exp(_normalize_log(filtered_log + log_beta))
    log_xi = filtered_log[:-1, :, None] + lt + (pot.log_lik[1:] + log_beta[1:])[:, None, :]
    T1, K = lt.shape[0], lt.shape[1]
    log_xi = _normalize_log(log_xi.reshape(T1, K * K)).reshape(T1, K, K)
    xi = jnp.exp(log_xi)
    counts = jnp.sum(xi, axis=0)
    return HMMPosterior(
        log_normalizer=log_z,
        marginals=marginals,
        trans_counts=counts,
        pairwise=xi if pairwise else None,
        filtered_log=filtered_log,
    )


def hmm_smoother_sequential(potentials: HMMPotentials, *, pairwise: bool = False) -> HMMPosterior:
    """Forward-backward with ``lax.scan`` in log space (``svae_math.md`` section 2.5).

    Parameters
    ----------
    potentials : HMMPotentials
        ``log_init [K]``, ``log_trans [K, K]`` or ``[T-1, K, K]``, ``log_lik [T, K]``; need not
        be normalised, may contain ``-inf``. One sequence (``vmap`` for batches).
    pairwise : bool
        Also return the pairwise marginals ``[T-1, K, K]`` (static).

    Returns
    -------
    HMMPosterior
        ``log_normalizer []``, ``marginals [T, K]``, ``trans_counts [K, K]``,
        ``pairwise [T-1, K, K] | None``, ``filtered_log [T, K]``.

    Raises
    ------
    ValueError
        On wrong shapes, or NaN / +inf in concrete inputs (see ``hmm_filter`` for traced ones).

    Notes
    -----
    With ``f_t`` the normalised log forward message and ``b_t`` the normalised log backward
    message, ``q(k_t) = softmax(f_t + b_t)`` and
    ``q(k_t=i, k_{t+1}=j) ∝ exp(f_t(i) + log_trans_t(i,j) + log_lik_{t+1}(j) + b_{t+1}(j))``.
    Outputs are differentiable (reverse mode through both scans).

    References
    ----------
    Rabiner (1989), "A tutorial on hidden Markov models", eqs. 18-27 (in log space).
    """
    pot, T, _ = _check_potentials(potentials)
    lt = _trans_seq(pot.log_trans, T)
    log_z, filtered_log = _filter_sequential(pot, lt)
    log_beta = _backward_sequential(pot, lt)
    return _posterior(pot, lt, log_z, filtered_log, log_beta, pairwise)


def hmm_smoother_parallel(potentials: HMMPotentials, *, pairwise: bool = False) -> HMMPosterior:
    """Forward-backward with ``lax.associative_scan`` over log-space ``K x K`` matrices.

    Same signature and outputs as ``hmm_smoother_sequential`` (equal up to rounding). The
    forward and backward messages are prefix / suffix products in the (logsumexp, +) semiring;
    ``O(T K^3)`` work and ``O(log T)`` depth, which pays off on GPU/TPU.

    Parameters
    ----------
    potentials : HMMPotentials
        ``log_init [K]``, ``log_trans [K, K]`` or ``[T-1, K, K]``, ``log_lik [T, K]``.
    pairwise : bool
        Also return the pairwise marginals ``[T-1, K, K]`` (static).

    Returns
    -------
    HMMPosterior

    Raises
    ------
    ValueError
        As ``hmm_smoother_sequential``.

    References
    ----------
    Hassan, Särkkä & García-Fernández (2021), "Temporal parallelization of inference in hidden
    Markov models", IEEE TSP 69.
    """
    pot, T, _ = _check_potentials(potentials)
    lt = _trans_seq(pot.log_trans, T)
    log_z, filtered_log, log_beta = _messages_parallel(pot, lt)
    return _posterior(pot, lt, log_z, filtered_log, log_beta, pairwise)


def hmm_smoother(
    potentials: HMMPotentials, *, pairwise: bool = False, method: str = "auto"
) -> HMMPosterior:
    """Posterior marginals, transition counts and log normaliser of a discrete chain.

    Parameters
    ----------
    potentials : HMMPotentials
        ``log_init [K]``, ``log_trans [K, K]`` or ``[T-1, K, K]``, ``log_lik [T, K]``; need not
        be normalised, may contain ``-inf``. One sequence (``vmap`` for batches).
    pairwise : bool
        Also return the pairwise marginals ``[T-1, K, K]`` (static).
    method : {"auto", "sequential", "parallel"}
        ``"auto"``: sequential on CPU, parallel on GPU/TPU (``jax.default_backend()``). Static.

    Returns
    -------
    HMMPosterior
        ``log_normalizer []``, ``marginals [T, K]``, ``trans_counts [K, K]``
        (``sum_t q(k_t=i, k_{t+1}=j)``), ``pairwise [T-1, K, K] | None``,
        ``filtered_log [T, K]``.

    Raises
    ------
    ValueError
        On wrong shapes, an unknown ``method``, or NaN / +inf in concrete inputs.

    Warnings
    --------
    Under ``jit``/``vmap`` inputs are not checked: a NaN propagates to NaN outputs, and a chain
    with no path of non-zero weight gives ``log_normalizer = -inf`` and NaN marginals.
    """
    method = _check_method(method)
    if method == "parallel":
        return hmm_smoother_parallel(potentials, pairwise=pairwise)
    return hmm_smoother_sequential(potentials, pairwise=pairwise)


def hmm_expected_stats_by_grad(potentials: HMMPotentials) -> HMMPosterior:
    """Reference expected statistics as ``jax.grad`` of the log normaliser (slow; for tests).

    ``d logZ / d log_lik = marginals``, ``d logZ / d log_trans_t = pairwise_t`` (the
    transitions are broadcast to ``[T-1, K, K]`` first so that pairwise marginals are always
    returned), ``d logZ / d log_init = marginals[0]``.

    Parameters
    ----------
    potentials : HMMPotentials
        As ``hmm_smoother``.

    Returns
    -------
    HMMPosterior
        With ``pairwise [T-1, K, K]`` filled in.

    Raises
    ------
    ValueError
        As ``hmm_smoother``.
    """
    pot, T, _ = _check_potentials(potentials)
    lt = _trans_seq(pot.log_trans, T)

    def log_z(lt_, log_lik_):
        return _filter_sequential(pot._replace(log_lik=log_lik_), lt_)[0]

    log_normalizer, (pair, marginals) = jax.value_and_grad(log_z, argnums=(0, 1))(
        lt, pot.log_lik
    )
    _, filtered_log = _filter_sequential(pot, lt)
    return HMMPosterior(
        log_normalizer=log_normalizer,
        marginals=marginals,
        trans_counts=jnp.sum(pair, axis=0),
        pairwise=pair,
        filtered_log=filtered_log,
    )


def _sample_one(gumbel: Array, lt: Array, filtered_log: Array, method: str) -> Array:
    """One path from Gumbel noise [T, K, K] (the last slice's first column draws k_T)."""
    # Gumbel-max draws of k_T and of k_t given every value j of k_{t+1}
    last = jnp.argmax(filtered_log[-1] + gumbel[-1, :, 0]).astype(jnp.int32)
    logits = filtered_log[:-1, :, None] + lt  # [T-1, K(i), K(j)]
    table = jnp.argmax(logits + gumbel[:-1], axis=1).astype(jnp.int32)  # [T-1, K(j)]
    if method == "parallel":
        K = lt.shape[-1]
        # compose the index maps k_{t+1} -> k_t from the end (function composition is
        # associative); the last map is constant, so every suffix composition is too
        maps = jnp.concatenate([table, jnp.broadcast_to(last, (1, K))], axis=0)  # [T, K]
        composed = lax.associative_scan(
            lambda later, earlier: jnp.take_along_axis(earlier, later, axis=-1),
            maps,
            reverse=True,
        )
        return composed[:, 0]

    def step(k_next, row):
        k = row[k_next]
        return k, k

    _, ks = lax.scan(step, last, table, reverse=True)
    return jnp.concatenate([ks, last[None]])


def hmm_sample(
    key: Array, potentials: HMMPotentials, *, num_samples: int | None = None,
    method: str = "auto",
) -> Array:
    """Exact posterior samples of ``k_{1:T}`` by forward filtering, backward sampling.

    Parameters
    ----------
    key : Array
        PRNG key (typed ``jax.random.key`` or legacy ``uint32[2]``).
    potentials : HMMPotentials
        ``log_init [K]``, ``log_trans [K, K]`` or ``[T-1, K, K]``, ``log_lik [T, K]``.
    num_samples : int, optional
        Number of independent paths ``S`` (static); ``None`` returns one path.
    method : {"auto", "sequential", "parallel"}
        Algorithm for the forward filter and for composing the backward draws (a ``lax.scan``
        or an associative scan over index maps); both give the same path for the same key.

    Returns
    -------
    Array
        ``int32 [T]``, or ``[S, T]`` when ``num_samples`` is given.

    Raises
    ------
    ValueError
        On wrong shapes, ``num_samples < 1``, or NaN / +inf in concrete inputs.

    Notes
    -----
    ``k_T ~ softmax(f_T)`` and ``k_t | k_{t+1}=j ~ softmax(f_t + log_trans_t[:, j])`` with
    ``f_t`` the normalised log forward messages; every conditional draw is made for all ``j``
    with Gumbel-max noise (one ``[T, K, K]`` Gumbel array per path), then the path is read
    off from the end by a ``lax.scan`` or an associative scan over index maps.
    """
    pot, T, K = _check_potentials(potentials)
    method = _check_method(method)
    if num_samples is not None and (not isinstance(num_samples, int | np.integer)
                                    or num_samples < 1):
        raise ValueError(f"`num_samples` must be a positive int or None; got {num_samples!r}")
    lt = _trans_seq(pot.log_trans, T)
    flt = _filter_parallel if method == "parallel" else _filter_sequential
    _, filtered_log = flt(pot, lt)
    # all the noise in one draw (one random-bits kernel, cheap to compile)
    shape = (T, K, K) if num_samples is None else (num_samples, T, K, K)
    gumbel = jax.random.gumbel(key, shape, pot.log_lik.dtype)
    if num_samples is None:
        return _sample_one(gumbel, lt, filtered_log, method)
    return jax.vmap(lambda g: _sample_one(g, lt, filtered_log, method))(gumbel)

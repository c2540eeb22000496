"""Forward-backward for discrete Markov chains (the regime chain of the SLDS).

The chain has ``T`` variables ``k_1..k_T`` in ``{0..K-1}`` and the unnormalised log density

    log psi(k) = log_init[k_1] + sum_{t=1}^{T-1} log_trans[t][k_t, k_{t+1}] + sum_t log_lik[t, k_t]

with ``log_trans`` either time-homogeneous ``[K, K]`` or time-varying ``[T-1, K, K]``. None of the
potentials needs to be normalised: the mean field feeds ``E[log pi_0]`` and ``E[log P]`` from
Dirichlets (sub-normalised) and arbitrary real node log-potentials. ``-inf`` entries (forbidden
initial states, transitions or emissions) are allowed everywhere and give neither NaN values nor
NaN gradients, as long as at least one path has non-zero weight.

Numerics: the potentials are exponentiated ONCE, outside the loops, after subtracting constant
shifts (the row maxima of each ``log_trans_t`` are folded into the node potentials, and each
node potential is shifted by its maximum; the shifts are added back to the log normaliser), so
sub-normalised potentials stay exact and ``-inf`` entries become exact zeros. The recursions
then run in probability space on messages normalised to sum 1 (one ``K x K`` mat-vec per step,
as in dynamax), so no quantity grows with ``T``; the log normaliser is the sum of the shifts and
of the per-step log normalisers ``log p(step t | steps < t)``. This keeps float32 accurate on
long chains. (An extreme potential can underflow: a state whose probability relative to the
others falls below the float range gets probability 0, and a chain whose only paths all do
gives NaN.)

Two algorithms compute identical outputs (``docs/math.md`` §5):

- ``hmm_smoother_sequential``: ``lax.scan`` forward filter and backward pass, ``O(T K^2)``.
- ``hmm_smoother_parallel``: ``lax.associative_scan`` over non-negative ``K x K`` matrices
  (matrix products rescaled to max entry 1), ``O(T K^3)`` work and ``O(log T)`` depth, for
  GPU/TPU.

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


def _trans_seq(log_trans: Array, T: int) -> Array:
    """Time-varying view [T-1, K, K] of homogeneous or time-varying transitions."""
    if log_trans.ndim == 2:
        return jnp.broadcast_to(log_trans, (T - 1,) + log_trans.shape)
    return log_trans


_HI = lax.Precision.HIGHEST  # float32 matmuls stay float32 on GPU/TPU (no TF32 / bf16 passes)


def _shift(x: Array, axis=-1) -> Array:
    """max over `axis` as a constant (stop_gradient), 0 where every entry is -inf."""
    m = lax.stop_gradient(jnp.max(x, axis=axis))
    return jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))


def _safe_log(p: Array) -> Array:
    """log p with log 0 = -inf and a finite (zero) gradient at 0."""
    pos = p > 0
    return jnp.where(pos, jnp.log(jnp.where(pos, p, jnp.ones_like(p))), -jnp.inf)


class _ProbPotentials(NamedTuple):
    """Probability-space form of the potentials (every exp taken once, outside the scans).

    With ``r_t(i) = max_j log_trans_t[i, j]`` (0 for t = T-1) and
    ``ll'_t = log_lik_t + r_t`` (plus ``log_init`` at t = 0), the chain weight factorises into
    ``A_t = exp(log_trans_t - r_t[:, None])`` (row maxima 1, ``-inf`` -> exact 0) and
    ``E_t = exp(ll'_t - m_t)`` (max 1), with the constants ``m_t`` added back to the log
    normaliser. The forward message carried through the scan is then
    ``w_t ∝ alpha_t * exp(r_t)`` and the backward one ``v_t ∝ beta_t * exp(-r_t)``, so
    ``q(k_t) ∝ w_t v_t`` and ``q(k_t=i, k_{t+1}=j) ∝ w_t(i) A_t[i, j] E_{t+1}(j) v_{t+1}(j)``.
    """

    A: Array  # [K, K] or [T-1, K, K]
    E: Array  # [T, K]
    log_shift: Array  # []  sum_t m_t


def _to_prob(pot: HMMPotentials) -> _ProbPotentials:
    lt = pot.log_trans
    r = _shift(lt, axis=-1)  # [K] or [T-1, K]
    A = jnp.exp(lt - r[..., None])
    T, K = pot.log_lik.shape
    r_seq = jnp.broadcast_to(r, (T - 1, K))
    llp = pot.log_lik + jnp.concatenate([r_seq, jnp.zeros((1, K), r.dtype)], axis=0)
    llp = llp.at[0].add(pot.log_init)
    m = _shift(llp, axis=-1)  # [T]
    E = jnp.exp(llp - m[:, None])
    return _ProbPotentials(A=A, E=E, log_shift=jnp.sum(m))


def _vecmat(w: Array, A: Array) -> Array:
    """pred[t, j] = sum_i w[t, i] A(_t)[i, j] for homogeneous [K, K] or time-varying A."""
    if A.ndim == 2:
        return jnp.matmul(w, A, precision=_HI)
    return jnp.einsum("ti,tij->tj", w, A, precision=_HI)


def _forward_scan(pp: _ProbPotentials) -> Array:
    """Sequential forward pass: w [T, K], rows normalised to sum 1 (``w_t ∝ alpha_t e^{r_t}``).

    Only the messages leave the loop; predictions and normalisers are recomputed from them
    afterwards with one batched contraction (``_finish_forward``), which is cheaper on CPU.
    """
    A, E = pp.A, pp.E
    w0 = E[0] / jnp.sum(E[0])

    if A.ndim == 2:
        def step(w, e):
            v = jnp.matmul(w, A, precision=_HI) * e
            w_next = v / jnp.sum(v)
            return w_next, w_next

        xs = E[1:]
    else:
        def step(w, inputs):
            A_t, e = inputs
            v = jnp.matmul(w, A_t, precision=_HI) * e
            w_next = v / jnp.sum(v)
            return w_next, w_next

        xs = (A, E[1:])
    _, ws = lax.scan(step, w0, xs)
    return jnp.concatenate([w0[None], ws], axis=0)


def _backward_scan(pp: _ProbPotentials) -> Array:
    """Sequential backward pass: v [T, K], each row normalised to sum 1."""
    A, E = pp.A, pp.E
    K = E.shape[1]
    v_last = jnp.full((K,), 1.0 / K, E.dtype)

    if A.ndim == 2:
        At = A.T

        def step(v_next, e):
            v = jnp.matmul(e * v_next, At, precision=_HI)
            v = v / jnp.sum(v)
            return v, v

        xs = E[1:]
    else:
        def step(v_next, inputs):
            A_t, e = inputs
            v = jnp.matmul(e * v_next, A_t.T, precision=_HI)
            v = v / jnp.sum(v)
            return v, v

        xs = (A, E[1:])
    _, vs = lax.scan(step, v_last, xs, reverse=True)
    return jnp.concatenate([vs, v_last[None]], axis=0)


def _filtered_log(pot: HMMPotentials, preds: Array) -> Array:
    """Normalised log alpha_t from the predictions: log q(k_t | steps <= t). [T, K]

    ``alpha_t ∝ pred_t * exp(log_lik_t)`` (``pred_0 ∝ exp(log_init)``), formed in probability
    space with max-shifted exponentials; states whose filtered probability underflows get -inf.
    """
    p0 = jnp.exp(pot.log_init - _shift(pot.log_init))
    preds = jnp.concatenate([p0[None], preds], axis=0)
    f = preds * jnp.exp(pot.log_lik - _shift(pot.log_lik)[:, None])
    return _safe_log(f / jnp.sum(f, axis=-1, keepdims=True))


def _filter_sequential(pot: HMMPotentials, lt: Array) -> tuple[Array, Array]:
    """(log_normalizer, filtered_log); `lt` is [K, K] or [T-1, K, K]."""
    pot = pot._replace(log_trans=lt)
    pp = _to_prob(pot)
    log_z, preds = _finish_forward(pp, _forward_scan(pp))
    return log_z, _filtered_log(pot, preds)


_SMALL_K = 8  # up to this many states, the scan's matrix products are unrolled (see below)


def _prob_matmul(a: Array, b: Array) -> Array:
    """Batched product of non-negative matrices rescaled to max entry 1 (a constant shift).

    The rescaling does not change any normalised output and keeps the entries O(1) on long
    chains.
    """
    K = a.shape[-1]
    if K <= _SMALL_K:
        # tiny batched matmuls are slow on CPU: K fused outer-product updates are ~5-20x faster
        c = a[..., :, 0:1] * b[..., 0:1, :]
        for k in range(1, K):
            c = c + a[..., :, k : k + 1] * b[..., k : k + 1, :]
    else:
        c = jnp.matmul(a, b, precision=_HI)
    m = lax.stop_gradient(jnp.max(c, axis=(-2, -1), keepdims=True))
    return c / jnp.where(m > 0, m, jnp.ones_like(m))


def _parallel_forward_elems(pp: _ProbPotentials) -> tuple[Array, Array]:
    """Forward scan elements [T, K, K] (row 0 of each prefix product is w_t) and w_0."""
    K = pp.E.shape[1]
    w0 = pp.E[0] / jnp.sum(pp.E[0])
    steps = pp.A * pp.E[1:, None, :]  # [T-1, K, K]: A_{t-1} diag(E_t)
    first = jnp.broadcast_to(w0, (1, K, K))
    return jnp.concatenate([first, steps], axis=0), steps


def _finish_forward(pp: _ProbPotentials, w: Array) -> tuple[Array, Array]:
    """log normaliser and predictions [T-1, K] from the normalised forward messages w."""
    preds = _vecmat(w[:-1], pp.A)
    cs = jnp.sum(preds * pp.E[1:], axis=-1)
    log_z = pp.log_shift + jnp.log(jnp.sum(pp.E[0])) + jnp.sum(jnp.log(cs))
    return log_z, preds


def _normalize_rows(x: Array) -> Array:
    return x / jnp.sum(x, axis=-1, keepdims=True)


def _filter_parallel(pot: HMMPotentials, lt: Array) -> tuple[Array, Array]:
    pot = pot._replace(log_trans=lt)
    pp = _to_prob(pot)
    elems, _ = _parallel_forward_elems(pp)
    prefix = lax.associative_scan(_prob_matmul, elems)
    w = _normalize_rows(prefix[:, 0, :])
    log_z, preds = _finish_forward(pp, w)
    return log_z, _filtered_log(pot, preds)


def _messages_parallel(pp: _ProbPotentials) -> tuple[Array, Array]:
    """Forward and backward messages from ONE associative scan (half the compiled code).

    The backward messages are suffix products ``S_t = M_{t+1} ... M_{T-1} 1`` of the elements
    ``M_t = A_{t-1} diag(E_t)``. Transposed, ``S_t^T`` is a *prefix* product of the reversed,
    transposed elements (led by a matrix of ones), so both directions run as prefix products
    stacked on a leading axis; in each, row 0 of the prefix product is the message.

    Returns ``(w [T, K], v [T, K])`` (rows sum to 1).
    """
    K = pp.E.shape[1]
    fwd, steps = _parallel_forward_elems(pp)
    bwd = jnp.concatenate(
        [jnp.ones((1, K, K), steps.dtype), jnp.swapaxes(steps, -1, -2)[::-1]], axis=0
    )
    prefix = lax.associative_scan(_prob_matmul, jnp.stack([fwd, bwd]), axis=1)  # [2, T, K, K]
    w = _normalize_rows(prefix[0, :, 0, :])
    v = _normalize_rows(prefix[1, ::-1, 0, :])
    return w, v


# ------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------


def hmm_filter(potentials: HMMPotentials, *, method: str = "auto") -> tuple[Array, Array]:
    """Forward filter: the log normaliser and normalised log forward messages.

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
    pot, _, _ = _check_potentials(potentials)
    method = _check_method(method)
    if method == "parallel":
        return _filter_parallel(pot, pot.log_trans)
    return _filter_sequential(pot, pot.log_trans)


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


def _posterior(pot: HMMPotentials, pp: _ProbPotentials, log_z: Array, w: Array, v: Array,
               preds: Array, pairwise: bool) -> HMMPosterior:
    """Marginals, counts and (optionally) pairwise marginals from the probability-space messages.

    ``q(k_t) = w_t v_t / <w_t, v_t>`` and ``q(k_t=i, k_{t+1}=j) = w_t(i) A_t[i, j] u_{t+1}(j)``
    with ``u_{t+1} = E_{t+1} v_{t+1} / <pred_{t+1}, E_{t+1} v_{t+1}>``; the counts are one
    contraction over t (no ``[T-1, K, K]`` array for homogeneous transitions).
    """
    wv = w * v
    marginals = wv / jnp.sum(wv, axis=-1, keepdims=True)
    ev = pp.E[1:] * v[1:]  # [T-1, K]
    u = ev / jnp.sum(preds * ev, axis=-1, keepdims=True)
    if pp.A.ndim == 2:
        counts = pp.A * jnp.matmul(w[:-1].T, u, precision=_HI)
    else:
        counts = jnp.einsum("ti,tij,tj->ij", w[:-1], pp.A, u, precision=_HI)
    xi = w[:-1, :, None] * pp.A * u[:, None, :] if pairwise else None
    return HMMPosterior(
        log_normalizer=log_z,
        marginals=marginals,
        trans_counts=counts,
        pairwise=xi,
        filtered_log=_filtered_log(pot, preds),
    )


def hmm_smoother_sequential(potentials: HMMPotentials, *, pairwise: bool = False) -> HMMPosterior:
    """Forward-backward with ``lax.scan`` (``docs/math.md`` §5).

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
    Both are computed in probability space (see ``_ProbPotentials``): one ``K x K`` mat-vec per
    step and the transition counts as one contraction over ``t`` after the scans.
    Outputs are differentiable (reverse mode through both scans).

    References
    ----------
    Rabiner (1989), "A tutorial on hidden Markov models", eqs. 18-27 (scaled recursions).
    """
    pot, _, _ = _check_potentials(potentials)
    pp = _to_prob(pot)
    w = _forward_scan(pp)
    v = _backward_scan(pp)
    log_z, preds = _finish_forward(pp, w)
    return _posterior(pot, pp, log_z, w, v, preds, pairwise)


def hmm_smoother_parallel(potentials: HMMPotentials, *, pairwise: bool = False) -> HMMPosterior:
    """Forward-backward with ``lax.associative_scan`` over probability-space ``K x K`` matrices.

    Same signature and outputs as ``hmm_smoother_sequential`` (equal up to rounding). The
    forward and backward messages are prefix / suffix products of non-negative matrices (each
    product rescaled to max entry 1); ``O(T K^3)`` work and ``O(log T)`` depth,
    which pays off on GPU/TPU.

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
    pot, _, _ = _check_potentials(potentials)
    pp = _to_prob(pot)
    w, v = _messages_parallel(pp)
    log_z, preds = _finish_forward(pp, w)
    return _posterior(pot, pp, log_z, w, v, preds, pairwise)


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

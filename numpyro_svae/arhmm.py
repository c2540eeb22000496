"""Linear AR(1)-HMM fitted by MAP-EM, in JAX on the library's own HMM message passing.

The model of one sequence ``z [T, D]`` with regimes ``k_t`` in ``0 .. K-1``::

    k_1 ~ pi,   k_{t+1} | k_t ~ P[k_t],
    z_t | z_{t-1}, k_t ~ N(A_k z_{t-1} + b_k, Q_k)        (t >= 2)

The first frame is conditioned on (the likelihood is ``p(z_{2:T} | z_1)``): ``k_t`` drives the
transition ``z_{t-1} -> z_t``, the convention of ``numpyro_svae.initialize``.

Masks: ``mask [N, T]`` (True = observed).  A frame carries an emission only if it and its
predecessor are observed; the regime chain of a sequence runs from its first to its last
observed frame (through interior gaps, where it is marginalised); outside that span the
regime is held constant, so leading and trailing padding change neither the likelihood nor
the EM statistics.  ``lengths [N]`` is the same as ``mask = arange(T) < lengths[:, None]``.

Estimation is MAP-EM: the E-step is ``messages.hmm.hmm_smoother`` (``vmap`` over sequences),
the M-step is closed form; the whole EM loop is one compiled ``lax.scan``.  Priors (weak, so
that a regime that loses its frames keeps finite parameters):

- rows of ``P`` ~ Dirichlet(``c + s e_i``) and ``pi`` ~ Dirichlet(``c``) (``c`` the
  ``transition_concentration``, ``s`` the ``stickiness``; the MAP row is
  ``counts + c - 1 + s e_i``, normalised);
- ``W_k = [A_k | b_k]`` and ``Q_k`` get the conjugate matrix-normal-inverse-Wishart-form log
  density ``-(kappa / 2) log|Q_k| - 1/2 tr(Q_k^{-1} (kappa S + (W_k - W_0) V (W_k - W_0)'))``
  (up to a constant; its degrees of freedom are chosen so that the mode of ``Q_k`` is ``S``
  for a regime without frames, which may make it improper as a density, never as a
  penalty).  ``W_0`` and ``S`` are the weights and residual covariance of one ridge AR(1)
  regression pooled over all observed frames; ``kappa`` (``prior_frames``) weighs ``S`` in
  pseudo-frames and ``V = lambda diag(E[u u'])`` is a ridge of ``lambda`` (``ridge``)
  pseudo-frames with the data's regressor second moments (``u = [z_{t-1}; 1]``).  The M-step
  is ``W_k = (S_yu + W_0 V) (S_uu + V)^{-1}`` and
  ``Q_k = (kappa S + sum_t gamma_tk r r' + (W_k - W_0) V (W_k - W_0)') / (n_k + kappa)``
  (``r`` the residuals): a regime with no frames becomes the pooled regression
  ``W_k = W_0, Q_k = S``.

EM starts from k-means (k-means++ seeding, Lloyd steps, numpy, seeded by ``key``) on the
standardised pairs ``[z_{t-1}, z_t]``: one hard M-step per cluster, uniform ``pi`` and
``init_self_prob`` on the diagonal of ``P``.  Arrays follow the input's float type (float64
needs ``jax.enable_x64``).  Pure JAX and numpy: no NumPyro.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.linalg import solve_triangular
from jax.scipy.special import xlogy

from numpyro_svae._kmeans import kmeans
from numpyro_svae._linalg import LOG_2PI, chol_logdet, psd_cholesky, psd_solve, symmetrize
from numpyro_svae.messages.hmm import HMMPotentials, hmm_smoother

Array = jax.Array

__all__ = [
    "ARHMMOptions",
    "ARHMMParams",
    "ARHMMFit",
    "fit_arhmm",
    "log_likelihood",
    "segment",
    "viterbi",
]


class ARHMMOptions(NamedTuple):
    """Priors and initialisation of :func:`fit_arhmm` (see the module docstring)."""

    transition_concentration: float = 1.1  # c >= 1: Dirichlet concentration of pi and P rows
    stickiness: float = 10.0  # s >= 0: extra pseudo-counts on the diagonal of P
    prior_frames: float = 1.0  # kappa > 0: pseudo-frames of the prior on Q
    ridge: float = 0.01  # lambda > 0: pseudo-frames of the prior on [A | b]
    kmeans_iters: int = 25  # Lloyd steps of the k-means initialisation
    init_self_prob: float = 0.9  # initial diagonal of P, in (0, 1)


class ARHMMParams(NamedTuple):
    """Parameters of a K-regime AR(1)-HMM on D-dimensional data."""

    initial_probs: Array  # [K]        pi
    transition_matrix: Array  # [K, K]  P[i, j] = p(k_{t+1} = j | k_t = i)
    A: Array  # [K, D, D]               regression matrix of each regime
    b: Array  # [K, D]                  bias of each regime
    Q: Array  # [K, D, D]               noise covariance of each regime


class ARHMMFit(NamedTuple):
    """Result of :func:`fit_arhmm`."""

    params: ARHMMParams  # after the last EM iteration
    log_likelihoods: Array  # [num_iters] sum_n log p(z_n[2:] | z_n[1]) after each iteration
    log_posteriors: Array  # [num_iters] log-likelihood + log prior (unnormalised), non-decreasing
    options: ARHMMOptions


class _Data(NamedTuple):
    """Validated data of N sequences (masked entries set to 0)."""

    z: Array  # [N, T, D]
    pair_ok: Array  # [N, T] bool: t >= 1 and frames t-1, t observed (frame t has an emission)
    inside: Array  # [N, T-1] bool: transition t -> t+1 within the observed span
    has_obs: Array  # [N] bool: the sequence has an observed frame


class _Prior(NamedTuple):
    alpha_init: Array  # [K]  Dirichlet concentration of pi
    alpha_trans: Array  # [K, K]  Dirichlet concentrations of the rows of P
    W0: Array  # [D, D+1]  prior mean of [A | b] (pooled regression)
    V: Array  # [D+1, D+1]  prior precision of [A | b] (lambda diag E[u u'])
    S: Array  # [D, D]  pooled residual covariance
    kappa: Array  # []


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------


def _check_options(options: ARHMMOptions) -> ARHMMOptions:
    if not isinstance(options, ARHMMOptions):
        raise TypeError(f"`options` must be an ARHMMOptions; got {type(options).__name__}")
    c, s = float(options.transition_concentration), float(options.stickiness)
    if not (c >= 1.0 and s >= 0.0 and c - 1.0 + s > 0.0):
        raise ValueError(
            "`options.transition_concentration` must be >= 1 and `options.stickiness` >= 0, "
            f"not both at their minimum (rows need pseudo-counts); got {c} and {s}")
    for name in ("prior_frames", "ridge"):
        if not float(getattr(options, name)) > 0.0:
            raise ValueError(f"`options.{name}` must be > 0; got {getattr(options, name)}")
    if int(options.kmeans_iters) < 0:
        raise ValueError(f"`options.kmeans_iters` must be >= 0; got {options.kmeans_iters}")
    if not 0.0 < float(options.init_self_prob) < 1.0:
        raise ValueError(
            f"`options.init_self_prob` must be in (0, 1); got {options.init_self_prob}")
    return options


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}; got {value!r}")
    return int(value)


def _observed_mask(shape, mask, lengths) -> np.ndarray:
    N, T = shape
    if mask is not None and lengths is not None:
        raise ValueError("pass `mask` or `lengths`, not both")
    if lengths is not None:
        ln = np.asarray(lengths)
        if ln.shape != (N,) or not np.issubdtype(ln.dtype, np.integer):
            raise ValueError(f"`lengths` must be an int array of shape [N] = [{N}]; got "
                             f"{ln.dtype} {list(ln.shape)}")
        if ln.min() < 0 or ln.max() > T:
            raise ValueError(f"`lengths` must be in 0 .. T = {T}; got values in "
                             f"[{ln.min()}, {ln.max()}]")
        return np.arange(T)[None, :] < ln[:, None]
    if mask is None:
        return np.ones((N, T), bool)
    m = np.asarray(mask)
    if m.shape != (N, T):
        raise ValueError(f"`mask` must have shape [N, T] = {[N, T]} to match `z`; got "
                         f"{list(m.shape)}")
    if m.dtype != bool:
        raise TypeError(f"`mask` must be a bool array (True = observed); got {m.dtype}")
    return m


def _prepare(z, mask, lengths, D: int | None = None) -> _Data:
    """Validate ``z [N, T, D]`` and its mask (before any compilation)."""
    if not hasattr(z, "shape") or not hasattr(z, "dtype"):
        z = np.asarray(z)
    if z.ndim != 3 or z.shape[1] < 2 or z.shape[2] < 1:
        raise ValueError(f"`z` must have shape [N, T, D] with T >= 2 and D >= 1; got "
                         f"{list(z.shape)}")
    if D is not None and z.shape[2] != D:
        raise ValueError(f"`z` must have shape [N, T, {D}] (the fitted model's dimension); "
                         f"got {list(z.shape)}")
    if not (np.issubdtype(z.dtype, np.floating) or np.issubdtype(z.dtype, np.integer)):
        raise TypeError(f"`z` must hold real numbers; got dtype {z.dtype}")
    m = _observed_mask(z.shape[:2], mask, lengths)
    zn = np.asarray(z)
    if not np.all(np.isfinite(zn[m])):
        raise ValueError("`z` holds NaN or inf at observed frames (only masked frames may)")
    T = z.shape[1]
    first = np.argmax(m, axis=1)
    last = T - 1 - np.argmax(m[:, ::-1], axis=1)
    has = m.any(axis=1)
    t = np.arange(T - 1)[None, :]
    inside = has[:, None] & (t >= first[:, None]) & (t + 1 <= last[:, None])
    pair_ok = np.zeros_like(m)
    pair_ok[:, 1:] = m[:, 1:] & m[:, :-1]
    zj = jnp.asarray(z)
    if not jnp.issubdtype(zj.dtype, jnp.floating):
        zj = zj.astype(jnp.result_type(float))
    zc = jnp.where(jnp.asarray(m)[..., None], zj, 0)
    return _Data(z=zc, pair_ok=jnp.asarray(pair_ok), inside=jnp.asarray(inside),
                 has_obs=jnp.asarray(has))


def _params_of(fit) -> ARHMMParams:
    if isinstance(fit, ARHMMFit):
        return fit.params
    if isinstance(fit, ARHMMParams):
        return fit
    raise TypeError(f"`fit` must be an ARHMMFit or ARHMMParams; got {type(fit).__name__}")


# ------------------------------------------------------------------------------------------
# model pieces (traced)
# ------------------------------------------------------------------------------------------


def _regressors(z: Array) -> Array:
    """u_t = [z_{t-1}; 1] for t >= 1 (row 0 is a placeholder, never weighted). [N, T, D+1]"""
    prev = jnp.concatenate([z[:, :1], z[:, :-1]], axis=1)
    return jnp.concatenate([prev, jnp.ones(z.shape[:2] + (1,), z.dtype)], axis=-1)


def _weights(params: ARHMMParams) -> Array:
    return jnp.concatenate([params.A, params.b[..., None]], axis=-1)  # [K, D, D+1]


def _frame_logliks(params: ARHMMParams, data: _Data) -> Array:
    """log N(z_t | A_k z_{t-1} + b_k, Q_k) where frame t has an emission, else 0. [N, T, K]"""
    u = _regressors(data.z)
    resid = data.z[:, :, None, :] - jnp.einsum("kdi,nti->ntkd", _weights(params), u)
    L = psd_cholesky(params.Q)  # [K, D, D]
    N, T, K, D = resid.shape
    # whitened residuals, one triangular solve per regime over all frames
    r = jnp.moveaxis(resid, 2, 0).reshape(K, N * T, D)
    w = solve_triangular(L, jnp.swapaxes(r, -1, -2), lower=True)  # [K, D, N*T]
    maha = jnp.moveaxis(jnp.sum(w**2, axis=1).reshape(K, N, T), 0, -1)
    ll = -0.5 * (maha + chol_logdet(L) + D * LOG_2PI)
    return jnp.where(data.pair_ok[..., None], ll, 0.0)


def _potentials(params: ARHMMParams, data: _Data) -> HMMPotentials:
    """Batched potentials: log_trans [N, T-1, K, K] is log P inside the observed span and the
    identity (regime held) outside it."""
    K = params.transition_matrix.shape[0]
    log_p = jnp.log(params.transition_matrix)
    log_eye = jnp.where(jnp.eye(K, dtype=bool), 0.0, -jnp.inf).astype(log_p.dtype)
    lt = jnp.where(data.inside[..., None, None], log_p, log_eye)
    log_init = jnp.broadcast_to(jnp.log(params.initial_probs), (data.z.shape[0], K))
    return HMMPotentials(log_init, lt, _frame_logliks(params, data))


def _log_prior(params: ARHMMParams, prior: _Prior) -> Array:
    lp = jnp.sum(xlogy(prior.alpha_init - 1.0, params.initial_probs))
    lp += jnp.sum(xlogy(prior.alpha_trans - 1.0, params.transition_matrix))
    dW = _weights(params) - prior.W0
    L = psd_cholesky(params.Q)
    scatter = prior.kappa * prior.S + dW @ prior.V @ jnp.swapaxes(dW, -1, -2)  # [K, D, D]
    y = solve_triangular(L, scatter, lower=True)
    tr = jnp.trace(solve_triangular(L, jnp.swapaxes(y, -1, -2), lower=True), axis1=-2, axis2=-1)
    return lp - 0.5 * jnp.sum(prior.kappa * chol_logdet(L) + tr)


def _m_step_emissions(weights: Array, data: _Data, prior: _Prior) -> tuple[Array, Array, Array]:
    """MAP (A, b, Q) from responsibilities ``weights [N, T, K]`` (zero where no emission)."""
    u = _regressors(data.z)
    y = data.z
    D = y.shape[-1]
    Suu = jnp.einsum("ntk,nti,ntj->kij", weights, u, u) + prior.V
    Syu = jnp.einsum("ntk,ntd,nti->kdi", weights, y, u) + prior.W0 @ prior.V
    W = jnp.swapaxes(psd_solve(Suu, jnp.swapaxes(Syu, -1, -2)), -1, -2)  # [K, D, D+1]
    # residual scatter formed from residuals (not Syy - W Suu W'), so it stays PSD in float32
    r = y[:, :, None, :] - jnp.einsum("kdi,nti->ntkd", W, u)
    R = jnp.einsum("ntk,ntkd,ntke->kde", weights, r, r)
    dW = W - prior.W0
    R = R + prior.kappa * prior.S + dW @ prior.V @ jnp.swapaxes(dW, -1, -2)
    n = jnp.sum(weights, axis=(0, 1))
    Q = symmetrize(R) / (n + prior.kappa)[:, None, None]
    return W[..., :D], W[..., D], Q


def _normalize(x: Array) -> Array:
    return x / jnp.sum(x, axis=-1, keepdims=True)


def _m_step_markov(init_counts, trans_counts, prior: _Prior) -> tuple[Array, Array]:
    return (_normalize(init_counts + prior.alpha_init - 1.0),
            _normalize(trans_counts + prior.alpha_trans - 1.0))


def _smooth(params: ARHMMParams, data: _Data, pairwise: bool):
    return jax.vmap(lambda p: hmm_smoother(p, pairwise=pairwise))(_potentials(params, data))


def _em_step(params: ARHMMParams, data: _Data, prior: _Prior):
    post = _smooth(params, data, pairwise=True)
    loglik = jnp.sum(post.log_normalizer)
    gamma = post.marginals  # [N, T, K]
    init_counts = jnp.sum(jnp.where(data.has_obs[:, None], gamma[:, 0], 0.0), axis=0)
    trans_counts = jnp.einsum("nt,ntij->ij", data.inside.astype(gamma.dtype), post.pairwise)
    pi, P = _m_step_markov(init_counts, trans_counts, prior)
    A, b, Q = _m_step_emissions(gamma * data.pair_ok[..., None], data, prior)
    return ARHMMParams(pi, P, A, b, Q), loglik


@partial(jax.jit, static_argnames=("num_iters",))
def _run_em(params0: ARHMMParams, data: _Data, prior: _Prior, num_iters: int):
    """num_iters + 1 E-steps: each iteration's objective is evaluated at its own output."""

    def body(carry, _):
        params, _ = carry
        new, loglik = _em_step(params, data, prior)
        return (new, params), (loglik, loglik + _log_prior(params, prior))

    (_, last), (lls, lps) = lax.scan(body, (params0, params0), None, length=num_iters + 1)
    return last, lls[1:], lps[1:]


# ------------------------------------------------------------------------------------------
# initialisation (numpy)
# ------------------------------------------------------------------------------------------


def _prior_and_pairs(data: _Data, K: int, options: ARHMMOptions):
    """The prior (from pooled statistics of the observed pairs) and the pairs [M, 2D]."""
    z = np.asarray(data.z, np.float64)
    ok = np.asarray(data.pair_ok)
    D = z.shape[-1]
    y = z[ok]  # [M, D], row-major over (n, t): padding does not reorder the pairs
    u = np.concatenate([z[:, :-1][ok[:, 1:]], np.ones((y.shape[0], 1))], axis=1)  # [M, D+1]
    second = np.mean(u**2, axis=0)
    V = float(options.ridge) * np.diag(np.maximum(second, 1e-8 * max(second.max(), 1.0)))
    W0 = np.linalg.solve(u.T @ u + V, u.T @ y).T
    r = y - u @ W0.T
    S = r.T @ r / y.shape[0]
    scale = max(float(np.mean(np.diag(y.T @ y))) / y.shape[0], 1e-30)
    S = 0.5 * (S + S.T) + 1e-6 * scale * np.eye(D)
    c, s = float(options.transition_concentration), float(options.stickiness)
    dt = data.z.dtype
    prior = _Prior(alpha_init=jnp.full((K,), c, dt),
                   alpha_trans=jnp.asarray(c + s * np.eye(K), dt), W0=jnp.asarray(W0, dt),
                   V=jnp.asarray(V, dt), S=jnp.asarray(S, dt),
                   kappa=jnp.asarray(float(options.prior_frames), dt))
    return prior, np.concatenate([u[:, :D], y], axis=1)


def _initial_params(key, data: _Data, K: int, prior: _Prior, pairs: np.ndarray,
                    options: ARHMMOptions) -> ARHMMParams:
    seed = int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))
    feats = (pairs - pairs.mean(0)) / np.maximum(pairs.std(0), 1e-12)
    _, labels = kmeans(feats, K, np.random.default_rng(seed), int(options.kmeans_iters))
    ok = np.asarray(data.pair_ok)
    hard = np.zeros(ok.shape + (K,))
    hard[ok] = np.eye(K)[labels]
    A, b, Q = _m_step_emissions(jnp.asarray(hard, data.z.dtype), data, prior)
    off = (1.0 - options.init_self_prob) / max(K - 1, 1)
    P = np.eye(K) if K == 1 else np.full((K, K), off) + (options.init_self_prob - off) * np.eye(K)
    dt = data.z.dtype
    return ARHMMParams(jnp.full((K,), 1.0 / K, dt), jnp.asarray(P, dt), A, b, Q)


# ------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------


def fit_arhmm(
    z,
    num_states: int,
    *,
    key,
    mask=None,
    lengths=None,
    num_iters: int = 100,
    options: ARHMMOptions | None = None,
) -> ARHMMFit:
    """Fit a K-regime linear AR(1)-HMM to sequences by MAP-EM from a k-means start.

    Parameters
    ----------
    z : array [N, T, D]
        Sequences (float; its float type is kept).  Entries at masked frames are ignored and
        may be NaN.
    num_states : int
        Number of regimes K >= 1.
    key : jax.random key
        Seeds the k-means initialisation.
    mask : bool array [N, T], optional
        True = observed (default: all).  See the module docstring for how gaps are treated.
    lengths : int array [N], optional
        Observed prefix length of each sequence (instead of ``mask``).
    num_iters : int
        EM iterations (>= 1).
    options : ARHMMOptions, optional
        Priors and initialisation (default ``ARHMMOptions()``).

    Returns
    -------
    ARHMMFit
        ``params`` (``initial_probs [K]``, ``transition_matrix [K, K]``, ``A [K, D, D]``,
        ``b [K, D]``, ``Q [K, D, D]``) and the traces ``log_likelihoods [num_iters]``,
        ``log_posteriors [num_iters]`` (after each iteration; the last is the returned fit's).

    Raises
    ------
    ValueError
        ``z`` not ``[N, T, D]`` with ``T >= 2``; NaN/inf at observed frames; ``mask`` /
        ``lengths`` of the wrong shape or both given; ``num_states`` or ``num_iters`` < 1;
        fewer observed transitions than regimes; invalid ``options``.
    TypeError
        Non-bool ``mask``, non-numeric ``z``, ``options`` not an ``ARHMMOptions``.
    """
    K = _check_int("num_states", num_states, 1)
    num_iters = _check_int("num_iters", num_iters, 1)
    options = _check_options(ARHMMOptions() if options is None else options)
    data = _prepare(z, mask, lengths)
    M = int(np.sum(np.asarray(data.pair_ok)))
    if M < K:
        raise ValueError(
            f"`z` has {M} observed transitions (pairs of consecutive observed frames), fewer "
            f"than `num_states` = {K}; use fewer regimes or more data")
    prior, pairs = _prior_and_pairs(data, K, options)
    params0 = _initial_params(key, data, K, prior, pairs, options)
    params, lls, lps = _run_em(params0, data, prior, num_iters=num_iters)
    return ARHMMFit(params=params, log_likelihoods=lls, log_posteriors=lps, options=options)


@jax.jit
def _loglik(params: ARHMMParams, data: _Data) -> Array:
    return _smooth(params, data, pairwise=False).log_normalizer


def log_likelihood(fit, z, *, mask=None, lengths=None) -> Array:
    """Marginal log-likelihood ``log p(z_n[2:] | z_n[1])`` of each sequence (forward filter).

    Parameters
    ----------
    fit : ARHMMFit or ARHMMParams
    z : array [N, T, D]
    mask, lengths : optional
        As :func:`fit_arhmm`.

    Returns
    -------
    Array [N]

    Raises
    ------
    ValueError, TypeError
        As :func:`fit_arhmm` for ``z`` / ``mask`` / ``lengths``; ``fit`` of another type.
    """
    params = _params_of(fit)
    data = _prepare(z, mask, lengths, D=params.A.shape[-1])
    return _loglik(params, data)


def viterbi(potentials: HMMPotentials) -> Array:
    """Most probable path of one chain by max-product in log space.

    Parameters
    ----------
    potentials : HMMPotentials
        ``log_init [K]``, ``log_trans [K, K]`` or ``[T-1, K, K]``, ``log_lik [T, K]`` (may hold
        ``-inf``; at least one path must have finite weight).  One chain (``vmap`` for more).

    Returns
    -------
    Array
        ``int32 [T]``: ``argmax_k log psi(k)`` (ties go to the lowest state).
    """
    log_init, log_trans, log_lik = (jnp.asarray(a) for a in potentials)
    T = log_lik.shape[0]
    if log_trans.ndim == 2:
        log_trans = jnp.broadcast_to(log_trans, (T - 1,) + log_trans.shape)

    def forward(delta, inputs):
        lt, ll = inputs
        scores = delta[:, None] + lt  # [K (from), K (to)]
        return jnp.max(scores, axis=0) + ll, jnp.argmax(scores, axis=0).astype(jnp.int32)

    delta, back = lax.scan(forward, log_init + log_lik[0], (log_trans, log_lik[1:]))
    last = jnp.argmax(delta).astype(jnp.int32)

    def backward(k_next, pointers):
        k = pointers[k_next]
        return k, k

    _, path = lax.scan(backward, last, back, reverse=True)
    return jnp.concatenate([path, last[None]])


@jax.jit
def _segment(params: ARHMMParams, data: _Data) -> Array:
    return jax.vmap(viterbi)(_potentials(params, data))


def segment(fit, z, mask=None, *, lengths=None) -> np.ndarray:
    """Viterbi regimes of each frame.

    Parameters
    ----------
    fit : ARHMMFit or ARHMMParams
    z : array [N, T, D]
    mask, lengths : optional
        As :func:`fit_arhmm`.  Frames before the first / after the last observed frame of a
        sequence get the regime of that frame; frames in interior gaps get the regime of the
        best path through the gap.

    Returns
    -------
    np.ndarray [N, T] int
        Regimes in ``0 .. K-1``; ``regimes[:, t]`` (t >= 1) drives ``z_{t-1} -> z_t``.

    Raises
    ------
    ValueError, TypeError
        As :func:`log_likelihood`.
    """
    params = _params_of(fit)
    data = _prepare(z, mask, lengths, D=params.A.shape[-1])
    return np.asarray(_segment(params, data)).astype(np.int64)

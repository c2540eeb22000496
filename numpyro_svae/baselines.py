"""Classical baselines for the real-data evaluation: Gaussian HMM and AR-HMM fitted by EM.

The models are ``dynamax`` 1.0.3 ``GaussianHMM`` and ``LinearAutoregressiveHMM`` (an optional
dependency, ``pip install 'numpyro_svae[baselines]'``; it is imported lazily). Fitting uses
dynamax's ``fit_em`` (MAP-EM with a Dirichlet prior on the transition rows, boosted on the
diagonal by ``stickiness``); inference (Viterbi, filtering, smoothing) uses dynamax's HMM
message passing on frame log-likelihoods computed here, so that masked frames can be given
log-likelihood 0.

Conventions: data ``x`` is ``[N, T, Dx]``; masks are ``[N, T]`` bool with True = observed.
For the AR-HMM the ``num_lags`` pre-sample frames of each sequence are set equal to its first
frame (a stationary start), so the first frame is scored by the regime's regression on itself.
Results are numpy arrays: these are evaluation tools, not parts of the training graph.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_svae._kmeans import kmeans
from numpyro_svae._linalg import LOG_2PI, chol_logdet, chol_solve, psd_cholesky

__all__ = [
    "HMMBaselineOptions",
    "HMMBaselineFit",
    "fit_gaussian_hmm",
    "fit_arhmm",
    "segment",
    "posterior_marginals",
    "heldout_loglik_per_frame",
    "impute",
    "interpolate",
]


class HMMBaselineOptions(NamedTuple):
    """Hyper-parameters of the baseline HMMs (passed to the dynamax constructors).

    ``transition_concentration`` is dynamax's default Dirichlet concentration (1.1).
    ``stickiness`` adds pseudo-counts to the diagonal of each transition row (dynamax's
    ``transition_matrix_stickiness``); 10 is a mild "sticky" prior, small next to the
    hundreds of frames per sequence in the evaluation data sets.
    The EM starts from k-means (k-means++ seeding, ``kmeans_iters`` Lloyd steps, in numpy):
    state means (AR-HMM: biases, with zero weights) are the centroids, every covariance is
    the pooled within-cluster covariance plus ``cov_jitter`` times the mean data variance,
    the initial distribution is uniform and the transition matrix has ``init_self_prob`` on
    the diagonal. (dynamax's own k-means / prior-sampling initialisers cost tens of seconds of
    compilation on CPU, more than the EM itself at evaluation sizes.)
    """

    transition_concentration: float = 1.1
    stickiness: float = 10.0
    kmeans_iters: int = 25
    cov_jitter: float = 1e-3
    init_self_prob: float = 0.9


class HMMBaselineFit(NamedTuple):
    """A fitted baseline: the dynamax model object, its parameters and the EM trace."""

    model: Any  # dynamax GaussianHMM or LinearAutoregressiveHMM
    params: Any  # dynamax ParamsGaussianHMM or ParamsLinearAutoregressiveHMM
    log_probs: Any  # [num_iters] log joint (log prior + log likelihood) after each EM step
    num_lags: int  # 0 for the Gaussian HMM, L for the AR-HMM


def _dynamax_hmm():
    """Import dynamax's HMM module lazily.

    On import, tensorflow_probability (a dynamax dependency) touches deprecated JAX names and
    may emit DeprecationWarning / UserWarning; these are not ours to fix, so they are silenced
    here, narrowly, instead of in the user's warning filters.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"tensorflow_probability")
        try:
            from dynamax import hidden_markov_model as hmm
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "numpyro_svae.baselines needs dynamax==1.0.3 "
                "(pip install 'numpyro_svae[baselines]')"
            ) from err
    return hmm


def _check_x(name: str, x, emission_dim: int | None = None) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"`{name}` must have shape [N, T, Dx]; got {list(x.shape)}")
    if x.shape[1] < 2:
        raise ValueError(f"`{name}` must have at least 2 steps (T >= 2); got {list(x.shape)}")
    if emission_dim is not None and x.shape[-1] != emission_dim:
        raise ValueError(
            f"`{name}` must have shape [N, T, Dx] with Dx = {emission_dim} (the fitted model's "
            f"dimension); got {list(x.shape)}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def _check_mask(mask, x) -> jax.Array:
    m = jnp.asarray(mask)
    if m.shape != x.shape[:2]:
        raise ValueError(
            f"`mask` must have shape [N, T] = {list(x.shape[:2])} to match `x`; "
            f"got {list(m.shape)}"
        )
    m = m.astype(bool)
    if not bool(jnp.all(jnp.any(m, axis=1))):
        raise ValueError("`mask` must leave at least one observed frame in every sequence")
    return m


def _lagged_inputs(x: jax.Array, num_lags: int, first: jax.Array) -> jax.Array:
    """Lagged regressors ``[x_{t-1}, ..., x_{t-L}]`` for one sequence.

    x: [T, Dx]; first: [Dx] value used for the pre-sample frames -> [T, L * Dx]
    """
    T = x.shape[0]
    padded = jnp.concatenate([jnp.broadcast_to(first, (num_lags, x.shape[1])), x], axis=0)
    # dynamax's layout: W_k = [W_{k,1}, ..., W_{k,L}], lag 1 first
    return jnp.concatenate(
        [padded[num_lags - lag : num_lags - lag + T] for lag in range(1, num_lags + 1)], axis=1
    )


def _kmeans_init(key, x: jax.Array, num_states: int, options: HMMBaselineOptions):
    """Centroids [K, Dx] and pooled covariance [Dx, Dx] of the frames of ``x`` [N, T, Dx]."""
    data = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])  # [M, Dx]
    if data.shape[0] < num_states:
        raise ValueError(
            f"`train_x` has {data.shape[0]} frames, fewer than `num_states` = {num_states}"
        )
    seed = int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))
    rng = np.random.default_rng(seed)
    centroids, assign = kmeans(data, num_states, rng, options.kmeans_iters)
    resid = data - centroids[assign]
    cov = resid.T @ resid / data.shape[0]
    cov = cov + options.cov_jitter * max(float(np.mean(np.var(data, axis=0))), 1e-12) * np.eye(
        data.shape[1]
    )
    return centroids, cov


def _init_markov(model, num_states: int, options: HMMBaselineOptions, dtype):
    """Initial / transition params and props of a dynamax HMM, from fixed values."""
    K = num_states
    off = (1.0 - options.init_self_prob) / max(K - 1, 1)
    trans = np.full((K, K), off) + (options.init_self_prob - off) * np.eye(K)
    if K == 1:
        trans = np.ones((1, 1))
    init, init_props = model.initial_component.initialize(
        initial_probs=jnp.full((K,), 1.0 / K, dtype=dtype)
    )
    transitions, trans_props = model.transition_component.initialize(
        transition_matrix=jnp.asarray(trans, dtype=dtype)
    )
    return (init, transitions), (init_props, trans_props)


def _fit(model, params, props, x: jax.Array, inputs, num_iters: int):
    """MAP-EM with dynamax's e_step / m_step / log_prior, one compiled program each.

    This is dynamax's ``fit_em`` loop written out: compiling the whole EM step (E-step and
    ``log_prior`` in one XLA program, as ``fit_em``'s ``lax.scan`` does) made XLA:CPU stall for
    minutes at Dx = 50, K = 10, while the three parts compile in seconds.
    """
    u_axis = None if inputs is None else 0
    e_fn = jax.jit(
        lambda prm, xs, us: jax.vmap(model.e_step, in_axes=(None, 0, u_axis))(prm, xs, us)
    )
    m_fn = jax.jit(lambda prm, stats, state: model.m_step(prm, props, stats, state))
    lp_fn = jax.jit(model.log_prior)
    state = model.initialize_m_step_state(params, props)
    log_probs = []
    for _ in range(num_iters):
        stats, lls = e_fn(params, x, inputs)
        log_probs.append(lp_fn(params) + lls.sum())
        params, state = m_fn(params, stats, state)
    return params, jnp.stack(log_probs) if log_probs else jnp.zeros((0,), x.dtype)


def fit_gaussian_hmm(
    train_x,
    num_states: int,
    *,
    key,
    num_iters: int = 50,
    options: HMMBaselineOptions | None = None,
) -> HMMBaselineFit:
    """Fit a full-covariance Gaussian HMM by (MAP) EM.

    ``k_1 ~ pi_0``, ``k_{t+1} | k_t ~ P[k_t]``, ``x_t | k_t ~ N(mu_{k_t}, Sigma_{k_t})``.

    Parameters
    ----------
    train_x : array [N, T, Dx]
        Training sequences (equal lengths).
    num_states : int
        Number of hidden states K.
    key : jax PRNG key
        For the k-means / prior initialisation.
    num_iters : int
        EM iterations.
    options : HMMBaselineOptions, optional
        Transition prior and initialisation (default ``HMMBaselineOptions()``).

    Returns
    -------
    HMMBaselineFit
        With ``num_lags = 0``.

    Raises
    ------
    ValueError
        If ``train_x`` is not ``[N, T, Dx]``.
    """
    options = HMMBaselineOptions() if options is None else options
    hmm = _dynamax_hmm()
    x = _check_x("train_x", train_x)
    model = hmm.GaussianHMM(
        num_states,
        x.shape[-1],
        transition_matrix_concentration=options.transition_concentration,
        transition_matrix_stickiness=options.stickiness,
    )
    means, cov = _kmeans_init(key, x, num_states, options)
    (init, trans), (init_props, trans_props) = _init_markov(model, num_states, options, x.dtype)
    from dynamax.hidden_markov_model.models.gaussian_hmm import (
        ParamsGaussianHMM,
        ParamsGaussianHMMEmissions,
    )
    from dynamax.parameters import ParameterProperties
    from dynamax.utils.bijectors import RealToPSDBijector

    params = ParamsGaussianHMM(
        initial=init,
        transitions=trans,
        emissions=ParamsGaussianHMMEmissions(
            means=jnp.asarray(means, dtype=x.dtype),
            covs=jnp.asarray(np.broadcast_to(cov, (num_states,) + cov.shape), dtype=x.dtype),
        ),
    )
    # the same properties as dynamax's GaussianHMMEmissions.initialize
    props = ParamsGaussianHMM(
        initial=init_props,
        transitions=trans_props,
        emissions=ParamsGaussianHMMEmissions(
            means=ParameterProperties(),
            covs=ParameterProperties(constrainer=RealToPSDBijector()),
        ),
    )
    params, log_probs = _fit(model, params, props, x, None, num_iters)
    return HMMBaselineFit(model=model, params=params, log_probs=log_probs, num_lags=0)


def fit_arhmm(
    train_x,
    num_states: int,
    *,
    key,
    num_lags: int = 1,
    num_iters: int = 50,
    options: HMMBaselineOptions | None = None,
) -> HMMBaselineFit:
    """Fit a linear autoregressive HMM (switching vector AR) by EM.

    ``x_t | k_t, x_{t-L:t-1} ~ N(sum_l W_{k_t, l} x_{t-l} + b_{k_t}, Sigma_{k_t})``; the
    pre-sample frames equal the first frame of each sequence.

    Parameters
    ----------
    train_x : array [N, T, Dx]
        Training sequences.
    num_states : int
        Number of regimes K.
    key : jax PRNG key
        For the initialisation.
    num_lags : int
        AR order L >= 1.
    num_iters : int
        EM iterations.
    options : HMMBaselineOptions, optional
        Transition prior and initialisation (default ``HMMBaselineOptions()``).

    Returns
    -------
    HMMBaselineFit
        With ``num_lags = L``.

    Raises
    ------
    ValueError
        If ``train_x`` is not ``[N, T, Dx]`` or ``num_lags < 1``.

    Warnings
    --------
    dynamax's AR-HMM M-step has no prior on the regression weights: a regime that receives
    (almost) no frames can produce non-finite parameters. Use few states relative to the data.
    """
    if num_lags < 1:
        raise ValueError(f"`num_lags` must be >= 1; got {num_lags}")
    options = HMMBaselineOptions() if options is None else options
    hmm = _dynamax_hmm()
    x = _check_x("train_x", train_x)
    model = hmm.LinearAutoregressiveHMM(
        num_states,
        x.shape[-1],
        num_lags=num_lags,
        transition_matrix_concentration=options.transition_concentration,
        transition_matrix_stickiness=options.stickiness,
    )
    inputs = jax.vmap(lambda xn: _lagged_inputs(xn, num_lags, xn[0]))(x)
    k_kmeans, k_unused = jax.random.split(key)
    means, cov = _kmeans_init(k_kmeans, x, num_states, options)
    Dx = x.shape[-1]
    # every value is given, so the draws of dynamax's "prior" initialiser are discarded
    params, props = model.initialize(
        k_unused,
        method="prior",
        initial_probs=jnp.full((num_states,), 1.0 / num_states, dtype=x.dtype),
        transition_matrix=_init_markov(model, num_states, options, x.dtype)[0][1].transition_matrix,
        emission_weights=jnp.zeros((num_states, Dx, num_lags * Dx), dtype=x.dtype),
        emission_biases=jnp.asarray(means, dtype=x.dtype),
        emission_covariances=jnp.asarray(
            np.broadcast_to(cov, (num_states, Dx, Dx)), dtype=x.dtype
        ),
    )
    params, log_probs = _fit(model, params, props, x, inputs, num_iters)
    return HMMBaselineFit(model=model, params=params, log_probs=log_probs, num_lags=num_lags)


def _emission_dim(fit: HMMBaselineFit) -> int:
    return int(fit.params.emissions.covs.shape[-1])


def _frame_logliks(fit: HMMBaselineFit, x: jax.Array, inputs, valid) -> jax.Array:
    """log N(x_t | mean_k(t), Sigma_k) for one sequence, 0 where ``valid`` is False.

    x: [T, Dx]; inputs: [T, L*Dx] or None; valid: [T] bool or None -> [T, K]
    """
    em = fit.params.emissions
    if fit.num_lags == 0:
        means = jnp.broadcast_to(em.means[None], (x.shape[0],) + em.means.shape)  # [T, K, Dx]
    else:
        means = jnp.einsum("kdi,ti->tkd", em.weights, inputs) + em.biases[None]  # [T, K, Dx]
    L = psd_cholesky(em.covs)  # [K, Dx, Dx]
    r = x[:, None, :] - means  # [T, K, Dx]
    maha = jnp.sum(r * jax.vmap(lambda rt: chol_solve(L, rt))(r), axis=-1)  # [T, K]
    ll = -0.5 * (x.shape[-1] * LOG_2PI + chol_logdet(L)[None] + maha)
    if valid is not None:
        ll = jnp.where(valid[:, None], ll, 0.0)
    return ll


def _inference_inputs(fit: HMMBaselineFit, x: jax.Array, mask=None):
    """Per-sequence lagged inputs and frame validity for the AR-HMM (None for the HMM)."""
    if fit.num_lags == 0:
        return None, mask
    L = fit.num_lags
    if mask is None:
        inputs = jax.vmap(lambda xn: _lagged_inputs(xn, L, xn[0]))(x)
        return inputs, None
    # pre-sample frames = first observed frame; masked frames zero-filled (never scored)
    first = jnp.take_along_axis(x, jnp.argmax(mask, axis=1)[:, None, None], axis=1)[:, 0]
    xz = jnp.where(mask[..., None], x, 0.0)
    inputs = jax.vmap(lambda xn, f: _lagged_inputs(xn, L, f))(xz, first)
    # a frame is scored only if it and its L predecessors are observed (pre-sample counts as
    # observed, it is a copy of an observed frame)
    padded = jnp.concatenate([jnp.ones_like(mask[:, :L]), mask], axis=1)
    valid = mask
    for lag in range(1, L + 1):
        valid = valid & padded[:, L - lag : L - lag + x.shape[1]]
    return inputs, valid


def _per_sequence(fn, fit: HMMBaselineFit, x: jax.Array, mask=None):
    """vmap ``fn(init, trans, loglik [T, K])`` over sequences."""
    inputs, valid = _inference_inputs(fit, x, mask)
    init = fit.params.initial.probs
    trans = fit.params.transitions.transition_matrix

    def one(xn, un, vn):
        return fn(init, trans, _frame_logliks(fit, xn, un, vn))

    in_axes = (0, None if inputs is None else 0, None if valid is None else 0)
    return jax.vmap(one, in_axes=in_axes)(x, inputs, valid)


def segment(model_fit: HMMBaselineFit, x) -> np.ndarray:
    """Most likely state sequence (Viterbi) of each sequence.

    Parameters
    ----------
    model_fit : HMMBaselineFit
        From :func:`fit_gaussian_hmm` or :func:`fit_arhmm`.
    x : array [N, T, Dx]
        Sequences to segment.

    Returns
    -------
    np.ndarray [N, T] int
        State labels in ``0 .. K-1``.

    Raises
    ------
    ValueError
        If ``x`` is not ``[N, T, Dx]`` with the model's Dx.
    """
    hmm = _dynamax_hmm()
    x = _check_x("x", x, _emission_dim(model_fit))
    return np.asarray(_per_sequence(hmm.hmm_posterior_mode, model_fit, x))


def posterior_marginals(model_fit: HMMBaselineFit, x) -> np.ndarray:
    """Smoothed state marginals ``p(k_t | x_{1:T})`` of each sequence.

    Parameters
    ----------
    model_fit : HMMBaselineFit
    x : array [N, T, Dx]

    Returns
    -------
    np.ndarray [N, T, K]
        Rows sum to one (usable with :func:`numpyro_svae.metrics.regimes_used`).

    Raises
    ------
    ValueError
        If ``x`` is not ``[N, T, Dx]`` with the model's Dx.
    """
    hmm = _dynamax_hmm()
    x = _check_x("x", x, _emission_dim(model_fit))
    post = _per_sequence(
        lambda i, t, ll: hmm.hmm_smoother(i, t, ll).smoothed_probs,
        model_fit,
        x,
    )
    return np.asarray(post)


def heldout_loglik_per_frame(model_fit: HMMBaselineFit, x) -> float:
    """Marginal log-likelihood of held-out sequences per frame.

    ``sum_n log p(x_n[1:T]) / (N T)`` (nats per frame, all ``Dx`` dimensions together), by the
    forward filter.

    Parameters
    ----------
    model_fit : HMMBaselineFit
    x : array [N, T, Dx]

    Returns
    -------
    float

    Raises
    ------
    ValueError
        If ``x`` is not ``[N, T, Dx]`` with the model's Dx.
    """
    hmm = _dynamax_hmm()
    x = _check_x("x", x, _emission_dim(model_fit))
    lls = _per_sequence(lambda i, t, ll: hmm.hmm_filter(i, t, ll).marginal_loglik, model_fit, x)
    return float(jnp.sum(lls) / (x.shape[0] * x.shape[1]))


def impute(model_fit: HMMBaselineFit, x, mask) -> np.ndarray:
    """Fill masked frames with the model's posterior predictive mean.

    Gaussian HMM: ``x_hat_t = sum_k q(k_t) mu_k`` with ``q`` the smoothed state marginals
    computed from the observed frames only (masked frames have log-likelihood 0).

    AR-HMM: ``q`` is the smoothed regime posterior where a frame is scored only if it and its
    ``L`` predecessors are observed; masked frames are then filled left to right by rolling
    the posterior-mean dynamics ``x_hat_t = sum_k q(k_t) (W_k [x_hat_{t-1}, ...] + b_k)`` from
    the last observed / imputed frames (pre-sample frames = the first observed frame). This
    ignores the pull of the observations after the gap (no backward smoothing of ``x``).

    Parameters
    ----------
    model_fit : HMMBaselineFit
    x : array [N, T, Dx]
        Data; values at masked frames are ignored (may be NaN).
    mask : bool array [N, T]
        True = observed. Every sequence needs at least one observed frame.

    Returns
    -------
    np.ndarray [N, T, Dx]
        ``x`` at observed frames, the imputation at masked frames.

    Raises
    ------
    ValueError
        On shape mismatches (naming the argument) or a sequence with no observed frame.
    """
    hmm = _dynamax_hmm()
    x = _check_x("x", x, _emission_dim(model_fit))
    m = _check_mask(mask, x)
    x = jnp.where(m[..., None], x, 0.0)  # masked entries may hold NaN
    q = _per_sequence(
        lambda i, t, ll: hmm.hmm_smoother(i, t, ll).smoothed_probs,
        model_fit,
        x,
        m,
    )  # [N, T, K]
    em = model_fit.params.emissions
    if model_fit.num_lags == 0:
        pred = jnp.einsum("ntk,kd->ntd", q, em.means)
        return np.asarray(jnp.where(m[..., None], x, pred))

    L = model_fit.num_lags
    first = jnp.take_along_axis(x, jnp.argmax(m, axis=1)[:, None, None], axis=1)[:, 0]  # [N, Dx]

    def roll(xn, mn, qn, fn):
        def step(window, inp):
            xt, mt, qt = inp  # [Dx], [], [K]
            u = window.reshape(-1)  # [L*Dx], lag 1 first
            mean_k = jnp.einsum("kdi,i->kd", em.weights, u) + em.biases  # [K, Dx]
            xhat = jnp.where(mt, xt, qt @ mean_k)
            window = jnp.concatenate([xhat[None], window[:-1]], axis=0)
            return window, xhat

        window0 = jnp.broadcast_to(fn, (L, xn.shape[-1]))
        _, out = jax.lax.scan(step, window0, (xn, mn, qn))
        return out

    return np.asarray(jax.vmap(roll)(x, m, q, first))


def interpolate(x, mask) -> np.ndarray:
    """Linear interpolation over masked spans, per sequence and dimension.

    Masked frames between two observed frames lie on the straight line between them; masked
    frames before the first (after the last) observed frame take its value.

    Parameters
    ----------
    x : array [N, T, Dx]
        Data; values at masked frames are ignored (may be NaN).
    mask : bool array [N, T]
        True = observed. Every sequence needs at least one observed frame.

    Returns
    -------
    np.ndarray [N, T, Dx]

    Raises
    ------
    ValueError
        On shape mismatches or a sequence with no observed frame.
    """
    x = np.asarray(x, dtype=np.result_type(np.asarray(x).dtype, np.float32))
    if x.ndim != 3:
        raise ValueError(f"`x` must have shape [N, T, Dx]; got {list(x.shape)}")
    m = np.asarray(mask)
    if m.shape != x.shape[:2]:
        raise ValueError(
            f"`mask` must have shape [N, T] = {list(x.shape[:2])} to match `x`; "
            f"got {list(m.shape)}"
        )
    m = m.astype(bool)
    if not m.any(axis=1).all():
        raise ValueError("`mask` must leave at least one observed frame in every sequence")
    t = np.arange(x.shape[1])
    out = x.copy()
    for n in range(x.shape[0]):
        obs = t[m[n]]
        for d in range(x.shape[2]):
            out[n, :, d] = np.interp(t, obs, x[n, m[n], d])
    return out

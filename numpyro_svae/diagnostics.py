"""ArviZ export and diagnostic plots for a fitted `SVAEGuide`.

`to_inference_data` packs draws from the variational posterior into an
``arviz.InferenceData`` (one chain: the draws are independent, not MCMC), so ``az.summary``,
``az.plot_forest`` and NetCDF round trips work.  The plot helpers use matplotlib figures
that are not attached to pyplot (rendered with Agg, no GUI), return the ``Figure`` and save a PNG
when given a ``path``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_svae.guide import SVAEGuide
from numpyro_svae.predict import (
    Imputation,
    _call,
    _clean_params,
    _prepare,
    _sample_theta,
    impute,
)

__all__ = [
    "to_inference_data",
    "plot_regimes",
    "plot_reconstruction",
    "plot_imputation",
    "plot_elbo",
    "plot_transition_matrix",
]


# ------------------------------------------------------------------------------------------
# ArviZ
# ------------------------------------------------------------------------------------------


def _theta_dims(role: str, ndim: int) -> list[str]:
    """Dimension names (after chain, draw) of a global site's draws."""
    reg = ["regime"] if ndim == 3 else []
    return {
        "pi0": ["regime"],
        "P": ["regime", "regime_next"],
        "init_cov": ["latent", "latent_col"],
        "init_mean": ["latent"],
        "dyn_cov": reg + ["latent", "latent_col"],
        "dyn_matrix": reg + ["latent", "dyn_input"],
        "regime_cov": reg + ["latent", "latent_col"],
        "regime_mean": (["regime"] if ndim == 2 else []) + ["latent"],
    }.get(role, [f"{role}_dim_{i}" for i in range(ndim)])


def _draws_core(guide, static, kwargs, params, inf, x, key):
    """q(theta) draws, their log-density and the mean-field summaries (compiled by `_call`)."""
    del kwargs, params, x
    (S,) = static
    theta, log_q = jax.vmap(lambda kk: _sample_theta(guide, inf.qtheta, kk))(
        jax.random.split(key, S))
    mf = inf.mf
    sd = jnp.sqrt(jnp.diagonal(mf.cov, axis1=-2, axis2=-1))
    marginals = mf.marginals
    if guide.structure.dangling_regime:  # lag-one SLDS: q(k_{T-1}) = q(k_{T-2}) r, as the
        r = jax.nn.softmax(inf.globals.log_P, axis=-1)  # guide's posterior() reports it
        marginals = jnp.concatenate([marginals, (marginals[:, -1] @ r)[:, None]], 1)
    out = dict(marginals=marginals, Ez=mf.Ez, sd=sd, local_kl=mf.local_kl, info=inf.info)
    if "P" in inf.qtheta:
        alpha = inf.qtheta["P"].alpha
        out["EP"] = alpha / jnp.sum(alpha, -1, keepdims=True)
    return theta, log_q, out


def _make_idata(groups: dict, extra: dict):
    """`az.InferenceData` (ArviZ 0.x) or an ``xarray.DataTree`` (ArviZ >= 1.0)."""
    import arviz as az

    if hasattr(az, "InferenceData"):
        idata = az.InferenceData(**groups)
        if extra:
            idata.add_groups(extra)
        return idata
    import xarray as xr  # pragma: no cover - ArviZ 1.x

    return xr.DataTree.from_dict({**groups, **extra})  # pragma: no cover


def to_inference_data(
    guide: SVAEGuide,
    result_or_params,
    x,
    *,
    num_draws: int = 200,
    rng_key: jax.Array,
    losses=None,
    posterior_predictive: bool = True,
    mask=None,
    **model_kwargs: Any,
):
    """Draws from the fitted variational posterior as an ``arviz.InferenceData``.

    Parameters
    ----------
    guide : SVAEGuide
        The fitted guide.
    result_or_params : SVIRunResult or dict
        ``svi.run(...)`` result (its ``losses`` are used) or a parameter dict.
    x : array [N, T, Dx] ([N, Dx] for a mixture model)
        The sequences to describe (a mixture's data points are sequences of length 1: its
        ``time`` dimension has length 1).
    num_draws : int
        ``S``, draws (one chain).
    rng_key : jax.random key
        Randomness (keyword-only).
    losses : array [num_steps], optional
        Loss trace (default: ``result_or_params.losses`` when present).
    posterior_predictive : bool
        Add the ``posterior_predictive`` group (decoded ``x`` draws).
    mask : array [N, T] or [N, T, Dx] ([N] or [N, Dx] for a mixture), optional
        1 = observed (passed to the model as ``mask=``).
    **model_kwargs
        The model's other keyword arguments.

    Returns
    -------
    arviz.InferenceData
        Groups

        - ``posterior``: the global sites drawn from ``q(theta)`` (site names of the model,
          e.g. ``P``, ``Q``, ``Ab``, ``S0``, ``m0``, ``pi0``, ``mu``, ``Sigma``), and joint
          local draws ``k`` ``(sequence, regime_step)`` (``k ~ q(k)``; every family but the
          LDS; ``regime_step`` has the model's number of regime variables: ``T`` with a
          leading regime, in the lag-one form and for an HMM, ``T - 1`` with one regime per
          transition, 1 for a mixture) and ``z`` ``(sequence, time, latent)``
          (``z ~ q(z | k)``); dims ``(chain=1, draw=S, ...)``.
        - ``posterior_predictive``: the observed site, ``x ~ p(x | z)`` for those draws.
        - ``observed_data``: ``x``; ``constant_data``: the entry ``mask``.
        - ``sample_stats``: ``log_q_theta (chain, draw)``, ``loss (step)`` when a trace is
          available, and the inner solver's ``num_iters``, ``converged``, ``used_fallback``,
          ``rel_change`` ``(sequence)``.
        - ``variational``: the mean-field summaries without draw dims: ``regime_marginals
          (sequence, regime_step, regime)``, ``latent_mean`` / ``latent_sd (sequence, time,
          latent)``, ``local_kl (sequence)`` and ``expected_P (regime, regime_next)``.
          (They are not in ``posterior`` because constant "draws" make ``az.summary`` divide
          by zero.)

    Raises
    ------
    ValueError
        For non-finite parameters (the sites named) or NaN/inf at an observed entry of ``x``,
        as in :func:`numpyro_svae.predict.impute`.

    Notes
    -----
    ``r_hat`` is NaN in ``az.summary`` (one chain of independent draws); ``ess`` is close to
    ``S`` by construction.
    """
    import xarray as xr

    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 1:
        raise ValueError(f"`num_draws` must be a positive int; got {num_draws!r}")
    if losses is None and hasattr(result_or_params, "losses"):
        losses = result_or_params.losses
    params = _clean_params(result_or_params, "to_inference_data")
    xp, kwargs, entry = _prepare(guide, x, mask, model_kwargs)
    st = guide.structure
    S = num_draws
    k_th, k_imp = jax.random.split(rng_key)
    theta, log_q, mf = _call(_draws_core, guide, (S,), kwargs, params, xp, k_th)
    imp = impute(guide, params, xp, mask, num_samples=S, rng_key=k_imp, **model_kwargs)

    N, T, Dx = entry.shape  # a mixture's data as length-1 sequences
    xs = np.asarray(xp).reshape(N, T, Dx)
    D = st.D
    Tk = mf["marginals"].shape[1]
    coords = {"chain": [0], "draw": np.arange(S), "sequence": np.arange(N),
              "time": np.arange(T), "channel": np.arange(Dx), "latent": np.arange(D),
              "latent_col": np.arange(D), "regime": np.arange(st.K),
              "regime_next": np.arange(st.K), "regime_step": np.arange(Tk)}
    if st.dynamics is not None:
        coords["dyn_input"] = np.arange(st.dynamics.M.shape[-1])

    def ds(variables: dict):
        used = {d for dims, _ in variables.values() for d in dims}
        return xr.Dataset(
            {k: (dims, np.asarray(v)) for k, (dims, v) in variables.items()},
            coords={k: v for k, v in coords.items() if k in used})

    cd = ["chain", "draw"]
    post = {}
    for name, v in theta.items():
        v = np.asarray(v)[None]
        post[name] = (cd + _theta_dims(st.sites[name].role, v.ndim - 2), v)
    if st.family != "lds":
        post["k"] = (cd + ["sequence", "regime_step"], np.asarray(imp.regimes)[None])
    post["z"] = (cd + ["sequence", "time", "latent"], np.asarray(imp.latents)[None])

    stats = {"log_q_theta": (cd, np.asarray(log_q)[None])}
    if losses is not None:
        losses = np.asarray(losses)
        coords["step"] = np.arange(losses.shape[0])
        stats["loss"] = (["step"], losses)
    info = mf["info"]
    for f in ("num_iters", "converged", "used_fallback", "rel_change"):
        stats[f] = (["sequence"], np.asarray(getattr(info, f)).astype(
            np.float32 if f == "rel_change" else np.int32))

    groups = {
        "posterior": ds(post),
        "sample_stats": ds(stats),
        "observed_data": ds({st.obs.name: (["sequence", "time", "channel"], xs)}),
        "constant_data": ds({"mask": (["sequence", "time", "channel"],
                                      np.asarray(entry).astype(np.int8))}),
    }
    if posterior_predictive:
        groups["posterior_predictive"] = ds(
            {st.obs.name: (cd + ["sequence", "time", "channel"], np.asarray(imp.samples)[None])})
    var = {
        "regime_marginals": (["sequence", "regime_step", "regime"], mf["marginals"]),
        "latent_mean": (["sequence", "time", "latent"], mf["Ez"]),
        "latent_sd": (["sequence", "time", "latent"], mf["sd"]),
        "local_kl": (["sequence"], mf["local_kl"]),
    }
    if "EP" in mf:
        var["expected_P"] = (["regime", "regime_next"], mf["EP"])
    return _make_idata(groups, {"variational": ds(var)})


# ------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------


def _figure(nrows: int, ncols: int, *, figsize, sharex: bool = False, height_ratios=None):
    from matplotlib.figure import Figure

    # a bare Figure is not registered with pyplot: no GUI backend, no global state, no leak;
    # savefig renders with Agg
    fig = Figure(figsize=figsize)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=sharex,
                        height_ratios=height_ratios)
    return fig, axes


def _finish(fig, path):
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def _seq(a, sequence: int, ndim: int, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == ndim + 1:
        if not 0 <= sequence < a.shape[0]:
            raise ValueError(f"`sequence` must lie in [0, {a.shape[0]}); got {sequence}")
        a = a[sequence]
    if a.ndim != ndim:
        raise ValueError(f"`{name}` must have {ndim} or {ndim + 1} dims; got shape "
                         f"{list(a.shape)}")
    return a


def _regime_color(label: int) -> tuple:
    """The RGBA colour of regime index `label` in every regime plot.

    A fixed map by index (``tab10`` for 0-9, the light ``tab20`` shades for 10-19, then
    repeating), so that a regime keeps its colour across panels and figures.
    """
    from matplotlib import colormaps

    i = int(label)
    if i < 0:
        raise ValueError(f"`label` must be a regime index >= 0; got {label}")
    return tuple(colormaps["tab20"](2 * (i % 10) + (i // 10) % 2))


def _ribbon_image(rows: list) -> np.ndarray:
    """RGBA image ``[len(rows), Tk, 4]`` of label rows (-1 = nothing: transparent)."""
    img = np.zeros((len(rows), len(rows[0]), 4))
    for i, row in enumerate(rows):
        for j, lab in enumerate(row):
            if lab >= 0:
                img[i, j] = _regime_color(lab)
    return img


def _observed_length(mask, sequence: int, name: str, batched: bool) -> int | None:
    """Steps up to the last one with an observed entry (the rest is padding), or None.

    ``mask``: ``[T]`` / ``[T, Dx]`` of one sequence or ``[N, T]`` / ``[N, T, Dx]`` of a
    batch (`batched`)."""
    if mask is None:
        return None
    m = np.asarray(mask).astype(bool)
    if batched:
        if m.ndim not in (2, 3):
            raise ValueError(f"`{name}` must have shape [N, T] or [N, T, Dx] for a batch; got "
                             f"{list(m.shape)}")
        if not 0 <= sequence < m.shape[0]:
            raise ValueError(f"`sequence` must lie in [0, {m.shape[0]}); got {sequence}")
        m = m[sequence]
    elif m.ndim not in (1, 2):
        raise ValueError(f"`{name}` must have shape [T] or [T, Dx]; got {list(m.shape)}")
    step = m if m.ndim == 1 else m.any(-1)
    seen = np.flatnonzero(step)
    return int(seen[-1]) + 1 if seen.size else 0


def plot_regimes(marginals, true_labels=None, *, sequence: int = 0, match: bool = True,
                 mask=None, path=None):
    """Regime ribbon: ``argmax q(k_t)`` (and the true labels) over time, plus ``q(k_t)``.

    Every panel colours a regime by its index with :func:`_regime_color` (after matching,
    the index shown: the matched true label, or ``K + k`` for an unmatched regime ``k``), so
    that a regime has the same colour in the ribbon and in the ``q(k)`` bands.

    Parameters
    ----------
    marginals : array [Tk, K] or [N, Tk, K]
        Regime marginals (e.g. ``SVAEPosterior.regime_marginals``).
    true_labels : array [Tk] or [N, Tk], optional
        Ground truth (-1 = padding); with `match`, predicted labels are relabelled by the best
        one-to-one matching (`metrics.best_label_matching`) and the accuracy is shown.
    sequence : int
        Which sequence to draw when a batch is given.
    mask : array [T] / [T, Dx] ([N, T] / [N, T, Dx] with a batch), optional
        Observation mask of the data, True = observed (e.g. ``SVAEPosterior.mask``).  The
        steps after the last one with an observed entry are padding and are not drawn (with
        ``Tk = T - 1`` regime variables, one fewer); gaps inside the sequence are kept.
    path : str or path-like, optional
        Save a PNG there.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from numpyro_svae.metrics import best_label_matching

    q = _seq(marginals, sequence, 2, "marginals")
    Tk, K = q.shape
    batched = np.ndim(marginals) == 3
    length = _observed_length(mask, sequence, "mask", batched)
    truth = None
    if true_labels is not None:
        truth = _seq(true_labels, sequence, 1, "true_labels").astype(int)
        if truth.shape[0] != Tk:
            raise ValueError(f"`true_labels` must have {Tk} steps; got {truth.shape[0]}")
    if length is not None:
        T = np.shape(mask)[1 if batched else 0]
        if T not in (Tk, Tk + 1):
            raise ValueError(f"`mask` must have T = {Tk} or {Tk + 1} steps for {Tk} regime "
                             f"steps; got shape {list(np.shape(mask))}")
        keep = max(length - (T - Tk), 0)
        if keep == 0:
            raise ValueError(f"`mask` marks no observed step in sequence {sequence}")
        q = q[:keep]
        truth = None if truth is None else truth[:keep]
        Tk = keep
    pred = np.argmax(q, -1)
    shown = np.arange(K)  # the index each regime is shown (and coloured) with
    rows, names, title = [pred], ["argmax q(k)"], "regimes"
    if truth is not None:
        valid = truth >= 0
        if match and valid.any():
            m = best_label_matching(pred[valid], truth[valid], num_pred=K,
                                    num_true=max(int(truth.max()) + 1, 1))
            shown = np.where(m.mapping >= 0, m.mapping, K + np.arange(K))
            rows[0] = shown[pred]
            title = f"regimes (accuracy {m.accuracy:.2f} after matching)"
        rows.append(np.where(valid, truth, -1))
        names.append("true")
    fig, axes = _figure(2, 1, figsize=(8, 3.5), height_ratios=[len(rows), 2])
    ax = axes[0, 0]
    ax.imshow(_ribbon_image(rows), aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(rows)), names)
    ax.set_title(title)
    ax.set_xticks([])
    ax2 = axes[1, 0]
    ax2.stackplot(np.arange(Tk), q.T, colors=[_regime_color(i) for i in shown],
                  labels=[f"regime {i}" for i in shown])
    ax2.set_xlim(0, max(Tk - 1, 1))
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("q(k)")
    ax2.set_xlabel("t")
    return _finish(fig, path)


def _channels(Dx: int, channels) -> list[int]:
    ch = list(range(min(Dx, 4))) if channels is None else [int(c) for c in channels]
    for c in ch:
        if not 0 <= c < Dx:
            raise ValueError(f"`channels` must lie in [0, {Dx}); got {c}")
    return ch


def plot_reconstruction(x, recon, *, lower=None, upper=None, sequence: int = 0,
                        channels=None, mask=None, path=None):
    """Data against a reconstruction (e.g. decoder means), optionally with a band.

    Parameters
    ----------
    x, recon : array [T, Dx] or [N, T, Dx]
    lower, upper : array like `recon`, optional
        Band limits (e.g. `Imputation.lower` / `upper`).
    sequence : int
    channels : sequence of int, optional
        Channels to draw (default: the first four).
    mask : array [T] / [T, Dx] ([N, T] / [N, T, Dx] with a batch), optional
        Observation mask, True = observed.  Data are drawn at observed entries only, and
        the steps after the last one with an observed entry (padding of a shorter sequence)
        are not drawn at all; the reconstruction stays drawn in gaps inside the sequence.
    path : optional
        Save a PNG there.

    Returns
    -------
    matplotlib.figure.Figure
    """
    xs = _seq(x, sequence, 2, "x")
    rs = _seq(recon, sequence, 2, "recon")
    ch = _channels(xs.shape[1], channels)
    T = xs.shape[0]
    length = _observed_length(mask, sequence, "mask", np.ndim(x) == 3)
    if length is not None:
        m = np.asarray(mask).astype(bool)
        m = m[sequence] if np.ndim(x) == 3 else m
        if m.shape not in ((T,), xs.shape):
            raise ValueError(f"`mask` must have T = {T} steps (and Dx = {xs.shape[1]} "
                             f"channels when per entry); got shape {list(np.shape(mask))}")
        observed = np.broadcast_to(m[:, None] if m.ndim == 1 else m, xs.shape)
        xs = np.where(observed, xs, np.nan)
        T = length
    fig, axes = _figure(len(ch), 1, figsize=(8, 1.6 * len(ch) + 0.6), sharex=True)
    t = np.arange(T)
    for i, c in enumerate(ch):
        ax = axes[i, 0]
        if lower is not None and upper is not None:
            lo = _seq(lower, sequence, 2, "lower")[:T, c]
            hi = _seq(upper, sequence, 2, "upper")[:T, c]
            ax.fill_between(t, lo, hi, color="C1", alpha=0.3, linewidth=0)
        ax.plot(t, xs[:T, c], "k.", markersize=3, label="data")
        ax.plot(t, rs[:T, c], "C1-", label="reconstruction")
        ax.set_ylabel(f"x[{c}]")
    axes[0, 0].legend(loc="upper right", fontsize="small")
    axes[-1, 0].set_xlabel("t")
    return _finish(fig, path)


def plot_imputation(x, imputation: Imputation, *, x_true=None, sequence: int = 0,
                    channels=None, path=None):
    """Imputed values with their 5-95 % band; missing stretches shaded.

    Parameters
    ----------
    x : array [N, T, Dx]
        The data given to `impute` (values at missing entries are not drawn).
    imputation : Imputation
        From `predict.impute`.
    x_true : array [N, T, Dx], optional
        The held-out truth, drawn at the missing entries.
    sequence, channels, path
        As in :func:`plot_reconstruction`.

    Returns
    -------
    matplotlib.figure.Figure
    """
    xs = _seq(x, sequence, 2, "x")
    m = _seq(imputation.mask, sequence, 2, "imputation.mask")
    mean = _seq(imputation.mean, sequence, 2, "imputation.mean")
    lo = _seq(imputation.lower, sequence, 2, "imputation.lower")
    hi = _seq(imputation.upper, sequence, 2, "imputation.upper")
    ch = _channels(xs.shape[1], channels)
    fig, axes = _figure(len(ch), 1, figsize=(8, 1.6 * len(ch) + 0.6), sharex=True)
    t = np.arange(xs.shape[0])
    for i, c in enumerate(ch):
        ax = axes[i, 0]
        miss = ~m[:, c]
        for j in np.flatnonzero(miss):
            ax.axvspan(j - 0.5, j + 0.5, color="0.9", linewidth=0)
        ax.fill_between(t, lo[:, c], hi[:, c], color="C0", alpha=0.3, linewidth=0,
                        label="90 % band")
        ax.plot(t, mean[:, c], "C0-", label="mean")
        ax.plot(t[~miss], xs[~miss, c], "k.", markersize=3, label="observed")
        if x_true is not None:
            xt = _seq(x_true, sequence, 2, "x_true")
            ax.plot(t[miss], xt[miss, c], "rx", markersize=4, label="held out")
        ax.set_ylabel(f"x[{c}]")
    axes[0, 0].legend(loc="upper right", fontsize="small")
    axes[-1, 0].set_xlabel("t")
    return _finish(fig, path)


def plot_elbo(losses, *, window: int | None = None, path=None):
    """Loss curve (``-ELBO`` per step), with a moving average when `window` > 1.

    Parameters
    ----------
    losses : array [num_steps]
        E.g. ``SVIRunResult.losses``.
    window : int, optional
        Moving-average width (default ``max(1, num_steps // 50)``).
    path : optional
        Save a PNG there.

    Returns
    -------
    matplotlib.figure.Figure
    """
    y = np.asarray(losses, np.float64).ravel()
    if y.size == 0:
        raise ValueError("`losses` is empty")
    w = max(1, y.size // 50) if window is None else int(window)
    if w < 1:
        raise ValueError(f"`window` must be >= 1; got {window}")
    fig, axes = _figure(1, 1, figsize=(6, 3.5))
    ax = axes[0, 0]
    ax.plot(np.arange(y.size), y, color="0.7", linewidth=0.8, label="loss")
    if w > 1 and y.size >= w:
        sm = np.convolve(y, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(w - 1, y.size), sm, "C0-", label=f"moving average ({w})")
    ax.set_xlabel("step")
    ax.set_ylabel("-ELBO")
    ax.legend(fontsize="small")
    return _finish(fig, path)


def plot_transition_matrix(P, *, path=None, annotate: bool = True):
    """Heat map of ``E[P]`` under ``q(theta)``.

    Parameters
    ----------
    P : array [K, K], DirichletStandard, SVAEPosterior or arviz.InferenceData
        ``E[P]`` itself, the Dirichlet ``q`` of the rows (``alpha [K, K]``), a posterior
        (``posterior.qtheta["P"]``) or `to_inference_data` output (``variational.expected_P``).
    annotate : bool
        Write the probabilities in the cells.
    path : optional
        Save a PNG there.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if hasattr(P, "qtheta"):
        P = P.qtheta["P"]
    if hasattr(P, "alpha"):
        alpha = np.asarray(P.alpha, np.float64)
        P = alpha / alpha.sum(-1, keepdims=True)
    elif hasattr(P, "groups") and "variational" in P.groups():
        P = P["variational"]["expected_P"].values
    P = np.asarray(P, np.float64)
    if P.ndim != 2 or P.shape[0] != P.shape[1]:
        raise ValueError(f"`P` must be a [K, K] matrix; got shape {list(P.shape)}")
    K = P.shape[0]
    fig, axes = _figure(1, 1, figsize=(1.0 + 0.6 * K, 0.6 + 0.6 * K))
    ax = axes[0, 0]
    im = ax.imshow(P, vmin=0, vmax=1, cmap="Blues")
    if annotate:
        for i in range(K):
            for j in range(K):
                ax.text(j, i, f"{P[i, j]:.2f}", ha="center", va="center",
                        color="white" if P[i, j] > 0.5 else "black", fontsize="small")
    ax.set_xlabel("to regime")
    ax.set_ylabel("from regime")
    ax.set_title("E[P] under q")
    fig.colorbar(im, ax=ax)
    return _finish(fig, path)

"""`fit`: one call from an ordinary NumPyro model and data to a trained structured VAE.

``fit(model, x)`` builds the guide (default encoder sized from the data and the model's
latent dimension), splits off validation sequences, standardises each channel and trains
in stages:

1. ``"warmup"``: the networks learn in the one-regime SVAE of the same model (the model
   called with ``K=1``), the first part with the local KL down-weighted;
2. ``"switch"`` (SLDS with ``K > 1``): q(theta) of the switching model is set from an
   AR(1)-HMM fitted to the warm-up latents (`numpyro_svae.initialize.arhmm_init`), the
   networks carried over;
3. ``"train"``: the full model, natural gradients on q(theta) with a decaying rate and Adam
   on the networks.

A model without regimes (LDS, ``K = 1``) runs ``"warmup"`` and ``"train"`` on itself; a
model with regimes but no ``K`` argument skips ``"warmup"`` and ``"switch"`` (with a
warning).  Each stage stops when its smoothed loss stops improving
(`numpyro_svae.fit_stages.plateaued`) or at its step cap.  ``restarts`` runs repeat the
whole recipe with other keys and the best validation ELBO wins.  The result says when the
fit failed: latents no better than a per-channel Gaussian, regimes that collapsed, a stage
that ended worse than the one before (`FitWarning`, also listed in the summary).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from numpyro_svae.fit_run import build_problem, run_restart, validation_checks
from numpyro_svae.fit_stages import (
    NATGRAD_SCHEDULES,
    Stage,
    StageSummary,
    SwitchStart,
    best_restart,
    plateaued,
)

__all__ = ["Stage", "SwitchStart", "StageSummary", "RestartSummary", "FitSummary",
           "FitResult", "FitWarning", "fit", "plateaued", "best_restart", "WARMUP", "TRAIN",
           "SWITCH"]

WARMUP = Stage(max_steps=500, kl_warmup=0.5, kl_weight=0.1)
"""Default ``warmup`` stage: 500 steps at most, the first half with the local KL x 0.1."""

TRAIN = Stage(max_steps=1000, natgrad_schedule="cosine")
"""Default ``train`` stage: 1000 steps at most, natural-gradient rate decaying to 0."""

SWITCH = SwitchStart()
"""Default AR-HMM start: 100 EM iterations, pseudo-count 1."""


class FitWarning(UserWarning):
    """A fit that finished but probably failed (see `FitSummary.warnings`)."""


class RestartSummary(NamedTuple):
    """One restart of :func:`fit`.

    Attributes
    ----------
    seed : int
        Seed of its keys.
    val_elbo : float
        Validation ELBO per observed frame (NaN without validation data).
    stages : tuple of StageSummary
        Its stages, in order.
    """

    seed: int
    val_elbo: float
    stages: tuple


class FitSummary(NamedTuple):
    """What :func:`fit` did.

    Attributes
    ----------
    stages : tuple of StageSummary
        Stages of the chosen restart (names, steps, final loss, stop reason, skips).
    restarts : tuple of RestartSummary
        Every restart with its validation ELBO per frame.
    chosen : int
        Index of the restart returned.
    init : str
        ``"arhmm"`` or ``"random"``: how the switching dynamics started.
    skipped_steps : int
        Skipped steps of the chosen restart (all stages).
    val_elbo : float
        Validation ELBO per observed frame of the chosen restart (NaN without validation).
    baseline : float
        Log-likelihood per observed validation frame of a Gaussian per channel fitted to the
        training data (NaN without validation); `val_elbo` should beat it.
    regimes_used : int or None
        Regimes holding at least 1% of the posterior mass on the training data (None for a
        model without regimes).
    train_index, val_index : np.ndarray [int]
        Sequences used for training and for validation.
    warnings : tuple of str
        Every `FitWarning` raised.
    """

    stages: tuple
    restarts: tuple
    chosen: int
    init: str
    skipped_steps: int
    val_elbo: float
    baseline: float
    regimes_used: int | None
    train_index: np.ndarray
    val_index: np.ndarray
    warnings: tuple


class FitResult(NamedTuple):
    """Result of :func:`fit`.

    Attributes
    ----------
    guide : SVAEGuide
        The trained model's guide (``guide.posterior(params, x, **model_kwargs)``; other
        ``N`` / ``T`` work too).
    params : dict
        Trained parameters.  They refer to standardised data: pass
        ``result.transform(x)``, not ``x``, to the guide and to `numpyro_svae.predict`.
    losses : np.ndarray [S]
        -ELBO per observed training frame of every step of the chosen restart, all stages
        concatenated (``summary.stages[i].start`` / ``.steps`` locate each stage); the
        KL warm-up steps hold the down-weighted loss, skipped steps NaN.
    summary : FitSummary
    mean, std : np.ndarray [Dx]
        Per-channel standardisation (0 and 1 with ``standardize=False``).
    model_kwargs : dict
        The model's keyword arguments for the training sequences (``N``, ``T``, ``Dx``
        filled in; ``mask`` included when given).
    """

    guide: Any
    params: dict
    losses: np.ndarray
    summary: FitSummary
    mean: np.ndarray
    std: np.ndarray
    model_kwargs: dict

    def transform(self, x) -> np.ndarray:
        """``(x - mean) / std``: data in the units of `params`."""
        return (np.asarray(x) - self.mean) / self.std


# ------------------------------------------------------------------------------------------
# input checks and data preparation (no JAX compilation)
# ------------------------------------------------------------------------------------------


class _Data(NamedTuple):
    x_tr: np.ndarray  # [Ntr, T, Dx] standardised, missing entries 0
    x_va: np.ndarray  # [Nva, T, Dx]
    m_tr: np.ndarray | None  # the user's mask rows for training (None without a mask)
    m_va: np.ndarray | None
    frames_tr: int  # steps with an observed entry
    frames_va: int
    mean: np.ndarray  # [Dx]
    std: np.ndarray  # [Dx]
    baseline: float  # per-channel Gaussian log-lik per validation frame
    tr: np.ndarray  # training sequence indices
    va: np.ndarray  # validation sequence indices


def _signature(model) -> tuple[set, bool]:
    try:
        ps = inspect.signature(model).parameters
    except (TypeError, ValueError):  # a builtin or odd callable: assume nothing
        return set(), True
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ps.values())
    return set(ps), var_kw


def _check_stage(name: str, st) -> None:
    if not isinstance(st, Stage):
        raise TypeError(f"`{name}` must be a numpyro_svae.Stage; got {type(st).__name__}")
    if isinstance(st.max_steps, bool) or not isinstance(st.max_steps, int) or st.max_steps < 1:
        raise ValueError(f"`{name}.max_steps` must be a positive int; got {st.max_steps!r}")
    for f in ("lr", "natgrad_lr"):
        v = getattr(st, f)
        if not (isinstance(v, int | float) and np.isfinite(v) and v > 0):
            raise ValueError(f"`{name}.{f}` must be a positive number; got {v!r}")
    if st.natgrad_schedule not in NATGRAD_SCHEDULES:
        raise ValueError(f"`{name}.natgrad_schedule` must be one of {NATGRAD_SCHEDULES}; got "
                         f"{st.natgrad_schedule!r}")
    if not 0.0 <= st.kl_warmup < 1.0:
        raise ValueError(f"`{name}.kl_warmup` must be in [0, 1); got {st.kl_warmup!r}")
    if not 0.0 < st.kl_weight <= 1.0:
        raise ValueError(f"`{name}.kl_weight` must be in (0, 1]; got {st.kl_weight!r}")
    if isinstance(st.window, bool) or not isinstance(st.window, int) or st.window < 1:
        raise ValueError(f"`{name}.window` must be a positive int; got {st.window!r}")
    if not (np.isfinite(st.tol) and st.tol >= 0):
        raise ValueError(f"`{name}.tol` must be a finite number >= 0; got {st.tol!r}")


def _entry_mask(x: np.ndarray, mask) -> np.ndarray:
    """`mask` broadcast to `x`'s shape (all True without one)."""
    if mask is None:
        return np.ones(x.shape, bool)
    m = np.asarray(mask)
    if m.shape not in (x.shape, x.shape[:-1]):
        raise ValueError(f"`mask` must have shape {list(x.shape[:-1])} or {list(x.shape)} "
                         f"(that of `x` without or with its channel axis); got {list(m.shape)}")
    m = m.astype(bool)
    return np.broadcast_to(m[..., None] if m.shape == x.shape[:-1] else m, x.shape)


def _prepare(x, mask, *, val_fraction: float, standardize: bool, seed: int) -> _Data:
    """Check `x` and `mask`, split off validation sequences, standardise each channel."""
    x = np.asarray(x)
    if x.dtype.kind not in "fiu" or x.ndim not in (2, 3):
        raise ValueError(f"`x` must be a numeric array of shape [N, T, Dx] (or [N, Dx] for a "
                         f"mixture model); got shape {list(x.shape)}, dtype {x.dtype}")
    if x.ndim == 3 and x.shape[1] < 2:
        raise ValueError(f"`x` needs at least 2 time steps (T >= 2); got T = {x.shape[1]}")
    if min(x.shape) < 1:
        raise ValueError(f"`x` has an empty axis; got shape {list(x.shape)}")
    entry = _entry_mask(x, mask)
    bad = ~np.isfinite(x) & entry
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"`x` has NaN/inf at an observed entry (index {at}); mark it missing "
                         "with `mask` (False / 0 there)")
    if not (isinstance(val_fraction, int | float) and 0.0 <= val_fraction < 1.0):
        raise ValueError(f"`val_fraction` must be in [0, 1); got {val_fraction!r}")
    N = x.shape[0]
    n_va = int(np.floor(val_fraction * N))
    if val_fraction > 0 and n_va < 1:
        raise ValueError(f"`val_fraction`={val_fraction} of N = {N} sequences holds no whole "
                         f"sequence; use val_fraction >= {1.0 / N:.3g} or 0 (no validation)")
    if N - n_va < 1:
        raise ValueError(f"`val_fraction`={val_fraction} leaves no training sequence (N = {N})")
    perm = np.random.default_rng(seed).permutation(N)
    va, tr = np.sort(perm[:n_va]), np.sort(perm[n_va:])
    xf = np.where(entry, x, 0.0).astype(np.float32)
    e_tr = entry[tr]
    axes = tuple(range(x.ndim - 1))
    cnt = e_tr.sum(axes)
    if standardize:
        mean = np.where(cnt > 0, (xf[tr] * e_tr).sum(axes) / np.maximum(cnt, 1), 0.0)
        var = (((xf[tr] - mean) ** 2) * e_tr).sum(axes) / np.maximum(cnt, 1)
        std = np.sqrt(var)
        std = np.where(std > 1e-8, std, 1.0)
    else:
        mean, std = np.zeros(x.shape[-1]), np.ones(x.shape[-1])
    mean, std = mean.astype(np.float32), std.astype(np.float32)
    xs = np.where(entry, (xf - mean) / std, 0.0).astype(np.float32)
    frames = entry.any(-1)  # [N, T] (or [N]): steps with an observed entry
    m = None if mask is None else np.asarray(mask).astype(bool)
    baseline = float("nan")
    if n_va:  # a Gaussian per channel fitted to the training entries, scored on validation
        mu = (xs[tr] * e_tr).sum(axes) / np.maximum(cnt, 1)
        var = np.maximum((((xs[tr] - mu) ** 2) * e_tr).sum(axes) / np.maximum(cnt, 1), 1e-6)
        lp = -0.5 * (np.log(2 * np.pi * var) + (xs[va] - mu) ** 2 / var)
        baseline = float((lp * entry[va]).sum() / max(int(frames[va].sum()), 1))
    return _Data(xs[tr], xs[va], None if m is None else m[tr], None if m is None else m[va],
                 int(frames[tr].sum()), int(frames[va].sum()), mean, std, baseline, tr, va)


def _model_kwargs(model, x_shape, model_kwargs: dict | None, mask) -> tuple[dict, set, bool]:
    """The user's kwargs with ``N``, ``T``, ``Dx`` filled (checked against `x`)."""
    names, var_kw = _signature(model)
    kw = dict(model_kwargs or {})
    if "mask" in kw:
        raise ValueError("pass the mask as `fit(..., mask=...)`, not in `model_kwargs` (fit "
                         "splits it with the sequences)")
    dims = dict(N=x_shape[0], Dx=x_shape[-1])
    if len(x_shape) == 3:
        dims["T"] = x_shape[1]
    for k, v in dims.items():
        if k in kw and kw[k] != v:
            raise ValueError(f"`model_kwargs['{k}']` = {kw[k]!r} does not match `x` of shape "
                             f"{list(x_shape)} ({k} = {v})")
        if k in names:
            kw[k] = v
    if mask is not None and "mask" not in names and not var_kw:
        raise ValueError("`mask` was given but the model has no `mask` argument; write the "
                         "model with a `mask=` keyword (see numpyro_svae.models)")
    return kw, names, var_kw


def _default_hidden(model, kw: dict):
    if "hidden" in kw:
        return tuple(kw["hidden"])
    try:
        p = inspect.signature(model).parameters.get("hidden")
    except (TypeError, ValueError):
        p = None
    if p is not None and p.default is not inspect.Parameter.empty:
        return tuple(p.default)
    return (64, 64)


def _seed_of(key) -> int:
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        return int(key)
    import jax

    try:
        return int(jax.random.randint(key, (), 0, 2**31 - 1))
    except (TypeError, ValueError):
        raise TypeError(f"`key` must be an int seed or a jax.random key; got {key!r}") from None


# ------------------------------------------------------------------------------------------
# fit
# ------------------------------------------------------------------------------------------


def fit(
    model: Callable,
    x,
    *,
    model_kwargs: dict | None = None,
    mask=None,
    key: Any = 0,
    encoder: Any = None,
    warmup: Stage | None = WARMUP,
    train: Stage = TRAIN,
    init: str | None = None,
    switch: SwitchStart = SWITCH,
    restarts: int = 2,
    val_fraction: float = 0.2,
    standardize: bool = True,
    guide_kwargs: dict | None = None,
    progress: bool = True,
    max_bad_steps: int = 20,
) -> FitResult:
    """Train a structured VAE for an ordinary NumPyro model, with the staged start.

    Parameters
    ----------
    model : callable
        A NumPyro model called as ``model(x, **model_kwargs)``, like the ready-made ones
        (``models.slds_model(x, N=..., T=..., Dx=..., K=..., D=..., mask=...)``).
    x : array [N, T, Dx] ([N, Dx] for a mixture model)
        Data; entries where `mask` is False may be NaN.
    model_kwargs : dict, optional
        Passed to the model; ``N``, ``T`` and ``Dx`` are filled from `x` when the model takes
        them (``N`` becomes the size of each split).
    mask : array [N, T] or [N, T, Dx], optional
        True / 1 where observed (the model needs a ``mask`` argument).
    key : int or jax.random key
        Seed of the split, the initialisations and the restarts.
    encoder : equinox module, optional
        Default: `nn.GaussianPotentialEncoder` with ``obs_dim=Dx``, the model's latent
        dimension and the model's ``hidden`` widths; each restart draws its own weights.
        A given encoder starts every restart from its own weights.
    warmup : Stage or None
        The one-regime warm-up (None: skip it, and with it the AR-HMM start).
    train : Stage
        The full model's training.
    init : {"arhmm", "random"}, optional
        How the switching dynamics start; default ``"arhmm"`` for an SLDS with ``K > 1``
        (and a warm-up), ``"random"`` otherwise.
    switch : SwitchStart
        AR-HMM settings of the ``"arhmm"`` start.
    restarts : int
        Runs of the whole recipe with different keys; the best validation ELBO is kept.
    val_fraction : float
        Fraction of the sequences held out for validation, in ``[0, 1)`` (0: none; then
        ``restarts`` must be 1 and the no-information check is skipped).
    standardize : bool
        Standardise each channel with the training sequences' mean and standard deviation
        (recorded in the result; the parameters then refer to standardised data).
    guide_kwargs : dict, optional
        Extra `SVAEGuide` options (``max_iters``, ``warm_start``, ...).
    progress : bool
        A ``tqdm`` bar per stage on stderr.
    max_bad_steps : int
        Skipped (non-finite) steps in a row that stop the fit with a `RuntimeError`.

    Returns
    -------
    FitResult
        ``guide``, ``params``, ``losses`` (-ELBO per observed training frame, every stage),
        ``summary`` (`FitSummary`), ``mean`` / ``std`` and the training ``model_kwargs``.

    Raises
    ------
    ValueError
        Before any compilation: `x` not [N, T, Dx] (or [N, Dx] for a mixture), ``T < 2``,
        NaN at an observed entry, a bad `mask`, a validation split without a whole
        sequence, ``init="arhmm"`` on a model without switching dynamics, bad stage
        settings.
    RuntimeError
        `max_bad_steps` skipped steps in a row (data not standardised, rates too high).

    Warns
    -----
    FitWarning
        The validation ELBO per frame is no better than a Gaussian per channel (the latents
        carry no information); fewer regimes used than ``K``; a stage ended worse than the
        one before; a stage was skipped or the AR-HMM start failed.
    """
    for name, st in (("train", train), ("warmup", warmup)):
        if st is not None:
            _check_stage(name, st)
    if not isinstance(switch, SwitchStart):
        raise TypeError(f"`switch` must be a SwitchStart; got {type(switch).__name__}")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"`restarts` must be a positive int; got {restarts!r}")
    if isinstance(max_bad_steps, bool) or not isinstance(max_bad_steps, int) \
            or max_bad_steps < 1:
        raise ValueError(f"`max_bad_steps` must be a positive int; got {max_bad_steps!r}")
    if restarts > 1 and val_fraction == 0:
        raise ValueError(f"`restarts`={restarts} needs validation data to choose the best "
                         "run; set `val_fraction` > 0 or restarts=1")
    if not callable(model):
        raise TypeError(f"`model` must be a callable NumPyro model; got {type(model)}")
    seed = _seed_of(key)
    x_arr = np.asarray(x)
    kw, names, _ = _model_kwargs(model, x_arr.shape, model_kwargs, mask)
    data = _prepare(x_arr, mask, val_fraction=val_fraction, standardize=standardize,
                    seed=seed)
    prob = build_problem(model, data, kw, names=names, encoder=encoder,
                         hidden=_default_hidden(model, kw), guide_kwargs=guide_kwargs or {},
                         warmup=warmup, train=train, init=init)
    notes = list(prob.notes)
    runs = []
    for r in range(restarts):
        runs.append(run_restart(prob, seed=seed + 1000 * r, label=r, restarts=restarts,
                                switch=switch, progress=progress, max_bad_steps=max_bad_steps,
                                notes=notes))
    scores = [run.val_elbo for run in runs]
    chosen = best_restart(scores) if data.frames_va else 0
    best = runs[chosen]
    checks, used = validation_checks(prob, best)
    notes += checks
    for msg in dict.fromkeys(notes):
        warnings.warn(msg, FitWarning, stacklevel=2)
    summary = FitSummary(
        stages=best.stages,
        restarts=tuple(RestartSummary(seed + 1000 * i, run.val_elbo, run.stages)
                       for i, run in enumerate(runs)),
        chosen=chosen, init=prob.init,
        skipped_steps=int(sum(s.skipped_steps for s in best.stages)),
        val_elbo=best.val_elbo, baseline=data.baseline, regimes_used=used,
        train_index=data.tr, val_index=data.va, warnings=tuple(dict.fromkeys(notes)))
    return FitResult(guide=prob.guide, params=best.params, losses=best.losses,
                     summary=summary, mean=data.mean, std=data.std,
                     model_kwargs=dict(prob.kw_tr))

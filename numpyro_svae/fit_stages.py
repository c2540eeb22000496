"""The training stages behind :func:`numpyro_svae.fitting.fit`: settings, stopping rule, loop.

Pure pieces (:func:`plateaued`, :func:`best_restart`) work on plain arrays; :func:`run_stage`
drives one compiled SVI step until the stopping rule or the step cap, with a progress bar,
and stops with a `RuntimeError` when steps keep being skipped.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

__all__ = ["Stage", "SwitchStart", "StageSummary", "plateaued", "best_restart", "run_stage",
           "NATGRAD_SCHEDULES"]

NATGRAD_SCHEDULES = ("constant", "cosine")
"""`Stage.natgrad_schedule`: a constant natural-gradient rate, or a cosine decay from
``natgrad_lr`` to 0 over ``max_steps``."""


class Stage(NamedTuple):
    """Settings of one training stage of :func:`numpyro_svae.fitting.fit`.

    Attributes
    ----------
    max_steps : int
        Step cap (the stage may stop earlier, see `window` and `tol`).
    lr : float
        Adam rate of the networks (encoder, decoder, other non-q(theta) parameters).
    natgrad_lr : float
        Natural-gradient rate of q(theta) (the start of the decay with ``"cosine"``).
    natgrad_schedule : {"constant", "cosine"}
        Constant rate, or a cosine decay to 0 over `max_steps` (stochastic variational
        Bayes settles only with a decaying rate).
    kl_warmup : float
        Fraction of `max_steps`, in ``[0, 1)``, run first with the local KL weighted by
        `kl_weight` (keeps the latents from collapsing to the prior while the networks are
        random).  The stopping rule starts after it.
    kl_weight : float
        Weight of the local KL during the warm-up part, in ``(0, 1]``.
    window : int
        ``W``: the stopping rule compares the mean loss of the last ``W`` steps with the
        mean of the ``W`` before (see :func:`plateaued`).
    tol : float
        Relative improvement between the two windows below which the stage stops.
    """

    max_steps: int = 1000
    lr: float = 3e-3
    natgrad_lr: float = 0.05
    natgrad_schedule: str = "constant"
    kl_warmup: float = 0.0
    kl_weight: float = 0.1
    window: int = 50
    tol: float = 1e-3


class SwitchStart(NamedTuple):
    """Settings of the switching start (AR(1)-HMM on the warm-up latents).

    Attributes
    ----------
    em_iters : int
        EM iterations of the AR-HMM fit (`numpyro_svae.initialize.arhmm_init`).
    pseudo_count : float
        Weight of the latents' statistics in q(theta) (1: the exact conjugate update).
    """

    em_iters: int = 100
    pseudo_count: float = 1.0


class StageSummary(NamedTuple):
    """What one stage did (a field of `numpyro_svae.fitting.FitSummary`).

    Attributes
    ----------
    name : str
        ``"warmup"`` (one-regime SVAE), ``"switch"`` (AR-HMM start) or ``"train"``.
    steps : int
        Steps run (0 for ``"switch"``).
    start : int
        Index of the stage's first step in `FitResult.losses`.
    final_loss : float
        Mean -ELBO per observed training frame over the stage's last window (``"switch"``:
        the loss at the start it set, the first loss of ``"train"``); NaN if none finite.
    stop_reason : str
        ``"converged"`` (the stopping rule), ``"max_steps"`` (the cap) or ``"init"``
        (``"switch"``, which runs no steps).
    skipped_steps : int
        Steps whose loss or update was not finite (the state was kept).
    info : dict
        Stage details (``"switch"``: ``frames_per_regime`` of the AR-HMM segmentation).
    seconds : float
        Wall time of the stage (the first stage using a compiled step includes its
        compilation).
    """

    name: str
    steps: int
    start: int
    final_loss: float
    stop_reason: str
    skipped_steps: int
    info: dict
    seconds: float = float("nan")


def _check_window(window: int, tol: float) -> None:
    if isinstance(window, bool) or not isinstance(window, int | np.integer) or window < 1:
        raise ValueError(f"`window` must be a positive int; got {window!r}")
    if not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"`tol` must be a finite number >= 0; got {tol!r}")


def plateaued(losses, window: int, tol: float) -> bool:
    """Whether a loss sequence has stopped improving (the stopping rule of a stage).

    With ``a`` the mean of the ``window`` losses before the last ``window`` and ``b`` the
    mean of the last ``window`` (non-finite losses left out), the sequence has plateaued
    when ``(a - b) / max(|a|, 1) < tol``: the smoothed loss fell by less than a fraction
    `tol` (an absolute amount `tol` for losses below 1 in size) or rose.

    Parameters
    ----------
    losses : array [S]
        Losses so far, oldest first.
    window : int
        ``W >= 1``.
    tol : float
        Relative improvement threshold, ``>= 0``.

    Returns
    -------
    bool
        False while fewer than ``2 W`` losses are given or a window has no finite loss.
    """
    _check_window(window, tol)
    x = np.asarray(losses, np.float64).ravel()
    if x.size < 2 * window:
        return False
    prev, last = x[-2 * window:-window], x[-window:]
    prev, last = prev[np.isfinite(prev)], last[np.isfinite(last)]
    if prev.size == 0 or last.size == 0:
        return False
    a, b = prev.mean(), last.mean()
    return bool((a - b) / max(abs(a), 1.0) < tol)


def best_restart(scores) -> int:
    """Index of the best restart: the largest finite validation ELBO.

    Parameters
    ----------
    scores : array [R]
        Validation ELBO per frame of each restart (higher is better; NaN for a failed one).

    Returns
    -------
    int
        The first index of the largest finite score.

    Raises
    ------
    ValueError
        `scores` is empty or has no finite entry.
    """
    s = np.asarray(scores, np.float64).ravel()
    ok = np.isfinite(s)
    if not ok.any():
        raise ValueError(f"no restart has a finite validation ELBO; got scores {s.tolist()}")
    return int(np.argmax(np.where(ok, s, -np.inf)))


def _skips(state, read: Callable | None) -> tuple[int, int] | None:
    """``(total, consecutive)`` optimizer skips of `state`, or None if not readable."""
    if read is None:
        return None
    try:
        c = read(state)
    except (ValueError, TypeError, AttributeError, KeyError):
        return None
    return int(c.total), int(c.consecutive)


def _final(losses: np.ndarray, window: int) -> float:
    tail = losses[-window:]
    tail = tail[np.isfinite(tail)]
    return float(tail.mean()) if tail.size else float("nan")


def run_stage(
    step: Callable[[Any, float], tuple[Any, Any]],
    state: Any,
    stage: Stage,
    *,
    name: str,
    frames: int,
    start: int = 0,
    progress: bool = True,
    desc: str | None = None,
    max_bad_steps: int = 20,
    read_skips: Callable | None = None,
) -> tuple[Any, np.ndarray, StageSummary]:
    """Run one stage: ``state, loss = step(state, local_kl_weight)`` until it stops.

    The first ``round(kl_warmup * max_steps)`` steps use ``kl_weight``, the rest weight 1;
    after the warm-up part the stage stops when :func:`plateaued` holds on the losses since
    then, or after ``max_steps``.

    Parameters
    ----------
    step : callable
        A compiled SVI step ``(state, weight) -> (state, loss)`` (``stable_update``: a
        non-finite step keeps the state and returns its non-finite loss).
    state : SVIState
        Where to start.
    stage : Stage
        Settings.
    name : str
        Stage name (summary, progress bar, error messages).
    frames : int
        Observed training frames; losses are divided by it.
    start : int
        Index of the stage's first step among all the run's steps (for the summary).
    progress : bool
        Show a ``tqdm.auto`` bar on stderr.
    desc : str, optional
        Bar label (default `name`).
    max_bad_steps : int
        Skipped steps in a row that end the run with a `RuntimeError`.
    read_skips : callable, optional
        ``state -> counters`` with ``total`` and ``consecutive`` (the optimizer's own skips,
        `numpyro_svae.optim.skipped_steps`).

    Returns
    -------
    (state, losses [S], StageSummary)
        Losses are -ELBO per observed frame (NaN for a skipped step).

    Raises
    ------
    RuntimeError
        After `max_bad_steps` skipped steps in a row.
    """
    import jax.numpy as jnp

    n_warm = int(round(stage.kl_warmup * stage.max_steps))
    losses = np.full(stage.max_steps, np.nan)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=stage.max_steps, desc=desc or name, file=sys.stderr,
                   mininterval=0.5, leave=False)
    prev = _skips(state, read_skips)
    total0 = prev[0] if prev is not None else 0
    bad, skipped, reason, n = 0, 0, "max_steps", 0
    weight_warm, weight_one = jnp.float32(stage.kl_weight), jnp.float32(1.0)
    t0 = time.perf_counter()
    try:
        for i in range(stage.max_steps):
            state, loss = step(state, weight_warm if i < n_warm else weight_one)
            losses[i] = float(loss) / frames
            n = i + 1
            now = _skips(state, read_skips)
            opt_skip = now is not None and prev is not None and now[0] > prev[0]
            prev = now
            is_bad = not np.isfinite(losses[i]) or opt_skip
            skipped += int(is_bad)
            bad = bad + 1 if is_bad else 0
            if bad >= max_bad_steps:
                raise RuntimeError(
                    f"stage {name!r} stopped at step {n}: {bad} steps in a row had a "
                    "non-finite loss or update and were skipped. Likely causes: data not "
                    "standardised (use standardize=True or scale each channel to unit "
                    "variance) or a rate too high (lower Stage.lr / Stage.natgrad_lr)")
            if bar is not None:
                bar.update(1)
                if i % 10 == 0:
                    bar.set_postfix(loss=f"{losses[i]:.4g}")
            if i + 1 > n_warm and plateaued(losses[n_warm:n], stage.window, stage.tol):
                reason = "converged"
                break
    finally:
        if bar is not None:
            bar.close()
    losses = losses[:n]
    if prev is not None:  # the optimizer's own count, when it keeps one
        skipped = max(skipped, prev[0] - total0)
    summ = StageSummary(name=name, steps=n, start=start,
                        final_loss=_final(losses[n_warm:] if n > n_warm else losses,
                                          stage.window),
                        stop_reason=reason, skipped_steps=int(skipped), info={},
                        seconds=time.perf_counter() - t0)
    return state, losses, summ

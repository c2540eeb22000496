"""`natural_gradient`: an optax transformation routing q(theta) parameters to natural-gradient SGD.

The guide's q(theta) parameters are unconstrained coordinates whose gradients are already
natural gradients (straight-through expected statistics plus the custom VJP of the
unconstrained map, svae_math.md sections 5.2-5.3).  Plain SGD on them is therefore a
natural-gradient step; Adam-like rescaling would destroy the preconditioning (section 5.7).
Every other parameter (encoder, decoder, ...) gets an arbitrary optax rule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

__all__ = ["NATURAL_STEPS", "QTHETA_PREFIX", "natural_gradient"]

QTHETA_PREFIX = "qtheta$"
"""Common prefix of the :func:`numpyro.param` sites holding q(theta) (see `SVAEGuide`)."""

_NATGRAD, _OTHER = "natgrad", "other"


def _labels(params: Any, prefix: str) -> Any:
    if not isinstance(params, Mapping):
        raise ValueError(
            "natural_gradient expects the parameters as a dict {site name: value} (what "
            f"numpyro.infer.SVI passes); got {type(params).__name__}")
    names = list(params)
    if not any(str(n).startswith(prefix) for n in names):
        raise ValueError(
            f"natural_gradient(prefix={prefix!r}) matched no parameter; the parameter sites are "
            f"{sorted(map(str, names))}. Pass the guide's prefix (SVAEGuide.prefix).")
    out = {}
    for name, value in params.items():
        lab = _NATGRAD if str(name).startswith(prefix) else _OTHER
        out[name] = jax.tree.map(lambda _, lab=lab: lab, value)
    return out


NATURAL_STEPS = ("linear", "exact", "guarded")
"""`natural_gradient(natural_step=...)`: how a q(theta) SGD update becomes a step."""


def _exact_natural_step(guide, guarded: bool = False) -> optax.GradientTransformation:
    """Map SGD updates of q(theta) to exact natural-parameter steps (``guide.retract``); with
    ``guarded``, only where the straight-line step is not usable."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        if params is None:
            raise ValueError(
                "natural_gradient(guide=...) needs the parameters in `update(grads, state, "
                "params)` (numpyro.infer.SVI passes them)")
        if guarded:
            return guide.retract(params, updates, guarded=True), state
        return guide.retract(params, updates), state

    return optax.GradientTransformation(init, update)


def natural_gradient(
    *,
    natgrad_lr: float | None = None,
    other: optax.GradientTransformation | None = None,
    schedule: Callable[[Any], Any] | None = None,
    prefix: str = QTHETA_PREFIX,
    momentum: float | None = None,
    guide: Any = None,
    natural_step: str | None = None,
) -> optax.GradientTransformation:
    """Optimizer for SVAEs: natural-gradient SGD on q(theta), `other` on everything else.

    Parameters
    ----------
    natgrad_lr : float, optional
        Step size of the natural-gradient SGD on the q(theta) parameters. With the per-sequence
        loss of `SVAE_ELBO` (local terms scaled to the full data set), ``natgrad_lr = 1`` on a
        full batch is the closed-form VB update of a conjugate model.  Give exactly one of
        `natgrad_lr` and `schedule`.
    other : optax.GradientTransformation, optional
        Rule for all other parameters (networks); default ``optax.adam(1e-3)``.
    schedule : callable, optional
        An optax schedule ``step -> learning rate`` replacing `natgrad_lr`.
    prefix : str
        Parameter names starting with `prefix` are q(theta) (default ``"qtheta$"``, the
        `SVAEGuide` default).
    momentum : float, optional
        Heavy-ball momentum of the natural-gradient SGD (``None``: plain SGD).
    guide : SVAEGuide, optional
        With the guide, each step is taken exactly in natural parameters
        (:meth:`SVAEGuide.retract`): ``eta <- eta - lr * natgrad`` lands where it should
        instead of following the straight line in the unconstrained coordinates, which
        matches it only to first order and can overshoot where the map bends (softplus and
        Cholesky factors near small eigenvalues); steps that would leave the domain are
        halved.  Without it (the default, as in the research code) the step is plain SGD on
        the unconstrained coordinates.  The guide must be the one passed to ``SVI`` and use
        natural gradients.
    natural_step : {"linear", "exact", "guarded"}, optional
        How an SGD update of q(theta) becomes a step: ``"linear"``, the straight line in the
        unconstrained coordinates (no `guide` needed); ``"exact"``, the exact
        natural-parameter step (:meth:`SVAEGuide.retract`); ``"guarded"``, the straight
        line wherever it is a usable approximation of the exact step, and the exact step for
        a factor (per regime) where it is not (its end point is farther from the exact
        step's end point than the current point is: the overshoot near a softplus floor,
        where one straight-line step can multiply a concentration by 10^8).  ``"exact"``
        and ``"guarded"`` need `guide`.  Default: ``"exact"`` when `guide` is given,
        ``"linear"`` otherwise.

    Returns
    -------
    optax.GradientTransformation
        Built on :func:`optax.partition`; pass it straight to :class:`numpyro.infer.SVI`.

    Raises
    ------
    ValueError
        Neither or both of `natgrad_lr` / `schedule`; a non-positive rate; an unknown
        `natural_step`, or ``"exact"`` / ``"guarded"`` without `guide`; a `guide` whose
        prefix differs from `prefix` or that has ``natural_gradients=False``; at ``init``,
        when no parameter name starts with `prefix` (the message lists both).
    TypeError
        `other` is not an ``optax.GradientTransformation``; `guide` has no ``retract``.

    Examples
    --------
    >>> opt = natural_gradient(natgrad_lr=0.1, other=optax.adam(1e-3))
    >>> state = opt.init({"qtheta$niw": jax.numpy.zeros(2), "enc$params": jax.numpy.zeros(3)})
    """
    if (natgrad_lr is None) == (schedule is None):
        raise ValueError(
            "natural_gradient needs exactly one of `natgrad_lr` and `schedule`; got "
            f"natgrad_lr={natgrad_lr!r}, schedule={schedule!r}")
    if natgrad_lr is not None:
        if isinstance(natgrad_lr, bool) or not isinstance(natgrad_lr, int | float):
            raise TypeError(f"`natgrad_lr` must be a float; got {type(natgrad_lr).__name__}")
        if not natgrad_lr > 0:
            raise ValueError(f"`natgrad_lr` must be > 0; got {natgrad_lr}")
    elif not callable(schedule):
        raise TypeError(f"`schedule` must be a callable step -> rate; got {type(schedule)}")
    if other is None:
        other = optax.adam(1e-3)
    if not isinstance(other, optax.GradientTransformation):
        raise TypeError(
            "`other` must be an optax.GradientTransformation (e.g. optax.adam(1e-3)); got "
            f"{type(other).__name__}")
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"`prefix` must be a non-empty str; got {prefix!r}")
    if natural_step is None:
        natural_step = "linear" if guide is None else "exact"
    if natural_step not in NATURAL_STEPS:
        raise ValueError(f"`natural_step` must be one of {', '.join(NATURAL_STEPS)}; got "
                         f"{natural_step!r}")
    if natural_step != "linear" and guide is None:
        raise ValueError(f"natural_step={natural_step!r} needs the guide: "
                         "natural_gradient(..., guide=guide)")
    if natural_step == "linear":
        guide = None  # plain SGD on the unconstrained coordinates
    if guide is not None:
        if not callable(getattr(guide, "retract", None)):
            raise TypeError(
                "`guide` must be an SVAEGuide (an object with a `retract(params, updates)` "
                f"method); got {type(guide).__name__}")
        guide_prefix = getattr(guide, "prefix", prefix)
        if guide_prefix != prefix:
            raise ValueError(
                f"natural_gradient(prefix={prefix!r}) does not match the guide's prefix "
                f"{guide_prefix!r}; the guide's q(theta) sites would get the `other` rule")
        if not getattr(guide, "natural_gradients", True):
            raise ValueError(
                "natural_gradient(guide=...) takes exact natural-parameter steps, which need "
                "the guide's natural gradients; this guide has natural_gradients=False")
    lr = natgrad_lr if schedule is None else schedule
    nat = optax.sgd(lr, momentum=momentum)
    if guide is not None:
        nat = optax.chain(nat, _exact_natural_step(guide, natural_step == "guarded"))
    return optax.partition({_NATGRAD: nat, _OTHER: other}, lambda p: _labels(p, prefix))

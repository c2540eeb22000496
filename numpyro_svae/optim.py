"""`natural_gradient`: an optax transformation routing q(theta) parameters to natural-gradient SGD.

The guide's q(theta) parameters are unconstrained coordinates whose gradients are already
natural gradients (straight-through expected statistics plus the custom VJP of the
unconstrained map, `docs/math.md`, "Natural gradients for q(theta)").  Plain SGD on them is
therefore a natural-gradient step; Adam-like rescaling would destroy the preconditioning.
Every other parameter (encoder, decoder, ...) gets an arbitrary optax rule.

Every optimizer built here skips a step whose gradients, final updates or resulting
parameters are not finite (the optimizer state and the parameters stay as they were) and
counts the skips; :func:`skipped_steps` reads the counters from an SVI state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["NATURAL_STEPS", "QTHETA_PREFIX", "SkippedSteps", "natural_gradient",
           "skipped_steps"]

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


def _all_finite(tree: Any) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves \
        else jnp.asarray(True)


def _skip_not_finite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """`inner`, except that a step is skipped (zero updates, `inner`'s state kept) unless the
    gradients, `inner`'s updates and the updated parameters are all finite.

    :func:`optax.apply_if_finite` (whose state this shares) looks at the incoming gradients
    only, and gives up after a number of skips; here the natural step inside `inner`
    (``SVAEGuide.retract``) can turn finite gradients into non-finite updates, so the check
    is on the final result too, and nothing is ever accepted silently.
    """
    inner = optax.with_extra_args_support(inner)

    def init(params):
        return optax.ApplyIfFiniteState(
            notfinite_count=jnp.zeros([], jnp.int32), last_finite=jnp.array(True),
            total_notfinite=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

    def update(grads, state, params=None, **extra_args):
        # computed on every step and then selected (not lax.cond): the check needs the result
        updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
        ok = _all_finite(grads) & _all_finite(updates)
        if params is not None:  # finite + finite can still overflow
            ok &= _all_finite(optax.apply_updates(params, updates))
        updates = optax.tree.where(ok, updates, optax.tree.zeros_like(updates))
        inner_state = optax.tree.where(ok, inner_state, state.inner_state)
        zero = jnp.zeros([], jnp.int32)
        return updates, optax.ApplyIfFiniteState(
            notfinite_count=jnp.where(ok, zero, optax.safe_increment(state.notfinite_count)),
            last_finite=ok,
            total_notfinite=jnp.where(ok, state.total_notfinite,
                                      optax.safe_increment(state.total_notfinite)),
            inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init, update)


def _is_counter(x: Any) -> bool:
    return isinstance(x, optax.ApplyIfFiniteState)


class SkippedSteps(NamedTuple):
    """Counters of the steps :func:`natural_gradient` skipped (all scalar arrays).

    Attributes
    ----------
    total : int32 []
        Skipped steps since the optimizer was initialised.
    consecutive : int32 []
        Skipped steps in a row up to the last one (0 after a step that was taken).
    last_finite : bool []
        Whether the last step was taken.
    """

    total: jax.Array
    consecutive: jax.Array
    last_finite: jax.Array


def skipped_steps(state: Any) -> SkippedSteps:
    """How many steps an optimizer from :func:`natural_gradient` has skipped.

    A step is skipped when its gradients, its final updates (after the natural step) or the
    parameters it would produce are not finite. The optimizer never gives up on its own: a
    training loop should check the counters and stop with a clear error, e.g. when
    ``consecutive`` reaches a few tens (the loss or the data is broken, not one unlucky
    minibatch), or report ``total`` at the end.

    Parameters
    ----------
    state : numpyro.infer.svi.SVIState or optax state
        The state returned by ``SVI.init`` / ``SVI.update`` / ``SVI.run(...).state``, or the
        optax state of the optimizer (also inside an ``optax.chain``; the first one found).

    Returns
    -------
    SkippedSteps
        ``total``, ``consecutive`` and ``last_finite``, scalar arrays (``int(...)`` them in
        a Python loop; usable under ``jit``).

    Raises
    ------
    ValueError
        `state` holds no optimizer built by :func:`natural_gradient`.

    Examples
    --------
    >>> state, loss = svi.update(state, x)
    >>> if int(skipped_steps(state).consecutive) >= 20:
    ...     raise FloatingPointError("20 non-finite steps in a row")
    """
    # SVIState(optim_state=(step, (params, optax state)), ...): search the whole tree
    found = [x for x in jax.tree.leaves(state, is_leaf=_is_counter) if _is_counter(x)]
    if not found:
        raise ValueError(
            "skipped_steps expects the state of SVI (or of the optax optimizer) built with "
            f"natural_gradient(...); got a {type(state).__name__} without its counters")
    c = found[0]
    return SkippedSteps(total=c.total_notfinite, consecutive=c.notfinite_count,
                        last_finite=c.last_finite)


def natural_gradient(
    *,
    natgrad_lr: float | None = None,
    other: optax.GradientTransformation | None = None,
    schedule: Callable[[Any], Any] | None = None,
    prefix: str = QTHETA_PREFIX,
    momentum: float | None = None,
    guide: Any = None,
    natural_step: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Optimizer for SVAEs: natural-gradient SGD on q(theta), `other` on everything else.

    A step whose gradients, final updates (after the natural step) or resulting parameters
    hold a NaN or an inf is skipped: the parameters and the optimizer state stay as they
    were (through ``SVI.update``, jitted or not, the parameters are unchanged) and the skip
    is counted. The optimizer never gives up and accepts such a step; read the counters
    with :func:`skipped_steps` in the training loop and stop with a clear error when too
    many steps in a row are skipped.

    Pass ``guide=guide`` (recommended): each q(theta) step is then the exact
    natural-parameter step, and a step that would leave the family's domain is halved.
    Without it the step is the straight line in the unconstrained coordinates, which agrees
    with the natural-parameter step only to first order and can leave the region where the
    model makes sense (near a softplus floor one step can multiply a concentration by
    10^8); the following steps then tend to be non-finite and are skipped, one after the
    other.

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
        halved.  Without it the step is plain SGD on the unconstrained coordinates (see
        above).  The guide must be the one passed to ``SVI`` and use natural gradients.
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
    optax.GradientTransformationExtraArgs
        :func:`optax.partition` of the two rules inside the skip of non-finite steps (its
        state is an ``optax.ApplyIfFiniteState``); pass it straight to
        :class:`numpyro.infer.SVI`.

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
    >>> svi = SVI(model, guide, natural_gradient(natgrad_lr=0.1, guide=guide),
    ...           loss=SVAE_ELBO())
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
    routed = optax.partition({_NATGRAD: nat, _OTHER: other}, lambda p: _labels(p, prefix))
    return _skip_not_finite(routed)

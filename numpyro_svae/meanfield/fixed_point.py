"""Generic fixed-point solver with an implicit (capped) or unrolled gradient.

The forward pass iterates a Gauss-Seidel block update ``omega <- step(omega, theta, aux)``
inside ``lax.while_loop`` until the relative change of a scalar objective falls below
``rtol`` or ``max_iters`` updates were made.  Its gradient is defined by ONE ``jax.custom_vjp``
(implicit function theorem on the parallel/Jacobi map ``F = parallel(omega, theta, aux)``,
which has the same fixed points):

    (I - dF/domega)^T v = g,       theta_bar = (dF/dtheta)^T v,

solved by damped Richardson iteration (default), GMRES or BiCGSTAB, with the map linearised
once at ``omega*`` (jointly in omega and theta) and reused.  The "capped" estimator falls
back to ``v = g`` (the one-step gradient) when the forward did not converge, the relative
adjoint residual is above ``fallback_residual`` or is NaN (docs/math.md §7).
``solver="unrolled"`` instead differentiates through a ``lax.scan`` of ``max_iters`` block
updates (the reference).

Diagnostics of the backward pass (relative adjoint residual, fallback flag) cannot be
returned by the forward; they are written into the cotangent of the ``probe`` argument
(a ``[2]`` array): ``jax.grad`` with respect to a zero probe reads them out.

Pure JAX, unbatched: ``vmap`` it over sequences (gradients of shared ``theta`` leaves are then
summed over the batch by JAX).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

__all__ = ["DEFAULT_OPTIONS", "FixedPointOptions", "FixedPointInfo", "fixed_point", "SOLVERS"]

SOLVERS = ("richardson", "gmres", "bicgstab", "onestep", "unrolled")


class FixedPointOptions(NamedTuple):
    """Static options of the mean-field fixed point (hashable; pass as a static argument).

    Defaults follow the research code (docs/math.md §4, §7) except that the adjoint
    tolerance and the fallback threshold are *relative* (to the incoming cotangent's norm).
    """

    max_iters: int = 10  # forward block updates (cap)
    rtol: float = 1e-5  # stop when |obj - obj_prev| / max(|obj_prev|, obj_eps) < rtol
    solver: str = "richardson"  # richardson | gmres | bicgstab | onestep | unrolled
    damping: float = 0.5  # Richardson step alpha
    adjoint_max_iters: int = 10  # backward solver iterations (cap)
    adjoint_tol: float = 1e-5  # relative change (Richardson) / residual (Krylov) tolerance
    fallback_residual: float = 1e2  # fall back to v = g above this relative adjoint residual
    fallback_on_unconverged: bool = True  # fall back when the forward hit max_iters
    obj_eps: float = 1e-8  # floor of the denominator of the relative change


DEFAULT_OPTIONS = FixedPointOptions()


class FixedPointInfo(NamedTuple):
    """Per-call (per-sequence under vmap) diagnostics."""

    num_iters: Array  # []  int32, forward block updates made
    converged: Array  # []  bool, relative change < rtol
    rel_change: Array  # [] last relative change of the objective
    adjoint_residual: Array  # [] NaN in the forward (known only in the backward; see `probe`)
    used_fallback: Array  # [] bool, forward-predictable fallback (unconverged & capped solver)


def _validate_options(options: FixedPointOptions) -> None:
    if not isinstance(options, FixedPointOptions):
        raise TypeError(f"`options` must be a FixedPointOptions; got {type(options).__name__}")
    if options.solver not in SOLVERS:
        raise ValueError(f"`options.solver` must be one of {SOLVERS}; got {options.solver!r}")
    if not isinstance(options.max_iters, int) or options.max_iters < 1:
        raise ValueError(f"`options.max_iters` must be an int >= 1; got {options.max_iters!r}")
    if not isinstance(options.adjoint_max_iters, int) or options.adjoint_max_iters < 1:
        raise ValueError(
            f"`options.adjoint_max_iters` must be an int >= 1; got {options.adjoint_max_iters!r}"
        )
    if not 0.0 < options.damping <= 1.0:
        raise ValueError(f"`options.damping` must lie in (0, 1]; got {options.damping!r}")


# ----------------------------------------------------------------------------------------------
# tree helpers


def _tmap(f, *trees):
    return jax.tree_util.tree_map(f, *trees)


def _tnorm(tree) -> Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in leaves))


def _tselect(pred, a, b):
    return _tmap(lambda x, y: jnp.where(pred, x, y), a, b)


def _zeros_like(tree):
    return _tmap(jnp.zeros_like, tree)


def _finite_or_zero(tree):
    return _tmap(lambda x: jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x)), tree)


def _rel_change(obj, obj_prev, first, eps):
    rel = jnp.abs(obj - obj_prev) / jnp.maximum(jnp.abs(obj_prev), eps)
    return jnp.where(first, jnp.inf, rel)


# ----------------------------------------------------------------------------------------------
# forward


def _forward(step: Callable, theta, aux, omega0, options: FixedPointOptions):
    """Gauss-Seidel iteration in a while_loop (stores no tape)."""

    def cond(carry):
        i, _, _, rel = carry
        return (i < options.max_iters) & (rel >= options.rtol)

    def body(carry):
        i, omega, obj_prev, _ = carry
        omega_new, obj = step(omega, theta, aux)
        rel = _rel_change(obj, obj_prev, i == 0, options.obj_eps)
        return i + 1, omega_new, obj, rel

    _, obj0 = jax.eval_shape(step, omega0, theta, aux)
    init = (
        jnp.zeros((), jnp.int32),
        omega0,
        jnp.zeros(obj0.shape, obj0.dtype),
        jnp.full(obj0.shape, jnp.inf, obj0.dtype),
    )
    i, omega, _, rel = lax.while_loop(cond, body, init)
    converged = rel < options.rtol
    capped = options.solver in ("richardson", "gmres", "bicgstab")
    used_fallback = (~converged) & (capped and options.fallback_on_unconverged)
    info = FixedPointInfo(i, converged, rel, jnp.full(rel.shape, jnp.nan, rel.dtype), used_fallback)
    return omega, info


def _unrolled(step: Callable, theta, aux, omega0, options: FixedPointOptions):
    """Reference: ordinary autodiff through a scan of `max_iters` updates (frozen once done)."""

    def body(carry, _):
        i, omega, obj_prev, rel, done = carry
        omega_new, obj = step(omega, theta, aux)
        rel_new = _rel_change(obj, obj_prev, i == 0, options.obj_eps)
        omega = _tselect(done, omega, omega_new)
        i = jnp.where(done, i, i + 1)
        obj = jnp.where(done, obj_prev, obj)
        rel = jnp.where(done, rel, rel_new)
        done = done | (rel < options.rtol)
        return (i, omega, obj, rel, done), None

    _, obj0 = jax.eval_shape(step, omega0, theta, aux)
    init = (
        jnp.zeros((), jnp.int32),
        omega0,
        jnp.zeros(obj0.shape, obj0.dtype),
        jnp.full(obj0.shape, jnp.inf, obj0.dtype),
        jnp.zeros((), bool),
    )
    (i, omega, _, rel, done), _ = lax.scan(body, init, None, length=options.max_iters)
    info = FixedPointInfo(i, done, rel, jnp.full(rel.shape, jnp.nan, rel.dtype),
                          jnp.zeros((), bool))
    return omega, info


# ----------------------------------------------------------------------------------------------
# backward solvers on (I - J^T) v = g, J^T given as a function


def _richardson(vjp: Callable, g, theta_like, options: FixedPointOptions, skip=False):
    """Damped Richardson on ``(I - J^T) v = g`` with ``vjp(v) = (J^T v, (dF/dtheta)^T v)``.

    One evaluation of the joint VJP per iteration serves the update, the exact residual of
    the evaluated iterate and its ``theta`` cotangent, so the traced graph holds a single
    transposed copy of the map (compile time) and no extra evaluations follow the loop.
    Returns the last *evaluated* iterate ``v``, ``(dF/dtheta)^T v``, ``|g + J^T v - v|`` and
    ``(dF/dtheta)^T g`` (the one-step fallback, from the first iteration, where ``v = g``).
    With ``skip`` (the forward already decided on the fallback) only that first iteration
    runs: under ``vmap`` the loop then waits only for the sequences whose solve is used.
    """
    a = options.damping
    tiny = jnp.finfo(_dtype(g)).tiny

    def cond(carry):
        j, *_, change = carry
        return (j < options.adjoint_max_iters) & (change >= options.adjoint_tol) & (
            (j == 0) | ~skip)

    def body(carry):
        j, v, _, _, _, theta_g, _ = carry
        w_bar, th_bar = vjp(v)
        rho = _tmap(lambda gi, jv, vi: gi + jv - vi, g, w_bar, v)
        rho_norm = _tnorm(rho)
        v_new = _tmap(lambda vi, ri: vi + a * ri, v, rho)
        change = a * rho_norm / jnp.maximum(_tnorm(v), tiny)  # |v_new - v| / |v|
        theta_g = _tselect(j == 0, th_bar, theta_g)
        return j + 1, v_new, v, th_bar, rho_norm, theta_g, change

    zeros = _zeros_like(theta_like)
    inf = jnp.asarray(jnp.inf, _dtype(g))
    init = (jnp.zeros((), jnp.int32), g, g, zeros, inf, zeros, inf)
    _, _, v, theta_v, rho_norm, theta_g, _ = lax.while_loop(cond, body, init)
    return v, theta_v, rho_norm, theta_g


def _dtype(tree):
    return jax.tree_util.tree_leaves(tree)[0].dtype


def _krylov(JT: Callable, g, options: FixedPointOptions):
    def A(v):
        return _tmap(jnp.subtract, v, JT(v))

    kw = dict(x0=g, tol=options.adjoint_tol, atol=0.0, maxiter=options.adjoint_max_iters)
    if options.solver == "gmres":
        v, _ = jax.scipy.sparse.linalg.gmres(A, g, solve_method="batched", **kw)
    else:
        v, _ = jax.scipy.sparse.linalg.bicgstab(A, g, **kw)
    return v


# ----------------------------------------------------------------------------------------------
# the custom VJP


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 6))
def _fixed_point_implicit(step, parallel, theta, aux, omega0, probe, options):
    return _forward(step, theta, aux, omega0, options)


def _fp_fwd(step, parallel, theta, aux, omega0, probe, options):
    omega, info = _forward(step, theta, aux, omega0, options)
    return (omega, info), (theta, aux, omega0, probe, omega, info.converged)


def _fp_bwd(step, parallel, options, res, cts):
    theta, aux, omega0, probe, omega, converged = res
    g = _finite_or_zero(cts[0])
    dt = _dtype(g)
    g_norm = jnp.maximum(_tnorm(g), jnp.finfo(dt).tiny)
    # ONE linearisation of the Jacobi map at omega*, in omega and theta jointly
    _, vjp = jax.vjp(lambda w, th: parallel(w, th, aux), omega, theta)

    if options.solver == "onestep":
        theta_bar = vjp(g)[1]
        rel_res = jnp.zeros((), dt)
        fallback = jnp.zeros((), bool)
    else:
        if options.solver == "richardson":
            skip = (~converged) & options.fallback_on_unconverged
            v, theta_v, rho_norm, theta_g = _richardson(vjp, g, theta, options, skip)
        else:
            v = _krylov(lambda u: vjp(u)[0], g, options)
            w_bar, theta_v = vjp(v)
            rho_norm = _tnorm(_tmap(lambda gi, jv, vi: gi + jv - vi, g, w_bar, v))
            theta_g = None
        rel_res = rho_norm / g_norm
        fallback = (rel_res > options.fallback_residual) | jnp.isnan(rel_res)
        if options.fallback_on_unconverged:
            fallback = fallback | (~converged)
        if theta_g is None:  # Krylov: the one-step gradient costs one more VJP
            theta_g = vjp(g)[1]
        theta_bar = _tselect(fallback, theta_g, theta_v)
    theta_bar = _finite_or_zero(theta_bar)
    probe_bar = jnp.stack([rel_res, fallback.astype(dt)]).astype(probe.dtype)
    probe_bar = jnp.broadcast_to(probe_bar, probe.shape) if probe.shape == (2,) else jnp.zeros_like(
        probe
    )
    return theta_bar, _zeros_like(aux), _zeros_like(omega0), probe_bar


_fixed_point_implicit.defvjp(_fp_fwd, _fp_bwd)


def fixed_point(
    step: Callable[[Any, Any, Any], tuple[Any, Array]],
    parallel: Callable[[Any, Any, Any], Any],
    theta: Any,
    aux: Any,
    omega0: Any,
    *,
    options: FixedPointOptions = DEFAULT_OPTIONS,
    probe: Array | None = None,
) -> tuple[Any, FixedPointInfo]:
    """Solve ``omega = step(omega, theta, aux)`` with an implicit or unrolled gradient.

    Parameters
    ----------
    step : callable
        Gauss-Seidel block update ``(omega, theta, aux) -> (omega_new, objective [])``; the
        relative change of ``objective`` is the stopping criterion.  Must be a hashable
        module-level function (it is a static argument of the custom VJP).
    parallel : callable
        Jacobi update ``(omega, theta, aux) -> omega_new`` with the same fixed points; it is
        linearised once at ``omega*`` by the backward pass.
    theta : pytree of float arrays
        Everything differentiable (no closures over traced values).
    aux : pytree of float arrays
        Non-differentiated inputs (e.g. a mask); receives a zero cotangent.
    omega0 : pytree of float arrays
        Initial state (non-differentiated).
    options : FixedPointOptions
        Static options; ``options.solver`` chooses the gradient.
    probe : Array, optional
        ``[2]`` zeros; its cotangent is ``[relative adjoint residual, fallback flag]``.

    Returns
    -------
    (omega, FixedPointInfo)
        The last iterate and the forward diagnostics.
    """
    _validate_options(options)
    if options.solver == "unrolled":
        return _unrolled(step, theta, aux, omega0, options)
    if probe is None:
        probe = jnp.zeros((2,), _dtype(omega0))
    return _fixed_point_implicit(step, parallel, theta, aux, omega0, probe, options)

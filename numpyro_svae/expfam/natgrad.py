"""Natural gradients for conjugate exponential families, and the unconstrained maps they use.

For a family with log-normaliser ``A`` and mean parameters ``mu(eta) = grad A(eta)`` the
Fisher matrix is ``F = hess A``.  A loss that sees ``eta`` only through ``mu`` has the
natural gradient ``F^-1 grad_eta L = grad_mu L``; the straight-through map
:func:`straight_through` delivers exactly that as the cotangent of ``eta``.  The prior KL
written as ``<eta - eta0, ST(mu)(eta)> - A(eta) + A(eta0)`` (:func:`prior_kl_natgrad_form`)
has cotangent ``eta - eta0``, its natural gradient.

Optimisers step unconstrained parameters ``u`` with ``eta = T(u)``.  :func:`natgrad_map`
builds a ``custom_vjp`` of ``T`` whose backward pass maps the natural gradient on ``eta`` to
``u`` by the Jacobian of the inverse map, ``(d u / d eta) g`` = ``G_u^-1 grad_u L`` with
``G_u = J' F J`` the Fisher metric pulled back to ``u`` (docs/math.md §8).

References
----------
Bendekgey, Hope & Sudderth (2023), "Unbiased learning of deep generative models with
structured discrete representations", NeurIPS.  docs/math.md §8.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_svae._linalg import psd_cholesky, symmetrize

Array = jax.Array
PyTree = Any

__all__ = [
    "straight_through",
    "prior_kl_natgrad_form",
    "natgrad_map",
    "natgrad_terms",
    "natural_retract",
    "tree_vdot",
    "softplus_inverse",
    "pd_from_unconstrained",
    "pd_to_unconstrained",
]


# ----------------------------------------------------------------------------------------
# straight-through and the prior KL
# ----------------------------------------------------------------------------------------


def straight_through(f: Callable[[PyTree], PyTree], eta: PyTree) -> PyTree:
    """Value ``f(eta)`` with identity Jacobian with respect to ``eta``.

    ``ST(f)(eta) = (eta - sg(eta)) + sg(f(eta))``, leaf by leaf.  ``f(eta)`` must have the same
    leaves (count, order and shapes) as ``eta``; the result has ``f``'s pytree type (e.g. an
    ``NIWStats`` built from an ``NIWNatural``).

    Parameters
    ----------
    f : callable
        Map from natural parameters to mean parameters (``*_expected_stats``).
    eta : pytree
        Natural parameters (a NamedTuple of arrays).

    Returns
    -------
    pytree
        ``f(eta)`` as value; backpropagation passes cotangents to ``eta`` unchanged.

    Warnings
    --------
    The cotangent of ``eta`` is the natural gradient only if every path from ``eta`` to the
    loss goes through this map (or :func:`prior_kl_natgrad_form`).
    """
    mu = f(jax.lax.stop_gradient(eta))
    eta_leaves = jax.tree.leaves(eta)
    mu_leaves, mu_def = jax.tree.flatten(mu)
    if len(eta_leaves) != len(mu_leaves):
        raise ValueError(
            f"`f` must return as many leaves as `eta` has; got {len(mu_leaves)} and "
            f"{len(eta_leaves)}."
        )
    out = []
    for e, m in zip(eta_leaves, mu_leaves, strict=True):
        if jnp.shape(e) != jnp.shape(m):
            raise ValueError(
                f"`f(eta)` leaf has shape {jnp.shape(m)} but the `eta` leaf has {jnp.shape(e)}."
            )
        out.append(e - jax.lax.stop_gradient(e) + jax.lax.stop_gradient(m))
    return jax.tree.unflatten(mu_def, out)


def tree_vdot(a: PyTree, b: PyTree) -> Array:
    """Sum over all leaves of ``sum(a_leaf * b_leaf)`` (leaves paired in order).  Returns []."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if len(la) != len(lb):
        raise ValueError(f"pytrees have {len(la)} and {len(lb)} leaves; they must match.")
    return sum(jnp.sum(x * y) for x, y in zip(la, lb, strict=True))


def prior_kl_natgrad_form(
    eta: PyTree,
    eta0: PyTree,
    expected_stats: Callable[[PyTree], PyTree],
    log_normalizer: Callable[[PyTree], Array],
) -> Array:
    """KL(q || p) written so that its gradient in ``eta`` is exactly ``eta - eta0``.

    ``KL = <eta - eta0, ST(mu)(eta)> - A(eta) + A(eta0)``: the value is the KL divergence
    between two members of the family; the gradient is ``mu + (eta - eta0) - mu``.

    Parameters
    ----------
    eta, eta0 : pytree
        Natural parameters of ``q`` and of the prior ``p`` (same NamedTuple type, possibly
        with a leading batch axis, e.g. ``[K, ...]`` for the MNIW of every regime).
    expected_stats : callable
        ``eta -> E[t]`` of the family (``niw_expected_stats`` ...).
    log_normalizer : callable
        ``eta -> A(eta)`` (any batch axes are summed).

    Returns
    -------
    Array
        ``[]`` the KL summed over any batch axes.
    """
    mu = straight_through(expected_stats, eta)
    diff = jax.tree.map(lambda a, b: a - b, eta, eta0)
    return (
        tree_vdot(diff, mu)
        - jnp.sum(log_normalizer(eta))
        + jnp.sum(log_normalizer(eta0))
    )


# ----------------------------------------------------------------------------------------
# natural-gradient custom VJP of u -> eta
# ----------------------------------------------------------------------------------------


def natgrad_map(
    forward: Callable[[PyTree], PyTree],
    inverse: Callable[[PyTree], PyTree],
    symmetric: PyTree,
) -> Callable[[PyTree], PyTree]:
    """Wrap ``forward: u -> eta`` in a custom VJP that returns natural gradients in ``u``.

    The forward pass is ``forward(u)``; the backward pass symmetrises the cotangent of every
    leaf flagged in ``symmetric`` (matrix natural parameters), then returns
    ``jvp(inverse, eta)[g]``, i.e. ``(d u / d eta) g``.  When ``g`` is the straight-through
    cotangent (the natural gradient in ``eta``), the result is the Riemannian natural
    gradient in ``u``: ``G_u^-1 grad_u L`` with ``G_u = J' F J``.

    Parameters
    ----------
    forward : callable
        ``u -> eta`` (closing over static options only, no tracers).
    inverse : callable
        ``eta -> u``, the inverse of ``forward`` on the family's domain.
    symmetric : pytree of bool
        Same structure as ``eta``; ``True`` on leaves holding symmetric ``[..., D, D]`` matrices.

    Returns
    -------
    callable
        ``u -> eta`` with the natural-gradient VJP.
    """

    @jax.custom_vjp
    def mapped(u):
        return forward(u)

    def fwd(u):
        eta = forward(u)
        return eta, eta

    def bwd(eta, g):
        g = jax.tree.map(lambda gi, s: symmetrize(gi) if s else gi, g, symmetric)
        _, du = jax.jvp(inverse, (eta,), (g,))
        return (du,)

    mapped.defvjp(fwd, bwd)
    return mapped


def natgrad_terms(
    u: PyTree,
    prior: PyTree,
    *,
    to_standard: Callable[[PyTree], PyTree],
    to_unconstrained: Callable[[PyTree], PyTree],
    expected_stats: Callable[[PyTree], PyTree],
    kl: Callable[[PyTree, PyTree], Array],
    natural_tangent: Callable[[PyTree, PyTree], PyTree],
    kl_direction: Callable[[PyTree, PyTree], PyTree],
    natgrad: bool = True,
) -> tuple[PyTree, PyTree, Array]:
    """A q(theta) factor's standard parameters, ``E[t]`` and prior KL, all from standard form.

    Equivalent (in exact arithmetic) to ``eta = *_from_unconstrained(u)``,
    ``straight_through(expected_stats, eta)`` and :func:`prior_kl_natgrad_form`, but nothing is
    recovered from natural parameters: for an MNIW with a large mean ``M`` and precision
    ``V``, ``eta1 = S + M V M'`` dwarfs ``S`` and float32 loses ``S`` entirely when it is
    recovered as ``eta1 - M V M'`` (NaN in long mocap6 runs; docs/design.md).

    With ``natgrad`` the returned statistics and KL share a custom VJP: cotangents ``g`` (on
    ``E[t]``, i.e. the natural gradient in ``eta``) and ``c`` (on the KL) map to
    ``du = (du / d std) [natural_tangent(std, g) + c kl_direction(std, prior)]``, the
    natural gradient in ``u``; ``kl_direction`` is ``(d std / d eta)(eta - eta0)``, written in
    standard parameters so that it, too, is free of cancellation.  Without ``natgrad``
    ordinary autodiff runs through the same formulas (Euclidean gradients in ``u``).

    Parameters
    ----------
    u : pytree
        Unconstrained coordinates (``*Unconstrained``).
    prior : pytree
        Standard parameters of the prior (constants; they receive a zero cotangent).
    to_standard, to_unconstrained : callable
        ``u -> std`` and its inverse.
    expected_stats : callable
        ``std -> E[t]`` (same leaves as the natural parameters).
    kl : callable
        ``(std_q, std_p) -> KL(q || p)`` with any batch axes summed, ``[]``.
    natural_tangent : callable
        ``(std, g) -> (d std / d eta) g``; must symmetrise matrix leaves of ``g``.
    kl_direction : callable
        ``(std_q, std_p) -> (d std / d eta)(eta_q - eta_p)``.
    natgrad : bool
        Natural-gradient VJP (default) or plain autodiff.

    Returns
    -------
    tuple
        ``(std, E[t], kl)``.  ``std`` carries ordinary (Euclidean) gradients; it is meant for
        sampling and reporting.
    """
    std = to_standard(u)
    if not natgrad:
        return std, expected_stats(std), kl(std, prior)

    @jax.custom_vjp
    def terms(u, prior):
        s = to_standard(u)
        return expected_stats(s), kl(s, prior)

    def fwd(u, prior):
        s = to_standard(u)
        return (expected_stats(s), kl(s, prior)), (s, prior)

    def bwd(res, cts):
        s, prior = res
        g, c = cts
        tangent = natural_tangent(s, g)
        direction = kl_direction(s, prior)
        tangent = jax.tree.map(lambda a, b: a + c * b, tangent, direction)
        _, du = jax.jvp(to_unconstrained, (s,), (tangent,))
        return du, jax.tree.map(jnp.zeros_like, prior)

    terms.defvjp(fwd, bwd)
    stats, kl_value = terms(u, prior)
    return std, stats, kl_value


# ----------------------------------------------------------------------------------------
# exact natural-parameter steps (a retraction for natural-gradient SGD)
# ----------------------------------------------------------------------------------------


def natural_retract(
    u: PyTree,
    du: PyTree,
    *,
    to_standard: Callable[[PyTree], PyTree],
    to_unconstrained: Callable[[PyTree], PyTree],
    natural_step: Callable[[PyTree, PyTree], PyTree],
    batch_ndim: int,
    max_halvings: int = 8,
    guarded: bool = False,
) -> tuple[PyTree, Array]:
    """Take the step ``du`` in natural coordinates exactly and map it back to ``u``.

    SGD on ``u`` with natural gradients moves ``u`` along the straight line ``u + du``, which
    is the natural-parameter step ``eta + J du`` only to first order (``J = d eta / d u``);
    where the map bends (softplus and Cholesky near a small eigenvalue) the straight line in
    ``u`` can overshoot.  This function instead lands on ``eta(u) + t J du`` exactly, with
    ``t = 1`` or, when that point is outside the family's domain (or outside the ridged
    parametrisation), the largest ``t = 2^-j`` (``j <= max_halvings``) inside it, chosen per
    batch element (e.g. per regime); ``t = 0`` (no move) when none is.  For a conjugate
    update ``eta <- (1 - rho) eta + rho eta_target`` with ``rho <= 1`` the full step is always
    valid: a convex combination of two points of a convex domain.

    Everything is computed in standard coordinates: ``natural_step`` returns the standard
    parameters of ``eta(std) + d eta(std)[dstd]`` without forming ``eta`` (see
    :func:`numpyro_svae.expfam.mniw.mniw_natural_step`; forming ``S + M V M'`` in float32 loses
    ``S``).

    Parameters
    ----------
    u, du : pytree
        Unconstrained coordinates and the proposed step (``*Unconstrained``), leaves
        ``[*batch, ...]``.
    to_standard, to_unconstrained : callable
        ``u -> std`` and its inverse; the inverse returns non-finite values outside the
        domain (Cholesky of an indefinite matrix, ``softplus_inverse`` of a value ``<= 0``).
    natural_step : callable
        ``(std, dstd) -> std_new``: the exact natural-coordinate step in standard form.
    batch_ndim : int
        Number of leading batch axes (``0`` for a single factor, ``1`` for ``[K, ...]``).
    max_halvings : int
        Number of halvings tried after the full step.
    guarded : bool
        Keep the straight-line step ``u + du`` (plain SGD on ``u``, the research code's
        rule) for every batch element where it is a usable approximation of the exact step,
        and take the exact step only where it is not: where ``u + du`` lands farther from
        the exact step's end point than the start point is from it (distances in standard
        coordinates, each entry scaled by ``1 + |std|`` at the start), or on a non-finite
        point.  This catches the straight line's overshoot where the map bends: near the
        softplus floor of a concentration or degree of freedom the first-order step in
        ``u`` grows like ``1 / (alpha - floor)`` (measured on mocap6: one step took a
        Dirichlet concentration from its floor to 1.9e8).

    Returns
    -------
    tuple
        ``(u_new, t)``: the new coordinates (strict upper triangles of raw matrices zero, as
        ``to_unconstrained`` returns them, where the exact step was taken) and
        ``t [*batch]``, the fraction of the exact step taken (``1`` where ``guarded`` kept the
        straight-line step).
    """
    std, dstd = jax.jvp(to_standard, (u,), (du,))
    dtype = jax.tree.leaves(u)[0].dtype
    ts = 2.0 ** -jnp.arange(max_halvings + 1, dtype=dtype)  # [H]

    def candidate(t):
        s_new = natural_step(std, jax.tree.map(lambda d: t * d, dstd))
        new = to_unconstrained(s_new)
        ok = [jnp.all(jnp.isfinite(x), axis=tuple(range(batch_ndim, x.ndim)))
              for x in jax.tree.leaves(new)]
        return new, s_new, jnp.all(jnp.stack(ok), axis=0)

    # leaves [H, *batch, ...]; valid [H, *batch]
    cands, std_cands, valid = jax.vmap(candidate)(ts)
    first = jnp.argmax(valid, axis=0)  # [*batch]: the largest valid step
    any_valid = jnp.any(valid, axis=0)

    def pick(c, old):
        idx = first.reshape((1, *first.shape) + (1,) * (c.ndim - 1 - batch_ndim))
        chosen = jnp.take_along_axis(c, idx, axis=0)[0]
        keep = any_valid.reshape(any_valid.shape + (1,) * (old.ndim - batch_ndim))
        return jnp.where(keep, chosen, old)

    u_new = jax.tree.map(pick, cands, u)
    t = jnp.where(any_valid, ts[first], 0.0)
    if not guarded:
        return u_new, t
    u_lin = jax.tree.map(jnp.add, u, du)
    # the exact end point in standard form is the chosen candidate's (the start if none)
    s_lin, s_ex = to_standard(u_lin), jax.tree.map(pick, std_cands, std)

    def sq(a, b, ref):  # squared scaled distance per batch element
        d = (a - b) / (1.0 + jnp.abs(ref))
        return jnp.sum(d * d, axis=tuple(range(batch_ndim, d.ndim)))

    def total(a, b):
        return sum(jax.tree.leaves(jax.tree.map(sq, a, b, std)))

    miss, step = total(s_lin, s_ex), total(s_ex, std)  # [*batch] each
    # `<=` is False for NaN: a non-finite straight-line end point takes the exact step
    keep = miss <= step

    def choose(lin, ex):
        k = keep.reshape(keep.shape + (1,) * (lin.ndim - batch_ndim))
        return jnp.where(k, lin, ex)

    return jax.tree.map(choose, u_lin, u_new), jnp.where(keep, 1.0, t)


# ----------------------------------------------------------------------------------------
# bijections shared by the families
# ----------------------------------------------------------------------------------------


def softplus_inverse(y: Array) -> Array:
    """Inverse of ``softplus`` for ``y > 0``: ``y + log(-expm1(-y))``.  Broadcasts."""
    return y + jnp.log(-jnp.expm1(-y))


def pd_from_unconstrained(raw: Array, jitter: float = 0.0) -> Array:
    """PD matrix ``L L' + jitter I`` from the lower triangle of ``raw``.

    ``L = tril(raw, -1) + diag(softplus(diag raw))``; the strict upper triangle of ``raw`` is
    ignored (dead coordinates that receive zero gradient).

    Parameters
    ----------
    raw : Array
        ``[..., D, D]`` unconstrained matrix.
    jitter : float
        Ridge added to the diagonal (keeps the matrix away from singular).

    Returns
    -------
    Array
        ``[..., D, D]`` symmetric positive-definite matrix.
    """
    D = raw.shape[-1]
    diag = jax.nn.softplus(jnp.diagonal(raw, axis1=-2, axis2=-1))
    L = jnp.tril(raw, -1) + diag[..., None] * jnp.eye(D, dtype=raw.dtype)
    eye = jnp.eye(D, dtype=raw.dtype)
    return L @ jnp.swapaxes(L, -1, -2) + jitter * eye


def pd_to_unconstrained(P: Array, jitter: float = 0.0) -> Array:
    """Inverse of :func:`pd_from_unconstrained`: ``[..., D, D]`` PD -> lower-triangular raw.

    The strict upper triangle of the result is zero.  Requires ``P - jitter I`` to be PD.
    """
    D = P.shape[-1]
    eye = jnp.eye(D, dtype=P.dtype)
    L = psd_cholesky(P - jitter * eye)
    diag = softplus_inverse(jnp.diagonal(L, axis1=-2, axis2=-1))
    return jnp.tril(L, -1) + diag[..., None] * eye


# ----------------------------------------------------------------------------------------
# validation helpers (run only on concrete arrays)
# ----------------------------------------------------------------------------------------


def _concrete(x) -> np.ndarray | None:
    """``x`` as a NumPy array, or ``None`` when it is a tracer (checks are skipped then)."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def _check_square(name: str, x, D: int | None = None) -> None:
    shape = jnp.shape(x)
    if len(shape) < 2 or shape[-1] != shape[-2] or (D is not None and shape[-1] != D):
        want = f"[..., {D}, {D}]" if D is not None else "[..., D, D]"
        raise ValueError(f"`{name}` must have shape {want}; got {list(shape)}.")


def _check_pd(name: str, x) -> None:
    """Raise if a concrete ``x`` is not symmetric positive definite."""
    a = _concrete(x)
    if a is None:
        return
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"`{name}` must be finite; got non-finite entries.")
    sym_err = np.max(np.abs(a - np.swapaxes(a, -1, -2)), initial=0.0)
    scale = np.max(np.abs(a), initial=0.0)
    if sym_err > 1e-5 * max(scale, 1.0):
        raise ValueError(f"`{name}` must be symmetric; max |A - A'| = {sym_err:.3g}.")
    eig = np.linalg.eigvalsh(0.5 * (a + np.swapaxes(a, -1, -2)))
    if not np.all(eig > 0):
        raise ValueError(
            f"`{name}` must be positive definite; smallest eigenvalue {eig.min():.3g}."
        )


def _check_positive(name: str, x, lower: float = 0.0) -> None:
    """Raise if a concrete ``x`` has an entry ``<= lower``."""
    a = _concrete(x)
    if a is None:
        return
    if not np.all(np.isfinite(a)) or not np.all(a > lower):
        raise ValueError(f"`{name}` must be finite and > {lower:g}; got {a}.")

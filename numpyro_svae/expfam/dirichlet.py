"""Dirichlet family: the prior of the initial regime probabilities and of each row of the
transition matrix.

``pi ~ Dir(alpha)`` with statistic ``t(pi) = log pi``, natural parameter ``eta = alpha - 1``
and ``A(eta) = sum_j log Gamma(alpha_j) - log Gamma(sum_j alpha_j)`` (density w.r.t.
Lebesgue measure on the first ``K - 1`` coordinates of the simplex, as NumPyro's
``Dirichlet``).  Every function broadcasts over leading batch axes, so a ``[K, K]`` bundle is
a transition matrix with one Dirichlet per row (the last axis is the event).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import digamma, gammaln

from numpyro_svae.expfam.natgrad import (
    _check_positive,
    natgrad_map,
    natgrad_terms,
    natural_retract,
    softplus_inverse,
)

Array = jax.Array

__all__ = [
    "DirichletStandard",
    "DirichletNatural",
    "DirichletStats",
    "DirichletUnconstrained",
    "dirichlet_to_natural",
    "dirichlet_to_standard",
    "dirichlet_log_normalizer",
    "dirichlet_expected_stats",
    "dirichlet_kl",
    "dirichlet_entropy",
    "dirichlet_sample",
    "dirichlet_from_unconstrained",
    "dirichlet_to_unconstrained",
    "dirichlet_qtheta_terms",
    "dirichlet_retract",
]


class DirichletStandard(NamedTuple):
    """Concentration parameters."""

    alpha: Array  # [..., K] concentrations (> 0)


class DirichletNatural(NamedTuple):
    """Natural parameter, paired with ``DirichletStats``."""

    eta: Array  # [..., K] alpha - 1


class DirichletStats(NamedTuple):
    """Sufficient statistic (or its expectation, = grad A)."""

    log_pi: Array  # [..., K] log pi


class DirichletUnconstrained(NamedTuple):
    """Unconstrained coordinates: ``alpha = softplus(u) + min_concentration``."""

    u: Array  # [..., K]


def dirichlet_to_natural(standard: DirichletStandard) -> DirichletNatural:
    """Standard -> natural: ``eta = alpha - 1``.

    Raises
    ------
    ValueError
        ``alpha`` is 0-d, or (on concrete arrays) has an entry ``<= 0``.
    """
    alpha = jnp.asarray(standard.alpha)
    if alpha.ndim < 1:
        raise ValueError("`alpha` must have shape [..., K] with K >= 1; got a scalar.")
    _check_positive("alpha", alpha)
    return DirichletNatural(eta=alpha - 1.0)


def dirichlet_to_standard(natural: DirichletNatural) -> DirichletStandard:
    """Natural -> standard: ``alpha = eta + 1``."""
    return DirichletStandard(alpha=natural.eta + 1.0)


def dirichlet_log_normalizer(natural: DirichletNatural) -> Array:
    """``A(eta) = sum log Gamma(alpha) - log Gamma(sum alpha)``, shape ``[...]``."""
    alpha = natural.eta + 1.0
    return jnp.sum(gammaln(alpha), axis=-1) - gammaln(jnp.sum(alpha, axis=-1))


def dirichlet_expected_stats(natural: DirichletNatural) -> DirichletStats:
    """``E[log pi_j] = psi(alpha_j) - psi(sum alpha)`` (= grad A), shape ``[..., K]``."""
    alpha = natural.eta + 1.0
    return DirichletStats(digamma(alpha) - digamma(jnp.sum(alpha, axis=-1, keepdims=True)))


def dirichlet_kl(q: DirichletNatural, p: DirichletNatural) -> Array:
    """``KL(q || p) = <eta_q - eta_p, E_q log pi> - A(eta_q) + A(eta_p)``, shape ``[...]``."""
    Et = dirichlet_expected_stats(q).log_pi
    return (
        jnp.sum((q.eta - p.eta) * Et, axis=-1)
        - dirichlet_log_normalizer(q)
        + dirichlet_log_normalizer(p)
    )


def dirichlet_entropy(natural: DirichletNatural) -> Array:
    """Differential entropy ``[...]`` (same measure as NumPyro's ``Dirichlet``)."""
    Et = dirichlet_expected_stats(natural).log_pi
    return dirichlet_log_normalizer(natural) - jnp.sum(natural.eta * Et, axis=-1)


def dirichlet_sample(
    key: Array, natural: DirichletNatural, sample_shape: tuple[int, ...] = ()
) -> Array:
    """Draw ``pi [*sample_shape, ..., K]`` (``jax.random.dirichlet``; key first)."""
    alpha = natural.eta + 1.0
    shape = tuple(sample_shape) + alpha.shape[:-1]
    return jax.random.dirichlet(key, alpha, shape=shape, dtype=alpha.dtype)


def _dir_u_to_eta(u: DirichletUnconstrained, min_concentration: float) -> DirichletNatural:
    return DirichletNatural(jax.nn.softplus(u.u) + (min_concentration - 1.0))


def _dir_eta_to_u(eta: DirichletNatural, min_concentration: float) -> DirichletUnconstrained:
    return DirichletUnconstrained(softplus_inverse(eta.eta - (min_concentration - 1.0)))


def dirichlet_from_unconstrained(
    u: DirichletUnconstrained, *, natgrad: bool = True, min_concentration: float = 0.01
) -> DirichletNatural:
    """``eta = softplus(u) + min_concentration - 1`` (research default: ``softplus(u) - 0.99``).

    Parameters
    ----------
    u : DirichletUnconstrained
        ``[..., K]``.
    natgrad : bool
        If True (default) the VJP returns the natural gradient in ``u``; if False, the plain
        Euclidean gradient.  The value is the same.
    min_concentration : float
        Floor of ``alpha``.

    Returns
    -------
    DirichletNatural
    """
    fwd = lambda v: _dir_u_to_eta(v, min_concentration)
    if not natgrad:
        return fwd(u)
    inv = lambda e: _dir_eta_to_u(e, min_concentration)
    return natgrad_map(fwd, inv, DirichletNatural(False))(u)


def dirichlet_to_unconstrained(
    params: DirichletNatural | DirichletStandard, *, min_concentration: float = 0.01
) -> DirichletUnconstrained:
    """Inverse of :func:`dirichlet_from_unconstrained` (needs ``alpha > min_concentration``).
    Accepts natural or standard parameters."""
    if isinstance(params, DirichletStandard):
        params = DirichletNatural(params.alpha - 1.0)
    return _dir_eta_to_u(params, min_concentration)


def dirichlet_qtheta_terms(
    u: DirichletUnconstrained,
    prior: DirichletStandard,
    *,
    natgrad: bool = True,
    min_concentration: float = 0.01,
) -> tuple[DirichletStandard, DirichletStats, Array]:
    """Standard parameters, ``E[log pi]`` and ``KL(q || prior)`` of a Dirichlet q(theta)
    factor, with the same interface as :func:`numpyro_svae.expfam.mniw.mniw_qtheta_terms`
    (``eta = alpha - 1`` is linear, so the natural tangent is the cotangent itself).

    Returns
    -------
    tuple
        ``(DirichletStandard, DirichletStats, kl [])`` with the KL summed over batch axes.
    """
    to_std = lambda v: DirichletStandard(jax.nn.softplus(v.u) + min_concentration)
    to_u = lambda s: DirichletUnconstrained(softplus_inverse(s.alpha - min_concentration))
    nat = lambda s: DirichletNatural(s.alpha - 1.0)
    prior = DirichletStandard(jnp.broadcast_to(jnp.asarray(prior.alpha, u.u.dtype), u.u.shape))
    return natgrad_terms(
        u, prior,
        to_standard=to_std,
        to_unconstrained=to_u,
        expected_stats=lambda s: dirichlet_expected_stats(nat(s)),
        kl=lambda q, p: jnp.sum(dirichlet_kl(nat(q), nat(p))),
        natural_tangent=lambda s, g: DirichletStandard(g[0]),
        kl_direction=lambda q, p: DirichletStandard(q.alpha - p.alpha),
        natgrad=natgrad,
    )


def dirichlet_retract(
    u: DirichletUnconstrained,
    du: DirichletUnconstrained,
    *,
    min_concentration: float = 0.01,
    max_halvings: int = 8,
    guarded: bool = False,
) -> tuple[DirichletUnconstrained, Array]:
    """Exact natural-coordinate version of the SGD step ``u + du`` (``eta = alpha - 1`` is
    linear, so the step is ``alpha + dalpha``, halved while ``alpha <= min_concentration``;
    see :func:`numpyro_svae.expfam.natgrad.natural_retract`).  Each row ``[..., K]`` is one
    factor.  Returns ``(u_new, t [...])``."""
    return natural_retract(
        u, du,
        to_standard=lambda v: DirichletStandard(jax.nn.softplus(v.u) + min_concentration),
        to_unconstrained=lambda s: DirichletUnconstrained(
            softplus_inverse(s.alpha - min_concentration)),
        natural_step=lambda s, d: DirichletStandard(s.alpha + d.alpha),
        batch_ndim=jnp.ndim(u.u) - 1,
        max_halvings=max_halvings,
        guarded=guarded,
    )

"""Multivariate Gaussian in natural (information) form.

``log p(x) = -1/2 x' J x + h' x - A(J, h)`` with statistic ``t(x) = (-x x' / 2, x)``,
natural parameters ``(J, h)`` and ``A = 1/2 h' J^-1 h - 1/2 log|J| + D/2 log 2 pi``
(Lebesgue base measure).  Every function broadcasts over leading batch axes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from numpyro_svae._linalg import (
    LOG_2PI,
    chol_inv_transpose_solve,
    chol_logdet,
    chol_solve,
    psd_cholesky,
    psd_inv,
    symmetrize,
)
from numpyro_svae.expfam.natgrad import (
    _check_pd,
    _check_square,
    natgrad_map,
    pd_from_unconstrained,
    pd_to_unconstrained,
)

Array = jax.Array

__all__ = [
    "GaussianStandard",
    "GaussianNatural",
    "GaussianStats",
    "GaussianUnconstrained",
    "gaussian_to_natural",
    "gaussian_to_standard",
    "gaussian_log_normalizer",
    "gaussian_expected_stats",
    "gaussian_kl",
    "gaussian_entropy",
    "gaussian_sample",
    "gaussian_from_unconstrained",
    "gaussian_to_unconstrained",
]


class GaussianStandard(NamedTuple):
    """Moment parameters."""

    mean: Array  # [..., D]
    cov: Array   # [..., D, D] PD


class GaussianNatural(NamedTuple):
    """Information-form parameters, paired with ``GaussianStats``."""

    J: Array  # [..., D, D] precision (PD)
    h: Array  # [..., D]    J mean


class GaussianStats(NamedTuple):
    """Sufficient statistics (or their expectations, = grad A)."""

    neg_half_xxT: Array  # [..., D, D] -x x' / 2
    x: Array             # [..., D]


class GaussianUnconstrained(NamedTuple):
    """Unconstrained coordinates: ``J = L L' + jitter I`` from the lower triangle of ``J_raw``."""

    J_raw: Array  # [..., D, D]
    h: Array      # [..., D]


def gaussian_to_natural(standard: GaussianStandard) -> GaussianNatural:
    """Moment -> information form.

    Raises
    ------
    ValueError
        Shape mismatch, or (on concrete arrays) a non-PD ``cov``.
    """
    mean, cov = jnp.asarray(standard.mean), jnp.asarray(standard.cov)
    _check_square("cov", cov)
    D = cov.shape[-1]
    if mean.shape[-1:] != (D,):
        raise ValueError(
            f"`mean` must have shape [..., {D}] to match `cov`; got {list(mean.shape)}."
        )
    _check_pd("cov", cov)
    J = psd_inv(cov)
    return GaussianNatural(J=J, h=jnp.einsum("...ij,...j->...i", J, mean))


def gaussian_to_standard(natural: GaussianNatural) -> GaussianStandard:
    """Information -> moment form (Cholesky solves)."""
    L = psd_cholesky(natural.J)
    return GaussianStandard(mean=chol_solve(L, natural.h), cov=psd_inv(natural.J))


def gaussian_log_normalizer(natural: GaussianNatural) -> Array:
    """``A = 1/2 h' J^-1 h - 1/2 log|J| + D/2 log 2 pi``, shape ``[...]``."""
    D = natural.J.shape[-1]
    L = psd_cholesky(natural.J)
    mean = chol_solve(L, natural.h)
    return 0.5 * jnp.sum(natural.h * mean, axis=-1) - 0.5 * chol_logdet(L) + 0.5 * D * LOG_2PI


def gaussian_expected_stats(natural: GaussianNatural) -> GaussianStats:
    """``E[-x x' / 2] = -(J^-1 + m m') / 2`` and ``E[x] = m = J^-1 h``."""
    mean, cov = gaussian_to_standard(natural)
    Exx = symmetrize(cov + mean[..., :, None] * mean[..., None, :])
    return GaussianStats(neg_half_xxT=-0.5 * Exx, x=mean)


def _event_dot(a, b) -> Array:
    return jnp.sum(a[0] * b[0], axis=(-2, -1)) + jnp.sum(a[1] * b[1], axis=-1)


def gaussian_kl(q: GaussianNatural, p: GaussianNatural) -> Array:
    """``KL(q || p) = <eta_q - eta_p, E_q t> - A(q) + A(p)``, shape ``[...]``."""
    diff = GaussianNatural(q.J - p.J, q.h - p.h)
    return (
        _event_dot(diff, gaussian_expected_stats(q))
        - gaussian_log_normalizer(q)
        + gaussian_log_normalizer(p)
    )


def gaussian_entropy(natural: GaussianNatural) -> Array:
    """``D/2 (1 + log 2 pi) - 1/2 log|J|``, shape ``[...]``."""
    D = natural.J.shape[-1]
    return 0.5 * D * (1.0 + LOG_2PI) - 0.5 * chol_logdet(psd_cholesky(natural.J))


def gaussian_sample(
    key: Array, natural: GaussianNatural, sample_shape: tuple[int, ...] = ()
) -> Array:
    """Draw ``x = J^-1 h + L^-T eps`` (``J = L L'``), shape ``[*sample_shape, ..., D]``."""
    L = psd_cholesky(natural.J)
    mean = chol_solve(L, natural.h)
    shape = tuple(sample_shape) + mean.shape
    eps = jax.random.normal(key, shape, dtype=mean.dtype)
    return mean + chol_inv_transpose_solve(jnp.broadcast_to(L, (*shape, shape[-1])), eps)


def _g_u_to_eta(u: GaussianUnconstrained, jitter: float) -> GaussianNatural:
    return GaussianNatural(pd_from_unconstrained(u.J_raw, jitter), u.h)


def _g_eta_to_u(eta: GaussianNatural, jitter: float) -> GaussianUnconstrained:
    return GaussianUnconstrained(pd_to_unconstrained(eta.J, jitter), eta.h)


def gaussian_from_unconstrained(
    u: GaussianUnconstrained, *, natgrad: bool = True, jitter: float = 1e-6
) -> GaussianNatural:
    """``J = L L' + jitter I`` (softplus-diagonal lower Cholesky from ``J_raw``), ``h`` free.

    With ``natgrad=True`` (default) the VJP returns the natural gradient in ``u``; with
    ``False``, the plain Euclidean gradient.  The value is the same.
    """
    fwd = lambda v: _g_u_to_eta(v, jitter)
    if not natgrad:
        return fwd(u)
    inv = lambda e: _g_eta_to_u(e, jitter)
    return natgrad_map(fwd, inv, GaussianNatural(True, False))(u)


def gaussian_to_unconstrained(
    natural: GaussianNatural, *, jitter: float = 1e-6
) -> GaussianUnconstrained:
    """Inverse of :func:`gaussian_from_unconstrained` (needs ``J - jitter I`` PD)."""
    return _g_eta_to_u(natural, jitter)

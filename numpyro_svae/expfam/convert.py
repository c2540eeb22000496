"""Conversions between NumPyro's built-in distribution parameters and our families.

Pure numbers in, numbers out (no NumPyro import): the front reads the arguments off a model
trace and calls these.  Parameterisations checked in ``numpyro/distributions/continuous.py``
of NumPyro 0.22:

- ``InverseWishart(concentration, scale_matrix | rate_matrix | scale_tril)``: density
  ``|Psi|^{nu/2} |X|^{-(nu + p + 1)/2} exp(-tr(Psi X^-1) / 2) / (2^{nu p/2} Gamma_p(nu/2))``,
  so ``X^-1 ~ Wishart(nu, Psi^-1)``.  Our ``S = Psi = scale_matrix`` (``= scale_tril
  scale_tril'`` ``= rate_matrix^-1``) and ``nu = concentration``.
- ``MultivariateNormal(m, covariance_matrix = Sigma / lam)`` with ``Sigma`` the
  inverse-Wishart draw is the NIW's ``mu | tau ~ N(m, (lam tau)^-1)``.
- ``MatrixNormal(loc, scale_tril_row, scale_tril_column)``: ``vec X ~ N(vec loc,
  (Lc Lc') kron (Lr Lr'))`` (column stacking), i.e. rows covariance ``U = Lr Lr'`` and columns
  covariance ``Lc Lc'``; its density is ``∝ exp(-tr[(Lc Lc')^-1 (X - loc)' U^-1 (X - loc)] / 2)``.
  With ``scale_tril_row = cholesky(Q)`` (``Q`` the inverse-Wishart draw) this is the MNIW with
  ``M = loc`` and column precision ``V = (Lc Lc')^-1``.
- ``Dirichlet(concentration)``: ``alpha = concentration``, natural ``alpha - 1``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from numpyro_svae._linalg import psd_cholesky, psd_inv, symmetrize
from numpyro_svae.expfam.dirichlet import (
    DirichletNatural,
    DirichletStandard,
    dirichlet_to_natural,
)
from numpyro_svae.expfam.mniw import MNIWNatural, MNIWStandard, mniw_to_natural, mniw_to_standard
from numpyro_svae.expfam.natgrad import _check_pd, _check_positive, _check_square
from numpyro_svae.expfam.niw import NIWNatural, NIWStandard, niw_to_natural, niw_to_standard

Array = jax.Array

__all__ = [
    "NIWNumPyroParams",
    "MNIWNumPyroParams",
    "inverse_wishart_scale",
    "dirichlet_from_numpyro",
    "niw_from_numpyro",
    "mniw_from_numpyro",
    "dirichlet_to_numpyro",
    "niw_to_numpyro",
    "mniw_to_numpyro",
]


class NIWNumPyroParams(NamedTuple):
    """``Sigma ~ InverseWishart(df, scale_matrix)``;
    ``mu ~ MultivariateNormal(loc, Sigma / lam)``."""

    df: Array            # [...]
    scale_matrix: Array  # [..., D, D]
    loc: Array           # [..., D]
    lam: Array           # [...]


class MNIWNumPyroParams(NamedTuple):
    """``Q ~ InverseWishart(df, scale_matrix)``;
    ``X ~ MatrixNormal(loc, cholesky(Q), scale_tril_column)``."""

    df: Array                 # [...]
    scale_matrix: Array       # [..., D, D]
    loc: Array                # [..., D, Din]
    scale_tril_column: Array  # [..., Din, Din] lower Cholesky of the column covariance V^-1


def inverse_wishart_scale(
    scale_matrix: Array | None = None,
    rate_matrix: Array | None = None,
    scale_tril: Array | None = None,
) -> Array:
    """The scale ``Psi`` ``[..., D, D]`` of a NumPyro ``InverseWishart`` from whichever of its
    three parameterisations was given (exactly one)."""
    given = [n for n, v in [("scale_matrix", scale_matrix), ("rate_matrix", rate_matrix),
                            ("scale_tril", scale_tril)] if v is not None]
    if len(given) != 1:
        raise ValueError(
            "exactly one of `scale_matrix`, `rate_matrix`, `scale_tril` must be given; "
            f"got {given or 'none'}."
        )
    if scale_matrix is not None:
        x = jnp.asarray(scale_matrix)
        _check_square("scale_matrix", x)
        return x
    if rate_matrix is not None:
        x = jnp.asarray(rate_matrix)
        _check_square("rate_matrix", x)
        return psd_inv(x)
    x = jnp.asarray(scale_tril)
    _check_square("scale_tril", x)
    return x @ jnp.swapaxes(x, -1, -2)


def dirichlet_from_numpyro(concentration: Array) -> DirichletNatural:
    """``Dirichlet(concentration)`` -> ``DirichletNatural`` (``[..., K]``; rows of a
    transition matrix are a ``[K, K]`` batch).

    Raises
    ------
    ValueError
        ``concentration`` is a scalar or (concrete) has an entry ``<= 0``.
    """
    c = jnp.asarray(concentration)
    if c.ndim < 1:
        raise ValueError("`concentration` must have shape [..., K]; got a scalar.")
    _check_positive("concentration", c)
    return dirichlet_to_natural(DirichletStandard(c))


def niw_from_numpyro(
    df: Array,
    loc: Array,
    lam: Array,
    *,
    scale_matrix: Array | None = None,
    rate_matrix: Array | None = None,
    scale_tril: Array | None = None,
) -> NIWNatural:
    """``InverseWishart(df, scale) ; MultivariateNormal(loc, Sigma / lam)`` -> ``NIWNatural``.

    Parameters
    ----------
    df : Array
        ``[...]`` InverseWishart ``concentration`` (``> D - 1``).
    loc : Array
        ``[..., D]`` mean of ``mu``.
    lam : Array
        ``[...]`` the MVN covariance is ``Sigma / lam`` (``lam > 0``).
    scale_matrix, rate_matrix, scale_tril : Array, optional
        Exactly one, as in NumPyro's ``InverseWishart``.

    Raises
    ------
    ValueError
        Naming ``df``, ``loc``, ``lam`` or the scale argument.
    """
    S = inverse_wishart_scale(scale_matrix, rate_matrix, scale_tril)
    D = S.shape[-1]
    df, loc, lam = jnp.asarray(df), jnp.asarray(loc), jnp.asarray(lam)
    if loc.shape[-1:] != (D,):
        raise ValueError(f"`loc` must have shape [..., {D}] to match the scale; got "
                         f"{list(loc.shape)}.")
    _check_positive("df", df, lower=D - 1)
    _check_positive("lam", lam)
    name = [n for n, v in [("scale_matrix", scale_matrix), ("rate_matrix", rate_matrix),
                           ("scale_tril", scale_tril)] if v is not None][0]
    try:
        return niw_to_natural(NIWStandard(S=S, m=loc, lam=lam, nu=df))
    except ValueError as err:
        raise ValueError(str(err).replace("`S`", f"`{name}`")) from None


def mniw_from_numpyro(
    df: Array,
    loc: Array,
    scale_tril_column: Array,
    *,
    scale_matrix: Array | None = None,
    rate_matrix: Array | None = None,
    scale_tril: Array | None = None,
) -> MNIWNatural:
    """``InverseWishart(df, scale) ; MatrixNormal(loc, cholesky(Q), scale_tril_column)`` -> MNIW.

    Parameters
    ----------
    df : Array
        ``[...]`` InverseWishart ``concentration`` (``> D - 1``).
    loc : Array
        ``[..., D, Din]`` mean of ``X = [A | b]``.
    scale_tril_column : Array
        ``[..., Din, Din]`` lower Cholesky factor of the column covariance; ``V`` is its
        inverse, ``(Lc Lc')^-1``.
    scale_matrix, rate_matrix, scale_tril : Array, optional
        Exactly one, as in NumPyro's ``InverseWishart``.

    Raises
    ------
    ValueError
        Naming ``df``, ``loc``, ``scale_tril_column`` or the scale argument.
    """
    S = inverse_wishart_scale(scale_matrix, rate_matrix, scale_tril)
    D = S.shape[-1]
    df, loc, Lc = jnp.asarray(df), jnp.asarray(loc), jnp.asarray(scale_tril_column)
    if loc.ndim < 2 or loc.shape[-2] != D:
        raise ValueError(f"`loc` must have shape [..., {D}, Din] to match the scale; got "
                         f"{list(loc.shape)}.")
    Din = loc.shape[-1]
    _check_square("scale_tril_column", Lc, Din)
    _check_positive("df", df, lower=D - 1)
    col_cov = Lc @ jnp.swapaxes(Lc, -1, -2)
    _check_pd("scale_tril_column @ scale_tril_column.T", col_cov)
    name = [n for n, v in [("scale_matrix", scale_matrix), ("rate_matrix", rate_matrix),
                           ("scale_tril", scale_tril)] if v is not None][0]
    try:
        return mniw_to_natural(MNIWStandard(S=S, M=loc, V=psd_inv(col_cov), nu=df))
    except ValueError as err:
        raise ValueError(str(err).replace("`S`", f"`{name}`")) from None


def dirichlet_to_numpyro(params: DirichletNatural | DirichletStandard) -> Array:
    """``DirichletNatural`` or ``DirichletStandard`` -> ``Dirichlet`` ``concentration``
    ``[..., K]``."""
    if isinstance(params, DirichletStandard):
        return params.alpha
    return params.eta + 1.0


def niw_to_numpyro(params: NIWNatural | NIWStandard) -> NIWNumPyroParams:
    """``NIWNatural`` or ``NIWStandard`` -> the arguments of ``InverseWishart`` and
    ``MultivariateNormal`` (standard input avoids the natural -> standard step)."""
    std = params if isinstance(params, NIWStandard) else niw_to_standard(params)
    S, m, lam, nu = std
    return NIWNumPyroParams(df=nu, scale_matrix=symmetrize(S), loc=m, lam=lam)


def mniw_to_numpyro(params: MNIWNatural | MNIWStandard) -> MNIWNumPyroParams:
    """``MNIWNatural`` or ``MNIWStandard`` -> the arguments of ``InverseWishart`` and
    ``MatrixNormal`` (standard input avoids the natural -> standard step, which loses ``S``
    in float32 when ``M V M'`` dwarfs it)."""
    std = params if isinstance(params, MNIWStandard) else mniw_to_standard(params)
    S, M, V, nu = std
    return MNIWNumPyroParams(
        df=nu, scale_matrix=symmetrize(S), loc=M, scale_tril_column=psd_cholesky(psd_inv(V))
    )

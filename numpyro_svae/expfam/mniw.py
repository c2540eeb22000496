"""Matrix-normal-inverse-Wishart family on (X, Lambda): the prior of each regime's dynamics.

``Lambda ~ Wishart(nu, S^-1)`` (``Q = Lambda^-1 ~ InvWishart(nu, S)``) and, given ``Lambda``,
``X ~ MatrixNormal(M, rows: Lambda^-1, columns: V^-1)``, i.e.
``p(X | Lambda) ∝ exp(-1/2 tr[V (X - M)' Lambda (X - M)])``.  ``X = [A | b]`` is ``[D, Din]``
with ``Din = D + 1`` when the dynamics carry a bias and ``D`` without; ``V`` is a *precision*
on the ``Din`` columns.  With the statistic

    t(X, Lambda) = (-Lambda / 2,  X' Lambda,  -X' Lambda X / 2,  log|Lambda| / 2)

the natural parameters are ``(S + M V M',  V M',  V,  nu + D + Din + 1)`` and

    A(eta) = nu/2 (D log 2 - log|S|) + log Gamma_D(nu/2) - D/2 log|V| + D Din/2 log 2 pi

(density w.r.t. Lebesgue measure on ``(X, Q)``; svae_math.md section 1.2).  Every function
broadcasts over leading batch axes, so a ``[K, ...]`` bundle holds the ``K`` regimes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve, solve_triangular

from numpyro_svae._linalg import (
    LOG_2PI,
    chol_logdet,
    multidigamma,
    multigammaln,
    psd_cholesky,
    symmetrize,
)
from numpyro_svae.expfam.natgrad import (
    _check_pd,
    _check_positive,
    _check_square,
    natgrad_map,
    pd_from_unconstrained,
    pd_to_unconstrained,
    softplus_inverse,
)
from numpyro_svae.expfam.niw import _bartlett

Array = jax.Array

__all__ = [
    "MNIWStandard",
    "MNIWNatural",
    "MNIWStats",
    "MNIWUnconstrained",
    "MNIWSample",
    "MNIWExpectations",
    "mniw_to_natural",
    "mniw_to_standard",
    "mniw_log_normalizer",
    "mniw_expected_stats",
    "mniw_expectations",
    "mniw_kl",
    "mniw_entropy",
    "mniw_sample",
    "mniw_from_unconstrained",
    "mniw_to_unconstrained",
]


class MNIWStandard(NamedTuple):
    """Standard MNIW parameters."""

    S: Array   # [..., D, D]     inverse-Wishart scale of Q = Lambda^-1 (PD)
    M: Array   # [..., D, Din]   mean of X = [A | b]
    V: Array   # [..., Din, Din] column precision of X (PD)
    nu: Array  # [...]           degrees of freedom (> D - 1)


class MNIWNatural(NamedTuple):
    """Natural parameters, paired with ``MNIWStats`` slot by slot."""

    eta1: Array  # [..., D, D]     S + M V M'
    eta2: Array  # [..., Din, D]   V M'
    eta3: Array  # [..., Din, Din] V
    eta4: Array  # [...]           nu + D + Din + 1


class MNIWStats(NamedTuple):
    """Sufficient statistics (or their expectations, = grad A)."""

    neg_half_Lambda: Array       # [..., D, D]     -Lambda / 2
    Xt_Lambda: Array             # [..., Din, D]   X' Lambda
    neg_half_Xt_Lambda_X: Array  # [..., Din, Din] -X' Lambda X / 2
    half_logdet_Lambda: Array    # [...]           log|Lambda| / 2


class MNIWExpectations(NamedTuple):
    """Expected potentials for the regime dynamics (the stats fields, rescaled)."""

    Lambda: Array         # [..., D, D]     E[Lambda]
    Xt_Lambda: Array      # [..., Din, D]   E[X' Lambda]
    Xt_Lambda_X: Array    # [..., Din, Din] E[X' Lambda X]
    logdet_Lambda: Array  # [...]           E[log|Lambda|]


class MNIWUnconstrained(NamedTuple):
    """Unconstrained coordinates of an MNIW (see :func:`mniw_from_unconstrained`)."""

    S_raw: Array   # [..., D, D]     lower triangle used; S = L L' + jitter_S I
    M: Array       # [..., D, Din]
    V_raw: Array   # [..., Din, Din] lower triangle used; V = L L' + jitter_V I
    nu_raw: Array  # [...]           nu = softplus(nu_raw) + D - 1 + dof_eps


class MNIWSample(NamedTuple):
    """One draw (or a batch of draws) of ``(X, Lambda)``."""

    X: Array       # [..., D, Din]
    Lambda: Array  # [..., D, D] precision of the transition noise


def _event_dot(a, b) -> Array:
    return (
        jnp.sum(a[0] * b[0], axis=(-2, -1))
        + jnp.sum(a[1] * b[1], axis=(-2, -1))
        + jnp.sum(a[2] * b[2], axis=(-2, -1))
        + a[3] * b[3]
    )


def _mT(x: Array) -> Array:
    return jnp.swapaxes(x, -1, -2)


def mniw_to_natural(standard: MNIWStandard) -> MNIWNatural:
    """Standard -> natural parameters.

    Parameters
    ----------
    standard : MNIWStandard
        ``S [..., D, D]`` PD, ``M [..., D, Din]``, ``V [..., Din, Din]`` PD, ``nu [...] > D - 1``.

    Returns
    -------
    MNIWNatural

    Raises
    ------
    ValueError
        Shape mismatch, or (on concrete arrays) non-PD ``S``/``V`` or ``nu <= D - 1``.
    """
    S, M, V, nu = (jnp.asarray(x) for x in standard)
    _check_square("S", S)
    D = S.shape[-1]
    if M.ndim < 2 or M.shape[-2] != D:
        raise ValueError(f"`M` must have shape [..., {D}, Din] to match `S`; got {list(M.shape)}.")
    Din = M.shape[-1]
    _check_square("V", V, Din)
    _check_pd("S", S)
    _check_pd("V", V)
    _check_positive("nu", nu, lower=D - 1)
    VMt = V @ _mT(M)
    return MNIWNatural(eta1=S + M @ VMt, eta2=VMt, eta3=V, eta4=nu + D + Din + 1)


def mniw_to_standard(natural: MNIWNatural) -> MNIWStandard:
    """Natural -> standard parameters (inverse of :func:`mniw_to_natural`)."""
    eta1, eta2, eta3, eta4 = natural
    D, Din = eta1.shape[-1], eta3.shape[-1]
    L_V = psd_cholesky(eta3)
    Mt = cho_solve((L_V, True), eta2)
    S = symmetrize(eta1 - _mT(eta2) @ Mt)
    return MNIWStandard(S=S, M=_mT(Mt), V=eta3, nu=eta4 - D - Din - 1)


def mniw_log_normalizer(natural: MNIWNatural) -> Array:
    """Log-normaliser ``A(eta)`` ``[...]`` (see the module docstring for the formula)."""
    S, _, V, nu = mniw_to_standard(natural)
    D, Din = S.shape[-1], V.shape[-1]
    return (
        0.5 * nu * (D * jnp.log(2.0) - chol_logdet(psd_cholesky(S)))
        + multigammaln(0.5 * nu, D)
        - 0.5 * D * chol_logdet(psd_cholesky(V))
        + 0.5 * D * Din * LOG_2PI
    )


def mniw_expected_stats(natural: MNIWNatural) -> MNIWStats:
    """Closed-form ``E[t] = grad A(eta)``.

    ``E[Lambda] = nu S^-1``, ``E[X' Lambda] = M' E[Lambda]``,
    ``E[X' Lambda X] = D V^-1 + M' E[Lambda] M``, ``E log|Lambda|`` as for the NIW.

    Returns
    -------
    MNIWStats
    """
    S, M, V, nu = mniw_to_standard(natural)
    D, Din = S.shape[-1], V.shape[-1]
    L_S, L_V = psd_cholesky(S), psd_cholesky(V)
    eye_D = jnp.broadcast_to(jnp.eye(D, dtype=S.dtype), S.shape)
    eye_in = jnp.broadcast_to(jnp.eye(Din, dtype=V.dtype), V.shape)
    E_L = symmetrize(nu[..., None, None] * cho_solve((L_S, True), eye_D))
    Xt_L = _mT(M) @ E_L
    E_XLX = symmetrize(D * cho_solve((L_V, True), eye_in) + Xt_L @ M)
    E_logdet = multidigamma(0.5 * nu, D) + D * jnp.log(2.0) - chol_logdet(L_S)
    return MNIWStats(-0.5 * E_L, Xt_L, -0.5 * E_XLX, 0.5 * E_logdet)


def mniw_expectations(stats: MNIWStats) -> MNIWExpectations:
    """Rescale expected statistics to ``E[Lambda], E[X'Lambda], E[X'Lambda X], E log|Lambda|``.

    Linear, so it may be applied to straight-through statistics.
    """
    return MNIWExpectations(
        Lambda=-2.0 * stats.neg_half_Lambda,
        Xt_Lambda=stats.Xt_Lambda,
        Xt_Lambda_X=-2.0 * stats.neg_half_Xt_Lambda_X,
        logdet_Lambda=2.0 * stats.half_logdet_Lambda,
    )


def mniw_kl(q: MNIWNatural, p: MNIWNatural) -> Array:
    """``KL(q || p) = <eta_q - eta_p, E_q t> - A(eta_q) + A(eta_p)``, shape ``[...]``."""
    diff = MNIWNatural(*(a - b for a, b in zip(q, p, strict=True)))
    return (
        _event_dot(diff, mniw_expected_stats(q))
        - mniw_log_normalizer(q)
        + mniw_log_normalizer(p)
    )


def mniw_entropy(natural: MNIWNatural) -> Array:
    """Differential entropy ``[...]`` of the density over ``(X, Q = Lambda^-1)`` (Lebesgue
    measure on ``X`` and the ``D (D + 1) / 2`` free entries of ``Q``)."""
    return mniw_log_normalizer(natural) - _event_dot(natural, mniw_expected_stats(natural))


def mniw_sample(
    key: Array, natural: MNIWNatural, sample_shape: tuple[int, ...] = ()
) -> MNIWSample:
    """Draw ``(X, Lambda)`` by the Bartlett decomposition, without explicit inverses.

    ``Lambda = C C'`` with ``C = L_S^-T B``; ``X = M + L_S B^-T E L_V^-1`` with ``E`` standard
    normal ``[D, Din]`` (rows covariance ``Lambda^-1``, columns covariance ``V^-1``).
    Separate keys are used for the Wishart and the Gaussian parts.

    Parameters
    ----------
    key : Array
        PRNG key (typed or raw).
    natural : MNIWNatural
        Batch shape ``[...]`` (e.g. ``[K]``).
    sample_shape : tuple of int
        Leading sample shape.

    Returns
    -------
    MNIWSample
        ``X [*sample_shape, ..., D, Din]``, ``Lambda [*sample_shape, ..., D, D]``.
    """
    w_key, n_key = jax.random.split(key)
    S, M, V, nu = mniw_to_standard(natural)
    D, Din = S.shape[-1], V.shape[-1]
    shape = tuple(sample_shape) + jnp.shape(nu)
    L_S = jnp.broadcast_to(psd_cholesky(S), (*shape, D, D))
    L_V = jnp.broadcast_to(psd_cholesky(V), (*shape, Din, Din))
    B = _bartlett(w_key, nu, D, shape, S.dtype)
    C = solve_triangular(L_S, B, lower=True, trans="T")
    Lam = C @ _mT(C)
    E = jax.random.normal(n_key, (*shape, D, Din), dtype=S.dtype)
    Y = _mT(solve_triangular(L_V, _mT(E), lower=True, trans="T"))  # E L_V^-1
    X = M + L_S @ solve_triangular(B, Y, lower=True, trans="T")
    return MNIWSample(X=X, Lambda=Lam)


# ----------------------------------------------------------------------------------------
# unconstrained coordinates
# ----------------------------------------------------------------------------------------


def _mniw_u_to_eta(u: MNIWUnconstrained, jitter_S: float, jitter_V: float,
                   dof_eps: float) -> MNIWNatural:
    D, Din = u.S_raw.shape[-1], u.V_raw.shape[-1]
    S = pd_from_unconstrained(u.S_raw, jitter_S)
    V = pd_from_unconstrained(u.V_raw, jitter_V)
    nu = jax.nn.softplus(u.nu_raw) + (D - 1 + dof_eps)
    VMt = V @ _mT(u.M)
    return MNIWNatural(S + u.M @ VMt, VMt, V, nu + D + Din + 1)


def _mniw_eta_to_u(eta: MNIWNatural, jitter_S: float, jitter_V: float,
                   dof_eps: float) -> MNIWUnconstrained:
    S, M, V, nu = mniw_to_standard(eta)
    D = S.shape[-1]
    return MNIWUnconstrained(
        S_raw=pd_to_unconstrained(S, jitter_S),
        M=M,
        V_raw=pd_to_unconstrained(V, jitter_V),
        nu_raw=softplus_inverse(nu - (D - 1 + dof_eps)),
    )


def mniw_from_unconstrained(
    u: MNIWUnconstrained,
    *,
    natgrad: bool = True,
    jitter_S: float = 1e-3,
    jitter_V: float = 1e-3,
    dof_eps: float = 1e-6,
) -> MNIWNatural:
    """Map unconstrained coordinates to valid natural parameters.

    ``S``, ``V``: lower-Cholesky with softplus diagonal plus a ridge (research code: 1e-3
    each); ``nu = softplus(nu_raw) + D - 1 + dof_eps``; ``M`` free.

    Parameters
    ----------
    u : MNIWUnconstrained
    natgrad : bool
        If True (default) the VJP returns the natural gradient in ``u``; if False, the plain
        Euclidean gradient.  The value is the same.
    jitter_S, jitter_V, dof_eps : float

    Returns
    -------
    MNIWNatural
    """
    fwd = lambda v: _mniw_u_to_eta(v, jitter_S, jitter_V, dof_eps)
    if not natgrad:
        return fwd(u)
    inv = lambda e: _mniw_eta_to_u(e, jitter_S, jitter_V, dof_eps)
    return natgrad_map(fwd, inv, MNIWNatural(True, False, True, False))(u)


def mniw_to_unconstrained(
    natural: MNIWNatural, *, jitter_S: float = 1e-3, jitter_V: float = 1e-3,
    dof_eps: float = 1e-6,
) -> MNIWUnconstrained:
    """Inverse of :func:`mniw_from_unconstrained` (needs ``S - jitter_S I`` and
    ``V - jitter_V I`` PD).  The strict upper triangles of the raw matrices are zero."""
    return _mniw_eta_to_u(natural, jitter_S, jitter_V, dof_eps)

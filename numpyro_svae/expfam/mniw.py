"""Matrix-normal-inverse-Wishart family on (X, Lambda): the prior of each regime's dynamics.

``Lambda ~ Wishart(nu, S^-1)`` (``Q = Lambda^-1 ~ InvWishart(nu, S)``) and, given ``Lambda``,
``X ~ MatrixNormal(M, rows: Lambda^-1, columns: V^-1)``, i.e.
``p(X | Lambda) ∝ exp(-1/2 tr[V (X - M)' Lambda (X - M)])``.  ``X = [A | b]`` is ``[D, Din]``
with ``Din = D + 1`` when the dynamics carry a bias and ``D`` without; ``V`` is a *precision*
on the ``Din`` columns.  With the statistic

    t(X, Lambda) = (-Lambda / 2,  X' Lambda,  -X' Lambda X / 2,  log|Lambda| / 2)

the natural parameters are ``(S + M V M',  V M',  V,  nu + D + Din + 1)`` and

    A(eta) = nu/2 (D log 2 - log|S|) + log Gamma_D(nu/2) - D/2 log|V| + D Din/2 log 2 pi

(density w.r.t. Lebesgue measure on ``(X, Q)``; docs/math.md §2).  Every function
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
    psd_cholesky_ridged,
    symmetrize,
)
from numpyro_svae.expfam.natgrad import (
    _check_pd,
    _check_positive,
    _check_square,
    natgrad_map,
    natgrad_terms,
    natural_retract,
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
    "mniw_log_normalizer_standard",
    "mniw_expected_stats_standard",
    "mniw_kl_standard",
    "mniw_qtheta_terms",
    "mniw_natural_step",
    "mniw_retract",
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
    return mniw_log_normalizer_standard(mniw_to_standard(natural))


def mniw_log_normalizer_standard(standard: MNIWStandard) -> Array:
    """``A(eta)`` ``[...]`` evaluated from standard parameters (no natural -> standard step)."""
    S, _, V, nu = standard
    D, Din = S.shape[-1], V.shape[-1]
    return (
        0.5 * nu * (D * jnp.log(2.0) - chol_logdet(psd_cholesky_ridged(S)))
        + multigammaln(0.5 * nu, D)
        - 0.5 * D * chol_logdet(psd_cholesky_ridged(V))
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
    return mniw_expected_stats_standard(mniw_to_standard(natural))


def mniw_expected_stats_standard(standard: MNIWStandard) -> MNIWStats:
    """:func:`mniw_expected_stats` evaluated from standard parameters."""
    S, M, V, nu = standard
    D, Din = S.shape[-1], V.shape[-1]
    L_S, L_V = psd_cholesky_ridged(S), psd_cholesky_ridged(V)
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


def mniw_kl_standard(q: MNIWStandard, p: MNIWStandard) -> Array:
    """``KL(q || p)`` ``[...]`` from standard parameters, without cancellation.

    Expanding ``<eta_q - eta_p, E_q t>``, the terms in ``M_q V_q M_q'`` cancel exactly, leaving
    ``-tr((S_q - S_p) E L) / 2 + tr(dM V_p dM' E L) / 2 - D (Din - tr(V_p V_q^-1)) / 2
    + (nu_q - nu_p) E log|L| / 2 - A_q + A_p`` with ``dM = M_q - M_p``, ``E L = nu_q S_q^-1``.
    """
    S, M, V, nu = q
    D, Din = S.shape[-1], V.shape[-1]
    L_S, L_V = psd_cholesky_ridged(S), psd_cholesky_ridged(V)
    eye_D = jnp.broadcast_to(jnp.eye(D, dtype=S.dtype), S.shape)
    E_L = symmetrize(nu[..., None, None] * cho_solve((L_S, True), eye_D))
    dM = M - p.M
    E_logdet = multidigamma(0.5 * nu, D) + D * jnp.log(2.0) - chol_logdet(L_S)
    tr = lambda a, b: jnp.sum(a * _mT(b), axis=(-2, -1))  # tr(a b)
    return (
        -0.5 * tr(S - p.S, E_L)
        + 0.5 * tr(dM @ p.V @ _mT(dM), E_L)
        - 0.5 * D * (Din - jnp.trace(cho_solve((L_V, True), p.V), axis1=-2, axis2=-1))
        + 0.5 * (nu - p.nu) * E_logdet
        - mniw_log_normalizer_standard(q)
        + mniw_log_normalizer_standard(p)
    )


def _mniw_natural_tangent(std: MNIWStandard, g: MNIWNatural) -> MNIWStandard:
    """``(d std / d eta) g``: the tangent of natural -> standard, from standard parameters.

    ``M' = V^-1 eta2`` and ``S = eta1 - eta2' V^-1 eta2`` give ``dV = g3``,
    ``dM' = V^-1 (g2 - g3 M')``, ``dS = g1 - g2' M' - M g2 + M g3 M'``, ``dnu = g4``."""
    g1, g2, g3, g4 = symmetrize(g[0]), g[1], symmetrize(g[2]), g[3]
    S, M, V, _ = std
    Mt = _mT(M)
    dMt = cho_solve((psd_cholesky_ridged(V), True), g2 - g3 @ Mt)
    MG2 = M @ g2
    dS = symmetrize(g1 - _mT(MG2) - MG2 + M @ g3 @ Mt)
    return MNIWStandard(S=dS, M=_mT(dMt), V=g3, nu=g4)


def _mniw_kl_direction(q: MNIWStandard, p: MNIWStandard) -> MNIWStandard:
    """``(d std / d eta)(eta_q - eta_p)`` in closed form: ``dS = S_q - S_p - dM V_p dM'``,
    ``dM = dM V_p V_q^-1``, ``dV = V_q - V_p``, ``dnu = nu_q - nu_p`` (``dM = M_q - M_p``)."""
    dM = q.M - p.M
    dMt = cho_solve((psd_cholesky_ridged(q.V), True), p.V @ _mT(dM))
    dS = symmetrize(q.S - p.S - dM @ p.V @ _mT(dM))
    return MNIWStandard(S=dS, M=_mT(dMt), V=q.V - p.V, nu=q.nu - p.nu)


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


def _mniw_u_to_std(u: MNIWUnconstrained, jitter_S: float, jitter_V: float,
                   dof_eps: float) -> MNIWStandard:
    D = u.S_raw.shape[-1]
    S = pd_from_unconstrained(u.S_raw, jitter_S)
    V = pd_from_unconstrained(u.V_raw, jitter_V)
    nu = jax.nn.softplus(u.nu_raw) + (D - 1 + dof_eps)
    return MNIWStandard(S, u.M, V, nu)


def _mniw_std_to_u(std: MNIWStandard, jitter_S: float, jitter_V: float,
                   dof_eps: float) -> MNIWUnconstrained:
    S, M, V, nu = std
    D = S.shape[-1]
    return MNIWUnconstrained(
        S_raw=pd_to_unconstrained(S, jitter_S),
        M=M,
        V_raw=pd_to_unconstrained(V, jitter_V),
        nu_raw=softplus_inverse(nu - (D - 1 + dof_eps)),
    )


def _std_to_eta(std: MNIWStandard) -> MNIWNatural:
    S, M, V, nu = std
    D, Din = S.shape[-1], V.shape[-1]
    VMt = V @ _mT(M)
    return MNIWNatural(S + M @ VMt, VMt, V, nu + D + Din + 1)


def _mniw_u_to_eta(u: MNIWUnconstrained, jitter_S: float, jitter_V: float,
                   dof_eps: float) -> MNIWNatural:
    return _std_to_eta(_mniw_u_to_std(u, jitter_S, jitter_V, dof_eps))


def _mniw_eta_to_u(eta: MNIWNatural, jitter_S: float, jitter_V: float,
                   dof_eps: float) -> MNIWUnconstrained:
    return _mniw_std_to_u(mniw_to_standard(eta), jitter_S, jitter_V, dof_eps)


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
    params: MNIWNatural | MNIWStandard, *, jitter_S: float = 1e-3, jitter_V: float = 1e-3,
    dof_eps: float = 1e-6,
) -> MNIWUnconstrained:
    """Inverse of :func:`mniw_from_unconstrained` (needs ``S - jitter_S I`` and
    ``V - jitter_V I`` PD).  The strict upper triangles of the raw matrices are zero.

    Accepts natural or standard parameters; standard input skips the natural -> standard
    step (which loses ``S`` in float32 when ``M V M'`` dwarfs it)."""
    if isinstance(params, MNIWStandard):
        return _mniw_std_to_u(params, jitter_S, jitter_V, dof_eps)
    return _mniw_eta_to_u(params, jitter_S, jitter_V, dof_eps)


def mniw_qtheta_terms(
    u: MNIWUnconstrained,
    prior: MNIWStandard,
    *,
    natgrad: bool = True,
    jitter_S: float = 1e-3,
    jitter_V: float = 1e-3,
    dof_eps: float = 1e-6,
) -> tuple[MNIWStandard, MNIWStats, Array]:
    """Standard parameters, ``E[t]`` and ``KL(q || prior)`` of an MNIW q(theta) factor.

    The float32-safe replacement of ``mniw_from_unconstrained`` + ``straight_through`` +
    ``prior_kl_natgrad_form``: everything is computed from the standard parameters that the
    unconstrained map produces (see :func:`numpyro_svae.expfam.natgrad.natgrad_terms`), with
    the same natural-gradient VJP when ``natgrad``.

    Parameters
    ----------
    u : MNIWUnconstrained
        Batch shape ``[...]`` (``[K]`` regimes).
    prior : MNIWStandard
        Prior, broadcastable to ``u``'s batch shape.
    natgrad, jitter_S, jitter_V, dof_eps
        As in :func:`mniw_from_unconstrained`.

    Returns
    -------
    tuple
        ``(MNIWStandard, MNIWStats, kl [])`` with the KL summed over the batch.
    """
    shapes = (u.S_raw.shape, u.M.shape, u.V_raw.shape, u.nu_raw.shape)
    prior = MNIWStandard(*(jnp.broadcast_to(jnp.asarray(a, u.M.dtype), b)
                           for a, b in zip(prior, shapes, strict=True)))
    return natgrad_terms(
        u, prior,
        to_standard=lambda v: _mniw_u_to_std(v, jitter_S, jitter_V, dof_eps),
        to_unconstrained=lambda s: _mniw_std_to_u(s, jitter_S, jitter_V, dof_eps),
        expected_stats=mniw_expected_stats_standard,
        kl=lambda q, p: jnp.sum(mniw_kl_standard(q, p)),
        natural_tangent=_mniw_natural_tangent,
        kl_direction=_mniw_kl_direction,
        natgrad=natgrad,
    )


def mniw_natural_step(std: MNIWStandard, dstd: MNIWStandard) -> MNIWStandard:
    """Standard parameters of ``eta(std) + d eta(std)[dstd]`` (an exact natural-coordinate
    step along a tangent given in standard coordinates), free of cancellation.

    With ``V' = V + dV`` the step is ``M' = M + dM V V'^-1`` and
    ``S' = S + dS - dM V V'^-1 V dM'``, ``nu' = nu + dnu``: the ``M V M'`` parts of
    ``eta1 = S + M V M'`` cancel in closed form, so nothing of size ``|M|^2 |V|`` is ever
    subtracted (float32 loses ``S`` when it is).  Outside the domain (``V'`` not PD) the
    result is non-finite.

    Parameters
    ----------
    std, dstd : MNIWStandard
        Point and tangent (``S, dS [..., D, D]``, ``M, dM [..., D, Din]``,
        ``V, dV [..., Din, Din]``, ``nu, dnu [...]``).

    Returns
    -------
    MNIWStandard
    """
    S, M, V, nu = std
    dS, dM, dV, dnu = dstd
    V_new = symmetrize(V + dV)
    L = psd_cholesky(V_new)
    Y = dM @ V  # [..., D, Din]
    M_new = M + _mT(cho_solve((L, True), _mT(Y)))
    W = solve_triangular(L, _mT(Y), lower=True)  # L^-1 Y'  [..., Din, D]
    S_new = symmetrize(S + dS - _mT(W) @ W)
    return MNIWStandard(S_new, M_new, V_new, nu + dnu)


def mniw_retract(
    u: MNIWUnconstrained,
    du: MNIWUnconstrained,
    *,
    jitter_S: float = 1e-3,
    jitter_V: float = 1e-3,
    dof_eps: float = 1e-6,
    max_halvings: int = 8,
    guarded: bool = False,
) -> tuple[MNIWUnconstrained, Array]:
    """Exact natural-coordinate version of the SGD step ``u + du`` (see
    :func:`numpyro_svae.expfam.natgrad.natural_retract`); the ridges must be those of the
    map the parameters were made with.  Returns ``(u_new, t [...])``."""
    return natural_retract(
        u, du,
        to_standard=lambda v: _mniw_u_to_std(v, jitter_S, jitter_V, dof_eps),
        to_unconstrained=lambda s: _mniw_std_to_u(s, jitter_S, jitter_V, dof_eps),
        natural_step=mniw_natural_step,
        batch_ndim=jnp.ndim(u.nu_raw),
        max_halvings=max_halvings,
        guarded=guarded,
    )

"""Normal-inverse-Wishart family on (mu, tau): the prior of the SLDS initial state.

``tau ~ Wishart(nu, S^-1)`` (so ``Sigma = tau^-1 ~ InvWishart(nu, S)``) and
``mu | tau ~ N(m, (lam tau)^-1)``.  With the statistic

    t(mu, tau) = (-tau / 2,  tau mu,  -mu' tau mu / 2,  log|tau| / 2)

the natural parameters are ``(S + lam m m',  lam m,  lam,  nu + D + 2)`` and

    A(eta) = nu/2 (D log 2 - log|S|) + log Gamma_D(nu/2) - D/2 log lam + D/2 log 2 pi,

which is the density with respect to Lebesgue measure on ``(mu, Sigma)`` (Johnson et al.'s
base measure, docs/math.md §2; the ``+ D + 2`` in ``eta4`` is the Jacobian of
``tau -> Sigma``).  ``grad A(eta) = E[t]`` exactly; a float64 test proves it.

Every function broadcasts over leading batch axes ``[...]``.
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

Array = jax.Array

__all__ = [
    "NIWStandard",
    "NIWNatural",
    "NIWStats",
    "NIWUnconstrained",
    "NIWSample",
    "NIWExpectations",
    "niw_to_natural",
    "niw_to_standard",
    "niw_log_normalizer",
    "niw_expected_stats",
    "niw_expectations",
    "niw_kl",
    "niw_entropy",
    "niw_sample",
    "niw_from_unconstrained",
    "niw_to_unconstrained",
    "niw_log_normalizer_standard",
    "niw_expected_stats_standard",
    "niw_kl_standard",
    "niw_qtheta_terms",
    "niw_natural_step",
    "niw_retract",
]


class NIWStandard(NamedTuple):
    """Standard NIW parameters (``tau ~ W(nu, S^-1)``, ``mu | tau ~ N(m, (lam tau)^-1)``)."""

    S: Array    # [..., D, D] inverse-Wishart scale (PD)
    m: Array    # [..., D]    mean of mu
    lam: Array  # [...]       precision scale of mu (> 0)
    nu: Array   # [...]       degrees of freedom (> D - 1)


class NIWNatural(NamedTuple):
    """Natural parameters, paired with ``NIWStats`` slot by slot."""

    eta1: Array  # [..., D, D] S + lam m m'
    eta2: Array  # [..., D]    lam m
    eta3: Array  # [...]       lam
    eta4: Array  # [...]       nu + D + 2


class NIWStats(NamedTuple):
    """Sufficient statistics (or their expectations, = grad A)."""

    neg_half_tau: Array        # [..., D, D] -tau / 2
    tau_mu: Array              # [..., D]    tau mu
    neg_half_mu_tau_mu: Array  # [...]       -mu' tau mu / 2
    half_logdet_tau: Array     # [...]       log|tau| / 2


class NIWExpectations(NamedTuple):
    """Expected potentials for the initial-state Gaussian (the stats fields, rescaled)."""

    tau: Array        # [..., D, D] E[tau]
    tau_mu: Array     # [..., D]    E[tau mu]
    mu_tau_mu: Array  # [...]       E[mu' tau mu]
    logdet_tau: Array  # [...]      E[log|tau|]


class NIWUnconstrained(NamedTuple):
    """Unconstrained coordinates of an NIW (see :func:`niw_from_unconstrained`)."""

    S_raw: Array   # [..., D, D] lower triangle used: S = L L' + jitter I, softplus diagonal
    m: Array       # [..., D]
    lam_raw: Array  # [...]      lam = softplus(lam_raw)
    nu_raw: Array  # [...]       nu = softplus(nu_raw) + D - 1 + dof_eps


class NIWSample(NamedTuple):
    """One draw (or a batch of draws) of ``(mu, tau)``."""

    mu: Array   # [..., D]
    tau: Array  # [..., D, D] precision


def _event_dot(a: NIWStats | NIWNatural, b: NIWStats | NIWNatural) -> Array:
    return (
        jnp.sum(a[0] * b[0], axis=(-2, -1))
        + jnp.sum(a[1] * b[1], axis=-1)
        + a[2] * b[2]
        + a[3] * b[3]
    )


def niw_to_natural(standard: NIWStandard) -> NIWNatural:
    """Standard -> natural parameters.

    Parameters
    ----------
    standard : NIWStandard
        ``S [..., D, D]`` PD, ``m [..., D]``, ``lam [...] > 0``, ``nu [...] > D - 1``.

    Returns
    -------
    NIWNatural

    Raises
    ------
    ValueError
        Shape mismatch, or (on concrete arrays) non-PD ``S``, ``lam <= 0``, ``nu <= D - 1``.
    """
    S, m, lam, nu = (jnp.asarray(x) for x in standard)
    _check_square("S", S)
    D = S.shape[-1]
    if m.shape[-1:] != (D,):
        raise ValueError(f"`m` must have shape [..., {D}] to match `S`; got {list(m.shape)}.")
    _check_pd("S", S)
    _check_positive("lam", lam)
    _check_positive("nu", nu, lower=D - 1)
    lam_ = lam[..., None]
    return NIWNatural(
        eta1=S + lam_[..., None] * m[..., :, None] * m[..., None, :],
        eta2=lam_ * m,
        eta3=lam,
        eta4=nu + D + 2,
    )


def niw_to_standard(natural: NIWNatural) -> NIWStandard:
    """Natural -> standard parameters (inverse of :func:`niw_to_natural`)."""
    eta1, eta2, eta3, eta4 = natural
    D = eta1.shape[-1]
    m = eta2 / eta3[..., None]
    S = eta1 - eta3[..., None, None] * m[..., :, None] * m[..., None, :]
    return NIWStandard(S=S, m=m, lam=eta3, nu=eta4 - D - 2)


def niw_log_normalizer(natural: NIWNatural) -> Array:
    """Log-normaliser ``A(eta)`` ``[...]`` (see the module docstring for the formula)."""
    return niw_log_normalizer_standard(niw_to_standard(natural))


def niw_log_normalizer_standard(standard: NIWStandard) -> Array:
    """``A(eta)`` ``[...]`` evaluated from standard parameters."""
    S, _, lam, nu = standard
    D = S.shape[-1]
    logdet_S = chol_logdet(psd_cholesky_ridged(S))
    return (
        0.5 * nu * (D * jnp.log(2.0) - logdet_S)
        + multigammaln(0.5 * nu, D)
        - 0.5 * D * jnp.log(lam)
        + 0.5 * D * LOG_2PI
    )


def niw_expected_stats(natural: NIWNatural) -> NIWStats:
    """Closed-form ``E[t] = grad A(eta)``.

    ``E[tau] = nu S^-1``, ``E[tau mu] = E[tau] m``, ``E[mu' tau mu] = D / lam + m' E[tau] m``,
    ``E log|tau| = sum_i psi((nu - i) / 2) + D log 2 - log|S|``.

    Returns
    -------
    NIWStats
    """
    return niw_expected_stats_standard(niw_to_standard(natural))


def niw_expected_stats_standard(standard: NIWStandard) -> NIWStats:
    """:func:`niw_expected_stats` evaluated from standard parameters."""
    S, m, lam, nu = standard
    D = S.shape[-1]
    L = psd_cholesky_ridged(S)
    eye = jnp.broadcast_to(jnp.eye(D, dtype=S.dtype), S.shape)
    E_tau = nu[..., None, None] * cho_solve((L, True), eye)
    E_tau = 0.5 * (E_tau + jnp.swapaxes(E_tau, -1, -2))
    E_tau_mu = jnp.einsum("...ij,...j->...i", E_tau, m)
    E_mu_tau_mu = D / lam + jnp.einsum("...i,...i->...", m, E_tau_mu)
    E_logdet = multidigamma(0.5 * nu, D) + D * jnp.log(2.0) - chol_logdet(L)
    return NIWStats(-0.5 * E_tau, E_tau_mu, -0.5 * E_mu_tau_mu, 0.5 * E_logdet)


def niw_expectations(stats: NIWStats) -> NIWExpectations:
    """Rescale expected statistics to ``E[tau], E[tau mu], E[mu' tau mu], E log|tau|``.

    Linear, so it may be applied to straight-through statistics.
    """
    return NIWExpectations(
        tau=-2.0 * stats.neg_half_tau,
        tau_mu=stats.tau_mu,
        mu_tau_mu=-2.0 * stats.neg_half_mu_tau_mu,
        logdet_tau=2.0 * stats.half_logdet_tau,
    )


def niw_kl(q: NIWNatural, p: NIWNatural) -> Array:
    """``KL(q || p) = <eta_q - eta_p, E_q t> - A(eta_q) + A(eta_p)``, shape ``[...]``."""
    diff = NIWNatural(*(a - b for a, b in zip(q, p, strict=True)))
    return _event_dot(diff, niw_expected_stats(q)) - niw_log_normalizer(q) + niw_log_normalizer(p)


def niw_kl_standard(q: NIWStandard, p: NIWStandard) -> Array:
    """``KL(q || p)`` ``[...]`` from standard parameters, without cancellation (the MNIW
    formula with ``Din = 1``, ``V = lam``): ``-tr((S_q - S_p) E tau) / 2
    + lam_p dm' E tau dm / 2 - D (1 - lam_p / lam_q) / 2 + (nu_q - nu_p) E log|tau| / 2
    - A_q + A_p``."""
    S, m, lam, nu = q
    D = S.shape[-1]
    L = psd_cholesky_ridged(S)
    eye = jnp.broadcast_to(jnp.eye(D, dtype=S.dtype), S.shape)
    E_tau = symmetrize(nu[..., None, None] * cho_solve((L, True), eye))
    dm = m - p.m
    E_logdet = multidigamma(0.5 * nu, D) + D * jnp.log(2.0) - chol_logdet(L)
    return (
        -0.5 * jnp.sum((S - p.S) * E_tau, axis=(-2, -1))
        + 0.5 * p.lam * jnp.einsum("...i,...ij,...j->...", dm, E_tau, dm)
        - 0.5 * D * (1.0 - p.lam / lam)
        + 0.5 * (nu - p.nu) * E_logdet
        - niw_log_normalizer_standard(q)
        + niw_log_normalizer_standard(p)
    )


def _niw_natural_tangent(std: NIWStandard, g: NIWNatural) -> NIWStandard:
    """``(d std / d eta) g`` from standard parameters: ``dlam = g3``,
    ``dm = (g2 - g3 m) / lam``, ``dS = g1 - g2 m' - m g2' + g3 m m'``, ``dnu = g4``."""
    g1, g2, g3, g4 = symmetrize(g[0]), g[1], g[2], g[3]
    _, m, lam, _ = std
    outer = lambda a, b: a[..., :, None] * b[..., None, :]
    dS = g1 - outer(g2, m) - outer(m, g2) + g3[..., None, None] * outer(m, m)
    return NIWStandard(S=dS, m=(g2 - g3[..., None] * m) / lam[..., None], lam=g3, nu=g4)


def _niw_kl_direction(q: NIWStandard, p: NIWStandard) -> NIWStandard:
    """``(d std / d eta)(eta_q - eta_p)``: ``dS = S_q - S_p - lam_p dm dm'``,
    ``dm = (lam_p / lam_q) dm``, ``dlam = lam_q - lam_p``, ``dnu = nu_q - nu_p``."""
    dm = q.m - p.m
    dS = q.S - p.S - p.lam[..., None, None] * dm[..., :, None] * dm[..., None, :]
    return NIWStandard(S=dS, m=(p.lam / q.lam)[..., None] * dm, lam=q.lam - p.lam,
                       nu=q.nu - p.nu)


def niw_entropy(natural: NIWNatural) -> Array:
    """Differential entropy ``[...]`` of the density over ``(mu, Sigma)`` (Lebesgue measure on
    ``mu`` and the ``D (D + 1) / 2`` free entries of ``Sigma = tau^-1``)."""
    return niw_log_normalizer(natural) - _event_dot(natural, niw_expected_stats(natural))


def _bartlett(key: Array, nu: Array, D: int, shape: tuple[int, ...], dtype) -> Array:
    """Lower Bartlett factor ``B`` with ``B B' ~ Wishart(nu, I_D)``; ``nu`` broadcast to shape.

    Returns ``[*shape, D, D]``: ``B_ii = sqrt(chi2(nu - i))``, ``B_ij ~ N(0, 1)`` below.
    """
    chi_key, norm_key = jax.random.split(key)
    df = jnp.broadcast_to(nu, shape)[..., None] - jnp.arange(D, dtype=dtype)
    diag = jnp.sqrt(2.0 * jax.random.gamma(chi_key, 0.5 * df, dtype=dtype))
    z = jax.random.normal(norm_key, (*shape, D, D), dtype=dtype)
    return jnp.tril(z, -1) + diag[..., None] * jnp.eye(D, dtype=dtype)


def niw_sample(key: Array, natural: NIWNatural, sample_shape: tuple[int, ...] = ()) -> NIWSample:
    """Draw ``(mu, tau)`` by the Bartlett decomposition, without explicit inverses.

    ``tau = C C'`` with ``C = L_S^-T B`` (``S = L_S L_S'``, ``B`` Bartlett), and
    ``mu = m + L_S B^-T eps / sqrt(lam)`` (covariance ``(lam tau)^-1``).  Separate keys are
    used for the Wishart and the Gaussian parts.

    Parameters
    ----------
    key : Array
        PRNG key (typed or raw).
    natural : NIWNatural
        Batch shape ``[...]``.
    sample_shape : tuple of int
        Leading sample shape.

    Returns
    -------
    NIWSample
        ``mu [*sample_shape, ..., D]``, ``tau [*sample_shape, ..., D, D]``.
    """
    w_key, n_key = jax.random.split(key)
    S, m, lam, nu = niw_to_standard(natural)
    D = S.shape[-1]
    shape = tuple(sample_shape) + jnp.shape(nu)
    L_S = jnp.broadcast_to(psd_cholesky(S), (*shape, D, D))
    B = _bartlett(w_key, nu, D, shape, S.dtype)
    C = solve_triangular(L_S, B, lower=True, trans="T")
    tau = C @ jnp.swapaxes(C, -1, -2)
    eps = jax.random.normal(n_key, (*shape, D), dtype=S.dtype)
    w = solve_triangular(B, eps[..., None], lower=True, trans="T")
    mu = m + (L_S @ w)[..., 0] / jnp.sqrt(lam)[..., None]
    return NIWSample(mu=mu, tau=tau)


# ----------------------------------------------------------------------------------------
# unconstrained coordinates
# ----------------------------------------------------------------------------------------


def _niw_u_to_std(u: NIWUnconstrained, jitter: float, dof_eps: float) -> NIWStandard:
    D = u.S_raw.shape[-1]
    S = pd_from_unconstrained(u.S_raw, jitter)
    lam = jax.nn.softplus(u.lam_raw)
    nu = jax.nn.softplus(u.nu_raw) + (D - 1 + dof_eps)
    return NIWStandard(S, u.m, lam, nu)


def _niw_std_to_u(std: NIWStandard, jitter: float, dof_eps: float) -> NIWUnconstrained:
    S, m, lam, nu = std
    D = S.shape[-1]
    return NIWUnconstrained(
        S_raw=pd_to_unconstrained(S, jitter),
        m=m,
        lam_raw=softplus_inverse(lam),
        nu_raw=softplus_inverse(nu - (D - 1 + dof_eps)),
    )


def _niw_u_to_eta(u: NIWUnconstrained, jitter: float, dof_eps: float) -> NIWNatural:
    S, m, lam, nu = _niw_u_to_std(u, jitter, dof_eps)
    D = S.shape[-1]
    lam_ = lam[..., None]
    return NIWNatural(S + lam_[..., None] * m[..., :, None] * m[..., None, :],
                      lam_ * m, lam, nu + D + 2)


def _niw_eta_to_u(eta: NIWNatural, jitter: float, dof_eps: float) -> NIWUnconstrained:
    return _niw_std_to_u(niw_to_standard(eta), jitter, dof_eps)


def niw_from_unconstrained(
    u: NIWUnconstrained, *, natgrad: bool = True, jitter: float = 1e-6, dof_eps: float = 1e-6
) -> NIWNatural:
    """Map unconstrained coordinates to valid natural parameters.

    ``S = L L' + jitter I`` (lower-Cholesky ``L`` with softplus diagonal, from ``S_raw``),
    ``lam = softplus(lam_raw)``, ``nu = softplus(nu_raw) + D - 1 + dof_eps``, ``m`` free.

    Parameters
    ----------
    u : NIWUnconstrained
    natgrad : bool
        If True (default) the VJP returns the natural gradient in ``u`` (the cotangent on
        ``eta`` mapped by the Jacobian of :func:`niw_to_unconstrained`); if False, the plain
        Euclidean gradient.  The value is the same.
    jitter, dof_eps : float
        Ridge on ``S`` (research code: 1e-6) and margin of ``nu`` above ``D - 1``.

    Returns
    -------
    NIWNatural
    """
    fwd = lambda v: _niw_u_to_eta(v, jitter, dof_eps)
    if not natgrad:
        return fwd(u)
    inv = lambda e: _niw_eta_to_u(e, jitter, dof_eps)
    return natgrad_map(fwd, inv, NIWNatural(True, False, False, False))(u)


def niw_to_unconstrained(
    params: NIWNatural | NIWStandard, *, jitter: float = 1e-6, dof_eps: float = 1e-6
) -> NIWUnconstrained:
    """Inverse of :func:`niw_from_unconstrained` (needs ``S - jitter I`` PD and
    ``nu > D - 1 + dof_eps``).  The strict upper triangle of ``S_raw`` is zero.  Accepts
    natural or standard parameters."""
    if isinstance(params, NIWStandard):
        return _niw_std_to_u(params, jitter, dof_eps)
    return _niw_eta_to_u(params, jitter, dof_eps)


def niw_qtheta_terms(
    u: NIWUnconstrained,
    prior: NIWStandard,
    *,
    natgrad: bool = True,
    jitter: float = 1e-6,
    dof_eps: float = 1e-6,
) -> tuple[NIWStandard, NIWStats, Array]:
    """Standard parameters, ``E[t]`` and ``KL(q || prior)`` of an NIW q(theta) factor,
    computed from standard parameters (float32-safe; see
    :func:`numpyro_svae.expfam.mniw.mniw_qtheta_terms`).

    Returns
    -------
    tuple
        ``(NIWStandard, NIWStats, kl [])`` with the KL summed over any batch axes.
    """
    shapes = (u.S_raw.shape, u.m.shape, u.lam_raw.shape, u.nu_raw.shape)
    prior = NIWStandard(*(jnp.broadcast_to(jnp.asarray(a, u.m.dtype), b)
                          for a, b in zip(prior, shapes, strict=True)))
    return natgrad_terms(
        u, prior,
        to_standard=lambda v: _niw_u_to_std(v, jitter, dof_eps),
        to_unconstrained=lambda s: _niw_std_to_u(s, jitter, dof_eps),
        expected_stats=niw_expected_stats_standard,
        kl=lambda q, p: jnp.sum(niw_kl_standard(q, p)),
        natural_tangent=_niw_natural_tangent,
        kl_direction=_niw_kl_direction,
        natgrad=natgrad,
    )


def niw_natural_step(std: NIWStandard, dstd: NIWStandard) -> NIWStandard:
    """Standard parameters of ``eta(std) + d eta(std)[dstd]``, free of cancellation.

    With ``lam' = lam + dlam``: ``m' = m + (lam / lam') dm``,
    ``S' = S + dS - (lam^2 / lam') dm dm'``, ``nu' = nu + dnu`` (the ``lam m m'`` parts of
    ``eta1 = S + lam m m'`` cancel in closed form).  Non-finite or invalid outside the domain
    (``lam' <= 0`` is caught by the inverse map).

    Parameters
    ----------
    std, dstd : NIWStandard
        Point and tangent (``S [..., D, D]``, ``m [..., D]``, ``lam [...]``, ``nu [...]``).

    Returns
    -------
    NIWStandard
    """
    S, m, lam, nu = std
    dS, dm, dlam, dnu = dstd
    lam_new = lam + dlam
    r = lam / lam_new
    m_new = m + r[..., None] * dm
    outer = dm[..., :, None] * dm[..., None, :]
    S_new = symmetrize(S + dS - (lam * r)[..., None, None] * outer)
    return NIWStandard(S_new, m_new, lam_new, nu + dnu)


def niw_retract(
    u: NIWUnconstrained,
    du: NIWUnconstrained,
    *,
    jitter: float = 1e-6,
    dof_eps: float = 1e-6,
    max_halvings: int = 8,
    guarded: bool = False,
) -> tuple[NIWUnconstrained, Array]:
    """Exact natural-coordinate version of the SGD step ``u + du`` (see
    :func:`numpyro_svae.expfam.natgrad.natural_retract`).  Returns ``(u_new, t [...])``."""
    return natural_retract(
        u, du,
        to_standard=lambda v: _niw_u_to_std(v, jitter, dof_eps),
        to_unconstrained=lambda s: _niw_std_to_u(s, jitter, dof_eps),
        natural_step=niw_natural_step,
        batch_ndim=jnp.ndim(u.nu_raw),
        max_halvings=max_halvings,
        guarded=guarded,
    )

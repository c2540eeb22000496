"""Expected global potentials of the SLDS prior and the two mean-field messages.

``slds_expected_potentials`` turns expected statistics of ``q(theta)`` (NIW for the initial
state, one MNIW per regime, Dirichlet for ``pi_0`` and the rows of ``P``) into the
`SLDSGlobalPotentials` bundle of ``docs/design.md``.  ``hmm_to_lds_potentials`` and
``lds_to_hmm_log_potentials`` are the two structured mean-field messages (docs/math.md §4),
written in our sign convention (``+h1``).

All functions are pure JAX, unbatched (one parameter set / one sequence).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_svae._linalg import LOG_2PI, symmetrize
from numpyro_svae.messages.lds import LDSPotentials

Array = jax.Array

__all__ = [
    "SLDSGlobalPotentials",
    "IIDGlobalPotentials",
    "slds_expected_potentials",
    "lds_expected_potentials",
    "iid_expected_potentials",
    "hmm_to_lds_potentials",
    "lds_to_hmm_log_potentials",
    "validate_globals",
]


class SLDSGlobalPotentials(NamedTuple):
    """Expected potentials of the SLDS prior ``p(z, k | E[theta])`` (see docs/design.md)."""

    J_init: Array  # [D, D]   E[tau]
    h_init: Array  # [D]      E[tau mu]
    c_init: Array  # []       -1/2 E[mu' tau mu] + 1/2 E log|tau| - D/2 log 2 pi
    J11: Array  # [K, D, D] E[A' Lambda A]
    J12: Array  # [K, D, D] E[A' Lambda]
    J22: Array  # [K, D, D] E[Lambda]
    h1: Array  # [K, D]    -E[A' Lambda b]
    h2: Array  # [K, D]    E[Lambda b]
    c: Array  # [K]       -1/2 E[b' Lambda b] + 1/2 E log|Lambda| - D/2 log 2 pi
    log_pi0: Array  # [K]       E[log pi_0]
    log_P: Array  # [K, K]    E[log P]


class IIDGlobalPotentials(NamedTuple):
    """Expected potentials of ``z_t | k_t ~ N(mu_k, tau_k^-1)`` iid given the regimes.

    Used by the HMM-with-Gaussian-latents and GMM special cases (one NIW per regime).
    """

    J: Array  # [K, D, D] E[tau_k]
    h: Array  # [K, D]    E[tau_k mu_k]
    c: Array  # [K]       -1/2 E[mu_k' tau_k mu_k] + 1/2 E log|tau_k| - D/2 log 2 pi
    log_pi0: Array  # [K]       E[log pi_0] (GMM: E[log pi])
    log_P: Array  # [K, K]    E[log P] (ignored by the GMM)


def _shape(x) -> str:
    return "[" + ", ".join(str(s) for s in jnp.shape(x)) + "]"


def _unpack4(stats, name: str):
    try:
        a, b, c, d = stats
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a 4-field statistics tuple") from None
    return jnp.asarray(a), jnp.asarray(b), jnp.asarray(c), jnp.asarray(d)


def _check_finite(named: dict) -> None:
    for name, x in named.items():
        if isinstance(x, jax.core.Tracer):
            continue
        if not np.all(np.isfinite(np.asarray(x))):
            raise ValueError(f"`{name}` contains NaN or inf")


def validate_globals(g: SLDSGlobalPotentials, D: int | None = None) -> tuple[int, int]:
    """Check shapes (always) and finiteness (concrete inputs) of an `SLDSGlobalPotentials`.

    Returns ``(K, D)``; raises ``ValueError`` naming the offending field.
    """
    if not isinstance(g, SLDSGlobalPotentials):
        raise TypeError(f"`globals` must be an SLDSGlobalPotentials; got {type(g).__name__}")
    if jnp.ndim(g.J_init) != 2:
        raise ValueError(f"`J_init` must have shape [D, D]; got {_shape(g.J_init)}")
    D_ = jnp.shape(g.J_init)[0] if D is None else D
    if jnp.ndim(g.c) != 1:
        raise ValueError(f"`c` must have shape [K]; got {_shape(g.c)}")
    K = jnp.shape(g.c)[0]
    expected = {
        "J_init": (D_, D_),
        "h_init": (D_,),
        "c_init": (),
        "J11": (K, D_, D_),
        "J12": (K, D_, D_),
        "J22": (K, D_, D_),
        "h1": (K, D_),
        "h2": (K, D_),
        "c": (K,),
        "log_pi0": (K,),
        "log_P": (K, K),
    }
    for name, shp in expected.items():
        got = jnp.shape(getattr(g, name))
        if got != shp:
            raise ValueError(
                f"`globals.{name}` must have shape [{', '.join(map(str, shp))}] "
                f"(K={K}, D={D_}); got {_shape(getattr(g, name))}"
            )
    _check_finite({f"globals.{n}": getattr(g, n) for n in g._fields})
    return K, D_


def slds_expected_potentials(
    niw_stats,
    mniw_stats,
    E_log_pi0: Array,
    E_log_P: Array,
) -> SLDSGlobalPotentials:
    """Expected SLDS potentials from expected statistics of ``q(theta)``.

    Parameters
    ----------
    niw_stats : 4-tuple (e.g. ``expfam.niw.NIWStats``)
        ``(neg_half_tau [D, D], tau_mu [D], neg_half_mu_tau_mu [], half_logdet_tau [])``:
        E[-tau/2], E[tau mu], E[-mu' tau mu / 2], E[log|tau| / 2] of the initial-state NIW.
    mniw_stats : 4-tuple (e.g. ``expfam.mniw.MNIWStats`` with a leading K axis)
        ``(neg_half_Lambda [K, D, D], Xt_Lambda [K, Din, D], neg_half_Xt_Lambda_X
        [K, Din, Din], half_logdet_Lambda [K])`` for ``X = [A | b]`` (``Din = D + 1``, bias
        in the last column) or ``X = A`` (``Din = D``, no bias).
    E_log_pi0 : Array
        ``[K]`` E[log pi_0].
    E_log_P : Array
        ``[K, K]`` E[log P], rows = from-state.

    Returns
    -------
    SLDSGlobalPotentials

    Raises
    ------
    ValueError
        Wrong shapes, or NaN / inf in concrete inputs (naming the argument).

    References
    ----------
    docs/math.md §4 (sign convention ``+h1``: ``h1 = -E[A' Lambda b]``).
    """
    nht, tmu, nhmtm, hldt = _unpack4(niw_stats, "niw_stats")
    nhL, XtL, nhXLX, hldL = _unpack4(mniw_stats, "mniw_stats")
    E_log_pi0 = jnp.asarray(E_log_pi0)
    E_log_P = jnp.asarray(E_log_P)
    if nht.ndim != 2 or nht.shape[0] != nht.shape[1]:
        raise ValueError(f"`niw_stats.neg_half_tau` must have shape [D, D]; got {_shape(nht)}")
    D = nht.shape[0]
    for name, x, shp in (
        ("niw_stats.tau_mu", tmu, (D,)),
        ("niw_stats.neg_half_mu_tau_mu", nhmtm, ()),
        ("niw_stats.half_logdet_tau", hldt, ()),
    ):
        if x.shape != shp:
            raise ValueError(f"`{name}` must have shape {list(shp)}; got {_shape(x)}")
    if nhL.ndim != 3 or nhL.shape[1:] != (D, D):
        raise ValueError(f"`mniw_stats.neg_half_Lambda` must have shape [K, {D}, {D}]; got "
                         f"{_shape(nhL)}")
    K = nhL.shape[0]
    if XtL.ndim != 3 or XtL.shape[0] != K or XtL.shape[2] != D or XtL.shape[1] not in (D, D + 1):
        raise ValueError(
            f"`mniw_stats.Xt_Lambda` must have shape [K, Din, D] = [{K}, {D} or {D + 1}, {D}]; "
            f"got {_shape(XtL)}"
        )
    Din = XtL.shape[1]
    for name, x, shp in (
        ("mniw_stats.neg_half_Xt_Lambda_X", nhXLX, (K, Din, Din)),
        ("mniw_stats.half_logdet_Lambda", hldL, (K,)),
        ("E_log_pi0", E_log_pi0, (K,)),
        ("E_log_P", E_log_P, (K, K)),
    ):
        if x.shape != shp:
            raise ValueError(f"`{name}` must have shape {list(shp)}; got {_shape(x)}")
    _check_finite({
        "niw_stats.neg_half_tau": nht, "niw_stats.tau_mu": tmu,
        "niw_stats.neg_half_mu_tau_mu": nhmtm, "niw_stats.half_logdet_tau": hldt,
        "mniw_stats.neg_half_Lambda": nhL, "mniw_stats.Xt_Lambda": XtL,
        "mniw_stats.neg_half_Xt_Lambda_X": nhXLX, "mniw_stats.half_logdet_Lambda": hldL,
        "E_log_pi0": E_log_pi0, "E_log_P": E_log_P,
    })
    half_D_log2pi = 0.5 * D * LOG_2PI
    J11 = symmetrize(-2.0 * nhXLX[:, :D, :D])
    J12 = XtL[:, :D, :]
    J22 = symmetrize(-2.0 * nhL)
    if Din == D + 1:
        # -E[A' Lambda b] = (E[-X'LX/2])[:D, D] + (E[-X'LX/2])[D, :D]
        h1 = nhXLX[:, :D, D] + nhXLX[:, D, :D]
        h2 = XtL[:, D, :]
        c = nhXLX[:, D, D] + hldL - half_D_log2pi
    else:
        h1 = jnp.zeros_like(J12[:, :, 0])
        h2 = jnp.zeros_like(J12[:, :, 0])
        c = hldL - half_D_log2pi
    return SLDSGlobalPotentials(
        J_init=symmetrize(-2.0 * nht),
        h_init=tmu,
        c_init=nhmtm + hldt - half_D_log2pi,
        J11=J11,
        J12=J12,
        J22=J22,
        h1=h1,
        h2=h2,
        c=c,
        log_pi0=E_log_pi0,
        log_P=E_log_P,
    )


def lds_expected_potentials(niw_stats, mniw_stats) -> SLDSGlobalPotentials:
    """The LDS special case (``K = 1``) of `slds_expected_potentials`.

    ``mniw_stats`` may carry a leading axis of size 1 or none.  ``log_pi0`` and ``log_P`` are
    zero (a single regime with probability one).

    Returns
    -------
    SLDSGlobalPotentials
        With ``K = 1``.
    """
    nhL, XtL, nhXLX, hldL = _unpack4(mniw_stats, "mniw_stats")
    if nhL.ndim == 2:
        nhL, XtL, nhXLX, hldL = nhL[None], XtL[None], nhXLX[None], jnp.reshape(hldL, (1,))
    z = jnp.zeros((1,), jnp.result_type(nhL))
    return slds_expected_potentials(niw_stats, (nhL, XtL, nhXLX, hldL), z, z[:, None])


def iid_expected_potentials(niw_stats, E_log_pi0: Array, E_log_P: Array | None = None):
    """Per-regime node potentials for the HMM / GMM with iid Gaussian latents.

    Parameters
    ----------
    niw_stats : 4-tuple with a leading K axis
        ``(neg_half_tau [K, D, D], tau_mu [K, D], neg_half_mu_tau_mu [K],
        half_logdet_tau [K])``.
    E_log_pi0 : Array
        ``[K]`` E[log pi_0] (the mixture weights for the GMM).
    E_log_P : Array, optional
        ``[K, K]`` E[log P]; zeros when omitted (GMM).

    Returns
    -------
    IIDGlobalPotentials
    """
    nht, tmu, nhmtm, hldt = _unpack4(niw_stats, "niw_stats")
    if nht.ndim != 3 or nht.shape[1] != nht.shape[2]:
        raise ValueError(f"`niw_stats.neg_half_tau` must have shape [K, D, D]; got {_shape(nht)}")
    K, D = nht.shape[:2]
    E_log_pi0 = jnp.asarray(E_log_pi0)
    E_log_P = jnp.zeros((K, K), nht.dtype) if E_log_P is None else jnp.asarray(E_log_P)
    for name, x, shp in (
        ("niw_stats.tau_mu", tmu, (K, D)),
        ("niw_stats.neg_half_mu_tau_mu", nhmtm, (K,)),
        ("niw_stats.half_logdet_tau", hldt, (K,)),
        ("E_log_pi0", E_log_pi0, (K,)),
        ("E_log_P", E_log_P, (K, K)),
    ):
        if x.shape != shp:
            raise ValueError(f"`{name}` must have shape {list(shp)}; got {_shape(x)}")
    _check_finite({"niw_stats.neg_half_tau": nht, "niw_stats.tau_mu": tmu,
                   "niw_stats.neg_half_mu_tau_mu": nhmtm, "niw_stats.half_logdet_tau": hldt,
                   "E_log_pi0": E_log_pi0, "E_log_P": E_log_P})
    return IIDGlobalPotentials(
        J=symmetrize(-2.0 * nht),
        h=tmu,
        c=nhmtm + hldt - 0.5 * D * LOG_2PI,
        log_pi0=E_log_pi0,
        log_P=E_log_P,
    )


def hmm_to_lds_potentials(
    q: Array, g: SLDSGlobalPotentials, R: Array, r: Array
) -> tuple[LDSPotentials, Array]:
    """HMM -> LDS message: regime marginals to time-varying Gaussian chain potentials.

    Parameters
    ----------
    q : Array
        ``[T-1, K]`` marginals of the regime of each transition ``z_t -> z_{t+1}``.
    g : SLDSGlobalPotentials
    R, r : Array
        Encoder node potentials ``[T, D]`` (diagonal) or ``[T, D, D]``, and ``[T, D]``.

    Returns
    -------
    (LDSPotentials, Array)
        The chain potentials and the expected log-prior constant
        ``c_init + sum_t sum_k q_t(k) c_k`` (scalar).

    References
    ----------
    docs/math.md §4, q(z) given q(k) (with ``+h1``).
    """
    pot = LDSPotentials(
        J_init=g.J_init,
        h_init=g.h_init,
        J11=jnp.einsum("tk,kij->tij", q, g.J11),
        J12=jnp.einsum("tk,kij->tij", q, g.J12),
        J22=jnp.einsum("tk,kij->tij", q, g.J22),
        h1=q @ g.h1,
        h2=q @ g.h2,
        R=R,
        r=r,
    )
    return pot, g.c_init + jnp.sum(q @ g.c)


def lds_to_hmm_log_potentials(
    Ez: Array, Ezz: Array, Ezz_next: Array, g: SLDSGlobalPotentials
) -> Array:
    """LDS -> HMM message: expected log transition density under each regime.

    ``eta_t(k) = E_q[log N(z_{t+1}; A_k z_t + b_k, Lambda_k^{-1})]`` (expectation also over
    ``q(theta)``), including the ``-D/2 log 2 pi`` constant.

    Parameters
    ----------
    Ez : Array
        ``[T, D]``.
    Ezz : Array
        ``[T, D, D]``.
    Ezz_next : Array
        ``[T-1, D, D]`` E[z_t z_{t+1}'].
    g : SLDSGlobalPotentials

    Returns
    -------
    Array
        ``[T-1, K]`` node log-potentials of the regime chain.

    References
    ----------
    docs/math.md §4, q(k) given q(z).
    """
    return (
        -0.5 * jnp.einsum("kij,tij->tk", g.J11, Ezz[:-1])
        + jnp.einsum("kij,tij->tk", g.J12, Ezz_next)
        - 0.5 * jnp.einsum("kij,tij->tk", g.J22, Ezz[1:])
        + Ez[:-1] @ g.h1.T
        + Ez[1:] @ g.h2.T
        + g.c
    )

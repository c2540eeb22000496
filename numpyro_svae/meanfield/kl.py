"""Closed-form local KL of the structured mean field, its surrogate, and sampling from q(z).

For ``q(z)`` the Gaussian chain built from regime marginals ``q_used`` (plus the encoder
potentials ``phi``) and ``q(k)`` the HMM whose node log-potentials are ``eta = E_q(z)[log
p(z_{t+1} | z_t, k)]``, every prior term cancels in ``E_q[log q - log p]`` except

    KL = sum_t sum_k q_used_t(k) (eta_t(k) - c_k) + <phi, E t(z)> - log Z_z - log Z_k - c_init

(docs/math.md §6; ``q_used`` may differ from ``q(k)`` before convergence,
and ``R`` may be diagonal ``[T, D]`` or full ``[T, D, D]``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from numpyro_svae.messages.lds import LDSPotentials, lds_sample, lds_sample_from

Array = jax.Array

__all__ = ["encoder_expected_log_potential", "slds_local_kl", "iid_local_kl", "mf_sample"]


def encoder_expected_log_potential(R: Array, r: Array, Ez: Array, Ezz: Array) -> Array:
    """``sum_t E_q[-1/2 z_t' R_t z_t + r_t' z_t]``.

    Parameters
    ----------
    R : Array
        ``[T, D]`` diagonal or ``[T, D, D]`` full node precisions (already masked).
    r : Array
        ``[T, D]`` (already masked).
    Ez, Ezz : Array
        ``[T, D]``, ``[T, D, D]``.

    Returns
    -------
    Array
        Scalar.
    """
    if R.ndim == 2:
        quad = jnp.sum(R * jnp.diagonal(Ezz, axis1=-2, axis2=-1))
    else:
        quad = jnp.sum(R * Ezz)
    return -0.5 * quad + jnp.sum(r * Ez)


def slds_local_kl(
    Ez: Array,
    Ezz: Array,
    lds_log_normalizer: Array,
    eta: Array,
    used_marginals: Array,
    hmm_log_normalizer: Array,
    R: Array,
    r: Array,
    c: Array,
    c_init: Array,
) -> Array:
    """Local KL ``KL(q(z) q(k) || p(z, k | E[theta]))`` in closed form.

    Parameters
    ----------
    Ez, Ezz : Array
        ``[T, D]``, ``[T, D, D]`` statistics of ``q(z)``.
    lds_log_normalizer : Array
        ``[]`` log normaliser of ``q(z)``'s chain (includes the encoder potentials).
    eta : Array
        ``[T-1, K]`` expected log transition densities (incl. ``-D/2 log 2 pi``).
    used_marginals : Array
        ``[T-1, K]`` regime marginals that built ``q(z)``'s transition potentials.
    hmm_log_normalizer : Array
        ``[]`` log normaliser of ``q(k)`` (prior ``E log pi0``, ``E log P`` and ``eta``).
    R, r : Array
        Masked encoder potentials ``[T, D]`` / ``[T, D, D]`` and ``[T, D]``.
    c, c_init : Array
        ``[K]`` and ``[]`` constants of `SLDSGlobalPotentials`.

    Returns
    -------
    Array
        Scalar local KL (>= 0 up to rounding).
    """
    return (
        jnp.sum(used_marginals * (eta - c))
        + encoder_expected_log_potential(R, r, Ez, Ezz)
        - lds_log_normalizer
        - hmm_log_normalizer
        - c_init
    )


def iid_local_kl(
    Ez: Array,
    Ezz: Array,
    gauss_log_normalizer: Array,
    eta: Array,
    used_marginals: Array,
    discrete_log_normalizer: Array,
    R: Array,
    r: Array,
    c: Array,
) -> Array:
    """Local KL for latents iid given the regime (HMM or GMM prior on the regimes).

    ``KL = sum q_used (eta - c) + <phi, E t> - log Z_z - log Z_k`` with ``eta_t(k) =
    E_q[log N(z_t; mu_k, tau_k^-1)]``.

    Returns
    -------
    Array
        Scalar.
    """
    return (
        jnp.sum(used_marginals * (eta - c))
        + encoder_expected_log_potential(R, r, Ez, Ezz)
        - gauss_log_normalizer
        - discrete_log_normalizer
    )


def mf_sample(key: Array, result, *, num_samples: int | None = None) -> Array:
    """Reparameterised draw ``z ~ q(z)`` from a mean-field result.

    Forward-filter backward-sample on ``result.lds_potentials`` (the chain built from the
    final regime marginals, masked encoder potentials included), so gradients flow to the
    encoder potentials, the globals and, through the fixed point, to everything it depends on.
    When ``result.sampler`` holds the final pass's filter kernels (`mf_fixed_point` sets them)
    only the backward sampling runs; the draw is the same for the same key.

    Parameters
    ----------
    key : Array
        PRNG key (typed keys accepted).
    result : MFResult
        From `mf_fixed_point` (one sequence; ``vmap`` for batches).
    num_samples : int, optional
        ``S``; ``None`` gives one draw without the sample axis.

    Returns
    -------
    Array
        ``[T, D]`` or ``[S, T, D]``.
    """
    if getattr(result, "sampler", None) is not None:  # the final pass's filter kernels
        return lds_sample_from(key, result.sampler, num_samples=num_samples)
    pot: LDSPotentials = result.lds_potentials
    return lds_sample(key, pot, None, num_samples=num_samples)

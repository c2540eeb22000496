"""Initialising an SLDS-SVAE's switching dynamics from a segmentation of its latents.

Training an SLDS-SVAE from a random start often ends with every frame in one regime: while
the networks are random, no regime explains the latents better than another, and the
regimes that lose the first steps never come back (mocap6: one regime after 500 steps,
``docs/benchmarks.md``).  The classic remedy for switching models (Linderman et al.'s
recurrent SLDS, Fox et al.'s SLDS samplers) is to start the switching dynamics from an
autoregressive HMM fitted to continuous latents.  Here:

1. train an SVAE with one regime (an LDS-SVAE, or the SLDS with ``K = 1``) and take its
   smoothed latent means ``z`` ``[N, T, D]`` (``guide.posterior(...).latent_mean``);
2. :func:`arhmm_init` fits a linear AR(1)-HMM with ``K`` states to ``z``
   (:func:`numpyro_svae.arhmm.fit_arhmm`: MAP-EM on the library's HMM message passing,
   float64, padding masked out), segments ``z`` by its Viterbi path and calls
   :func:`qtheta_from_segmentation`;
3. :func:`qtheta_from_segmentation` sets q(theta) of the SLDS guide to one conjugate update
   of the model's own prior with the statistics of ``z`` under that segmentation (the
   variational Bayes update that treats ``z`` as observed): per regime an MNIW from the
   transition pairs assigned to it, Dirichlets from the regime counts;
4. ``SVI.init(..., init_params=init.params)`` starts the SLDS-SVAE there (the networks and
   the initial-state factor can be carried over from step 1 with ``carry``).

The segmentation that the SVAE reports after training is its own ``q(k)``; the AR-HMM only
chooses the starting point.  Front layer (reads the guide's structure and parameter names).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_svae import arhmm as _arhmm
from numpyro_svae.expfam.dirichlet import DirichletStandard, dirichlet_to_unconstrained
from numpyro_svae.expfam.mniw import MNIWStandard, mniw_to_unconstrained

Array = jax.Array

__all__ = ["SwitchingInit", "qtheta_from_segmentation", "qk_from_segmentation", "arhmm_init"]


class SwitchingInit(NamedTuple):
    """Result of :func:`arhmm_init`."""

    params: dict  # site name -> array: ``init_params`` for ``SVI.init``
    regimes: np.ndarray  # [N, T] int, AR-HMM Viterbi regime of each step of z
    transitions_per_regime: np.ndarray  # [K] kept transitions z_t -> z_{t+1} of each
    arhmm: _arhmm.ARHMMFit  # the AR(1)-HMM fit (on standardised z when ``standardize``)


def _structure(guide, model_args, model_kwargs):
    st = guide._setup(tuple(model_args), dict(model_kwargs or {}))
    if st.family != "slds":
        raise ValueError(
            f"switching initialisation needs an SLDS model (regimes with their own linear "
            f"dynamics); the guide's model is a {st.family!r} model")
    return st


def _check_z(z, D: int, step_mask=None) -> tuple[np.ndarray, np.ndarray]:
    """``z`` as float64 ``[N, T, D]`` and the ``[N, T]`` bool step mask; only the steps that
    the mask keeps must be finite."""
    z = np.asarray(z, np.float64)
    if z.ndim != 3 or z.shape[-1] != D:
        raise ValueError(f"`z` must have shape [N, T, {D}] (the model's latent dimension); "
                         f"got {list(z.shape)}")
    if z.shape[1] < 2:
        raise ValueError(f"`z` needs at least 2 time steps; got T = {z.shape[1]}")
    mask = _check_mask(step_mask, z.shape[:2])
    if not np.all(np.isfinite(z[mask])):
        raise ValueError("`z` holds NaN or inf entries" + (
            "" if step_mask is None else " at steps where `step_mask` is True"))
    return z, mask


def _check_regimes(regimes, shape, K: int, what: str) -> np.ndarray:
    r = np.asarray(regimes)
    if r.shape != tuple(shape):
        raise ValueError(f"`regimes` must have shape [N, T] = {list(shape)} ({what}); got "
                         f"{list(r.shape)}")
    if not np.issubdtype(r.dtype, np.integer) or r.min() < 0 or r.max() >= K:
        raise ValueError(f"`regimes` must be integers in 0 .. {K - 1} (K = {K} regimes); got "
                         f"values in [{r.min()}, {r.max()}]")
    return r


def _check_mask(step_mask, shape) -> np.ndarray:
    if step_mask is None:
        return np.ones(shape, bool)
    m = np.asarray(step_mask)
    if m.shape != tuple(shape):
        raise ValueError(f"`step_mask` must have shape {list(shape)} ([N, T] of `z`); got "
                         f"{list(m.shape)}")
    return m.astype(bool)


def qtheta_from_segmentation(
    guide,
    z,
    regimes,
    *,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    step_mask=None,
    pseudo_count: float = 1.0,
) -> dict:
    """q(theta) parameters of an SLDS guide from latents and a hard segmentation of them.

    For each regime ``k`` the MNIW factor is the prior updated with the transition pairs
    ``(z_t, z_{t+1})`` whose regime is ``k`` (``eta_k = eta0_k + c sum [z' z'', u z'',
    u u', 1]`` with ``u = [z_t; 1]`` when the dynamics have a bias, ``z' = z_{t+1}``, ``c`` the
    pseudo-count); the transition Dirichlets get ``c`` times the regime-to-regime counts and
    the initial-regime Dirichlet ``c`` times the counts of the first regime of each chain.
    Only latent (sampled) global blocks are set; ``numpyro.param`` or constant globals keep
    their own values.

    Parameters
    ----------
    guide : SVAEGuide
        The guide of an SLDS model (its structure is discovered from ``model_args`` /
        ``model_kwargs`` if it has not been called yet).
    z : array [N, T, D]
        Latent trajectories (e.g. smoothed means of a one-regime SVAE); entries at steps
        that ``step_mask`` leaves out are ignored (they may be NaN).
    regimes : array [N, T] int
        Regime of each step in ``0 .. K-1``; ``regimes[:, t]`` (``t >= 1``) drives
        ``z_{t-1} -> z_t`` (the AR-HMM convention).  For models with one regime per
        transition (``T - 1`` regime variables) the chain is ``regimes[:, 1:]``.
    model_args, model_kwargs
        The model's arguments (as passed to ``SVI.init``), for structure discovery.
    step_mask : array [N, T] bool, optional
        Steps to use (False: padding or a step without data); a pair counts only if both of
        its steps are True.  Default: all.
    pseudo_count : float
        Weight ``c > 0`` of the statistics (1: the exact conjugate update).

    Returns
    -------
    dict
        ``{f"{guide.prefix}{block}.{field}": array}`` for ``dynamics``, ``pi0`` and ``P``, in
        the guide's unconstrained coordinates, ready for ``SVI.init(init_params=...)``.

    Raises
    ------
    ValueError
        Not an SLDS model; ``z``, ``regimes`` or ``step_mask`` of the wrong shape; regimes
        out of range; non-finite ``z`` at kept steps; ``pseudo_count <= 0``.
    """
    st = _structure(guide, model_args, model_kwargs)
    K, D = st.K, st.D
    z, mask = _check_z(z, D, step_mask)
    N, T, _ = z.shape
    r = _check_regimes(regimes, (N, T), K, "one per step of `z`")
    if not pseudo_count > 0:
        raise ValueError(f"`pseudo_count` must be > 0; got {pseudo_count}")
    c = float(pseudo_count)
    f = jnp.asarray(0.0).dtype  # the guide's float type (float64 under enable_x64)
    blocks = guide._latent_blocks(st)
    out: dict[str, Array] = {}

    if "dynamics" in blocks:
        blk = blocks["dynamics"]
        Din = D + 1 if blk.bias else D
        S0 = np.broadcast_to(np.asarray(blk.S, np.float64), (K, D, D))
        M0 = np.broadcast_to(np.asarray(blk.M, np.float64), (K, D, Din))
        V0 = np.broadcast_to(np.asarray(blk.V, np.float64), (K, Din, Din))
        nu0 = np.broadcast_to(np.asarray(blk.nu, np.float64), (K,))
        u = z[:, :-1]
        if blk.bias:
            u = np.concatenate([u, np.ones(u.shape[:2] + (1,))], -1)  # [N, T-1, Din]
        y = z[:, 1:]  # [N, T-1, D]
        pair_ok = mask[:, :-1] & mask[:, 1:]
        S, M, V, nu = [], [], [], []
        for k in range(K):
            sel = pair_ok & (r[:, 1:] == k)
            uk, yk = u[sel], y[sel]  # [n_k, Din], [n_k, D]
            Vk = V0[k] + c * uk.T @ uk
            # M' = V^-1 (V0 M0' + c sum u y'); S = S0 + M0 V0 M0' + c sum y y' - M V M'
            rhs = V0[k] @ M0[k].T + c * uk.T @ yk
            Mt = np.linalg.solve(Vk, rhs)
            Sk = S0[k] + M0[k] @ V0[k] @ M0[k].T + c * yk.T @ yk - Mt.T @ Vk @ Mt
            S.append(0.5 * (Sk + Sk.T))
            M.append(Mt.T)
            V.append(Vk)
            nu.append(nu0[k] + c * len(yk))
        std = MNIWStandard(*(jnp.asarray(np.stack(a), f) for a in (S, M, V, nu)))
        un = mniw_to_unconstrained(std, **guide._ridges("dynamics", blk))
        out.update({f"{guide.prefix}dynamics.{n}": getattr(un, n) for n in un._fields})

    chain = r if st.leading_regime else r[:, 1:]
    chain_ok = mask if st.leading_regime else mask[:, 1:]
    for name in ("pi0", "P"):
        if name not in blocks:
            continue
        alpha = np.asarray(blocks[name].alpha, np.float64)
        if name == "P":
            counts = np.zeros((K, K))
            ok = chain_ok[:, :-1] & chain_ok[:, 1:]
            np.add.at(counts, (chain[:, :-1][ok], chain[:, 1:][ok]), 1.0)
            alpha = np.broadcast_to(alpha, (K, K)) + c * counts
        else:
            first = chain[:, 0][chain_ok[:, 0]]
            alpha = np.broadcast_to(alpha, (K,)) + c * np.bincount(first, minlength=K)
        ud = dirichlet_to_unconstrained(DirichletStandard(jnp.asarray(alpha, f)))
        out[f"{guide.prefix}{name}.u"] = ud.u
    return out


def qk_from_segmentation(
    guide,
    regimes,
    *,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    smoothing: float = 0.01,
) -> dict:
    """The q(k) warm-start state of an SLDS guide set to a hard segmentation.

    With ``SVAEGuide(warm_start=True)`` each training step starts the mean field from the
    previous step's q(k), kept in ``svi_state.mutable_state[WARM_START_SITE]``; ``SVI.init``
    leaves it empty (the first step then starts at random).  Putting this state there
    instead starts the first step from the segmentation that q(theta) was built from
    (`qtheta_from_segmentation`, `arhmm_init`), so that q(k) and q(theta) begin consistent
    and later steps continue from there rather than from a fresh random q(k).

    Parameters
    ----------
    guide : SVAEGuide
        The guide of an SLDS model (structure discovered from ``model_args`` /
        ``model_kwargs`` if it has not been called yet).
    regimes : array [N, T] int
        Regime of each step in ``0 .. K-1``, as for `qtheta_from_segmentation` (the chain is
        ``regimes[:, 1:]`` for a model with one regime per transition).
    model_args, model_kwargs
        The model's arguments (as passed to ``SVI.init``).
    smoothing : float
        ``q = (1 - smoothing) onehot + smoothing / K`` (in ``[0, 1)``), so that no regime
        starts with probability exactly zero.

    Returns
    -------
    dict
        ``{"marginals": [N, Tk, K], "valid": [N] bool}`` in the guide's float type, the value
        of the ``WARM_START_SITE`` entry of ``svi_state.mutable_state``.

    Raises
    ------
    ValueError
        Not an SLDS model; ``regimes`` of the wrong shape or out of range; ``smoothing``
        outside ``[0, 1)``.
    """
    st = _structure(guide, model_args, model_kwargs)
    K = st.K
    r = _check_regimes(regimes, (st.N, st.T), K, "the model's sequences and steps")
    Tk = st.T if st.leading_regime else st.T - 1
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"`smoothing` must be in [0, 1); got {smoothing}")
    chain = r[:, st.T - Tk:]  # [N, Tk]
    q = (1.0 - smoothing) * np.eye(K)[chain] + smoothing / K
    f = jnp.asarray(0.0).dtype  # the guide's float type (float64 under enable_x64)
    return {"marginals": jnp.asarray(q, f), "valid": jnp.ones((st.N,), bool)}


def arhmm_init(
    guide,
    z,
    *,
    rng_key,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    num_iters: int = 100,
    pseudo_count: float = 1.0,
    standardize: bool = True,
    carry: dict | None = None,
    step_mask=None,
    options: _arhmm.ARHMMOptions | None = None,
) -> SwitchingInit:
    """Start an SLDS-SVAE's switching dynamics from an AR(1)-HMM fitted to latents.

    Fits :func:`numpyro_svae.arhmm.fit_arhmm` (MAP-EM from k-means, float64) with the guide's
    number of regimes to ``z`` (each latent dimension standardised with its mean and standard
    deviation over the kept steps first when ``standardize``; the segmentation does not depend
    on the units, but k-means and EM do), takes the Viterbi path as the segmentation and
    builds q(theta) with :func:`qtheta_from_segmentation` from the unstandardised ``z``.

    Parameters
    ----------
    guide : SVAEGuide
        Guide of the SLDS model to initialise.
    z : array [N, T, D]
        Latent trajectories, e.g. ``guide_lds.posterior(params, x, ...).latent_mean`` of a
        one-regime SVAE with the same latent dimension.  Entries at steps that ``step_mask``
        leaves out are ignored (they may be NaN).
    rng_key : jax.random key
        For the AR-HMM's k-means initialisation.
    model_args, model_kwargs
        The SLDS model's arguments, for structure discovery.
    num_iters : int
        EM iterations.
    pseudo_count : float
        See :func:`qtheta_from_segmentation`.
    standardize : bool
        Standardise ``z`` per dimension before the AR-HMM fit.
    carry : dict, optional
        Parameters to start from as well (e.g. the one-regime run's encoder, decoder and
        initial-state factor, ``svi.get_params(state)``); the q(theta) sites set here take
        precedence.  Parameters whose shapes do not fit the SLDS guide must be left out.
    step_mask : array [N, T] bool, optional
        Steps with data (False: padding); default all.  Masked steps give the AR-HMM neither
        emissions nor statistics, and q(theta) only counts pairs of kept steps.  They still
        get a regime in ``regimes`` (see :func:`numpyro_svae.arhmm.segment`).
    options : numpyro_svae.arhmm.ARHMMOptions, optional
        Priors and initialisation of the AR-HMM (default ``ARHMMOptions()``).

    Returns
    -------
    SwitchingInit
        ``params`` for ``SVI.init(..., init_params=...)``, the segmentation, transitions per
        regime (pairs of kept steps) and the AR-HMM fit.

    Raises
    ------
    ValueError
        As :func:`qtheta_from_segmentation` and :func:`numpyro_svae.arhmm.fit_arhmm` (e.g.
        fewer kept transitions than regimes); also if the fit is not finite.
    """
    st = _structure(guide, model_args, model_kwargs)
    z, mask = _check_z(z, st.D, step_mask)
    fit_z = np.where(mask[..., None], z, 0.0)
    if standardize:
        kept = z[mask]  # [M, D]
        fit_z = np.where(mask[..., None],
                         (fit_z - kept.mean(0)) / np.maximum(kept.std(0), 1e-12), 0.0)
    with jax.enable_x64(True):
        fit = _arhmm.fit_arhmm(jnp.asarray(fit_z, jnp.float64), st.K, key=rng_key, mask=mask,
                               num_iters=num_iters, options=options)
        if not all(np.all(np.isfinite(np.asarray(a))) for a in fit.params):
            raise ValueError(
                f"the AR-HMM fit with K = {st.K} regimes on {int(mask.sum())} latent frames "
                f"is not finite")
        regimes = _arhmm.segment(fit, jnp.asarray(fit_z, jnp.float64), mask)
    qtheta = qtheta_from_segmentation(guide, z, regimes, model_args=model_args,
                                      model_kwargs=model_kwargs, step_mask=mask,
                                      pseudo_count=pseudo_count)
    params = dict(carry or {})
    params.update(qtheta)
    pair_ok = mask[:, 1:] & mask[:, :-1]
    per_regime = np.bincount(regimes[:, 1:][pair_ok], minlength=st.K)
    return SwitchingInit(params=params, regimes=regimes, transitions_per_regime=per_regime,
                         arhmm=fit)

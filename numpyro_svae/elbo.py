"""`SVAE_ELBO`: the SVAE objective as a drop-in ``numpyro.infer`` loss.

For a batch of ``B`` of the ``N`` sequences (docs/math.md §6)::

    ELBO = (N / B) * sum_b [ E_q log p(x_b | z_b) - KL(q(z_b) q(k_b) || p(z_b, k_b | E theta)) ]
           - KL(q(theta) || p(theta))

The reconstruction term is a Monte Carlo average over ``num_particles`` reparameterised draws
``z ~ q(z)``; it is the log-density of the model's observed site, obtained by running the
*model* with its latent sites substituted (so masks written in the model are honoured); the
two KL terms are closed form.  The loss is ``-ELBO``.  Every family the guide serves (slds,
lds, hmm, gmm) uses this decomposition; point-estimate / constant globals have no KL term.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from numpyro import handlers
from numpyro.infer.elbo import ELBO

from numpyro_svae.guide import DIAGNOSTICS_SITE, WARM_START_SITE, SVAEGuide, _summary
from numpyro_svae.meanfield.iid import IIDResult, mf_sample_iid
from numpyro_svae.meanfield.kl import mf_sample

__all__ = ["SVAE_ELBO"]


class SVAE_ELBO(ELBO):
    """Closed-form-KL ELBO of a structured VAE, for :class:`numpyro.infer.SVI`.

    Parameters
    ----------
    num_particles : int
        Number of ``z ~ q(z)`` draws averaged in the reconstruction term (the mean field and
        the KL terms are computed once).
    vectorize_particles : bool or callable
        As in :class:`numpyro.infer.elbo.ELBO` (``vmap`` by default, ``lax.map`` if False).
    local_kl_weight, prior_kl_weight : float
        Weights of the local and global KL terms (1 = the ELBO; < 1 for KL annealing).

    Notes
    -----
    The guide must be an :class:`~numpyro_svae.guide.SVAEGuide`; its mean-field options are
    used.  ``loss_with_mutable_state`` returns the batch summary of the inner solver's
    diagnostics under ``mutable_state["svae$diagnostics"]`` (``num_iters_mean``,
    ``num_iters_max``, ``converged_frac``, ``fallback_frac``, ``rel_change_max``), which SVI
    stores in ``svi_state.mutable_state``; with ``SVAEGuide(warm_start=True)`` also the
    updated per-sequence q(k) under ``mutable_state["svae$qk_warm_start"]``.

    Warnings
    --------
    Gradients of the q(theta) parameters are natural gradients (not Euclidean ones); optimise
    them with SGD (`natural_gradient`), not Adam.

    Examples
    --------
    >>> svi = SVI(model, guide, natural_gradient(natgrad_lr=0.1),
    ...           loss=SVAE_ELBO())  # doctest: +SKIP
    """

    can_infer_discrete = True

    def __init__(self, num_particles: int = 1, vectorize_particles=True, *,
                 local_kl_weight: float = 1.0, prior_kl_weight: float = 1.0):
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"`num_particles` must be a positive int; got {num_particles!r}")
        super().__init__(num_particles=num_particles, vectorize_particles=vectorize_particles)
        self.local_kl_weight = local_kl_weight
        self.prior_kl_weight = prior_kl_weight

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        """``{"loss": -ELBO, "mutable_state": {"svae$diagnostics": ...}}`` (see class doc)."""
        terms = self.elbo_terms(rng_key, param_map, model, guide, *args, **kwargs)
        elbo = terms["scale"] * (terms["recon"] - self.local_kl_weight * terms["local_kl"]) \
            - self.prior_kl_weight * terms["global_kl"]
        state = {DIAGNOSTICS_SITE: terms["diagnostics"]}
        if terms.get("warm_start") is not None:
            state[WARM_START_SITE] = terms["warm_start"]
        return {"loss": -elbo, "mutable_state": state}

    def elbo_terms(self, rng_key, param_map, model, guide, *args, **kwargs) -> dict:
        """The pieces of the ELBO: ``recon`` and ``local_kl`` (batch sums, unscaled),
        ``scale`` (``N / B``), ``global_kl``, ``diagnostics``."""
        if not isinstance(guide, SVAEGuide):
            raise TypeError(
                f"SVAE_ELBO needs an SVAEGuide as the guide; got {type(guide).__name__}")
        k_inf, k_part = jax.random.split(rng_key)
        with handlers.block(), handlers.seed(rng_seed=k_inf), \
                handlers.substitute(data=param_map):
            inf = guide._infer(args, kwargs)
        st = guide.structure
        B = inf.R.shape[0]

        draw = mf_sample_iid if isinstance(inf.mf, IIDResult) else mf_sample

        def particle(key):
            kz, km = jax.random.split(key)
            z = jax.vmap(draw)(jax.random.split(kz, B), inf.mf)  # [B, T, D]
            return _log_likelihood(km, param_map, model, guide, st, inf, z, args, kwargs)

        keys = jax.random.split(k_part, self.num_particles)
        recon = jnp.mean(self.vectorize_particles_fn(particle, keys))
        return {
            "recon": recon,
            "local_kl": jnp.sum(inf.mf.local_kl),
            "scale": inf.obs.scale,
            "global_kl": inf.global_kl,
            "diagnostics": _summary(inf.info),
            "warm_start": inf.warm,
        }


def _log_likelihood(key, param_map, model, guide: SVAEGuide, st, inf, z, args, kwargs):
    """``log p(x | z)`` summed over observed entries of the batch (unscaled), via the model."""
    subs = dict(param_map)
    subs.pop(DIAGNOSTICS_SITE, None)
    subs.pop(WARM_START_SITE, None)
    for name, info in st.sites.items():
        if info.kind == "latent" and info.role in ("k", "k_init"):
            subs[name] = jnp.zeros(info.shape, jnp.int32)
    for blk in guide._latent_blocks(st).values():  # params come from param_map
        for site, val in guide._block_values(blk, st):
            subs[site] = val
    if st.family == "gmm":
        subs[st.z_site] = z[:, 0]
    else:
        subs[st.z_init_site] = z[:, 0]
        subs[st.z_site] = jnp.swapaxes(z[:, 1:], 0, 1)
    if inf.obs.plate_idx is not None:
        subs[st.sequence_plate] = inf.obs.plate_idx
    with handlers.block():
        seeded = handlers.seed(handlers.substitute(model, data=subs), rng_seed=key)
        tr = handlers.trace(seeded).get_trace(*args, **guide._model_kwargs(kwargs))
    site = guide._obs_site(st, tr)
    if st.family == "gmm":
        base, mask, _ = guide._iid_site_mask(site)
    else:
        base, mask, _, _ = guide._site_mask(site, st, kwargs, inf.obs.plate_idx)
    value = site["value"]
    if mask is None:
        return jnp.sum(base.log_prob(value))
    vmask = mask.reshape(mask.shape + (1,) * (jnp.ndim(value) - mask.ndim))
    safe = jnp.where(vmask, value, jnp.zeros_like(value))
    lp = jnp.broadcast_to(base.log_prob(safe), mask.shape)
    return jnp.sum(jnp.where(mask, lp, 0.0))

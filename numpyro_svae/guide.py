"""`SVAEGuide`: a NumPyro guide for conjugate SLDS / LDS priors with a neural encoder.

The guide owns

- ``q(theta)``: one natural-parameter block per conjugate global of the model (NIW for the
  initial state, MNIW for the dynamics, Dirichlets for the initial regime and the transition
  rows), stored as unconstrained ``numpyro.param`` sites named ``f"{prefix}{block}"`` whose
  gradients are natural gradients (docs/math.md §8);
- the encoder network (``f"{encoder_name}$params"``), mapping each sequence to Gaussian node
  potentials;
- the structured mean field ``q(z) q(k)`` computed by `meanfield.mf_fixed_point`.

Its sample sites mirror the model's latent sites (globals from ``q(theta)``; the regime chain
and the continuous chain from ``q(k)`` and ``q(z)``), so it is an ordinary NumPyro guide:
``Predictive(model, guide=guide)`` and ``Trace_ELBO`` work with it.  ``SVAE_ELBO`` uses the
same computation (:meth:`SVAEGuide._infer`) but evaluates the local and global KL terms in
closed form.
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import numpyro.primitives
from numpyro import handlers
from numpyro.contrib.module import eqx_module
from numpyro.distributions.util import is_identically_one

from numpyro_svae import _eager
from numpyro_svae._linalg import psd_cholesky, psd_inv, psd_logdet
from numpyro_svae.expfam.convert import dirichlet_to_numpyro, mniw_to_numpyro, niw_to_numpyro
from numpyro_svae.expfam.dirichlet import (
    DirichletNatural,
    DirichletStandard,
    DirichletStats,
    dirichlet_qtheta_terms,
    dirichlet_retract,
    dirichlet_to_natural,
    dirichlet_to_standard,
    dirichlet_to_unconstrained,
)
from numpyro_svae.expfam.mniw import (
    MNIWStandard,
    MNIWStats,
    mniw_qtheta_terms,
    mniw_retract,
    mniw_to_natural,
    mniw_to_standard,
    mniw_to_unconstrained,
)
from numpyro_svae.expfam.niw import (
    NIWStandard,
    NIWStats,
    niw_qtheta_terms,
    niw_retract,
    niw_to_natural,
    niw_to_standard,
    niw_to_unconstrained,
)
from numpyro_svae.meanfield.fixed_point import FixedPointInfo, FixedPointOptions
from numpyro_svae.meanfield.iid import IIDResult, mf_fixed_point_iid, mf_sample_iid
from numpyro_svae.meanfield.kl import mf_sample
from numpyro_svae.meanfield.potentials import (
    IIDGlobalPotentials,
    iid_expected_potentials,
    lds_expected_potentials,
    lds_to_hmm_log_potentials,
    slds_expected_potentials,
)
from numpyro_svae.meanfield.slds import MFResult, mf_fixed_point
from numpyro_svae.messages.hmm import HMMPotentials, hmm_log_normalizer, hmm_sample
from numpyro_svae.messages.lds import LDSPotentials
from numpyro_svae.optim import QTHETA_PREFIX

Array = jax.Array

__all__ = ["SVAEGuide", "SVAEPosterior", "DIAGNOSTICS_SITE", "WARM_START_SITE",
           "check_finite_params"]

DIAGNOSTICS_SITE = "svae$diagnostics"
"""Name of the ``numpyro.mutable`` site holding the inner-solver diagnostics of the last step."""

WARM_START_SITE = "svae$qk_warm_start"
"""Name of the ``numpyro.mutable`` site holding the per-sequence q(k) of the last step
(``SVAEGuide(warm_start=True)``): ``{"marginals": [N, Tk, K], "valid": [N] bool}``."""


class SVAEPosterior(NamedTuple):
    """Variational posterior of a batch of sequences (see :meth:`SVAEGuide.posterior`)."""

    regime_marginals: Array  # [N, Tk, K]  q(k_t); Tk = T (leading regime) or T - 1
    trans_counts: Array  # [N, K, K]        sum_t q(k_t = i, k_{t+1} = j)
    latent_mean: Array  # [N, T, D]         E_q[z_t]
    latent_cov: Array  # [N, T, D, D]       Cov_q[z_t]
    local_kl: Array  # [N]                  KL(q(z) q(k) || p(z, k | E theta))
    qtheta: dict  # block -> NIWStandard / MNIWStandard ([K, ...]) / DirichletStandard
    global_kl: Array  # []                  KL(q(theta) || p(theta))
    mask: Array  # [N, T]                   steps with at least one observed entry
    diagnostics: FixedPointInfo  # per-sequence [N] fields of the inner solver


class _Observed(NamedTuple):
    x: Array  # [B, T, Dx]  data, N-first layout, missing entries zeroed
    entry_mask: Array  # [B, T, Dx] or [B, T] bool, what the encoder sees
    step_mask: Array  # [B, T] bool
    scale: Any  # N / B (python float or [] array)
    plate_idx: Any  # [B] subsample indices or None
    n_axis: int  # axis of the sequences in the observed value
    t_axis: int  # axis of time in the observed value


class _Inference(NamedTuple):
    obs: _Observed
    qtheta: dict  # block -> standard parameters of q(theta) (NIW/MNIW/DirichletStandard)
    global_kl: Array  # []
    globals: Any  # SLDSGlobalPotentials
    R: Array  # [B, T, D]
    r: Array  # [B, T, D]
    mf: MFResult  # batched over B
    info: FixedPointInfo  # batched over B
    warm: Any = None  # updated q(k) warm-start state (`warm_start=True`), else None


# ------------------------------------------------------------------------------------------
# small NumPyro helpers
# ------------------------------------------------------------------------------------------


class _ChainDist(dist.Distribution):
    """A whole chain as one scan site: draws the value the guide computed, scores it exactly.

    Value ``[T', B, *event]`` (time first, as NumPyro stacks scan sites); batch shape
    ``[T', B]`` so that it matches the model's scan site.  ``log_prob(value)`` puts the joint
    log density of each sequence's chain under ``q`` (the first element, sampled at another
    site, held fixed) at time index 0 and zeros elsewhere.  ``seq_log_prob_fn`` is a
    `jax.tree_util.Partial` so that the distribution is a pytree (it can leave a ``jit``).
    """

    pytree_data_fields = ("_value", "_fn")
    pytree_aux_fields = ("_discrete",)

    def __init__(self, value, seq_log_prob_fn, *, event_dim: int, discrete: bool):
        self._value = value
        self._fn = seq_log_prob_fn
        self._discrete = discrete
        shape = jnp.shape(value)
        super().__init__(batch_shape=shape[: len(shape) - event_dim],
                         event_shape=shape[len(shape) - event_dim:])

    @property
    def has_rsample(self):
        return not self._discrete

    @property
    def support(self):
        c = dist.constraints
        base = c.nonnegative_integer if self._discrete else c.real
        return c.independent(base, len(self.event_shape)) if self.event_shape else base

    def sample(self, key, sample_shape=()):
        return jnp.broadcast_to(self._value, sample_shape + self.batch_shape + self.event_shape)

    def rsample(self, key, sample_shape=()):
        return self.sample(key, sample_shape)

    def log_prob(self, value):
        per_seq = self._fn(value)  # [B]
        out = jnp.zeros(self.batch_shape, per_seq.dtype)
        return out.at[0].set(per_seq)


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def _is_concrete(x) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


def _unwrap_masks(fn, value_shape):
    """Innermost distribution of a site and its combined mask (None = all observed).

    Walks ``Independent`` / ``MaskedDistribution`` / ``ExpandedDistribution`` wrappers; the
    returned mask is broadcast to the innermost distribution's elementwise log-prob shape.
    """
    masks = []
    while True:
        if isinstance(fn, dist.MaskedDistribution):
            if not is_identically_one(fn._mask):
                masks.append((fn._mask, fn.batch_shape))
            fn = fn.base_dist
        elif isinstance(fn, dist.Independent | dist.ExpandedDistribution):
            fn = fn.base_dist
        else:
            break
    lp_shape = tuple(value_shape[: len(value_shape) - fn.event_dim])
    mask = None
    for m, bshape in masks:
        m = jnp.broadcast_to(jnp.asarray(m, bool), bshape)
        m = m.reshape(m.shape + (1,) * (len(lp_shape) - m.ndim))
        mask = m if mask is None else mask & m
    if mask is not None:
        mask = jnp.broadcast_to(mask, lp_shape)
    return fn, mask, lp_shape


# ------------------------------------------------------------------------------------------
# the guide
# ------------------------------------------------------------------------------------------


class SVAEGuide:
    """Structured variational guide for a conjugate SLDS / LDS / HMM / GMM NumPyro model.

    Families (``structure.family``): ``slds`` (leading-regime, one-regime-per-transition and
    lag-one forms), ``lds``, ``hmm`` (Gaussian latents iid given a Markov regime) and ``gmm``
    (Gaussian mixture, each data point a length-1 sequence).  Each conjugate global is a
    latent site (a q(theta) factor), a ``numpyro.param`` point estimate (re-declared by the
    guide with the model's constraint; no KL; Euclidean gradients) or a constant.

    Parameters
    ----------
    model : callable
        The NumPyro model (see docs/model_guide.md); it is traced
        once, lazily, on the first call (:attr:`structure`).
    encoder : eqx.Module or callable
        Maps one sequence ``x [T, Dx]`` and its mask (``[T, Dx]`` or ``[T]``) to node
        potentials ``(R [T, D] > 0, r [T, D])``, e.g. `nn.GaussianPotentialEncoder` (``T = 1``
        for a mixture: ``x [1, Dx]`` per data point).  An
        equinox module is registered with :func:`numpyro.contrib.module.eqx_module`; a plain
        callable ``encoder(params, x, mask)`` needs `encoder_params`.
    encoder_params : pytree, optional
        Initial parameters of a plain-callable encoder.
    encoder_name : str
        Parameter site prefix of the encoder (``f"{encoder_name}$params"``).
    prefix : str
        Common prefix of the q(theta) parameter sites (give the same to `natural_gradient`).
    init_S, init_nu, init_lam, init_loc_sd, init_kappa, init_alpha_ii, init_alpha_ij : float
        Initial q(theta) (docs/math.md §1): Wishart scales ``D * init_S * I``, dof
        ``D + init_nu``, NIW ``lam = init_lam`` and MNIW ``V = init_lam I``, MNIW mean
        ``0.9 I`` plus ``N(0, init_loc_sd^2)`` off-diagonal and bias entries (random per
        regime, so regimes start apart), Dirichlet ``alpha = init_kappa + 0.01`` (initial
        regime) and ``init_alpha_ii + 0.01`` / ``init_alpha_ij + 0.01`` (transition rows).
    max_iters, rtol, solver : optional
        Shortcuts overriding the fields of `options`.
    options : FixedPointOptions, optional
        Mean-field forward / adjoint options (`meanfield.fixed_point.FixedPointOptions`).
    natural_gradients : bool
        True (default): the q(theta) parameters receive natural gradients (straight-through
        expected statistics and the natural-gradient VJP of the unconstrained map). False:
        plain Euclidean gradients in the same unconstrained coordinates (same loss value), for
        Adam/SGD comparisons (`bench/bench_natgrad.py`).
    init_concentration : float
        Dirichlet concentration of the random initial q(k) of the mean field.
    compile_eager : bool
        True (default): an eager call of the guide (``SVI.init``, tracing it outside
        ``jit``) runs its body as one compiled program and replays the sites to the
        caller's handlers (``numpyro_svae._eager``): seconds instead of the ~30 s that
        op-by-op execution costs.  False: plain op-by-op execution.
    warm_start : bool or "best"
        SLDS with K > 1: start each sequence's mean field from its q(k) of the previous
        step, kept in the ``numpyro.mutable`` site `WARM_START_SITE` (per sequence, so
        subsampled plates work; SVI carries it in ``svi_state.mutable_state``).  Default
        False: a fresh random q(k) every step (the paper's setting).  A warm start usually
        needs fewer block updates once training settles; q(k) is not differentiated.
        ``"best"``: also run the mean field from a fresh random q(k) and keep, per
        sequence, the fixed point with the better mean-field objective (``surrogate``;
        twice the mean-field work): the warm start's steadiness with the random start's
        chance of leaving a poor basin (``docs/design.md``, training choices).

    Attributes
    ----------
    structure : ConjugateStructure
        What was found in the model (available after the first call).

    Examples
    --------
    >>> guide = SVAEGuide(model, encoder=GaussianPotentialEncoder(obs_dim=10, latent_dim=2,
    ...                   key=jax.random.key(0)))  # doctest: +SKIP
    >>> svi = SVI(model, guide, natural_gradient(natgrad_lr=0.1),
    ...           loss=SVAE_ELBO())  # doctest: +SKIP
    """

    def __init__(
        self,
        model,
        encoder,
        *,
        encoder_params: Any = None,
        encoder_name: str = "encoder",
        prefix: str = QTHETA_PREFIX,
        init_S: float = 1.0,
        init_nu: float = 2.0,
        init_lam: float = 20.0,
        init_loc_sd: float = 0.2,
        init_kappa: float = 1.0,
        init_alpha_ii: float = 1.0,
        init_alpha_ij: float = 0.9,
        max_iters: int | None = None,
        rtol: float | None = None,
        solver: str | None = None,
        options: FixedPointOptions | None = None,
        init_concentration: float = 0.1,
        natural_gradients: bool = True,
        compile_eager: bool = True,
        warm_start: bool | str = False,
    ):
        if not callable(model):
            raise TypeError(f"`model` must be a callable NumPyro model; got {type(model)}")
        if not callable(encoder):
            raise TypeError(f"`encoder` must be callable; got {type(encoder).__name__}")
        if not isinstance(encoder, eqx.Module) and encoder_params is None:
            raise ValueError(
                "`encoder_params` is required when `encoder` is a plain callable "
                "encoder(params, x, mask); got None")
        self.model = model
        self.encoder = encoder
        self.encoder_params = encoder_params
        self.encoder_name = encoder_name
        self.prefix = prefix
        self.init = dict(S=init_S, nu=init_nu, lam=init_lam, loc_sd=init_loc_sd,
                         kappa=init_kappa, alpha_ii=init_alpha_ii, alpha_ij=init_alpha_ij)
        options = FixedPointOptions() if options is None else options
        upd = {k: v for k, v in dict(max_iters=max_iters, rtol=rtol, solver=solver).items()
               if v is not None}
        self.options = options._replace(**upd)
        self.init_concentration = init_concentration
        self.natural_gradients = bool(natural_gradients)
        self.compile_eager = bool(compile_eager)
        if warm_start not in (False, True, "best"):
            raise ValueError(f"`warm_start` must be False, True or 'best'; got {warm_start!r}")
        self.warm_start = warm_start if warm_start == "best" else bool(warm_start)
        self._structure = None  # the structure of the current call
        self._structures = {}  # call signature (shapes, static arguments) -> structure

    # -- structure ---------------------------------------------------------------------------

    @property
    def structure(self):
        """The `ConjugateStructure` of the model (after the first call)."""
        if self._structure is None:
            raise RuntimeError(
                "SVAEGuide.structure is discovered on the first call; call the guide (or "
                "SVI.init) with the model's arguments first.")
        return self._structure

    def _model_kwargs(self, kwargs: dict) -> dict:
        if "lengths" in kwargs and not _accepts(self.model, "lengths"):
            kwargs = {k: v for k, v in kwargs.items() if k != "lengths"}
        return kwargs

    def _setup(self, args, kwargs):
        """The structure for this call's argument shapes (discovered once per signature).

        The q(theta) and encoder parameters are shared: data of another size (held-out
        sequences, another T) gets its own structure, which must have the same globals."""
        # `lengths` never changes the model's shape; leave it out of the signature
        sig = _call_signature(args, {k: v for k, v in kwargs.items() if k != "lengths"})
        st = self._structures.get(sig) if sig is not None else None
        if st is None and sig is None and self._structure is not None:
            return self._structure  # unhashable static argument: the last structure
        if st is None:
            from numpyro_svae.structure import discover_structure

            first = next(iter(self._structures.values()), None)
            try:
                with handlers.block():  # hide the discovery trace from the caller's handlers
                    st = discover_structure(self.model, *args, **self._model_kwargs(kwargs))
            except Exception:
                if first is None:
                    raise
                # e.g. a mask of the wrong shape: keep the known structure, so that the
                # data pass reports the argument at fault
                self._structure = first
                return first
            if st.family not in ("slds", "lds", "hmm", "gmm"):
                raise NotImplementedError(
                    f"SVAEGuide supports SLDS / LDS / HMM / GMM models; the model is a "
                    f"{st.family!r}")
            if first is None:
                self._param_constraints = self._read_param_constraints(st, args, kwargs)
            else:
                _check_same_globals(first, st)
            if sig is not None:
                self._structures[sig] = st
        self._structure = st
        return self._structure

    def _read_param_constraints(self, st, args, kwargs) -> dict:
        """Constraints of the model's ``numpyro.param`` globals (the guide re-declares them)."""
        names = [n for blk in self._blocks(st).values() if blk.kind == "param"
                 for n, _ in self._block_fields(blk) if n is not None]
        if not names:
            return {}
        with handlers.block():
            tr = handlers.trace(handlers.seed(self.model, rng_seed=0)).get_trace(
                *args, **self._model_kwargs(kwargs))
        return {n: tr[n]["kwargs"].get("constraint", dist.constraints.real) for n in names}

    @staticmethod
    def _blocks(st) -> dict:
        """Every conjugate global block of the model (latent, param or constant)."""
        out = {}
        for name in ("init_state", "dynamics", "regime_gaussians", "pi0", "P"):
            blk = getattr(st, name)
            if blk is not None:
                out[name] = blk
        return out

    @classmethod
    def _latent_blocks(cls, st) -> dict:
        """The blocks with a factor in q(theta) (sampled globals)."""
        return {n: b for n, b in cls._blocks(st).items() if b.kind == "latent"}

    # -- q(theta) ------------------------------------------------------------------------------

    def _prior_standard(self, name, blk):
        f = jnp.asarray(0.0).dtype  # float64 under jax.enable_x64
        if name in ("init_state", "regime_gaussians"):
            return NIWStandard(jnp.asarray(blk.S, f), jnp.asarray(blk.m, f),
                               jnp.asarray(blk.lam, f), jnp.asarray(blk.nu, f))
        if name == "dynamics":
            return MNIWStandard(jnp.asarray(blk.S, f), jnp.asarray(blk.M, f),
                                jnp.asarray(blk.V, f), jnp.asarray(blk.nu, f))
        return DirichletStandard(jnp.asarray(blk.alpha, f))

    @staticmethod
    def _ridges(name, blk) -> dict:
        """Ridges of the MNIW's unconstrained map, kept below the prior's own scales.

        The VB target of a regime that no data is assigned to is its prior; the research
        code's fixed 1e-3 ridge on the column precision ``V`` equals our models' prior
        ``V0 = 1e-3 I``, i.e. the boundary of the parametrisation, where the softplus slope
        vanishes and natural-gradient steps in the raw coordinates explode (NaN after ~500
        steps on mocap6 with 5 of 8 regimes unused).  Posterior ``V`` and ``S`` never fall
        below the prior's (conjugate updates add PSD terms), so ``1e-3 x`` the prior's
        smallest eigenvalue keeps every reachable target well inside."""
        if name != "dynamics":
            return {}
        lo = lambda A: float(np.min(np.linalg.eigvalsh(np.asarray(A, np.float64))))
        return dict(jitter_S=min(1e-3, 1e-3 * lo(blk.S)), jitter_V=min(1e-3, 1e-3 * lo(blk.V)))

    def _init_unconstrained(self, name, st, key):
        f = jnp.asarray(0.0).dtype  # float64 under jax.enable_x64
        c = self.init
        D, K = st.D, st.K
        eye = jnp.eye(D, dtype=f)
        if name == "init_state":
            std = NIWStandard(D * c["S"] * eye, jnp.zeros((D,), f), jnp.asarray(c["lam"], f),
                              jnp.asarray(D + c["nu"], f))
            return niw_to_unconstrained(niw_to_natural(std))
        if name == "regime_gaussians":  # random means, so that the regimes start apart
            std = NIWStandard(jnp.broadcast_to(D * c["S"] * eye, (K, D, D)),
                              jax.random.normal(key, (K, D), f), jnp.full((K,), c["lam"], f),
                              jnp.full((K,), D + c["nu"], f))
            return niw_to_unconstrained(niw_to_natural(std))
        if name == "dynamics":
            Din = D + 1 if st.dynamics.bias else D
            M = c["loc_sd"] * jax.random.normal(key, (K, D, Din), f)
            M = M.at[:, jnp.arange(D), jnp.arange(D)].set(0.9)
            std = MNIWStandard(jnp.broadcast_to(D * c["S"] * eye, (K, D, D)), M,
                               jnp.broadcast_to(c["lam"] * jnp.eye(Din, dtype=f), (K, Din, Din)),
                               jnp.full((K,), D + c["nu"], f))
            return mniw_to_unconstrained(mniw_to_natural(std),
                                         **self._ridges(name, self._blocks(st)[name]))
        if name == "pi0":
            alpha = jnp.full((K,), c["kappa"] + 0.01, f)
        else:
            alpha = jnp.where(jnp.eye(K, dtype=bool), c["alpha_ii"] + 0.01, c["alpha_ij"] + 0.01)
            alpha = alpha.astype(f)
        return dirichlet_to_unconstrained(dirichlet_to_natural(DirichletStandard(alpha)))

    def _block_sites(self, name, st) -> tuple[type, dict]:
        """The block's ``*Unconstrained`` type and ``{field: site name}``, the site names being
        ``f"{prefix}{block}.{field}"`` (traced shapes only, nothing is computed)."""
        shapes = jax.eval_shape(lambda k: self._init_unconstrained(name, st, k),
                                jax.random.key(0))
        return type(shapes), {f: f"{self.prefix}{name}.{f}" for f in shapes._fields}

    def _register_block(self, name, st):
        """One ``numpyro.param`` per field (plain arrays, which NumPyro's scan replay and
        constraint machinery need)."""
        cls, sites = self._block_sites(name, st)
        fields = {}
        for f, site in sites.items():
            init = lambda k, f=f: getattr(self._init_unconstrained(name, st, k), f)
            fields[f] = numpyro.param(site, init)
        return cls(**fields)

    def _qtheta(self, st):
        """Register q(theta); return (standard parameters dict, global KL, expected global
        potentials).

        Latent blocks get a q(theta) factor (``*_qtheta_terms``: standard parameters, expected
        statistics and prior KL, all computed from standard form so that float32 never
        recovers ``S`` from ``eta1 = S + M V M'``; with ``natural_gradients`` they carry the
        natural-gradient VJP).  ``numpyro.param`` and constant blocks enter the potentials as
        point masses (``E[t] = t(value)``), without KL; params get ordinary gradients.  The
        potentials are `SLDSGlobalPotentials` (slds / lds) or `IIDGlobalPotentials`
        (hmm / gmm).
        """
        qtheta, stats, kl = {}, {}, 0.0
        terms = {"init_state": niw_qtheta_terms, "regime_gaussians": niw_qtheta_terms,
                 "dynamics": mniw_qtheta_terms, "pi0": dirichlet_qtheta_terms,
                 "P": dirichlet_qtheta_terms}
        for name, blk in self._blocks(st).items():
            if blk.kind != "latent":
                stats[name] = self._point_stats(name, blk, st)
                continue
            u = self._register_block(name, st)
            std, mu, kl_block = terms[name](u, self._prior_standard(name, blk),
                                            natgrad=self.natural_gradients,
                                            **self._ridges(name, blk))
            qtheta[name], stats[name] = std, mu
            kl = kl + kl_block
        if st.family == "lds":
            g = lds_expected_potentials(stats["init_state"], stats["dynamics"])
        elif st.family == "slds":
            g = slds_expected_potentials(stats["init_state"], stats["dynamics"],
                                         stats["pi0"].log_pi, stats["P"].log_pi)
        else:
            g = iid_expected_potentials(stats["regime_gaussians"], stats["pi0"].log_pi,
                                        stats["P"].log_pi if "P" in stats else None)
        return qtheta, jnp.asarray(kl), g

    def _point_values(self, blk, st) -> list:
        """Current values of a param / constant block, in the discovery layout (``[K, ...]``).

        ``numpyro.param`` sites are re-declared here with the model's constraint (the guide's
        declaration takes precedence in SVI, with the same value), so that they receive the
        current parameter value under ``SVI`` / ``substitute``."""
        f = jnp.asarray(0.0).dtype
        out = []
        for site, val in self._block_fields(blk):
            if site is None:
                v = jnp.asarray(val, f)
            else:
                init = np.reshape(val, st.sites[site].shape)
                v = numpyro.param(site, jnp.asarray(init, f),
                                  constraint=self._param_constraints.get(site,
                                                                         dist.constraints.real))
                v = jnp.reshape(jnp.asarray(v, f), val.shape)
            out.append(v)
        return out

    def _point_stats(self, name, blk, st):
        """Sufficient statistics ``t(value)`` of a point-estimate / constant block."""
        vals = self._point_values(blk, st)
        if name in ("pi0", "P"):
            (p,) = vals
            return DirichletStats(jnp.log(jnp.maximum(p, jnp.finfo(p.dtype).tiny)))
        cov, loc = vals
        prec = psd_inv(cov)
        half_logdet = -0.5 * psd_logdet(cov)
        if name == "dynamics":  # loc is X = [A | b], [K, D, Din]
            XtL = jnp.einsum("kij,kil->kjl", loc, prec)  # X' Lambda  [K, Din, D]
            return MNIWStats(-0.5 * prec, XtL, -0.5 * XtL @ loc, half_logdet)
        tau_mu = jnp.einsum("...ij,...j->...i", prec, loc)
        return NIWStats(-0.5 * prec, tau_mu, -0.5 * jnp.sum(loc * tau_mu, -1), half_logdet)

    def retract(self, params: dict, updates: dict, *, max_halvings: int = 8,
                guarded: bool = False) -> dict:
        """Turn SGD updates of the q(theta) parameters into exact natural-parameter steps.

        Natural-gradient SGD moves the unconstrained coordinates ``u`` along a straight line,
        which is the natural-parameter step ``eta - rho * natgrad`` (the natural gradient of
        the loss) only to first order.  For
        every q(theta) factor this returns instead the update that lands on
        ``eta(u) + J du`` exactly (``J = d eta / d u``), computed in standard parameters so
        that float32 loses nothing to cancellation; where that point leaves the family's
        domain (or the ridged parametrisation) the step is halved, per regime, up to
        `max_halvings` times, and dropped if still outside.  A conjugate step with rate
        ``rho <= 1`` (a convex combination of valid natural parameters) is always taken whole.
        :func:`numpyro_svae.natural_gradient` calls this when given the guide.

        Parameters
        ----------
        params : dict
            ``{site name: value}``, at least the q(theta) sites (``f"{prefix}{block}.{field}"``);
            other entries are ignored.
        updates : dict
            Proposed additive updates, same names (e.g. ``-lr * grad`` from ``optax.sgd``);
            q(theta) sites absent from `updates` (or masked out, ``optax.MaskedNode``) are
            left alone.
        max_halvings : int
            Halvings tried after the full step.
        guarded : bool
            Keep the SGD update itself for every factor (per regime) where the straight line
            ``u + du`` is a usable approximation of the exact step, and take the exact step
            only where it is not (it lands farther from the exact step's end point than the
            current point is; :func:`numpyro_svae.expfam.natgrad.natural_retract`).

        Returns
        -------
        dict
            `updates` with the q(theta) entries replaced by ``u_new - u``.

        Raises
        ------
        RuntimeError
            The guide has not been called yet (its structure is unknown).
        ValueError
            The guide was built with ``natural_gradients=False``: its gradients are Euclidean,
            and stepping along them in natural coordinates is not a natural-gradient method.
        """
        if not self.natural_gradients:
            raise ValueError(
                "SVAEGuide.retract needs natural gradients; this guide was built with "
                "natural_gradients=False (Euclidean gradients). Use plain SGD for it, i.e. "
                "natural_gradient(...) without `guide`.")
        st = self.structure
        steps = {"init_state": niw_retract, "regime_gaussians": niw_retract,
                 "dynamics": mniw_retract, "pi0": dirichlet_retract, "P": dirichlet_retract}
        out = dict(updates)
        for name, blk in self._latent_blocks(st).items():
            cls, sites = self._block_sites(name, st)
            keys = list(sites.values())
            if not all(k in updates and isinstance(updates[k], jax.Array | np.ndarray)
                       for k in keys):
                continue
            missing = [k for k in keys if k not in params]
            if missing:
                raise ValueError(f"SVAEGuide.retract: `params` lacks the q(theta) sites {missing}")
            u = cls(*(params[k] for k in keys))
            du = cls(*(updates[k] for k in keys))
            u_new, _ = steps[name](u, du, max_halvings=max_halvings, guarded=guarded,
                                   **self._ridges(name, blk))
            for k, new, old, d in zip(keys, u_new, u, du, strict=True):
                step = new - old
                if guarded:  # a kept straight-line step passes through bit for bit
                    step = jnp.where(new == old + d, d, step)
                out[k] = step.astype(jnp.result_type(updates[k]))
        return out

    def qtheta_standard(self, eta: dict) -> dict:
        """Standard-form parameters of q(theta) from its natural parameters."""
        conv = {"init_state": niw_to_standard, "regime_gaussians": niw_to_standard,
                "dynamics": mniw_to_standard, "pi0": dirichlet_to_standard,
                "P": dirichlet_to_standard}
        return {k: conv[k](v) for k, v in eta.items()}

    # -- data ----------------------------------------------------------------------------------

    def _data_pass(self, st, args, kwargs, plate_idx):
        """Run the model (hidden from outer handlers) to read the observed batch and mask."""
        subs = {}
        for name, info in st.sites.items():
            if info.kind == "latent" and info.role in ("k", "k_init"):
                subs[name] = jnp.zeros(info.shape, jnp.int32)
            elif info.kind == "latent" and info.role in ("z", "z_init"):
                subs[name] = jnp.zeros(info.shape)
        for blk in self._latent_blocks(st).values():
            for site, val in self._block_values(blk, st):
                subs[site] = val
        if plate_idx is not None:
            subs[st.sequence_plate] = plate_idx
        lengths = kwargs.get("lengths")
        if lengths is not None and st.family == "gmm":
            raise ValueError("`lengths` is meaningless for a mixture model (one latent per data "
                             "point); mask the observations instead")
        if lengths is not None and (jnp.ndim(lengths) != 1 or jnp.shape(lengths)[0] not in
                                    (st.N, st.subsample_size)):
            raise ValueError(
                f"`lengths` must have shape [N] = [{st.N}]; got {list(jnp.shape(lengths))}")
        # a key from the caller's seed, not a constant: with a constant key XLA would
        # constant-fold the model's random parameter initialisations (minutes of compile)
        data_key = numpyro.prng_key()
        data_key = jax.random.key(0) if data_key is None else data_key
        with handlers.block():
            model = handlers.substitute(self.model, data=subs)
            try:
                tr = handlers.trace(handlers.seed(model, rng_seed=data_key)).get_trace(
                    *args, **self._model_kwargs(kwargs))
            except (ValueError, TypeError, IndexError) as err:
                raise ValueError(
                    f"running the model to read its observed site {st.obs.name!r} failed; "
                    f"check the shapes of the data, mask and other arguments: {err}") from err
        if st.family == "gmm":
            return self._observed_iid(st, tr)
        return self._observed(st, tr, kwargs)

    def _iid_site_mask(self, site):
        """Mixture (gmm) observed site ``[B, Dx]``: (innermost dist, mask over its
        elementwise log-prob in value layout or None, sequences axis)."""
        value = jnp.shape(site["value"])
        if len(value) != 2:
            raise ValueError(
                f"observed site {site['name']!r} of a mixture model must have a value of shape "
                f"[N, Dx]; got {list(value)}")
        base, mask, lp_shape = _unwrap_masks(site["fn"], value)
        if site.get("mask") is not None and not is_identically_one(site["mask"]):
            m = jnp.broadcast_to(jnp.asarray(site["mask"], bool), site["fn"].batch_shape)
            m = m.reshape(m.shape + (1,) * (len(lp_shape) - m.ndim))
            mask = m if mask is None else mask & m
        if mask is not None:
            mask = jnp.broadcast_to(mask, lp_shape)
        n_axis = 0
        batch_ndim = len(value) - site["fn"].event_dim
        for frame in site["cond_indep_stack"]:
            if frame.name == self.structure.sequence_plate:
                n_axis = batch_ndim + frame.dim
        if n_axis not in (0, 1):
            raise ValueError(
                f"observed site {site['name']!r}: the data-point axis must be one of the two "
                f"axes of its value {list(value)}")
        return base, mask, n_axis

    def _observed_iid(self, st, tr) -> _Observed:
        """`_Observed` of a mixture: each data point is a length-1 sequence ``[B, 1, Dx]``."""
        site = self._obs_site(st, tr)
        plate_site = tr.get(st.sequence_plate)
        plate_idx = None if plate_site is None else plate_site["value"]
        base, mask, n_axis = self._iid_site_mask(site)
        x = jnp.asarray(site["value"])
        xN = (x if n_axis == 0 else x.T)[:, None, :]  # [B, 1, Dx]
        if mask is None:
            entry = jnp.ones(xN.shape[:2], bool)
        else:
            entry = (mask if n_axis == 0 or mask.ndim == 1 else mask.T)[:, None]
        full = entry if entry.ndim == 3 else entry[..., None]

        def nonfinite_message(bad):
            n, _, d = np.argwhere(bad)[0]
            return (f"observed site {site['name']!r} has NaN/inf at observed entries (first at "
                    f"data point {n}, dim {d}); mask them out")

        _check_finite(x, xN, full, nonfinite_message)
        xN = jnp.where(full, xN, 0.0)
        step = entry if entry.ndim == 2 else jnp.any(entry, axis=-1)
        scale = 1.0 if site["scale"] is None else site["scale"]
        return _Observed(xN, entry, step, scale, plate_idx, n_axis, 1 - n_axis)

    @staticmethod
    def _block_fields(blk) -> list:
        """``[(site or None, value)]`` of a block: ``(cov, mean)``, ``(cov, matrix)`` or
        ``(probs,)``, values as found by the discovery (``[K, ...]`` arrays for the MNIW)."""
        a = np.asarray
        if hasattr(blk, "site"):
            return [(blk.site, a(blk.value))]
        if hasattr(blk, "matrix_site"):
            return [(blk.cov_site, a(blk.cov_value)), (blk.matrix_site, a(blk.matrix_value))]
        return [(blk.cov_site, a(blk.cov_value)), (blk.mean_site, a(blk.mean_value))]

    @staticmethod
    def _block_values(blk, st=None) -> list:
        """``[(site, value)]`` of the block's sites (constants, which have none, left out);
        with `st`, values in the model's site shapes (e.g. no ``[K]`` axis for an LDS)."""
        out = [(n, jnp.asarray(v)) for n, v in SVAEGuide._block_fields(blk) if n is not None]
        if st is not None:
            out = [(n, jnp.reshape(v, st.sites[n].shape)) for n, v in out]
        return out

    def _obs_site(self, st, tr):
        name = st.obs.name
        site = tr.get(name)
        if site is None or site["type"] != "sample" or not site["is_observed"]:
            site = tr.get(name + "_observed", site)
        if site is None or site["type"] != "sample" or not site["is_observed"]:
            raise ValueError(
                f"observed site {name!r} has no data in this call; pass the observations "
                "(the model's `obs=` argument) to SVI / the guide")
        return site

    def _layout(self, st, site):
        value = jnp.shape(site["value"])
        if len(value) != 3:
            raise ValueError(
                f"observed site {site['name']!r} must have a value of shape [N, T, Dx] (or "
                f"[T, N, Dx]); got {list(value)}")
        batch_ndim = len(value) - site["fn"].event_dim
        n_axis = None
        for frame in site["cond_indep_stack"]:
            if frame.name == st.sequence_plate:
                n_axis = batch_ndim + frame.dim
        if n_axis is None:  # not in the plate: find the batch axis by size
            n_axis = 0 if value[0] == st.subsample_size else 1
        if n_axis not in (0, 1):
            raise ValueError(
                f"observed site {site['name']!r}: the sequences axis must be one of the two "
                f"leading axes of its value {list(value)}")
        t_axis = 1 - n_axis
        if value[t_axis] != st.T:
            raise ValueError(
                f"observed site {site['name']!r} has {value[t_axis]} time steps (shape "
                f"{list(value)}) but the model's latent chain has T = {st.T}")
        return n_axis, t_axis

    def _lengths_mask(self, kwargs, B, T, plate_idx, N):
        lengths = kwargs.get("lengths")
        if lengths is None:
            return None
        lengths = jnp.asarray(lengths)
        if lengths.ndim != 1 or lengths.shape[0] not in (B, N):
            raise ValueError(
                f"`lengths` must have shape [N] = [{N}] (or the batch [{B}]); got "
                f"{list(lengths.shape)}")
        if lengths.shape[0] != B and plate_idx is not None:
            lengths = lengths[plate_idx]
        if _is_concrete(lengths) and (np.any(np.asarray(lengths) < 1)
                                      or np.any(np.asarray(lengths) > T)):
            raise ValueError(f"`lengths` must lie in [1, T = {T}]; got {np.asarray(lengths)}")
        if not _is_concrete(lengths):
            _eager.defer_check(
                (lengths < 1) | (lengths > T),
                lambda bad: f"`lengths` must lie in [1, T = {T}]; got lengths out of range at "
                            f"sequences {np.flatnonzero(bad).tolist()}")
        return jnp.arange(T)[None, :] < lengths[:, None]  # [B, T]

    def _site_mask(self, site, st, kwargs, plate_idx):
        """(innermost dist, mask in value layout over the elementwise log-prob, layout)."""
        value = site["value"]
        base, mask, lp_shape = _unwrap_masks(site["fn"], jnp.shape(value))
        if site.get("mask") is not None and not is_identically_one(site["mask"]):
            m = jnp.broadcast_to(jnp.asarray(site["mask"], bool), site["fn"].batch_shape)
            m = m.reshape(m.shape + (1,) * (len(lp_shape) - m.ndim))
            mask = m if mask is None else mask & m
        n_axis, t_axis = self._layout(st, site)
        B, T = jnp.shape(value)[n_axis], jnp.shape(value)[t_axis]
        lm = self._lengths_mask(kwargs, B, T, plate_idx, st.N)
        if lm is not None:
            lm = lm if n_axis == 0 else lm.T
            lm = lm.reshape(lm.shape + (1,) * (len(lp_shape) - 2))
            mask = lm if mask is None else mask & lm
        if mask is not None:
            mask = jnp.broadcast_to(mask, lp_shape)
        return base, mask, n_axis, t_axis

    def _observed(self, st, tr, kwargs) -> _Observed:
        site = self._obs_site(st, tr)
        plate_site = tr.get(st.sequence_plate)
        plate_idx = None if plate_site is None else plate_site["value"]
        fshape = tuple(site["fn"].shape(site["kwargs"].get("sample_shape", ())))
        if tuple(jnp.shape(site["value"])) != fshape:
            raise ValueError(
                f"observed site {site['name']!r}: data of shape {list(jnp.shape(site['value']))}"
                f" but the model's distribution has shape {list(fshape)}")
        base, mask, n_axis, t_axis = self._site_mask(site, st, kwargs, plate_idx)
        x = jnp.asarray(site["value"])
        perm = (n_axis, t_axis, 2)
        xN = jnp.transpose(x, perm)
        if mask is None:
            entry = jnp.ones(xN.shape[:2], bool)
        else:
            entry = jnp.transpose(mask, perm[: mask.ndim])
        full = entry if entry.ndim == 3 else entry[..., None]

        def nonfinite_message(bad):
            n, t, d = np.argwhere(bad)[0]
            return (f"observed site {site['name']!r} has NaN/inf at observed entries "
                    f"(first at sequence {n}, step {t}, dim {d}); mask them out")

        _check_finite(x, xN, full, nonfinite_message)
        xN = jnp.where(full, xN, 0.0)
        step = entry if entry.ndim == 2 else jnp.any(entry, axis=-1)
        scale = 1.0 if site["scale"] is None else site["scale"]
        return _Observed(xN, entry, step, scale, plate_idx, n_axis, t_axis)

    # -- encoder and inference -------------------------------------------------------------------

    def _encoder_fn(self):
        if isinstance(self.encoder, eqx.Module):
            return eqx_module(self.encoder_name, self.encoder)
        params = numpyro.param(self.encoder_name + "$params", self.encoder_params)
        return lambda x, m: self.encoder(params, x, m)

    def _potentials(self, st, obs: _Observed):
        enc = self._encoder_fn()
        R, r = jax.vmap(enc)(obs.x, obs.entry_mask)
        B, T = obs.x.shape[:2]
        for nm, a in (("R", R), ("r", r)):
            if a.shape != (B, T, st.D):
                raise ValueError(
                    f"the encoder must return node potentials (R, r) of shape [T, D] = "
                    f"[{T}, {st.D}] per sequence (D = latent dim of site {st.z_site!r}); got "
                    f"{nm} of shape {list(a.shape[1:])}")
        return R, r

    def _infer(self, args, kwargs, plate_idx=None, init_key=None) -> _Inference:
        """Everything both the guide and the ELBO need: q(theta), potentials, mean field.

        Registers the q(theta) and encoder parameters (``numpyro.param``); must run under a
        seed handler (the q(k) initialisation is random).
        """
        st = self._setup(args, kwargs)
        obs = self._data_pass(st, args, kwargs, plate_idx)
        qtheta, gkl, g = self._qtheta(st)
        R, r = self._potentials(st, obs)
        B = R.shape[0]
        key = numpyro.prng_key() if init_key is None else init_key
        keys = jax.random.split(key, B)

        if st.family in ("hmm", "gmm"):
            mf, info = _batched_mean_field_iid(R, r, g, obs.step_mask, keys,
                                               options=self.options, chain=st.family == "hmm",
                                               init_concentration=self.init_concentration,
                                               random_init=st.K > 1)
            return _Inference(obs, qtheta, gkl, g, R, r, mf, info)
        warm = None
        if self.warm_start and st.K > 1:
            # last step's q(k) per sequence (SVI keeps it in svi_state.mutable_state)
            T = R.shape[1]
            Tk = T if st.leading_regime else T - 1
            dt = R.dtype
            state = numpyro.primitives.mutable(WARM_START_SITE, {
                "marginals": jnp.full((st.N, Tk, st.K), 1.0 / st.K, dt),
                "valid": jnp.zeros((st.N,), bool)})
            idx = jnp.arange(B) if obs.plate_idx is None else obs.plate_idx
            init_q = jax.lax.stop_gradient(state["marginals"][idx])
            mf, info = _batched_mean_field_warm(
                R, r, g, obs.step_mask, keys, init_q, state["valid"][idx],
                options=self.options, leading=st.leading_regime,
                init_concentration=self.init_concentration,
                best_of_random=self.warm_start == "best")
            new_q = jax.lax.stop_gradient(mf.marginals[:, :Tk])
            ok = jnp.all(jnp.isfinite(new_q), axis=(1, 2))
            warm = {
                "marginals": state["marginals"].at[idx].set(
                    jnp.where(ok[:, None, None], new_q, init_q).astype(dt)),
                "valid": state["valid"].at[idx].set(ok | state["valid"][idx]),
            }
        else:
            mf, info = _batched_mean_field(R, r, g, obs.step_mask, keys, options=self.options,
                                           leading=st.leading_regime,
                                           init_concentration=self.init_concentration,
                                           random_init=st.K > 1)
        if st.dangling_regime:  # the last regime: q = normalised exp(E log P) rows, its KL
            mf = mf._replace(local_kl=mf.local_kl + _dangling_kl(mf.marginals[:, -1], g.log_P))
        return _Inference(obs, qtheta, gkl, g, R, r, mf, info, warm)

    # -- NumPyro guide -------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        """Sample every latent site of the model from q(theta) q(k) q(z)."""
        if self.compile_eager and _eager.eager_call_possible(args, kwargs):
            # eager call (SVI.init, ...): discover the structure eagerly (it keeps concrete
            # prior hyper-parameters), then run the body as one compiled program
            self._setup(args, kwargs)
            return _eager.call_compiled(self, self._body, args, kwargs)
        return self._body(*args, **kwargs)

    def _body(self, *args, **kwargs):
        """The guide proper (every distribution it emits must be a pytree)."""
        st = self._setup(args, kwargs)
        plate_idx = None
        if st.subsample_size < st.N:
            with numpyro.plate(st.sequence_plate, st.N, subsample_size=st.subsample_size) as ix:
                plate_idx = ix
        inf = self._infer(args, kwargs, plate_idx)
        self._record_diagnostics(inf.info)
        self._sample_globals(st, inf.qtheta)
        B = inf.R.shape[0]
        kz, kk = jax.random.split(numpyro.prng_key())
        plate = numpyro.plate(st.sequence_plate, st.N, subsample_size=B)
        if plate_idx is not None:
            plate = handlers.substitute(plate, data={st.sequence_plate: plate_idx})
        if st.family in ("hmm", "gmm"):
            self._sample_locals_iid(st, inf, plate, kk)
            return None
        z = _sample_states(kz, inf.mf)  # [B, T, D]
        pots = inf.mf.lds_potentials
        logZ = inf.mf.lds_log_normalizer

        log_qz = jax.tree_util.Partial(_chain_log_qz, z[:, :1], pots, logZ)
        with plate:
            numpyro.sample(st.z_init_site, dist.Delta(z[:, 0], event_dim=1))
            numpyro.sample(st.z_site, _ChainDist(jnp.swapaxes(z[:, 1:], 0, 1), log_qz,
                                                 event_dim=1, discrete=False))
        if st.family == "slds":
            k, hpots, hlogZ = _sample_regimes(kk, inf.mf, inf.globals, st.leading_regime)
            first = 1 if st.k_init_site is not None else 0
            if st.dangling_regime:  # append the last regime, drawn from its q row
                k, log_r = _sample_dangling(jax.random.fold_in(kk, 1), k, inf.globals.log_P)
                log_qk = jax.tree_util.Partial(_chain_log_qk_dangling, k[:, :first], hpots,
                                               hlogZ, log_r)
            else:
                log_qk = jax.tree_util.Partial(_chain_log_qk, k[:, :first], hpots, hlogZ)
            with plate:
                if first:
                    numpyro.sample(st.k_init_site, dist.Delta(k[:, 0]))
                numpyro.sample(st.k_site, _ChainDist(jnp.swapaxes(k[:, first:], 0, 1), log_qk,
                                                     event_dim=0, discrete=True))
        return None

    def _sample_locals_iid(self, st, inf, plate, key):
        """Local sites of an HMM / GMM: q(z_t) independent Gaussians, q(k) an HMM / iid."""
        mf = inf.mf
        loc, tril = mf.Ez, psd_cholesky(mf.cov)  # [B, T, D], [B, T, D, D]
        if st.family == "gmm":
            with plate:
                numpyro.sample(st.k_site, dist.Categorical(probs=mf.marginals[:, 0]))
                numpyro.sample(st.z_site, dist.MultivariateNormal(loc[:, 0], scale_tril=tril[:, 0]))
            return
        k, hpots, hlogZ = _sample_regimes_iid(key, mf, inf.globals)  # k [B, T]
        log_qk = jax.tree_util.Partial(_chain_log_qk, k[:, :1], hpots, hlogZ)
        sw = lambda a: jnp.swapaxes(a, 0, 1)
        with plate:
            numpyro.sample(st.k_init_site, dist.Delta(k[:, 0]))
            numpyro.sample(st.k_site, _ChainDist(sw(k[:, 1:]), log_qk, event_dim=0,
                                                 discrete=True))
            numpyro.sample(st.z_init_site, dist.MultivariateNormal(loc[:, 0],
                                                                   scale_tril=tril[:, 0]))
            numpyro.sample(st.z_site, dist.MultivariateNormal(sw(loc[:, 1:]),
                                                              scale_tril=sw(tril[:, 1:])))

    def _record_diagnostics(self, info: FixedPointInfo):
        numpyro.primitives.mutable(DIAGNOSTICS_SITE, _summary(info))

    def _plates(self, st, site):
        info = st.sites[site]
        plates = [numpyro.plate(n, s, dim=d) for (n, s, d) in info.plates
                  if n != st.sequence_plate]
        return plates

    def _sample_site(self, st, site, d):
        plates = self._plates(st, site)
        for p in plates:
            p.__enter__()
        try:
            return numpyro.sample(site, d)
        finally:
            for p in reversed(plates):
                p.__exit__(None, None, None)

    def _sample_globals(self, st, qtheta: dict):
        """Sample sites of the latent globals from q(theta) (``qtheta``: standard form)."""
        eta = qtheta
        if "init_state" in eta:
            blk = st.init_state
            p = niw_to_numpyro(eta["init_state"])
            S0 = self._sample_site(st, blk.cov_site, dist.InverseWishart(p.df, p.scale_matrix))
            self._sample_site(st, blk.mean_site,
                              dist.MultivariateNormal(p.loc, covariance_matrix=S0 / p.lam))
        if "regime_gaussians" in eta:
            blk = st.regime_gaussians
            p = niw_to_numpyro(eta["regime_gaussians"])
            Sig = self._sample_site(st, blk.cov_site, dist.InverseWishart(p.df, p.scale_matrix))
            self._sample_site(st, blk.mean_site, dist.MultivariateNormal(
                p.loc, covariance_matrix=Sig / p.lam[..., None, None]))
        if "dynamics" in eta:
            blk = st.dynamics
            p = mniw_to_numpyro(eta["dynamics"])
            cshape, mshape = st.sites[blk.cov_site].shape, st.sites[blk.matrix_site].shape
            sq = len(cshape) == 2  # model without a regimes axis (K = 1)
            df, S, M, Lc = p.df, p.scale_matrix, p.loc, p.scale_tril_column
            if sq:
                df, S, M, Lc = df[0], S[0], M[0], Lc[0]
            Q = self._sample_site(st, blk.cov_site, dist.InverseWishart(df, S))
            self._sample_site(st, blk.matrix_site, dist.MatrixNormal(M, psd_cholesky(Q), Lc))
            del mshape
        for name in ("pi0", "P"):
            if name in eta:
                self._sample_site(st, getattr(st, name).site,
                                  dist.Dirichlet(dirichlet_to_numpyro(eta[name])))

    # -- posterior -------------------------------------------------------------------------------

    def sample_posterior(self, rng_key, params: dict, *args, sample_shape: tuple = (),
                         **kwargs) -> dict:
        """Draws of every latent site of the model from the guide, as ``AutoGuide`` does.

        Parameters
        ----------
        rng_key : jax.random key
        params : dict
            Parameter values (``svi.get_params(state)`` / ``SVIRunResult.params``).
        *args, **kwargs
            The model's arguments (data included).
        sample_shape : tuple
            Leading shape of the draws (``()``: one draw).

        Returns
        -------
        dict
            Site name -> value of shape ``sample_shape + site shape`` (globals, ``z`` and
            ``k`` chains with the model's layouts).

        Raises
        ------
        ValueError
            On an eager call, as :meth:`posterior`: non-finite `params` (sites named) or
            NaN/inf at an observed entry of the data.
        """
        check_finite_params(params, "SVAEGuide.sample_posterior")

        def one(key):
            with handlers.trace() as tr, handlers.seed(rng_seed=key), \
                    handlers.substitute(data=params):
                self(*args, **kwargs)
            return {n: s["value"] for n, s in tr.items() if s["type"] == "sample"}

        sample_shape = tuple(sample_shape)
        if not sample_shape:
            return one(rng_key)
        # a loop of eager calls: each reuses the guide's compiled program (`compile_eager`)
        draws = [one(k) for k in jax.random.split(rng_key, int(np.prod(sample_shape)))]
        return {k: jnp.stack([d[k] for d in draws]).reshape(sample_shape + draws[0][k].shape)
                for k in draws[0]}

    def posterior(self, params: dict, *args, rng_key=None, **kwargs) -> SVAEPosterior:
        """Variational posterior of the sequences passed (e.g. ``svi.get_params(state)``).

        Parameters
        ----------
        params : dict
            Parameter values (``SVIRunResult.params`` / ``svi.get_params``).
        *args, **kwargs
            The model's arguments (data included).
        rng_key : jax.random key, optional
            Key for the random initial q(k) of the mean field (default ``key(0)``).

        Returns
        -------
        SVAEPosterior

        Raises
        ------
        ValueError
            On an eager call: `params` hold NaN/inf (the message names the sites; a diverged
            run), or the observed data hold NaN/inf at an observed entry (the message names
            the observed site and the first bad sequence, step and dim; mask such entries
            out).

        Notes
        -----
        Under the caller's ``jax.jit`` the parameters and data are traced and neither check
        can raise: non-finite parameters or observed entries then give NaN (or meaningless)
        outputs.  Check
        ``params`` (and the data) for finiteness before a jitted call.  During training the
        same non-finite values make the loss or update non-finite, and `natural_gradient`
        skips such steps (:func:`numpyro_svae.skipped_steps` counts them).
        """
        check_finite_params(params, "SVAEGuide.posterior")
        rng_key = jax.random.key(0) if rng_key is None else rng_key
        with handlers.block(), handlers.seed(rng_seed=rng_key), \
                handlers.substitute(data=params):
            inf = self._infer(args, kwargs)
        marginals, counts = inf.mf.marginals, inf.mf.trans_counts
        if self.structure.dangling_regime:  # append q(k_{T-1}) = q(k_{T-2}) r
            last = marginals[:, -1]  # [N, K]
            r = jax.nn.softmax(inf.globals.log_P, axis=-1)
            marginals = jnp.concatenate([marginals, (last @ r)[:, None]], 1)
            counts = counts + last[:, :, None] * r
        return SVAEPosterior(
            regime_marginals=marginals,
            trans_counts=counts,
            latent_mean=inf.mf.Ez,
            latent_cov=inf.mf.cov,
            local_kl=inf.mf.local_kl,
            qtheta=inf.qtheta,
            global_kl=inf.global_kl,
            mask=inf.obs.step_mask,
            diagnostics=inf.info,
        )


def _nonfinite_param_sites(params: dict) -> list[str]:
    """Names of the parameter sites holding NaN/inf among their concrete floating leaves
    (traced leaves, e.g. under the caller's ``jax.jit``, cannot be inspected: skipped)."""
    bad = []
    for name, value in params.items():
        for leaf in jax.tree_util.tree_leaves(value):
            if isinstance(leaf, jax.core.Tracer) or not hasattr(leaf, "dtype"):
                continue
            if jnp.issubdtype(leaf.dtype, jnp.inexact) and not np.all(np.isfinite(leaf)):
                bad.append(name)
                break
    return bad


def check_finite_params(params: dict, caller: str) -> None:
    """Refuse parameters holding NaN/inf, naming the sites (eager calls only).

    Called by the public entry points that take fitted parameters (`SVAEGuide.posterior`,
    `predict.impute`, ...), never inside SVI's traced guide calls.  Under a caller's
    ``jax.jit`` the values are tracers and nothing can be reported: the outputs are NaN or
    meaningless.
    """
    bad = _nonfinite_param_sites(params)
    if bad:
        raise ValueError(
            f"{caller}: `params` hold NaN/inf at the parameter site(s) {bad}. Such parameters "
            "come from a diverged run: standardise the data (zero mean, unit variance per "
            "channel) or lower the learning rates (`natgrad_lr`, the `other` optimizer's); "
            "`numpyro_svae.skipped_steps(svi_state)` counts the steps the optimizer skipped "
            "as non-finite")


def _check_finite(x, xN, full, message) -> None:
    """NaN/inf at observed entries: raise now (concrete data) or after a compiled eager call
    returns (`_eager.defer_check`; a no-op under the caller's jit)."""
    if _is_concrete(x) and _is_concrete(full):
        bad = ~np.isfinite(np.asarray(xN)) & np.asarray(full)
        if bad.any():
            raise ValueError(message(bad))
    else:
        _eager.defer_check(~jnp.isfinite(xN) & full, message)


def _call_signature(args: tuple, kwargs: dict):
    """Hashable shapes-and-static-values signature of a call (None if not hashable)."""
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    sig = tuple(("array", tuple(np.shape(x)), str(x.dtype)) if hasattr(x, "dtype")
                and hasattr(x, "shape") else x for x in leaves)
    try:
        hash((treedef, sig))
    except TypeError:
        return None
    return treedef, sig


def _check_same_globals(first, st) -> None:
    """Data of another size must give the same global blocks (shared q(theta))."""
    a = (first.family, first.K, first.D, tuple(sorted(first.latent_sites)))
    b = (st.family, st.K, st.D, tuple(sorted(st.latent_sites)))
    if a != b:
        raise ValueError(
            "SVAEGuide: these arguments give a model of another shape than the one the guide "
            f"was set up with (family, K, D, latent sites: {a} vs {b}); use one guide per "
            "model shape")


def _summary(info: FixedPointInfo) -> dict:
    """Batch summary of the inner-solver diagnostics (fixed shapes: scalars)."""
    f = jnp.float32
    return {
        "num_iters_mean": jnp.mean(info.num_iters.astype(f)),
        "num_iters_max": jnp.max(info.num_iters).astype(f),
        "converged_frac": jnp.mean(info.converged.astype(f)),
        "fallback_frac": jnp.mean(info.used_fallback.astype(f)),
        "rel_change_max": jnp.max(jnp.nan_to_num(info.rel_change.astype(f))),
    }


_ = DirichletNatural  # re-exported type for annotations in docs


# ------------------------------------------------------------------------------------------
# compiled batch kernels (jit so that eager calls, e.g. SVI.init or Predictive, are fast;
# inside the caller's jit they are inlined)
# ------------------------------------------------------------------------------------------


def _batched_mean_field_impl(R, r, g, step_mask, keys, *, options, leading, init_concentration,
                             random_init):
    def one(Rn, rn, mn, kn):
        return mf_fixed_point(Rn, rn, g, mask=mn, init_key=kn if random_init else None,
                              options=options, leading_regime=leading,
                              init_concentration=init_concentration)

    return jax.vmap(one)(R, r, step_mask, keys)


_batched_mean_field = jax.jit(
    _batched_mean_field_impl,
    static_argnames=("options", "leading", "init_concentration", "random_init"))


def _batched_mean_field_warm_impl(R, r, g, step_mask, keys, init_q, valid, *, options, leading,
                                  init_concentration, best_of_random=False):
    """As `_batched_mean_field_impl`, starting from ``init_q [B, Tk, K]`` where ``valid [B]``
    (the random initialisation elsewhere).  ``best_of_random``: also from the random q(k),
    keeping per sequence the fixed point with the smaller ``surrogate`` (= the larger
    mean-field objective; a non-finite one never wins)."""
    K = init_q.shape[-1]

    def one(Rn, rn, mn, kn, qn, vn):
        alpha = jnp.full((K,), init_concentration, R.dtype)
        q_rand = jax.random.dirichlet(kn, alpha, shape=qn.shape[:1], dtype=R.dtype)
        warm = mf_fixed_point(Rn, rn, g, mask=mn, init_marginals=jnp.where(vn, qn, q_rand),
                              options=options, leading_regime=leading)
        if not best_of_random:
            return warm
        fresh = mf_fixed_point(Rn, rn, g, mask=mn, init_marginals=q_rand, options=options,
                               leading_regime=leading)
        sw, sf = warm[0].surrogate, fresh[0].surrogate
        take = jnp.isfinite(sf) & ((sf < sw) | ~jnp.isfinite(sw))
        return jax.tree.map(lambda a, b: jnp.where(take, a, b), fresh, warm)

    return jax.vmap(one)(R, r, step_mask, keys, init_q, valid)


_batched_mean_field_warm = jax.jit(
    _batched_mean_field_warm_impl,
    static_argnames=("options", "leading", "init_concentration", "best_of_random"))


def _batched_mean_field_iid_impl(R, r, g, step_mask, keys, *, options, chain,
                                 init_concentration, random_init):
    T, K = R.shape[1], g.c.shape[0]

    def one(Rn, rn, mn, kn):
        init = None if random_init else jnp.ones((T, K), rn.dtype)
        return mf_fixed_point_iid(Rn, rn, g, mask=mn, init_key=kn if random_init else None,
                                  init_marginals=init, options=options, chain=chain,
                                  init_concentration=init_concentration)

    return jax.vmap(one)(R, r, step_mask, keys)


_batched_mean_field_iid = jax.jit(
    _batched_mean_field_iid_impl,
    static_argnames=("options", "chain", "init_concentration", "random_init"))


def _iid_regime_log_lik(mf_one: IIDResult, g: IIDGlobalPotentials) -> Array:
    """``E_q(z)[log N(z_t; mu_k, tau_k^-1)]`` of one sequence, [T, K] (the q(k) potentials)."""
    return (-0.5 * jnp.einsum("kij,tij->tk", g.J, mf_one.Ezz) + mf_one.Ez @ g.h.T + g.c)


@jax.jit
def _sample_regimes_iid(key, mf, g):
    """Exact draws from q(k) of an HMM with iid latents: k [B, T], potentials, log Z."""
    hpots = jax.vmap(lambda m: HMMPotentials(g.log_pi0, g.log_P, _iid_regime_log_lik(m, g)))(mf)
    B = mf.Ez.shape[0]
    k = jax.vmap(hmm_sample)(jax.random.split(key, B), hpots)
    return k, hpots, mf.discrete_log_normalizer


def _dangling_kl(q_last: Array, log_P: Array) -> Array:
    """KL term of a dangling last regime drawn from ``r(j | i) = exp(E log P_ij) / Z_i``:
    ``-sum_i q(k_{T-2} = i) log Z_i`` per sequence (>= 0; 0 for a point-estimate P).

    q_last [B, K], log_P [K, K] -> [B]."""
    return -q_last @ jax.scipy.special.logsumexp(log_P, axis=-1)


@jax.jit
def _sample_dangling(key, k, log_P):
    """Append the dangling regime to k [B, T-1]: k [B, T] and log r [K, K]."""
    log_r = jax.nn.log_softmax(log_P, axis=-1)
    last = jax.random.categorical(key, log_r[k[:, -1]])
    return jnp.concatenate([k, last[:, None].astype(k.dtype)], 1), log_r


def _chain_log_qk_dangling(k_first, hpots, hlogZ, log_r, rest):
    """log q(k) per sequence with a dangling last regime (rest [T - first, B]) -> [B]."""
    k = jnp.concatenate([k_first, jnp.swapaxes(rest, 0, 1)], 1)
    return _hmm_log_q(k[:, :-1], hpots, hlogZ) + log_r[k[:, -2], k[:, -1]]


def _lds_log_psi(z: Array, pot: LDSPotentials) -> Array:
    """``log psi(z)`` of one chain (design.md, messages.lds), z [T, D] -> []."""
    quad = lambda J, a, b: jnp.einsum("...i,...ij,...j->...", a, J, b)
    out = -0.5 * quad(pot.J_init, z[0], z[0]) + pot.h_init @ z[0]
    out += jnp.sum(-0.5 * quad(pot.J11, z[:-1], z[:-1]) + quad(pot.J12, z[:-1], z[1:])
                   - 0.5 * quad(pot.J22, z[1:], z[1:]))
    out += jnp.sum(pot.h1 * z[:-1]) + jnp.sum(pot.h2 * z[1:])
    if pot.R.ndim == 2:
        out += jnp.sum(-0.5 * pot.R * z**2 + pot.r * z)
    else:
        out += jnp.sum(-0.5 * quad(pot.R, z, z) + jnp.sum(pot.r * z, -1))
    return out


@jax.jit
def _lds_log_q(z, pots, logZ):
    """log q(z) per sequence: z [B, T, D] -> [B]."""
    return jax.vmap(_lds_log_psi)(z, pots) - logZ


def _chain_log_qz(z_first, pots, logZ, rest):
    """log q(z) per sequence of a chain whose first state is held fixed.

    z_first [B, 1, D], rest [T-1, B, D] (time first, as scan sites) -> [B]."""
    return _lds_log_q(jnp.concatenate([z_first, jnp.swapaxes(rest, 0, 1)], 1), pots, logZ)


def _chain_log_qk(k_first, hpots, hlogZ, rest):
    """log q(k) per sequence: k_first [B, 0 or 1], rest [Tk - first, B] -> [B]."""
    return _hmm_log_q(jnp.concatenate([k_first, jnp.swapaxes(rest, 0, 1)], 1), hpots, hlogZ)


@jax.jit
def _sample_states(key, mf):
    """One reparameterised draw z [B, T, D] from q(z) of every sequence (any family)."""
    B = mf.Ez.shape[0]
    draw = mf_sample_iid if isinstance(mf, IIDResult) else mf_sample
    return jax.vmap(draw)(jax.random.split(key, B), mf)


def _hmm_potentials(g, mf_one: MFResult, leading: bool) -> HMMPotentials:
    eta = lds_to_hmm_log_potentials(mf_one.Ez, mf_one.Ezz, mf_one.Ezz_next, g)
    node = jnp.concatenate([jnp.zeros_like(eta[:1]), eta], 0) if leading else eta
    return HMMPotentials(g.log_pi0, g.log_P, node)


def _hmm_score(k: Array, pot: HMMPotentials) -> Array:
    out = pot.log_init[k[0]] + jnp.sum(pot.log_lik[jnp.arange(k.shape[0]), k])
    return out + jnp.sum(pot.log_trans[k[:-1], k[1:]])


@jax.jit
def _hmm_log_q(k, hpots, hlogZ):
    """log q(k) per sequence: k [B, Tk] -> [B]."""
    return jax.vmap(_hmm_score)(k, hpots) - hlogZ


@partial(jax.jit, static_argnames=("leading",))
def _sample_regimes(key, mf, g, leading):
    """Exact draws from q(k) (the HMM given the final q(z)): k [B, Tk], potentials, log Z."""
    hpots = jax.vmap(lambda m: _hmm_potentials(g, m, leading))(mf)
    B = mf.Ez.shape[0]
    k = jax.vmap(hmm_sample)(jax.random.split(key, B), hpots)
    return k, hpots, jax.vmap(hmm_log_normalizer)(hpots)

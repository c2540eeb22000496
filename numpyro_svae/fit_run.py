"""Internals of :func:`numpyro_svae.fitting.fit`: guides, compiled steps, one restart, checks.

Everything compiled is built once per fit (`build_problem`) and shared by the restarts,
which differ only in their keys and initial weights, so a restart costs steps, not
compilations.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from numpyro_svae._svi_state import strong_types
from numpyro_svae.fit_stages import Stage, StageSummary, SwitchStart, run_stage

__all__ = ["Problem", "RestartResult", "build_problem", "run_restart", "validation_checks"]

VAL_PARTICLES = 4  # z draws of the validation ELBO's reconstruction term


class Problem(NamedTuple):
    """What the restarts share (built by `build_problem`)."""

    model: Callable
    data: Any  # fit._Data
    family: str
    K: int
    init: str  # "arhmm" | "random"
    guide: Any  # SVAEGuide of the model
    guide_warm: Any  # SVAEGuide of the one-regime model (`guide` when K = 1), or None
    svi_warm: Any  # numpyro SVI of the warm-up stage, or None
    svi_train: Any
    step_warm: Callable | None  # (state, kl weight) -> (state, loss), compiled
    step_train: Callable
    val_fn: Callable | None  # (params, key) -> recon - local KL of the validation data
    kw_tr: dict  # model kwargs of the training sequences
    kw_warm: dict  # ... of the one-regime model
    warmup: Stage | None
    train: Stage
    make_encoder: Callable | None  # key -> fresh default encoder
    notes: tuple  # warnings found while building


class RestartResult(NamedTuple):
    params: dict
    losses: np.ndarray  # [S] per-frame losses, all stages
    stages: tuple  # StageSummary, ...
    val_elbo: float




def _split_arrays(kw: dict) -> tuple[dict, dict]:
    """(static kwargs, array kwargs): arrays are traced, the rest closed over."""
    import jax

    arrays = {k: v for k, v in kw.items() if isinstance(v, np.ndarray | jax.Array)}
    return {k: v for k, v in kw.items() if k not in arrays}, arrays


def _optimizer(guide, stage: Stage):
    import optax

    from numpyro_svae.optim import natural_gradient

    if stage.natgrad_schedule == "cosine":
        rate = dict(schedule=optax.cosine_decay_schedule(stage.natgrad_lr, stage.max_steps,
                                                         alpha=0.0))
    else:
        rate = dict(natgrad_lr=float(stage.natgrad_lr))
    return natural_gradient(**rate, other=optax.adam(stage.lr), guide=guide)


def _stepper(svi, x: np.ndarray, kw: dict) -> Callable:
    """A compiled ``(state, local_kl_weight) -> (state, loss)`` (``stable_update``); the
    weight is traced, so the KL warm-up and the plain steps share one compilation."""
    import jax
    import jax.numpy as jnp
    from numpyro.infer import SVI

    from numpyro_svae.elbo import SVAE_ELBO

    static, arrays = _split_arrays(kw)
    arrays = {k: jnp.asarray(v) for k, v in arrays.items()}

    def step(state, w, x_, arr):
        weighted = SVI(svi.model, svi.guide, svi.optim, loss=SVAE_ELBO(local_kl_weight=w))
        # what SVI.init set up on `svi` (called before the first step)
        weighted.constrain_fn, weighted.static_kwargs = svi.constrain_fn, svi.static_kwargs
        return weighted.stable_update(state, x_, **static, **arr)

    compiled = jax.jit(step)
    xj = jnp.asarray(x)
    return lambda state, w: compiled(state, w, xj, arrays)


def _val_function(model, guide, x: np.ndarray, kw: dict) -> Callable:
    """Compiled ``(params, key) -> sum of (reconstruction - local KL)`` of the validation
    sequences under q(theta) (no global KL: it belongs to the training data)."""
    import jax
    import jax.numpy as jnp

    from numpyro_svae.elbo import SVAE_ELBO

    static, arrays = _split_arrays(kw)
    arrays = {k: jnp.asarray(v) for k, v in arrays.items()}
    elbo = SVAE_ELBO(num_particles=VAL_PARTICLES)

    def score(params, key, x_, arr):
        t = elbo.elbo_terms(key, params, model, guide, x_, **static, **arr)
        return t["recon"] - t["local_kl"]

    compiled = jax.jit(score)
    xj = jnp.asarray(x)
    return lambda params, key: compiled(params, key, xj, arrays)


def _split_kwargs(kw: dict, n: int, m) -> dict:
    out = dict(kw)
    if "N" in out:
        out["N"] = n
    if m is not None:
        out["mask"] = m
    return out


def _resolve_init(init, *, family: str, K: int, can_warm: bool) -> str:
    if init not in (None, "arhmm", "random"):
        raise ValueError(f"`init` must be 'arhmm', 'random' or None (automatic); got {init!r}")
    if init == "arhmm":
        if K < 2:
            raise ValueError(f"`init`='arhmm' needs a model with regimes (K >= 2); this "
                             f"{family!r} model has K = {K}")
        if family != "slds":
            raise ValueError(f"`init`='arhmm' needs a switching linear dynamical system (its "
                             f"regimes have their own dynamics); the model is a {family!r}")
        if not can_warm:
            raise ValueError("`init`='arhmm' segments the latents of the warm-up stage, which "
                             "this call does not run (warmup=None, or the model has no `K` "
                             "argument to derive its one-regime version)")
        return "arhmm"
    if init is None and family == "slds" and K > 1 and can_warm:
        return "arhmm"
    return "random"


def build_problem(model, data, kw: dict, *, names: set, encoder, hidden, guide_kwargs: dict,
                  warmup: Stage | None, train: Stage, init) -> Problem:
    """Discover the model, resolve the stages, build guides, SVIs and compiled functions."""
    import jax
    from numpyro.infer import SVI

    from numpyro_svae.elbo import SVAE_ELBO
    from numpyro_svae.guide import SVAEGuide
    from numpyro_svae.nn import GaussianPotentialEncoder
    from numpyro_svae.structure import discover_structure

    kw_tr = _split_kwargs(kw, len(data.tr), data.m_tr)
    kw_va = _split_kwargs(kw, len(data.va), data.m_va)
    try:
        st = discover_structure(model, data.x_tr, **kw_tr)
    except (TypeError, ValueError, IndexError) as e:
        shape = [len(data.tr) + len(data.va), *data.x_tr.shape[1:]]
        raise ValueError(f"calling the model with `x` of shape {shape} and `model_kwargs` "
                         f"{sorted(kw)} failed: {e}") from e
    if (data.x_tr.ndim == 2) != (st.family == "gmm"):
        want = "[N, Dx]" if st.family == "gmm" else "[N, T, Dx]"
        raise ValueError(f"`x` must have shape {want} for a {st.family!r} model; got "
                         f"{[len(data.tr) + len(data.va), *data.x_tr.shape[1:]]}")
    notes = []
    K = int(st.K)
    can_warm = warmup is not None and (K == 1 or "K" in names)
    if warmup is not None and not can_warm:
        notes.append(f"warm-up stage skipped: the model has K = {K} regimes but no `K` "
                     "argument, so its one-regime version cannot be derived; the switching "
                     "dynamics start at random")
    init = _resolve_init(init, family=st.family, K=K, can_warm=can_warm)
    make_encoder = None
    if encoder is None:
        Dx = int(data.x_tr.shape[-1])
        make_encoder = lambda k: GaussianPotentialEncoder(obs_dim=Dx, latent_dim=int(st.D),
                                                          hidden=hidden, key=k)
        encoder = make_encoder(jax.random.key(0))
    elif not callable(encoder):
        raise TypeError(f"`encoder` must be an equinox module (or None); got {type(encoder)}")
    guide = SVAEGuide(model, encoder=encoder, **guide_kwargs)
    svi_train = SVI(model, guide, _optimizer(guide, train), loss=SVAE_ELBO())
    guide_warm = svi_warm = step_warm = None
    kw_warm = kw_tr
    if can_warm:
        if K == 1:
            guide_warm = guide
        else:
            kw_warm = dict(kw_tr, K=1)
            one = {k: v for k, v in guide_kwargs.items() if k != "warm_start"}  # K > 1 only
            guide_warm = SVAEGuide(model, encoder=encoder, **one)
        svi_warm = SVI(model, guide_warm, _optimizer(guide_warm, warmup), loss=SVAE_ELBO())
        step_warm = _stepper(svi_warm, data.x_tr, kw_warm)
    val_fn = None
    if data.frames_va:
        # structures are discovered from concrete data, not under jit (as predict does)
        guide._setup((data.x_tr,), kw_tr)
        guide._setup((data.x_va,), kw_va)
        val_fn = _val_function(model, guide, data.x_va, kw_va)
    return Problem(model, data, st.family, K, init, guide, guide_warm, svi_warm, svi_train,
                   step_warm, _stepper(svi_train, data.x_tr, kw_tr), val_fn, kw_tr, kw_warm,
                   warmup if can_warm else None, train, make_encoder, tuple(notes))


def _carry(params: dict, prefix: str) -> dict:
    """Warm-up parameters that fit the model with regimes: the networks and the
    initial-state factor (the regime-shaped q(theta) blocks are left out)."""
    keep = f"{prefix}init_state."
    return {k: v for k, v in params.items() if not k.startswith(prefix) or k.startswith(keep)}


def _switch(prob: Problem, params1: dict, key, switch: SwitchStart, notes: list):
    """``(init_params, info)`` of the AR-HMM start; on failure the carried networks only."""
    from numpyro_svae.initialize import arhmm_init

    data = prob.data
    carry = _carry(params1, prob.guide.prefix)
    z = np.asarray(prob.guide_warm.posterior(params1, data.x_tr, **prob.kw_warm).latent_mean)
    extra = {}
    accepts = inspect.signature(arhmm_init).parameters
    name = next((n for n in ("step_mask", "mask") if n in accepts), None)
    if name is not None and data.m_tr is not None:  # steps without data: no statistics
        m = data.m_tr
        extra[name] = m.any(-1) if m.ndim == 3 else m  # [N, T]
    try:
        out = arhmm_init(prob.guide, z, rng_key=key, model_args=(data.x_tr,),
                         model_kwargs=prob.kw_tr, num_iters=switch.em_iters,
                         pseudo_count=switch.pseudo_count, carry=carry, **extra)
    except (ValueError, ImportError) as e:
        notes.append(f"the AR-HMM start failed ({e}); the switching dynamics start at random")
        return carry, {"failed": str(e)}
    frames = np.bincount(np.asarray(out.regimes).ravel(), minlength=prob.K)
    return out.params, {"frames_per_regime": frames.tolist()}


def run_restart(prob: Problem, *, seed: int, label: int, restarts: int, switch: SwitchStart,
                progress: bool, max_bad_steps: int, notes: list) -> RestartResult:
    """All stages of one restart, then its validation ELBO per frame."""
    import equinox as eqx
    import jax

    from numpyro_svae import optim

    read = getattr(optim, "skipped_steps", None)  # the optimizer's own skip counters
    data = prob.data
    k_warm, k_train, k_enc, k_ar, k_val = jax.random.split(jax.random.key(seed), 5)
    start = {}
    if prob.make_encoder is not None:  # each restart draws its own encoder weights
        fresh = eqx.partition(prob.make_encoder(k_enc), eqx.is_inexact_array)[0]
        start[f"{prob.guide.encoder_name}$params"] = fresh
    tag = f" ({label + 1}/{restarts})" if restarts > 1 else ""
    common = dict(frames=data.frames_tr, progress=progress, max_bad_steps=max_bad_steps,
                  read_skips=read)
    losses, stages = [], []
    init_params = start or None
    if prob.svi_warm is not None:
        state = strong_types(prob.svi_warm.init(k_warm, data.x_tr, init_params=init_params,
                                           **prob.kw_warm))
        state, l1, s1 = run_stage(prob.step_warm, state, prob.warmup, name="warmup",
                                  desc="warmup" + tag, **common)
        losses.append(l1)
        stages.append(s1)
        p1 = prob.svi_warm.get_params(state)
        if prob.guide_warm is prob.guide:
            init_params = p1
        elif prob.init == "arhmm":
            t0 = time.perf_counter()
            init_params, info = _switch(prob, p1, k_ar, switch, notes)
            stages.append(StageSummary("switch", 0, s1.steps, float("nan"), "init", 0, info,
                                       time.perf_counter() - t0))
        else:
            init_params = _carry(p1, prob.guide.prefix)
    pos = int(sum(len(a) for a in losses))
    state = strong_types(prob.svi_train.init(k_train, data.x_tr, init_params=init_params,
                                        **prob.kw_tr))
    state, l3, s3 = run_stage(prob.step_train, state, prob.train, name="train", start=pos,
                              desc="train" + tag, **common)
    if stages and stages[-1].name == "switch":  # its loss: where it left the full model
        stages[-1] = stages[-1]._replace(final_loss=float(l3[0]) if len(l3) else np.nan)
    losses.append(l3)
    stages.append(s3)
    params = prob.svi_train.get_params(state)
    val = float("nan")
    if prob.val_fn is not None:
        val = float(prob.val_fn(params, k_val)) / data.frames_va
    return RestartResult(params, np.concatenate(losses), tuple(stages), val)


def validation_checks(prob: Problem, best: RestartResult) -> tuple[list, int | None]:
    """Warnings about the chosen restart and its regimes used (None without regimes)."""
    from numpyro_svae import metrics

    data, out, used = prob.data, [], None
    if data.frames_va and not best.val_elbo > data.baseline:
        out.append(
            f"the latents carry no information: the validation ELBO per frame "
            f"({best.val_elbo:.4g}) is no better than a Gaussian per channel fitted to the "
            f"training data ({data.baseline:.4g}); train longer (Stage.max_steps, "
            "Stage.tol) or check the data")
    if prob.K > 1:
        post = prob.guide.posterior(best.params, data.x_tr, **prob.kw_tr)
        used = int(metrics.regimes_used(np.asarray(post.regime_marginals)))
        if used < prob.K:
            hint = ("more restarts or fewer regimes" if prob.init == "arhmm"
                    else "init='arhmm', more restarts or fewer regimes")
            out.append(f"regimes collapsed: only {used} of K = {prob.K} regimes hold at "
                       f"least 1% of the posterior mass on the training data; try {hint}")
    trained = [s for s in best.stages if s.steps > 0]
    for prev, cur in zip(trained[:-1], trained[1:], strict=True):
        a, b = prev.final_loss, cur.final_loss
        if not np.isfinite(b) or (np.isfinite(a) and b > a + prob.train.tol * max(abs(a), 1)):
            out.append(f"stage {cur.name!r} ended worse than stage {prev.name!r}: -ELBO per "
                       f"frame {b:.4g} after {a:.4g}")
    return out, used

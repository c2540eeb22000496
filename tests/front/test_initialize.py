"""Switching initialisation: q(theta) from a segmentation, and from an AR-HMM fit."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_svae import metrics
from numpyro_svae.datasets.synthetic import synthetic_slds
from numpyro_svae.expfam.dirichlet import dirichlet_from_unconstrained, dirichlet_to_standard
from numpyro_svae.expfam.mniw import (
    MNIWStandard,
    MNIWUnconstrained,
    mniw_from_unconstrained,
    mniw_to_natural,
    mniw_to_standard,
)
from numpyro_svae.guide import SVAEGuide
from numpyro_svae.initialize import arhmm_init, qk_from_segmentation, qtheta_from_segmentation
from numpyro_svae.nn import GaussianPotentialEncoder
from tests._tol import tol
from tests.front.test_guide import lds_model, slds_model

K, D, DX = 3, 2, 4


def _guide(model=slds_model, obs_dim=DX):
    enc = GaussianPotentialEncoder(obs_dim=obs_dim, latent_dim=D, hidden=(8,),
                                   key=jax.random.key(2))
    return SVAEGuide(model, encoder=enc)


def _unc(params, prefix, cls, name):
    return cls(*(params[f"{prefix}{name}.{f}"] for f in cls._fields))


def test_qtheta_from_segmentation_matches_natural_parameter_update():
    """Standard-form algebra = the prior's natural parameters plus summed statistics."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        N, T = 3, 9
        z = rng.normal(size=(N, T, D))
        r = rng.integers(0, K, size=(N, T))
        mask = np.ones((N, T), bool)
        mask[2, 7:] = False  # a padded tail
        guide = _guide()
        kw = dict(N=N, T=T, K=K, D=D, Dx=DX)
        out = qtheta_from_segmentation(guide, z, r, model_args=(np.zeros((N, T, DX)),),
                                       model_kwargs=kw, step_mask=mask, pseudo_count=0.5)
        st = guide.structure
        blk = st.dynamics
        prior = MNIWStandard(*(jnp.broadcast_to(jnp.asarray(a), s) for a, s in zip(
            (blk.S, blk.M, blk.V, blk.nu), ((K, D, D), (K, D, D + 1), (K, D + 1, D + 1), (K,)),
            strict=True)))
        eta = list(mniw_to_natural(prior))
        for n in range(N):
            for t in range(1, T):
                if not (mask[n, t] and mask[n, t - 1]):
                    continue
                k, u, y = r[n, t], np.append(z[n, t - 1], 1.0), z[n, t]
                for i, s in enumerate((np.outer(y, y), np.outer(u, y), np.outer(u, u), 1.0)):
                    eta[i] = eta[i].at[k].add(0.5 * s)
        want = mniw_to_standard(type(mniw_to_natural(prior))(*eta))
        ridges = SVAEGuide._ridges("dynamics", blk)
        got = mniw_to_standard(mniw_from_unconstrained(
            _unc(out, guide.prefix, MNIWUnconstrained, "dynamics"), natgrad=False, **ridges))
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-7)
        # Dirichlets: leading-regime chain r; transitions within valid steps only
        alpha_P = dirichlet_to_standard(dirichlet_from_unconstrained(
            _dir_u(out, guide.prefix, "P"), natgrad=False)).alpha
        counts = np.zeros((K, K))
        for n in range(N):
            for t in range(1, T):
                if mask[n, t] and mask[n, t - 1]:
                    counts[r[n, t - 1], r[n, t]] += 1
        np.testing.assert_allclose(alpha_P, np.asarray(st.P.alpha) + 0.5 * counts,
                                   **tol(jnp.float64))
        alpha_0 = dirichlet_to_standard(dirichlet_from_unconstrained(
            _dir_u(out, guide.prefix, "pi0"), natgrad=False)).alpha
        np.testing.assert_allclose(alpha_0, np.asarray(st.pi0.alpha)
                                   + 0.5 * np.bincount(r[:, 0], minlength=K), **tol(jnp.float64))


def _dir_u(out, prefix, name):
    from numpyro_svae.expfam.dirichlet import DirichletUnconstrained

    return DirichletUnconstrained(out[f"{prefix}{name}.u"])


def test_arhmm_init_recovers_synthetic_regimes_and_dynamics(key):
    """True latents of a synthetic SLDS: the AR-HMM segmentation matches the true regimes
    and q(theta)'s dynamics means match the true [A | b] of the matched regimes."""
    data = synthetic_slds(3, num_sequences=16, num_timesteps=150, num_regimes=K, latent_dim=D,
                          obs_dim=DX, dynamics_noise_std=0.05)
    N, T = data.z.shape[:2]
    guide = _guide()
    kw = dict(N=N, T=T, K=K, D=D, Dx=DX)
    init = arhmm_init(guide, data.z, rng_key=jax.random.key(0), model_args=(data.x,),
                      model_kwargs=kw, num_iters=50)
    match = metrics.best_label_matching(init.regimes[:, 1:].ravel(), data.k[:, 1:].ravel(), K, K)
    assert match.accuracy >= 0.9, match.accuracy
    assert init.transitions_per_regime.sum() == N * (T - 1)
    std = mniw_to_standard(mniw_from_unconstrained(
        _unc(init.params, guide.prefix, MNIWUnconstrained, "dynamics"), natgrad=False,
        **SVAEGuide._ridges("dynamics", guide.structure.dynamics)))
    true_Ab = np.concatenate([data.params.A, data.params.b[..., None]], -1)  # [K, D, D+1]
    for pred, truth in enumerate(np.asarray(match.mapping)):
        if truth < 0:
            continue
        # ~700 transitions per regime: the prior (column precision 11 around [0.9 I | 0])
        # shrinks the estimate by ~2 %, noise adds ~0.01
        np.testing.assert_allclose(np.asarray(std.M[pred]), true_Ab[truth], atol=0.05)


def test_arhmm_init_ignores_padding_and_needs_no_dynamax(monkeypatch):
    """Padded steps (NaN, step_mask False) change neither the segmentation of the kept steps
    nor q(theta); the AR-HMM is the library's own (importing dynamax would fail here)."""
    from numpyro_svae.arhmm import ARHMMFit

    monkeypatch.setitem(sys.modules, "dynamax", None)
    data = synthetic_slds(4, num_sequences=3, num_timesteps=40, num_regimes=K, latent_dim=D,
                          obs_dim=DX, dynamics_noise_std=0.05)
    z = np.asarray(data.z)
    N, T = z.shape[:2]
    inits = []
    for pad in (0, 6):
        zp = np.concatenate([z, np.full((N, pad, D), np.nan)], axis=1)
        mask = np.arange(T + pad)[None] < np.array([T, T, T - 5])[:, None]
        zp[2, T - 5:] = np.nan
        kw = dict(N=N, T=T + pad, K=K, D=D, Dx=DX)
        inits.append(arhmm_init(_guide(), zp, rng_key=jax.random.key(1),
                                model_args=(np.zeros((N, T + pad, DX)),), model_kwargs=kw,
                                num_iters=10, step_mask=mask))
    a, b = inits
    assert isinstance(a.arhmm, ARHMMFit)
    np.testing.assert_array_equal(b.regimes[:, :T - 5], a.regimes[:, :T - 5])
    np.testing.assert_array_equal(b.transitions_per_regime, a.transitions_per_regime)
    assert a.transitions_per_regime.sum() == 2 * (T - 1) + (T - 6)
    assert set(a.params) == set(b.params)
    for name in a.params:
        np.testing.assert_allclose(a.params[name], b.params[name], rtol=1e-5, atol=1e-6)


def test_initialize_bad_inputs_name_the_argument():
    guide = _guide()
    kw = dict(N=2, T=6, K=K, D=D, Dx=DX)
    x = np.zeros((2, 6, DX))
    z = np.zeros((2, 6, D))
    r = np.zeros((2, 6), int)
    with pytest.raises(ValueError, match=r"`z` must have shape \[N, T, 2\]"):
        qtheta_from_segmentation(guide, np.zeros((2, 6, 3)), r, model_args=(x,), model_kwargs=kw)
    with pytest.raises(ValueError, match="`regimes` must have shape"):
        qtheta_from_segmentation(guide, z, r[:, :5], model_args=(x,), model_kwargs=kw)
    with pytest.raises(ValueError, match=r"`regimes` must be integers in 0 \.\. 2"):
        qtheta_from_segmentation(guide, z, r + 3, model_args=(x,), model_kwargs=kw)
    with pytest.raises(ValueError, match="`step_mask` must have shape"):
        qtheta_from_segmentation(guide, z, r, model_args=(x,), model_kwargs=kw,
                                 step_mask=np.ones((2, 5), bool))
    with pytest.raises(ValueError, match="NaN or inf"):
        qtheta_from_segmentation(guide, z + np.nan, r, model_args=(x,), model_kwargs=kw)
    with pytest.raises(ValueError, match="`pseudo_count` must be > 0"):
        qtheta_from_segmentation(guide, z, r, model_args=(x,), model_kwargs=kw, pseudo_count=0.0)
    with pytest.raises(ValueError, match=r"`regimes` must have shape \[N, T\] = \[2, 6\]"):
        qk_from_segmentation(guide, r[:1], model_args=(x,), model_kwargs=kw)
    with pytest.raises(ValueError, match=r"`regimes` must be integers in 0 \.\. 2"):
        qk_from_segmentation(guide, r - 1, model_args=(x,), model_kwargs=kw)
    with pytest.raises(ValueError, match=r"`smoothing` must be in \[0, 1\)"):
        qk_from_segmentation(guide, r, model_args=(x,), model_kwargs=kw, smoothing=1.0)
    lds_guide = _guide(lds_model, obs_dim=D)
    with pytest.raises(ValueError, match="needs an SLDS model.*'lds'"):
        qtheta_from_segmentation(lds_guide, z, r, model_args=(np.zeros((2, 6, D)),),
                                 model_kwargs=dict(N=2, T=6))
    with pytest.raises(ValueError, match="needs an SLDS model.*'lds'"):
        qk_from_segmentation(lds_guide, r, model_args=(np.zeros((2, 6, D)),),
                             model_kwargs=dict(N=2, T=6))


def test_qk_from_segmentation_is_the_warm_start_state_of_the_chain():
    """One smoothed one-hot row per regime variable of the model: all T steps for a model
    with a leading regime (k0 drives nothing, but is a variable of the chain), the last T - 1
    for one regime per transition; the shapes and dtype of the guide's own warm-start site."""
    rng = np.random.default_rng(1)
    N, T = 2, 7
    r = rng.integers(0, K, size=(N, T))
    x = np.zeros((N, T, DX))
    kw = dict(N=N, T=T, K=K, D=D, Dx=DX)
    lead = _guide()  # test_guide's SLDS: leading regime k0, T regime variables
    q = qk_from_segmentation(lead, r, model_args=(x,), model_kwargs=kw, smoothing=0.03)
    assert q["marginals"].shape == (N, T, K) and q["marginals"].dtype == jnp.float32
    np.testing.assert_array_equal(q["valid"], np.ones(N, bool))
    expected = 0.97 * np.eye(K)[r] + 0.01
    np.testing.assert_allclose(q["marginals"], expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(q["marginals"]).sum(-1), 1.0, rtol=1e-6)
    # one regime per transition (test_families' lag-one SLDS: N = 3, T = 4, K = 2)
    from tests.front.test_families import CASES, ENC0, _data, linear_encoder

    model, fkw, _ = CASES["slds_lag_one"]
    trans = SVAEGuide(model, encoder=linear_encoder, encoder_params=ENC0, warm_start=True)
    r2 = rng.integers(0, 2, size=(3, 4))
    q = qk_from_segmentation(trans, r2, model_args=(_data(True),), model_kwargs=fkw,
                             smoothing=0.0)
    assert not trans.structure.leading_regime
    np.testing.assert_array_equal(q["marginals"], np.eye(2)[r2[:, 1:]])

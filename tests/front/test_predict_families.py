"""`numpyro_svae.predict` / `diagnostics` on the HMM, GMM and lag-one SLDS families.

Oracles (float64, tiny problems: K = 2 regimes, D = Dx = 2, T = 4, a fixed linear decoder
``x = c * z + e`` and the exact encoder potentials of that decoder):

- the ELBO identity: under the ``meanfield`` proposal ``E[log w] = E_q(z) log p(x | z) -
  KL(q(z) q(k) || exp E_q(theta) log p(z, k | theta))``, the recognition term in closed form
  for the linear decoder and the KL from ``SVAEGuide.posterior`` (holds for any q(theta),
  so it checks the draws' log-densities ``log q(k)``, ``log q(z)`` exactly, in expectation);
- exact ``log p(x | theta)`` by enumeration over every regime path and Gaussian integration
  over ``z`` (dense covariances), with q(theta) concentrated on theta: the importance
  weights are unbiased (``E[w] = p(x | theta)``), and the IWAE estimate rises with ``S`` and
  stays below it (Burda et al., 2016);
- the forecast of an HMM: ``E[x_{T+h}] = c * sum_k [q(k_T) P^h]_k mu_k``.

Monte Carlo checks use z-scores against the sample's own standard error (|z| < 5, fixed keys).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.contrib.control_flow import scan
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from numpyro_svae.expfam.dirichlet import (
    DirichletStandard,
    dirichlet_to_natural,
    dirichlet_to_unconstrained,
)
from numpyro_svae.expfam.mniw import MNIWStandard, mniw_to_natural, mniw_to_unconstrained
from numpyro_svae.expfam.niw import NIWStandard, niw_to_natural, niw_to_unconstrained
from numpyro_svae.guide import SVAEGuide
from numpyro_svae.predict import forecast, importance_weighted_bound, impute

K, D, T, N = 2, 2, 4, 5
C = np.array([1.0, 0.7])  # x = C * z + e
SIGMA = 0.25  # a strong likelihood: the mean field has one fixed point
PI0 = np.array([0.6, 0.4])
P = np.array([[0.8, 0.2], [0.3, 0.7]])
MU = np.array([[1.5, 0.0], [-1.5, 0.5]])
SIG = np.array([[[0.3, 0.1], [0.1, 0.2]], [[0.2, 0.0], [0.0, 0.4]]])
AB = np.array([[[0.9, 0.2, 0.3], [-0.2, 0.9, 0.0]], [[0.7, 0.0, -0.3], [0.0, 0.7, 0.2]]])
Q = np.array([np.diag([0.1, 0.2]), np.diag([0.3, 0.1])])
CONC = 1e6  # q(theta) concentration of the exact-likelihood tests: theta ~ truth +- 1e-3
S_IW = 512


# ------------------------------------------------------------------------------------------
# models (linear decoder) and the exact encoder
# ------------------------------------------------------------------------------------------


def _emit(z, x, mask):
    """x ~ Normal(C * z, SIGMA) in the sequences plate; `mask` [N, T(, Dx)] / [N(, Dx)]."""
    d = dist.Normal(z * jnp.asarray(C, z.dtype), SIGMA)
    if mask is not None:  # step mask, or an entry mask of z's shape
        m = jnp.asarray(mask, bool)
        d = d.mask(jnp.broadcast_to(m if m.ndim == z.ndim else m[..., None], z.shape))
    numpyro.sample("x", d.to_event(z.ndim - 1), obs=x)


def hmm_model(x=None, *, N, T, mask=None):
    pi0 = numpyro.sample("pi0", dist.Dirichlet(jnp.ones(K)))
    with numpyro.plate("regimes", K):
        P_ = numpyro.sample("P", dist.Dirichlet(jnp.ones(K) + 4.0 * jnp.eye(K)))
        Sig = numpyro.sample("Sigma", dist.InverseWishart(D + 2.0, jnp.eye(D)))
        mu = numpyro.sample("mu", dist.MultivariateNormal(jnp.zeros(D), 4.0 * Sig))
    with numpyro.plate("sequences", N):
        k0 = numpyro.sample("k0", dist.Categorical(pi0))
        z0 = numpyro.sample("z0", dist.MultivariateNormal(mu[k0], Sig[k0]))

    def step(k_prev, _):
        with numpyro.plate("sequences", N):
            k = numpyro.sample("k", dist.Categorical(P_[k_prev]))
            z = numpyro.sample("z", dist.MultivariateNormal(mu[k], Sig[k]))
        return k, z

    _, zs = scan(step, k0, None, length=T - 1)
    with numpyro.plate("sequences", N):
        _emit(jnp.swapaxes(jnp.concatenate([z0[None], zs]), 0, 1), x, mask)


def gmm_model(x=None, *, N, mask=None):
    w = numpyro.sample("w", dist.Dirichlet(jnp.ones(K)))
    with numpyro.plate("regimes", K):
        Sig = numpyro.sample("Sigma", dist.InverseWishart(D + 2.0, jnp.eye(D)))
        mu = numpyro.sample("mu", dist.MultivariateNormal(jnp.zeros(D), 4.0 * Sig))
    with numpyro.plate("data", N):
        k = numpyro.sample("k", dist.Categorical(w))
        z = numpyro.sample("z", dist.MultivariateNormal(mu[k], Sig[k]))
        _emit(z, x, mask)


def lag_model(x=None, *, N, T, mask=None):
    """Lag-one SLDS: z_t | z_{t-1} uses the previous regime; z_0 ~ N(0, I) (constant)."""
    M0 = jnp.concatenate([0.9 * jnp.eye(D), jnp.zeros((D, 1))], 1)
    pi0 = numpyro.sample("pi0", dist.Dirichlet(jnp.ones(K)))
    with numpyro.plate("regimes", K):
        P_ = numpyro.sample("P", dist.Dirichlet(jnp.ones(K) + 4.0 * jnp.eye(K)))
        Q_ = numpyro.sample("Q", dist.InverseWishart(D + 2.0, D * jnp.eye(D)))
        Ab = numpyro.sample("Ab", dist.MatrixNormal(M0, jnp.linalg.cholesky(Q_),
                                                    0.5 * jnp.eye(D + 1)))
    with numpyro.plate("sequences", N):
        k0 = numpyro.sample("k0", dist.Categorical(pi0))
        z0 = numpyro.sample("z0", dist.MultivariateNormal(jnp.zeros(D), jnp.eye(D)))

    def step(carry, _):
        k_prev, z_prev = carry
        with numpyro.plate("sequences", N):
            k = numpyro.sample("k", dist.Categorical(P_[k_prev]))
            A = Ab[k_prev]
            loc = jnp.einsum("nij,nj->ni", A[:, :, :D], z_prev) + A[:, :, D]
            z = numpyro.sample("z", dist.MultivariateNormal(loc, Q_[k_prev]))
        return (k, z), z

    _, zs = scan(step, (k0, z0), None, length=T - 1)
    with numpyro.plate("sequences", N):
        _emit(jnp.swapaxes(jnp.concatenate([z0[None], zs]), 0, 1), x, mask)


def exact_encoder(params, x, m):
    """Likelihood potentials of x = C z + e, scaled by params['g'] (< 1: a looser q)."""
    m = jnp.broadcast_to(m[:, None] if m.ndim == 1 else m, x.shape).astype(x.dtype)
    c = jnp.asarray(C, x.dtype)
    R = params["g"] * m * c**2 / SIGMA**2 + 1e-12
    return R, R * m * x / c


# ------------------------------------------------------------------------------------------
# exact log p(x | theta)
# ------------------------------------------------------------------------------------------


def _emission_cov(S):
    return np.diag(C) @ S @ np.diag(C) + SIGMA**2 * np.eye(D)


def exact_hmm(x, mask):
    """Enumeration over the K^T regime paths; z_t integrated per step.  x [N, T, D]."""
    out = []
    for xn, mn in zip(x, mask, strict=True):
        ll = np.array([[multivariate_normal(C * MU[k], _emission_cov(SIG[k])).logpdf(xt)
                        if mt else 0.0 for k in range(K)] for xt, mt in zip(xn, mn, strict=True)])
        terms = [np.log(PI0[p[0]]) + sum(np.log(P[a, b]) for a, b in itertools.pairwise(p))
                 + ll[np.arange(T), list(p)].sum()
                 for p in itertools.product(range(K), repeat=T)]
        out.append(logsumexp(terms))
    return np.array(out)


def exact_gmm(x):
    """x [N, D] -> [N]."""
    lp = np.stack([np.log(PI0[k]) + multivariate_normal(C * MU[k], _emission_cov(SIG[k]))
                   .logpdf(x) for k in range(K)], -1)
    return logsumexp(lp, -1)


def exact_lag(x, mask):
    """Enumeration over (k_0, ..., k_{T-2}) (k_{T-1} drives nothing and sums to one); per
    path, x is Gaussian: z = mean + G eps, eps ~ N(0, I_{T D})."""
    out = []
    for xn, mn in zip(x, mask, strict=True):
        obs = np.repeat(mn, D)
        terms = []
        for p in itertools.product(range(K), repeat=T - 1):
            mean, G = [np.zeros(D)], [np.eye(D, T * D)]
            for t in range(1, T):
                A, b = AB[p[t - 1], :, :D], AB[p[t - 1], :, D]
                noise = np.zeros((D, T * D))
                noise[:, t * D:(t + 1) * D] = np.linalg.cholesky(Q[p[t - 1]])
                mean.append(A @ mean[-1] + b)
                G.append(A @ G[-1] + noise)
            Cb = np.kron(np.eye(T), np.diag(C))
            m = Cb @ np.concatenate(mean)
            Gm = Cb @ np.concatenate(G)
            cov = Gm @ Gm.T + SIGMA**2 * np.eye(T * D)
            lp = multivariate_normal(m[obs], cov[np.ix_(obs, obs)]).logpdf(xn.ravel()[obs])
            terms.append(np.log(PI0[p[0]]) + sum(np.log(P[a, b]) for a, b in
                                                 itertools.pairwise(p)) + lp)
        out.append(logsumexp(terms))
    return np.array(out)


def simulate(rng, family):
    """Data from the true model (numpy)."""
    if family == "gmm":
        k = rng.choice(K, size=N, p=PI0)
        z = np.stack([rng.multivariate_normal(MU[j], SIG[j]) for j in k])
        return C * z + SIGMA * rng.normal(size=(N, D))
    x = np.zeros((N, T, D))
    for n in range(N):
        k = rng.choice(K, p=PI0)
        z = rng.multivariate_normal(MU[k], SIG[k]) if family == "hmm" else rng.normal(size=D)
        for t in range(T):
            if t:
                if family == "hmm":
                    k = rng.choice(K, p=P[k])
                    z = rng.multivariate_normal(MU[k], SIG[k])
                else:  # lag one: the previous regime drives the step
                    z = AB[k, :, :D] @ z + AB[k, :, D] + rng.multivariate_normal(
                        np.zeros(D), Q[k])
                    k = rng.choice(K, p=P[k])
            x[n, t] = C * z + SIGMA * rng.normal(size=D)
    return x


# ------------------------------------------------------------------------------------------
# q(theta) concentrated on the truth
# ------------------------------------------------------------------------------------------


def qtheta_params(guide, x, kw, conc, g):
    """Guide parameters: q(theta) with concentration `conc` around the truth, encoder `g`."""
    st = guide._setup((x,), kw)
    with handlers.seed(rng_seed=0):
        tr = handlers.trace(lambda: guide._qtheta(st)).get_trace()
    shapes = {k: s["value"].shape for k, s in tr.items() if s["type"] == "param"}
    f = x.dtype
    a = lambda v: jnp.asarray(v, f)
    full = jnp.full((K,), conc, f)
    u = {"pi0": dirichlet_to_unconstrained(dirichlet_to_natural(DirichletStandard(
        a(conc * PI0))))}
    if st.family != "gmm":
        u["P"] = dirichlet_to_unconstrained(dirichlet_to_natural(DirichletStandard(
            a(conc * P))))
    if st.family == "slds":  # E[Q] = S / (nu - D - 1)
        u["dynamics"] = mniw_to_unconstrained(mniw_to_natural(MNIWStandard(
            a((conc - D - 1) * Q), a(AB), a(conc * np.broadcast_to(np.eye(D + 1),
                                                                   (K, D + 1, D + 1))), full)))
    else:
        u["regime_gaussians"] = niw_to_unconstrained(niw_to_natural(NIWStandard(
            a((conc - D - 1) * SIG), a(MU), full, full)))
    params = {f"qtheta${b}.{k}": v for b, ub in u.items() for k, v in ub._asdict().items()}
    assert set(params) == set(shapes)
    params = {k: jnp.reshape(v, shapes[k]) for k, v in params.items()}
    params["encoder$params"] = {"g": jnp.asarray(g, f)}
    return params


MODELS = {"hmm": hmm_model, "gmm": gmm_model, "slds_lag_one": lag_model}


def _problem(family):
    """(guide, x, model kwargs incl. mask, exact log p(x | theta)); call inside enable_x64."""
    rng = np.random.default_rng({"hmm": 0, "gmm": 1, "slds_lag_one": 2}[family])
    x = simulate(rng, "lag" if family == "slds_lag_one" else family)
    if family == "gmm":
        kw = dict(N=N)
        exact = exact_gmm(x)
    else:
        mask = np.ones((N, T), bool)
        mask[:2, 2] = False  # a missing step in two sequences
        kw = dict(N=N, T=T, mask=jnp.asarray(mask))
        exact = (exact_hmm if family == "hmm" else exact_lag)(x, mask)
        x = np.where(mask[..., None], x, np.nan)
    guide = SVAEGuide(MODELS[family], encoder=exact_encoder, encoder_params={"g": jnp.ones(())},
                      max_iters=40, rtol=1e-10)
    return guide, jnp.asarray(x), kw, exact


def _call_kw(kw):
    """(mask, other model kwargs) for the prediction functions."""
    kw = dict(kw)
    return kw.pop("mask", None), kw


def _recon_closed_form(x, mask, mean, cov):
    """E_q(z) log N(x | C z, SIGMA^2) summed over observed steps: [N]."""
    var = np.diagonal(cov, axis1=-2, axis2=-1)
    lp = (-0.5 * np.log(2 * np.pi * SIGMA**2)
          - ((np.nan_to_num(x) - C * mean) ** 2 + C**2 * var) / (2 * SIGMA**2))
    return np.sum(np.where(mask[..., None], lp, 0.0), axis=(1, 2))


FAMILIES = [
    pytest.param("gmm", id="gmm", marks=pytest.mark.slow),
    pytest.param("hmm", id="hmm", marks=pytest.mark.slow),
    pytest.param("slds_lag_one", id="slds_lag_one", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("family", FAMILIES)
def test_iw_weights_match_elbo_identity_and_exact_enumeration(family):
    """Meanfield proposal: E[log w] = recognition term - local KL (any q(theta)).  Both
    proposals, q(theta) at the truth: E[w] = p(x | theta) by enumeration; the IWAE estimate
    rises with S and stays below log p(x | theta)."""
    key = jax.random.key(11)
    with jax.enable_x64(True):
        guide, x, kw, exact = _problem(family)
        mask, other = _call_kw(kw)
        diffuse = qtheta_params(guide, jnp.nan_to_num(x), kw, 30.0, 0.8)
        sharp = qtheta_params(guide, jnp.nan_to_num(x), kw, CONC, 0.8)
        iw = {}
        for name, prm, prop in (("diffuse", diffuse, "meanfield"),
                                ("meanfield", sharp, "meanfield"),
                                ("conditional", sharp, "conditional")):
            iw[name] = importance_weighted_bound(guide, prm, x, num_samples=S_IW,
                                                 rng_key=key, mask=mask, proposal=prop,
                                                 **other)
        # the same mean field as the bound's (same key for its random q(k) start)
        post = guide.posterior(diffuse, jnp.nan_to_num(x), rng_key=jax.random.split(key)[0],
                               **kw)
    step_mask = np.ones((N, 1), bool) if family == "gmm" else np.asarray(kw["mask"])
    x3 = np.asarray(x).reshape(N, -1, D)
    assert iw["diffuse"].log_weights.shape == (S_IW, N)

    # ELBO identity (q(theta) with 30 pseudo-observations: E over theta matters)
    lw = np.asarray(iw["diffuse"].log_weights)
    target = (_recon_closed_form(x3, step_mask, np.asarray(post.latent_mean),
                                 np.asarray(post.latent_cov)) - np.asarray(post.local_kl))
    z = (lw.mean(0) - target) / (lw.std(0, ddof=1) / np.sqrt(S_IW))
    assert np.max(np.abs(z)) < 5, (lw.mean(0), target)

    full = step_mask.all(1)  # sequences without a missing step
    for name in ("meanfield", "conditional"):
        # At a missing step nothing pins k_t down (the exact posterior can be ~50/50) but
        # the mean field locks q(k_t) and q(z_t) onto one regime: the weights stay unbiased
        # but the other regime's paths are rare events carrying much of p(x), outside the
        # reach of a z-test.  Unbiasedness is checked on the fully observed sequences; the
        # others must only stay below log p(x | theta) on average.
        sel = full
        lw_all = np.asarray(iw[name].log_weights)
        gap_seq = logsumexp(lw_all[:, ~sel], 0) - np.log(S_IW) - exact[~sel]
        assert np.all(gap_seq < 0.05), (name, gap_seq)  # 0.05: theta ~ truth +- 1e-3
        lw = lw_all[:, sel]
        ex = exact[sel]
        ratio = np.exp(lw - ex)  # E[ratio] = 1: unbiased importance weights
        z = (ratio.mean(0) - 1.0) / (ratio.std(0, ddof=1) / np.sqrt(S_IW))
        assert np.max(np.abs(z)) < 5, (name, ratio.mean(0))
        means = []
        for s in (1, 8, 64):  # IWAE with s samples, averaged over the S / s blocks
            blocks = lw.reshape(S_IW // s, s, -1)
            gap = logsumexp(blocks, axis=1) - np.log(s) - ex  # [S / s, n]
            means.append(gap.mean())
            assert gap.mean() < 5 * gap.std(ddof=1) / np.sqrt(gap.size), (name, s)
        assert np.all(np.diff(means) > 0), (name, means)
        np.testing.assert_allclose(np.asarray(iw[name].predictive)[sel],
                                   logsumexp(lw, 0) - np.log(S_IW), rtol=1e-12)
    assert np.all(np.asarray(iw["meanfield"].frames) == step_mask.sum(1))


# ------------------------------------------------------------------------------------------
# forecasting, imputation, ArviZ export
# ------------------------------------------------------------------------------------------


def _zfreq(draws, probs):
    """z-scores of the frequencies of each value in ``draws [S, ...]`` against ``probs
    [..., K]`` (binomial standard errors)."""
    S = draws.shape[0]
    freq = np.stack([(draws == k).mean(0) for k in range(K)], -1)
    se = np.sqrt(np.clip(probs * (1 - probs), 1e-12, None) / S)
    return (freq - probs) / se


@pytest.mark.slow
def test_hmm_forecast_matches_regime_propagation_and_exports_regimes(tmp_path):
    """E[x_{T+h}] = C * sum_k [q(k_T) P^h]_k mu_k and k_{T+1} ~ q(k_T) P (q(theta) at the
    truth); imputation and `to_inference_data` carry the regime draws with T steps."""
    import arviz as az

    from numpyro_svae.diagnostics import plot_regimes, to_inference_data

    S, H = 400, 3
    with jax.enable_x64(True):
        guide, x, kw, _ = _problem("hmm")
        mask, other = _call_kw(kw)
        prm = qtheta_params(guide, jnp.nan_to_num(x), kw, CONC, 1.0)
        fc = forecast(guide, prm, x, horizon=H, num_samples=S, rng_key=jax.random.key(5),
                      mask=mask, **other)
        post = guide.posterior(prm, jnp.nan_to_num(x), **kw)
    assert fc.samples.shape == (S, N, H, D) and fc.regimes.shape == (S, N, H)
    q = np.asarray(post.regime_marginals)[:, -1]  # [N, K] q(k_T)
    draws = np.asarray(fc.samples)
    for h in range(H):
        q = q @ P
        if h == 0:
            assert np.max(np.abs(_zfreq(np.asarray(fc.regimes)[:, :, 0], q))) < 5
        exact = C * (q @ MU)  # [N, D]
        z = (draws[:, :, h].mean(0) - exact) / (draws[:, :, h].std(0, ddof=1) / np.sqrt(S))
        assert np.max(np.abs(z)) < 5, h

    # float32 path: imputation and the ArviZ export with regime draws [S, N, T]
    x32 = jnp.asarray(x, jnp.float32)
    p32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), prm)
    imp = impute(guide, p32, x32, mask, num_samples=6, rng_key=jax.random.key(6), **other)
    assert imp.samples.shape == (6, N, T, D) and imp.regimes.shape == (6, N, T)
    assert np.all(np.isfinite(np.asarray(imp.samples)))
    idata = to_inference_data(guide, p32, x32, num_draws=6, rng_key=jax.random.key(7),
                              mask=mask, **other)
    assert idata.posterior["k"].dims == ("chain", "draw", "sequence", "regime_step")
    assert idata.posterior["k"].shape == (1, 6, N, T)
    assert idata.posterior["mu"].dims == ("chain", "draw", "regime", "latent")
    assert idata.posterior["Sigma"].shape == (1, 6, K, D, D)
    assert idata.variational["regime_marginals"].shape == (N, T, K)
    assert idata.variational["expected_P"].shape == (K, K)
    assert np.isfinite(az.summary(idata, var_names=["mu"], kind="stats")["mean"]).all()
    fig = plot_regimes(idata.variational["regime_marginals"].values, path=tmp_path / "r.png")
    assert (tmp_path / "r.png").exists() and fig is not None


@pytest.mark.slow
def test_lag_one_forecast_draws_next_regime_from_last_transition_regime():
    """Lag-one SLDS: the regime driving the first forecast step is k_{T-1} ~ P[k_{T-2}], so
    its law is q(k_{T-2}) P; imputation reports T regimes (the last one dangling)."""
    S = 400
    with jax.enable_x64(True):
        guide, x, kw, _ = _problem("slds_lag_one")
        mask, other = _call_kw(kw)
        prm = qtheta_params(guide, jnp.nan_to_num(x), kw, CONC, 1.0)
        fc = forecast(guide, prm, x, horizon=2, num_samples=S, rng_key=jax.random.key(8),
                      mask=mask, **other)
        post = guide.posterior(prm, jnp.nan_to_num(x), **kw)
        imp = impute(guide, prm, x, mask, num_samples=4, rng_key=jax.random.key(9), **other)
    assert guide.structure.dangling_regime
    marg = np.asarray(post.regime_marginals)  # [N, T, K]: the last one appended
    assert marg.shape == (N, T, K)
    assert np.max(np.abs(_zfreq(np.asarray(fc.regimes)[:, :, 0], marg[:, -2] @ P))) < 5
    assert imp.regimes.shape == (4, N, T) and imp.latents.shape == (4, N, T, D)
    assert fc.samples.shape == (S, N, 2, D)


def test_gmm_impute_export_and_forecast_refusal(tmp_path):
    """A mixture: outputs with a time axis of length 1, regime draws in ArviZ, entry masks;
    forecasting is refused with the family named (float32)."""
    import arviz as az

    from numpyro_svae.diagnostics import to_inference_data

    x = jnp.asarray(simulate(np.random.default_rng(3), "gmm"), jnp.float32)
    mask = np.ones((N, D), bool)
    mask[1, 0] = False
    x = jnp.where(jnp.asarray(mask), x, jnp.nan)
    guide = SVAEGuide(gmm_model, encoder=exact_encoder, encoder_params={"g": jnp.ones(())})
    prm = qtheta_params(guide, jnp.nan_to_num(x), dict(N=N), 100.0, 1.0)
    prm = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), prm)
    imp = impute(guide, prm, x, jnp.asarray(mask), num_samples=5, rng_key=jax.random.key(1),
                 N=N)
    assert imp.samples.shape == (5, N, 1, D) and imp.regimes.shape == (5, N, 1)
    assert imp.latents.shape == (5, N, 1, D) and imp.mask.shape == (N, 1, D)
    np.testing.assert_array_equal(np.asarray(imp.filled)[:, 0][mask], np.asarray(x)[mask])
    assert np.isfinite(np.asarray(imp.filled)).all()
    idata = to_inference_data(guide, prm, x, num_draws=5, rng_key=jax.random.key(2),
                              mask=jnp.asarray(mask), N=N)
    assert idata.posterior["k"].shape == (1, 5, N, 1)
    assert idata.posterior["z"].dims == ("chain", "draw", "sequence", "time", "latent")
    assert idata.posterior["z"].shape[3] == 1
    assert idata.posterior["w"].dims == ("chain", "draw", "regime")
    assert idata.observed_data["x"].shape == (N, 1, D)
    assert idata.constant_data["mask"].values[1, 0, 0] == 0
    assert "expected_P" not in idata.variational
    idata.to_netcdf(str(tmp_path / "gmm.nc"))
    assert az.from_netcdf(str(tmp_path / "gmm.nc")).posterior["k"].shape == (1, 5, N, 1)
    with pytest.raises(ValueError, match="sequence model.*'gmm'"):
        forecast(guide, prm, x, horizon=2, rng_key=jax.random.key(0), mask=jnp.asarray(mask),
                 N=N)
    with pytest.raises(ValueError, match=r"`mask`"):
        impute(guide, prm, x, jnp.ones((N, 3)), rng_key=jax.random.key(0), N=N)

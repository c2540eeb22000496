"""SVAEGuide: a genuine NumPyro guide (Predictive, structure, posterior) and its input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.contrib.control_flow import scan
from numpyro.infer import Predictive

from numpyro_svae.guide import SVAEGuide, SVAEPosterior
from numpyro_svae.nn import GaussianPotentialEncoder, decoder


def lds_model(x=None, *, N, T, D=2, Dx=2, sigma=None, mask=None, lengths=None, hidden=(8,)):
    """Linear-Gaussian LDS with conjugate NIW / MNIW priors.

    ``sigma`` given: identity emission ``x_t ~ N(z_t, sigma^2 I)`` (needs ``Dx == D``), else
    an MLP decoder.  ``mask`` ([N, T] or [N, T, Dx]) and ``lengths`` ([N]) mask the emission.
    """
    M0 = jnp.concatenate([0.9 * jnp.eye(D), jnp.zeros((D, 1))], 1)
    Q = numpyro.sample("Q", dist.InverseWishart(D + 2.0, D * jnp.eye(D)))
    Ab = numpyro.sample("Ab", dist.MatrixNormal(M0, jnp.linalg.cholesky(Q), 0.3 * jnp.eye(D + 1)))
    S0 = numpyro.sample("S0", dist.InverseWishart(D + 2.0, D * jnp.eye(D)))
    m0 = numpyro.sample("m0", dist.MultivariateNormal(jnp.zeros(D), 10.0 * S0))
    with numpyro.plate("sequences", N):
        z0 = numpyro.sample("z0", dist.MultivariateNormal(m0, S0))

    def step(z_prev, _):
        with numpyro.plate("sequences", N):
            z = numpyro.sample("z", dist.MultivariateNormal(z_prev @ Ab[:, :D].T + Ab[:, D], Q))
        return z, z

    _, zs = scan(step, z0, None, length=T - 1)
    zall = jnp.swapaxes(jnp.concatenate([z0[None], zs]), 0, 1)  # [N, T, D]
    if sigma is None:
        loc, scale = decoder("decoder", latent_dim=D, obs_dim=Dx, hidden=hidden)(zall)
    else:
        loc, scale = zall, sigma * jnp.ones_like(zall)
    d = dist.Normal(loc, scale)
    m = None if mask is None else (mask if mask.ndim == 3 else mask[..., None])
    if lengths is not None:
        lm = (jnp.arange(T)[None, :] < lengths[:, None])[..., None]
        m = lm if m is None else m & lm
    if m is not None:
        d = d.mask(m)
    with numpyro.plate("sequences", N):
        numpyro.sample("x", d.to_event(2), obs=x)


def slds_model(x=None, *, N, T, K=3, D=2, Dx=10, hidden=(32,)):
    """The SLDS with a leading regime k0, emission [N, T, Dx] in the plate."""
    pi0 = numpyro.sample("pi0", dist.Dirichlet(jnp.ones(K)))
    M0 = jnp.concatenate([0.9 * jnp.eye(D), jnp.zeros((D, 1))], 1)
    with numpyro.plate("regimes", K):
        P = numpyro.sample("P", dist.Dirichlet(0.5 + 99.5 * jnp.eye(K)))
        Q = numpyro.sample("Q", dist.InverseWishart(D + 2.0, D * jnp.eye(D)))
        Ab = numpyro.sample("Ab", dist.MatrixNormal(M0, jnp.linalg.cholesky(Q),
                                                    0.3 * jnp.eye(D + 1)))
    S0 = numpyro.sample("S0", dist.InverseWishart(D + 2.0, D * jnp.eye(D)))
    m0 = numpyro.sample("m0", dist.MultivariateNormal(jnp.zeros(D), 10.0 * S0))
    with numpyro.plate("sequences", N):
        k0 = numpyro.sample("k0", dist.Categorical(pi0))
        z0 = numpyro.sample("z0", dist.MultivariateNormal(m0, S0))

    def step(carry, _):
        k_prev, z_prev = carry
        with numpyro.plate("sequences", N):
            k = numpyro.sample("k", dist.Categorical(P[k_prev]))
            A, b = Ab[k, :, :D], Ab[k, :, D]
            z = numpyro.sample("z", dist.MultivariateNormal(
                jnp.einsum("nij,nj->ni", A, z_prev) + b, Q[k]))
        return (k, z), z

    _, zs = scan(step, (k0, z0), None, length=T - 1)
    zall = jnp.swapaxes(jnp.concatenate([z0[None], zs]), 0, 1)
    loc, scale = decoder("decoder", latent_dim=D, obs_dim=Dx, hidden=hidden)(zall)
    with numpyro.plate("sequences", N):
        numpyro.sample("x", dist.Normal(loc, scale).to_event(2), obs=x)


N, T, D = 3, 5, 2
LATENTS_LDS = ("Q", "Ab", "S0", "m0", "z0", "z")


@pytest.fixture(scope="module")
def lds_setup():
    x = jax.random.normal(jax.random.key(1), (N, T, D))
    enc = GaussianPotentialEncoder(obs_dim=D, latent_dim=D, hidden=(8,), key=jax.random.key(2))
    guide = SVAEGuide(lds_model, encoder=enc)
    tr = handlers.trace(handlers.seed(guide, 0)).get_trace(x, N=N, T=T)
    mtr = handlers.trace(handlers.seed(lds_model, 0)).get_trace(x, N=N, T=T)
    params = {k: s["value"] for t in (tr, mtr) for k, s in t.items() if s["type"] == "param"}
    return x, guide, params


def test_guide_structure_and_param_sites(lds_setup):
    x, guide, params = lds_setup
    st = guide.structure
    assert (st.family, st.K, st.D, st.T) == ("lds", 1, D, T)
    assert any(k.startswith(guide.prefix + "init_state.") for k in params)
    assert any(k.startswith(guide.prefix + "dynamics.") for k in params)
    assert "encoder$params" in params


# ~10-20 s (Predictive compiles guide + model under vmap); not marked slow, like every user of
# the module fixture `lds_setup`: a slow mark runs a test first, apart from the others, and
# the fixture is then built twice
def test_predictive_returns_every_latent_site_matches_model_shapes(lds_setup):
    x, guide, params = lds_setup
    S = 2
    pred = Predictive(lds_model, guide=guide, params=params, num_samples=S,
                      return_sites=list(LATENTS_LDS))
    out = pred(jax.random.key(3), x, N=N, T=T)  # the guide needs the data (encoder input)
    for name in LATENTS_LDS:
        assert out[name].shape == (S, *guide.structure.sites[name].shape), name
        assert bool(jnp.all(jnp.isfinite(out[name]))), name
    gs = Predictive(guide, params=params, num_samples=S)(jax.random.key(4), x, N=N, T=T)
    assert set(LATENTS_LDS) <= set(gs)


def test_posterior_fields_match_documented_shapes(lds_setup):
    x, guide, params = lds_setup
    post = guide.posterior(params, x, N=N, T=T)
    assert isinstance(post, SVAEPosterior)
    assert post.regime_marginals.shape == (N, T - 1, 1)
    assert post.latent_mean.shape == (N, T, D) and post.latent_cov.shape == (N, T, D, D)
    np.testing.assert_allclose(post.latent_cov, jnp.swapaxes(post.latent_cov, -1, -2),
                               atol=1e-5)
    assert post.local_kl.shape == (N,) and bool(jnp.all(post.local_kl > -1e-3))
    assert float(post.global_kl) >= 0
    assert post.qtheta["dynamics"].M.shape == (1, D, D + 1)
    assert post.diagnostics.num_iters.shape == (N,)


def test_bad_inputs_raise_value_error_naming_site(lds_setup):
    x, guide, params = lds_setup

    def post(*a, **k):
        return guide.posterior(params, *a, **k)

    with pytest.raises(ValueError, match="'x'.*NaN"):
        post(x.at[0, 1, 0].set(jnp.nan), N=N, T=T)
    # NaN at a masked entry is fine
    mask = jnp.ones((N, T), bool).at[0, 1].set(False)
    out = post(x.at[0, 1, 0].set(jnp.nan), N=N, T=T, mask=mask)
    assert bool(jnp.all(jnp.isfinite(out.latent_mean)))
    assert not bool(out.mask[0, 1])
    with pytest.raises(ValueError, match="lengths"):
        post(x, N=N, T=T, lengths=jnp.array([5, 4]))
    with pytest.raises(ValueError, match="lengths"):
        post(x, N=N, T=T, lengths=jnp.array([5, 4, 9]))
    with pytest.raises(ValueError, match="'x'"):  # data / model disagreement
        post(x[..., :1], N=N, T=T)
    with pytest.raises(ValueError, match="'x'"):  # mask of the wrong shape
        post(x, N=N, T=T, mask=jnp.ones((N, T - 1), bool))
    bad_enc = GaussianPotentialEncoder(obs_dim=D, latent_dim=D + 1, hidden=(4,),
                                       key=jax.random.key(0))
    g2 = SVAEGuide(lds_model, encoder=bad_enc)
    g2._structure = guide.structure
    with pytest.raises(ValueError, match="encoder.*latent dim"):
        with handlers.seed(rng_seed=0):
            g2._infer((x,), dict(N=N, T=T))


def test_plain_callable_encoder_requires_params():
    with pytest.raises(ValueError, match="encoder_params"):
        SVAEGuide(lds_model, encoder=lambda p, x, m: (x, x))


# ~15 s: eager ELBO evaluations (not marked slow: see the module fixture's note above)
def test_svae_elbo_ignores_masked_entries_matches_zero_filled(lds_setup, key):
    from numpyro_svae.elbo import SVAE_ELBO

    x, guide, params = lds_setup
    elbo = SVAE_ELBO(num_particles=2)

    def loss(xx, **kw):
        return float(elbo.loss(key, params, lds_model, guide, xx, N=N, T=T, **kw))

    mask = jnp.ones((N, T, D), bool).at[1, 2, 0].set(False).at[2, 4].set(False)
    filled = jnp.where(mask, x, 0.0)
    holes = jnp.where(mask, x, jnp.nan)
    base = loss(filled, mask=mask)
    assert np.isfinite(base)
    np.testing.assert_allclose(loss(holes, mask=mask), base, rtol=1e-6)
    assert loss(x.at[0, 0, 0].add(1.0), mask=mask) != base  # observed entries matter
    # ragged batch: padded steps are ignored
    lengths = jnp.array([T, 3, 4])
    pad = jnp.arange(T)[None, :, None] >= lengths[:, None, None]
    a = loss(jnp.where(pad, 0.0, x), lengths=lengths)
    np.testing.assert_allclose(loss(jnp.where(pad, jnp.nan, x), lengths=lengths), a, rtol=1e-6)


def test_mniw_ridges_keep_the_prior_representable_matches_closed_form():
    """An unused regime's VB target is its prior.  `models.slds_model` has V0 = 1e-3 I, which
    equals the research code's fixed ridge on V (the boundary of the unconstrained map: NaN
    after ~500 natural-gradient steps on mocap6); the guide's ridges sit below the prior."""
    from numpyro_svae.expfam import (
        MNIWStandard,
        mniw_from_unconstrained,
        mniw_to_natural,
        mniw_to_unconstrained,
    )
    from numpyro_svae.models import slds_model as ready_slds
    from numpyro_svae.structure import discover_structure

    with jax.enable_x64(True):
        st = discover_structure(ready_slds, jnp.zeros((2, 4, 3)), N=2, T=4, Dx=3, K=2, D=2,
                                hidden=(4,), rng_key=jax.random.key(0))
        blk = st.dynamics
        ridges = SVAEGuide._ridges("dynamics", blk)
        assert 0 < ridges["jitter_V"] < np.linalg.eigvalsh(np.asarray(blk.V)).min()
        assert 0 < ridges["jitter_S"] < np.linalg.eigvalsh(np.asarray(blk.S)).min()
        eta0 = mniw_to_natural(MNIWStandard(*(jnp.asarray(a, jnp.float64)
                                              for a in (blk.S, blk.M, blk.V, blk.nu))))
        u = mniw_to_unconstrained(eta0, **ridges)
        assert all(np.all(np.isfinite(np.asarray(a))) for a in u)
        back = mniw_from_unconstrained(u, **ridges)
        for a, b in zip(back, eta0, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)
        bad = mniw_to_unconstrained(eta0)  # the fixed 1e-3 ridge: the prior is out of reach
        assert not all(np.all(np.isfinite(np.asarray(a))) for a in bad)
        assert SVAEGuide._ridges("init_state", st.init_state) == {}


def test_retract_takes_exact_natural_steps_on_every_block():
    """`SVAEGuide.retract` on an SLDS guide (Dirichlet, NIW and MNIW blocks): the new
    parameters' natural parameters are ``eta(u) + J du`` (float64, formed directly with
    ``*_from_unconstrained`` and a JVP); non-q(theta) entries pass through untouched."""
    import optax

    from numpyro_svae.expfam import (
        DirichletUnconstrained,
        MNIWUnconstrained,
        NIWUnconstrained,
        dirichlet_from_unconstrained,
        mniw_from_unconstrained,
        niw_from_unconstrained,
    )

    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(1), (2, 4, 3))
        enc = GaussianPotentialEncoder(obs_dim=3, latent_dim=2, hidden=(4,), key=jax.random.key(2))
        guide = SVAEGuide(slds_model, encoder=enc, natural_gradients=True)
        kw = dict(N=2, T=4, K=2, D=2, Dx=3, hidden=(4,))
        # structure discovery and the guide's initial q(theta), without a (costly) guide call
        st = guide._setup((x,), kw)
        params = {f"{guide.prefix}{name}.{f}": v
                  for i, name in enumerate(guide._latent_blocks(st))
                  for f, v in guide._init_unconstrained(name, st, jax.random.key(i))._asdict()
                  .items()}
        params["encoder$params"] = jnp.zeros(3)
        rng = np.random.default_rng(0)
        updates = {k: (jnp.asarray(0.05 * rng.normal(size=np.shape(v)))
                       if k.startswith(guide.prefix) else optax.MaskedNode())
                   for k, v in params.items()}
        out = guide.retract(params, updates)
        assert all(isinstance(out[k], optax.MaskedNode) for k in params
                   if not k.startswith(guide.prefix))
        blocks = {"init_state": (NIWUnconstrained, niw_from_unconstrained, {}),
                  "dynamics": (MNIWUnconstrained, mniw_from_unconstrained,
                               guide._ridges("dynamics", guide.structure.dynamics)),
                  "pi0": (DirichletUnconstrained, dirichlet_from_unconstrained, {}),
                  "P": (DirichletUnconstrained, dirichlet_from_unconstrained, {})}
        for name, (cls, from_u, opts) in blocks.items():
            get = lambda d, cls=cls, name=name: cls(
                *(d[f"{guide.prefix}{name}.{f}"] for f in cls._fields))
            u, du = get(params), get(updates)
            eta, deta = jax.jvp(lambda v, f=from_u, o=opts: f(v, natgrad=False, **o), (u,),
                                (du,))
            new = from_u(jax.tree.map(jnp.add, u, get(out)), natgrad=False, **opts)
            for a, b, c in zip(new, eta, deta, strict=True):
                np.testing.assert_allclose(a, b + c, rtol=1e-9, atol=1e-9, err_msg=name)
        # Euclidean-gradient guides refuse
        plain = SVAEGuide(slds_model, encoder=enc, natural_gradients=False)
        with pytest.raises(ValueError, match="natural_gradients=False"):
            plain.retract(params, updates)
        with pytest.raises(RuntimeError, match="first call"):
            SVAEGuide(slds_model, encoder=enc).retract(params, updates)

"""discover_structure: conjugate blocks, exact dependencies and the errors of unservable models.

Oracle: the hand-written models below, whose structure (sites, shapes, hyper-parameters) is
known by construction. All models share N=3, T=4 and small K, D so that the eager XLA
programs compiled by the first discovery are reused by the others (runtime).
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.contrib.control_flow import scan
from numpyro.distributions import constraints

from numpyro_svae.structure import ConjugateStructure, discover_structure

N, T, DX = 3, 4, 4

NAMES = dict(pi0="pi0", P="P", Q="Q", Ab="Ab", S0="S0", m0="m0", k0="k0", z0="z0", k="k",
             z="z", x="x", seq="sequences", reg="regimes")


def _emit(name, z0, zs, x, Dx=DX, extra=0.0):
    """Linear decoder of the stacked states: x [N, T, Dx] ~ Normal(W' z_t, 1)."""
    D = z0.shape[-1]
    W = numpyro.param("W", jnp.ones((D, Dx)) / D)
    zz = jnp.concatenate([z0[None], zs])  # [T, N, D]
    loc = jnp.swapaxes(zz @ W, 0, 1) + extra  # [N, T, Dx]
    numpyro.sample(name, dist.Normal(loc, 1.0).to_event(3), obs=x)


def make_slds(K=3, D=2, bias=True, lag=0, mode="latent", wrong=None, names=None):
    """The leading-regime SLDS model with switches for site names, bias, lag and wrong variants."""
    n = {**NAMES, **(names or {})}
    Din = D + 1 if bias else D
    M0 = 0.1 * jnp.ones((D, Din))
    V0 = jnp.diag(jnp.arange(1.0, Din + 1.0))  # column covariance; precision = its inverse

    def model(x=None):
        if mode == "latent":
            pi0 = numpyro.sample(n["pi0"], dist.Dirichlet(jnp.arange(1.0, K + 1.0)))
            with numpyro.plate(n["reg"], K):
                P = numpyro.sample(n["P"], dist.Dirichlet(0.5 + 9.5 * jnp.eye(K)))
                if wrong in ("gamma_noise", "lognormal_noise"):
                    prior = dist.Gamma(2.0, 2.0) if wrong == "gamma_noise" else dist.LogNormal()
                    s = numpyro.sample("noise", prior)
                    Q = s[:, None, None] * jnp.eye(D)
                else:
                    Q = numpyro.sample(n["Q"], dist.InverseWishart(D + 2.0, D * jnp.eye(D)))
                if wrong == "normal_A":
                    Ab = numpyro.sample(n["Ab"], dist.Normal(0.0, 1.0).expand([D, Din])
                                        .to_event(2))
                elif wrong == "row_scale":
                    Ab = numpyro.sample(n["Ab"], dist.MatrixNormal(M0, jnp.eye(D),
                                                                   jnp.linalg.cholesky(V0)))
                else:
                    Ab = numpyro.sample(n["Ab"], dist.MatrixNormal(M0, jnp.linalg.cholesky(Q),
                                                                   jnp.linalg.cholesky(V0)))
            S0 = numpyro.sample(n["S0"], dist.InverseWishart(D + 3.0, 2.0 * jnp.eye(D)))
            m0_cov = S0 + jnp.eye(D) if wrong == "m0_cov" else 100.0 * S0
            m0 = numpyro.sample(n["m0"], dist.MultivariateNormal(jnp.ones(D), m0_cov))
        elif mode == "param":
            pi0 = numpyro.param(n["pi0"], jnp.ones(K) / K, constraint=constraints.simplex)
            P = numpyro.param(n["P"], jnp.full((K, K), 1.0 / K), constraint=constraints.simplex)
            Q = numpyro.param(n["Q"], jnp.broadcast_to(jnp.eye(D), (K, D, D)),
                              constraint=constraints.positive_definite)
            Ab = numpyro.param(n["Ab"], 0.1 * jnp.arange(K * D * Din).reshape(K, D, Din))
            S0 = numpyro.param(n["S0"], jnp.eye(D), constraint=constraints.positive_definite)
            m0 = numpyro.param(n["m0"], jnp.zeros(D))
        else:  # constants
            pi0 = jnp.ones(K) / K
            P = 0.7 * jnp.eye(K) + 0.3 / K
            Q = 0.1 * jnp.arange(1.0, K + 1.0)[:, None, None] * jnp.eye(D)
            Ab = 0.1 * jnp.arange(K * D * Din, dtype=jnp.float32).reshape(K, D, Din)
            S0, m0 = jnp.eye(D), jnp.zeros(D)
        with numpyro.plate(n["seq"], N):
            k0 = numpyro.sample(n["k0"], dist.Categorical(pi0))
            z0 = numpyro.sample(n["z0"], dist.MultivariateNormal(m0, S0))

        def step(carry, _):
            k_prev, z_prev = carry
            with numpyro.plate(n["seq"], N):
                probs = P[k_prev]
                if wrong == "probs_squared":
                    probs = probs**2 / jnp.sum(probs**2, -1, keepdims=True)
                k = numpyro.sample(n["k"], dist.Categorical(probs))
                r = k if lag == 0 else k_prev
                loc = jnp.einsum("nij,nj->ni", Ab[r, :, :D], z_prev)
                if bias:
                    loc = loc + Ab[r, :, D]
                z = numpyro.sample(n["z"], dist.MultivariateNormal(loc, Q[r]))
            return (k, z), (z, k)

        if wrong == "const_k0":
            k0 = jnp.zeros(N, jnp.int32)
        if wrong == "plate_scan":
            with numpyro.plate(n["seq"], N):
                _, (zs, ks) = scan(step, (k0, z0), None, length=T - 1)
        else:
            _, (zs, ks) = scan(step, (k0, z0), None, length=T - 1)
        extra = 0.0
        if wrong == "emit_k":
            extra = jnp.swapaxes(jnp.concatenate([k0[None], ks]), 0, 1)[..., None] * 1.0
        _emit(n["x"], z0, zs, x, extra=extra)

    return model


def make_lds(D=2, bias=True, plate_k1=False):
    """LDS: MNIW dynamics without regimes plate (or under a regimes plate of size 1)."""
    Din = D + 1 if bias else D

    def model(x=None):
        if plate_k1:
            with numpyro.plate("regimes", 1):
                Q = numpyro.sample("Q", dist.InverseWishart(D + 2.0, jnp.eye(D)))
                Ab = numpyro.sample("Ab", dist.MatrixNormal(jnp.zeros((D, Din)),
                                                            jnp.linalg.cholesky(Q), jnp.eye(Din)))
            Q, Ab = Q[0], Ab[0]
        else:
            Q = numpyro.sample("Q", dist.InverseWishart(D + 2.0, jnp.eye(D)))
            Ab = numpyro.sample("Ab", dist.MatrixNormal(jnp.zeros((D, Din)),
                                                        jnp.linalg.cholesky(Q), jnp.eye(Din)))
        S0 = numpyro.sample("S0", dist.InverseWishart(D + 2.0, jnp.eye(D)))
        m0 = numpyro.sample("m0", dist.MultivariateNormal(jnp.zeros(D), S0 / 0.5))
        with numpyro.plate("seqs", N):
            z0 = numpyro.sample("z0", dist.MultivariateNormal(m0, S0))

        def step(z_prev, _):
            with numpyro.plate("seqs", N):
                loc = z_prev @ Ab[:, :D].T + (Ab[:, D] if bias else 0.0)
                z = numpyro.sample("z", dist.MultivariateNormal(loc, Q))
            return z, z

        _, zs = scan(step, z0, None, length=T - 1)
        _emit("y", z0, zs, x)

    return model


def make_hmm(K=2, D=2):
    """HMM with Gaussian latents iid given the regime, NIW prior per regime."""

    def model(x=None):
        pi0 = numpyro.sample("pi0", dist.Dirichlet(jnp.ones(K)))
        with numpyro.plate("regimes", K):
            P = numpyro.sample("P", dist.Dirichlet(jnp.ones(K) + jnp.eye(K)))
            Sig = numpyro.sample("Sig", dist.InverseWishart(D + 2.0, jnp.eye(D)))
            mu = numpyro.sample("mu", dist.MultivariateNormal(jnp.zeros(D), 4.0 * Sig))
        with numpyro.plate("sequences", N):
            k0 = numpyro.sample("k0", dist.Categorical(pi0))
            z0 = numpyro.sample("z0", dist.MultivariateNormal(mu[k0], Sig[k0]))

        def step(k_prev, _):
            with numpyro.plate("sequences", N):
                k = numpyro.sample("k", dist.Categorical(P[k_prev]))
                z = numpyro.sample("z", dist.MultivariateNormal(mu[k], Sig[k]))
            return k, z

        _, zs = scan(step, k0, None, length=T - 1)
        _emit("x", z0, zs, x)

    return model


def make_gmm(K=3, D=2, mode="latent"):
    """Gaussian mixture: iid k_n, z_n | k_n, x_n = W' z_n + noise."""

    def model(x=None):
        if mode == "latent":
            w = numpyro.sample("w", dist.Dirichlet(jnp.ones(K)))
            with numpyro.plate("regimes", K):
                Sig = numpyro.sample("Sig", dist.InverseWishart(D + 2.0, jnp.eye(D)))
                mu = numpyro.sample("mu", dist.MultivariateNormal(jnp.zeros(D), 10.0 * Sig))
        else:
            w = jnp.ones(K) / K
            mu = numpyro.param("mu", jnp.arange(K * D, dtype=jnp.float32).reshape(K, D))
            Sig = jnp.broadcast_to(jnp.eye(D), (K, D, D))
        W = numpyro.param("W", jnp.ones((D, DX)))
        with numpyro.plate("data", N):
            k = numpyro.sample("k", dist.Categorical(w))
            z = numpyro.sample("z", dist.MultivariateNormal(mu[k], Sig[k]))
            numpyro.sample("x", dist.Normal(z @ W, 1.0).to_event(1), obs=x)

    return model


X = np.zeros((N, T, DX), np.float32)


def discover(model, x=X, **kw):
    return discover_structure(model, jnp.asarray(x) if x is not None else None, **kw)


# ------------------------------------------------------------------------- discovery


def test_slds_structure_matches_architecture_model():
    s = discover(make_slds())
    assert isinstance(s, ConjugateStructure)
    assert (s.family, s.N, s.subsample_size, s.T, s.K, s.D) == ("slds", N, N, T, 3, 2)
    assert s.bias and s.leading_regime and not s.dangling_regime
    assert (s.sequence_plate, s.regime_plate, s.scan_length) == ("sequences", "regimes", T - 1)
    assert (s.k_init_site, s.k_site, s.z_init_site, s.z_site) == ("k0", "k", "z0", "z")
    # hyper-parameters read off the priors
    np.testing.assert_allclose(s.pi0.alpha, [1.0, 2.0, 3.0])
    np.testing.assert_allclose(s.P.alpha, 0.5 + 9.5 * np.eye(3))
    dyn = s.dynamics
    assert (dyn.kind, dyn.cov_site, dyn.matrix_site) == ("latent", "Q", "Ab")
    np.testing.assert_allclose(dyn.nu, [4.0] * 3)
    np.testing.assert_allclose(dyn.S, np.broadcast_to(2.0 * np.eye(2), (3, 2, 2)), rtol=1e-5)
    np.testing.assert_allclose(dyn.M, np.full((3, 2, 3), 0.1), rtol=1e-6)
    np.testing.assert_allclose(dyn.V[0], np.diag([1.0, 1 / 2, 1 / 3]), rtol=1e-5, atol=1e-6)
    assert dyn.matrix_value.shape == (3, 2, 3) and dyn.cov_value.shape == (3, 2, 2)
    ini = s.init_state
    assert (ini.kind, ini.cov_site, ini.mean_site) == ("latent", "S0", "m0")
    np.testing.assert_allclose([ini.nu, ini.lam], [5.0, 0.01], rtol=1e-5)
    np.testing.assert_allclose(ini.S, 2.0 * np.eye(2), rtol=1e-5)
    np.testing.assert_allclose(ini.m, np.ones(2))
    # observation and site table
    assert s.obs.name == "x" and s.obs.shape == (N, T, DX) and s.obs.event_dim == 3
    assert s.obs.latent_inputs == ("z0", "z") and s.obs.param_inputs == ("W",)
    assert s.sites["z"].shape == (T - 1, N, 2) and s.sites["z"].in_scan
    assert s.sites["Ab"].role == "dyn_matrix" and s.sites["W"].role == "other"
    assert s.latent_sites == ("pi0", "P", "Q", "Ab", "S0", "m0", "k0", "z0", "k", "z")
    assert s.Din == 3 and s.regime_gaussians is None


def test_summary_lists_blocks_with_sites_and_shapes():
    text = str(discover(make_slds()))
    assert "family='slds'" in text
    for piece in ("Dirichlet transition rows", "P[3, 3]", "Q[3, 2, 2], Ab[3, 2, 3]",
                  "S0[2, 2], m0[2]", "k0[3], k[3, 3]", "z0[3, 2], z[3, 3, 2]", "x[3, 4, 4]"):
        assert piece in text, piece


def test_slds_other_names_no_bias_matches_construction():
    names = dict(pi0="init_p", P="trans", Q="noise", Ab="A", S0="Sig0", m0="mu0", k0="s0",
                 z0="x0", k="s", z="xs", x="obs", seq="batch", reg="K")
    s = discover(make_slds(K=2, D=3, bias=False, names=names))
    assert (s.family, s.K, s.D, s.bias) == ("slds", 2, 3, False)
    assert (s.dynamics.cov_site, s.dynamics.matrix_site) == ("noise", "A")
    assert s.dynamics.M.shape == (2, 3, 3) and s.dynamics.V.shape == (2, 3, 3)
    assert (s.pi0.site, s.P.site, s.init_state.cov_site) == ("init_p", "trans", "Sig0")
    assert (s.k_init_site, s.k_site, s.z_init_site, s.z_site) == ("s0", "s", "x0", "xs")
    assert (s.sequence_plate, s.regime_plate, s.obs.name) == ("batch", "K", "obs")


def test_lag_one_regime_is_reported_as_dangling():
    s = discover(make_slds(lag=1))
    assert s.family == "slds" and not s.leading_regime and s.dangling_regime


@pytest.mark.parametrize("mode", ["param", "constant"])
def test_point_estimate_and_constant_globals_match_model_values(mode):
    K, D = 3, 2
    s = discover(make_slds(K=K, D=D, mode=mode))
    assert s.family == "slds"
    for blk in (s.pi0, s.P, s.init_state, s.dynamics):
        assert blk.kind == mode
    ab = 0.1 * np.arange(K * D * (D + 1)).reshape(K, D, D + 1)
    if mode == "param":
        assert (s.pi0.site, s.P.site, s.dynamics.cov_site, s.dynamics.matrix_site) == (
            "pi0", "P", "Q", "Ab")
        assert (s.init_state.cov_site, s.init_state.mean_site) == ("S0", "m0")
        assert s.sites["Ab"].role == "dyn_matrix" and s.sites["P"].role == "P"
        np.testing.assert_allclose(s.P.value, np.full((K, K), 1 / K), rtol=1e-5)
        q = np.broadcast_to(np.eye(D), (K, D, D))
    else:
        assert s.P.site is None and s.dynamics.matrix_site is None
        np.testing.assert_allclose(s.P.value, 0.7 * np.eye(K) + 0.1, rtol=1e-5)
        q = 0.1 * np.arange(1.0, K + 1.0)[:, None, None] * np.eye(D)
    assert s.P.alpha is None and s.dynamics.S is None and s.bias
    np.testing.assert_allclose(s.dynamics.matrix_value, ab, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s.dynamics.cov_value, q, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.init_state.cov_value, np.eye(D), atol=1e-6)
    assert s.latent_sites == ("k0", "z0", "k", "z")


@pytest.mark.parametrize("bias,plate_k1", [(True, False), (False, False), (True, True)])
def test_lds_structure_matches_construction(bias, plate_k1):
    s = discover(make_lds(bias=bias, plate_k1=plate_k1))
    assert (s.family, s.K, s.D, s.bias, s.T) == ("lds", 1, 2, bias, T)
    assert s.pi0 is None and s.P is None and s.k_site is None and s.k_init_site is None
    assert not s.leading_regime
    assert s.dynamics.M.shape == (1, 2, 3 if bias else 2) and s.dynamics.nu.shape == (1,)
    np.testing.assert_allclose(s.init_state.lam, 0.5, rtol=1e-5)
    assert s.obs.name == "y" and s.sequence_plate == "seqs"
    assert s.regime_plate == ("regimes" if plate_k1 else None)


def test_hmm_structure_matches_construction():
    s = discover(make_hmm())
    assert (s.family, s.K, s.D, s.T) == ("hmm", 2, 2, T)
    rg = s.regime_gaussians
    assert (rg.role, rg.kind, rg.cov_site, rg.mean_site) == ("regime", "latent", "Sig", "mu")
    np.testing.assert_allclose(rg.lam, [0.25, 0.25], rtol=1e-5)
    assert rg.S.shape == (2, 2, 2) and rg.m.shape == (2, 2) and rg.nu.shape == (2,)
    np.testing.assert_allclose(s.P.alpha, np.ones((2, 2)) + np.eye(2))
    assert s.dynamics is None and s.init_state is None and not s.leading_regime
    assert (s.k_init_site, s.k_site, s.z_init_site, s.z_site) == ("k0", "k", "z0", "z")


@pytest.mark.parametrize("mode", ["latent", "param"])
def test_gmm_structure_matches_construction(mode):
    s = discover(make_gmm(mode=mode), x=np.zeros((N, DX), np.float32))
    assert (s.family, s.K, s.D, s.T, s.N, s.scan_length) == ("gmm", 3, 2, 1, N, 0)
    assert (s.k_site, s.z_site, s.sequence_plate) == ("k", "z", "data")
    rg = s.regime_gaussians
    if mode == "latent":
        assert (rg.kind, s.pi0.kind, s.pi0.site) == ("latent", "latent", "w")
        np.testing.assert_allclose(rg.lam, [0.1] * 3, rtol=1e-5)
    else:
        assert (rg.kind, rg.mean_site, rg.cov_site, s.pi0.kind) == ("param", "mu", None,
                                                                    "constant")
        np.testing.assert_allclose(rg.mean_value, np.arange(6.0).reshape(3, 2), atol=1e-5)
        np.testing.assert_allclose(s.pi0.value, np.ones(3) / 3, rtol=1e-5)
    assert s.obs.latent_inputs == ("z",) and s.obs.event_dim == 1


def test_masked_observation_records_mask():
    mask = np.ones((N, T), bool)
    mask[0, 1] = False

    assert discover(make_slds()).obs.mask is None

    def masked(x=None):
        D = 2
        S0 = numpyro.sample("S0", dist.InverseWishart(D + 2.0, jnp.eye(D)))
        m0 = numpyro.sample("m0", dist.MultivariateNormal(jnp.zeros(D), S0))
        Q = numpyro.sample("Q", dist.InverseWishart(D + 2.0, jnp.eye(D)))
        A = numpyro.sample("A", dist.MatrixNormal(jnp.zeros((D, D)), jnp.linalg.cholesky(Q),
                                                  jnp.eye(D)))
        with numpyro.plate("seq", N):
            z0 = numpyro.sample("z0", dist.MultivariateNormal(m0, S0))

        def step(z_prev, _):
            with numpyro.plate("seq", N):
                z = numpyro.sample("z", dist.MultivariateNormal(z_prev @ A.T, Q))
            return z, z

        _, zs = scan(step, z0, None, length=T - 1)
        loc = jnp.swapaxes(jnp.concatenate([z0[None], zs]), 0, 1) @ jnp.ones((D, DX))
        numpyro.sample("x", dist.Normal(loc, 1.0).to_event(1).mask(jnp.asarray(mask)), obs=x)

    s = discover(masked)
    assert s.family == "lds" and not s.bias
    np.testing.assert_array_equal(s.obs.mask, mask)
    assert s.obs.batch_shape == (N, T) and s.obs.event_shape == (DX,)


def test_typed_and_raw_keys_give_same_structure():
    a = discover(make_lds(), rng_key=jax.random.key(1))
    b = discover(make_lds(), rng_key=jax.random.PRNGKey(1))
    assert a.summary() == b.summary()


# ------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "wrong,match",
    [
        ("normal_A", r"site 'Ab'.*Normal prior on a dynamics parameter.*MatrixNormal"),
        ("gamma_noise", r"site 'noise'.*Gamma prior sets the noise covariance.*InverseWishart"),
        ("lognormal_noise", r"site 'noise'.*LogNormal prior.*InverseWishart"),
        ("row_scale", r"site 'Ab'.*row scale is not the Cholesky factor.*cholesky\(Q\)"),
        ("probs_squared", r"site 'k'.*not the rows of the Dirichlet site 'P'"),
        ("emit_k", r"site 'x'.*emission depends directly on the discrete state 'k0'"),
        ("plate_scan", r"plate 'sequences' encloses the scan.*inside the scan body"),
        ("m0_cov", r"site 'm0'.*not a scalar multiple Sigma / lam of 'S0'"),
        ("const_k0", r"site 'k'.*initial carry.*a constant.*k0 ~ Categorical\(pi0\)"),
    ],
)
def test_unservable_slds_variants_raise_naming_the_site(wrong, match):
    with pytest.raises(ValueError, match=match):
        discover(make_slds(wrong=wrong))


def test_missing_observation_raises():
    with pytest.raises(ValueError, match=r"site 'x'.*no observed site.*obs="):
        discover(make_slds(), x=None)


def test_no_continuous_chain_raises():
    def mvn_global(x=None):
        w = numpyro.sample("w", dist.MultivariateNormal(jnp.zeros(2), jnp.eye(2)))
        with numpyro.plate("data", N):
            numpyro.sample("x", dist.Normal(w @ jnp.ones((2, DX)), 1.0).to_event(1), obs=x)

    with pytest.raises(ValueError, match="no continuous latent chain"):
        discover(mvn_global, x=np.zeros((N, DX), np.float32))

    def discrete_only(x=None):
        P = numpyro.sample("P", dist.Dirichlet(jnp.ones((2, 2))))
        with numpyro.plate("sequences", N):
            k0 = numpyro.sample("k0", dist.Categorical(jnp.ones(2) / 2))

        def step(k_prev, _):
            with numpyro.plate("sequences", N):
                k = numpyro.sample("k", dist.Categorical(P[k_prev]))
            return k, k

        _, ks = scan(step, k0, None, length=T - 1)
        loc = jnp.swapaxes(jnp.concatenate([k0[None], ks]), 0, 1)[..., None] * jnp.ones(DX)
        numpyro.sample("x", dist.Normal(loc, 1.0).to_event(3), obs=x)

    with pytest.raises(ValueError, match="no continuous latent chain"):
        discover(discrete_only)


def test_probs_from_non_dirichlet_site_raise():
    def model(x=None):
        K, D = 2, 2
        with numpyro.plate("regimes", K):
            w = numpyro.sample("w", dist.MultivariateNormal(jnp.zeros(K), jnp.eye(K)))
            Q = numpyro.sample("Q", dist.InverseWishart(D + 2.0, jnp.eye(D)))
            A = numpyro.sample("A", dist.MatrixNormal(jnp.zeros((D, D)), jnp.linalg.cholesky(Q),
                                                      jnp.eye(D)))
        S0 = numpyro.sample("S0", dist.InverseWishart(D + 2.0, jnp.eye(D)))
        m0 = numpyro.sample("m0", dist.MultivariateNormal(jnp.zeros(D), S0))
        with numpyro.plate("sequences", N):
            k0 = numpyro.sample("k0", dist.Categorical(jnp.ones(K) / K))
            z0 = numpyro.sample("z0", dist.MultivariateNormal(m0, S0))

        def step(carry, _):
            k_prev, z_prev = carry
            with numpyro.plate("sequences", N):
                k = numpyro.sample("k", dist.Categorical(jax.nn.softmax(w)[k_prev]))
                z = numpyro.sample("z", dist.MultivariateNormal(
                    jnp.einsum("nij,nj->ni", A[k], z_prev), Q[k]))
            return (k, z), z

        _, zs = scan(step, (k0, z0), None, length=T - 1)
        _emit("x", z0, zs, x)

    with pytest.raises(ValueError, match=r"site 'k'.*probabilities come from 'w' "
                       r"\(MultivariateNormal\), not from a Dirichlet site"):
        discover(model)


def test_hyper_parameter_tied_to_param_raises():
    def model(x=None):
        D = 2
        scale = numpyro.param("scale", jnp.eye(D), constraint=constraints.positive_definite)
        Q = numpyro.sample("Q", dist.InverseWishart(D + 2.0, scale))
        A = numpyro.sample("A", dist.MatrixNormal(jnp.zeros((D, D)), jnp.linalg.cholesky(Q),
                                                  jnp.eye(D)))
        with numpyro.plate("seq", N):
            z0 = numpyro.sample("z0", dist.MultivariateNormal(jnp.zeros(D), jnp.eye(D)))

        def step(z_prev, _):
            with numpyro.plate("seq", N):
                z = numpyro.sample("z", dist.MultivariateNormal(z_prev @ A.T, Q))
            return z, z

        _, zs = scan(step, z0, None, length=T - 1)
        _emit("x", z0, zs, x)

    with pytest.raises(ValueError, match=r"site 'Q'.*hyper-parameters.*depend on \['scale'\]"):
        discover(model)


def test_dependencies_match_one_step_of_the_scan():
    """Provenance of ONE body step: exact parents, not the all-steps union of inspect."""
    s = discover(make_slds())
    dep = s.dependencies
    assert dep["z"]["loc"] == {"z_prev", "Ab", "k"}
    assert dep["z"]["cov"] == {"Q", "k"}
    assert dep["k"]["probs"] == {"P", "k_prev"}
    assert dep["Ab"]["scale_tril_row"] == {"Q"} and dep["Ab"]["loc"] == frozenset()
    assert dep["m0"]["cov"] == {"S0"} and dep["z0"]["loc"] == {"m0"}
    assert dep["k0"]["probs"] == {"pi0"}
    assert dep["x"]["all"] == {"z0", "z", "W"}
    lag = discover(make_slds(lag=1)).dependencies
    assert lag["z"]["loc"] == {"z_prev", "Ab", "k_prev"}


def test_subsampled_plate_records_full_and_batch_size():
    def model(x):
        w = numpyro.sample("w", dist.Dirichlet(jnp.ones(3)))
        with numpyro.plate("regimes", 3):
            Sig = numpyro.sample("Sig", dist.InverseWishart(4.0, jnp.eye(2)))
            mu = numpyro.sample("mu", dist.MultivariateNormal(jnp.zeros(2), 10.0 * Sig))
        with numpyro.plate("data", 6, subsample_size=N) as idx:
            k = numpyro.sample("k", dist.Categorical(w))
            z = numpyro.sample("z", dist.MultivariateNormal(mu[k], Sig[k]))
            numpyro.sample("x", dist.Normal(z @ jnp.ones((2, DX)), 1.0).to_event(1), obs=x[idx])

    s = discover(model, x=np.zeros((6, DX), np.float32))
    assert (s.family, s.N, s.subsample_size) == ("gmm", 6, N)


def test_float64_discovery_matches_float32():
    s32 = discover(make_lds())
    with jax.enable_x64(True):
        s64 = discover(make_lds(), x=np.zeros((N, T, DX)))
        assert s64.dynamics.matrix_value.dtype == np.float64
    assert s64.summary() == s32.summary()
    np.testing.assert_allclose(s64.init_state.lam, s32.init_state.lam, rtol=1e-6)


def test_param_global_not_used_as_is_raises():
    def model(x=None):
        D = 2
        L = numpyro.param("L", jnp.eye(D))
        Q = L @ L.T + 0.1 * jnp.eye(D)
        A = numpyro.param("A", 0.5 * jnp.eye(D))
        with numpyro.plate("seq", N):
            z0 = numpyro.sample("z0", dist.MultivariateNormal(jnp.zeros(D), jnp.eye(D)))

        def step(z_prev, _):
            with numpyro.plate("seq", N):
                z = numpyro.sample("z", dist.MultivariateNormal(z_prev @ A.T, Q))
            return z, z

        _, zs = scan(step, z0, None, length=T - 1)
        _emit("x", z0, zs, x)

    with pytest.raises(ValueError, match=r"site 'L'.*not used as is.*positive_definite"):
        discover(model)


def test_python_branch_on_sampled_value_raises():
    inner = make_lds()

    def model(x=None):
        if float(numpyro.sample("c", dist.Normal(0.0, 1.0))) > 10.0:
            pass
        inner(x)

    with pytest.raises(ValueError, match="could not be traced by jax.make_jaxpr"):
        discover(model)


@pytest.mark.parametrize("name,family", [("slds_model", "slds"), ("lds_model", "lds"),
                                         ("hmm_model", "hmm")])
def test_ready_made_models_match_their_family(name, family):
    """The package's own models (neural decoder, masked emission under a plate) are served."""
    models = pytest.importorskip("numpyro_svae.models")
    mask = np.ones((N, T), np.float32)
    mask[0, 1] = 0.0
    s = discover_structure(getattr(models, name), jnp.asarray(X), N=N, T=T, Dx=DX, K=2, D=2,
                           hidden=(8,), mask=jnp.asarray(mask))
    assert (s.family, s.N, s.T, s.D) == (family, N, T, 2)
    assert s.K == (1 if family == "lds" else 2)
    assert s.obs.param_inputs == ("decoder$params",)
    assert s.obs.mask is not None and not s.obs.mask[0, 1].any() and s.obs.mask[0, 0].all()
    assert s.sites[s.obs.name].plates == (("sequences", N, -1),)

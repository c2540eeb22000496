"""The compiled eager call of the guide (`numpyro_svae._eager`) against the op-by-op one.

An eager call (``SVI.init``, ``trace(seed(guide))``) runs the guide body as one jitted
program and replays its sites; the caller must see the same trace as from the plain body:
the same sites, shapes, distributions, plates and scales, honoured substitutions, identical
log-densities of the globals, and the same input errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from numpyro.infer import SVI

from numpyro_svae.elbo import SVAE_ELBO
from numpyro_svae.guide import SVAEGuide
from numpyro_svae.nn import GaussianPotentialEncoder
from numpyro_svae.optim import natural_gradient
from tests.front.test_guide import slds_model

N, T, K, D, DX = 3, 6, 2, 2, 4
KW = dict(N=N, T=T, K=K, D=D, Dx=DX, hidden=(8,))
GLOBALS = ("pi0", "P", "Q", "Ab", "S0", "m0")


def _guide(compile_eager):
    enc = GaussianPotentialEncoder(obs_dim=DX, latent_dim=D, hidden=(8,), key=jax.random.key(1))
    return SVAEGuide(slds_model, encoder=enc, max_iters=3, compile_eager=compile_eager)


@pytest.fixture(scope="module")
def data():
    return np.random.default_rng(0).normal(size=(N, T, DX)).astype(np.float32)


@pytest.fixture(scope="module")
def guides():
    return _guide(True), _guide(False)


def _trace(guide, x, key=0, params=None, values=None):
    g = handlers.seed(guide, rng_seed=key)
    if params is not None:
        g = handlers.substitute(g, data=params)
    if values is not None:
        g = handlers.substitute(g, data=values)
    return handlers.trace(g).get_trace(x, **KW)


def test_compiled_eager_trace_matches_plain_trace(guides, data):
    fast, plain = guides
    tf, tp = _trace(fast, data), _trace(plain, data)
    assert fast.__dict__.get("_compiled_cache")  # the compiled path was taken
    assert not plain.__dict__.get("_compiled_cache")
    kinds = lambda tr: {n: s["type"] for n, s in tr.items() if s["type"] != "prng_key"}
    assert kinds(tf) == kinds(tp)
    for name, sp in tp.items():
        sf = tf[name]
        if sp["type"] == "param":
            for a, b in zip(jax.tree.leaves(sf["value"]), jax.tree.leaves(sp["value"]),
                            strict=True):
                assert jnp.shape(a) == jnp.shape(b)
            assert sf["kwargs"].keys() == sp["kwargs"].keys()
        if sp["type"] == "sample":
            assert jnp.shape(sf["value"]) == jnp.shape(sp["value"])
            assert type(sf["fn"]) is type(sp["fn"])
            assert sf["fn"].batch_shape == sp["fn"].batch_shape
            assert sf["fn"].event_shape == sp["fn"].event_shape
            assert [(f.name, f.dim, f.size) for f in sf["cond_indep_stack"]] == \
                [(f.name, f.dim, f.size) for f in sp["cond_indep_stack"]]
            assert (sf["scale"] is None) == (sp["scale"] is None)
            assert not sf["is_observed"]


def test_compiled_eager_honours_substituted_params_and_values(guides, data):
    """Outer substitutions reach the compiled body (params) and the replayed sites (values):
    then the global sites' log-densities equal the plain path's exactly."""
    fast, plain = guides
    tp = _trace(plain, data, key=3)
    params = {n: s["value"] for n, s in tp.items() if s["type"] == "param"}
    params = jax.tree.map(lambda a: a + 0.01 * jnp.ones_like(a), params)  # not the init
    values = {n: tp[n]["value"] for n in GLOBALS}
    tp2 = _trace(plain, data, key=3, params=params, values=values)
    tf2 = _trace(fast, data, key=5, params=params, values=values)
    for n in params:
        for a, b in zip(jax.tree.leaves(tf2[n]["value"]), jax.tree.leaves(params[n]),
                        strict=True):
            np.testing.assert_array_equal(a, b)
    for n in GLOBALS:
        np.testing.assert_array_equal(tf2[n]["value"], values[n])
        lf = tf2[n]["fn"].log_prob(tf2[n]["value"])
        lp = tp2[n]["fn"].log_prob(tp2[n]["value"])
        np.testing.assert_allclose(lf, lp, rtol=1e-5, atol=1e-5)
    for n in ("z", "k"):
        assert np.all(np.isfinite(tf2[n]["fn"].log_prob(tf2[n]["value"])))


def test_compiled_eager_svi_init_and_sample_posterior(guides, data):
    fast, _ = guides
    svi = SVI(slds_model, fast, natural_gradient(natgrad_lr=0.1), loss=SVAE_ELBO())
    state = svi.init(jax.random.key(0), data, **KW)
    params = svi.get_params(state)
    assert "svae$diagnostics" in state.mutable_state
    draws = fast.sample_posterior(jax.random.key(1), params, data, sample_shape=(2,), **KW)
    assert draws["z"].shape == (2, T - 1, N, D)
    assert draws["k"].shape == (2, T - 1, N)
    assert draws["Q"].shape == (2, K, D, D)
    one = fast.sample_posterior(jax.random.key(1), params, data, **KW)
    assert one["z0"].shape == (N, D)


def test_compiled_eager_raises_on_nonfinite_observed_data(guides, data):
    fast, _ = guides
    bad = data.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match=r"sequence 1, step 2, dim 3"):
        _trace(fast, bad)


def test_guide_serves_data_of_another_size_with_the_same_params(guides, data):
    """Held-out data with another N and T: its own structure, the same q(theta) params;
    a model of another shape (K) is refused with a clear error."""
    fast, _ = guides
    tr = _trace(fast, data)
    params = {n: s["value"] for n, s in tr.items() if s["type"] == "param"}
    held = np.random.default_rng(1).normal(size=(2, T + 2, DX)).astype(np.float32)
    kw = dict(KW, N=2, T=T + 2)
    post = fast.posterior(params, held, **kw)
    assert post.latent_mean.shape == (2, T + 2, D)
    assert post.regime_marginals.shape == (2, T + 2, K)
    assert fast.structure.N == 2  # the structure of the last call
    fast.posterior(params, data, **KW)
    assert fast.structure.N == N
    with pytest.raises(ValueError, match="another shape"):
        fast._setup((data,), dict(KW, K=K + 1))

"""Tests of the log-space forward-backward (numpyro_svae/messages/hmm.py).

Oracles: enumeration of all K^T paths, gradients of the log normaliser, dynamax 1.0.3, the
sequential twin (for the parallel scan), float64 (for float32) and Monte Carlo frequencies.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy.special import logsumexp

from numpyro_svae.messages.hmm import (
    HMMPotentials,
    hmm_expected_stats_by_grad,
    hmm_filter,
    hmm_log_normalizer,
    hmm_sample,
    hmm_smoother,
    hmm_smoother_parallel,
    hmm_smoother_sequential,
)
from tests._tol import tol

METHODS = ["sequential", "parallel"]

# Compiled once per shape/dtype and shared by the tests (eager op-by-op dispatch is far slower).
_smoother = jax.jit(hmm_smoother, static_argnames=("pairwise", "method"))
_value_grad_log_z = jax.jit(jax.value_and_grad(hmm_log_normalizer), static_argnames=("method",))
_filter = jax.jit(hmm_filter, static_argnames=("method",))
_by_grad = jax.jit(hmm_expected_stats_by_grad)
_sample = jax.jit(hmm_sample, static_argnames=("num_samples", "method"))


def _random_potentials(rng, T, K, time_varying, forbid=True, normalised=False):
    """numpy float64 potentials; unnormalised by default, with some -inf entries if `forbid`."""
    shape = (T - 1, K, K) if time_varying else (K, K)
    if normalised:
        log_init = np.log(rng.dirichlet(np.ones(K)))
        log_trans = np.log(rng.dirichlet(np.ones(K), size=shape[:-1]))
        log_lik = rng.normal(size=(T, K)) - 3.0
    else:
        log_init = rng.normal(size=K) - 1.0
        log_trans = rng.normal(size=shape) - 2.0  # sub-normalised, like E[log P]
        log_lik = 2.0 * rng.normal(size=(T, K))
    if forbid:
        log_init[-1] = -np.inf
        log_trans[..., 0, 1] = -np.inf  # forbidden transition 0 -> 1
        log_lik[1, 2 % K] = -np.inf
    return log_init, log_trans, log_lik


def _to_jax(pot_np, dtype):
    return HMMPotentials(*(jnp.asarray(x, dtype=dtype) for x in pot_np))


def _enumerate(log_init, log_trans, log_lik):
    """Brute force over all K^T paths: logZ, marginals [T,K], pairwise [T-1,K,K], filtered."""
    T, K = log_lik.shape
    lt = np.broadcast_to(log_trans, (T - 1, K, K))
    paths = np.array(list(itertools.product(range(K), repeat=T)))  # [K^T, T]
    ts = np.arange(T)
    with np.errstate(invalid="ignore"):
        logw = log_init[paths[:, 0]] + log_lik[ts, paths].sum(1)
        if T > 1:
            logw = logw + lt[ts[:-1], paths[:, :-1], paths[:, 1:]].sum(1)
    log_z = logsumexp(logw)
    w = np.exp(logw - log_z)
    marg = np.zeros((T, K))
    pair = np.zeros((T - 1, K, K))
    for t in range(T):
        np.add.at(marg[t], paths[:, t], w)
    for t in range(T - 1):
        np.add.at(pair[t], (paths[:, t], paths[:, t + 1]), w)
    return log_z, marg, pair


def _enumerate_filtered(log_init, log_trans, log_lik):
    T = log_lik.shape[0]
    out = []
    for t in range(T):
        lt = log_trans if log_trans.ndim == 2 else log_trans[:t]
        _, marg, _ = _enumerate(log_init, lt, log_lik[: t + 1])
        with np.errstate(divide="ignore"):
            out.append(np.log(marg[-1]))
    return np.stack(out)


def _assert_close(a, b, dtype, **override):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **{**tol(dtype), **override})


# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "time_varying, dtype", [(False, "float64"), (True, "float64"), (True, "float32")]
)
@pytest.mark.parametrize("method", METHODS)
def test_hmm_smoother_matches_enumeration(method, time_varying, dtype):
    rng = np.random.default_rng(1 + time_varying)
    T, K = 6, 3
    pot_np = _random_potentials(rng, T, K, time_varying)
    log_z, marg, pair = _enumerate(*pot_np)
    filt = _enumerate_filtered(*pot_np)
    with jax.enable_x64(dtype == "float64"):
        pot = _to_jax(pot_np, dtype)
        post = _smoother(pot, pairwise=True, method=method)
        assert post.marginals.dtype == jnp.dtype(dtype)
        assert post.pairwise.shape == (T - 1, K, K)
        _assert_close(post.log_normalizer, log_z, dtype)
        _assert_close(post.marginals, marg, dtype)
        _assert_close(post.pairwise, pair, dtype)
        _assert_close(post.trans_counts, pair.sum(0), dtype)
        if dtype == "float64" and not time_varying:  # (one compile of the filter per method)
            log_z_f, filtered = _filter(pot, method=method)
            _assert_close(log_z_f, log_z, dtype)
            _assert_close(jnp.exp(filtered), np.exp(filt), dtype)
        _assert_close(jnp.exp(post.filtered_log), np.exp(filt), dtype)
        assert jax.eval_shape(lambda p: hmm_smoother(p, method=method), pot).pairwise is None


@pytest.mark.parametrize("method", METHODS)
def test_single_step_chain_matches_enumeration(method):
    rng = np.random.default_rng(3)
    pot_np = _random_potentials(rng, 1, 3, time_varying=True, forbid=False)
    log_z, marg, _ = _enumerate(*pot_np)
    with jax.enable_x64(True):
        post = _smoother(_to_jax(pot_np, "float64"), pairwise=True, method=method)
        _assert_close(post.log_normalizer, log_z, "float64")
        _assert_close(post.marginals, marg, "float64")
        assert post.pairwise.shape == (0, 3, 3)
        _assert_close(post.trans_counts, np.zeros((3, 3)), "float64")
        s = _sample(jax.random.key(0), _to_jax(pot_np, "float64"), num_samples=3, method=method)
        assert s.shape == (3, 1)


@pytest.mark.parametrize("time_varying", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_expected_stats_match_grad_log_normalizer(method, time_varying):
    """d logZ/d log_lik = marginals, d/d log_trans = counts (pairwise), d/d log_init = q(k_1)."""
    rng = np.random.default_rng(4)
    pot_np = _random_potentials(rng, 6, 3, time_varying)
    with jax.enable_x64(True):
        pot = _to_jax(pot_np, "float64")
        post = _smoother(pot, pairwise=True, method=method)
        log_z, g = _value_grad_log_z(pot, method=method)
        _assert_close(log_z, post.log_normalizer, "float64")
        _assert_close(g.log_lik, post.marginals, "float64")
        _assert_close(g.log_init, post.marginals[0], "float64")
        expected = post.pairwise if time_varying else post.trans_counts
        _assert_close(g.log_trans, expected, "float64")
        ref = _by_grad(pot)
        for field in ("log_normalizer", "marginals", "trans_counts", "pairwise"):
            _assert_close(getattr(ref, field), getattr(post, field), "float64")
        _assert_close(jnp.exp(ref.filtered_log), jnp.exp(post.filtered_log), "float64")


@pytest.mark.parametrize("time_varying", [False, True])
def test_hmm_smoother_matches_dynamax(time_varying):
    pytest.importorskip("dynamax")
    from dynamax.hidden_markov_model import inference as dx
    from dynamax.hidden_markov_model import parallel_inference as dxp

    rng = np.random.default_rng(5)
    T, K = 30, 4
    pot_np = _random_potentials(rng, T, K, time_varying, forbid=False, normalised=True)
    with jax.enable_x64(True):
        pot = _to_jax(pot_np, "float64")
        p0, P = jnp.exp(pot.log_init), jnp.exp(pot.log_trans)
        for method in METHODS:
            post = _smoother(pot, pairwise=True, method=method)
            refs = [dx.hmm_smoother(p0, P, pot.log_lik)]
            if not time_varying:
                refs.append(jax.jit(dxp.hmm_smoother)(p0, P, pot.log_lik))
            for ref in refs:
                # dynamax clips normalisers at eps = 1e-15, hence a slightly looser atol
                _assert_close(post.log_normalizer, ref.marginal_loglik, "float64")
                _assert_close(post.marginals, ref.smoothed_probs, "float64", atol=1e-10)
                expected = post.pairwise if time_varying else post.trans_counts
                _assert_close(ref.trans_probs, expected, "float64", atol=1e-10)
            ref_f = dx.hmm_filter(p0, P, pot.log_lik)
            _assert_close(jnp.exp(post.filtered_log), ref_f.filtered_probs, "float64", atol=1e-10)


@pytest.mark.parametrize("time_varying", [False, True])
def test_parallel_matches_sequential(time_varying):
    rng = np.random.default_rng(6)
    pot_np = _random_potentials(rng, 30, 4, time_varying)  # shapes shared with the dynamax test
    with jax.enable_x64(True):
        pot = _to_jax(pot_np, "float64")
        seq = _smoother(pot, pairwise=True, method="sequential")
        par = _smoother(pot, pairwise=True, method="parallel")
        for field in ("log_normalizer", "marginals", "trans_counts", "pairwise"):
            _assert_close(getattr(par, field), getattr(seq, field), "float64")
        _assert_close(jnp.exp(par.filtered_log), jnp.exp(seq.filtered_log), "float64")
        if time_varying:  # (sampler compiles are slow: once is enough)
            # the samplers make the same conditional draws, so they give the same paths
            key = jax.random.key(7)
            s_seq = _sample(key, pot, num_samples=4, method="sequential")
            s_par = _sample(key, pot, num_samples=4, method="parallel")
            np.testing.assert_array_equal(np.asarray(s_seq), np.asarray(s_par))


def _long_chain(rng, T, K):
    log_trans = np.log(np.full((K, K), 0.1 / (K - 1)) + np.eye(K) * (0.9 - 0.1 / (K - 1)))
    log_trans[0, 1] = -np.inf
    log_lik = 3.0 * rng.normal(size=(T, K))
    return np.full(K, -np.log(K)), log_trans - 0.05, log_lik  # sub-normalised transitions


@pytest.mark.parametrize(
    "method",
    # the parallel scan at T = 10 000 takes ~10-30 s to compile on CPU
    ["sequential", pytest.param("parallel", marks=pytest.mark.slow)],
)
def test_float32_long_chain_matches_float64(method):
    rng = np.random.default_rng(8)
    T, K = 10_000, 16
    pot_np = _long_chain(rng, T, K)
    with jax.enable_x64(True):
        ref = _smoother(_to_jax(pot_np, "float64"), method="sequential")
        ref = jax.tree.map(np.asarray, ref)
    pot32 = _to_jax(pot_np, "float32")
    post = _smoother(pot32, method=method)
    assert post.marginals.dtype == jnp.float32
    for leaf in jax.tree.leaves(post):
        assert np.isfinite(np.asarray(leaf)[np.asarray(leaf) > -np.inf]).all()
    assert np.isfinite(float(post.log_normalizer))
    _assert_close(post.marginals.sum(-1), np.ones(T), "float32")
    _assert_close(post.marginals, ref.marginals, "float32")
    # counts are sums of T terms: compare relative to their total T - 1
    _assert_close(post.trans_counts / (T - 1), ref.trans_counts / (T - 1), "float32")
    # logZ is a sum of T increments; float32 keeps ~1e-6 relative accuracy of the sum
    _assert_close(post.log_normalizer, ref.log_normalizer, "float32", atol=0.0, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_sample_frequencies_match_marginals(method, key):
    rng = np.random.default_rng(9)
    T, K, S = 6, 3, 4000
    pot_np = _random_potentials(rng, T, K, time_varying=True)
    pot = _to_jax(pot_np, "float32")
    post = _smoother(pot, pairwise=True, method=method)
    samples = _sample(key, pot, num_samples=S, method=method)
    assert samples.shape == (S, T) and samples.dtype == jnp.int32
    # never a forbidden state / transition
    assert not np.any(np.asarray(samples[:, 0]) == K - 1)
    assert not np.any((np.asarray(samples[:, :-1]) == 0) & (np.asarray(samples[:, 1:]) == 1))
    onehot = np.asarray(jax.nn.one_hot(samples, K))  # [S, T, K]
    pairs = onehot[:, :-1, :, None] * onehot[:, 1:, None, :]  # [S, T-1, K, K]
    for freq, p in ((onehot, post.marginals), (pairs, post.pairwise)):
        p = np.asarray(p, np.float64)
        se = np.sqrt(p * (1 - p) / S)
        z = np.where(se > 0, (freq.mean(0) - p) / np.where(se > 0, se, 1.0), 0.0)
        assert np.abs(z).max() < 5
        assert np.all(freq.mean(0)[p == 0] == 0)
    if method == "sequential":  # single paths, typed and legacy keys
        one = _sample(key, pot, method=method)
        assert one.shape == (T,) and one.dtype == jnp.int32
        legacy = _sample(jax.random.PRNGKey(0), pot, method=method)
        assert legacy.shape == (T,)


def test_dynamax_sampler_frequencies_match_marginals(key):
    pytest.importorskip("dynamax")
    from dynamax.hidden_markov_model import parallel_inference as dxp

    rng = np.random.default_rng(10)
    T, K, S = 6, 3, 2000
    log_init, log_trans, log_lik = _random_potentials(
        rng, T, K, time_varying=True, forbid=False, normalised=True
    )
    log_trans = np.broadcast_to(log_trans[0], log_trans.shape)  # homogeneous values, [T-1, K, K]
    pot = _to_jax((log_init, log_trans, log_lik), "float32")
    post = _smoother(pot, pairwise=True, method="sequential")
    draw = jax.jit(jax.vmap(lambda k: dxp.hmm_posterior_sample(
        k, jnp.exp(pot.log_init), jnp.exp(pot.log_trans[0]), pot.log_lik)[1]))
    freq_dx = np.asarray(jax.nn.one_hot(draw(jax.random.split(key, S)), K)).mean(0)
    p = np.asarray(post.marginals, np.float64)
    se = np.sqrt(p * (1 - p) / S)
    assert np.abs((freq_dx - p) / se).max() < 5


def test_jit_and_vmap_match_loop():
    rng = np.random.default_rng(11)
    B, T, K = 3, 6, 3  # per-sequence shapes shared with the float32 enumeration test
    pots = [_random_potentials(rng, T, K, time_varying=True) for _ in range(B)]
    batch = HMMPotentials(*(jnp.asarray(np.stack(x), jnp.float32) for x in zip(*pots, strict=True)))
    for method in METHODS:
        f = jax.jit(jax.vmap(lambda p, m=method: hmm_smoother(p, pairwise=True, method=m)))
        out = f(batch)
        for b in range(B):
            ref = _smoother(_to_jax(pots[b], "float32"), pairwise=True, method=method)
            for field in ("log_normalizer", "marginals", "trans_counts", "pairwise"):
                _assert_close(getattr(out, field)[b], getattr(ref, field), "float32")
    keys = jax.random.split(jax.random.key(1), B)
    s = jax.jit(jax.vmap(lambda k, p: hmm_sample(k, p, num_samples=2)))(keys, batch)
    assert s.shape == (B, 2, T) and s.dtype == jnp.int32


def test_marginal_grads_match_finite_differences():
    """The mean field differentiates marginals w.r.t. all potentials, also under vmap."""
    rng = np.random.default_rng(12)
    T, K = 5, 3
    pot_np = _random_potentials(rng, T, K, time_varying=False)
    with jax.enable_x64(True):
        pot = _to_jax(pot_np, "float64")
        w_m = jnp.asarray(rng.normal(size=(T, K)))
        w_c = jnp.asarray(rng.normal(size=(K, K)))
        forbidden = jnp.isinf(pot.log_trans)

        def make_f(method):
            @jax.jit
            def f(log_init, log_trans, log_lik):
                # keep the forbidden transitions at -inf while finite differences move the rest
                lt = jnp.where(forbidden, -jnp.inf, log_trans)
                post = hmm_smoother(HMMPotentials(log_init, lt, log_lik), method=method)
                return jnp.sum(w_m * post.marginals) + jnp.sum(w_c * post.trans_counts)

            return f

        f_seq, f_par = make_f("sequential"), make_f("parallel")
        args = (jnp.where(jnp.isinf(pot.log_init), -5.0, pot.log_init),
                jnp.where(forbidden, 0.0, pot.log_trans),
                jnp.where(jnp.isinf(pot.log_lik), -5.0, pot.log_lik))
        check_grads(f_seq, args, order=1, modes=["rev", "fwd"])
        # the parallel twin: same gradient (compiles are slow, so no second finite-difference run)
        g_seq = jax.jit(jax.grad(f_seq, argnums=(0, 1, 2)))(*args)
        g_par = jax.jit(jax.grad(f_par, argnums=(0, 1, 2)))(*args)
        for a, b in zip(g_par, g_seq, strict=True):
            _assert_close(a, b, "float64")
        # under vmap, with -inf entries in log_init and log_lik too (batch element 0): finite
        grad_par = jax.grad(lambda p: f_par(p.log_init, p.log_trans, p.log_lik))
        batch = jax.tree.map(lambda x, y: jnp.stack([x, y]), pot, HMMPotentials(*args))
        gv = jax.jit(jax.vmap(grad_par))(batch)
        for leaf in jax.tree.leaves(gv):
            assert np.isfinite(np.asarray(leaf)).all()
        for a, b in zip(gv, g_seq, strict=True):
            _assert_close(a[1], b, "float64")


def test_bad_inputs_raise_naming_the_argument():
    K, T = 3, 5
    good = HMMPotentials(jnp.zeros(K), jnp.zeros((K, K)), jnp.zeros((T, K)))
    cases = [
        (good._replace(log_init=jnp.zeros((1, K))), "`log_init`"),
        (good._replace(log_lik=jnp.zeros((T, K + 1))), "`log_lik`"),
        (good._replace(log_lik=jnp.zeros(T)), "`log_lik`"),
        (good._replace(log_trans=jnp.zeros((K, K + 1))), "`log_trans`"),
        (good._replace(log_trans=jnp.zeros((T, K, K))), r"\[4, 3, 3\]"),
        (good._replace(log_lik=good.log_lik.at[2, 1].set(jnp.nan)), "`log_lik`.*NaN"),
        (good._replace(log_trans=good.log_trans.at[0, 0].set(jnp.inf)), "`log_trans`"),
        (good._replace(log_init=good.log_init.at[0].set(jnp.nan)), "`log_init`"),
    ]
    for bad, match in cases:
        for fn in (hmm_smoother_sequential, hmm_smoother_parallel, hmm_log_normalizer,
                   lambda p: hmm_sample(jax.random.key(0), p)):
            with pytest.raises(ValueError, match=match):
                fn(bad)
    with pytest.raises(ValueError, match="`method`"):
        hmm_smoother(good, method="fast")
    with pytest.raises(ValueError, match="`num_samples`"):
        hmm_sample(jax.random.key(0), good, num_samples=0)
    with pytest.raises(TypeError, match="`potentials`"):
        hmm_smoother((jnp.zeros(K), jnp.zeros((K, K))))
    # under jit the values are traced: NaN propagates instead of raising (documented)
    nan_pot = good._replace(log_lik=good.log_lik.at[2, 1].set(jnp.nan))
    out = jax.jit(hmm_smoother)(nan_pot)
    assert np.isnan(float(out.log_normalizer))


@pytest.mark.parametrize("method", METHODS)
def test_float32_large_shifts_match_enumeration(method):
    """Potentials far from 0 (per-row offsets of the transitions, large node offsets): the
    probability-space recursions subtract these shifts before exponentiating and add them back
    to the log normaliser, so float32 stays exact. Shapes shared with the enumeration test."""
    rng = np.random.default_rng(13)
    T, K = 6, 3
    log_init, log_trans, log_lik = _random_potentials(rng, T, K, time_varying=True)
    log_init = log_init + 50.0
    log_trans = log_trans + np.array([-60.0, 30.0, -5.0])[:, None]  # row offsets
    log_lik = log_lik + 80.0 * rng.choice([-1.0, 1.0], size=(T, 1))
    pot_np = (log_init, log_trans, log_lik)
    log_z, marg, pair = _enumerate(*pot_np)
    post = _smoother(_to_jax(pot_np, "float32"), pairwise=True, method=method)
    assert np.isfinite(float(post.log_normalizer))
    # |logZ| is O(100) here: compare relative to it
    _assert_close(post.log_normalizer, log_z, "float32", atol=0.0, rtol=1e-5)
    _assert_close(post.marginals, marg, "float32")
    _assert_close(post.pairwise, pair, "float32")
    _assert_close(post.trans_counts, pair.sum(0), "float32")

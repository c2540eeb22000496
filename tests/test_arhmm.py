"""AR(1)-HMM MAP-EM on the library's HMM message passing (numpyro_svae.arhmm)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import multivariate_normal

from numpyro_svae import arhmm, metrics
from numpyro_svae.messages.hmm import HMMPotentials

K_TRUE, D = 3, 2


def _rotation(angle: float, scale: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return scale * np.array([[c, -s], [s, c]])


def simulate(seed: int = 0, N: int = 4, T: int = 200):
    """A 3-regime AR(1)-HMM: rotations about three centres, sticky regimes.

    Returns z [N, T, D], regimes [N, T] (k_t drives z_{t-1} -> z_t) and the true A [K, D, D].
    """
    rng = np.random.default_rng(seed)
    P = np.full((K_TRUE, K_TRUE), 0.025) + 0.925 * np.eye(K_TRUE)
    A = np.stack([_rotation(a, c) for a, c in [(0.2, 0.95), (-0.5, 0.9), (1.0, 0.8)]])
    centres = 2.0 * np.stack([[np.cos(a), np.sin(a)] for a in 2 * np.pi * np.arange(3) / 3])
    b = centres - np.einsum("kij,kj->ki", A, centres)
    noise = np.array([0.02, 0.05, 0.03])
    z = np.zeros((N, T, D))
    k = np.zeros((N, T), int)
    for n in range(N):
        k[n, 0] = rng.integers(K_TRUE)
        z[n, 0] = rng.normal(size=D)
        for t in range(1, T):
            k[n, t] = rng.choice(K_TRUE, p=P[k[n, t - 1]])
            z[n, t] = (A[k[n, t]] @ z[n, t - 1] + b[k[n, t]]
                       + np.sqrt(noise[k[n, t]]) * rng.normal(size=D))
    return z, k, A


def _loglik_per_frame(params, z) -> float:
    return float(np.sum(arhmm.log_likelihood(params, z)) / (z.shape[0] * (z.shape[1] - 1)))


def test_em_increases_log_posterior_and_recovers_the_regimes():
    with jax.enable_x64(True):
        z, k, A = simulate()
        fit = arhmm.fit_arhmm(z, 3, key=jax.random.key(0), num_iters=30)
        lp = np.asarray(fit.log_posteriors)
        assert fit.params.A.dtype == jnp.float64 and lp.shape == (30,)
        assert np.all(np.diff(lp) >= -1e-9 * np.abs(lp[1:])), np.diff(lp).min()
        # the trace ends at the returned parameters
        np.testing.assert_allclose(fit.log_likelihoods[-1],
                                   np.sum(arhmm.log_likelihood(fit, z)), rtol=1e-10)
        regimes = arhmm.segment(fit, z)
        assert regimes.shape == z.shape[:2] and regimes.dtype == np.int64
        assert metrics.adjusted_rand_index(regimes[:, 1:], k[:, 1:]) >= 0.9
        match = metrics.best_label_matching(regimes[:, 1:].ravel(), k[:, 1:].ravel(), 3, 3)
        for pred, true in enumerate(match.mapping):
            np.testing.assert_allclose(fit.params.A[pred], A[true], atol=0.1)
        np.testing.assert_allclose(np.sum(fit.params.transition_matrix, -1), 1.0, rtol=1e-12)


@pytest.mark.slow
def test_agrees_with_dynamax_fit():
    """Same data, same transition prior: dynamax's EM (which also scores the first frame)
    and ours reach the same segmentation and conditional log-likelihood per frame."""
    pytest.importorskip("dynamax")
    from numpyro_svae import baselines

    with jax.enable_x64(True):
        z, k, _ = simulate(seed=1)
        ours = arhmm.fit_arhmm(z, 3, key=jax.random.key(1), num_iters=40)
        ref = baselines.fit_arhmm(z, 3, key=jax.random.key(1), num_iters=40)
        em = ref.params.emissions
        ref_params = arhmm.ARHMMParams(ref.params.initial.probs,
                                       ref.params.transitions.transition_matrix,
                                       em.weights, em.biases, em.covs)
        ll_ours, ll_ref = _loglik_per_frame(ours, z), _loglik_per_frame(ref_params, z)
        # ours maximises this objective (up to its weak prior); dynamax a close one
        assert ll_ours >= ll_ref - 0.01, (ll_ours, ll_ref)
        assert abs(ll_ours - ll_ref) < 0.03, (ll_ours, ll_ref)
        ari = metrics.adjusted_rand_index(arhmm.segment(ours, z)[:, 1:],
                                          baselines.segment(ref, z)[:, 1:])
        assert ari >= 0.95, ari


def _random_params(rng, K):
    P = rng.dirichlet(np.ones(K), size=K)
    pi = rng.dirichlet(np.ones(K))
    A = rng.normal(scale=0.5, size=(K, D, D))
    b = rng.normal(size=(K, D))
    L = rng.normal(scale=0.3, size=(K, D, D))
    Q = L @ np.swapaxes(L, -1, -2) + 0.2 * np.eye(D)
    return arhmm.ARHMMParams(*(jnp.asarray(a) for a in (pi, P, A, b, Q)))


def test_likelihood_and_viterbi_equal_enumeration_of_all_paths():
    """T = 4, K = 2: every regime path scored by hand, with and without a gap."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        K, T = 2, 4
        params = _random_params(rng, K)
        pi, P, A, b, Q = (np.asarray(a) for a in params)
        z = rng.normal(size=(2, T, D))
        mask = np.array([[True] * T, [True, False, True, True]])
        loglik = np.asarray(arhmm.log_likelihood(params, z, mask=mask))
        paths = arhmm.segment(params, z, mask)
        for n in range(2):
            scores = {}
            for path in itertools.product(range(K), repeat=T):
                s = np.log(pi[path[0]])
                for t in range(1, T):
                    s += np.log(P[path[t - 1], path[t]])
                    if mask[n, t] and mask[n, t - 1]:
                        k = path[t]
                        s += multivariate_normal(A[k] @ z[n, t - 1] + b[k], Q[k]).logpdf(z[n, t])
                scores[path] = s
            values = np.array(list(scores.values()))
            np.testing.assert_allclose(loglik[n], np.logaddexp.reduce(values), rtol=1e-10)
            assert tuple(paths[n]) == max(scores, key=scores.get)


def test_viterbi_accepts_forbidden_transitions():
    log_trans = jnp.log(jnp.array([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]]))
    log_lik = jnp.log(jnp.array([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.1, 0.1, 0.8]]))
    path = arhmm.viterbi(HMMPotentials(jnp.log(jnp.array([1.0, 0.0, 0.0])), log_trans,
                                       log_lik))
    # 0 -> 2 is forbidden: the best path must pass through 1 or stay in 0
    assert path.tolist() == [0, 0, 0]


def test_padded_frames_change_nothing():
    """Trailing and leading padding (NaN, mask False) give the fit without them; `lengths`
    is the same as its prefix mask."""
    with jax.enable_x64(True):
        z, _, _ = simulate(seed=2, N=3, T=60)
        fit = arhmm.fit_arhmm(z, 3, key=jax.random.key(4), num_iters=15)
        pad = np.full((3, 70, D), np.nan)
        mask = np.zeros((3, 70), bool)
        offsets = [0, 0, 7]  # sequence 2 also has leading padding
        for n, o in enumerate(offsets):
            pad[n, o:o + 60] = z[n]
            mask[n, o:o + 60] = True
        pad[0, 60:] = 1e6  # finite garbage is ignored as well
        fit_pad = arhmm.fit_arhmm(pad, 3, key=jax.random.key(4), mask=mask, num_iters=15)
        for a, c in zip(fit.params, fit_pad.params, strict=True):
            np.testing.assert_allclose(a, c, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(fit.log_posteriors, fit_pad.log_posteriors, rtol=1e-9)
        r, r_pad = arhmm.segment(fit, z), arhmm.segment(fit_pad, pad, mask)
        for n, o in enumerate(offsets):
            np.testing.assert_array_equal(r_pad[n, o:o + 60], r[n])
            assert np.all(r_pad[n, :o] == r[n, 0]) and np.all(r_pad[n, o + 60:] == r[n, -1])
        # lengths = a prefix mask
        lengths = np.array([60, 45, 55])
        by_len = arhmm.fit_arhmm(pad[[0, 1, 0]], 3, key=jax.random.key(4), lengths=lengths,
                                 num_iters=3)
        prefix = np.arange(70)[None] < lengths[:, None]
        by_mask = arhmm.fit_arhmm(pad[[0, 1, 0]], 3, key=jax.random.key(4), mask=prefix,
                                  num_iters=3)
        np.testing.assert_array_equal(by_len.log_posteriors, by_mask.log_posteriors)


def test_many_regimes_on_little_data_stay_finite_in_float32():
    """Regimes that lose their frames fall back to the pooled regression (no NaN)."""
    z, _, _ = simulate(seed=5, N=2, T=30)
    fit = arhmm.fit_arhmm(z.astype(np.float32), 10, key=jax.random.key(0), num_iters=20)
    assert fit.params.Q.dtype == jnp.float32
    for a in fit.params:
        assert np.all(np.isfinite(np.asarray(a)))
    assert np.all(np.linalg.eigvalsh(np.asarray(fit.params.Q, np.float64)) > 0)
    lp = np.asarray(fit.log_posteriors, np.float64)
    assert np.all(np.diff(lp) >= -1e-4 * np.abs(lp[1:])), np.diff(lp).min()
    assert set(np.unique(arhmm.segment(fit, z.astype(np.float32)))) <= set(range(10))


def test_bad_inputs_are_named():
    z = np.zeros((2, 5, D)) + np.arange(5)[None, :, None]
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"`z` must have shape \[N, T, D\]"):
        arhmm.fit_arhmm(z[0], 2, key=key)
    with pytest.raises(ValueError, match="T >= 2"):
        arhmm.fit_arhmm(z[:, :1], 2, key=key)
    with pytest.raises(ValueError, match="`num_states` must be an int >= 1"):
        arhmm.fit_arhmm(z, 0, key=key)
    with pytest.raises(ValueError, match="`num_iters` must be an int >= 1"):
        arhmm.fit_arhmm(z, 2, key=key, num_iters=0)
    with pytest.raises(ValueError, match=r"`mask` must have shape \[N, T\] = \[2, 5\]"):
        arhmm.fit_arhmm(z, 2, key=key, mask=np.ones((2, 4), bool))
    with pytest.raises(TypeError, match="`mask` must be a bool array"):
        arhmm.fit_arhmm(z, 2, key=key, mask=np.ones((2, 5)))
    with pytest.raises(ValueError, match="not both"):
        arhmm.fit_arhmm(z, 2, key=key, mask=np.ones((2, 5), bool), lengths=np.array([5, 5]))
    with pytest.raises(ValueError, match=r"`lengths` must be in 0 \.\. T = 5"):
        arhmm.fit_arhmm(z, 2, key=key, lengths=np.array([6, 5]))
    bad = z.copy()
    bad[1, 3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf at observed frames"):
        arhmm.fit_arhmm(bad, 2, key=key)
    with pytest.raises(ValueError, match="4 observed transitions .* fewer than `num_states` = 5"):
        arhmm.fit_arhmm(z, 5, key=key, lengths=np.array([5, 1]))
    with pytest.raises(ValueError, match="`options.prior_frames` must be > 0"):
        arhmm.fit_arhmm(z, 2, key=key, options=arhmm.ARHMMOptions(prior_frames=0.0))
    with pytest.raises(ValueError, match="transition_concentration"):
        arhmm.fit_arhmm(z, 2, key=key,
                        options=arhmm.ARHMMOptions(transition_concentration=1.0, stickiness=0))
    params = _random_params(np.random.default_rng(0), 2)
    with pytest.raises(ValueError, match=r"`z` must have shape \[N, T, 2\]"):
        arhmm.segment(params, np.zeros((2, 5, 3)))
    with pytest.raises(TypeError, match="`fit` must be an ARHMMFit or ARHMMParams"):
        arhmm.log_likelihood(dict(params._asdict()), z)

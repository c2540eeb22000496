"""Synthetic switching linear dynamical systems with known regimes, for tests and demos.

Generative model for one sequence (``t = 1..T``, printed 0-based in the arrays)::

    k_1 ~ Cat(pi0),                 k_t | k_{t-1} ~ Cat(P[k_{t-1}])       (sticky chain)
    z_1 ~ N(mu0, Sigma0),           z_t = A[k_t] z_{t-1} + b[k_t] + eps,  eps ~ N(0, Q[k_t])
    x_t = f(z_t) + e,               e ~ N(0, diag(noise_std**2))

so ``k[:, t]`` (for ``t >= 1``, 0-based) is the regime governing the transition *into*
``z[:, t]`` from ``z[:, t-1]``; ``k[:, 0]`` has no continuous effect and only sets the law
of ``k[:, 1]`` (the ``leading_regime=True`` convention of ``docs/design.md``; drop it,
``k[:, 1:]``, for the default one-regime-per-transition chain).

Each ``A[k] = rho_k * expm(theta_k * S_k)`` is a contraction (``rho_k < 1``) times a rotation
by at most ``theta_k`` radians, with distinct ``theta_k`` per regime; the biases are chosen
as ``b[k] = (I - A[k]) c_k`` so regime ``k`` spirals towards its own fixed point ``c_k``, the
``c_k`` spread evenly on a circle of radius ``center_radius`` in a random plane. Distinct
rotation speeds and fixed points make the regimes identifiable from ``z``. ``f`` is a random
one-hidden-layer ``tanh`` MLP (``nonlinear=True``) or a random affine map.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

__all__ = ["EmissionParams", "SLDSTrueParams", "SyntheticSLDS", "emission_mean", "synthetic_slds"]


class EmissionParams(NamedTuple):
    """Emission ``x = f(z) + e``: affine layers with ``tanh`` between them (none if linear)."""

    weights: tuple[np.ndarray, ...]  # layer l: [out_l, in_l]; ([H, D], [Dx, H]) or ([Dx, D],)
    biases: tuple[np.ndarray, ...]  # layer l: [out_l]
    noise_std: np.ndarray  # [Dx] standard deviation of the Gaussian emission noise


class SLDSTrueParams(NamedTuple):
    """The parameters the synthetic data were drawn from."""

    pi0: np.ndarray  # [K] initial regime probabilities (uniform)
    P: np.ndarray  # [K, K] regime transition matrix, rows sum to one
    A: np.ndarray  # [K, D, D] dynamics matrices
    b: np.ndarray  # [K, D] dynamics biases
    Q: np.ndarray  # [K, D, D] dynamics noise covariances
    mu0: np.ndarray  # [D] mean of z_1
    Sigma0: np.ndarray  # [D, D] covariance of z_1
    centers: np.ndarray  # [K, D] fixed point c_k = (I - A_k)^{-1} b_k of each regime
    emission: EmissionParams


class SyntheticSLDS(NamedTuple):
    """Sampled sequences and the parameters that made them."""

    x: np.ndarray  # [N, T, Dx] float32 observations
    z: np.ndarray  # [N, T, D] float32 latent states
    k: np.ndarray  # [N, T] int32; k[:, t] governs z[:, t-1] -> z[:, t] (k[:, 0]: see module)
    params: SLDSTrueParams


def emission_mean(emission: EmissionParams, z) -> np.ndarray:
    """Noise-free emission ``f(z)``; ``z`` is ``[..., D]``, the result ``[..., Dx]`` float32."""
    h = np.asarray(z, np.float64)
    n = len(emission.weights)
    for i, (w, c) in enumerate(zip(emission.weights, emission.biases, strict=True)):
        h = h @ np.asarray(w, np.float64).T + c
        if i < n - 1:
            h = np.tanh(h)
    return h.astype(np.float32)


def _as_rng(key_or_seed) -> np.random.Generator:
    """A NumPy generator seeded from an int or from the bits of a JAX key.

    Sampling runs in NumPy (a loop over ``T`` with no compilation, so it is fast for the
    small sizes of tests and demos); the key only provides the seed.
    """
    if isinstance(key_or_seed, int | np.integer):
        return np.random.default_rng(int(key_or_seed))
    key = jnp.asarray(key_or_seed)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        bits = jax.random.key_data(key)
    elif key.dtype == jnp.uint32:  # a legacy raw key
        bits = key
    else:
        raise TypeError(
            f"`key_or_seed` must be an int seed or a jax.random.key; got dtype {key.dtype}"
        )
    return np.random.default_rng(np.asarray(bits, np.uint32).ravel().tolist())


def _check_positive_int(name: str, value, minimum: int = 1):
    if not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}; got {value!r}")


def synthetic_slds(
    key_or_seed,
    *,
    num_sequences: int,
    num_timesteps: int,
    num_regimes: int = 3,
    latent_dim: int = 2,
    obs_dim: int = 10,
    nonlinear: bool = True,
    hidden_dim: int = 32,
    self_transition: float = 0.95,
    contraction: tuple[float, float] = (0.85, 0.97),
    rotation: tuple[float, float] = (0.1, 0.5),
    center_radius: float = 2.0,
    dynamics_noise_std: float = 0.1,
    init_std: float = 1.0,
    obs_noise_std: float = 0.1,
) -> SyntheticSLDS:
    """Sample sequences from a random SLDS with known regimes (see the module docstring).

    Deterministic given ``key_or_seed`` and the options.

    Parameters
    ----------
    key_or_seed : int or jax.random.key
        Randomness: an int seeds ``numpy.random.default_rng(seed)``; a key seeds it with
        its ``jax.random.key_data`` bits.
    num_sequences, num_timesteps : int
        ``N`` and ``T``.
    num_regimes, latent_dim, obs_dim : int
        ``K``, ``D`` (>= 2, rotations need a plane) and ``Dx``.
    nonlinear : bool
        ``tanh`` MLP emission with ``hidden_dim`` units (True) or affine emission (False).
    hidden_dim : int
        ``H``, hidden units of the MLP.
    self_transition : float
        ``P[k, k]``; the rest of the row is spread evenly over the other regimes.
    contraction : (float, float)
        ``rho_k`` evenly spaced over this range (largest first), each ``< 1`` for stability.
    rotation : (float, float)
        ``theta_k`` (radians per step) evenly spaced over this range, random signs.
    center_radius : float
        Radius of the circle holding the fixed points ``c_k``.
    dynamics_noise_std, init_std, obs_noise_std : float
        ``Q = dynamics_noise_std**2 I``, ``Sigma0 = init_std**2 I`` (``mu0 = 0``),
        emission noise standard deviation.

    Returns
    -------
    SyntheticSLDS
        ``x [N, T, Dx]``, ``z [N, T, D]`` float32, ``k [N, T]`` int32, and the true
        parameters (``SLDSTrueParams``, numpy float32).

    Raises
    ------
    ValueError
        On a non-positive size, ``latent_dim < 2``, or probabilities/contractions out of range.
    """
    rng = _as_rng(key_or_seed)
    for name, value in [
        ("num_sequences", num_sequences),
        ("num_timesteps", num_timesteps),
        ("num_regimes", num_regimes),
        ("obs_dim", obs_dim),
        ("hidden_dim", hidden_dim),
    ]:
        _check_positive_int(name, value)
    _check_positive_int("latent_dim", latent_dim, 2)
    if not 0.0 < self_transition <= 1.0:
        raise ValueError(f"`self_transition` must lie in (0, 1]; got {self_transition}")
    if not (0.0 < min(contraction) and max(contraction) < 1.0):
        raise ValueError(f"`contraction` must lie in (0, 1) for stable dynamics; got {contraction}")
    K, D, Dx, N, T = num_regimes, latent_dim, obs_dim, num_sequences, num_timesteps

    # regime chain
    if K == 1:
        P = np.ones((1, 1))
    else:
        off = (1.0 - self_transition) / (K - 1)
        P = np.full((K, K), off) + (self_transition - off) * np.eye(K)
    pi0 = np.full(K, 1.0 / K)

    # dynamics: contraction x rotation about a regime-specific fixed point
    rho = np.linspace(max(contraction), min(contraction), K)
    theta = np.linspace(min(rotation), max(rotation), K) * rng.choice([-1.0, 1.0], K)
    if D == 2:
        gen = np.broadcast_to(np.array([[0.0, -1.0], [1.0, 0.0]]), (K, 2, 2))
    else:
        g = rng.normal(size=(K, D, D))
        gen = g - np.swapaxes(g, -1, -2)
        # scale so the fastest rotation of exp(theta * S) is theta radians per step
        # (singular values of a skew-symmetric matrix are the moduli of its eigenvalues)
        gen = gen / np.linalg.svd(gen, compute_uv=False)[:, :1, None]
    A = rho[:, None, None] * np.stack(
        [scipy.linalg.expm(t * s) for t, s in zip(theta, gen, strict=True)]
    )
    basis, _ = np.linalg.qr(rng.normal(size=(D, 2)))
    ang = rng.uniform(0.0, 2 * np.pi) + 2 * np.pi * np.arange(K) / K
    centers = center_radius * np.stack([np.cos(ang), np.sin(ang)], -1) @ basis.T  # [K, D]
    b = np.einsum("kij,kj->ki", np.eye(D) - A, centers)
    Q = np.broadcast_to(dynamics_noise_std**2 * np.eye(D), (K, D, D))
    mu0, Sigma0 = np.zeros(D), init_std**2 * np.eye(D)

    # emission (first layer scaled so tanh sees inputs of order one on the circle of c_k)
    if nonlinear:
        weights = (
            rng.normal(size=(hidden_dim, D)) / np.sqrt(D * center_radius**2),
            rng.normal(size=(Dx, hidden_dim)) * 2.0 / np.sqrt(hidden_dim),
        )
        biases = (0.5 * rng.normal(size=hidden_dim), 0.1 * rng.normal(size=Dx))
    else:
        weights = (rng.normal(size=(Dx, D)) / np.sqrt(D),)
        biases = (0.1 * rng.normal(size=Dx),)

    # sample: the chain by inverse CDF, then the states step by step (vectorised over N)
    u = rng.uniform(size=(N, T))
    cdf0, cdfP = np.cumsum(pi0), np.cumsum(P, axis=-1)
    k = np.zeros((N, T), np.int64)
    z = np.zeros((N, T, D))
    k[:, 0] = np.minimum(np.sum(u[:, :1] > cdf0, axis=-1), K - 1)
    z[:, 0] = mu0 + init_std * rng.normal(size=(N, D))
    eps = dynamics_noise_std * rng.normal(size=(N, T, D))
    for t in range(1, T):
        k[:, t] = np.minimum(np.sum(u[:, t, None] > cdfP[k[:, t - 1]], axis=-1), K - 1)
        z[:, t] = np.einsum("nij,nj->ni", A[k[:, t]], z[:, t - 1]) + b[k[:, t]] + eps[:, t]

    f32 = lambda a: np.asarray(a, np.float32)
    emission = EmissionParams(
        tuple(f32(w) for w in weights),
        tuple(f32(c) for c in biases),
        f32(np.full(Dx, obs_noise_std)),
    )
    z_np = f32(z)
    x = emission_mean(emission, z_np) + f32(obs_noise_std * rng.normal(size=(N, T, Dx)))
    params = SLDSTrueParams(
        f32(pi0), f32(P), f32(A), f32(b), f32(Q), f32(mu0), f32(Sigma0), f32(centers), emission
    )
    return SyntheticSLDS(x.astype(np.float32), z_np, np.asarray(k, np.int32), params)

"""One record per family so that a single contract can be swept over all of them.

Arrays are built inside the caller's dtype context (call the builders inside
``jax.enable_x64(True)`` for float64).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_svae import expfam as E


class Family(NamedTuple):
    name: str
    standard: Callable[[int], Any]  # seed -> a Standard bundle (unbatched)
    to_natural: Callable
    to_standard: Callable
    log_normalizer: Callable
    expected_stats: Callable
    kl: Callable
    entropy: Callable
    sample: Callable
    stat: Callable  # one draw -> sufficient statistic (Stats NamedTuple)
    from_u: Callable
    to_u: Callable
    u_tril: tuple  # per u leaf: True where only the lower triangle is live
    eta_sym: tuple  # per eta leaf: True for symmetric matrices


def _spd(rng: np.random.Generator, D: int, scale: float = 1.0) -> np.ndarray:
    A = rng.normal(size=(D, D))
    return scale * (A @ A.T / D + np.eye(D))


def _niw_standard(seed: int, D: int = 2):
    rng = np.random.default_rng(seed)
    return E.NIWStandard(
        S=jnp.asarray(_spd(rng, D, 2.0)),
        m=jnp.asarray(rng.normal(size=D)),
        lam=jnp.asarray(1.5 + rng.uniform()),
        nu=jnp.asarray(D + 3.0 + rng.uniform()),
    )


def _mniw_standard(seed: int, D: int = 2, Din: int = 3):
    rng = np.random.default_rng(seed)
    return E.MNIWStandard(
        S=jnp.asarray(_spd(rng, D, 2.0)),
        M=jnp.asarray(rng.normal(size=(D, Din))),
        V=jnp.asarray(_spd(rng, Din, 3.0)),
        nu=jnp.asarray(D + 4.0 + rng.uniform()),
    )


def _dirichlet_standard(seed: int, K: int = 3):
    rng = np.random.default_rng(seed)
    return E.DirichletStandard(alpha=jnp.asarray(0.6 + 3.0 * rng.uniform(size=K)))


def _gaussian_standard(seed: int, D: int = 2):
    rng = np.random.default_rng(seed)
    return E.GaussianStandard(
        mean=jnp.asarray(rng.normal(size=D)), cov=jnp.asarray(_spd(rng, D, 0.7))
    )


def _logdet(A):
    return jnp.linalg.slogdet(A)[1]


def niw_stat(s: E.NIWSample) -> E.NIWStats:
    tau, mu = s.tau, s.mu
    tmu = jnp.einsum("...ij,...j->...i", tau, mu)
    return E.NIWStats(-0.5 * tau, tmu, -0.5 * jnp.sum(mu * tmu, -1), 0.5 * _logdet(tau))


def mniw_stat(s: E.MNIWSample) -> E.MNIWStats:
    X, L = s.X, s.Lambda
    XtL = jnp.swapaxes(X, -1, -2) @ L
    return E.MNIWStats(-0.5 * L, XtL, -0.5 * XtL @ X, 0.5 * _logdet(L))


def dirichlet_stat(pi) -> E.DirichletStats:
    return E.DirichletStats(jnp.log(pi))


def gaussian_stat(x) -> E.GaussianStats:
    return E.GaussianStats(-0.5 * x[..., :, None] * x[..., None, :], x)


FAMILIES = [
    Family(
        "niw", _niw_standard, E.niw_to_natural, E.niw_to_standard, E.niw_log_normalizer,
        E.niw_expected_stats, E.niw_kl, E.niw_entropy, E.niw_sample, niw_stat,
        E.niw_from_unconstrained, E.niw_to_unconstrained,
        (True, False, False, False), (True, False, False, False),
    ),
    Family(
        "mniw", _mniw_standard, E.mniw_to_natural, E.mniw_to_standard, E.mniw_log_normalizer,
        E.mniw_expected_stats, E.mniw_kl, E.mniw_entropy, E.mniw_sample, mniw_stat,
        E.mniw_from_unconstrained, E.mniw_to_unconstrained,
        (True, False, True, False), (True, False, True, False),
    ),
    Family(
        "dirichlet", _dirichlet_standard, E.dirichlet_to_natural, E.dirichlet_to_standard,
        E.dirichlet_log_normalizer, E.dirichlet_expected_stats, E.dirichlet_kl,
        E.dirichlet_entropy, E.dirichlet_sample, dirichlet_stat,
        E.dirichlet_from_unconstrained, E.dirichlet_to_unconstrained, (False,), (False,),
    ),
    Family(
        "gaussian", _gaussian_standard, E.gaussian_to_natural, E.gaussian_to_standard,
        E.gaussian_log_normalizer, E.gaussian_expected_stats, E.gaussian_kl,
        E.gaussian_entropy, E.gaussian_sample, gaussian_stat,
        E.gaussian_from_unconstrained, E.gaussian_to_unconstrained, (True, False), (True, False),
    ),
]
FAMILY_IDS = [f.name for f in FAMILIES]


def natural(fam: Family, seed: int = 0):
    return fam.to_natural(fam.standard(seed))


def stack(trees):
    """Stack NamedTuples leaf by leaf along a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def max_abs_diff(a, b) -> float:
    return max(
        float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                      strict=True)
    )


def assert_tree_close(a, b, **tol):
    assert type(a) is type(b), (type(a), type(b))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def mc_zscores(draw_stats, expected) -> np.ndarray:
    """z-scores of the Monte Carlo means of each statistic entry against ``expected``.

    ``draw_stats`` leaves carry a leading sample axis; the standard error is the sample's own.
    """
    zs = []
    for d, e in zip(jax.tree.leaves(draw_stats), jax.tree.leaves(expected), strict=True):
        d = np.asarray(d, dtype=np.float64)
        n = d.shape[0]
        mean = d.mean(0)
        se = d.std(0, ddof=1) / np.sqrt(n)
        diff = mean - np.asarray(e, dtype=np.float64)
        # exact-zero variance entries (none expected here) would give nan: guard them
        z = np.where(se > 0, diff / np.where(se > 0, se, 1.0), np.where(diff == 0, 0.0, np.inf))
        zs.append(z.ravel())
    return np.concatenate(zs)


# ------------------------------------------------------------------------------------------
# minimal coordinates (lower triangles of symmetric / triangular leaves) for Fisher tests
# ------------------------------------------------------------------------------------------


def to_min(tree, flags) -> jax.Array:
    parts = []
    for x, f in zip(jax.tree.leaves(tree), flags, strict=True):
        if f:
            i, j = np.tril_indices(x.shape[-1])
            parts.append(x[..., i, j].ravel())
        else:
            parts.append(jnp.ravel(x))
    return jnp.concatenate(parts)


def from_min(vec, like, flags, symmetric: bool):
    """Inverse of :func:`to_min`: fill lower triangles (mirrored when ``symmetric``)."""
    leaves, treedef = jax.tree.flatten(like)
    out, k = [], 0
    for x, f in zip(leaves, flags, strict=True):
        if f:
            D = x.shape[-1]
            i, j = np.tril_indices(D)
            n = len(i)
            M = jnp.zeros((D, D), vec.dtype).at[i, j].set(vec[k:k + n])
            if symmetric:
                M = M + jnp.tril(M, -1).T
            out.append(M)
        else:
            n = int(np.prod(np.shape(x)))
            out.append(vec[k:k + n].reshape(np.shape(x)))
        k += n
    return jax.tree.unflatten(treedef, out)


# ------------------------------------------------------------------------------------------
# jitted twins, created once per family so compiled code is shared across tests
# ------------------------------------------------------------------------------------------


class Jitted(NamedTuple):
    log_normalizer: Callable
    grad_log_normalizer: Callable
    expected_stats: Callable
    kl: Callable
    entropy: Callable
    sample: Callable  # (key, eta, sample_shape) with sample_shape static
    sample_stats: Callable  # (key, eta, sample_shape) -> stats of the draws
    from_u: Callable  # natgrad static keyword
    to_u: Callable
    to_standard: Callable


def _make_jitted(fam: Family) -> Jitted:
    return Jitted(
        log_normalizer=jax.jit(fam.log_normalizer),
        grad_log_normalizer=jax.jit(jax.grad(fam.log_normalizer)),
        expected_stats=jax.jit(fam.expected_stats),
        kl=jax.jit(fam.kl),
        entropy=jax.jit(fam.entropy),
        sample=jax.jit(fam.sample, static_argnums=2),
        sample_stats=jax.jit(lambda k, e, s: fam.stat(fam.sample(k, e, s)), static_argnums=2),
        from_u=jax.jit(fam.from_u, static_argnames="natgrad"),
        to_u=jax.jit(fam.to_u),
        to_standard=jax.jit(fam.to_standard),
    )


JITTED = {f.name: _make_jitted(f) for f in FAMILIES}


def mocap6_mniw_state(rng: np.random.Generator) -> list[np.ndarray]:
    """``[S, M, V, nu]`` of the MNIW regime that made long mocap6 runs NaN in float32 before
    q(theta) was computed from standard parameters: ``D = 4``, ``Din = 5``, ``|M|`` up to 724,
    ``V ~ A A' + 100 I``, ``S ~ 0.01``, so that ``eta1 = S + M V M'`` is ~1e8.  Draws from
    `rng` (callers continue its stream)."""
    D, Din = 4, 5
    M = 300.0 * rng.normal(size=(D, Din))
    M[0, 0] = 724.0
    A = rng.normal(size=(Din, Din))
    B = rng.normal(size=(D, D))
    return [0.01 * np.eye(D) + 0.05 * B @ B.T, M, A @ A.T + 100.0 * np.eye(Din), np.array(12.0)]

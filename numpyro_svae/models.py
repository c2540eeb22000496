"""Ready-made NumPyro models: the SLDS, LDS, HMM and Gaussian-mixture priors with a neural decoder.

These are ordinary NumPyro models, written exactly as a user would (see
`docs/model_guide.md`); the command-line tool and the notebooks use them, and they are a
starting point to copy and edit. Hyper-parameter defaults follow the research code
(`docs/math.md` §1): sticky transitions (100 on the diagonal, 0.5 elsewhere),
Wishart scale `D * I` with `D + 2` degrees of freedom, vague means, `A ~ 0.9 I`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.control_flow import scan

from . import nn

__all__ = ["slds_model", "lds_model", "hmm_model", "gmm_model", "make_model"]


def _observe(name: str, loc, scale, x, mask):
    """Observation site `x` [N, T, Dx]; `mask` [N, T] or [N, T, Dx] (1 = observed)."""
    d = dist.Normal(loc, scale)
    if mask is not None:
        m = mask if mask.ndim == 3 else mask[..., None]
        d = d.mask(jnp.broadcast_to(m.astype(bool), loc.shape))
    with numpyro.plate("sequences", loc.shape[0], dim=-1):
        numpyro.sample(name, d.to_event(2), obs=x)


def slds_model(
    x=None,
    *,
    N: int,
    T: int,
    Dx: int,
    K: int = 4,
    D: int = 4,
    mask=None,
    hidden: tuple[int, ...] = (128, 128),
    sticky: float = 100.0,
    off_diagonal: float = 0.5,
    dynamics_precision: float = 1e-3,
):
    """Switching linear dynamical system prior with a neural Gaussian decoder.

    Parameters
    ----------
    x : array [N, T, Dx] or None
        Observations (None to sample from the prior).
    N, T, Dx : int
        Number of sequences, time steps and observed channels.
    K, D : int
        Number of regimes and latent dimension.
    mask : array [N, T] or [N, T, Dx], optional
        1 where observed, 0 where missing.
    hidden : tuple of int
        Hidden widths of the decoder MLP.
    sticky, off_diagonal : float
        Dirichlet concentrations of the transition rows (diagonal / off-diagonal).
    dynamics_precision : float
        Column precision ``V0`` of the matrix-normal prior on ``[A_k | b_k]`` (entries have
        prior variance ``Q_k / V0`` around ``[0.9 I | 0]``); the research code's ``1e-3`` is
        nearly flat.
    """
    eye = jnp.eye(D)
    pi0 = numpyro.sample("pi0", dist.Dirichlet(jnp.ones(K)))
    M0 = jnp.concatenate([0.9 * eye, jnp.zeros((D, 1))], axis=1)  # [D, D + 1]
    # MatrixNormal column scale: covariance V0^-1, column precision V0 = dynamics_precision I
    V0_inv_chol = jnp.sqrt(1.0 / dynamics_precision) * jnp.eye(D + 1)
    with numpyro.plate("regimes", K):
        P = numpyro.sample(
            "P", dist.Dirichlet(off_diagonal + (sticky - off_diagonal) * jnp.eye(K))
        )
        Q = numpyro.sample("Q", dist.InverseWishart(D + 2.0, D * eye))
        Ab = numpyro.sample(
            "Ab", dist.MatrixNormal(M0, jnp.linalg.cholesky(Q), V0_inv_chol)
        )
    S0 = numpyro.sample("S0", dist.InverseWishart(D + 2.0, D * eye))
    m0 = numpyro.sample("m0", dist.MultivariateNormal(jnp.zeros(D), 1e3 * S0))
    with numpyro.plate("sequences", N):
        k0 = numpyro.sample("k0", dist.Categorical(pi0))
        z0 = numpyro.sample("z0", dist.MultivariateNormal(m0, S0))

    def step(carry, _):
        k_prev, z_prev = carry
        with numpyro.plate("sequences", N):
            k = numpyro.sample("k", dist.Categorical(P[k_prev]))
            A, b = Ab[k, :, :D], Ab[k, :, D]
            z = numpyro.sample(
                "z",
                dist.MultivariateNormal(jnp.einsum("nij,nj->ni", A, z_prev) + b, Q[k]),
            )
        return (k, z), z

    _, zs = scan(step, (k0, z0), None, length=T - 1)
    z_all = jnp.concatenate([z0[None], zs], axis=0).swapaxes(0, 1)  # [N, T, D]
    loc, scale = nn.decoder("decoder", latent_dim=D, obs_dim=Dx, hidden=hidden)(z_all)
    _observe("x", loc, scale, x, mask)


def lds_model(
    x=None,
    *,
    N: int,
    T: int,
    Dx: int,
    D: int = 4,
    mask=None,
    hidden: tuple[int, ...] = (128, 128),
    **unused,
):
    """Linear dynamical system prior (one regime) with a neural Gaussian decoder.

    Same arguments as :func:`slds_model` without the regime options.
    """
    del unused
    eye = jnp.eye(D)
    M0 = jnp.concatenate([0.9 * eye, jnp.zeros((D, 1))], axis=1)
    Q = numpyro.sample("Q", dist.InverseWishart(D + 2.0, D * eye))
    Ab = numpyro.sample(
        "Ab", dist.MatrixNormal(M0, jnp.linalg.cholesky(Q), jnp.sqrt(1e3) * jnp.eye(D + 1))
    )
    S0 = numpyro.sample("S0", dist.InverseWishart(D + 2.0, D * eye))
    m0 = numpyro.sample("m0", dist.MultivariateNormal(jnp.zeros(D), 1e3 * S0))
    with numpyro.plate("sequences", N):
        z0 = numpyro.sample("z0", dist.MultivariateNormal(m0, S0))

    def step(z_prev, _):
        with numpyro.plate("sequences", N):
            z = numpyro.sample(
                "z", dist.MultivariateNormal(z_prev @ Ab[:, :D].T + Ab[:, D], Q)
            )
        return z, z

    _, zs = scan(step, z0, None, length=T - 1)
    z_all = jnp.concatenate([z0[None], zs], axis=0).swapaxes(0, 1)
    loc, scale = nn.decoder("decoder", latent_dim=D, obs_dim=Dx, hidden=hidden)(z_all)
    _observe("x", loc, scale, x, mask)


def hmm_model(
    x=None,
    *,
    N: int,
    T: int,
    Dx: int,
    K: int = 4,
    D: int = 4,
    mask=None,
    hidden: tuple[int, ...] = (128, 128),
    sticky: float = 100.0,
    off_diagonal: float = 0.5,
):
    """HMM prior over latents that are i.i.d. Gaussian given the regime, with a neural decoder."""
    eye = jnp.eye(D)
    pi0 = numpyro.sample("pi0", dist.Dirichlet(jnp.ones(K)))
    with numpyro.plate("regimes", K):
        P = numpyro.sample(
            "P", dist.Dirichlet(off_diagonal + (sticky - off_diagonal) * jnp.eye(K))
        )
        Sig = numpyro.sample("Sigma", dist.InverseWishart(D + 2.0, D * eye))
        mu = numpyro.sample("mu", dist.MultivariateNormal(jnp.zeros(D), Sig / 0.01))
    with numpyro.plate("sequences", N):
        k0 = numpyro.sample("k0", dist.Categorical(pi0))
        z0 = numpyro.sample("z0", dist.MultivariateNormal(mu[k0], Sig[k0]))

    def step(k_prev, _):
        with numpyro.plate("sequences", N):
            k = numpyro.sample("k", dist.Categorical(P[k_prev]))
            z = numpyro.sample("z", dist.MultivariateNormal(mu[k], Sig[k]))
        return k, z

    _, zs = scan(step, k0, None, length=T - 1)
    z_all = jnp.concatenate([z0[None], zs], axis=0).swapaxes(0, 1)
    loc, scale = nn.decoder("decoder", latent_dim=D, obs_dim=Dx, hidden=hidden)(z_all)
    _observe("x", loc, scale, x, mask)


def gmm_model(
    x=None,
    *,
    N: int,
    Dx: int,
    K: int = 4,
    D: int = 4,
    mask=None,
    hidden: tuple[int, ...] = (128, 128),
    concentration: float = 1.0,
    **unused,
):
    """Gaussian mixture prior on one latent per data point, with a neural decoder.

    The SVAE of Johnson et al. (2016): ``w ~ Dirichlet``, ``(mu_k, Sigma_k) ~ NIW``, and for
    each data point ``k_n ~ Categorical(w)``, ``z_n ~ N(mu_k, Sigma_k)``, ``x_n ~ p(x | z_n)``.

    Parameters
    ----------
    x : array [N, Dx] or None
        Observations (one vector per data point).
    N, Dx : int
        Number of data points and observed channels.
    K, D : int
        Number of mixture components and latent dimension.
    mask : array [N] or [N, Dx], optional
        1 where observed, 0 where missing.
    hidden : tuple of int
        Hidden widths of the decoder MLP.
    concentration : float
        Symmetric Dirichlet concentration of the weights.
    """
    del unused
    eye = jnp.eye(D)
    w = numpyro.sample("w", dist.Dirichlet(jnp.full((K,), concentration)))
    with numpyro.plate("regimes", K):
        Sig = numpyro.sample("Sigma", dist.InverseWishart(D + 2.0, D * eye))
        mu = numpyro.sample("mu", dist.MultivariateNormal(jnp.zeros(D), Sig / 0.01))
    with numpyro.plate("data", N):
        k = numpyro.sample("k", dist.Categorical(w))
        z = numpyro.sample("z", dist.MultivariateNormal(mu[k], Sig[k]))
    loc, scale = nn.decoder("decoder", latent_dim=D, obs_dim=Dx, hidden=hidden)(z)
    d = dist.Normal(loc, scale)
    if mask is not None:
        m = mask if mask.ndim == 2 else mask[..., None]
        d = d.mask(jnp.broadcast_to(m.astype(bool), loc.shape))
    with numpyro.plate("data", N):
        numpyro.sample("x", d.to_event(1), obs=x)


_MODELS: dict[str, Callable] = {"slds": slds_model, "lds": lds_model, "hmm": hmm_model,
                                "gmm": gmm_model}


def make_model(family: str) -> Callable:
    """Return the ready-made model for `family` in {"slds", "lds", "hmm", "gmm"} (the
    ``gmm`` model takes ``x [N, Dx]``, the others ``x [N, T, Dx]``)."""
    if family not in _MODELS:
        raise ValueError(f"`family` must be one of {sorted(_MODELS)}; got {family!r}.")
    return _MODELS[family]

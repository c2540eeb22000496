"""Default networks: a Gaussian-potential encoder and a NumPyro-registered decoder.

The encoder is an :mod:`equinox` module mapping one sequence ``x [T, Dx]`` to diagonal
Gaussian node potentials ``(R [T, D], r [T, D])`` in natural form (docs/math.md §3):
``log l(z_t | x) = -1/2 z_t' diag(R_t) z_t + r_t' z_t``.  The decoder is called *inside* a
NumPyro model; it registers its parameters with :func:`numpyro.param` and returns a function
``z [..., D] -> (loc, scale)`` of a diagonal Gaussian likelihood (docs/math.md §3).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro
from jax import Array

__all__ = ["GaussianPotentialEncoder", "MLPDecoder", "decoder"]


def _inv_softplus(y: float) -> float:
    """Inverse of softplus for a positive python float."""
    return y + math.log(-math.expm1(-y))


class _MLP(eqx.Module):
    """Plain MLP: hidden layers with `activation`, then a linear read-out."""

    layers: list
    activation: Callable = eqx.field(static=True)

    def __init__(self, in_size: int, out_size: int, hidden: Sequence[int],
                 activation: Callable, *, key: Array):
        sizes = [in_size, *hidden, out_size]
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = [eqx.nn.Linear(a, b, key=k)
                       for a, b, k in zip(sizes[:-1], sizes[1:], keys, strict=True)]
        self.activation = activation

    def __call__(self, x: Array) -> Array:
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)


class GaussianPotentialEncoder(eqx.Module):
    """Recognition network producing diagonal Gaussian node potentials.

    At each step the input is ``[x_t * m_t, m_t]`` (missing entries zeroed, the mask itself as
    extra channels), fed to an MLP (optionally followed by a bidirectional GRU over time). The
    read-out gives ``(l_t, s_t)`` and the potentials are ``R_t = softplus(s_t) + min_precision``
    and ``r_t = R_t * l_t`` (so ``l_t`` is the implied mean).

    Parameters
    ----------
    obs_dim : int
        ``Dx``.
    latent_dim : int
        ``D``.
    hidden : sequence of int
        Hidden layer widths of the per-step MLP (the GRU state size is ``hidden[-1]``).
    bidirectional : bool
        If True, a forward and a backward GRU run over the MLP features so the potentials
        depend on the whole sequence.
    min_precision : float
        Floor added to the precisions (keeps ``R > 0`` in float32).
    activation : callable
        Hidden activation (default ``jax.nn.gelu``).
    key : jax.random key, optional
        Initialisation key (keyword-only); default ``jax.random.key(0)``, so that two
        encoders built without a key start from the same weights (pass distinct keys for
        distinct initialisations).

    Examples
    --------
    >>> enc = GaussianPotentialEncoder(obs_dim=3, latent_dim=2, hidden=(8,), key=jax.random.key(0))
    >>> R, r = enc(jnp.ones((5, 3)))
    >>> R.shape, r.shape
    ((5, 2), (5, 2))
    """

    mlp: _MLP
    gru_fwd: eqx.nn.GRUCell | None
    gru_bwd: eqx.nn.GRUCell | None
    head: eqx.nn.Linear | None
    obs_dim: int = eqx.field(static=True)
    latent_dim: int = eqx.field(static=True)
    min_precision: float = eqx.field(static=True)

    def __init__(self, obs_dim: int, latent_dim: int, hidden: Sequence[int] = (128, 128),
                 bidirectional: bool = False, *, key: Array | None = None,
                 min_precision: float = 1e-4,
                 activation: Callable = jax.nn.gelu):
        for name, v in (("obs_dim", obs_dim), ("latent_dim", latent_dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be a positive int; got {v!r}")
        hidden = tuple(int(h) for h in hidden)
        if bidirectional and not hidden:
            raise ValueError("`hidden` must be non-empty when `bidirectional=True`; got ()")
        if min_precision <= 0:
            raise ValueError(f"`min_precision` must be > 0; got {min_precision}")
        key = jax.random.key(0) if key is None else key
        k_mlp, k_f, k_b, k_h = jax.random.split(key, 4)
        self.obs_dim, self.latent_dim, self.min_precision = obs_dim, latent_dim, min_precision
        if bidirectional:
            H = hidden[-1]
            self.mlp = _MLP(2 * obs_dim, H, hidden[:-1], activation, key=k_mlp)
            self.gru_fwd = eqx.nn.GRUCell(H, H, key=k_f)
            self.gru_bwd = eqx.nn.GRUCell(H, H, key=k_b)
            self.head = eqx.nn.Linear(2 * H, 2 * latent_dim, key=k_h)
        else:
            self.mlp = _MLP(2 * obs_dim, 2 * latent_dim, hidden, activation, key=k_mlp)
            self.gru_fwd = self.gru_bwd = self.head = None

    def __call__(self, x: Array, mask: Array | None = None) -> tuple[Array, Array]:
        """Potentials of one sequence.

        Parameters
        ----------
        x : Array [T, Dx]
            Observations (values at missing entries are ignored).
        mask : Array [T] or [T, Dx], optional
            1 / True = observed.

        Returns
        -------
        R : Array [T, D]
            Diagonal node precisions, ``> 0``.
        r : Array [T, D]
            Node linear potentials.
        """
        if x.ndim != 2 or x.shape[-1] != self.obs_dim:
            raise ValueError(
                f"`x` must have shape [T, Dx] with Dx = {self.obs_dim}; got {list(x.shape)}")
        T = x.shape[0]
        if mask is None:
            m = jnp.ones_like(x)
        else:
            mask = jnp.asarray(mask)
            if mask.shape == (T,):
                mask = mask[:, None]
            elif mask.shape != x.shape:
                raise ValueError(
                    f"`mask` must have shape [T] = [{T}] or [T, Dx] = {list(x.shape)}; "
                    f"got {list(mask.shape)}")
            m = jnp.broadcast_to(mask, x.shape).astype(x.dtype)
        inp = jnp.concatenate([jnp.where(m > 0, x, 0.0), m], axis=-1)  # [T, 2 Dx]
        if self.gru_fwd is None:
            out = jax.vmap(self.mlp)(inp)  # [T, 2D]
        else:
            feats = jax.nn.gelu(jax.vmap(self.mlp)(inp))  # [T, H]
            h0 = jnp.zeros((self.gru_fwd.hidden_size,), x.dtype)

            def run(cell, xs):
                def step(h, xt):
                    h = cell(xt, h)
                    return h, h
                return jax.lax.scan(step, h0, xs)[1]

            hf = run(self.gru_fwd, feats)
            hb = run(self.gru_bwd, feats[::-1])[::-1]
            out = jax.vmap(self.head)(jnp.concatenate([hf, hb], axis=-1))
        loc, s = jnp.split(out, 2, axis=-1)
        R = jax.nn.softplus(s) + self.min_precision
        return R, R * loc


class MLPDecoder(eqx.Module):
    """MLP mean with a learned per-dimension softplus scale: ``z [D] -> (loc, scale) [Dx]``."""

    mlp: _MLP
    raw_scale: Array  # [Dx]
    min_scale: float = eqx.field(static=True)

    def __init__(self, latent_dim: int, obs_dim: int, hidden: Sequence[int] = (128, 128), *,
                 key: Array, init_scale: float = 1.0, min_scale: float = 1e-3,
                 activation: Callable = jax.nn.gelu):
        self.mlp = _MLP(latent_dim, obs_dim, tuple(hidden), activation, key=key)
        self.raw_scale = jnp.full((obs_dim,), _inv_softplus(init_scale - min_scale))
        self.min_scale = min_scale

    def __call__(self, z: Array) -> tuple[Array, Array]:
        loc = self.mlp(z)
        return loc, jnp.broadcast_to(jax.nn.softplus(self.raw_scale) + self.min_scale, loc.shape)


def decoder(name: str, latent_dim: int, obs_dim: int, hidden: Sequence[int] = (128, 128), *,
            init_scale: float = 1.0, min_scale: float = 1e-3, activation: Callable = jax.nn.gelu,
            key: Array | None = None) -> Callable[[Array], tuple[Array, Array]]:
    """Declare a Gaussian MLP decoder inside a NumPyro model.

    Registers the network's array leaves as one :func:`numpyro.param` site ``f"{name}$params"``
    (the :func:`numpyro.contrib.module.eqx_module` convention), initialised lazily from the
    NumPyro PRNG key (or from `key` when given).

    Parameters
    ----------
    name : str
        Site-name prefix.
    latent_dim, obs_dim : int
        ``D`` and ``Dx``.
    hidden : sequence of int
        Hidden widths of the mean MLP.
    init_scale : float
        Initial observation standard deviation.
    min_scale : float
        Floor on the standard deviation.
    activation : callable
        Hidden activation.
    key : jax.random key, optional
        Initialisation key; by default the model's seed handler provides one.

    Returns
    -------
    callable
        ``z [..., D] -> (loc [..., Dx], scale [..., Dx])``, e.g. ``[N, T, D] -> [N, T, Dx]``.
    """
    if init_scale <= min_scale:
        raise ValueError(f"`init_scale` must exceed `min_scale` = {min_scale}; got {init_scale}")

    def build(k):
        return MLPDecoder(latent_dim, obs_dim, hidden, key=k, init_scale=init_scale,
                          min_scale=min_scale, activation=activation)

    shape_tree = eqx.filter_eval_shape(build, jax.random.key(0))
    _, static = eqx.partition(shape_tree, lambda x: isinstance(x, jax.ShapeDtypeStruct))

    def init_fn(rng_key):
        k = rng_key if key is None else key
        return eqx.partition(build(k), eqx.is_inexact_array)[0]

    params = numpyro.param(f"{name}$params", init_fn)
    net = eqx.combine(params, static)

    def apply(z: Array) -> tuple[Array, Array]:
        z = jnp.asarray(z)
        if z.shape[-1] != latent_dim:
            raise ValueError(
                f"decoder `{name}` expects latents with last axis D = {latent_dim}; "
                f"got shape {list(z.shape)}")
        lead = z.shape[:-1]
        loc, scale = jax.vmap(net)(z.reshape(-1, latent_dim))
        return loc.reshape(*lead, obs_dim), scale.reshape(*lead, obs_dim)

    return apply

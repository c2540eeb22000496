"""Information-form message passing for Gaussian chains (linear dynamical systems).

The chain density is given by natural-parameter potentials (see `LDSPotentials` and
``docs/design.md``, section ``messages.lds``)::

    log psi(z) = -1/2 z_1' J_init z_1 + h_init' z_1
               + sum_{t<T} [-1/2 z_t' J11_t z_t + z_t' J12_t z_{t+1} - 1/2 z_{t+1}' J22_t z_{t+1}
                            + h1_t' z_t + h2_t' z_{t+1}]
               + sum_t m_t [-1/2 z_t' R_t z_t + r_t' z_t]

Algorithms (all Cholesky based, no explicit inverses of PD matrices):

* forward information filter.  With the filtered parameters ``(Jf_t, hf_t)`` and
  ``P_t = Jf_t + J11_t = L_t L_t'``, integrating ``z_t`` out gives the predicted parameters
  ``Jp_{t+1} = J22_t - W_t' W_t`` and ``hp_{t+1} = h2_t + W_t' w_t`` with
  ``[W_t | w_t] = L_t^{-1} [J12_t | hf_t + h1_t]`` (one triangular solve per step), and the
  log-normaliser increment ``1/2 |w_t|^2 - log|L_t| + D/2 log 2 pi``;
* the smoothers and the sampler call jit-compiled cores (inlined under an outer ``jit``);
  for ``D <= 16`` they use unrolled element-wise Cholesky / triangular solves / products,
  which XLA fuses (much faster than per-step LAPACK calls on tiny matrices on CPU);
* backward pass.  The backward kernel ``p(z_t | z_{t+1}, data_{1:t})`` is Gaussian with precision
  ``P_t`` and mean ``a_t + B_t z_{t+1}`` where ``a_t = P_t^{-1}(hf_t + h1_t)`` and
  ``B_t = P_t^{-1} J12_t``.  Hence ``mu_t = a_t + B_t mu_{t+1}``,
  ``Sigma_t = P_t^{-1} + B_t Sigma_{t+1} B_t'`` (a sum of PSD terms, so PD in float32) and
  ``Cov[z_t, z_{t+1}] = B_t Sigma_{t+1} = P_t^{-1} J12_t Sigma_{t+1}``, the block-inverse
  identity for the pairwise smoothed marginal.  No covariance is formed as E[zz'] - E[z]E[z]'.
  The sequential smoother runs the recursion with ``lax.scan``; the parallel one composes the
  affine kernels with a depth-O(log T) prefix scan (Särkkä & García-Fernández, 2021), after a
  parallel information filter whose elements are pairwise Gaussian potentials.  The prefix
  scan (`_prefix_scan`) is an odd/even recursion like ``lax.associative_scan``, but its
  down-sweep appends one element to a prefix *summary* (a filtered message or a smoothed
  marginal), which is cheaper than a general combine, and it works on time-last stacks
  ``[D, D, T]`` so the unrolled small-matrix kernels vectorise over time (~2x faster than
  ``lax.associative_scan`` on time-first arrays on CPU).

References
----------
Johnson et al. (2016), "Composing graphical models with neural networks", appendix on LDS
message passing; Särkkä & García-Fernández (2021), "Temporal parallelization of Bayesian
smoothers", IEEE TAC; ``docs/math.md`` §5.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.linalg import solve_triangular

from numpyro_svae._linalg import LOG_2PI, psd_cholesky, symmetrize

Array = jax.Array

__all__ = [
    "LDSPotentials",
    "LDSPosterior",
    "lds_filter",
    "lds_log_normalizer",
    "lds_smoother",
    "lds_smoother_sequential",
    "lds_smoother_parallel",
    "lds_sample",
    "LDSSampler",
    "lds_smoother_with_sampler",
    "lds_sample_from",
    "lds_expected_stats_by_grad",
]


class LDSPotentials(NamedTuple):
    """Natural-parameter potentials of a Gaussian chain (one sequence)."""

    J_init: Array  # [D, D]   precision of the initial potential (PD)
    h_init: Array  # [D]
    J11: Array  # [T-1, D, D] pairwise precision block on z_t (PSD)
    J12: Array  # [T-1, D, D] pairwise coupling, enters as + z_t' J12 z_{t+1}
    J22: Array  # [T-1, D, D] pairwise precision block on z_{t+1} (PD)
    h1: Array  # [T-1, D]
    h2: Array  # [T-1, D]
    R: Array  # [T, D] diagonal node precisions, or [T, D, D] full (PSD)
    r: Array  # [T, D]   node linear potentials


class LDSPosterior(NamedTuple):
    """Smoothed expected statistics, log normaliser and filtered messages."""

    log_normalizer: Array  # []  log integral of psi (includes T*D/2 log 2 pi)
    Ez: Array  # [T, D]      E[z_t]
    Ezz: Array  # [T, D, D]   E[z_t z_t']
    Ezz_next: Array  # [T-1, D, D] E[z_t z_{t+1}']
    cov: Array  # [T, D, D]   Cov[z_t]
    filtered_J: Array  # [T, D, D]   filtered precision of z_t given steps <= t
    filtered_h: Array  # [T, D]


class LDSSampler(NamedTuple):
    """Backward-sampling kernels of a chain, left over by its forward filter.

    ``z_T = L_T^{-T}(v_T + eps_T)`` and ``z_t = L_t^{-T}(w_t + W_t z_{t+1} + eps_t)`` with
    ``P_t = Jf_t + J11_t = L_t L_t'``: one reverse scan, no second filter.
    """

    L: Array  # [T-1, D, D] Cholesky of P_t = Jf_t + J11_t
    W: Array  # [T-1, D, D] L_t^{-1} J12_t
    w: Array  # [T-1, D]    L_t^{-1} (hf_t + h1_t)
    L_T: Array  # [D, D]    Cholesky of the last filtered precision Jf_T
    v_T: Array  # [D]       L_T^{-1} hf_T


class _Canon(NamedTuple):
    """Internal canonical form: node potentials full, masked, symmetric."""

    J_init: Array  # [D, D]
    h_init: Array  # [D]
    J11: Array  # [T-1, D, D]
    J12: Array  # [T-1, D, D]
    J22: Array  # [T-1, D, D]
    h1: Array  # [T-1, D]
    h2: Array  # [T-1, D]
    Jn: Array  # [T, D, D] masked node precisions
    hn: Array  # [T, D]    masked node linear terms


# ----------------------------------------------------------------------------------------------
# validation


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _validate(potentials: LDSPotentials, mask) -> None:
    """Static shape checks always; finiteness / PD checks only for concrete arrays."""
    if not isinstance(potentials, LDSPotentials):
        raise TypeError(f"`potentials` must be an LDSPotentials; got {type(potentials).__name__}")
    r = jnp.shape(potentials.r)
    if len(r) != 2:
        raise ValueError(f"`r` must have shape [T, D]; got {_shape_str(r)}")
    T, D = r
    if T < 1 or D < 1:
        raise ValueError(f"`r` must have shape [T, D] with T >= 1 and D >= 1; got {_shape_str(r)}")
    expected = {
        "J_init": (D, D),
        "h_init": (D,),
        "J11": (T - 1, D, D),
        "J12": (T - 1, D, D),
        "J22": (T - 1, D, D),
        "h1": (T - 1, D),
        "h2": (T - 1, D),
    }
    for name, shp in expected.items():
        got = jnp.shape(getattr(potentials, name))
        if got != shp:
            raise ValueError(
                f"`{name}` must have shape {_shape_str(shp)} (T={T}, D={D} from `r`); "
                f"got {_shape_str(got)}"
            )
    Rs = jnp.shape(potentials.R)
    if Rs not in ((T, D), (T, D, D)):
        raise ValueError(
            f"`R` must have shape [T, D] = {_shape_str((T, D))} (diagonal) or "
            f"[T, D, D] = {_shape_str((T, D, D))} (full); got {_shape_str(Rs)}"
        )
    if mask is not None and jnp.shape(mask) != (T,):
        raise ValueError(f"`mask` must have shape [T] = [{T}]; got {_shape_str(jnp.shape(mask))}")
    for name in LDSPotentials._fields:
        x = getattr(potentials, name)
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise TypeError(f"`{name}` must be a floating-point array; got {jnp.result_type(x)}")

    # value checks: only when every input is concrete (eager calls); skipped under jit/vmap/grad
    leaves = list(potentials) + ([mask] if mask is not None else [])
    if not all(_is_concrete(x) for x in leaves):
        return
    for name in LDSPotentials._fields:
        if not np.all(np.isfinite(np.asarray(getattr(potentials, name)))):
            raise ValueError(f"`{name}` contains NaN or inf")
    if mask is not None and not np.all(np.isfinite(np.asarray(mask, dtype=float))):
        raise ValueError("`mask` contains NaN or inf")

    def min_eig(name):
        A = np.asarray(getattr(potentials, name), dtype=np.float64)
        if A.size == 0:
            return np.inf, 1.0
        A = 0.5 * (A + np.swapaxes(A, -1, -2))
        ev = np.linalg.eigvalsh(A)
        return ev.min(), max(np.abs(ev).max(), 1e-300)

    eps = np.sqrt(np.finfo(jnp.result_type(potentials.r)).eps)
    for name in ("J_init", "J22"):
        lo, scale = min_eig(name)
        if lo <= 0.0:
            raise ValueError(f"`{name}` must be positive definite; smallest eigenvalue {lo:.3g}")
    for name in ("J11",):
        lo, scale = min_eig(name)
        if lo < -eps * scale:
            raise ValueError(
                f"`{name}` must be positive semi-definite; smallest eigenvalue {lo:.3g}"
            )
    if len(Rs) == 2:
        lo = np.asarray(potentials.R).min()
        if lo < 0:
            raise ValueError(f"`R` (diagonal) must be non-negative; smallest entry {lo:.3g}")
    else:
        lo, scale = min_eig("R")
        if lo < -eps * scale:
            raise ValueError(f"`R` must be positive semi-definite; smallest eigenvalue {lo:.3g}")


def _canonical(potentials: LDSPotentials, mask) -> _Canon:
    """Apply the mask, make R full and symmetrise the precision blocks."""
    p = potentials
    dtype = jnp.result_type(*p)
    T, D = p.r.shape
    m = jnp.ones((T,), dtype) if mask is None else jnp.asarray(mask).astype(dtype)
    if p.R.ndim == 2:
        Jn = (m[:, None] * p.R.astype(dtype))[:, :, None] * jnp.eye(D, dtype=dtype)
    else:
        Jn = m[:, None, None] * symmetrize(p.R.astype(dtype))
    hn = m[:, None] * p.r.astype(dtype)
    return _Canon(
        J_init=symmetrize(p.J_init.astype(dtype)),
        h_init=p.h_init.astype(dtype),
        J11=symmetrize(p.J11.astype(dtype)),
        J12=p.J12.astype(dtype),
        J22=symmetrize(p.J22.astype(dtype)),
        h1=p.h1.astype(dtype),
        h2=p.h2.astype(dtype),
        Jn=Jn,
        hn=hn,
    )


def _resolve(method: str) -> str:
    if method not in ("auto", "sequential", "parallel"):
        raise ValueError(f"`method` must be 'auto', 'sequential' or 'parallel'; got {method!r}")
    if method == "auto":
        return "sequential" if jax.default_backend() == "cpu" else "parallel"
    return method


# ----------------------------------------------------------------------------------------------
# shared pieces


def _mT(A: Array) -> Array:
    return jnp.swapaxes(A, -1, -2)


# Small-matrix kernels.  For D <= _SMALL_D the Cholesky factorisation, triangular solves and
# matrix products are written as unrolled element-wise expressions that XLA fuses into a few
# loops; on CPU this is ~8x faster inside lax.scan than per-step LAPACK/dot calls on tiny
# matrices.  Larger D uses the library kernels (the same mathematics).
_SMALL_D = 16


def _mm(A: Array, B: Array) -> Array:
    """A @ B over the trailing two axes."""
    if A.shape[-1] <= _SMALL_D:
        return jnp.sum(A[..., :, :, None] * B[..., None, :, :], axis=-2)
    return A @ B


def _mv(A: Array, x: Array) -> Array:
    """A @ x.  A: [..., M, N], x: [..., N]."""
    if A.shape[-1] <= _SMALL_D:
        return jnp.sum(A * x[..., None, :], axis=-1)
    return jnp.einsum("...ij,...j->...i", A, x)


def _chol(A: Array) -> Array:
    """Lower Cholesky factor of the symmetrised A (NaN when A is not PD).  A: [..., D, D]."""
    D = A.shape[-1]
    if D > _SMALL_D:
        return psd_cholesky(A)
    A = symmetrize(A)
    idx = jnp.arange(D)
    cols = []
    for j in range(D):
        v = A[..., :, j]
        for k in range(j):
            v = v - cols[k] * cols[k][..., j : j + 1]
        d = jnp.sqrt(v[..., j : j + 1])
        cols.append(jnp.where(idx >= j, v / d, jnp.zeros_like(v)))
    return jnp.stack(cols, axis=-1)


def _tri_solve(L: Array, B: Array) -> Array:
    """L^{-1} B for lower-triangular L.  L: [..., D, D]; B: [..., D, M]."""
    D = L.shape[-1]
    if D > _SMALL_D:
        return solve_triangular(L, B, lower=True)
    rows = []
    for i in range(D):
        v = B[..., i, :]
        for k in range(i):
            v = v - L[..., i, k : k + 1] * rows[k]
        rows.append(v / L[..., i, i : i + 1])
    return jnp.stack(rows, axis=-2)


def _tri_solve_T(L: Array, B: Array) -> Array:
    """L^{-T} B for lower-triangular L.  L: [..., D, D]; B: [..., D, M]."""
    D = L.shape[-1]
    if D > _SMALL_D:
        return solve_triangular(L, B, lower=True, trans="T")
    rows = [None] * D
    for i in reversed(range(D)):
        v = B[..., i, :]
        for k in range(i + 1, D):
            v = v - L[..., k, i : i + 1] * rows[k]
        rows[i] = v / L[..., i, i : i + 1]
    return jnp.stack(rows, axis=-2)


def _step_quantities(Jf: Array, hf: Array, J11: Array, J12: Array, h1: Array):
    """Cholesky of P = Jf + J11 and W = L^{-1}[J12 | hf + h1] (batched over leading axes)."""
    L = _chol(Jf + J11)
    rhs = jnp.concatenate([J12, (hf + h1)[..., None]], axis=-1)
    Ww = _tri_solve(L, rhs)
    return L, Ww[..., :-1], Ww[..., -1]


def _log_det_half(L: Array) -> Array:
    return jnp.sum(jnp.log(jnp.diagonal(L, axis1=-2, axis2=-1)), axis=-1)


def _log_normalizer_from(L: Array, w: Array, L_T: Array, v_T: Array) -> Array:
    """Sum of per-step log-normaliser increments.  L: [T-1, D, D], w: [T-1, D], v_T: [D]."""
    D = v_T.shape[-1]
    T = L.shape[0] + 1
    total = 0.5 * jnp.sum(w * w) - jnp.sum(_log_det_half(L))
    total = total + 0.5 * jnp.sum(v_T * v_T) - _log_det_half(L_T)
    return total + 0.5 * T * D * LOG_2PI


def _kernels(L: Array, W: Array, w: Array):
    """Backward kernels from the per-step Cholesky factors (vectorised over t).

    Returns B = P^{-1} J12 = L^{-T} W, a = P^{-1}(hf + h1) = L^{-T} w and Pinv = P^{-1}.
    """
    D = L.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(D, dtype=L.dtype), L.shape)
    Linv = _tri_solve(L, eye)
    out = _tri_solve_T(L, jnp.concatenate([W, w[..., None], Linv], axis=-1))
    return out[..., :D], out[..., D], symmetrize(out[..., D + 1 :])


def _final(Jf_T: Array, hf_T: Array):
    """Smoothed (= filtered) moments at the last step, with the Cholesky pieces for log Z."""
    D = Jf_T.shape[-1]
    L_T = _chol(Jf_T)
    Linv_T = _tri_solve(L_T, jnp.eye(D, dtype=Jf_T.dtype))
    v_T = _mv(Linv_T, hf_T)
    out = _tri_solve_T(L_T, jnp.concatenate([v_T[:, None], Linv_T], axis=-1))
    return L_T, v_T, out[:, 0], symmetrize(out[:, 1:])


def _assemble(logZ, mu, Sig, B, Jf, hf) -> LDSPosterior:
    cross = _mm(B, Sig[1:]) + mu[:-1, :, None] * mu[1:, None, :]
    Ezz = symmetrize(Sig + mu[:, :, None] * mu[:, None, :])
    return LDSPosterior(
        log_normalizer=logZ,
        Ez=mu,
        Ezz=Ezz,
        Ezz_next=cross,
        cov=Sig,
        filtered_J=Jf,
        filtered_h=hf,
    )


# ----------------------------------------------------------------------------------------------
# sequential


def _filter_sequential(c: _Canon):
    """Forward information filter with lax.scan.

    Returns Jf [T, D, D], hf [T, D] and the per-step (L [T-1], W [T-1], w [T-1]).
    """
    Jf1 = c.J_init + c.Jn[0]
    hf1 = c.h_init + c.hn[0]

    def step(carry, xs):
        Jf, hf = carry
        J11, J12, J22, h1, h2, Jn, hn = xs
        L, W, w = _step_quantities(Jf, hf, J11, J12, h1)
        Jp = J22 - _mm(W.T, W)
        hp = h2 + _mv(W.T, w)
        Jf_next = symmetrize(Jp + Jn)
        hf_next = hp + hn
        return (Jf_next, hf_next), (Jf_next, hf_next, L, W, w)

    xs = (c.J11, c.J12, c.J22, c.h1, c.h2, c.Jn[1:], c.hn[1:])
    _, (Jfs, hfs, L, W, w) = lax.scan(step, (Jf1, hf1), xs)
    Jf = jnp.concatenate([Jf1[None], Jfs], axis=0)
    hf = jnp.concatenate([hf1[None], hfs], axis=0)
    return Jf, hf, L, W, w


def _smooth_sequential(B, a, Pinv, mu_T, Sig_T):
    def step(carry, xs):
        mu_next, Sig_next = carry
        Bt, at, Pt = xs
        mu = at + _mv(Bt, mu_next)
        Sig = symmetrize(Pt + _mm(_mm(Bt, Sig_next), Bt.T))
        return (mu, Sig), (mu, Sig)

    _, (mus, Sigs) = lax.scan(step, (mu_T, Sig_T), (B, a, Pinv), reverse=True)
    mu = jnp.concatenate([mus, mu_T[None]], axis=0)
    Sig = jnp.concatenate([Sigs, Sig_T[None]], axis=0)
    return mu, Sig


# ----------------------------------------------------------------------------------------------
# parallel


# The parallel path works on time-last stacks: matrices [D, D, n], vectors [D, n] (under vmap
# the batch axis comes first).  Every small-matrix operation then acts on contiguous length-n
# rows, so the unrolled kernels below become long vectorised element-wise loops, and the
# even/odd slicing of the scan is along the contiguous axis.  For D > _SMALL_D the library
# kernels are used (on time-first copies).


def _materialize(x: Array) -> Array:
    """Keep XLA from fusing (and so recomputing) the unrolled kernel into every consumer.

    Without it the fused element-wise chains of the Cholesky factor and the triangular solve
    are duplicated into their many consumers: about 2x the run time and compile time.
    """
    return lax.optimization_barrier(x)


def _tl(x: Array) -> Array:
    """Time-first [n, ...] to time-last [..., n]."""
    return jnp.moveaxis(x, 0, -1)


def _tf(x: Array) -> Array:
    """Time-last [..., n] to time-first [n, ...]."""
    return jnp.moveaxis(x, -1, 0)


def _tl_T(A: Array) -> Array:
    return jnp.swapaxes(A, 0, 1)


def _tl_sym(A: Array) -> Array:
    return 0.5 * (A + _tl_T(A))


def _tl_mm(A: Array, B: Array) -> Array:
    """A @ B per time step.  A: [M, K, n], B: [K, N, n] -> [M, N, n]."""
    K = A.shape[1]
    if K > _SMALL_D:
        return jnp.einsum("ikn,kjn->ijn", A, B)
    out = A[:, 0, None] * B[None, 0]
    for j in range(1, K):
        out = out + A[:, j, None] * B[None, j]
    return out


def _tl_mv(A: Array, x: Array) -> Array:
    """A @ x per time step.  A: [M, K, n], x: [K, n] -> [M, n]."""
    K = A.shape[1]
    if K > _SMALL_D:
        return jnp.einsum("ikn,kn->in", A, x)
    out = A[:, 0] * x[None, 0]
    for j in range(1, K):
        out = out + A[:, j] * x[None, j]
    return out


def _tl_chol(A: Array) -> Array:
    """Lower Cholesky factor per time step (NaN when not PD).  A: [D, D, n]."""
    D = A.shape[0]
    if D > _SMALL_D:
        return _tl(psd_cholesky(_tf(A)))
    A = _tl_sym(A)
    cols = []
    for j in range(D):
        v = A[j:, j]  # rows j.. of column j: [D - j, n]
        for k in range(j):
            v = v - cols[k][j:] * cols[k][j]
        d = jnp.sqrt(v[0])
        cols.append(jnp.concatenate([jnp.zeros_like(A[:j, 0]), v / d], axis=0))
    return _materialize(jnp.stack(cols, axis=1))


def _tl_tri_solve(L: Array, B: Array) -> Array:
    """L^{-1} B per time step, L lower triangular.  L: [D, D, n], B: [D, M, n]."""
    D = L.shape[0]
    if D > _SMALL_D:
        return _tl(solve_triangular(_tf(L), _tf(B), lower=True))
    rows = []
    for i in range(D):
        v = B[i]
        for k in range(i):
            v = v - L[i, k] * rows[k]
        rows.append(v / L[i, i])
    return _materialize(jnp.stack(rows, axis=0))


def _interleave(evens: Array, odds: Array) -> Array:
    """Merge along the last axis: ``evens`` at positions 0, 2, 4, ... and ``odds`` at 1, 3, ...

    ``evens`` has as many entries as ``odds`` or one more.
    """
    n = odds.shape[-1]
    pairs = jnp.stack([evens[..., :n], odds], axis=-1).reshape(odds.shape[:-1] + (2 * n,))
    return pairs if evens.shape[-1] == n else jnp.concatenate([pairs, evens[..., n:]], axis=-1)


def _prefix_scan(elems, combine, absorb, message):
    """Inclusive prefix scan over the last axis with depth O(log n) (odd/even recursion).

    ``elems`` is a tuple of time-last arrays; element 0 is already a prefix.
    ``combine(e1, e2)`` merges two adjacent elements (e1 earlier), ``message(e)`` extracts the
    summary of a prefix element and ``absorb(m, e)`` appends element ``e`` to a prefix summary
    ``m``.  Returns the prefix summaries at every position.  Unlike ``lax.associative_scan``,
    the down-sweep uses the cheaper ``absorb`` (a summary is smaller than a general element)
    and only summaries are interleaved.
    """
    n = elems[0].shape[-1]
    if n == 1:
        return message(elems)
    reduced = combine(tuple(e[..., 0:-1:2] for e in elems), tuple(e[..., 1::2] for e in elems))
    odd = _prefix_scan(reduced, combine, absorb, message)  # prefixes ending at 1, 3, 5, ...
    k = (n - 1) // 2  # positions 2, 4, ... append their element to the prefix just before
    even = absorb(tuple(m[..., :k] for m in odd), tuple(e[..., 2::2] for e in elems))
    first = message(tuple(e[..., :1] for e in elems))
    return tuple(
        _interleave(jnp.concatenate([f, e], axis=-1), o)
        for f, e, o in zip(first, even, odd, strict=True)
    )


def _filter_parallel(c: _Canon):
    """Parallel information filter.

    Element t is a pairwise potential on (z_{t-1}, z_t) (pairwise times node potential of
    z_t), stored as (Jxx, Jxy, Jyy, hx, hy) with density
    exp(-1/2 x'Jxx x + x'Jxy y - 1/2 y'Jyy y + hx'x + hy'y).  Element 1 has no x, so every
    prefix is a potential on z_t alone: the filtered (Jf_t, hf_t).  Combining integrates the
    shared variable; the matrix to factor, Jyy(earlier) + Jxx(later), is PD whenever J22 is.
    Appending an element to a prefix is one filter step.
    """
    D = c.h_init.shape[-1]
    zeros = jnp.zeros((1, D, D), c.J_init.dtype)
    Jxx = jnp.concatenate([zeros, c.J11], axis=0)
    Jxy = jnp.concatenate([zeros, c.J12], axis=0)
    Jyy = jnp.concatenate([c.J_init[None], c.J22], axis=0) + c.Jn
    hx = jnp.concatenate([jnp.zeros_like(c.h_init)[None], c.h1], axis=0)
    hy = jnp.concatenate([c.h_init[None], c.h2], axis=0) + c.hn

    def combine(e1, e2):
        Jxx1, Jxy1, Jyy1, hx1, hy1 = e1
        Jxx2, Jxy2, Jyy2, hx2, hy2 = e2
        L = _tl_chol(Jyy1 + Jxx2)
        rhs = jnp.concatenate([_tl_T(Jxy1), Jxy2, (hy1 + hx2)[:, None]], axis=1)
        S = _tl_tri_solve(L, rhs)
        Wx, Ww, g = S[:, :D], S[:, D : 2 * D], S[:, 2 * D]
        WxT, WwT = _tl_T(Wx), _tl_T(Ww)
        return (
            _tl_sym(Jxx1 - _tl_mm(WxT, Wx)),
            _tl_mm(WxT, Ww),
            _tl_sym(Jyy2 - _tl_mm(WwT, Ww)),
            hx1 + _tl_mv(WxT, g),
            hy2 + _tl_mv(WwT, g),
        )

    def absorb(m, e):
        Jf, hf = m
        Jxx2, Jxy2, Jyy2, hx2, hy2 = e
        L = _tl_chol(Jf + Jxx2)
        S = _tl_tri_solve(L, jnp.concatenate([Jxy2, (hf + hx2)[:, None]], axis=1))
        WT = _tl_T(S[:, :D])
        return _tl_sym(Jyy2 - _tl_mm(WT, S[:, :D])), hy2 + _tl_mv(WT, S[:, D])

    elems = tuple(_tl(x) for x in (Jxx, Jxy, Jyy, hx, hy))
    Jf, hf = _prefix_scan(elems, combine, absorb, lambda e: (e[2], e[4]))
    return _tf(Jf), _tf(hf)


def _smooth_parallel(B, a, Pinv, mu_T, Sig_T):
    """Compose the affine backward kernels z_t = a_t + B_t z_{t+1} + e_t (Cov e_t = Pinv_t).

    A prefix scan over the time-reversed kernels; the prefix summaries are the smoothed
    marginals (mu_t, Sigma_t).
    """
    a_r = jnp.concatenate([mu_T[:, None], _tl(a[::-1])], axis=-1)
    B_r = jnp.concatenate([jnp.zeros_like(Sig_T)[..., None], _tl(B[::-1])], axis=-1)
    S_r = jnp.concatenate([Sig_T[..., None], _tl(Pinv[::-1])], axis=-1)

    def combine(later, earlier):
        a2, B2, S2 = later
        a1, B1, S1 = earlier
        B1S2 = _tl_mm(B1, S2)
        return a1 + _tl_mv(B1, a2), _tl_mm(B1, B2), _tl_sym(S1 + _tl_mm(B1S2, _tl_T(B1)))

    def absorb(m, earlier):
        mu2, Sig2 = m
        a1, B1, S1 = earlier
        B1S2 = _tl_mm(B1, Sig2)
        return a1 + _tl_mv(B1, mu2), _tl_sym(S1 + _tl_mm(B1S2, _tl_T(B1)))

    mu, Sig = _prefix_scan((a_r, B_r, S_r), combine, absorb, lambda e: (e[0], e[2]))
    return _tf(mu)[::-1], _tf(Sig)[::-1]


# ----------------------------------------------------------------------------------------------
# internal drivers (no validation)


class _Filtered(NamedTuple):
    logZ: Array  # []
    Jf: Array  # [T, D, D]
    hf: Array  # [T, D]
    L: Array  # [T-1, D, D] Cholesky of P_t = Jf_t + J11_t
    W: Array  # [T-1, D, D] L_t^{-1} J12_t
    w: Array  # [T-1, D]    L_t^{-1} (hf_t + h1_t)
    L_T: Array  # [D, D]    Cholesky of Jf_T
    v_T: Array  # [D]       L_T^{-1} hf_T
    mu_T: Array  # [D]
    Sig_T: Array  # [D, D]


def _filter_impl(c: _Canon, method: str) -> _Filtered:
    if method == "sequential":
        Jf, hf, L, W, w = _filter_sequential(c)
    else:
        if c.J11.shape[0] == 0:
            Jf, hf = (c.J_init + c.Jn)[:1], (c.h_init + c.hn)[:1]
        else:
            Jf, hf = _filter_parallel(c)
        L, W, w = _step_quantities(Jf[:-1], hf[:-1], c.J11, c.J12, c.h1)
    L_T, v_T, mu_T, Sig_T = _final(Jf[-1], hf[-1])
    logZ = _log_normalizer_from(L, w, L_T, v_T)
    return _Filtered(logZ, Jf, hf, L, W, w, L_T, v_T, mu_T, Sig_T)


def _smooth_filtered(f: _Filtered, method: str) -> LDSPosterior:
    """The backward (smoothing) pass over a forward filter's output."""
    B, a, Pinv = _kernels(f.L, f.W, f.w)
    if method == "sequential" or f.L.shape[0] == 0:
        mu, Sig = _smooth_sequential(B, a, Pinv, f.mu_T, f.Sig_T)
    else:
        mu, Sig = _smooth_parallel(B, a, Pinv, f.mu_T, f.Sig_T)
    return _assemble(f.logZ, mu, Sig, B, f.Jf, f.hf)


def _smoother_impl(c: _Canon, method: str) -> LDSPosterior:
    return _smooth_filtered(_filter_impl(c, method), method)


# Compiled entry points.  The house style keeps jit out of internals because the caller compiles
# the whole graph; under an outer jit these nested jits are inlined and cost nothing.  They are
# here because the small-D kernels are unrolled element-wise code: run eagerly (op by op) they
# would dispatch thousands of tiny operations per call.


@partial(jax.jit, static_argnums=2)
def _filter_jit(potentials: LDSPotentials, mask, method: str) -> _Filtered:
    return _filter_impl(_canonical(potentials, mask), method)


@partial(jax.jit, static_argnums=2)
def _smoother_jit(potentials: LDSPotentials, mask, method: str) -> LDSPosterior:
    return _smoother_impl(_canonical(potentials, mask), method)


# ----------------------------------------------------------------------------------------------
# public API



def lds_filter(potentials: LDSPotentials, mask: Array | None = None, *, method: str = "auto"):
    """Forward information filter.

    Parameters
    ----------
    potentials : LDSPotentials
        Chain potentials for one sequence (``R`` diagonal ``[T, D]`` or full ``[T, D, D]``).
    mask : Array, optional
        ``[T]`` bool or 0/1; masked steps carry no node potential.
    method : {"auto", "sequential", "parallel"}
        ``auto`` is sequential on CPU, parallel on GPU/TPU.

    Returns
    -------
    log_normalizer : Array
        ``[]``.
    filtered_J : Array
        ``[T, D, D]`` precision of ``z_t`` given potentials up to step ``t``.
    filtered_h : Array
        ``[T, D]``.

    Raises
    ------
    ValueError
        Wrong shapes (naming the argument, expected and got), or, for concrete inputs, NaN/inf
        or non-PD ``J_init``/``J22`` or non-PSD ``J11``/``R``.

    Notes
    -----
    Shapes are checked in Python on every call (also under ``jit``/``vmap``).  NaN/inf and
    definiteness are checked only when all inputs are concrete arrays; under
    ``jit``/``vmap``/``grad`` those checks are skipped, and a non-finite or non-PD input makes a
    Cholesky factor NaN, which propagates to every output (log normaliser and statistics)
    instead of giving silently wrong numbers.  The same holds for every function here.
    """
    _validate(potentials, mask)
    f = _filter_jit(potentials, mask, _resolve(method))
    return f.logZ, f.Jf, f.hf


def lds_log_normalizer(
    potentials: LDSPotentials, mask: Array | None = None, *, method: str = "auto"
) -> Array:
    """Log of the integral of the chain potential over ``z_{1:T}``.

    Includes ``T*D/2 log(2 pi)``.  Parameters and errors as in `lds_filter`.

    Returns
    -------
    Array
        ``[]``.
    """
    return lds_filter(potentials, mask, method=method)[0]


def lds_smoother_sequential(potentials: LDSPotentials, mask: Array | None = None) -> LDSPosterior:
    """Information-form Kalman smoother with ``lax.scan`` (forward filter, backward RTS pass).

    Parameters
    ----------
    potentials : LDSPotentials
        Chain potentials for one sequence (unbatched; ``vmap`` over sequences).
    mask : Array, optional
        ``[T]`` bool or 0/1; masked steps carry no node potential (pure prior propagation).

    Returns
    -------
    LDSPosterior
        ``log_normalizer []``, ``Ez [T, D]``, ``Ezz [T, D, D]``, ``Ezz_next [T-1, D, D]``,
        ``cov [T, D, D]``, ``filtered_J [T, D, D]``, ``filtered_h [T, D]``.  Covariances come
        from the backward recursion ``Sigma_t = P_t^{-1} + B_t Sigma_{t+1} B_t'`` (never by
        subtracting outer products); all matrices are symmetrised.

    Raises
    ------
    ValueError
        See `lds_filter`.

    References
    ----------
    ``docs/math.md`` §5; Rauch, Tung & Striebel (1965).
    """
    _validate(potentials, mask)
    return _smoother_jit(potentials, mask, "sequential")


def lds_smoother_parallel(potentials: LDSPotentials, mask: Array | None = None) -> LDSPosterior:
    """Information-form smoother with parallel prefix scans (depth O(log T)).

    Same inputs and outputs as `lds_smoother_sequential`; requires ``J22_t`` PD (as does the
    model).  The filter combines pairwise Gaussian potentials, the smoother composes the affine
    backward kernels.

    References
    ----------
    Särkkä & García-Fernández (2021), "Temporal parallelization of Bayesian smoothers".
    """
    _validate(potentials, mask)
    return _smoother_jit(potentials, mask, "parallel")


def lds_smoother(
    potentials: LDSPotentials, mask: Array | None = None, *, method: str = "auto"
) -> LDSPosterior:
    """Smoothed expected statistics of a Gaussian chain.

    Dispatches to `lds_smoother_sequential` (``method="sequential"``, the ``auto`` choice on
    CPU) or `lds_smoother_parallel` (``"parallel"``, the ``auto`` choice on GPU/TPU).  See
    those for parameters, returns and errors.
    """
    m = _resolve(method)
    if m == "sequential":
        return lds_smoother_sequential(potentials, mask)
    return lds_smoother_parallel(potentials, mask)


def lds_sample(
    key: Array,
    potentials: LDSPotentials,
    mask: Array | None = None,
    *,
    num_samples: int | None = None,
) -> Array:
    """Reparameterised forward-filter backward-sample draw from the chain.

    ``z_T = mu_T + L_T^{-T} eps_T`` and ``z_t = P_t^{-1}(hf_t + h1_t + J12_t z_{t+1}) +
    L_t^{-T} eps_t`` with ``P_t = Jf_t + J11_t = L_t L_t'``; differentiable in every potential.

    Parameters
    ----------
    key : Array
        PRNG key (typed ``jax.random.key`` or raw ``uint32[2]``).
    potentials : LDSPotentials
        Chain potentials for one sequence.
    mask : Array, optional
        ``[T]``; masked steps carry no node potential.
    num_samples : int, optional
        Number of draws ``S``; ``None`` gives a single draw without the leading axis.

    Returns
    -------
    Array
        ``[T, D]`` or ``[S, T, D]``.
    """
    _validate(potentials, mask)
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise ValueError(f"`num_samples` must be a positive int or None; got {num_samples!r}")
    return _sample_jit(key, potentials, mask, num_samples, _resolve("auto"))


def _backward_sample(key, k: LDSSampler, num_samples) -> Array:
    """Reverse scan of the backward-sampling kernels: [T, D] or [S, T, D]."""
    T, D = k.w.shape[0] + 1, k.v_T.shape[-1]
    S = 1 if num_samples is None else num_samples
    eps = jax.random.normal(key, (T, D, S), dtype=k.v_T.dtype)
    z_T = _tri_solve_T(k.L_T, k.v_T[:, None] + eps[-1])

    def step(z_next, xs):
        L, W, w, e = xs
        z = _tri_solve_T(L, w[:, None] + _mm(W, z_next) + e)
        return z, z

    _, zs = lax.scan(step, z_T, (k.L, k.W, k.w, eps[:-1]), reverse=True)
    z = jnp.concatenate([zs, z_T[None]], axis=0)  # [T, D, S]
    z = jnp.moveaxis(z, -1, 0)  # [S, T, D]
    return z[0] if num_samples is None else z


def _sampler_of(f: _Filtered) -> LDSSampler:
    return LDSSampler(f.L, f.W, f.w, f.L_T, f.v_T)


@partial(jax.jit, static_argnums=(3, 4))
def _sample_jit(key, potentials: LDSPotentials, mask, num_samples, method: str) -> Array:
    f = _filter_impl(_canonical(potentials, mask), method)
    return _backward_sample(key, _sampler_of(f), num_samples)


@partial(jax.jit, static_argnums=2)
def _smoother_sampler_jit(potentials: LDSPotentials, mask, method: str):
    f = _filter_impl(_canonical(potentials, mask), method)
    return _smooth_filtered(f, method), _sampler_of(f)


def lds_smoother_with_sampler(
    potentials: LDSPotentials, mask: Array | None = None, *, method: str = "auto"
) -> tuple[LDSPosterior, LDSSampler]:
    """`lds_smoother` plus the backward-sampling kernels its forward filter computed.

    Drawing with `lds_sample_from` then costs one reverse scan instead of a second filter
    (the mean field's final pass keeps them, so the ELBO's reparameterised draw of ``z``
    shares the smoother's Cholesky factors, in the forward and in the backward pass).

    Returns
    -------
    (LDSPosterior, LDSSampler)
        As `lds_smoother`; kernels ``L [T-1, D, D]``, ``W [T-1, D, D]``, ``w [T-1, D]``,
        ``L_T [D, D]``, ``v_T [D]``.
    """
    _validate(potentials, mask)
    return _smoother_sampler_jit(potentials, mask, _resolve(method))


def lds_sample_from(key: Array, sampler: LDSSampler, *, num_samples: int | None = None) -> Array:
    """Reparameterised draws from a chain given its `LDSSampler` kernels.

    With the same key, equal to ``lds_sample(key, potentials, mask, num_samples=...)`` of the
    chain the kernels came from.

    Parameters
    ----------
    key : Array
        PRNG key.
    sampler : LDSSampler
        From `lds_smoother_with_sampler` (one sequence; ``vmap`` for batches).
    num_samples : int, optional
        ``S``; ``None`` gives one draw without the sample axis.

    Returns
    -------
    Array
        ``[T, D]`` or ``[S, T, D]``.
    """
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise ValueError(f"`num_samples` must be a positive int or None; got {num_samples!r}")
    return _backward_sample(key, sampler, num_samples)


def lds_expected_stats_by_grad(
    potentials: LDSPotentials, mask: Array | None = None
) -> LDSPosterior:
    """Reference expected statistics as gradients of the log normaliser (slow; for tests).

    ``-1/2 E[z_t z_t'] = d logZ / d dJ_t`` and ``E[z_t] = d logZ / d dh_t`` for zero
    perturbations ``(dJ_t, dh_t)`` added to every node potential (so masked steps are covered),
    and ``E[z_t z_{t+1}'] = d logZ / d J12_t``.  The covariance here *is* E[zz'] - E[z]E[z]'
    (reference only).  Filtered messages come from the sequential filter.

    Returns
    -------
    LDSPosterior
    """
    _validate(potentials, mask)
    return _by_grad_jit(potentials, mask)


@jax.jit
def _by_grad_jit(potentials: LDSPotentials, mask) -> LDSPosterior:
    c = _canonical(potentials, mask)

    def logZ_fn(dJ, dh, J12):
        cc = c._replace(Jn=c.Jn + dJ, hn=c.hn + dh, J12=J12)
        return _filter_impl(cc, "sequential").logZ

    dJ0 = jnp.zeros_like(c.Jn)
    dh0 = jnp.zeros_like(c.hn)
    logZ, (gJ, gh, g12) = jax.value_and_grad(logZ_fn, argnums=(0, 1, 2))(dJ0, dh0, c.J12)
    Ezz = symmetrize(-2.0 * gJ)
    Ez = gh
    cov = symmetrize(Ezz - Ez[:, :, None] * Ez[:, None, :])
    f = _filter_impl(c, "sequential")
    return LDSPosterior(logZ, Ez, Ezz, g12, cov, f.Jf, f.hf)

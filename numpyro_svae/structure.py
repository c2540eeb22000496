"""Trace a NumPyro model and find its conjugate SLDS / LDS / HMM / GMM structure.

:func:`discover_structure` runs a model once (seeded, on the user's arguments), reads every
sample / param site, classifies the sites into conjugate blocks and verifies, structurally
and numerically, that the dependencies are exactly the ones the mean-field inference can
serve. The result is a frozen :class:`ConjugateStructure` that the front (``SVAEGuide``,
``SVAE_ELBO``, ``predict``) reads instead of the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from numpyro.ops.provenance import eval_provenance
from numpyro.ops.pytree import PytreeTrace
from numpyro.primitives import Messenger

__all__ = [
    "SiteInfo",
    "DirichletBlock",
    "NIWBlock",
    "MNIWBlock",
    "ObservationSite",
    "ConjugateStructure",
    "discover_structure",
]


@dataclass(frozen=True, eq=False)
class SiteInfo:
    """One site of the traced model, as the guide must mirror it.

    Attributes
    ----------
    name : str
        Site name.
    role : str
        What the site is in the conjugate model: ``"pi0"``, ``"P"``, ``"init_cov"`` (S0),
        ``"init_mean"`` (m0), ``"dyn_cov"`` (Q), ``"dyn_matrix"`` ([A|b]), ``"regime_cov"``
        (Sigma_k), ``"regime_mean"`` (mu_k), ``"k_init"`` (k0), ``"k"`` (regime inside the
        scan, or the iid regime of a GMM), ``"z_init"`` (z0), ``"z"`` (state inside the scan,
        or the iid state of a GMM), ``"obs"``, or ``"other"`` (sites the conjugate model does
        not touch, e.g. network weights registered with ``numpyro.param``).
    kind : str
        ``"latent"`` (sample site without ``obs``), ``"observed"``, ``"param"``
        (``numpyro.param``) or ``"deterministic"``.
    shape : tuple of int
        Shape of the site's value as it appears in the trace (scan sites carry the leading
        time axis of length ``T - 1``).
    batch_shape, event_shape : tuple of int
        Of the site's distribution (empty for params).
    dist : str
        Class name of the distribution (``"Dirichlet"``, ``"InverseWishart"``...), ``""`` for
        params.
    plates : tuple of (str, int, int)
        ``(name, size, dim)`` of each plate the site sits in (``size`` = subsample size).
    in_scan : bool
        True for sites sampled inside ``numpyro.contrib.control_flow.scan``.
    """

    name: str
    role: str
    kind: str
    shape: tuple
    batch_shape: tuple = ()
    event_shape: tuple = ()
    dist: str = ""
    plates: tuple = ()
    in_scan: bool = False


@dataclass(frozen=True, eq=False)
class DirichletBlock:
    """A Dirichlet global: initial-regime probabilities or transition rows.

    Attributes
    ----------
    role : str
        ``"pi0"`` (initial / mixture weights, shape ``[K]``) or ``"P"`` (transition matrix,
        rows under the regimes plate, shape ``[K, K]``).
    site : str or None
        Site name; None when the value is a plain constant of the model.
    kind : str
        ``"latent"`` (Dirichlet sample site: gets a variational factor), ``"param"``
        (``numpyro.param`` point estimate) or ``"constant"``.
    alpha : numpy.ndarray or None
        Prior concentration, ``[K]`` or ``[K, K]`` (row i = prior of P[i]); None unless
        ``kind == "latent"``.
    value : numpy.ndarray
        The value seen in the discovery trace (a prior draw for latent sites, the init value
        for params, the constant itself for constants), ``[K]`` or ``[K, K]``.
    """

    role: str
    site: str | None
    kind: str
    alpha: np.ndarray | None
    value: np.ndarray


@dataclass(frozen=True, eq=False)
class NIWBlock:
    """A normal-inverse-Wishart pair ``Sigma ~ IW(nu, S)``, ``mu | Sigma ~ N(m, Sigma / lam)``.

    Used for the initial state of an SLDS / LDS (``role="init"``, S0 and m0, no batch axis)
    and for the per-regime Gaussians of an HMM / GMM (``role="regime"``, leading ``[K]``).

    Attributes
    ----------
    role : str
        ``"init"`` or ``"regime"``.
    cov_site, mean_site : str or None
        Site names of Sigma (InverseWishart) and mu (MultivariateNormal); None for constants.
    kind : str
        ``"latent"``, ``"param"`` or ``"constant"`` (shared by both sites).
    S : numpy.ndarray or None
        Prior inverse-Wishart scale, ``[D, D]`` (init) or ``[K, D, D]`` (regime).
    nu : numpy.ndarray or None
        Prior degrees of freedom, ``[]`` or ``[K]``.
    m : numpy.ndarray or None
        Prior mean of mu, ``[D]`` or ``[K, D]``.
    lam : numpy.ndarray or None
        Prior precision scaling of mu (cov(mu | Sigma) = Sigma / lam), ``[]`` or ``[K]``.
        ``S, nu, m, lam`` match ``expfam.niw.NIWStandard`` and are None unless latent.
    cov_value, mean_value : numpy.ndarray
        Values in the discovery trace, ``[..., D, D]`` and ``[..., D]``.
    """

    role: str
    cov_site: str | None
    mean_site: str | None
    kind: str
    S: np.ndarray | None
    nu: np.ndarray | None
    m: np.ndarray | None
    lam: np.ndarray | None
    cov_value: np.ndarray
    mean_value: np.ndarray


@dataclass(frozen=True, eq=False)
class MNIWBlock:
    """Matrix-normal-inverse-Wishart dynamics ``Q_k ~ IW(nu, S)``, ``[A_k|b_k] ~ MN(M, Q_k, V^-1)``.

    ``vec`` convention of ``expfam.mniw``: the rows of ``[A|b]`` have covariance ``Q`` and its
    columns covariance ``V^-1`` (``V`` is the column *precision*, ``[Din, Din]``).
    Arrays always carry a leading regime axis ``[K]`` (``K = 1`` for an LDS), even when the
    model's sites have none (then ``matrix_shape`` / the site shapes say so).

    Attributes
    ----------
    cov_site, matrix_site : str or None
        Site names of Q (InverseWishart) and [A|b] (MatrixNormal); None for constants.
    kind : str
        ``"latent"``, ``"param"`` or ``"constant"``.
    bias : bool
        True when the matrix is ``[A | b]`` (``Din = D + 1``, bias in the last column).
    S : numpy.ndarray or None
        Prior IW scale ``[K, D, D]``.
    nu : numpy.ndarray or None
        Prior degrees of freedom ``[K]``.
    M : numpy.ndarray or None
        Prior mean of ``[A|b]``, ``[K, D, Din]``.
    V : numpy.ndarray or None
        Prior column precision ``[K, Din, Din]`` (inverse of ``scale_tril_column @ .T``).
        ``S, nu, M, V`` match ``expfam.mniw.MNIWStandard``; None unless latent.
    cov_value : numpy.ndarray
        Q in the discovery trace, ``[K, D, D]``.
    matrix_value : numpy.ndarray
        [A|b] in the discovery trace, ``[K, D, Din]``.
    """

    cov_site: str | None
    matrix_site: str | None
    kind: str
    bias: bool
    S: np.ndarray | None
    nu: np.ndarray | None
    M: np.ndarray | None
    V: np.ndarray | None
    cov_value: np.ndarray
    matrix_value: np.ndarray


@dataclass(frozen=True, eq=False)
class ObservationSite:
    """The observed site fed by a network of the continuous latents.

    Attributes
    ----------
    name : str
        Site name.
    shape : tuple of int
        Value shape, e.g. ``[N, T, Dx]`` (or ``[T, N, Dx]``, see ``time_axis``).
    batch_shape, event_shape : tuple of int
        Of the emission distribution (e.g. ``()`` and ``(N, T, Dx)`` for
        ``Normal(...).to_event(3)``).
    event_dim : int
        ``len(event_shape)``.
    latent_inputs : tuple of str
        The continuous-latent sites whose values feed the emission (e.g. ``("z0", "z")``).
    param_inputs : tuple of str
        ``numpyro.param`` sites feeding the emission (decoder weights...).
    mask : numpy.ndarray or None
        Boolean observation mask (``handlers.mask`` / ``dist.mask`` / ``obs_mask``),
        broadcastable to the batch shape, or None.
    has_value : bool
        True when the model was traced with data (``obs`` not None).
    """

    name: str
    shape: tuple
    batch_shape: tuple
    event_shape: tuple
    event_dim: int
    latent_inputs: tuple
    param_inputs: tuple = ()
    mask: np.ndarray | None = None
    has_value: bool = True


@dataclass(frozen=True, eq=False)
class ConjugateStructure:
    """What :func:`discover_structure` found in a NumPyro model.

    Attributes
    ----------
    family : str
        ``"slds"``, ``"lds"``, ``"hmm"`` (Gaussian latents iid given a Markov regime) or
        ``"gmm"`` (iid regime and Gaussian latent per data point).
    N : int
        Size of the sequences plate (full data size, for the ``N / batch`` ELBO scaling).
    subsample_size : int
        Subsample size of the sequences plate (``== N`` without subsampling).
    T : int
        Number of time steps of the continuous chain (``1 + scan length``; 1 for a GMM).
    K : int
        Number of regimes (1 for an LDS).
    D : int
        Latent state dimension.
    bias : bool
        Whether the dynamics have an affine term (``[A|b]``, ``Din = D + 1``).
    leading_regime : bool
        True when the regime chain has ``T`` variables and the first one (``k0``) has no
        continuous effect (the step that samples ``k_t`` uses it for ``z_t``). False for the
        paper convention (one regime per transition, ``T - 1`` variables); a model written
        with the regime of the *previous* step driving the transition is reported as False
        and ``dangling_regime`` True. False for lds/hmm/gmm.
    dangling_regime : bool
        True when the last regime sampled in the scan drives nothing (lag-one form): its
        posterior equals its prior ``P[k_{T-1}]`` row and the guide samples it from there.
    sequence_plate : str
        Name of the plate over sequences / data points.
    regime_plate : str or None
        Name of the plate over regimes (None for an LDS written without it).
    scan_length : int
        Length of the scan (``T - 1``; 0 when there is no scan).
    time_axis : int
        Axis of the time dimension in scan sites' values (always 0: numpyro stacks it first).
    pi0 : DirichletBlock or None
        Initial-regime (slds/hmm) or mixture-weight (gmm) probabilities.
    P : DirichletBlock or None
        Transition matrix (slds/hmm).
    init_state : NIWBlock or None
        Prior of the first continuous state (slds/lds).
    dynamics : MNIWBlock or None
        Per-regime linear-Gaussian dynamics (slds/lds).
    regime_gaussians : NIWBlock or None
        Per-regime Gaussians of an hmm / gmm.
    k_init_site, k_site : str or None
        The first regime (outside the scan) and the regime sampled inside the scan; for a
        gmm ``k_site`` is the iid regime and ``k_init_site`` is None.
    z_init_site, z_site : str or None
        The first continuous state and the one sampled inside the scan; for a gmm
        ``z_site`` is the iid state and ``z_init_site`` is None.
    obs : ObservationSite
        The observed site.
    sites : dict
        ``name -> SiteInfo`` for every sample / param site, in trace order.
    dependencies : dict
        ``site -> {parameter: frozenset of site names}``: the exact dependencies of each
        sample site's distribution parameters (``"loc"``, ``"cov"`` for MultivariateNormal,
        ``"probs"`` for Categorical, ``"concentration"``, ``"df"``/``"scale"``, ``"loc"``/
        ``"scale_tril_row"``/``"scale_tril_column"``, ``"all"`` for other distributions). For
        sites inside the scan the previous step's carried values appear as ``"<site>_prev"``
        (e.g. ``{"loc": {"z_prev", "Ab", "k"}, "cov": {"Q", "k"}}``).
    """

    family: str
    N: int
    subsample_size: int
    T: int
    K: int
    D: int
    bias: bool
    leading_regime: bool
    dangling_regime: bool
    sequence_plate: str
    regime_plate: str | None
    scan_length: int
    time_axis: int
    pi0: DirichletBlock | None
    P: DirichletBlock | None
    init_state: NIWBlock | None
    dynamics: MNIWBlock | None
    regime_gaussians: NIWBlock | None
    k_init_site: str | None
    k_site: str | None
    z_init_site: str | None
    z_site: str | None
    obs: ObservationSite
    sites: dict = field(default_factory=dict)
    dependencies: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ derived views
    @property
    def latent_sites(self) -> tuple:
        """Names of the latent sample sites (the sites the guide must mirror), trace order."""
        return tuple(n for n, s in self.sites.items() if s.kind == "latent")

    @property
    def Din(self) -> int:
        """Number of regression inputs of the dynamics (``D + 1`` with bias, ``D`` without)."""
        return self.D + 1 if self.bias else self.D

    def blocks(self) -> list:
        """Rows ``(block, kind, sites, shapes)`` of the printable summary, one per block."""
        rows = []

        def shape_of(name):
            return list(self.sites[name].shape) if name in self.sites else None

        def add(label, kind, names):
            names = [n for n in names if n is not None]
            shapes = ", ".join(f"{n}{shape_of(n)}" for n in names) if names else "(constant)"
            rows.append((label, kind, shapes))

        if self.pi0 is not None:
            label = "Dirichlet weights" if self.family == "gmm" else "Dirichlet initial regime"
            add(label, self.pi0.kind, [self.pi0.site])
        if self.P is not None:
            add("Dirichlet transition rows", self.P.kind, [self.P.site])
        if self.init_state is not None:
            b = self.init_state
            add("NIW initial state", b.kind, [b.cov_site, b.mean_site])
        if self.dynamics is not None:
            b = self.dynamics
            label = "MNIW dynamics [A|b]" if b.bias else "MNIW dynamics A"
            add(label, b.kind, [b.cov_site, b.matrix_site])
        if self.regime_gaussians is not None:
            b = self.regime_gaussians
            add("NIW regime Gaussians", b.kind, [b.cov_site, b.mean_site])
        if self.k_site is not None:
            label = "regime (iid)" if self.family == "gmm" else "regime chain (HMM)"
            add(label, "local", [self.k_init_site, self.k_site])
        if self.z_site is not None:
            label = {"gmm": "state (iid Gaussian)", "hmm": "state (Gaussian given regime)"}.get(
                self.family, "state chain (LDS)"
            )
            add(label, "local", [self.z_init_site, self.z_site])
        add("observation", "observed", [self.obs.name])
        return rows

    def summary(self) -> str:
        """A printable table: one row per conjugate block with its site names and shapes."""
        head = (
            f"ConjugateStructure(family={self.family!r}, N={self.N}, batch={self.subsample_size}, "
            f"T={self.T}, K={self.K}, D={self.D}, bias={self.bias}, "
            f"leading_regime={self.leading_regime})"
        )
        rows = [("block", "kind", "sites")] + self.blocks()
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        lines = [head] + [f"  {a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# ====================================================================== discovery machinery


def _fail(site, reason: str, hint: str):
    """Raise the uniform discovery error: site, reason, fix."""
    where = f"site {site!r}: " if site is not None else ""
    raise ValueError(f"discover_structure: {where}{reason}. Fix: {hint}")


def _unwrap(fn):
    """Strip Independent / Masked / Expanded wrappers; return (base distribution, mask)."""
    mask = None
    while True:
        if isinstance(fn, dist.MaskedDistribution):
            m = fn._mask
            if m is not True and m is not None:
                mask = m if mask is None else mask & m
            fn = fn.base_dist
        elif isinstance(fn, (dist.Independent, dist.ExpandedDistribution)):
            fn = fn.base_dist
        else:
            return fn, mask


_CATEGORICAL = (dist.CategoricalProbs, dist.CategoricalLogits)


def _family_of(fn) -> str:
    """Short name of a distribution kind the detector knows, else the class name."""
    base, _ = _unwrap(fn)
    if isinstance(base, dist.Dirichlet):
        return "Dirichlet"
    if isinstance(base, dist.InverseWishart):
        return "InverseWishart"
    if isinstance(base, dist.MatrixNormal):
        return "MatrixNormal"
    if isinstance(base, dist.MultivariateNormal):
        return "MultivariateNormal"
    if isinstance(base, _CATEGORICAL):
        return "Categorical"
    return type(base).__name__


def _param_arrays(fn) -> dict:
    """Named parameter arrays of a (wrapped) distribution, for provenance tracking."""
    base, _ = _unwrap(fn)
    if isinstance(base, dist.Dirichlet):
        names = ("concentration",)
    elif isinstance(base, dist.InverseWishart):
        return {"df": jnp.asarray(base.concentration), "scale": jnp.asarray(base.scale_tril)}
    elif isinstance(base, dist.MatrixNormal):
        names = ("loc", "scale_tril_row", "scale_tril_column")
    elif isinstance(base, dist.MultivariateNormal):
        return {"loc": jnp.asarray(base.loc), "cov": jnp.asarray(base.scale_tril)}
    elif isinstance(base, dist.CategoricalProbs):
        return {"probs": jnp.asarray(base.probs)}
    elif isinstance(base, dist.CategoricalLogits):
        return {"probs": jnp.asarray(base.logits)}
    else:
        leaves = [jnp.asarray(x) for x in jax.tree.leaves(fn) if hasattr(x, "shape")]
        return {"all": leaves}
    return {n: jnp.asarray(getattr(base, n)) for n in names}


def _union(tree) -> frozenset:
    """Union of the provenance frozensets in a pytree."""
    out = frozenset()
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, frozenset)):
        out = out | leaf
    return out


class _ScanRecorder(Messenger):
    """Records ``scan`` messages and runs them as a Python loop (no XLA compile of the body).

    The loop reproduces ``numpyro.contrib.control_flow.scan_wrapper`` (a key split per step, the
    ``substitute`` stack applied per step, values stacked on a leading time axis, batch shapes
    promoted); if anything unexpected happens it leaves the message to numpyro's own scan.
    """

    def __init__(self):
        super().__init__(None)
        self.scans = []

    def process_message(self, msg):
        if msg["type"] != "control_flow" or msg["value"] is not None:
            return
        try:
            msg["value"] = self._python_scan(*msg["args"], **msg["kwargs"])
        except Exception:  # noqa: BLE001 - fall back to numpyro's lax.scan implementation
            msg["value"] = None

    @staticmethod
    def _python_scan(f, init, xs, length, reverse, rng_key=None, substitute_stack=(),
                     enum=False, history=1, **_):
        from numpyro.contrib.control_flow.scan import (
            _promote_scanned_value_shapes,
            _subs_wrapper,
        )
        from numpyro.distributions.batch_util import promote_batch_shape

        if enum or reverse or any(t != "substitute" for t, _ in substitute_stack):
            raise NotImplementedError
        if length is None:
            length = int(jnp.shape(jax.tree.leaves(xs)[0])[0])
        carry, leaves, ys, treedef = init, [], [], None
        for i in range(length):
            subkey = None
            if rng_key is not None:
                rng_key, subkey = jax.random.split(rng_key)
            x = jax.tree.map(lambda a: a[i], xs)
            with handlers.block():
                fn = handlers.seed(f, subkey) if subkey is not None else f
                for _, subs_map in substitute_stack:
                    fn = handlers.substitute(
                        fn, substitute_fn=partial(_subs_wrapper, subs_map, i, length)
                    )
                with handlers.trace() as tr:
                    carry, y = fn(carry, x)
            lv, treedef_i = jax.tree.flatten(PytreeTrace(tr))
            treedef = treedef_i if treedef is None else treedef
            leaves.append(lv)
            ys.append(y)
        stacked = jax.tree.unflatten(treedef, [jnp.stack(ls) for ls in zip(*leaves, strict=True)])
        ys = jax.tree.map(lambda *a: jnp.stack(a), *ys)
        for site in stacked.trace.values():
            if site["type"] == "sample":
                site["fn"] = promote_batch_shape(site["fn"])
                site["value"] = _promote_scanned_value_shapes(site["value"], site["fn"])
        return (length, rng_key, carry), (stacked, ys)

    def postprocess_message(self, msg):
        if msg["type"] == "control_flow":
            self.scans.append(msg)


class _GenericValues:
    """Cheap generic values for latent sites (a substitute_fn; no prior sampler is run).

    Like ``init_to_uniform`` but drawn with numpy (no XLA program per shape): Categorical
    sites get uniform integers, simplex sites normalised uniforms, positive-definite sites
    ``X X' + I``, real sites ``Uniform(-2, 2)``; other supports fall back to
    ``biject_to(support)(u)`` in JAX. This avoids compiling the Gamma / Wishart samplers (tens
    of seconds on a loaded CPU) and gives generic values for the numeric checks of
    :func:`discover_structure`.
    """

    def __init__(self, rng_key):
        data = np.asarray(jax.random.key_data(rng_key)).astype(np.uint64).ravel()
        self.rng = np.random.default_rng([int(x) for x in data])
        self.dtype = np.dtype(jnp.result_type(float))

    def __call__(self, site):
        if site["type"] != "sample" or site["is_observed"] or site["value"] is not None:
            return None
        fn = site["fn"]
        shape = tuple(site["kwargs"].get("sample_shape", ())) + tuple(fn.shape())
        base = _unwrap(fn)[0]
        sup = fn.support
        while isinstance(sup, constraints.independent):
            sup = sup.base_constraint
        if isinstance(base, _CATEGORICAL):
            K = jnp.shape(base.probs if isinstance(base, dist.CategoricalProbs)
                          else base.logits)[-1]
            return self.rng.integers(0, K, shape).astype(np.int32)
        if sup is constraints.simplex:
            g = self.rng.uniform(0.5, 1.5, shape)
            return (g / g.sum(-1, keepdims=True)).astype(self.dtype)
        if sup is constraints.positive_definite:
            X = 0.5 * self.rng.normal(size=shape)
            return (X @ np.swapaxes(X, -1, -2) + np.eye(shape[-1])).astype(self.dtype)
        if sup in (constraints.real, constraints.real_vector, constraints.real_matrix):
            return self.rng.uniform(-2.0, 2.0, shape).astype(self.dtype)
        if sup is constraints.positive:
            return self.rng.uniform(0.5, 2.0, shape).astype(self.dtype)
        if sup.is_discrete:
            return None
        key = numpyro.prng_key()
        if key is None:
            return None
        t = biject_to(fn.support)
        return t(jax.random.uniform(key, t.inverse_shape(shape), minval=-2.0, maxval=2.0))


class _DepsRecorder(Messenger):
    """Records site parameters; replaces ``scan`` by ONE body step on placeholder inputs."""

    def __init__(self, vals, scan_defs):
        super().__init__(None)
        self.vals = vals
        self.scan_defs = scan_defs
        self.params = {}
        self.body = None

    def process_message(self, msg):
        if msg["type"] != "control_flow" or self.scan_defs is None:
            return
        f, init, xs, length, _ = msg["args"]
        d = self.scan_defs
        v = self.vals
        carry = jax.tree.unflatten(d["init"], [v[f"__carry_in_{i}"] for i in range(d["n_init"])])
        x0 = jax.tree.unflatten(d["xs"], [v[f"__x_{i}"] for i in range(d["n_xs"])])
        init_leaves = [jnp.asarray(x) for x in jax.tree.leaves(init)]
        new_carry, y = f(carry, x0)
        self.body = {
            "init": init_leaves,
            "carry_out": [jnp.asarray(x) for x in jax.tree.leaves(new_carry)],
            "y": [jnp.asarray(x) for x in jax.tree.leaves(y)],
        }
        carry_out = jax.tree.unflatten(
            d["carry_out"], [v[f"__carry_out_{i}"] for i in range(d["n_carry_out"])]
        )
        ys = jax.tree.unflatten(d["ys"], [v[f"__ys_{i}"] for i in range(d["n_ys"])])
        msg["value"] = ((length, None, carry_out), (PytreeTrace({}), ys))

    def postprocess_message(self, msg):
        if msg["type"] == "sample":
            self.params[msg["name"]] = _param_arrays(msg["fn"])


def _plate_in_traceback(exc) -> str | None:
    tb = exc.__traceback__
    name = None
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        if isinstance(obj, numpyro.plate):
            name = obj.name
        tb = tb.tb_next
    return name


def _close(a, b, rtol=1e-3) -> bool:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        try:
            a, b = np.broadcast_arrays(a, b)
        except ValueError:
            return False
    scale = max(1.0, float(np.max(np.abs(b))) if b.size else 1.0)
    return bool(np.allclose(a, b, rtol=rtol, atol=rtol * scale))


def _cov(base) -> np.ndarray:
    L = np.asarray(base.scale_tril, dtype=np.float64)
    return L @ np.swapaxes(L, -1, -2)


def _col_precision(L) -> np.ndarray:
    """``(L L')^-1`` from a lower Cholesky factor, by triangular solves."""
    L = np.asarray(L, dtype=np.float64)
    eye = np.broadcast_to(np.eye(L.shape[-1]), L.shape)
    Linv = np.linalg.solve(L, eye)
    return np.swapaxes(Linv, -1, -2) @ Linv


_HINT_DYN_MATRIX = (
    "give the dynamics matrix a MatrixNormal prior tied to the InverseWishart noise of the same "
    "regime: Ab = numpyro.sample('Ab', dist.MatrixNormal(M0, jnp.linalg.cholesky(Q), V0)) "
    "(or make it a numpyro.param point estimate)"
)
_HINT_COV = (
    "give covariances an InverseWishart prior: Q = numpyro.sample('Q', "
    "dist.InverseWishart(df, scale)) and use it as the MultivariateNormal covariance "
    "(or make it a numpyro.param point estimate)"
)
_HINT_DIRICHLET = (
    "draw the regime probabilities from a Dirichlet site and index it directly: "
    "P = numpyro.sample('P', dist.Dirichlet(alpha)) under the regimes plate and "
    "dist.Categorical(P[k_prev]) (or make P a numpyro.param / a constant)"
)


class _Discovery:
    """State of one discovery run; see :func:`discover_structure`."""

    def __init__(self, model, args, kwargs, rng_key):
        self.model, self.args, self.kwargs, self.rng_key = model, args, kwargs, rng_key

    # -------------------------------------------------------------- tracing passes
    def trace_concrete(self):
        rec = _ScanRecorder()
        try:
            with rec, handlers.trace() as tr, handlers.seed(rng_seed=self.rng_key), \
                    handlers.substitute(substitute_fn=_GenericValues(self.rng_key)):
                self.model(*self.args, **self.kwargs)
        except NotImplementedError as e:
            if "under a `plate`" not in str(e):
                raise
            plate = _plate_in_traceback(e)
            raise ValueError(
                f"discover_structure: plate {plate!r} encloses the scan: numpyro cannot align "
                "the time axis of the scanned sites. Fix: open the plate inside the scan body "
                "(`with numpyro.plate(...)` inside the step function)"
            ) from e
        self.tr = tr
        self.plate_sizes = {
            n: int(m["args"][0]) for n, m in tr.items() if m["type"] == "plate"
        }
        self.scan = None
        self.scan_names = ()
        if len(rec.scans) > 1:
            _fail(None, f"found {len(rec.scans)} scans, one (the state chain) is supported",
                  "sample all per-step sites in one scan body")
        if rec.scans:
            m = rec.scans[0]
            f, init, xs, length, reverse = m["args"]
            if reverse:
                _fail(None, "the scan runs in reverse", "scan forward in time")
            (_, _, carry_out), (ptrace, ys) = m["value"]
            if length is None:
                length = int(jnp.shape(jax.tree.leaves(xs)[0])[0])
            self.scan = dict(f=f, init=init, xs=xs, length=int(length),
                             carry_out=carry_out, ys=ys)
            self.scan_names = tuple(
                n for n, s in ptrace.trace.items() if s["type"] in ("sample", "param")
            )
        self.sites = {}
        for name, msg in tr.items():
            if msg["type"] == "sample":
                kind = "observed" if msg["is_observed"] else "latent"
            elif msg["type"] == "param":
                kind = "param"
            elif msg["type"] == "deterministic":
                kind = "deterministic"
            else:
                continue
            self.sites[name] = dict(msg=msg, kind=kind, in_scan=name in self.scan_names,
                                    fam=_family_of(msg["fn"]) if msg["type"] == "sample" else "")

    def trace_provenance(self):
        vals = {}
        for name, s in self.sites.items():
            v = s["msg"]["value"]
            if s["kind"] == "param":
                vals[name] = v
            elif s["kind"] == "latent":
                vals[name] = jnp.asarray(v)[0] if s["in_scan"] else jnp.asarray(v)
        plate_vals = {
            n: m["value"] for n, m in self.tr.items()
            if m["type"] == "plate" and m["value"] is not None
        }
        scan_defs = None
        if self.scan is not None:
            sc = self.scan
            init_l, init_d = jax.tree.flatten(sc["init"])
            xs_l, xs_d = jax.tree.flatten(sc["xs"])
            co_l, co_d = jax.tree.flatten(sc["carry_out"])
            ys_l, ys_d = jax.tree.flatten(sc["ys"])
            scan_defs = dict(init=init_d, xs=xs_d, carry_out=co_d, ys=ys_d, n_init=len(init_l),
                             n_xs=len(xs_l), n_carry_out=len(co_l), n_ys=len(ys_l))
            for i, x in enumerate(init_l):
                vals[f"__carry_in_{i}"] = jnp.asarray(x)
            for i, x in enumerate(xs_l):
                vals[f"__x_{i}"] = jnp.asarray(x)[0]
            for i, x in enumerate(co_l):
                vals[f"__carry_out_{i}"] = jnp.asarray(x)
            for i, x in enumerate(ys_l):
                vals[f"__ys_{i}"] = jnp.asarray(x)

        def run(**v):
            rec = _DepsRecorder(v, scan_defs)
            with handlers.seed(rng_seed=0), handlers.substitute(data=plate_vals), \
                    handlers.substitute(data=v), rec:
                self.model(*self.args, **self.kwargs)
            return {"params": rec.params, "body": rec.body}

        try:
            prov = eval_provenance(run, **vals)
        except jax.errors.JAXTypeError as e:
            raise ValueError(
                "discover_structure: the model could not be traced by jax.make_jaxpr "
                f"({type(e).__name__}: the model branches in Python on a sampled value). Fix: "
                "use jnp.where / lax.cond, the SVI step is compiled with jax.jit anyway"
            ) from e
        self.raw = {n: {p: _union(d) for p, d in ps.items()} for n, ps in prov["params"].items()}
        body = prov["body"]
        if body is not None:
            self.body_init = [_union(x) for x in body["init"]]
            self.body_carry_out = [_union(x) for x in body["carry_out"]]
            self.body_y = [_union(x) for x in body["y"]]

    # -------------------------------------------------------------- dependency helpers
    def expand(self, deps, seen=None) -> frozenset:
        """Replace scan placeholders by the sites they stand for."""
        seen = set() if seen is None else seen
        out = set()
        for n in deps:
            if not n.startswith("__"):
                out.add(n)
                continue
            if n in seen:
                continue
            seen.add(n)
            kind, i = n[2:].rsplit("_", 1)
            i = int(i)
            if kind == "ys":
                out |= self.expand(self.body_y[i], seen)
            elif kind == "carry_out":
                out |= self.expand(self.body_carry_out[i], seen)
            elif kind == "carry_in":
                out |= self.expand(self.body_init[i], seen)
                out |= self.expand(self.body_carry_out[i], seen)
        return frozenset(out)

    def deps(self, name, *params) -> frozenset:
        """Raw dependencies (site names and scan placeholders) of some parameters of a site."""
        d = self.raw[name]
        keys = params or tuple(d)
        out = frozenset()
        for k in keys:
            out = out | d.get(k, frozenset())
        return out

    def kind(self, name) -> str:
        return self.sites[name]["kind"] if name in self.sites else "placeholder"

    def fam(self, name) -> str:
        return self.sites[name]["fam"] if name in self.sites else ""

    def base(self, name):
        return _unwrap(self.sites[name]["msg"]["fn"])[0]

    def value(self, name) -> np.ndarray:
        return np.asarray(self.sites[name]["msg"]["value"])

    def consumers(self, name) -> list:
        return [n for n in self.raw if name in self.expand(self.deps(n))]

    def require_direct_param(self, name, read, consumer, constraint):
        """A point-estimate global must be used as is: its value IS the block value."""
        val = self.value(name)
        read = np.asarray(read)
        if val.size != read.size or not _close(val.reshape(read.shape), read):
            _fail(name, f"this numpyro.param is not used as is by {consumer!r} (the value the "
                  "model uses differs from the param)",
                  f"declare the param in its final form, numpyro.param({name!r}, init, "
                  f"constraint=constraints.{constraint}), and index it directly")

    def require_constant_hypers(self, name, params):
        bad = self.deps(name, *params)
        if bad:
            _fail(name, f"its prior hyper-parameters {list(params)} depend on {sorted(bad)}",
                  "use constant hyper-parameters (empirical-Bayes priors are not supported); "
                  "the only allowed tie is the covariance/row scale to its InverseWishart site")

    # -------------------------------------------------------------- block readers
    def split_globals(self, deps, consumer, what):
        """Split global dependencies into (latent sites, param sites); reject the rest."""
        lat, par = [], []
        for n in sorted(deps):
            k = self.kind(n)
            if k == "latent":
                lat.append(n)
            elif k == "param":
                par.append(n)
            elif n.startswith("__x_"):
                _fail(consumer, f"its {what} depends on the scanned inputs xs",
                      "time-varying (input-driven) dynamics are not supported; scan over None")
            else:
                _fail(consumer, f"its {what} depends on {n!r}", "remove that dependency")
        return lat, par

    def dirichlet_block(self, role, consumer, deps, read_value, shape) -> DirichletBlock:
        """Block of a Categorical's probabilities (deps: global deps of its probs)."""
        lat, par = self.split_globals(deps, consumer, "probabilities")
        for n in lat:
            if self.fam(n) != "Dirichlet":
                _fail(consumer, f"its probabilities come from {n!r} ({self.fam(n)}), "
                      "not from a Dirichlet site", _HINT_DIRICHLET)
        if len(lat) > 1 or (lat and par):
            _fail(consumer, f"its probabilities depend on several globals {lat + par}",
                  _HINT_DIRICHLET)
        if lat:
            site = lat[0]
            val = self.value(site)
            if val.shape != shape:
                _fail(site, f"the Dirichlet value has shape {list(val.shape)}, expected "
                      f"{list(shape)}", "put the transition rows under the regimes plate "
                      "(batch [K], event [K])")
            if not _close(read_value, val):
                _fail(consumer, f"its probabilities are not the rows of the Dirichlet site "
                      f"{site!r} (read {np.round(read_value, 4).tolist()})", _HINT_DIRICHLET)
            self.require_constant_hypers(site, ("concentration",))
            alpha = np.broadcast_to(np.asarray(self.base(site).concentration), shape).copy()
            return DirichletBlock(role, site, "latent", alpha, val)
        if par:
            self.require_direct_param(par[0], read_value, consumer, "simplex")
            return DirichletBlock(role, par[0], "param", None, np.asarray(read_value))
        return DirichletBlock(role, None, "constant", None, np.asarray(read_value))

    def niw_block(self, role, consumer, loc_deps, cov_deps, mean_val, cov_val, batch):
        """NIW block of a Gaussian's (mean, covariance) read as (mean_val, cov_val)."""
        mlat, mpar = self.split_globals(loc_deps, consumer, "mean")
        clat, cpar = self.split_globals(cov_deps, consumer, "covariance")
        for n in clat:
            if self.fam(n) != "InverseWishart":
                _fail(n, f"its {self.fam(n)} prior sets the covariance of {consumer!r}, which "
                      "is not conjugate", _HINT_COV)
        for n in mlat:
            if self.fam(n) != "MultivariateNormal":
                _fail(n, f"its {self.fam(n)} prior sets the mean of {consumer!r}, which is not "
                      "conjugate", "use mu = numpyro.sample('mu', dist.MultivariateNormal(m, "
                      "Sigma / lam)) tied to the InverseWishart Sigma")
        if len(mlat) > 1 or len(clat) > 1:
            _fail(consumer, f"its mean/covariance depend on several latents {mlat + clat}",
                  "use one mean site and one covariance site")
        if bool(mlat) != bool(clat):
            _fail(consumer, "only one of its mean and covariance has a prior "
                  f"(mean: {mlat or mpar or 'constant'}, covariance: {clat or cpar or 'constant'})",
                  "give both a normal-inverse-Wishart prior, or make both numpyro.param / "
                  "constants")
        if not mlat:
            kind = "param" if (mpar or cpar) else "constant"
            if len(mpar) > 1 or len(cpar) > 1:
                _fail(consumer, f"its mean/covariance combine several params {mpar + cpar}",
                      "use one param for the mean and one for the covariance")
            if mpar:
                self.require_direct_param(mpar[0], mean_val, consumer, "real")
            if cpar:
                self.require_direct_param(cpar[0], cov_val, consumer, "positive_definite")
            return NIWBlock(role, cpar[0] if cpar else None, mpar[0] if mpar else None, kind,
                            None, None, None, None, np.asarray(cov_val), np.asarray(mean_val))
        sig, mu = clat[0], mlat[0]
        sig_val, mu_val = self.value(sig), self.value(mu)
        D = mean_val.shape[-1]
        if sig_val.shape != batch + (D, D) or mu_val.shape != batch + (D,):
            _fail(mu, f"shapes {list(mu_val.shape)} / {sig!r} {list(sig_val.shape)} do not match "
                  f"the expected {list(batch + (D,))} / {list(batch + (D, D))}",
                  "one mean / covariance per regime under the regimes plate")
        if not (_close(mean_val, mu_val) and _close(cov_val, sig_val)):
            _fail(consumer, f"its mean/covariance are not the values of {mu!r} / {sig!r}",
                  "pass the sampled mean and covariance (indexed by the regime) unchanged")
        self.require_constant_hypers(sig, ("df", "scale"))
        self.require_constant_hypers(mu, ("loc",))
        if self.deps(mu, "cov") != {sig}:
            _fail(mu, f"its covariance depends on {sorted(self.deps(mu, 'cov'))}, not only on "
                  f"the InverseWishart site {sig!r}", "use dist.MultivariateNormal(m, Sigma / lam)")
        cov_mu = _cov(self.base(mu))
        cov_mu = np.broadcast_to(cov_mu, sig_val.shape)
        lam = sig_val[..., 0, 0] / cov_mu[..., 0, 0]
        if not _close(lam[..., None, None] * cov_mu, sig_val):
            _fail(mu, f"its covariance is not a scalar multiple Sigma / lam of {sig!r}",
                  "use dist.MultivariateNormal(m, Sigma / lam) with a constant scalar lam")
        iw = self.base(sig)
        nu = np.broadcast_to(np.asarray(iw.concentration), batch).copy()
        S = np.broadcast_to(_cov(iw), batch + (D, D)).copy()
        m = np.broadcast_to(np.asarray(self.base(mu).loc), batch + (D,)).copy()
        self._roles[sig] = "init_cov" if role == "init" else "regime_cov"
        self._roles[mu] = "init_mean" if role == "init" else "regime_mean"
        return NIWBlock(role, sig, mu, "latent", S, nu, m, np.asarray(lam), sig_val, mu_val)

    def mniw_block(self, z, loc_deps, cov_deps, A, b, Q, K) -> MNIWBlock:
        """MNIW block of the dynamics of ``z`` read as ``A [K,D,D], b [K,D], Q [K,D,D]``."""
        D = A.shape[-1]
        mlat, mpar = self.split_globals(loc_deps, z, "mean")
        clat, cpar = self.split_globals(cov_deps, z, "covariance")
        for n in clat:
            if self.fam(n) != "InverseWishart":
                _fail(n, f"its {self.fam(n)} prior sets the noise covariance of {z!r}, which is "
                      "not conjugate", _HINT_COV)
        for n in mlat:
            if self.fam(n) != "MatrixNormal":
                _fail(n, f"its {self.fam(n)} prior on a dynamics parameter (it feeds the mean of "
                      f"{z!r}) is not conjugate", _HINT_DYN_MATRIX)
        if len(mlat) > 1 or len(clat) > 1:
            _fail(z, f"its dynamics depend on several latents {mlat + clat}",
                  "put A and b in one MatrixNormal site [A | b]")
        if bool(mlat) != bool(clat):
            _fail(z, "only one of the dynamics matrix and the noise covariance has a prior "
                  f"(matrix: {mlat or mpar or 'constant'}, noise: {clat or cpar or 'constant'})",
                  "give [A|b] and Q a matrix-normal-inverse-Wishart prior, or make both "
                  "numpyro.param / constants")
        for n in mpar:
            self._roles[n] = "dyn_matrix"
        for n in cpar:
            self._roles[n] = "dyn_cov"
        if not mlat:
            kind = "param" if (mpar or cpar) else "constant"
            if len(mpar) > 1 or len(cpar) > 1:
                _fail(z, f"its dynamics combine several params {mpar + cpar}",
                      "use one [A | b] param of shape [K, D, D + 1] and one Q param")
            if mpar:
                bias = np.shape(self.value(mpar[0]))[-1] == D + 1
            else:
                bias = not np.allclose(b, 0.0)
            mat = np.concatenate([A, b[..., None]], -1) if bias else A
            if mpar:
                self.require_direct_param(mpar[0], mat, z, "real")
            if cpar:
                self.require_direct_param(cpar[0], Q, z, "positive_definite")
            return MNIWBlock(cpar[0] if cpar else None, mpar[0] if mpar else None, kind, bias,
                             None, None, None, None, Q, mat)
        q, ab = clat[0], mlat[0]
        qv, abv = self.value(q), self.value(ab)
        if abv.shape[-2] != D or abv.shape[-1] not in (D, D + 1):
            _fail(ab, f"the MatrixNormal event shape is {list(abv.shape[-2:])}; expected "
                  f"[D, D + 1] = {[D, D + 1]} (with bias) or [D, D] = {[D, D]}",
                  "sample [A | b] with the bias in the last column")
        if abv.shape[:-2] not in ((K,),) + (((), ) if K == 1 else ()):
            _fail(ab, f"its batch shape is {list(abv.shape[:-2])}; expected [K] = [{K}]",
                  "sample it under the regimes plate of size K")
        if qv.shape[:-2] != abv.shape[:-2]:
            _fail(q, f"its batch shape {list(qv.shape[:-2])} differs from that of {ab!r} "
                  f"{list(abv.shape[:-2])} (a noise covariance shared by all regimes is not a "
                  "product of per-regime MNIW priors)",
                  "sample Q under the regimes plate, one per regime, next to [A | b]")
        bias = abv.shape[-1] == D + 1
        abv = abv.reshape((K,) + abv.shape[-2:])
        qv = np.broadcast_to(qv, (K, D, D))
        b_site = abv[..., D] if bias else np.zeros_like(b)
        if not (_close(A, abv[..., :D]) and _close(b, b_site)):
            err = float(np.max(np.abs(A - abv[..., :D])) + np.max(np.abs(b - b_site)))
            _fail(z, f"its mean is not A_k z_prev + b_k with [A | b] = {ab!r}[k] "
                  f"(largest error {err:.3g})",
                  f"write the mean as {ab}[k, :, :D] @ z_prev + {ab}[k, :, D] (bias in the last "
                  "column) and return the sampled state in the carry")
        if not _close(Q, qv):
            _fail(z, f"its covariance is not {q!r}[k]", "use the InverseWishart sample of the "
                  "regime unchanged as the covariance")
        row = self.deps(ab, "scale_tril_row")
        mn = self.base(ab)
        row_val = np.broadcast_to(np.asarray(mn.scale_tril_row), abv.shape[:-2] + (D, D))
        if row != {q} or not _close(row_val, np.linalg.cholesky(qv)):
            _fail(ab, f"the MatrixNormal row scale is not the Cholesky factor of the "
                  f"InverseWishart sample {q!r} (it depends on {sorted(row) or 'constants'})",
                  f"use dist.MatrixNormal(M0, jnp.linalg.cholesky({q}), V0)")
        self.require_constant_hypers(ab, ("loc", "scale_tril_column"))
        self.require_constant_hypers(q, ("df", "scale"))
        Din = abv.shape[-1]
        M = np.broadcast_to(np.asarray(mn.loc), (K, D, Din)).copy()
        V = np.broadcast_to(_col_precision(mn.scale_tril_column), (K, Din, Din)).copy()
        iw = self.base(q)
        nu = np.broadcast_to(np.asarray(iw.concentration), (K,)).copy()
        S = np.broadcast_to(_cov(iw), (K, D, D)).copy()
        self._roles[q] = "dyn_cov"
        self._roles[ab] = "dyn_matrix"
        return MNIWBlock(q, ab, "latent", bias, S, nu, M, V, qv.copy(), abv)

    # -------------------------------------------------------------- numeric readers
    def run_body(self, leaves, subs):
        sc = self.scan
        carry = jax.tree.unflatten(jax.tree.structure(sc["init"]), leaves)
        x0 = jax.tree.map(lambda a: jnp.asarray(a)[0], sc["xs"])
        with handlers.trace() as btr, handlers.seed(rng_seed=self.rng_key), \
                handlers.substitute(substitute_fn=_GenericValues(self.rng_key)), \
                handlers.substitute(data=subs):
            sc["f"](carry, x0)
        return btr

    def run_model(self, subs):
        data = {n: s["msg"]["value"] for n, s in self.sites.items()
                if s["kind"] in ("latent", "param")}
        data.update({n: m["value"] for n, m in self.tr.items()
                     if m["type"] == "plate" and m["value"] is not None})
        data.update(subs)
        with handlers.trace() as tr, handlers.seed(rng_seed=self.rng_key), \
                handlers.substitute(substitute_fn=_GenericValues(self.rng_key)), \
                handlers.substitute(data=data):
            self.model(*self.args, **self.kwargs)
        return tr

    @staticmethod
    def gaussian_row(fn, D):
        base = _unwrap(fn)[0]
        loc = np.asarray(base.loc, dtype=np.float64).reshape(-1, D)
        cov = _cov(base).reshape(-1, D, D)
        return loc, cov

    @staticmethod
    def probs_rows(fn, K):
        base = _unwrap(fn)[0]
        p = np.asarray(base.probs, dtype=np.float64)
        return p.reshape(-1, K)

    # -------------------------------------------------------------- classification
    def seq_plate(self, name):
        frames = self.sites[name]["msg"]["cond_indep_stack"]
        if len(frames) != 1:
            _fail(name, f"it sits in plates {[f.name for f in frames]}; exactly one plate (over "
                  "sequences / data points) is supported around a local latent",
                  "sample the local latents under one numpyro.plate over sequences")
        fr = frames[0]
        return fr.name, int(self.plate_sizes.get(fr.name, fr.size)), int(fr.size)

    def same_plate(self, name, plate):
        if plate not in [f.name for f in self.sites[name]["msg"]["cond_indep_stack"]]:
            _fail(name, f"it is not under the sequences plate {plate!r}",
                  f"sample it inside `with numpyro.plate({plate!r}, N)`")

    def outer_init(self, slot, fam, what, hint):
        deps = self.body_init[slot]
        src = next(iter(deps)) if len(deps) == 1 else None
        if src is None or self.kind(src) != "latent" or self.fam(src) != fam:
            came = sorted(deps) if deps else "a constant"
            _fail(what, f"the initial carry of the scan for it comes from {came}, not from one "
                  f"{fam} sample site", hint)
        return src

    def analyse(self):
        self._roles = {}
        sc = self.scan
        if sc is None:
            out = self.analyse_gmm()
        else:
            out = self.analyse_chain()
        self.check_obs(out)
        for n, s in self.sites.items():
            if s["kind"] == "latent" and n not in self._roles:
                if n.endswith("_unobserved") and n[: -len("_unobserved")] + "_observed" in \
                        self.sites:
                    _fail(n, "`obs_mask` imputes missing entries as extra latent sites",
                          "mask the emission instead: numpyro.sample(name, d.mask(mask), obs=x) "
                          "or `with numpyro.handlers.mask(mask=...)`")
                fam = s["fam"]
                users = [u for u in self.consumers(n) if u != n]
                positive = fam in ("Gamma", "LogNormal", "HalfCauchy", "HalfNormal",
                                   "InverseGamma", "Exponential", "Wishart", "LKJCholesky",
                                   "LKJ", "InverseWishart")
                _fail(n, f"this {fam} latent is not part of a conjugate block of the model "
                      f"(it feeds {users or 'nothing'})",
                      _HINT_COV if positive else _HINT_DYN_MATRIX)
        return out

    def analyse_chain(self):
        sc = self.scan
        lat_scan = [n for n in self.scan_names if self.kind(n) == "latent"]
        for n in lat_scan:
            if self.fam(n) not in ("MultivariateNormal", "Categorical"):
                _fail(n, f"a {self.fam(n)} latent inside the scan is not supported",
                      "sample the state with dist.MultivariateNormal(loc, Q[k]) (full "
                      "covariance) and the regime with dist.Categorical(P[k_prev])")
        zs = [n for n in lat_scan if self.fam(n) == "MultivariateNormal"]
        ks = [n for n in lat_scan if self.fam(n) == "Categorical"]
        if not zs:
            _fail(None, "no continuous latent chain: the scan samples no MultivariateNormal "
                  "state", "sample z = numpyro.sample('z', dist.MultivariateNormal(A z_prev + b, "
                  "Q)) in the scan body and decode the states")
        if len(zs) > 1 or len(ks) > 1:
            _fail(None, f"the scan samples several states {zs + ks}",
                  "one MultivariateNormal state and at most one Categorical regime per step")
        z, k = zs[0], (ks[0] if ks else None)
        obs_in = [n for n in self.scan_names if self.kind(n) == "observed"]
        if obs_in:
            _fail(obs_in[0], "observed inside the scan", "emit the observations once, outside "
                  "the scan, from the stacked states (see docs/model_guide.md)")

        def slot_of(site, hint):
            slots = [i for i, d in enumerate(self.body_carry_out) if d == {site}]
            if not slots:
                _fail(site, "its value is not carried to the next step of the scan", hint)
            return slots[0]

        carry_hint = "return the sampled values in the carry, e.g. `return (k, z), z`"
        zslots = [i for i, d in enumerate(self.body_carry_out) if d == {z}]
        zslot = zslots[0] if zslots else None
        zph = f"__carry_in_{zslot}" if zslot is not None else None
        Lz, Cz = self.deps(z, "loc"), self.deps(z, "cov")
        if zph is not None and zph in Cz:
            _fail(z, "its covariance depends on the previous state", "use a covariance Q[k] "
                  "that does not depend on the state")
        kslot = kph = None
        if k is not None:
            kslot = slot_of(k, carry_hint)
            kph = f"__carry_in_{kslot}"
        uses_k = k is not None and k in (Lz | Cz)
        uses_kprev = kph is not None and kph in (Lz | Cz)
        if uses_k and uses_kprev:
            _fail(z, "it depends on both the current and the previous regime",
                  "index the dynamics by the regime sampled in the same step")
        dyn = zph is not None and zph in Lz
        if dyn:
            family = "slds" if k is not None else "lds"
            if k is not None and not (uses_k or uses_kprev):
                _fail(k, f"the regime drives nothing: the dynamics of {z!r} do not depend on it",
                      "index the dynamics by the regime: Ab[k], Q[k]")
        elif uses_k:
            family = "hmm"
        elif uses_kprev:
            _fail(z, "it depends on the previous regime but not on the previous state",
                  "for an HMM index the Gaussian by the regime sampled in the same step, "
                  "mu[k] and Sigma[k]")
        else:
            _fail(z, "it depends neither on the previous state nor on the regime, so there is no "
                  "latent chain", "make the mean A_k z_prev + b_k (SLDS / LDS) and return z in "
                  "the carry, or mu_k (HMM)")
        k0 = None
        if k is not None:
            k0 = self.outer_init(kslot, "Categorical", k,
                                 "sample the first regime k0 ~ Categorical(pi0) under the "
                                 "sequences plate and pass it as the initial carry")
        if dyn:
            z0 = self.outer_init(zslot, "MultivariateNormal", z,
                                 "sample z0 ~ MultivariateNormal under the sequences plate and "
                                 "pass it as the initial carry")
        else:  # hmm: z0 is the Gaussian of the first regime k0
            z0s = [n for n, s in self.sites.items() if s["kind"] == "latent" and not s["in_scan"]
                   and s["fam"] == "MultivariateNormal" and k0 in self.deps(n)]
            if len(z0s) != 1:
                _fail(z, f"found {len(z0s)} first states drawn given {k0!r} (expected one)",
                      f"sample z0 ~ MultivariateNormal(mu[{k0}], Sigma[{k0}]) under the "
                      "sequences plate")
            z0 = z0s[0]
        plate, N, B = self.seq_plate(z)
        self.same_plate(z0, plate)
        D = int(self.value(z0).shape[-1])
        T = sc["length"] + 1
        leaves = [jnp.asarray(x) for x in jax.tree.leaves(sc["init"])]
        kshape = jnp.shape(jnp.asarray(self.value(k))[0]) if k is not None else None
        P = pi0 = None
        K = 1
        if k is not None:
            self.same_plate(k0, plate)
            K = int(np.asarray(self.base(k).probs).shape[-1])
            # transition rows: run the body with the previous regime set to j
            rows = []
            for j in range(K):
                lv = list(leaves)
                lv[kslot] = jnp.full(jnp.shape(leaves[kslot]), j, jnp.asarray(leaves[kslot]).dtype)
                rows.append(self.probs_rows(self.run_body(lv, {})[k]["fn"], K)[0])
            Pk = self.deps(k, "probs")
            if kph not in Pk:
                _fail(k, "its probabilities do not depend on the previous regime",
                      _HINT_DIRICHLET)
            P = self.dirichlet_block("P", k, Pk - {kph}, np.stack(rows), (K, K))
            p0 = self.probs_rows(self.sites[k0]["msg"]["fn"], K)
            if not _close(p0, p0[:1]):
                _fail(k0, "its probabilities differ between sequences", _HINT_DIRICHLET)
            pi0 = self.dirichlet_block("pi0", k0, self.deps(k0, "probs"), p0[0], (K,))
            for blk in (P, pi0):
                if blk.site is not None:
                    self._roles[blk.site] = blk.role
        # per-regime Gaussian of z: run the body with the regime set to j
        A, b, Q, mus = [], [], [], []
        # previous states 0, e_1, ..., e_D, packed into the rows of the sequences plate
        basis = np.concatenate([np.zeros((1, D)), np.eye(D)]) if dyn else np.zeros((1, D))
        zshape = jnp.shape(leaves[zslot]) if zslot is not None else (1, D)
        rows = int(np.prod(zshape[:-1]))
        for j in range(K):
            locs = []
            for start in range(0, len(basis), rows):
                chunk = basis[start:start + rows]
                lv = list(leaves)
                if zslot is not None:
                    zp = np.zeros((rows, D))
                    zp[: len(chunk)] = chunk
                    lv[zslot] = jnp.asarray(zp.reshape(zshape), jnp.asarray(leaves[zslot]).dtype)
                subs = {}
                if uses_k:
                    subs[k] = jnp.full(kshape, j, jnp.asarray(self.value(k)).dtype)
                elif uses_kprev:
                    lv[kslot] = jnp.full(jnp.shape(leaves[kslot]), j,
                                         jnp.asarray(leaves[kslot]).dtype)
                loc, cov = self.gaussian_row(self.run_body(lv, subs)[z]["fn"], D)
                loc = np.broadcast_to(loc, (rows, D)) if loc.shape[0] == 1 else loc
                locs.extend(loc[: len(chunk)])
            Q.append(cov[0])
            b.append(locs[0])
            mus.append(locs[0])
            if dyn:
                A.append(np.stack([lc - locs[0] for lc in locs[1:]], -1))
        Q = np.stack(Q)
        regs = {k, kph} - {None}
        init_state = dynamics = regime_gaussians = None
        if dyn:
            dynamics = self.mniw_block(z, Lz - {zph} - regs, Cz - regs, np.stack(A),
                                       np.stack(b), Q, K)
            L0, C0 = self.deps(z0, "loc"), self.deps(z0, "cov")
            if k0 is not None and k0 in (L0 | C0):
                _fail(z0, "the initial state depends on the first regime",
                      "draw z0 from one Gaussian N(m0, S0) shared by all regimes")
            loc0, cov0 = self.gaussian_row(self.sites[z0]["msg"]["fn"], D)
            if not (_close(loc0, loc0[:1]) and _close(cov0, cov0[:1])):
                _fail(z0, "its mean / covariance differ between sequences",
                      "draw z0 from one Gaussian N(m0, S0)")
            init_state = self.niw_block("init", z0, L0, C0, loc0[0], cov0[0], ())
        else:
            mu = np.stack(mus)
            regime_gaussians = self.niw_block("regime", z, Lz - regs, Cz - regs, mu, Q, (K,))
            loc0, cov0 = self.gaussian_row(self.sites[z0]["msg"]["fn"], D)
            k0v = self.value(k0).reshape(-1)
            if not (_close(loc0, mu[k0v]) and _close(cov0, Q[k0v])):
                _fail(z0, f"it is not drawn from the regime Gaussian of {k0!r}",
                      f"use dist.MultivariateNormal(mu[{k0}], Sigma[{k0}])")
        for blk, rc, rm in ((init_state, "init_cov", "init_mean"),
                            (regime_gaussians, "regime_cov", "regime_mean")):
            if blk is not None and blk.kind == "param":
                for n, r in ((blk.cov_site, rc), (blk.mean_site, rm)):
                    if n is not None:
                        self._roles[n] = r
        self._roles.update({z: "z", z0: "z_init"})
        if k is not None:
            self._roles.update({k: "k", k0: "k_init"})
        regime_plate = None
        for blk_site in (P and P.site, dynamics and dynamics.cov_site,
                         regime_gaussians and regime_gaussians.cov_site):
            if blk_site is not None and self.sites[blk_site]["msg"].get("cond_indep_stack"):
                regime_plate = self.sites[blk_site]["msg"]["cond_indep_stack"][0].name
                break
        return dict(
            family=family, N=N, subsample_size=B, T=T, K=K, D=D,
            bias=bool(dynamics.bias) if dynamics is not None else False,
            leading_regime=bool(family == "slds" and uses_k),
            dangling_regime=bool(family == "slds" and uses_kprev),
            sequence_plate=plate, regime_plate=regime_plate, scan_length=sc["length"],
            time_axis=0, pi0=pi0, P=P, init_state=init_state, dynamics=dynamics,
            regime_gaussians=regime_gaussians, k_init_site=k0, k_site=k, z_init_site=z0,
            z_site=z,
        )

    def analyse_gmm(self):
        cands = []
        for n, s in self.sites.items():
            if s["kind"] == "latent" and s["fam"] == "MultivariateNormal":
                regs = [r for r in self.deps(n) if self.fam(r) == "Categorical"
                        and self.kind(r) == "latent"]
                if regs:
                    cands.append((n, regs))
        if not cands:
            _fail(None, "no continuous latent chain: no MultivariateNormal state is sampled in "
                  "a scan (SLDS / LDS / HMM) or given a Categorical regime (GMM)",
                  "sample the states z inside numpyro.contrib.control_flow.scan (or z_n | k_n "
                  "iid under a plate for a mixture) and decode them into the observation")
        if len(cands) > 1 or len(cands[0][1]) > 1:
            _fail(cands[0][0], "several Gaussian latents / regimes form the mixture",
                  "one Categorical regime k and one MultivariateNormal state z per data point")
        z, (k,) = cands[0]
        plate, N, B = self.seq_plate(z)
        self.same_plate(k, plate)
        D = int(self.value(z).shape[-1])
        K = int(np.asarray(self.base(k).probs).shape[-1])
        kshape = self.value(k).shape
        mus, covs = [], []
        for j in range(K):
            tr = self.run_model({k: jnp.full(kshape, j, self.value(k).dtype)})
            loc, cov = self.gaussian_row(tr[z]["fn"], D)
            mus.append(loc[0])
            covs.append(cov[0])
        mu, Sig = np.stack(mus), np.stack(covs)
        kv = self.value(k).reshape(-1)
        loc, cov = self.gaussian_row(self.sites[z]["msg"]["fn"], D)
        if not (_close(loc, mu[kv]) and _close(cov, Sig[kv])):
            _fail(z, f"it is not drawn from the Gaussian of its regime {k!r}",
                  f"use dist.MultivariateNormal(mu[{k}], Sigma[{k}])")
        p = self.probs_rows(self.sites[k]["msg"]["fn"], K)
        if not _close(p, p[:1]):
            _fail(k, "its probabilities differ between data points", _HINT_DIRICHLET)
        pi0 = self.dirichlet_block("pi0", k, self.deps(k, "probs"), p[0], (K,))
        if pi0.site is not None:
            self._roles[pi0.site] = "pi0"
        regs = {k}
        Lz, Cz = self.deps(z, "loc"), self.deps(z, "cov")
        rg = self.niw_block("regime", z, Lz - regs, Cz - regs, mu, Sig, (K,))
        if rg.kind == "param":
            for n, r in ((rg.cov_site, "regime_cov"), (rg.mean_site, "regime_mean")):
                if n is not None:
                    self._roles[n] = r
        self._roles.update({z: "z", k: "k"})
        regime_plate = None
        if rg.cov_site is not None and self.sites[rg.cov_site]["msg"].get("cond_indep_stack"):
            regime_plate = self.sites[rg.cov_site]["msg"]["cond_indep_stack"][0].name
        return dict(
            family="gmm", N=N, subsample_size=B, T=1, K=K, D=D, bias=False,
            leading_regime=False, dangling_regime=False, sequence_plate=plate,
            regime_plate=regime_plate, scan_length=0, time_axis=0, pi0=pi0, P=None,
            init_state=None, dynamics=None, regime_gaussians=rg, k_init_site=None, k_site=k,
            z_init_site=None, z_site=z,
        )

    def check_obs(self, out):
        observed = [n for n, s in self.sites.items() if s["kind"] == "observed"]
        if not observed:
            consumed = set()
            for n in self.raw:
                consumed |= self.expand(self.deps(n))
            leaves = [n for n, s in self.sites.items() if s["kind"] == "latent"
                      and n not in consumed and n not in (out["z_site"], out["k_site"])]
            _fail(leaves[0] if leaves else None,
                  "the model has no observed site (was it traced without its data?)",
                  "pass the data exactly as SVI passes it to the model, and emit it with "
                  "numpyro.sample(name, ..., obs=x)")
        if len(observed) > 1:
            _fail(observed[1], f"several observed sites {observed}; one observed site fed by "
                  "the continuous states is supported", "stack the observations into one site")
        obs = observed[0]
        used = self.expand(self.deps(obs))
        lat = [n for n in self.sites if n in used and self.kind(n) == "latent"]
        states = {out["z_site"], out["z_init_site"]} - {None}
        for n in lat:
            if self.fam(n) == "Categorical":
                _fail(obs, f"the emission depends directly on the discrete state {n!r}",
                      "decode only the continuous states z (the SVAE's emission is a network "
                      "of z); put regime information into the dynamics of z")
            if n not in states:
                _fail(obs, f"the emission depends on the latent {n!r} ({self.fam(n)}), not only "
                      "on the continuous states",
                      "make emission parameters numpyro.param point estimates / networks of z")
        if out["z_site"] not in lat:
            _fail(obs, f"the emission does not depend on the states {out['z_site']!r}",
                  "decode the stacked states (e.g. jnp.concatenate([z0[None], zs]))")
        msg = self.sites[obs]["msg"]
        fn = msg["fn"]
        _, dmask = _unwrap(fn)
        mask = msg.get("mask")
        if dmask is not None:
            mask = dmask if mask is None else jnp.logical_and(mask, dmask)
        self._roles[obs] = "obs"
        out["obs"] = ObservationSite(
            name=obs, shape=tuple(np.shape(msg["value"])), batch_shape=tuple(fn.batch_shape),
            event_shape=tuple(fn.event_shape), event_dim=len(fn.event_shape),
            latent_inputs=tuple(lat),
            param_inputs=tuple(n for n in self.sites if n in used and self.kind(n) == "param"),
            mask=None if mask is None else np.asarray(mask), has_value=msg["value"] is not None,
        )

    def readable_deps(self) -> dict:
        """Dependencies with scan placeholders renamed ``<site>_prev`` or expanded."""

        def name_of(ph):
            kind, i = ph[2:].rsplit("_", 1)
            if kind == "carry_in":
                outs = self.body_carry_out[int(i)]
                return {f"{next(iter(outs))}_prev"} if len(outs) == 1 else {f"carry[{i}]"}
            if kind == "x":
                return {f"xs[{i}]"}
            return set(self.expand({ph}))

        out = {}
        for n, params in self.raw.items():
            out[n] = {}
            for p, deps in params.items():
                names = set()
                for d in deps:
                    names |= name_of(d) if d.startswith("__") else {d}
                out[n][p] = frozenset(names)
        return out

    def site_infos(self) -> dict:
        infos = {}
        for n, s in self.sites.items():
            msg = s["msg"]
            is_sample = msg["type"] == "sample"
            infos[n] = SiteInfo(
                name=n, role=self._roles.get(n, "other"), kind=s["kind"],
                shape=tuple(np.shape(msg["value"])) if hasattr(msg["value"], "shape") else (),
                batch_shape=tuple(msg["fn"].batch_shape) if is_sample else (),
                event_shape=tuple(msg["fn"].event_shape) if is_sample else (),
                dist=s["fam"],
                plates=tuple((f.name, int(f.size), int(f.dim))
                             for f in msg.get("cond_indep_stack", [])),
                in_scan=s["in_scan"],
            )
        return infos


def discover_structure(model, *args, rng_key=None, **kwargs) -> ConjugateStructure:
    """Trace a NumPyro model and return its conjugate (SLDS / LDS / HMM / GMM) structure.

    The model runs once under ``handlers.trace(handlers.seed(model))`` on ``args`` /
    ``kwargs``. Dependencies between sites are then tracked exactly with
    :func:`numpyro.ops.provenance.eval_provenance` on a second, abstract run in which every
    latent site is substituted by a labelled input and the ``scan`` is replaced by ONE step of
    its body on labelled placeholder carries (``numpyro.infer.inspect`` merges all steps of a
    scan and over-reports). Tied parameters are finally checked numerically: the body is
    re-run with the regime set to ``j`` and the previous state set to ``0, e_1, ..., e_D``,
    which reads ``A_j, b_j, Q_j`` (or ``mu_j, Sigma_j``) and the transition rows, and these
    must equal the sampled (or param / constant) globals.

    Parameters
    ----------
    model : callable
        A NumPyro model (see docs/model_guide.md for the expected shape).
    *args, **kwargs
        Arguments of the model, as SVI will pass them (with the data).
    rng_key : jax.Array or int, optional
        Key (typed or raw) or seed of the discovery trace; ``jax.random.key(0)`` by default.
        Latent values are drawn generically (see the notes in ``docs/design.md``), so the
        result does not depend on it.

    Returns
    -------
    ConjugateStructure

    Raises
    ------
    ValueError
        When the model cannot be served, naming the site, the reason and a fix: non-conjugate
        priors, dependencies the mean field cannot express (emission on the regime, prior
        hyper-parameters tied to other sites, ...), unsupported shapes, a plate around the
        scan, a missing observed site.

    Examples
    --------
    >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> def gmm(x=None, N=4, K=2, D=2):
    ...     with numpyro.plate("regimes", K):
    ...         Sig = numpyro.sample("Sig", dist.InverseWishart(D + 2.0, jnp.eye(D)))
    ...         mu = numpyro.sample("mu", dist.MultivariateNormal(jnp.zeros(D), 10.0 * Sig))
    ...     w = numpyro.sample("w", dist.Dirichlet(jnp.ones(K)))
    ...     with numpyro.plate("data", N):
    ...         k = numpyro.sample("k", dist.Categorical(w))
    ...         z = numpyro.sample("z", dist.MultivariateNormal(mu[k], Sig[k]))
    ...         numpyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)
    >>> s = discover_structure(gmm, jnp.zeros((4, 2)))
    >>> s.family, s.K, s.D, s.regime_gaussians.lam.round(6).tolist()
    ('gmm', 2, 2, [0.1, 0.1])
    >>> print(s)  # doctest: +NORMALIZE_WHITESPACE
    ConjugateStructure(family='gmm', N=4, batch=4, T=1, K=2, D=2, bias=False, leading_regime=False)
      block                 kind      sites
      Dirichlet weights     latent    w[2]
      NIW regime Gaussians  latent    Sig[2, 2, 2], mu[2, 2]
      regime (iid)          local     k[4]
      state (iid Gaussian)  local     z[4, 2]
      observation           observed  x[4, 2]
    """
    if rng_key is None:
        rng_key = jax.random.key(0)
    elif isinstance(rng_key, int):
        rng_key = jax.random.key(rng_key)
    d = _Discovery(model, args, kwargs, rng_key)
    # Argument validation compiles one small XLA program per constraint check; the checks
    # are numpyro's business at run time, not the detector's.
    with dist.distribution.validation_enabled(False):
        d.trace_concrete()
        d.trace_provenance()
        out = d.analyse()
    return ConjugateStructure(**out, sites=d.site_infos(), dependencies=d.readable_deps())

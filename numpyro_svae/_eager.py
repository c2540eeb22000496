"""Run a guide body as ONE compiled program when it is called eagerly.

``SVI.init`` (and any other eager call: ``handlers.trace(seed(guide, 0))``, ``Trace_ELBO``
evaluated outside ``jit``) runs the guide op by op.  JAX then compiles every distinct
primitive application separately: ~500 small XLA programs for an SLDS guide, about 30 s
on a 2-core CPU, longer than compiling the whole training step.  Here the guide body is
traced once under ``jax.jit`` with its own ``block``/``trace``/``seed``/``substitute``
handlers, and the sites it recorded are re-sent through the caller's handler stack with
their values already set, so the caller sees an ordinary guide trace:

1. the body runs compiled with no parameter overrides; its ``param`` sites (with their
   initial values) are re-emitted through the caller's handlers, which may substitute them
   (``SVI.init(init_params=...)``, ``substitute(guide, params)``);
2. if any parameter came back substituted, or the caller's ``substitute`` / ``replay`` /
   ``condition`` handlers would set the value of a sample site (probed without side
   effects), the body runs again (a second compiled variant) with those values, so that
   sites depending on earlier ones (``Ab | Q``) see them;
3. the ``plate``, ``sample`` and ``mutable`` sites are re-emitted in their original order
   through ``apply_stack`` (values set, so nothing is re-sampled; the caller's handlers may
   still replace a value, exactly as for an ordinary site).

Checks that need concrete data (NaN/inf at observed entries, ``lengths`` in range) are
computed inside the program (`defer_check`) and raised after it returns, with the same
messages as the eager code.  Calls made under a JAX transformation (tracers in the
arguments or the seed) use the ordinary body: they are compiled by the caller anyway.

Requirement on the body: every distribution passed to ``numpyro.sample`` must be a JAX
pytree (NumPyro's distributions are; custom ones list ``pytree_data_fields``), and the
guide's result is ``None``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import numpyro
from numpyro import handlers
from numpyro.primitives import _PYRO_STACK, apply_stack

__all__ = ["call_compiled", "defer_check", "eager_call_possible"]

_CHECKS: list[list] = []  # stack of collectors, innermost last


def defer_check(bad: Any, message: Callable[[np.ndarray], str]) -> bool:
    """Register a check for a compiled eager call; False when no compiled call is active.

    ``bad`` is a boolean array (traced); if any entry is True after the program ran,
    ``ValueError(message(np.asarray(bad)))`` is raised.
    """
    if not _CHECKS:
        return False
    _CHECKS[-1].append((bad, message))
    return True


@contextlib.contextmanager
def _collect(checks: list):
    _CHECKS.append(checks)
    try:
        yield
    finally:
        _CHECKS.pop()


def _is_dynamic(leaf) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray)


def eager_call_possible(args: tuple, kwargs: dict) -> bool:
    """True when a guide call is eager: handlers active, no tracers among the arguments."""
    if not _PYRO_STACK or _CHECKS:
        return False
    leaves = jax.tree_util.tree_leaves((args, kwargs))
    return not any(isinstance(x, jax.core.Tracer) for x in leaves)


class _Compiled:
    """One compiled variant of a body for one call signature (static leaves and shapes)."""

    def __init__(self, body: Callable, treedef, static: tuple, dyn_pos: tuple):
        self.body = body
        self.treedef = treedef
        self.static = static
        self.dyn_pos = dyn_pos
        self.sites: list[dict] | None = None  # static per-site metadata (set when traced)
        self.messages: list[Callable[[np.ndarray], str]] = []
        self.fn = jax.jit(self._run)

    def _args(self, dyn):
        leaves = list(self.static)
        for pos, x in zip(self.dyn_pos, dyn, strict=True):
            leaves[pos] = x
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def _run(self, key, overrides, dyn):
        args, kwargs = self._args(dyn)
        checks: list = []
        with _collect(checks), handlers.block(), handlers.trace() as tr, \
                handlers.seed(rng_seed=key), handlers.substitute(data=overrides):
            self.body(*args, **kwargs)
        sites, out = [], []
        for name, site in tr.items():
            kind = site["type"]
            if kind == "param":
                sites.append(dict(type=kind, name=name, kwargs=dict(site["kwargs"])))
                out.append(site["value"])
            elif kind == "mutable":
                sites.append(dict(type=kind, name=name))
                out.append(site["value"])
            elif kind == "plate":
                sites.append(dict(type=kind, name=name, args=site["args"]))
                out.append(site["value"])
            elif kind == "sample":
                if site["is_observed"]:
                    raise ValueError(f"guide site {name!r} is observed; guides sample only")
                sites.append(dict(
                    type=kind, name=name,
                    sample_shape=site["kwargs"].get("sample_shape", ()),
                    cond_indep_stack=list(site["cond_indep_stack"]),
                    infer=dict(site["infer"]),
                    has_scale=site["scale"] is not None,
                ))
                scale = site["scale"]
                out.append((site["value"], site["fn"], scale if scale is not None else 0.0))
            # "prng_key" and other internal messages stay inside
        self.sites = sites
        self.messages = [m for _, m in checks]
        return out, [b for b, _ in checks]

    def __call__(self, key, overrides, dyn):
        out, bad = self.fn(key, overrides, dyn)
        for b, message in zip(bad, self.messages, strict=True):
            b = np.asarray(b)
            if b.any():
                raise ValueError(message(b))
        return out


def _signature(args: tuple, kwargs: dict):
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    dyn_pos = tuple(i for i, x in enumerate(leaves) if _is_dynamic(x))
    static = tuple(None if i in dyn_pos else x for i, x in enumerate(leaves))
    shapes = tuple((np.shape(leaves[i]), np.result_type(leaves[i]).str) for i in dyn_pos)
    key = (treedef, static, dyn_pos, shapes)
    hash(key)  # TypeError for an unhashable static argument: the caller falls back
    return key, treedef, static, dyn_pos, [leaves[i] for i in dyn_pos]


def call_compiled(owner, body: Callable, args: tuple, kwargs: dict):
    """Run ``body(*args, **kwargs)`` compiled and replay its sites to the caller's handlers.

    ``owner`` keeps the compiled variants (attribute ``_compiled_cache``).  Falls back to a
    plain call when no seed handler is active or an argument is not hashable/static-able.
    """
    try:
        sig, treedef, static, dyn_pos, dyn = _signature(args, kwargs)
    except TypeError:
        return body(*args, **kwargs)
    key = numpyro.prng_key()
    if key is None or isinstance(key, jax.core.Tracer):
        return body(*args, **kwargs)
    cache = owner.__dict__.setdefault("_compiled_cache", {})
    variant = cache.get(sig)
    if variant is None:
        variant = cache[sig] = _Compiled(body, treedef, static, dyn_pos)

    if variant.sites is not None and _probe_safe():
        # known sites: when the caller substitutes every parameter (sample_posterior,
        # SVI.init(init_params=...)), one run with the caller's values is enough
        params = {s["name"]: _outer_value("param", s["name"]) for s in variant.sites
                  if s["type"] == "param"}
        if all(v is not None for v in params.values()):
            values = {s["name"]: _outer_value("sample", s["name"]) for s in variant.sites
                      if s["type"] == "sample"}
            values = {k: v for k, v in values.items() if v is not None}
            out = variant(key, {**params, **values}, dyn)
            for site, value in zip(variant.sites, out, strict=True):
                if site["type"] == "param":
                    numpyro.param(site["name"], lambda _key, v=value: v, **site["kwargs"])
            _replay(variant.sites, out)
            return None

    out = variant(key, {}, dyn)
    sites = variant.sites
    resolved, overridden = {}, False
    for site, value in zip(sites, out, strict=True):
        if site["type"] == "param":
            # a callable init (a module is callable; it must not be taken for an init fn)
            got = numpyro.param(site["name"], lambda _key, v=value: v, **site["kwargs"])
            resolved[site["name"]] = got
            overridden |= got is not value
    # sample values the caller's substitute / replay / condition handlers will impose: the
    # body must see them too (later guide sites depend on earlier ones, e.g. Ab | Q)
    values = {}
    for site, value in zip(sites, out, strict=True):
        if site["type"] == "sample":
            got = _outer_value("sample", site["name"], value[1])
            if got is not None:
                values[site["name"]] = got
    if overridden or values:
        out = variant(key, {**resolved, **values}, dyn)
        sites = variant.sites
    _replay(sites, out)
    return None


_VALUE_HANDLERS = (handlers.substitute, handlers.replay, handlers.condition)


def _probe_safe() -> bool:
    """True when every value-setting handler of the caller reads a dict or a trace (no
    user function that might inspect the probe message's distribution)."""
    for h in _PYRO_STACK:
        if isinstance(h, handlers.substitute) and h.substitute_fn is not None:
            return False
        if isinstance(h, handlers.condition) and h.condition_fn is not None:
            return False
    return True


def _outer_value(kind: str, name: str, fn=None):
    """The value the caller's handler stack would give site `name` of type `kind` (``sample``
    or ``param``; None: not imposed).

    Runs the (side-effect free) ``process_message`` of the value-setting handlers on a probe
    message, innermost first, stopping at a ``block`` that hides the site."""
    msg = {"type": kind, "name": name, "fn": fn, "args": (), "kwargs": {"rng_key": None},
           "value": None, "scale": None, "is_observed": False, "intermediates": [],
           "cond_indep_stack": [], "infer": {}}
    for h in reversed(_PYRO_STACK):
        if isinstance(h, handlers.block) and h.hide_fn(msg):
            break
        if isinstance(h, _VALUE_HANDLERS):
            h.process_message(msg)
    return msg["value"]


def _replay(sites: list[dict], out: list) -> None:
    for site, value in zip(sites, out, strict=True):
        kind = site["type"]
        if kind == "plate":
            apply_stack({
                "type": "plate", "fn": _no_subsample, "name": site["name"],
                "args": site["args"], "kwargs": {"rng_key": None}, "value": value,
                "scale": 1.0, "cond_indep_stack": [],
            })
        elif kind == "mutable":
            numpyro.primitives.mutable(site["name"], value)
        elif kind == "sample":
            val, fn, scale = value
            apply_stack({
                "type": "sample", "name": site["name"], "fn": fn, "args": (),
                "kwargs": {"rng_key": None, "sample_shape": site["sample_shape"]},
                "value": val, "scale": scale if site["has_scale"] else None,
                "is_observed": False, "intermediates": [],
                "cond_indep_stack": list(site["cond_indep_stack"]),
                "infer": dict(site["infer"]),
            })


def _no_subsample(*args, **kwargs):  # pragma: no cover - values are always set
    raise RuntimeError("replayed plate site has no value")

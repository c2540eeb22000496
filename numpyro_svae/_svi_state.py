"""Helpers for SVI states shared by the training loops (`fitting` and the command)."""

from __future__ import annotations

from typing import Any

__all__ = ["strong_types"]


def strong_types(tree: Any) -> Any:
    """`tree` with strongly typed array leaves (PRNG keys untouched).

    The SVI state of a fresh ``SVI.init``, of a compiled step and of a checkpoint must have
    equal abstract types, weak types included, or the compiled step is traced and compiled
    again.
    """
    import jax
    import jax.numpy as jnp

    def one(a):
        if getattr(a, "weak_type", False) and not jax.dtypes.issubdtype(
                a.dtype, jax.dtypes.prng_key):
            return jnp.asarray(a, dtype=a.dtype)
        return a

    return jax.tree_util.tree_map(one, tree)

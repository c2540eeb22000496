"""Shared fixtures: CPU only, a fresh key per test, optional oracle data paths."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
MOCAP6 = SHARED / "data" / "mocap6"


@pytest.fixture
def key():
    """A fixed typed PRNG key; tests split it into named children."""
    return jax.random.key(0)


@pytest.fixture
def mocap6_path():
    """Path to the shared mocap6 folder; skips when it is absent (e.g. on a user's machine)."""
    if not (MOCAP6 / "mocap6.mat").exists():
        pytest.skip("../shared/data/mocap6 is not present")
    return MOCAP6

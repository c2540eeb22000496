"""Shared fixtures: CPU only, a fresh key per test, optional oracle data paths."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

# Run CPU computations synchronously in the calling thread: with asynchronous dispatch a
# worker of the 2-core CI machine was seen blocked forever waiting for a result (no
# callbacks involved; the computation never ran).  Synchronous dispatch removes that path.
jax.config.update("jax_cpu_enable_async_dispatch", False)

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

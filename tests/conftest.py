"""Shared fixtures: CPU only, a fresh key per test, optional oracle data paths."""

import os
import pathlib
import sys
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Cheaper XLA CPU compilation for the test run (most of the suite's time is compilation):
# XLA's long-standing elemental IR emitter for fusions instead of the newer MLIR "fusion
# emitters" (measured on the 2-core machine: the notebook-sized SLDS training step compiles
# in 5.8 s instead of 10.8 s, the compiled eager guide body in 4.8 s instead of 8.3 s; every
# test passes), and LLVM optimisation level 1 without its expensive passes (compile-bound
# tests -23 % CPU time, the longest training test -13 %).  Level 0 is faster still (648 s
# against 798 s for the whole suite in the working tree), but in three fresh-clone runs out
# of three a worker segfaulted inside XLA's compiler at level 0, in two different tests
# (docs/design.md, test-run settings); no run at level 1 without the persistent cache has
# crashed.  No fast-math is involved (XLA's
# default stays off), so results are IEEE-identical up to operation order.  Subprocesses
# (notebook kernels) inherit the variable.  Benchmarks and library users keep XLA's
# defaults; the emitter flag is the `numpyro-svae` command's (`cli.XLA_CPU_DEFAULTS`).
from numpyro_svae.cli import XLA_CPU_DEFAULTS, merge_xla_flags  # noqa: E402 (no backend yet)

_TEST_XLA_FLAGS = (*XLA_CPU_DEFAULTS,
                   "--xla_backend_optimization_level=1",
                   "--xla_llvm_disable_expensive_passes=true")
os.environ["XLA_FLAGS"] = merge_xla_flags(os.environ.get("XLA_FLAGS", ""), _TEST_XLA_FLAGS)

import jax  # noqa: E402
import pytest  # noqa: E402

# Run CPU computations synchronously in the calling thread: with asynchronous dispatch a
# worker of the 2-core CI machine was seen blocked forever waiting for a result (no
# callbacks involved; the computation never ran).  Synchronous dispatch removes that path.
jax.config.update("jax_cpu_enable_async_dispatch", False)

# No persistent XLA cache by default.  One cache shared per test run between the xdist
# workers (tests compile the same programs from different closures) saved time, but a worker
# aborted inside the cache write (`compilation_cache.put_executable_and_time` ->
# `executable.serialize()`) in one run in several (different tests), which takes the test
# run down with it.  Set NUMPYRO_SVAE_TEST_JAX_CACHE to a folder to
# use one anyway (the notebook kernels of tests/test_notebooks.py follow the same variable).
if os.environ.get("NUMPYRO_SVAE_TEST_JAX_CACHE"):
    jax.config.update("jax_compilation_cache_dir", os.environ["NUMPYRO_SVAE_TEST_JAX_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
MOCAP6 = SHARED / "data" / "mocap6"


@pytest.fixture
def key():
    """A fixed typed PRNG key; tests split it into named children."""
    return jax.random.key(0)


@pytest.fixture
def mocap6_path():
    """Path to the mocap6 data folder; skips when it is absent (e.g. on a user's machine)."""
    if not (MOCAP6 / "mocap6.mat").exists():
        pytest.skip("the mocap6 data folder is not present")
    return MOCAP6


def pytest_collection_modifyitems(config, items):
    """Run the ``slow`` tests first (stable order otherwise).

    Most of the suite's time is in a few long, compile-bound tests; started last, one of
    them can leave the other xdist worker idle for a minute or more at the end.  Started
    first, the short tests fill the gaps (``--dist worksteal``).  (With the persistent XLA
    cache on, this order once lost a worker to that cache's abort; the cache is off now.)"""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


# A test whose xdist worker dies gets one more run on the replacement worker.  Native
# crashes inside XLA have cost whole test runs: aborts in the persistent-cache write
# and segfaults in compilation at optimisation level 0 (three fresh-clone runs out of
# three, in two CLI end-to-end tests that pass on their own; one rerun passed, and the third
# run hung after its rerun).  Only a crash is retried, once per
# test, and the summary counts it ("1 rerun").
# A failing assertion or error fails at once, and so does a second crash of the same test.
class _CrashRerun:
    """xdist's ``pytest_handlecrashitem`` (registered only where xdist is active)."""

    def __init__(self):
        self.rerun: set = set()

    def pytest_handlecrashitem(self, crashitem, report, sched):
        if crashitem not in self.rerun:
            self.rerun.add(crashitem)
            sched.mark_test_pending(crashitem)
            report.outcome = "rerun"

    def pytest_report_teststatus(self, report, config):
        if report.outcome == "rerun":
            return "rerun", "R", ("RERUN", {"yellow": True})
        return None


# A hung test ends its worker, so that the crash rerun above applies.  XLA's CPU runtime
# (jaxlib 0.10.2) can deadlock inside a call: every thread waits on a futex, the call never
# returns and the process uses no CPU (`test_stats_kl_entropy_and_density_match_
# numpyro[mniw]` run alone on a quiet machine hung 5 times in 6, with and without
# `--xla_cpu_enable_concurrency_optimized_scheduler=false`, and hung one whole test run; it
# passes under load, so it is a race).  A test whose process makes no CPU progress for
# HANG_IDLE_S seconds is taken for hung.  Tests that wait on other processes (the notebook
# kernels) set ``HANG_WATCHDOG = False`` in their module.
HANG_IDLE_S = 90.0


class _HangWatchdog:
    def __init__(self):
        self.current: str | None = None
        threading.Thread(target=self._loop, daemon=True, name="hang-watchdog").start()

    def _loop(self):
        last, since = time.process_time(), time.monotonic()
        while True:
            time.sleep(5.0)
            now = time.process_time()
            if self.current is None or now - last > 0.05:
                last, since = now, time.monotonic()
            elif time.monotonic() - since > HANG_IDLE_S:
                sys.stderr.write(f"\n{self.current}: no CPU progress for {HANG_IDLE_S:.0f} s "
                                 "(a hang inside XLA's CPU runtime); ending this worker\n")
                sys.stderr.flush()
                os._exit(3)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        watched = getattr(getattr(item, "module", None), "HANG_WATCHDOG", True)
        self.current = item.nodeid if watched else None
        try:
            yield
        finally:
            self.current = None


def pytest_configure(config):
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_CrashRerun(), "numpyro_svae_crash_rerun")
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker: its death is reported and rerun
        config.pluginmanager.register(_HangWatchdog(), "numpyro_svae_hang_watchdog")

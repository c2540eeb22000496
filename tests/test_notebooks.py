"""The notebooks run top to bottom (fast mode: tiny shapes and step counts).

The notebooks' code cells are executed with nbclient, one notebook after the other, in one
fresh ``python3`` kernel (jupyter_client starts the kernel spec's ``python`` as the current
interpreter), each from an empty namespace, with ``NUMPYRO_SVAE_FAST=1`` in the kernel's
environment and ``notebooks/`` as the working directory; any cell error fails the test.  The
stored notebooks are not modified (the executed copy lives in memory only).
"""

from __future__ import annotations

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NAMES = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
CELL_TIMEOUT_S = 600  # one cell (JAX compilation included) on a loaded 2-core machine
HANG_WATCHDOG = False  # the worker waits on the kernel process (conftest's hang watchdog)

# Not stored in the notebooks: the same synchronous CPU dispatch as tests/conftest.py (a
# worker of the 2-core CI machine was once seen blocked forever with asynchronous dispatch)
# and the non-interactive matplotlib backend.
# The kernel joins a persistent XLA cache only where NUMPYRO_SVAE_TEST_JAX_CACHE names one
# (tests/conftest.py: off by default).
_PRELUDE = (
    "import os, jax\n"
    "jax.config.update('jax_cpu_enable_async_dispatch', False)\n"
    "_cache = os.environ.get('NUMPYRO_SVAE_TEST_JAX_CACHE')\n"
    "if _cache:\n"
    "    jax.config.update('jax_compilation_cache_dir', _cache)\n"
    "    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)\n"
    "import matplotlib\n"
    "matplotlib.use('Agg')"
)


def test_notebooks_are_found():
    assert NAMES == ["01_quick_start.ipynb", "02_motion_capture.ipynb",
                     "03_a_look_inside.ipynb"]


# Between two notebooks in the shared kernel: forget every name the previous one defined,
# close its figures and go back to notebooks/ (modules stay imported and JAX keeps its
# compiled programs: that, and one kernel start instead of three, is the saving).
_SEPARATOR = (
    "get_ipython().run_line_magic('reset', '-f')\n"
    "import os as _os, matplotlib.pyplot as _plt\n"
    "_plt.close('all')\n"
    "_os.chdir({path!r})\n"
    "print('--- notebook {name} ---')\n"
    "del _os, _plt"
)


@pytest.mark.slow
def test_notebooks_run_in_fast_mode(monkeypatch):
    """All notebooks, top to bottom, one after the other in ONE kernel (measured on the 2-core
    machine: 170 s against 197 s in three kernels); each starts from an empty namespace
    (``%reset``), so a notebook that used a name only an earlier one defines still fails."""
    cells = [nbformat.v4.new_code_cell(_PRELUDE)]
    for name in NAMES:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        assert nb.cells and nb.cells[0].cell_type == "markdown", name
        first_code = next(c for c in nb.cells if c.cell_type == "code")
        assert 'os.environ.get("NUMPYRO_SVAE_FAST", "0") == "1"' in first_code.source, name
        cells.append(nbformat.v4.new_code_cell(_SEPARATOR.format(path=str(NOTEBOOKS),
                                                                 name=name)))
        cells.extend(c for c in nb.cells if c.cell_type == "code")
    combined = nbformat.v4.new_notebook(cells=cells)
    # the kernel inherits this process's environment
    monkeypatch.setenv("NUMPYRO_SVAE_FAST", "1")
    monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
    client = nbclient.NotebookClient(
        combined,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()  # raises CellExecutionError (with the cell's source) on the first error
    errors = [o for c in combined.cells for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors
    printed = "".join(o.get("text", "") for c in combined.cells for o in c.get("outputs", [])
                      if o.get("output_type") == "stream")
    assert all(f"--- notebook {name} ---" in printed for name in NAMES)

"""Training-step benchmark against the research code's bar (one command, no arguments).

Configuration of the bar quoted in the project brief: B = 16 sequences, T = 100, K = 4,
D = 4, 12-dimensional data, MLP 2 x 128 encoder and decoder, float32, CPU. The research
code takes 203 ms per step, 6-7 min to compile one step and 2.4 GB peak memory on the
2-core reference machine. We time, in a fresh process: `SVI.init` (structure discovery and
parameter initialisation), compilation + first call of the jitted `svi.update`, and the
median of 20 further steps; peak RSS of the process. Writes `bench/results/step.json`.

Two rows, each in its own fresh process: XLA's default CPU settings (what a library user
gets), and the settings the ``numpyro-svae`` command adds (``cli.XLA_CPU_DEFAULTS``: the
elemental fusion emitter); the ratio of the two is printed. (The stored cli_defaults row was
measured with ``--xla_cpu_enable_concurrency_optimized_scheduler=false`` as well, a setting
withdrawn afterwards; see docs/benchmarks.md.) ``--one`` measures the current process's
settings only (the worker).
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time

import jax
import numpy as np
import optax
from numpyro.infer import SVI

from numpyro_svae import models, nn
from numpyro_svae.elbo import SVAE_ELBO
from numpyro_svae.guide import SVAEGuide
from numpyro_svae.optim import natural_gradient

RESEARCH = {"step_s": 0.203, "compile_s": 6.5 * 60, "peak_bytes": 2.4e9}


def measure() -> dict:
    """One row for this process's XLA settings."""
    B, T, K, D, Dx = 16, 100, 4, 4, 12
    x = np.random.default_rng(0).normal(size=(B, T, Dx)).astype(np.float32)
    kw = dict(N=B, T=T, Dx=Dx, K=K, D=D, hidden=(128, 128))
    enc = nn.GaussianPotentialEncoder(obs_dim=Dx, latent_dim=D, hidden=(128, 128),
                                      key=jax.random.key(1))
    guide = SVAEGuide(models.slds_model, encoder=enc)
    svi = SVI(models.slds_model, guide,
              natural_gradient(natgrad_lr=0.1, other=optax.adam(1e-3)), loss=SVAE_ELBO())
    t0 = time.perf_counter()
    state = svi.init(jax.random.PRNGKey(0), x, **kw)
    init_s = time.perf_counter() - t0
    update = jax.jit(lambda s: svi.update(s, x, **kw))
    t0 = time.perf_counter()
    state, loss = update(state)
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        state, loss = update(state)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = {
        "B": B, "T": T, "K": K, "D": D, "Dx": Dx, "hidden": [128, 128],
        "init_s": init_s, "compile_first_step_s": compile_s, "step_s": step_s,
        "peak_rss_bytes": peak, "research": RESEARCH,
        "step_ratio_vs_research": step_s / RESEARCH["step_s"],
        "compile_ratio_vs_research": (init_s + compile_s) / RESEARCH["compile_s"],
        "machine": {"platform": platform.platform(), "backend": jax.default_backend(),
                    "jax": jax.__version__, "cpus": len(jax.devices())},
    }
    row["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    return row


def _line(row: dict) -> str:
    return (f"init {row['init_s']:.1f} s | compile + first step "
            f"{row['compile_first_step_s']:.1f} s | step {1e3 * row['step_s']:.1f} ms "
            f"(research 203 ms: ratio {row['step_ratio_vs_research']:.2f}) | peak RSS "
            f"{row['peak_rss_bytes'] / 1e9:.2f} GB (research 2.4 GB)")


def main() -> None:
    if "--one" in sys.argv[1:]:
        print(json.dumps(measure()))
        return
    from numpyro_svae.cli import XLA_CPU_DEFAULTS, merge_xla_flags

    user = os.environ.get("XLA_FLAGS", "")
    rows = []
    # the second row gets what the command would set (a flag the user names is kept as is)
    for setting, flags in (("xla_defaults", user),
                           ("cli_defaults", merge_xla_flags(user, XLA_CPU_DEFAULTS))):
        env = dict(os.environ, XLA_FLAGS=flags)
        done = subprocess.run([sys.executable, __file__, "--one"], env=env, check=True,
                              capture_output=True, text=True)
        row = dict(json.loads(done.stdout.strip().splitlines()[-1]), setting=setting)
        rows.append(row)
        print(f"{setting:13s} {_line(row)}")
    a, b = rows
    ratios = {k: b[k] / a[k] for k in ("init_s", "compile_first_step_s", "step_s",
                                       "peak_rss_bytes")}
    print("cli_defaults / xla_defaults: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    out = pathlib.Path(__file__).parent / "results" / "step.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "cli_over_xla_defaults": ratios}, indent=1))


if __name__ == "__main__":
    main()

"""Training-step benchmark: the research code's bar and the sizes people use (one command).

Configuration of the bar quoted in the project brief: B = 16 sequences, T = 100, K = 4,
D = 4, 12-dimensional data, MLP 2 x 128 encoder and decoder, float32, CPU. The research
code takes 203 ms per step, 6-7 min to compile one step and 2.4 GB peak memory on the
2-core reference machine. We time, in a fresh process: `SVI.init` (structure discovery and
parameter initialisation), compilation + first call of the jitted `svi.update`, and the
median of 20 further steps; peak RSS of the process. Writes `bench/results/step.json` (one
row per configuration, setting and variant; rows of other runs are kept).

    python bench/bench_step.py --configs brief mocap6 long wide --settings cli_defaults
    python bench/bench_step.py --configs mocap6 --variants default onestep fwd1

Configurations (``CONFIGS``): ``brief`` above; ``mocap6`` (B = 26, T = 100, K = 8, D = 8,
hidden 64, what the mocap6 benchmark trains); ``long`` (B = 4, T = 1,000, K = 4, D = 4);
``wide`` (B = 16, T = 100, K = 16, D = 8). Settings, each row in its own fresh process:
``xla_defaults`` (what a library user gets) and ``cli_defaults`` (the flags the
``numpyro-svae`` command adds, ``cli.XLA_CPU_DEFAULTS``: the elemental fusion emitter).
Variants split the step's time: ``default``; ``onestep`` (no adjoint iterations of the
implicit gradient: ``default - onestep`` is the backward solve); ``fwd1`` (also one forward
block update: ``onestep - fwd1`` is the rest of the forward mean field, ``fwd1`` the
networks, the final smoother pass, sampling, the ELBO and the optimizer). ``--one``
measures the current process's settings only (the worker).
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


CONFIGS = {
    # name: (B, T, K, D, Dx, hidden)
    "brief": (16, 100, 4, 4, 12, 128),  # the research code's bar
    "mocap6": (26, 100, 8, 8, 12, 64),  # what the mocap6 benchmark trains
    "long": (4, 1000, 4, 4, 12, 128),  # long sequences
    "wide": (16, 100, 16, 8, 12, 64),  # many regimes
}


def measure(config: str = "brief", variant: str = "default") -> dict:
    """One row for this process's XLA settings.

    ``variant`` changes the mean field's options to split the step's time (``onestep``: no
    adjoint iterations, so ``default - onestep`` is the implicit backward solve; ``fwd1``:
    also a single forward block update).
    """
    from numpyro_svae.meanfield.fixed_point import FixedPointOptions

    B, T, K, D, Dx, H = CONFIGS[config]
    options = {"default": FixedPointOptions(),
               "onestep": FixedPointOptions(solver="onestep"),
               "fwd1": FixedPointOptions(solver="onestep", max_iters=1)}[variant]
    x = np.random.default_rng(0).normal(size=(B, T, Dx)).astype(np.float32)
    kw = dict(N=B, T=T, Dx=Dx, K=K, D=D, hidden=(H, H))
    enc = nn.GaussianPotentialEncoder(obs_dim=Dx, latent_dim=D, hidden=(H, H),
                                      key=jax.random.key(1))
    guide = SVAEGuide(models.slds_model, encoder=enc, options=options)
    svi = SVI(models.slds_model, guide,
              natural_gradient(natgrad_lr=0.1, other=optax.adam(1e-3), guide=guide),
              loss=SVAE_ELBO())
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
        "config": config, "variant": variant,
        "B": B, "T": T, "K": K, "D": D, "Dx": Dx, "hidden": [H, H],
        "init_s": init_s, "compile_first_step_s": compile_s, "step_s": step_s,
        "peak_rss_bytes": peak, "research": RESEARCH,
        "step_ratio_vs_research": step_s / RESEARCH["step_s"],
        "compile_ratio_vs_research": (init_s + compile_s) / RESEARCH["compile_s"],
        "machine": {"platform": platform.platform(), "backend": jax.default_backend(),
                    "jax": jax.__version__, "cpus": len(jax.devices()),
                    "load_avg_1min": os.getloadavg()[0]},
    }
    row["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    return row


def _line(row: dict) -> str:
    return (f"init {row['init_s']:.1f} s | compile + first step "
            f"{row['compile_first_step_s']:.1f} s | step {1e3 * row['step_s']:.1f} ms "
            f"(research 203 ms: ratio {row['step_ratio_vs_research']:.2f}) | peak RSS "
            f"{row['peak_rss_bytes'] / 1e9:.2f} GB (research 2.4 GB)")


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", action="store_true", help="measure this process only (worker)")
    p.add_argument("--configs", nargs="+", default=["brief"], choices=sorted(CONFIGS))
    p.add_argument("--settings", nargs="+", default=["xla_defaults", "cli_defaults"],
                   choices=["xla_defaults", "cli_defaults"])
    p.add_argument("--variants", nargs="+", default=["default"],
                   choices=["default", "onestep", "fwd1"])
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a.configs[0], a.variants[0])))
        return
    from numpyro_svae.cli import XLA_CPU_DEFAULTS, merge_xla_flags

    user = os.environ.get("XLA_FLAGS", "")
    flags_of = {"xla_defaults": user, "cli_defaults": merge_xla_flags(user, XLA_CPU_DEFAULTS)}
    out = pathlib.Path(__file__).parent / "results" / "step.json"
    stored = json.loads(out.read_text()) if out.exists() else {"rows": []}
    rows = stored.get("rows", [])
    for config in a.configs:
        for setting in a.settings:
            for variant in a.variants:
                env = dict(os.environ, XLA_FLAGS=flags_of[setting])
                done = subprocess.run([sys.executable, __file__, "--one", "--configs", config,
                                       "--variants", variant], env=env, check=True,
                                      capture_output=True, text=True)
                row = dict(json.loads(done.stdout.strip().splitlines()[-1]), setting=setting)
                # one stored row per (configuration, setting, variant): the newest
                rows = [r for r in rows if (r.get("config", "brief"), r.get("setting"),
                                            r.get("variant", "default"))
                        != (config, setting, variant)]
                rows.append(row)
                print(f"{config:7s} {setting:13s} {variant:8s} {_line(row)}", flush=True)
                out.parent.mkdir(exist_ok=True)
                out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

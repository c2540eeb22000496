"""Implicit vs unrolled gradient of the SLDS mean-field fixed point: memory and time.

Run: ``python bench/bench_implicit.py`` (no arguments).  For every configuration
(method in {implicit, unrolled}, T in {100, 1000}, forward block updates in {5, 10, 20, 50},
batch 16, D = 4, K = 4, float32, rtol = 0 so the forward makes exactly that many updates) a
fresh subprocess compiles ``jax.grad`` of

    sum over the batch of (random linear functional of q's statistics + local KL)

with respect to the encoder potentials and every global potential, and reports

* ``peak_bytes``: the compiled executable's ``memory_analysis()``
  temp + argument + output sizes (what XLA allocates for one gradient call);
* ``rss_bytes``: the subprocess's peak resident set size (includes the JAX runtime, so it is
  an upper bound that is dominated by a constant on small problems);
* ``grad_s``: median wall time of a gradient call (after compilation, ``block_until_ready``).

The implicit rows use the capped Richardson solver with ``fallback_on_unconverged=False`` (with
rtol = 0 the forward never "converges", and the fallback would skip nothing but the select).
Writes ``bench/results/implicit.json``; ``python bench/bench_implicit.py --table`` prints it
as a markdown table.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "implicit.json"
BATCH, D, K = 16, 4, 4
TS = (1000, 100)  # the targets are stated at T = 1000: measure it first
ITERS = (5, 50, 20, 10)
METHODS = ("implicit", "unrolled")
REPEATS = 5


def _child(method: str, T: int, iters: int) -> dict:
    import resource
    import statistics

    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(ROOT))
    from numpyro_svae.meanfield.fixed_point import FixedPointOptions
    from numpyro_svae.meanfield.slds import mf_fixed_point
    from tests.meanfield._problems import random_encoder, random_globals

    dtype = jnp.float32
    g = random_globals(jax.random.key(0), D, K, dtype=dtype)
    Rs, rs = jax.vmap(lambda k: random_encoder(k, T, D, dtype=dtype))(
        jax.random.split(jax.random.key(1), BATCH))
    keys = jax.random.split(jax.random.key(2), BATCH)
    kw = jax.random.split(jax.random.key(3), 3)
    W = jax.random.normal(kw[0], (BATCH, T, D), dtype)
    V = jax.random.normal(kw[1], (BATCH, T, D, D), dtype) / D
    U = jax.random.normal(kw[2], (BATCH, T - 1, K), dtype)
    opts = FixedPointOptions(
        max_iters=iters, rtol=0.0, solver="richardson" if method == "implicit" else "unrolled",
        fallback_on_unconverged=False,
    )

    def one(R, r, g, key, w, v, u):
        res, _ = mf_fixed_point(R, r, g, init_key=key, options=opts)
        return (jnp.sum(res.Ez * w) + jnp.sum(res.Ezz * v) + jnp.sum(res.marginals * u)
                + res.local_kl)

    def loss(Rs, rs, g):
        return jnp.sum(jax.vmap(one, in_axes=(0, 0, None, 0, 0, 0, 0))(Rs, rs, g, keys, W, V, U))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    compiled = grad.lower(Rs, rs, g).compile()
    ma = compiled.memory_analysis()
    peak = int(ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes)
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(Rs, rs, g))
    repeats = REPEATS if time.perf_counter() - t0 < 2.0 else 2  # keep long configs bounded
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(Rs, rs, g))
        times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return {
        "method": method, "T": T, "iters": iters, "peak_bytes": peak,
        "temp_bytes": int(ma.temp_size_in_bytes), "rss_bytes": int(rss),
        "grad_s": statistics.median(times), "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
    }


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
        return
    if len(sys.argv) == 2 and sys.argv[1] == "--table":
        print(table(json.loads(OUT.read_text())))
        return
    rows = []
    env = dict(os.environ)
    for T in TS:
        for iters in ITERS:
            for method in METHODS:
                t0 = time.perf_counter()
                p = subprocess.run(
                    [sys.executable, __file__, "--child", method, str(T), str(iters)],
                    capture_output=True, text=True, env=env, check=False,
                )
                if p.returncode != 0:
                    print(f"{method} T={T} iters={iters} failed:\n{p.stderr[-2000:]}")
                    continue
                row = json.loads(p.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{method:9s} T={T:5d} iters={iters:3d} peak={row['peak_bytes'] / 2**20:9.1f}"
                      f" MiB rss={row['rss_bytes'] / 2**20:8.1f} MiB grad={row['grad_s']:.4f} s"
                      f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
                OUT.parent.mkdir(parents=True, exist_ok=True)
                OUT.write_text(json.dumps({"machine": _machine(), "rows": rows}, indent=1))


def table(data: dict) -> str:
    """Markdown table of a results file (used for docs/benchmarks.md)."""
    lines = [
        "| T | iters | method | XLA peak (MiB) | XLA temp (MiB) | process RSS (MiB) | grad (s) |",
        "|---:|---:|:---|---:|---:|---:|---:|",
    ]
    rows = sorted(data["rows"], key=lambda r: (r["T"], r["iters"], r["method"]))
    for r in rows:
        lines.append(
            f"| {r['T']} | {r['iters']} | {r['method']} | {r['peak_bytes'] / 2**20:.1f} | "
            f"{r['temp_bytes'] / 2**20:.1f} | {r['rss_bytes'] / 2**20:.0f} | {r['grad_s']:.3f} |"
        )
    return "\n".join(lines)


def _machine() -> dict:
    import jax

    return {
        "platform": platform.platform(), "python": platform.python_version(),
        "jax": jax.__version__, "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "batch": BATCH, "D": D, "K": K, "dtype": "float32",
    }


if __name__ == "__main__":
    main()

"""Benchmark our LDS / HMM smoothers against dynamax 1.0.3 (float32, CPU, jit, vmap over 16).

Run ``python bench/bench_messages.py`` (no arguments).  Every configuration runs in a fresh
subprocess (a parallel LDS scan at T=10000 is known to hang after other compiled calls in the
same process) with a timeout; both implementations of a row are timed in that same process, so
their ratio is robust to the noise of a shared machine.  Prints a table and writes
``bench/results/messages.json``.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

BATCH = 16
REPEATS = 21  # median of >= 20 timed calls
TIMEOUT_S = 900
LDS_D = 4
TS = (100, 1000, 10000)
HMM_KS = (4, 16, 64)
# XLA flags for the worker processes (empty: XLA's defaults); see _run_config
_ENV_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "messages.json"


# ----------------------------------------------------------------------------------------------
# worker side (runs inside the subprocess)


def _time(fn, *args) -> float:
    import jax

    for _ in range(2):  # compile + warm
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _watchdog(stage: list, idle_s: float = 90.0) -> None:
    """Exit the worker when the process has used no CPU for `idle_s` seconds.

    dynamax's parallel LDS smoother at T=10000 compiles (~2 min) but its first call never
    returns: every XLA CPU thread waits on a futex with no work (a runtime deadlock; seen with
    jax 0.10.2, also with --xla_cpu_multi_thread_eigen=false).  A busy process on a loaded
    machine still gets CPU time, so no progress at all means a hang.
    """
    import threading

    def loop():
        last, since = time.process_time(), time.monotonic()
        while True:
            time.sleep(5.0)
            now = time.process_time()
            if now - last > 0.05:
                last, since = now, time.monotonic()
            elif time.monotonic() - since > idle_s:
                print(f"HANG {stage[0]}: no CPU progress for {idle_s:.0f} s", flush=True)
                os._exit(3)

    threading.Thread(target=loop, daemon=True).start()


def _time_pair(name, ours, ours_arg, ours_get, theirs, theirs_arg, theirs_get):
    """Time ours first (reported at once, so a dynamax timeout still leaves our time), then
    dynamax, after checking that both give the same smoothed marginals (float32)."""
    import numpy as np

    stage = ["ours"]
    _watchdog(stage)
    a = np.asarray(ours_get(ours(ours_arg)))
    ours_s = _time(ours, ours_arg)
    print("OURS " + json.dumps(ours_s), flush=True)
    stage[0] = "dynamax"
    b = np.asarray(theirs_get(theirs(theirs_arg)))
    err = float(np.max(np.abs(a - b)))
    if not err < 1e-2:
        raise RuntimeError(f"{name} results disagree with dynamax: max abs diff {err}")
    return ours_s, _time(theirs, theirs_arg)


def _lds_case(impl: str, T: int, D: int) -> tuple[float, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from dynamax.linear_gaussian_ssm import inference as dx_seq
    from dynamax.linear_gaussian_ssm import parallel_inference as dx_par

    from numpyro_svae.messages.lds import (
        LDSPotentials,
        lds_smoother_parallel,
        lds_smoother_sequential,
    )

    rng = np.random.default_rng(0)
    Aq, _ = np.linalg.qr(rng.normal(size=(D, D)))
    A = 0.95 * Aq
    Q = 0.1 * np.eye(D)
    Rv = 0.5 * np.eye(D)
    y = rng.normal(size=(BATCH, T, D)).astype(np.float32)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731

    # dynamax: time-invariant model, identity emission matrix, observations y
    params = dx_seq.make_lgssm_params(
        f32(np.zeros(D)), f32(np.eye(D)), f32(A), f32(Q), f32(np.eye(D)), f32(Rv)
    )
    # ours: the same posterior as per-step potentials (full R, time-varying arrays as an SVAE
    # encoder would produce them)
    Qi, Rvi = np.linalg.inv(Q), np.linalg.inv(Rv)
    rep = lambda x, n: np.broadcast_to(x, (BATCH, n) + x.shape).copy()  # noqa: E731
    pots = LDSPotentials(
        J_init=f32(np.broadcast_to(np.eye(D), (BATCH, D, D))),
        h_init=f32(np.zeros((BATCH, D))),
        J11=f32(rep(A.T @ Qi @ A, T - 1)),
        J12=f32(rep(A.T @ Qi, T - 1)),
        J22=f32(rep(Qi, T - 1)),
        h1=f32(np.zeros((BATCH, T - 1, D))),
        h2=f32(np.zeros((BATCH, T - 1, D))),
        R=f32(rep(Rvi, T)),
        r=f32(y @ Rvi),
    )
    if impl == "sequential":
        ours = jax.jit(jax.vmap(lds_smoother_sequential))
        theirs = jax.jit(jax.vmap(lambda yy: dx_seq.lgssm_smoother(params, yy)))
    else:
        ours = jax.jit(jax.vmap(lds_smoother_parallel))
        theirs = jax.jit(jax.vmap(lambda yy: dx_par.lgssm_smoother(params, yy)))
    return _time_pair("LDS", ours, pots, lambda o: o.Ez,
                      theirs, f32(y), lambda o: o.smoothed_means)


def _hmm_case(impl: str, T: int, K: int) -> tuple[float, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from dynamax.hidden_markov_model import inference as dx_seq
    from dynamax.hidden_markov_model import parallel_inference as dx_par

    from numpyro_svae.messages import hmm

    rng = np.random.default_rng(0)
    P = rng.dirichlet(np.ones(K) * 0.5 + 5.0 * np.eye(K)[0], size=K)
    P = 0.2 * P + 0.8 * np.eye(K)
    P = P / P.sum(1, keepdims=True)
    pi = np.ones(K) / K
    ll = rng.normal(size=(BATCH, T, K)).astype(np.float32)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    pots = hmm.HMMPotentials(
        log_init=f32(np.broadcast_to(np.log(pi), (BATCH, K))),
        log_trans=f32(np.broadcast_to(np.log(P), (BATCH, K, K))),
        log_lik=f32(ll),
    )
    pi32, P32 = f32(pi), f32(P)
    if impl == "sequential":
        ours = jax.jit(jax.vmap(hmm.hmm_smoother_sequential))
        theirs = jax.jit(jax.vmap(lambda l: dx_seq.hmm_smoother(pi32, P32, l)))  # noqa: E741
    else:
        ours = jax.jit(jax.vmap(hmm.hmm_smoother_parallel))
        theirs = jax.jit(jax.vmap(lambda l: dx_par.hmm_smoother(pi32, P32, l)))  # noqa: E741
    return _time_pair("HMM", ours, pots, lambda o: o.marginals,
                      theirs, f32(ll), lambda o: o.smoothed_probs)


def _worker(kernel: str, impl: str, T: int, dk: int) -> None:
    import jax

    jax.config.update("jax_enable_x64", False)
    fn = _lds_case if kernel == "lds" else _hmm_case
    ours_s, dynamax_s = fn(impl, T, dk)
    print("RESULT " + json.dumps({"ours_s": ours_s, "dynamax_s": dynamax_s}))


# ----------------------------------------------------------------------------------------------
# driver


def _hmm_available() -> str | None:
    """None when numpyro_svae.messages.hmm imports and has the smoothers, else the reason."""
    code = (
        "from numpyro_svae.messages import hmm; "
        "hmm.HMMPotentials; hmm.hmm_smoother_sequential; hmm.hmm_smoother_parallel"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    return None if res.returncode == 0 else res.stderr.strip().splitlines()[-1]


def _run_config(kernel: str, impl: str, T: int, dk: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, "--worker", kernel, impl, str(T), str(dk)]
    row = {"kernel": kernel, "impl": impl, "T": T, "D_or_K": dk,
           "load_avg_1m_start": round(os.getloadavg()[0], 2)}
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        ours = [json.loads(ln[5:]) for ln in out.splitlines() if ln.startswith("OURS ")]
        return dict(row, ours_s=ours[-1] if ours else None, dynamax_s=None, ratio=None,
                    note=f"timeout {TIMEOUT_S}s" + (" (in dynamax)" if ours else ""))
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    hang = [ln[5:] for ln in res.stdout.splitlines() if ln.startswith("HANG ")]
    ours = [json.loads(ln[5:]) for ln in res.stdout.splitlines() if ln.startswith("OURS ")]
    if hang:
        return dict(row, ours_s=ours[-1] if ours else None, dynamax_s=None, ratio=None,
                    note=f"hang in {hang[-1]} (XLA CPU deadlock, see _watchdog)")
    if res.returncode != 0 or not lines:
        tail = (res.stderr.strip().splitlines() or ["?"])[-1]
        return dict(row, ours_s=None, dynamax_s=None, ratio=None, note=f"failed: {tail}")
    r = json.loads(lines[-1][len("RESULT "):])
    return dict(row, ours_s=r["ours_s"], dynamax_s=r["dynamax_s"],
                ratio=r["ours_s"] / r["dynamax_s"], load_avg_1m_end=round(os.getloadavg()[0], 2))


def _machine() -> dict:
    model = "?"
    try:
        for ln in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                model = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import jax

    return {"nproc": os.cpu_count(), "cpu": model, "jax": jax.__version__,
            "python": platform.python_version(), "batch": BATCH, "repeats": REPEATS,
            "dtype": "float32", "backend": "cpu", "xla_flags": _ENV_XLA_FLAGS,
            "load_avg_1m_5m_15m": [round(x, 2) for x in os.getloadavg()],
            "note": "shared machine; load_avg_1m_start/_end per row"}


def main(only: str | None = None) -> None:
    """Run every configuration (or only the `only` kernel's, keeping the other kernel's rows
    of an existing results file)."""
    configs = [("lds", impl, T, LDS_D) for impl in ("sequential", "parallel") for T in TS]
    hmm_reason = _hmm_available()
    if hmm_reason is None:
        configs += [("hmm", impl, T, K) for impl in ("sequential", "parallel")
                    for K in HMM_KS for T in TS]
    else:
        print(f"note: skipping HMM rows, numpyro_svae.messages.hmm unavailable: {hmm_reason}")
    rows = []
    if only is not None:
        configs = [c for c in configs if c[0] == only]
        if OUT.exists():
            rows = [r for r in json.loads(OUT.read_text())["rows"] if r["kernel"] != only]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    print(f"{'kernel':6} {'impl':10} {'T':>6} {'D/K':>4} {'ours_s':>10} {'dynamax_s':>10} "
          f"{'ratio':>6}", flush=True)
    for cfg in configs:
        row = _run_config(*cfg)
        rows.append(row)
        if row["ratio"] is None:
            print(f"{row['kernel']:6} {row['impl']:10} {row['T']:>6} {row['D_or_K']:>4} "
                  f"{row['note']}", flush=True)
        else:
            print(f"{row['kernel']:6} {row['impl']:10} {row['T']:>6} {row['D_or_K']:>4} "
                  f"{row['ours_s']:>10.5f} {row['dynamax_s']:>10.5f} {row['ratio']:>6.2f}",
                  flush=True)
        # written after every row, so an interrupted run still leaves its finished rows
        OUT.write_text(json.dumps({"machine": _machine(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif len(sys.argv) > 2 and sys.argv[1] == "--only":
        main(sys.argv[2])  # e.g. `--only hmm` refreshes the HMM rows
    else:
        main()

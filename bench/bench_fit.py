"""Default `numpyro_svae.fit` end to end: regime recovery, stage by stage wall time, failures.

    python bench/bench_fit.py --seeds 0 1 2 3 4
    python bench/bench_fit.py --data mocap6 --test-trial 13_29 --seeds 0 [--mocap6 PATH]
    python bench/bench_fit.py --data basic_motions --seeds 0

``synthetic``: the data and the hand-written SLDS model of ``examples/synthetic_slds.py``
(N = 16 sequences of T = 60 frames, K = 3 regimes, D = 2, 10 channels, nonlinear decoder),
one data set per seed, trained by ``fit`` with every default (no recipe); scored by the frame
accuracy of ``argmax q(k_t)`` (t >= 1) on all 16 sequences after the best one-to-one
relabelling.  ``mocap6``: the ready-made SLDS (K = 8, D = 8, hidden 64) on 100-frame
windows (stride 50) of the five training trials, one trial held out (``--test-trial``; the
data as ``bench/bench_real.py`` loads them), trained by ``fit`` with every default; scored by
the held-out segmentation ARI beside an AR(1)-HMM with the same K fitted by
``numpyro_svae.arhmm`` to the training windows' observations.  ``basic_motions``: the same
with the ready-made SLDS at K = 4, D = 4 on the 10 training clips of BasicMotions (the
``aeon`` wheel's split), scored on its 10 test clips.  Each run records the stages
(steps, stop reason, wall time), skipped steps, warnings and the total wall time; results are
appended to
``bench/results/fit.json`` under ``runs.<data>`` (one row per seed).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time
import warnings

import jax
import numpy as np

import numpyro_svae as svae
from numpyro_svae.metrics import adjusted_rand_index, segmentation_accuracy

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "fit.json"
sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "bench")]


def _machine() -> dict:
    import os

    return {"platform": platform.platform(), "cpus": os.cpu_count(),
            "backend": jax.default_backend(), "jax": jax.__version__,
            "load_avg_1min": os.getloadavg()[0], "xla_flags": os.environ.get("XLA_FLAGS", "")}


def _stages(res) -> list:
    return [{"name": s.name, "steps": int(s.steps), "stop": s.stop_reason,
             "final_loss": float(s.final_loss), "skipped": int(s.skipped_steps),
             "seconds": float(s.seconds)} for s in res.summary.stages]


def run_synthetic(seed: int) -> dict:
    from synthetic_slds import slds

    N, T, K, D, Dx = 16, 60, 3, 2, 10
    data = svae.datasets.synthetic.synthetic_slds(seed, num_sequences=N, num_timesteps=T,
                                                  num_regimes=K, latent_dim=D, obs_dim=Dx,
                                                  nonlinear=True)
    x = np.asarray(data.x)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", svae.FitWarning)
        res = svae.fit(slds, x, model_kwargs=dict(K=K, D=D), key=seed, progress=False)
    seconds = time.perf_counter() - t0
    post = res.guide.posterior(res.params, res.transform(x), N=N, T=T, K=K, D=D, Dx=Dx)
    pred = np.asarray(post.regime_marginals).argmax(-1)
    acc = segmentation_accuracy(pred[:, 1:], np.asarray(data.k)[:, 1:], K, K)
    finite = all(bool(np.all(np.isfinite(np.asarray(v))))
                 for v in jax.tree.leaves(res.params) if hasattr(v, "dtype"))
    return {"seed": seed, "accuracy": float(acc), "seconds": seconds,
            "stages": _stages(res), "chosen_restart": int(res.summary.chosen),
            "restart_val_elbo": [float(r.val_elbo) for r in res.summary.restarts],
            "skipped_steps": int(res.summary.skipped_steps),
            "regimes_used": res.summary.regimes_used, "params_finite": finite,
            "warnings": [str(w.message) for w in caught]}


def run_real(name: str, seed: int, path: str, test_trial: str) -> dict:
    import bench_real

    from numpyro_svae import arhmm

    cfg = dict(bench_real.CONFIG[name], test_trial=test_trial)
    data = bench_real.load(name, cfg, pathlib.Path(path))
    K, D, hidden = cfg["K"], cfg["D"], (cfg["hidden"],) * 2
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", svae.FitWarning)
        res = svae.fit(svae.models.slds_model, data.train_x, mask=data.train_mask,
                       model_kwargs=dict(K=K, D=D, hidden=hidden), key=seed, progress=False)
    seconds = time.perf_counter() - t0
    x_te, m_te = data.test_x, data.test_mask
    post = res.guide.posterior(res.params, np.where(m_te[..., None], res.transform(x_te), 0.0),
                               N=x_te.shape[0], T=x_te.shape[1], Dx=x_te.shape[2], K=K, D=D,
                               hidden=hidden, mask=m_te)
    pred = np.asarray(post.regime_marginals).argmax(-1)
    pred = pred[:, 1:] if pred.shape[1] == x_te.shape[1] else pred  # the leading regime
    keep = m_te[:, 1:] & (data.test_labels[:, 1:] >= 0)
    ari = adjusted_rand_index(pred[keep], data.test_labels[:, 1:][keep])
    base = arhmm.fit_arhmm(np.asarray(data.train_x, np.float64), K, key=jax.random.key(seed),
                           mask=data.train_mask)
    seg = arhmm.segment(base, np.asarray(x_te, np.float64), m_te)[:, 1:]
    ari_ar = adjusted_rand_index(seg[keep], data.test_labels[:, 1:][keep])
    return {"seed": seed, "test_trial": test_trial if name == "mocap6" else None,
            "ari": float(ari),
            "arhmm_ari": float(ari_ar), "seconds": seconds, "stages": _stages(res),
            "skipped_steps": int(res.summary.skipped_steps),
            "regimes_used": res.summary.regimes_used,
            "val_elbo": float(res.summary.val_elbo), "baseline": float(res.summary.baseline),
            "warnings": [str(w.message) for w in caught]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=("synthetic", "mocap6", "basic_motions"),
                   default="synthetic")
    p.add_argument("--mocap6", default=str(ROOT.parent / "shared" / "data" / "mocap6"),
                   help="mocap6 folder (with --data mocap6)")
    p.add_argument("--test-trial", default="13_29", help="mocap6 trial held out")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    rows = []
    for s in a.seeds:
        row = (run_synthetic(s) if a.data == "synthetic"
               else run_real(a.data, s, a.mocap6, a.test_trial))
        print(json.dumps({k: row[k] for k in row if k != "stages"}), flush=True)
        rows.append(row)
    out = pathlib.Path(a.out)
    stored = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    name = f"mocap6_{a.test_trial}" if a.data == "mocap6" else a.data
    stored["runs"][name] = {"rows": rows, "machine": _machine(),
                              "command": "python bench/bench_fit.py " + " ".join(
                                  argv if argv is not None else sys.argv[1:])}
    out.write_text(json.dumps(stored, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

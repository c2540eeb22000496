"""Collect ``bench_real.py --out FILE`` runs of several seeds into one file, with paired
per-mask imputation comparisons.

``python bench/real_seeds.py RUN.json [RUN.json ...] --out FILE [--dataset NAME] [--note TEXT]``

Each input is a ``bench_real.py --seed S --out RUN.json`` result (or ``real.json``); only the
rows and run of ``--dataset`` (default ``mocap6``) are taken, and the seed is read from that
run's configuration.  The output has ``rows`` (each input's rows with a ``seed``
key), ``runs`` (each input's ``runs.<data set>`` under ``seed<S>``), ``paired`` and
``note``.  ``paired`` compares the SLDS-SVAE's imputation RMSE with every other model's, mask
by mask (``runs.<data set>.timings.<model>.impute_rmse_per_mask``): per seed and over all
(seed, mask) pairs, the mean difference (negative = the SLDS-SVAE is better), its standard
error and the number of masks the SLDS-SVAE wins.  Masks are independent draws, so the
standard error treats them as independent; the fitted models are shared by a seed's masks,
so the pooled figure says how much the masks vary, not how much refitting would.
Prints a Markdown table of the rows and the paired comparisons.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

REF = "slds_svae"


def paired(diffs: np.ndarray) -> dict:
    """Mean, standard error and wins of per-mask differences (REF minus other)."""
    n = diffs.size
    se = float(diffs.std(ddof=1) / np.sqrt(n)) if n > 1 else None
    return {"mean_diff": float(diffs.mean()), "se": se, "wins": int((diffs < 0).sum()),
            "masks": int(n)}


def collect(paths: list[pathlib.Path], ds: str = "mocap6") -> dict:
    rows, runs, per_seed = [], {}, {}
    for p in paths:
        d = json.loads(p.read_text())
        if ds not in d.get("runs", {}):
            raise SystemExit(f"{p}: no {ds!r} run (it has {sorted(d.get('runs', {}))})")
        run = d["runs"][ds]
        seed = run["config"]["seed"]
        if f"seed{seed}" in runs:
            raise SystemExit(f"{p}: seed {seed} given twice")
        rows += [{"seed": seed, **r} for r in d["rows"] if r["dataset"] == ds]
        runs[f"seed{seed}"] = {"dataset": ds, "source": p.name, **run}
        per_seed[seed] = {m: np.asarray(t["impute_rmse_per_mask"])
                          for m, t in run["timings"].items() if "impute_rmse_per_mask" in t}
    out: dict = {"per_seed": {}, "pooled": {}}
    others = sorted({m for s in per_seed.values() for m in s if m != REF})
    for m in others:
        pooled = []
        for seed, scores in sorted(per_seed.items()):
            if REF in scores and m in scores:
                d = scores[REF] - scores[m]
                out["per_seed"].setdefault(str(seed), {})[m] = paired(d)
                pooled.append(d)
        if pooled:
            out["pooled"][m] = paired(np.concatenate(pooled))
    return {"rows": rows, "runs": runs, "paired": out}


def table(result: dict) -> str:
    lines = ["| seed | model | ARI | accuracy | impute RMSE | impute loglik | held-out bound / "
             "frame | regimes used | seconds |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]

    def f(v, nd):
        return "n/a" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    for r in result["rows"]:
        lines.append(f"| {r['seed']} | {r['model']} | {f(r['ari'], 3)} | {f(r['accuracy'], 3)} | "
                     f"{f(r['impute_rmse'], 3)} | {f(r['impute_loglik'], 3)} | "
                     f"{f(r['heldout_bound_per_frame'], 2)} | {f(r['regimes_used'], 0)} | "
                     f"{f(r['seconds'], 0)} |")
    lines += ["", f"Per-mask RMSE differences, {REF} minus the other model (negative = "
              f"{REF} better):", "", "| seed | other | mean diff | se | wins / masks |",
              "|---|---|---:|---:|---:|"]
    p = result["paired"]
    for seed, by in p["per_seed"].items():
        for m, s in by.items():
            lines.append(f"| {seed} | {m} | {s['mean_diff']:+.3f} | {f(s['se'], 3)} | "
                         f"{s['wins']} / {s['masks']} |")
    for m, s in p["pooled"].items():
        lines.append(f"| all | {m} | {s['mean_diff']:+.3f} | {f(s['se'], 3)} | "
                     f"{s['wins']} / {s['masks']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=pathlib.Path)
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--dataset", default="mocap6")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    for p in args.runs:
        if not p.is_file():
            ap.error(f"no such file: {p}")
    result = {"note": args.note, **collect(args.runs, args.dataset)}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

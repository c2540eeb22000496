"""The ``numpyro-svae`` command: ``fit``, ``evaluate`` and ``demo``.

``fit`` trains an SLDS / LDS / HMM structured VAE on a dataset and writes, into one output
folder: ``checkpoint.npz`` + ``checkpoint.json`` (safe formats, written atomically, with a
checksum), ``posterior.nc`` (ArviZ), PNG plots, ``metrics.json`` and ``report.md``. The folder is
assembled under a temporary name and renamed at the end, so a folder that exists is complete.
``fit --resume`` continues from the checkpoint in the output folder. ``evaluate`` scores a
finished run on its held-out data. ``demo`` is ``fit`` on BasicMotions with good defaults.

Bad input (a path to nothing, a malformed file, an incompatible or corrupted checkpoint) gives
one error line and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Any, NamedTuple

import numpy as np

__all__ = ["main", "FitConfig", "CLIError"]

CHECKPOINT_VERSION = 1


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Everything that defines a run (stored in the checkpoint; resume requires equality)."""

    dataset: str = "basic_motions"
    data_path: str | None = None
    family: str = "slds"
    K: int = 4
    D: int = 4
    hidden: int = 64
    steps: int = 1000
    seed: int = 0
    lr: float = 3e-3
    natgrad_lr: float = 0.05
    max_iters: int = 10
    window: int | None = None
    fast: bool = False

    def identity(self) -> dict:
        """The fields a resumed run must share with the checkpoint."""
        d = dataclasses.asdict(self)
        for k in ("steps", "fast"):
            d.pop(k)
        return d


DEMO = FitConfig(dataset="basic_motions", family="slds", K=4, D=4, hidden=64, steps=250,
                 lr=3e-3, natgrad_lr=0.05)
"""Defaults of ``numpyro-svae demo``: sized to finish in under 10 minutes on 2 CPU cores."""


class Data(NamedTuple):
    train_x: np.ndarray  # [N, T, Dx]
    train_labels: np.ndarray | None  # [N, T] int (-1 = unknown)
    train_mask: np.ndarray  # [N, T] bool
    test_x: np.ndarray
    test_labels: np.ndarray | None
    test_mask: np.ndarray
    label_names: tuple


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------


def load_data(cfg: FitConfig) -> Data:
    """Load the dataset named in `cfg` (raises CLIError on any data problem)."""
    from . import datasets

    try:
        if cfg.dataset == "basic_motions":
            d = datasets.load_basic_motions()
        elif cfg.dataset == "mocap6":
            if cfg.data_path is None:
                raise CLIError("--data-path is required for --dataset mocap6")
            d = datasets.load_mocap6(cfg.data_path)
        elif cfg.dataset == "synthetic":
            s = datasets.synthetic_slds(
                cfg.seed, num_sequences=16, num_timesteps=100, num_regimes=3,
                latent_dim=2, obs_dim=10)
            x, k = np.asarray(s.x, np.float32), np.asarray(s.k)
            n = x.shape[0] // 2
            ones = np.ones(x.shape[:2], bool)
            return Data(x[:n], k[:n], ones[:n], x[n:], k[n:], ones[n:],
                        tuple(f"regime {i}" for i in range(3)))
        else:
            return _load_file(cfg.dataset)
    except CLIError:
        raise
    except (FileNotFoundError, ValueError, ImportError, OSError, KeyError) as e:
        raise CLIError(f"cannot load dataset {cfg.dataset!r}: {e}") from None
    return Data(d.train_x, d.train_labels, np.asarray(d.train_mask, bool), d.test_x,
                d.test_labels, np.asarray(d.test_mask, bool), tuple(d.label_names))


def _load_file(path: str) -> Data:
    """A user file: ``.npz`` with ``x`` [N, T, Dx] and optional ``labels`` [N, T], ``mask``."""
    p = pathlib.Path(path)
    if not p.exists():
        raise CLIError(
            f"dataset {path!r} is neither a known name (basic_motions, mocap6, synthetic) "
            "nor an existing file")
    if p.suffix != ".npz":
        raise CLIError(f"dataset file {path!r} must be a .npz holding `x` [N, T, Dx]")
    try:
        with np.load(p, allow_pickle=False) as f:
            x = np.asarray(f["x"], np.float32)
            labels = np.asarray(f["labels"]) if "labels" in f else None
            mask = np.asarray(f["mask"], bool) if "mask" in f else np.ones(x.shape[:2], bool)
    except KeyError:
        raise CLIError(f"dataset file {path!r} has no array `x`") from None
    except Exception as e:  # zip/format errors from a malformed file
        raise CLIError(f"dataset file {path!r} is not a readable .npz: {e}") from None
    if x.ndim != 3:
        raise CLIError(f"`x` in {path!r} must have shape [N, T, Dx]; got {list(x.shape)}")
    if labels is not None and labels.shape != x.shape[:2]:
        raise CLIError(f"`labels` in {path!r} must have shape {list(x.shape[:2])}; "
                       f"got {list(labels.shape)}")
    if mask.shape != x.shape[:2]:
        raise CLIError(f"`mask` in {path!r} must have shape {list(x.shape[:2])}; "
                       f"got {list(mask.shape)}")
    if x.shape[0] < 2:
        raise CLIError(f"{path!r} needs at least 2 sequences (train/test split); got {x.shape[0]}")
    n = max(1, int(round(0.8 * x.shape[0])))
    lab = (labels[:n], labels[n:]) if labels is not None else (None, None)
    names = tuple(str(i) for i in np.unique(labels[labels >= 0])) if labels is not None else ()
    return Data(x[:n], lab[0], mask[:n], x[n:], lab[1], mask[n:], names)


# ------------------------------------------------------------------------------------------
# model, guide, training
# ------------------------------------------------------------------------------------------


class Run(NamedTuple):
    model: Any
    guide: Any
    svi: Any
    model_kwargs: dict


def build(cfg: FitConfig, data: Data) -> Run:
    """Model, guide and SVI object for `cfg` on the training data."""
    import jax
    import optax
    from numpyro.infer import SVI

    from . import models, nn
    from .elbo import SVAE_ELBO
    from .guide import SVAEGuide
    from .optim import natural_gradient

    N, T, Dx = data.train_x.shape
    model = models.make_model(cfg.family)
    hidden = (cfg.hidden, cfg.hidden)
    kw = dict(N=N, T=T, Dx=Dx, D=cfg.D, hidden=hidden, mask=data.train_mask)
    if cfg.family != "lds":
        kw["K"] = cfg.K
    enc = nn.GaussianPotentialEncoder(obs_dim=Dx, latent_dim=cfg.D, hidden=hidden,
                                      key=jax.random.key(cfg.seed + 1))
    guide = SVAEGuide(model, encoder=enc, max_iters=cfg.max_iters)
    optim = natural_gradient(natgrad_lr=cfg.natgrad_lr, other=optax.adam(cfg.lr))
    svi = SVI(model, guide, optim, loss=SVAE_ELBO())
    return Run(model, guide, svi, kw)


def _flatten_state(state) -> tuple[list[np.ndarray], Any]:
    import jax

    leaves, treedef = jax.tree_util.tree_flatten(state)
    out = []
    for leaf in leaves:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out.append(np.asarray(leaf))
    return out, treedef


def save_checkpoint(folder: pathlib.Path, state, cfg: FitConfig, step: int,
                    losses: np.ndarray) -> None:
    """Write ``checkpoint.npz`` and ``checkpoint.json`` atomically (no pickle)."""
    leaves, _ = _flatten_state(state)
    arrays = {f"leaf_{i:04d}": a for i, a in enumerate(leaves)}
    arrays["losses"] = np.asarray(losses, np.float64)
    tmp = folder / "checkpoint.npz.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    meta = {
        "version": CHECKPOINT_VERSION,
        "config": dataclasses.asdict(cfg),
        "step": int(step),
        "sha256": digest,
        "leaves": [[list(a.shape), str(a.dtype)] for a in leaves],
    }
    os.replace(tmp, folder / "checkpoint.npz")
    tmpj = folder / "checkpoint.json.tmp"
    tmpj.write_text(json.dumps(meta, indent=1))
    os.replace(tmpj, folder / "checkpoint.json")


def load_checkpoint(folder: pathlib.Path, template_state, cfg: FitConfig):
    """Read a checkpoint written by :func:`save_checkpoint` into the structure of
    `template_state`; raises CLIError if missing, corrupted or incompatible with `cfg`."""
    import jax
    import jax.numpy as jnp

    meta_p, npz_p = folder / "checkpoint.json", folder / "checkpoint.npz"
    if not meta_p.exists() or not npz_p.exists():
        raise CLIError(f"no checkpoint to resume from in {str(folder)!r}")
    try:
        meta = json.loads(meta_p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CLIError(f"checkpoint metadata {str(meta_p)!r} is corrupted") from None
    if meta.get("version") != CHECKPOINT_VERSION:
        raise CLIError(f"checkpoint version {meta.get('version')} is not supported "
                       f"(expected {CHECKPOINT_VERSION})")
    if hashlib.sha256(npz_p.read_bytes()).hexdigest() != meta.get("sha256"):
        raise CLIError(f"checkpoint {str(npz_p)!r} is corrupted (checksum mismatch)")
    saved = FitConfig(**meta["config"]).identity()
    diff = {k: (saved[k], v) for k, v in cfg.identity().items() if saved.get(k) != v}
    if diff:
        what = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise CLIError(f"incompatible checkpoint in {str(folder)!r}: {what}")
    t_leaves, treedef = jax.tree_util.tree_flatten(template_state)
    with np.load(npz_p, allow_pickle=False) as f:
        stored = [f[f"leaf_{i:04d}"] for i in range(len(meta["leaves"]))]
        losses = np.asarray(f["losses"])
    if len(stored) != len(t_leaves):
        raise CLIError(f"incompatible checkpoint in {str(folder)!r}: {len(stored)} arrays, "
                       f"the model needs {len(t_leaves)}")
    leaves = []
    for i, (s, t) in enumerate(zip(stored, t_leaves, strict=True)):
        if jax.dtypes.issubdtype(t.dtype, jax.dtypes.prng_key):
            leaves.append(jax.random.wrap_key_data(jnp.asarray(s)))
            continue
        if tuple(s.shape) != tuple(t.shape):
            raise CLIError(f"incompatible checkpoint: array {i} has shape {list(s.shape)}, "
                           f"the model needs {list(t.shape)}")
        leaves.append(jnp.asarray(s, dtype=t.dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves), int(meta["step"]), losses


def train(run: Run, data: Data, cfg: FitConfig, *, steps: int, state=None,
          progress: bool = True):
    """Run `steps` SVI steps from `state` (or a fresh init). Returns (state, losses)."""
    import jax

    svi, kw = run.svi, run.model_kwargs
    x = data.train_x
    if state is None:
        state = svi.init(jax.random.PRNGKey(cfg.seed), x, **kw)
    update = jax.jit(lambda s: svi.update(s, x, **kw))
    losses = np.empty(steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="fit", file=sys.stderr, mininterval=1.0)
    for i in range(steps):
        state, loss = update(state)
        losses[i] = float(loss)
        if bar is not None:
            bar.update(1)
            if i % 10 == 0:
                bar.set_postfix(loss=f"{losses[i]:.4g}")
    if bar is not None:
        bar.close()
    return state, losses


# ------------------------------------------------------------------------------------------
# evaluation, outputs
# ------------------------------------------------------------------------------------------


def evaluate_run(run: Run, params, data: Data, cfg: FitConfig, *, seed: int = 0) -> dict:
    """Held-out metrics: segmentation (ARI, accuracy), imputation, held-out bound per frame."""
    import jax

    from . import metrics, predict

    N, T, Dx = data.test_x.shape
    kw = dict(run.model_kwargs, N=N, T=T, mask=data.test_mask)
    out: dict[str, Any] = {"dataset": cfg.dataset, "model": f"{cfg.family}_svae"}
    post = run.guide.posterior(params, data.test_x, **kw)
    marg = np.asarray(post.regime_marginals)
    if cfg.family != "lds" and data.test_labels is not None:
        pred = marg.argmax(-1)
        lab = data.test_labels[:, -pred.shape[1]:]
        ok = (lab >= 0) & data.test_mask[:, -pred.shape[1]:]
        out["ari"] = float(metrics.adjusted_rand_index(pred[ok], lab[ok]))
        out["accuracy"] = float(metrics.best_label_matching(pred[ok], lab[ok]).accuracy)
        out["regimes_used"] = int(metrics.regimes_used(marg.reshape(-1, marg.shape[-1])))
    else:
        out.update(ari=None, accuracy=None, regimes_used=1 if cfg.family == "lds" else None)
    gaps = np.asarray(metrics.random_gap_mask(seed, N, T, min_len=10, max_len=30, num_gaps=1))
    gaps = gaps & data.test_mask
    other = {k: v for k, v in kw.items() if k != "mask"}
    imp = predict.impute(run.guide, params, data.test_x, gaps,
                         num_samples=8 if cfg.fast else 50, rng_key=jax.random.key(seed),
                         **other)
    # score only frames that were observed in the data and hidden by the gap mask
    scored = gaps | ~data.test_mask
    out["impute_rmse"] = float(metrics.masked_rmse(data.test_x, np.asarray(imp.mean), scored))
    var = np.var(np.asarray(imp.samples), axis=0) + 1e-6
    out["impute_loglik"] = float(metrics.gaussian_masked_loglik(
        data.test_x, np.asarray(imp.mean), var, scored))
    iw = predict.importance_weighted_bound(
        run.guide, params, data.test_x, num_samples=2 if cfg.fast else 16,
        rng_key=jax.random.key(seed + 1), mask=data.test_mask, **other)
    out["heldout_bound_per_frame"] = float(
        np.sum(np.asarray(iw.predictive)) / max(1, int(np.sum(np.asarray(iw.frames)))))
    return out


def write_outputs(folder: pathlib.Path, run: Run, state, losses, data: Data, cfg: FitConfig,
                  metrics_: dict, seconds: float) -> None:
    """ArviZ file, plots, metrics.json and report.md into `folder`."""
    import jax
    import matplotlib

    matplotlib.use("Agg")
    from . import diagnostics, predict

    params = run.svi.get_params(state)
    N, T, Dx = data.test_x.shape
    kw = dict(run.model_kwargs, N=N, T=T, mask=data.test_mask)
    other = {k: v for k, v in kw.items() if k != "mask"}
    idata = diagnostics.to_inference_data(
        run.guide, params, data.test_x, num_draws=20 if cfg.fast else 200,
        rng_key=jax.random.key(cfg.seed), losses=losses, mask=data.test_mask, **other)
    idata.to_netcdf(str(folder / "posterior.nc"))
    post = run.guide.posterior(params, data.test_x, **kw)
    imp = predict.impute(run.guide, params, data.test_x, data.test_mask,
                         num_samples=8 if cfg.fast else 50,
                         rng_key=jax.random.key(cfg.seed + 2), **other)
    import matplotlib.pyplot as plt

    figs = {
        "elbo.png": lambda p: diagnostics.plot_elbo(losses, path=p),
        "reconstruction.png": lambda p: diagnostics.plot_reconstruction(
            data.test_x, imp.mean, lower=imp.lower, upper=imp.upper, path=p),
    }
    if cfg.family != "lds":
        lab = None
        if data.test_labels is not None:
            lab = data.test_labels[:, -post.regime_marginals.shape[1]:]
        figs["regimes.png"] = lambda p: diagnostics.plot_regimes(
            post.regime_marginals, lab, path=p)
        figs["transition_matrix.png"] = lambda p: diagnostics.plot_transition_matrix(
            post, path=p)
    plots = []
    for name, make in figs.items():
        fig = make(str(folder / name))
        plt.close(fig)
        plots.append(name)
    metrics_ = dict(metrics_, seconds=round(seconds, 1), steps=int(len(losses)),
                    final_loss=float(losses[-1]) if len(losses) else None)
    (folder / "metrics.json").write_text(json.dumps(metrics_, indent=1))
    lines = [
        f"# numpyro-svae run: {cfg.family.upper()}-SVAE on {cfg.dataset}",
        "",
        f"- configuration: K={cfg.K}, D={cfg.D}, hidden={cfg.hidden}, steps={len(losses)}, "
        f"seed={cfg.seed}, lr={cfg.lr}, natgrad_lr={cfg.natgrad_lr}",
        f"- data: train {list(data.train_x.shape)}, test {list(data.test_x.shape)} "
        "(standardised with training statistics)",
        f"- wall time: {seconds:.1f} s",
        "",
        "## Held-out metrics",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for k in ("heldout_bound_per_frame", "ari", "accuracy", "regimes_used", "impute_rmse",
              "impute_loglik", "final_loss"):
        v = metrics_.get(k)
        shown = "n/a" if v is None else (f"{v:.4g}" if isinstance(v, float) else v)
        lines.append(f"| {k} | {shown} |")
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "ArviZ: `posterior.nc` (`arviz.from_netcdf`). Checkpoint: `checkpoint.npz` "
              "+ `checkpoint.json` (`numpyro-svae fit --resume`)."]
    (folder / "report.md").write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------


def _staging(out: pathlib.Path) -> pathlib.Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def cmd_fit(cfg: FitConfig, out: pathlib.Path, *, resume: bool, progress: bool) -> dict:
    """Train, evaluate and write the run folder `out` (atomically)."""
    if out.exists() and not resume:
        raise CLIError(f"output folder {str(out)!r} exists; use --resume to continue it or "
                       "choose another --out")
    data = load_data(cfg)
    run = build(cfg, data)
    t0 = time.time()
    state, prev_losses, done = None, np.empty(0), 0
    if resume:
        import jax

        template = run.svi.init(jax.random.PRNGKey(cfg.seed), data.train_x, **run.model_kwargs)
        state, done, prev_losses = load_checkpoint(out, template, cfg)
    stage = _staging(out)
    try:
        state, losses = train(run, data, cfg, steps=max(0, cfg.steps - done), state=state,
                              progress=progress)
        losses = np.concatenate([prev_losses, losses])
        if not np.all(np.isfinite(losses[-1:])):
            raise CLIError("training diverged (non-finite loss); try a smaller --lr")
        save_checkpoint(stage, state, cfg, len(losses), losses)
        params = run.svi.get_params(state)
        m = evaluate_run(run, params, data, cfg, seed=cfg.seed)
        write_outputs(stage, run, state, losses, data, cfg, m, time.time() - t0)
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return m


def cmd_evaluate(run_dir: pathlib.Path) -> dict:
    """Re-score a finished run on its held-out data (prints and returns the metrics)."""
    meta_p = run_dir / "checkpoint.json"
    if not meta_p.exists():
        raise CLIError(f"{str(run_dir)!r} is not a numpyro-svae run folder (no checkpoint.json)")
    try:
        cfg = FitConfig(**json.loads(meta_p.read_text())["config"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CLIError(f"checkpoint metadata {str(meta_p)!r} is corrupted") from None
    import jax

    data = load_data(cfg)
    run = build(cfg, data)
    template = run.svi.init(jax.random.PRNGKey(cfg.seed), data.train_x, **run.model_kwargs)
    state, _, _ = load_checkpoint(run_dir, template, cfg)
    return evaluate_run(run, run.svi.get_params(state), data, cfg, seed=cfg.seed)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="numpyro-svae", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(q, defaults: FitConfig):
        q.add_argument("--dataset", default=defaults.dataset,
                       help="basic_motions | mocap6 | synthetic | path to a .npz with x [N,T,Dx]")
        q.add_argument("--data-path", default=None, help="folder of mocap6")
        q.add_argument("--family", default=defaults.family, choices=["slds", "lds", "hmm"])
        q.add_argument("--K", type=int, default=defaults.K, help="number of regimes")
        q.add_argument("--D", type=int, default=defaults.D, help="latent dimension")
        q.add_argument("--hidden", type=int, default=defaults.hidden, help="MLP width")
        q.add_argument("--steps", type=int, default=defaults.steps)
        q.add_argument("--seed", type=int, default=defaults.seed)
        q.add_argument("--lr", type=float, default=defaults.lr, help="Adam rate (networks)")
        q.add_argument("--natgrad-lr", type=float, default=defaults.natgrad_lr)
        q.add_argument("--max-iters", type=int, default=defaults.max_iters,
                       help="mean-field block updates per step")
        q.add_argument("--fast", action="store_true", help="fewer samples in evaluation")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")

    f = sub.add_parser("fit", help="train a model and write a run folder")
    common(f, FitConfig())
    f.add_argument("--out", required=True, help="output folder")
    f.add_argument("--resume", action="store_true", help="continue the run in --out")
    d = sub.add_parser("demo", help="fit on BasicMotions with good defaults (< 10 min)")
    common(d, DEMO)
    d.add_argument("--out", default="svae_demo", help="output folder (default svae_demo)")
    e = sub.add_parser("evaluate", help="score a finished run on its held-out data")
    e.add_argument("run", help="run folder written by fit")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``numpyro-svae`` console script."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "evaluate":
            m = cmd_evaluate(pathlib.Path(args.run))
            print(json.dumps(m, indent=1))
            return 0
        cfg = FitConfig(
            dataset=args.dataset, data_path=args.data_path, family=args.family, K=args.K,
            D=args.D, hidden=args.hidden, steps=args.steps, seed=args.seed, lr=args.lr,
            natgrad_lr=args.natgrad_lr, max_iters=args.max_iters, fast=args.fast)
        out = pathlib.Path(args.out)
        resume = getattr(args, "resume", False)
        if args.command == "demo" and out.exists():
            shutil.rmtree(out) if (out / "report.md").exists() else None
            if out.exists():
                raise CLIError(f"output folder {str(out)!r} exists and is not a demo run")
        m = cmd_fit(cfg, out, resume=resume, progress=not args.no_progress)
        print(f"wrote {out}/report.md")
        print(json.dumps(m, indent=1))
        return 0
    except CLIError as e:
        print(f"numpyro-svae: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("numpyro-svae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The ``numpyro-svae`` command: ``fit``, ``evaluate`` and ``demo``.

``fit`` trains an SLDS / LDS / HMM structured VAE on a dataset and writes, into one output
folder: ``checkpoint.npz`` + ``checkpoint.json`` (safe formats, written atomically, with a
checksum), ``posterior.nc`` (ArviZ), PNG plots, ``metrics.json`` and ``report.md``. The folder is
assembled under a temporary name and renamed at the end, so a folder that exists is complete.
``fit --resume`` continues from the checkpoint in the output folder. ``evaluate`` scores a
finished run on its held-out data. ``demo`` is ``fit`` on BasicMotions with good defaults.

``fit --init arhmm`` (SLDS only) starts the switching dynamics from data instead of at random
(:func:`switching_start`): an LDS-SVAE with the same networks is trained first
(``--init-steps``, the first half with the local KL down-weighted), an AR(1)-HMM is fitted
to its latent means and q(theta) of the SLDS is set from that segmentation
(`numpyro_svae.initialize.arhmm_init`); ``--freeze-networks`` then keeps the encoder and
decoder of the LDS-SVAE fixed. This is the recipe of ``bench/bench_real.py`` on mocap6.

Bad input (a path to nothing, a malformed file, an incompatible or corrupted checkpoint) gives
one error line and exit code 2, never a traceback. A run stores its data's absolute path and
fingerprint, which ``evaluate`` and ``fit --resume`` check; ``fit`` checkpoints every
``--checkpoint-every`` steps and on Ctrl-C / SIGTERM, so an interrupted run can be resumed
(`numpyro_svae.cli_checks`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import signal
import sys
import threading
import time
from typing import Any, NamedTuple

import numpy as np

from numpyro_svae._svi_state import strong_types

from .cli_checks import (
    CHECKPOINT_EVERY,
    LOG_EVERY,
    TrainingInterrupted,
    array_fingerprint,
    data_record,
    deferred_signals,
    fingerprint_problem,
    is_file_dataset,
    make_stage,
    missing_dataset_problem,
    npz_problem,
    out_problem,
    publish,
    resolve_dataset,
    stage_checkpoint,
    stale_stages,
)

__all__ = ["main", "FitConfig", "CLIError"]

# 2: the optimizer state holds the skip counters; checkpoint.json the data fingerprint
CHECKPOINT_VERSION = 2
NATURAL_STEPS = ("linear", "exact", "guarded")
"""`FitConfig.natural_step`: SGD on the unconstrained coordinates, exact natural steps, or SGD
with the exact step where the straight line overshoots.  The same tuple as
`numpyro_svae.optim.NATURAL_STEPS`, repeated so that the command checks its options before
JAX is imported (a test checks they agree)."""
NATGRAD_SCHEDULES = ("constant", "cosine")
"""`FitConfig.natgrad_schedule`: a constant natural-gradient rate, or a cosine decay from
``natgrad_lr`` to 0 over the run's ``steps`` (see `natgrad_rate`)."""


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
    init: str = "random"  # "random" | "arhmm" (switching initialisation, slds only)
    init_steps: int = 500  # LDS-SVAE steps of the switching initialisation
    freeze_networks: bool = False  # networks fixed after the switching initialisation
    natural_step: str = "linear"  # "linear" (SGD on u) | "exact" | "guarded" (need the guide)
    natgrad_schedule: str = "constant"  # "constant" | "cosine" (decay to 0 over `steps`)
    warm_start: bool = False  # slds: q(k) carried from step to step (seeded by --init arhmm)

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
    note: str = "standardised with training statistics"  # shown in the report
    fingerprint: str = ""  # of the arrays as read (`data_fingerprint`); "" = from the fields


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
            if cfg.window is not None:  # training windows; the held-out trial stays whole
                w = datasets.load_mocap6(cfg.data_path, window=cfg.window,
                                         stride=max(1, cfg.window // 2), drop_remainder=True)
                d = d._replace(train_x=w.train_x, train_labels=w.train_labels,
                               train_mask=w.train_mask)
        elif cfg.dataset == "synthetic":
            s = datasets.synthetic_slds(
                cfg.seed, num_sequences=16, num_timesteps=100, num_regimes=3,
                latent_dim=2, obs_dim=10)
            x, k = np.asarray(s.x, np.float32), np.asarray(s.k)
            n = x.shape[0] // 2
            ones = np.ones(x.shape[:2], bool)
            return Data(x[:n], k[:n], ones[:n], x[n:], k[n:], ones[n:],
                        tuple(f"regime {i}" for i in range(3)),
                        note="synthetic SLDS, 3 regimes, not standardised")
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
    problem = npz_problem(p)
    if problem:
        raise CLIError(problem)
    try:
        with np.load(p, allow_pickle=False) as f:
            raw = {k: np.asarray(f[k]) for k in ("x", "labels", "mask") if k in f}
    except ValueError as e:  # object arrays (pickled Python objects) are never read
        pickled = "bject" in str(e) or "pickle" in str(e)
        raise CLIError(f"dataset file {path!r} holds pickled Python objects (an object "
                       "array), which are not read: store numeric arrays" if pickled else
                       f"dataset file {path!r} is not a valid .npz: {e}") from None
    except Exception as e:  # zip/format errors from a malformed file
        raise CLIError(f"dataset file {path!r} is not a valid .npz: {e}") from None
    if "x" not in raw:
        raise CLIError(f"dataset file {path!r} has no array `x`")
    for k, a in raw.items():
        if a.dtype.kind not in "biuf":
            raise CLIError(f"`{k}` in {path!r} must hold numbers; got dtype {a.dtype}")
    x = raw["x"].astype(np.float32)
    labels = raw.get("labels")
    mask = raw["mask"].astype(bool) if "mask" in raw else np.ones(x.shape[:2], bool)
    if x.ndim != 3:
        raise CLIError(f"`x` in {path!r} must have shape [N, T, Dx]; got {list(x.shape)}")
    if x.shape[1] < 2:
        raise CLIError(f"`x` in {path!r} has T = {x.shape[1]} steps per sequence; sequences "
                       "must have T >= 2 steps (shape [N, T, Dx])")
    if x.shape[2] < 1:
        raise CLIError(f"`x` in {path!r} has Dx = 0 channels; it needs at least one channel "
                       "(shape [N, T, Dx])")
    if labels is not None and labels.shape != x.shape[:2]:
        raise CLIError(f"`labels` in {path!r} must have shape {list(x.shape[:2])}; "
                       f"got {list(labels.shape)}")
    if mask.shape != x.shape[:2]:
        raise CLIError(f"`mask` in {path!r} must have shape {list(x.shape[:2])}; "
                       f"got {list(mask.shape)}")
    if x.shape[0] < 2:
        raise CLIError(f"{path!r} needs at least 2 sequences (train/test split); got {x.shape[0]}")
    if labels is not None:
        if labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(
                labels == np.round(labels)):
            labels = labels.astype(np.int64)
        if labels.dtype.kind not in "iu":
            raise CLIError(f"`labels` in {path!r} must be integers (-1 = unknown); got "
                           f"dtype {labels.dtype}")
    finite = np.all(np.isfinite(x), axis=-1)  # [N, T]: frames with NaN/inf count as missing
    mask = mask & finite
    x = np.where(finite[..., None], x, np.float32(0.0))
    if not mask.any(axis=1).all():
        raise CLIError(f"every sequence in {path!r} needs at least one observed frame")
    n = min(x.shape[0] - 1, max(1, int(round(0.8 * x.shape[0]))))
    obs = x[:n][mask[:n]]  # [frames, Dx] observed training frames
    mean = obs.mean(0) if len(obs) else np.zeros(x.shape[-1], np.float32)
    std = obs.std(0) if len(obs) else np.ones(x.shape[-1], np.float32)
    std = np.where(std > 1e-8, std, 1.0)
    x = np.where(mask[..., None], (x - mean) / std, 0.0).astype(np.float32)
    lab = (labels[:n], labels[n:]) if labels is not None else (None, None)
    names = tuple(str(i) for i in np.unique(labels[labels >= 0])) if labels is not None else ()
    return Data(x[:n], lab[0], mask[:n], x[n:], lab[1], mask[n:], names,
                note=f"first {n} sequences train, the other {x.shape[0] - n} held out; "
                "channels standardised with training statistics",
                fingerprint=array_fingerprint(raw))


# ------------------------------------------------------------------------------------------
# model, guide, training
# ------------------------------------------------------------------------------------------


class Run:
    """Model, guides, SVI object and their compiled functions for one configuration.

    Built once per (configuration, data) in a process (see :func:`build`), so ``fit``,
    ``fit --resume`` and ``evaluate`` called in one process share every compilation.
    """

    def __init__(self, model, guide, svi, model_kwargs: dict, encoder, max_iters: int):
        self.model = model
        self.guide = guide  # fitted on the training shapes
        self.svi = svi
        self.model_kwargs = model_kwargs  # [N, T] training mask included
        self.encoder = encoder
        self.max_iters = max_iters
        self._updates: dict = {}
        self._template = None
        self._eval_guides: dict = {}

    def update(self, x, local_kl_weight: float | None = None):
        """The compiled SVI step ``state -> (state, loss)`` (compiled once per run and weight).

        NumPyro's ``stable_update``: a step whose loss or new state is not finite leaves
        the state as it was (with a fresh key) and returns its non-finite loss, so one bad
        Monte Carlo draw does not end a long run (`train` counts and reports them).
        ``local_kl_weight`` (a KL warm-up) steps with ``SVAE_ELBO(local_kl_weight=...)``;
        call `init` first (the warm-up SVI shares what ``SVI.init`` set up).
        """
        import jax

        if local_kl_weight not in self._updates:
            svi, kw = self.svi, self.model_kwargs
            if local_kl_weight is not None:
                from numpyro.infer import SVI

                from .elbo import SVAE_ELBO

                base = svi
                svi = SVI(self.model, self.guide, base.optim,
                          loss=SVAE_ELBO(local_kl_weight=local_kl_weight))
                svi.constrain_fn, svi.static_kwargs = base.constrain_fn, base.static_kwargs
            self._updates[local_kl_weight] = jax.jit(
                lambda s, x_, svi=svi: strong_types(svi.stable_update(s, x_, **kw)))
        step = self._updates[local_kl_weight]
        return lambda state: step(state, x)

    def init(self, seed: int, x, init_params: dict | None = None):
        """A fresh SVI state (and remember its structure as the resume template);
        ``init_params`` as in ``SVI.init``."""
        import jax

        state = strong_types(self.svi.init(jax.random.PRNGKey(seed), x, init_params=init_params,
                                      **self.model_kwargs))
        if self._template is None:
            self._template = jax.tree_util.tree_map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
        return state

    def template(self, seed: int, x):
        """Shapes and dtypes of the SVI state (what a checkpoint must hold)."""
        if self._template is None:
            self.init(seed, x)
        return self._template

    def eval_guide(self, N: int, T: int):
        """A guide for `N` sequences of `T` steps (the fitted one when the shapes agree).

        The guide reads its model's structure at the training shapes; held-out data with a
        different number of sequences gets its own guide on the same parameters.
        """
        kw = self.model_kwargs
        if (N, T) == (kw["N"], kw["T"]):
            return self.guide
        if (N, T) not in self._eval_guides:
            from .guide import SVAEGuide

            self._eval_guides[(N, T)] = SVAEGuide(self.model, encoder=self.encoder,
                                                  max_iters=self.max_iters)
        return self._eval_guides[(N, T)]




_RUNS: dict = {}  # (configuration, data fingerprint) -> Run; the last two built


def _fingerprint(data: Data) -> str:
    h = hashlib.sha256()
    for a in (data.train_x, data.train_mask, data.test_x, data.test_mask):
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def data_fingerprint(data: Data) -> str:
    """Content fingerprint a run stores of its data (`cli_checks.array_fingerprint`).

    A ``.npz`` file's is taken over its arrays as read, before standardisation (set by
    `_load_file`); a named dataset's over the loaded arrays, labels included. Unlike the
    cache key `_fingerprint`, a relabelled or rescaled copy of the data differs.
    """
    if data.fingerprint:
        return data.fingerprint
    return array_fingerprint({k: getattr(data, k) for k in (
        "train_x", "train_labels", "train_mask", "test_x", "test_labels", "test_mask")})


def natgrad_rate(cfg: FitConfig) -> dict:
    """`natural_gradient`'s rate arguments for `cfg`.

    ``constant``: ``natgrad_lr=cfg.natgrad_lr``.  ``cosine``: a schedule from
    ``cfg.natgrad_lr`` at the first step to 0 at step ``cfg.steps`` (the run's total; the
    optimizer's step count is part of the checkpoint, so a resume with a larger ``--steps``
    continues on the longer curve from where it stopped).  Stochastic VB settles only with
    a decaying rate; on mocap6 the decay kept the switching stage from drifting into fewer
    regimes (``docs/benchmarks.md``, real data).
    """
    if cfg.natgrad_schedule == "constant":
        return dict(natgrad_lr=cfg.natgrad_lr)
    import optax

    return dict(schedule=optax.cosine_decay_schedule(cfg.natgrad_lr, max(cfg.steps, 1),
                                                     alpha=0.0))


def build(cfg: FitConfig, data: Data) -> Run:
    """Model, guide and SVI object for `cfg` on the training data (cached per process)."""
    ident = cfg.identity()
    for k in ("dataset", "data_path"):  # where the data were read: the arrays are the key
        ident.pop(k)
    if cfg.natgrad_schedule != "constant":  # the decay's length is the run's `steps`
        ident["steps"] = cfg.steps
    key = (json.dumps(ident, sort_keys=True), _fingerprint(data))
    if key in _RUNS:
        return _RUNS[key]
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
    guide = SVAEGuide(model, encoder=enc, max_iters=cfg.max_iters,
                      warm_start=cfg.warm_start)
    # frozen networks: zero updates (the optimizer state differs from Adam's; a resume
    # with the other setting is refused by the configuration check before it is read)
    other = optax.set_to_zero() if cfg.freeze_networks else optax.adam(cfg.lr)
    # "exact": each q(theta) step lands on eta - lr * natgrad (SVAEGuide.retract);
    # "guarded": SGD on u except where that straight line overshoots the exact step
    optim = natural_gradient(**natgrad_rate(cfg), other=other,
                             guide=guide if cfg.natural_step != "linear" else None,
                             natural_step=cfg.natural_step)
    svi = SVI(model, guide, optim, loss=SVAE_ELBO())
    run = Run(model, guide, svi, kw, enc, cfg.max_iters)
    while len(_RUNS) >= 2:
        _RUNS.pop(next(iter(_RUNS)))
    _RUNS[key] = run
    return run


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
                    losses: np.ndarray, *, data: dict | None = None, complete: bool = True,
                    info: dict | None = None) -> None:
    """Write ``checkpoint.npz`` and ``checkpoint.json`` atomically (no pickle).

    ``data`` is the run's `cli_checks.data_record` (path and fingerprint, checked by
    ``evaluate`` and ``fit --resume``); ``complete=False`` marks a checkpoint written during
    training (periodically or on an interruption); ``info`` (the switching initialisation's
    summary) is carried to the metrics of a resumed run.
    """
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
        "complete": bool(complete),
    }
    if data is not None:
        meta["data"] = data
    if info:
        meta["info"] = info
    os.replace(tmp, folder / "checkpoint.npz")
    tmpj = folder / "checkpoint.json.tmp"
    tmpj.write_text(json.dumps(meta, indent=1))
    os.replace(tmpj, folder / "checkpoint.json")


def check_checkpoint(folder: pathlib.Path, cfg: FitConfig | None = None) -> dict:
    """Metadata of the checkpoint in `folder`, after checking its checksum and (given `cfg`)
    that it was written by the same configuration; raises CLIError otherwise."""
    meta_p, npz_p = folder / "checkpoint.json", folder / "checkpoint.npz"
    if not meta_p.exists() or not npz_p.exists():
        raise CLIError(f"no checkpoint to resume from in {str(folder)!r}")
    try:
        meta = json.loads(meta_p.read_text())
        saved = FitConfig(**meta["config"]).identity()
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise CLIError(f"checkpoint metadata {str(meta_p)!r} is corrupted") from None
    if meta.get("version") != CHECKPOINT_VERSION:
        raise CLIError(f"checkpoint version {meta.get('version')} is not supported "
                       f"(expected {CHECKPOINT_VERSION})")
    if hashlib.sha256(npz_p.read_bytes()).hexdigest() != meta.get("sha256"):
        raise CLIError(f"checkpoint {str(npz_p)!r} is corrupted (checksum mismatch)")
    if cfg is not None:
        diff = {k: (saved[k], v) for k, v in cfg.identity().items() if saved.get(k) != v}
        if ("dataset" in diff and (meta.get("data") or {}).get("fingerprint")
                and is_file_dataset(saved["dataset"]) and is_file_dataset(cfg.dataset)):
            diff.pop("dataset")  # data moved: its fingerprint is checked once loaded
        if diff:
            what = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise CLIError(f"incompatible checkpoint in {str(folder)!r}: {what}")
    return meta


def load_checkpoint(folder: pathlib.Path, template_state, cfg: FitConfig):
    """Read a checkpoint written by :func:`save_checkpoint` into the structure of
    `template_state` (arrays or ``jax.ShapeDtypeStruct``); raises CLIError if missing,
    corrupted or incompatible with `cfg`. Returns ``(state, step, losses)``."""
    import jax
    import jax.numpy as jnp

    meta = check_checkpoint(folder, cfg)
    npz_p = folder / "checkpoint.npz"
    t_leaves, treedef = jax.tree_util.tree_flatten(template_state)
    try:
        with np.load(npz_p, allow_pickle=False) as f:
            stored = [f[f"leaf_{i:04d}"] for i in range(len(meta["leaves"]))]
            losses = np.asarray(f["losses"])
    except Exception as e:  # a checkpoint whose checksum matches but cannot be read
        raise CLIError(f"checkpoint {str(npz_p)!r} cannot be read: {e}") from None
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


MAX_SKIPPED_IN_A_ROW = 20


def train(run: Run, data: Data, cfg: FitConfig, *, steps: int, state=None,
          progress: bool = True, warmup_steps: int = 0, warmup_weight: float = 0.1,
          desc: str = "fit", callback=None):
    """Run `steps` SVI steps from `state` (or a fresh init). Returns (state, losses).

    The first `warmup_steps` steps weight the local KL by `warmup_weight` (their losses
    are the weighted ones). Skipped steps (non-finite loss, state kept) appear as NaN in
    `losses`; more than `MAX_SKIPPED_IN_A_ROW` in a row end the run with a `CLIError`.
    ``callback(done, state, losses[:done])`` runs after each step (periodic checkpoints).
    Ctrl-C or SIGTERM raises `cli_checks.TrainingInterrupted`, a ``KeyboardInterrupt``
    holding the state and losses of the steps completed so far.
    """
    if state is None:
        state = run.init(cfg.seed, data.train_x)
    update = run.update(data.train_x)
    warm = run.update(data.train_x, warmup_weight) if warmup_steps > 0 else None
    losses = np.empty(steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc, file=sys.stderr, mininterval=1.0)
    in_a_row = 0
    done = (state, 0)  # one assignment, so an interruption never sees half a step
    try:
        for i in range(steps):
            new, loss = (warm if i < warmup_steps else update)(done[0])
            losses[i] = float(loss)
            done = (new, i + 1)
            in_a_row = 0 if np.isfinite(losses[i]) else in_a_row + 1
            if in_a_row > MAX_SKIPPED_IN_A_ROW:
                raise CLIError(
                    f"training diverged: {in_a_row} steps in a row had a non-finite loss (at "
                    f"step {i + 1}); try a smaller --lr or --natgrad-lr")
            if bar is not None:
                bar.update(1)
                if i % 10 == 0:
                    bar.set_postfix(loss=f"{losses[i]:.4g}")
            if callback is not None:
                callback(i + 1, new, losses[:i + 1])
    except KeyboardInterrupt:
        raise TrainingInterrupted(done[0], losses[:done[1]].copy()) from None
    finally:
        if bar is not None:
            bar.close()
    return done[0], losses


INIT_WARMUP_FRACTION = 0.5  # of --init-steps, with the local KL weighted by INIT_WARMUP_WEIGHT
INIT_WARMUP_WEIGHT = 0.1
INIT_EM_ITERS = 100
INIT_PSEUDO_COUNT = 1.0


def init_stage_config(cfg: FitConfig) -> FitConfig:
    """The LDS-SVAE stage of `cfg`'s switching initialisation: one regime, ``init_steps``
    steps, networks trained, and a constant natural-gradient rate (``--natgrad-schedule``
    applies to the SLDS steps that follow)."""
    return dataclasses.replace(cfg, family="lds", K=1, init="random", freeze_networks=False,
                               steps=cfg.init_steps, natgrad_schedule="constant",
                               warm_start=False)


def switching_start(run: Run, data: Data, cfg: FitConfig, *, progress: bool = True,
                    em_iters: int = INIT_EM_ITERS, pseudo_count: float = INIT_PSEUDO_COUNT,
                    warmup_steps: int | None = None,
                    warmup_weight: float = INIT_WARMUP_WEIGHT):
    """SVI state of an SLDS run started by the switching initialisation (``--init arhmm``).

    1. An LDS-SVAE with the same data, networks and seed (``cfg`` with ``family="lds"``)
       trains for ``cfg.init_steps`` steps; the first ``warmup_steps`` of them (default:
       ``INIT_WARMUP_FRACTION`` of them) weight the local KL by ``warmup_weight``
       (without this warm-up its latents can collapse to the prior, which leaves nothing
       to segment).
    2. `numpyro_svae.initialize.arhmm_init` fits an AR(1)-HMM with ``cfg.K`` regimes to the
       LDS-SVAE's latent means and sets q(theta) of the SLDS from the Viterbi segmentation
       (``pseudo_count``); the encoder, decoder and initial-state factor are carried over.
    3. With ``cfg.warm_start`` the SLDS guide's q(k) warm-start state is set to that
       segmentation (`numpyro_svae.initialize.qk_from_segmentation`), so the first SLDS
       step's mean field starts from it instead of a random q(k).

    Returns ``(state, info)``: the SLDS SVI state and a JSON-ready summary (``init_*``:
    the LDS-SVAE's steps, warm-up and last loss, frames and transitions per regime).
    The AR-HMM sees only the observed steps (``data.train_mask``): padding is not segmented.
    Raises `CLIError` when the AR-HMM fit fails.
    """
    import jax

    from .guide import WARM_START_SITE
    from .initialize import arhmm_init, qk_from_segmentation

    lds_cfg = init_stage_config(cfg)
    run1 = build(lds_cfg, data)
    warm = (int(round(INIT_WARMUP_FRACTION * cfg.init_steps)) if warmup_steps is None
            else min(int(warmup_steps), cfg.init_steps))
    state1, losses1 = train(run1, data, lds_cfg, steps=cfg.init_steps, progress=progress,
                            warmup_steps=warm, warmup_weight=warmup_weight,
                            desc="init: LDS-SVAE")
    if not np.any(np.isfinite(losses1[-min(50, len(losses1)):])):
        raise CLIError("--init arhmm: the LDS-SVAE of the initialisation diverged; try a "
                       "smaller --lr")
    params1 = run1.svi.get_params(state1)
    z = np.asarray(run1.guide.posterior(params1, data.train_x, **run1.model_kwargs)
                   .latent_mean)
    # everything but the one-regime dynamics fits the SLDS guide as it is
    dyn = f"{run1.guide.prefix}dynamics."
    carry = {k: v for k, v in params1.items() if not k.startswith(dyn)}
    try:
        init = arhmm_init(run.guide, z, rng_key=jax.random.key(cfg.seed),
                          model_args=(data.train_x,), model_kwargs=run.model_kwargs,
                          num_iters=em_iters, pseudo_count=pseudo_count, carry=carry,
                          step_mask=np.asarray(data.train_mask, bool))
    except ValueError as e:
        raise CLIError(f"--init arhmm failed: {e}") from None
    state = run.init(cfg.seed, data.train_x, init_params=init.params)
    if cfg.warm_start:
        mutable = dict(state.mutable_state)
        mutable[WARM_START_SITE] = qk_from_segmentation(
            run.guide, init.regimes, model_args=(data.train_x,), model_kwargs=run.model_kwargs)
        state = state._replace(mutable_state=mutable)
    info = {"init": "arhmm", "init_steps": cfg.init_steps, "init_warmup_steps": warm,
            "init_warmup_weight": warmup_weight, "init_pseudo_count": pseudo_count,
            "init_final_loss": _last_finite(losses1),
            "init_transitions_per_regime": [int(c) for c in init.transitions_per_regime],
            "init_frames_per_regime": np.bincount(
                np.asarray(init.regimes).ravel(), minlength=cfg.K).tolist()}
    return state, info


# ------------------------------------------------------------------------------------------
# evaluation, outputs
# ------------------------------------------------------------------------------------------


def _last_finite(losses) -> float | None:
    ok = np.asarray(losses)[np.isfinite(losses)]
    return float(ok[-1]) if ok.size else None


class _Eval(NamedTuple):
    metrics: dict
    posterior: Any  # SVAEPosterior of the held-out sequences
    guide: Any  # the guide used on the held-out shapes


def _num_samples(cfg: FitConfig) -> tuple[int, int]:
    """(imputation / ArviZ draws, importance samples): one imputation size is compiled."""
    return (8, 2) if cfg.fast else (50, 16)


def _evaluate(run: Run, params, data: Data, cfg: FitConfig, *, seed: int = 0) -> _Eval:
    import jax

    from . import metrics, predict

    N, T, Dx = data.test_x.shape
    guide = run.eval_guide(N, T)
    kw = dict(run.model_kwargs, N=N, T=T, mask=data.test_mask)
    other = {k: v for k, v in kw.items() if k != "mask"}
    n_imp, n_iw = _num_samples(cfg)
    out: dict[str, Any] = {"dataset": cfg.dataset, "model": f"{cfg.family}_svae"}
    post = guide.posterior(params, data.test_x, **kw)
    marg = np.asarray(post.regime_marginals)  # [N, Tk, K]
    if cfg.family != "lds" and data.test_labels is not None:
        pred = marg.argmax(-1)
        lab = data.test_labels[:, -pred.shape[1]:]
        ok = (lab >= 0) & data.test_mask[:, -pred.shape[1]:]
        out["ari"] = float(metrics.adjusted_rand_index(pred[ok], lab[ok]))
        out["accuracy"] = float(metrics.best_label_matching(pred[ok], lab[ok]).accuracy)
    else:
        out.update(ari=None, accuracy=None)
    out["regimes_used"] = (1 if cfg.family == "lds" else
                           int(metrics.regimes_used(marg.reshape(-1, marg.shape[-1]))))
    gap_len = max(1, min(30, T // 4))
    gaps = np.asarray(metrics.random_gap_mask(seed, N, T, min_len=max(1, gap_len // 3),
                                              max_len=gap_len, num_gaps=1))
    gaps = gaps & data.test_mask
    imp = predict.impute(guide, params, data.test_x, gaps, num_samples=n_imp,
                         rng_key=jax.random.key(seed), **other)
    # score only frames that were observed in the data and hidden by the gap mask
    scored = gaps | ~data.test_mask
    out["impute_rmse"] = float(metrics.masked_rmse(data.test_x, np.asarray(imp.mean), scored))
    var = np.var(np.asarray(imp.samples), axis=0) + 1e-6
    out["impute_loglik"] = float(metrics.gaussian_masked_loglik(
        data.test_x, np.asarray(imp.mean), var, scored))
    iw = predict.importance_weighted_bound(
        guide, params, data.test_x, num_samples=n_iw, rng_key=jax.random.key(seed + 1),
        mask=data.test_mask, **other)
    out["heldout_bound_per_frame"] = float(
        np.sum(np.asarray(iw.predictive)) / max(1, int(np.sum(np.asarray(iw.frames)))))
    return _Eval(out, post, guide)


def evaluate_run(run: Run, params, data: Data, cfg: FitConfig, *, seed: int = 0) -> dict:
    """Held-out metrics: segmentation (ARI, accuracy), imputation, held-out bound per frame.

    Returns a dict with ``ari``, ``accuracy`` (None without labels or for an LDS),
    ``regimes_used``, ``impute_rmse``, ``impute_loglik`` (scored on one random gap per
    held-out sequence) and ``heldout_bound_per_frame`` (importance-weighted bound on
    ``log p(x)`` per observed frame).
    """
    return _evaluate(run, params, data, cfg, seed=seed).metrics


_METRIC_TEXT = {
    "heldout_bound_per_frame": "importance-weighted lower bound on log p(x) of the held-out "
                               "sequences, per observed frame (higher is better)",
    "ari": "adjusted Rand index of the most probable regime vs the true labels "
           "(1 = perfect, 0 = chance)",
    "accuracy": "per-frame accuracy after the best one-to-one matching of regimes to labels",
    "regimes_used": "regimes that hold at least 1% of the posterior mass",
    "impute_rmse": "RMSE of the imputed mean on a hidden gap per sequence (standardised "
                   "units; lower is better)",
    "impute_loglik": "Gaussian log-likelihood per hidden entry of the imputation (higher is "
                     "better)",
    "final_loss": "last finite training loss (-ELBO of the whole training set)",
    "skipped_steps": "training steps skipped because their loss or update was not finite "
                     "(the state is kept, a new random draw is used)",
}


def write_outputs(folder: pathlib.Path, run: Run, state, losses, data: Data, cfg: FitConfig,
                  ev: _Eval, seconds: float, train_seconds: float | None = None,
                  extra: dict | None = None) -> dict:
    """ArviZ file, plots, metrics.json and report.md into `folder`; returns the metrics
    (`extra`, e.g. the switching initialisation's summary, is added to them)."""
    import jax
    import matplotlib

    matplotlib.use("Agg")
    from . import diagnostics, predict

    params = run.svi.get_params(state)
    N, T, Dx = data.test_x.shape
    guide, post = ev.guide, ev.posterior
    kw = dict(run.model_kwargs, N=N, T=T)
    kw.pop("mask")
    n_imp, _ = _num_samples(cfg)
    idata = diagnostics.to_inference_data(
        guide, params, data.test_x, num_draws=n_imp, rng_key=jax.random.key(cfg.seed),
        losses=losses, mask=data.test_mask, **kw)
    idata.to_netcdf(str(folder / "posterior.nc"))
    imp = predict.impute(guide, params, data.test_x, data.test_mask, num_samples=n_imp,
                         rng_key=jax.random.key(cfg.seed + 2), **kw)
    import matplotlib.pyplot as plt

    figs = {
        "elbo.png": lambda p: diagnostics.plot_elbo(losses, path=p),
        "reconstruction.png": lambda p: diagnostics.plot_reconstruction(
            data.test_x, imp.mean, lower=imp.lower, upper=imp.upper, mask=data.test_mask,
            path=p),
    }
    if cfg.family != "lds":
        lab = None
        if data.test_labels is not None:
            lab = data.test_labels[:, -post.regime_marginals.shape[1]:]
        figs["regimes.png"] = lambda p: diagnostics.plot_regimes(
            post.regime_marginals, lab, mask=data.test_mask, path=p)
        figs["transition_matrix.png"] = lambda p: diagnostics.plot_transition_matrix(
            post, path=p)
    plots = []
    for name, make in figs.items():
        fig = make(str(folder / name))
        plt.close(fig)
        plots.append(name)
    metrics_ = dict(ev.metrics, seconds=round(seconds, 1),
                    train_seconds=None if train_seconds is None else round(train_seconds, 1),
                    steps=int(len(losses)),
                    skipped_steps=int(np.sum(~np.isfinite(losses))),
                    final_loss=_last_finite(losses), **(extra or {}))
    (folder / "metrics.json").write_text(json.dumps(metrics_, indent=1))
    (folder / "report.md").write_text(_report(cfg, data, metrics_, plots, seconds))
    return metrics_


_PLOT_TEXT = {
    "elbo.png": "training loss (-ELBO) per step; it should fall and flatten",
    "reconstruction.png": "held-out sequence 0: data (black) and the model's reconstruction "
                          "with a 90% band, a few channels",
    "regimes.png": "held-out sequence 0: posterior regime probabilities q(k) over time, with "
                   "the true labels when known",
    "transition_matrix.png": "expected regime transition matrix E[P] under q(theta)",
}


_INTRO = {
    "slds": "A switching linear dynamical system prior with a neural decoder, fitted without "
            "labels: each time step of a sequence is assigned one of K regimes (discrete "
            "states with their own linear dynamics in a D-dimensional latent space). Regime "
            "numbers are arbitrary; the scores below match them to the true labels first.",
    "lds": "A linear dynamical system prior (one regime) with a neural decoder: a "
           "D-dimensional latent trajectory per sequence explains the observations.",
    "hmm": "A hidden Markov model prior with Gaussian latent emissions and a neural decoder: "
           "each time step is assigned one of K regimes, fitted without labels.",
}


def _report(cfg: FitConfig, data: Data, m: dict, plots: list, seconds: float) -> str:
    lines = [
        f"# numpyro-svae run: {cfg.family.upper()}-SVAE on {cfg.dataset}",
        "",
        _INTRO.get(cfg.family, ""),
        "",
        f"- configuration: family={cfg.family}, K={cfg.K} regimes, D={cfg.D} latent "
        f"dimensions, hidden={cfg.hidden}, steps={m['steps']}, seed={cfg.seed}, lr={cfg.lr}, "
        f"natgrad_lr={cfg.natgrad_lr}, natgrad_schedule={cfg.natgrad_schedule}, "
        f"natural_step={cfg.natural_step}, "
        f"max_iters={cfg.max_iters}"
        + (", warm_start=True" if cfg.warm_start else "")
        + (f", init={cfg.init} (init_steps={cfg.init_steps}, "
           f"freeze_networks={cfg.freeze_networks})" if cfg.init != "random" else ""),
        f"- data [sequences, steps, channels]: train {list(data.train_x.shape)}, held-out "
        f"{list(data.test_x.shape)} ({data.note})",
        f"- wall time of this command: {seconds:.1f} s, of which training {m['train_seconds']} s "
        "(both include JAX compilation, which takes most of a short run)"
        if m.get("train_seconds") is not None else f"- wall time: {seconds:.1f} s",
        "",
        "## Held-out metrics",
        "",
        "All metrics are computed on the held-out sequences, which were not used in training.",
        "",
        "| metric | value | meaning |",
        "|---|---|---|",
    ]
    for k, text in _METRIC_TEXT.items():
        v = m.get(k)
        shown = "n/a" if v is None else (f"{v:.4g}" if isinstance(v, float) else v)
        lines.append(f"| {k} | {shown} | {text} |")
    lines += ["", "## Plots", ""]
    for p in plots:
        lines += [f"{_PLOT_TEXT.get(p, p)}:", "", f"![{p}]({p})", ""]
    lines += [
        "## Files",
        "",
        "- `metrics.json`: the table above, machine readable",
        "- `posterior.nc`: draws from the variational posterior (`arviz.from_netcdf`)",
        "- `checkpoint.npz` + `checkpoint.json`: training state; continue with "
        "`numpyro-svae fit --resume --out <this folder> --steps <total>` (same options), "
        "re-score with `numpyro-svae evaluate <this folder>`",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------


def _clear_stale(out: pathlib.Path, cfg: FitConfig, resume: bool) -> None:
    """Remove the staging folders of `out` left by dead runs (killed, crashed machine).

    The newest compatible checkpoint among them that is ahead of `out`'s is not lost: with
    `resume` it becomes `out` (and training goes on from it); without, the command stops
    and says so (`out` does not exist then: that is checked first).
    """
    stale = stale_stages(out)
    if not stale:
        return
    have = stage_checkpoint(out) if out.exists() else None
    best = None
    for found in filter(None, map(stage_checkpoint, stale)):
        try:
            check_checkpoint(found.folder, cfg)
        except CLIError:
            continue  # another configuration's: not this run's to continue
        if found.step > (have.step if have else -1) and (best is None or found.step > best.step):
            best = found
    if best is not None:
        if not resume:
            raise CLIError(f"an interrupted run of {str(out)!r} left a checkpoint at step "
                           f"{best.step} in {str(best.folder)!r}: continue it with --resume, "
                           "or delete that folder to start afresh")
        publish(best.folder, out)
        print(f"numpyro-svae: continuing from the checkpoint at step {best.step} that an "
              f"interrupted run left in {str(best.folder)!r}", file=sys.stderr)
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)


def _init_summary(meta: dict, out: pathlib.Path) -> dict | None:
    """The switching initialisation's summary of a run being resumed."""
    if meta.get("info"):
        return meta["info"]
    try:  # runs whose checkpoint predates `info`: their metrics.json
        old_m = json.loads((out / "metrics.json").read_text())
        return {k: v for k, v in old_m.items() if k.startswith("init")} or None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None  # metrics are rewritten; the checkpoint is what counts


def cmd_fit(cfg: FitConfig, out: pathlib.Path, *, resume: bool, progress: bool,
            checkpoint_every: int = CHECKPOINT_EVERY) -> dict:
    """Train, evaluate and write the run folder `out` (atomically).

    Every `checkpoint_every` steps (0: never) a checkpoint is written into the staging
    folder; on Ctrl-C or SIGTERM the last completed step's checkpoint becomes `out` (a
    folder holding only ``checkpoint.*``, ``"complete": false``) for ``--resume``.
    """
    problem = out_problem(out)
    if problem:
        raise CLIError(problem)
    if out.exists() and not resume:
        raise CLIError(f"output folder {str(out)!r} exists; use --resume to continue it or "
                       "choose another --out")
    _clear_stale(out, cfg, resume)
    # fail before loading data or compiling anything
    meta = check_checkpoint(out, cfg) if resume else {}
    data = load_data(cfg)
    record = data_record(cfg.dataset, cfg.data_path, data_fingerprint(data))
    problem = fingerprint_problem(meta.get("data"), record["fingerprint"],
                                  record["path"] or cfg.dataset, str(out))
    if problem:
        raise CLIError(problem)
    run = build(cfg, data)
    t0 = time.time()
    state, prev_losses, done, extra = None, np.empty(0), 0, None
    if resume:
        template = run.template(cfg.seed, data.train_x)
        state, done, prev_losses = load_checkpoint(out, template, cfg)
        extra = _init_summary(meta, out)
    stage = make_stage(out)

    def save(folder, st, losses, complete=False):
        save_checkpoint(folder, st, cfg, len(losses), losses, data=record,
                        complete=complete, info=extra)

    def checkpoint(folder, st, losses, complete=False):
        with deferred_signals():  # a second Ctrl-C must not tear the pair of files
            save(folder, st, losses, complete)

    def on_step(k, st, new_losses):
        total = done + k
        if checkpoint_every and total % checkpoint_every == 0:
            checkpoint(stage, st, np.concatenate([prev_losses, new_losses]))
        if not progress and total % (checkpoint_every or LOG_EVERY) == 0:
            print(f"numpyro-svae: step {total}/{cfg.steps}, loss {new_losses[-1]:.6g}",
                  file=sys.stderr, flush=True)

    latest = None  # (state, losses) of the last completed training step
    try:
        if state is None and cfg.init == "arhmm":
            state, extra = switching_start(run, data, cfg, progress=progress)
        try:
            state, losses = train(run, data, cfg, steps=max(0, cfg.steps - done),
                                  state=state, progress=progress, callback=on_step)
        except TrainingInterrupted as e:
            latest = (e.state, np.concatenate([prev_losses, e.losses]))
            raise
        t_train = time.time() - t0
        losses = np.concatenate([prev_losses, losses])
        latest = (state, losses)
        checkpoint(stage, state, losses, complete=True)
        ev = _evaluate(run, run.svi.get_params(state), data, cfg, seed=cfg.seed)
        m = write_outputs(stage, run, state, losses, data, cfg, ev, time.time() - t0,
                          train_seconds=t_train, extra=extra)
        publish(stage, out)
        latest = None  # `out` is the complete run now
    except KeyboardInterrupt:
        if latest is None and out.exists() and not stage.exists():
            raise  # interrupted right after the complete run was published
        if latest is None or len(latest[1]) <= done:
            kept = f"{str(out)!r} is unchanged" if resume else "no run folder written"
            raise KeyboardInterrupt(f"before any training step completed; {kept}") from None
        shutil.rmtree(stage, ignore_errors=True)  # only the checkpoint is published
        stage = make_stage(out)
        with deferred_signals():
            save(stage, *latest)
            publish(stage, out)
        raise KeyboardInterrupt(
            f"checkpoint at step {len(latest[1])} of {cfg.steps} saved in {str(out)!r}; "
            "continue with `numpyro-svae fit --resume` and the same options") from None
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return m


def cmd_evaluate(run_dir: pathlib.Path, *, dataset: str | None = None,
                 data_path: str | None = None) -> dict:
    """Re-score a finished run on its held-out data (prints and returns the metrics).

    `dataset` / `data_path` replace the stored ones (data that moved); the data must have
    the fingerprint stored in the checkpoint either way.
    """
    if not (run_dir / "checkpoint.json").exists():
        raise CLIError(f"{str(run_dir)!r} is not a numpyro-svae run folder (no checkpoint.json)")
    meta = check_checkpoint(run_dir)
    cfg = FitConfig(**meta["config"])
    if dataset is not None:
        cfg = dataclasses.replace(cfg, dataset=resolve_dataset(dataset))
    else:
        problem = missing_dataset_problem(cfg.dataset, run_dir)
        if problem:
            raise CLIError(problem)
    if data_path is not None:
        cfg = dataclasses.replace(cfg, data_path=os.path.abspath(data_path))
    data = load_data(cfg)
    path = data_record(cfg.dataset, cfg.data_path, "")["path"] or cfg.dataset
    problem = fingerprint_problem(meta.get("data"), data_fingerprint(data), path, str(run_dir))
    if problem:
        raise CLIError(problem)
    run = build(cfg, data)
    state, _, _ = load_checkpoint(run_dir, run.template(cfg.seed, data.train_x), cfg)
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
        q.add_argument("--natgrad-schedule", default=defaults.natgrad_schedule,
                       choices=NATGRAD_SCHEDULES,
                       help="natural-gradient rate: constant (default) or a cosine decay to "
                            "0 over --steps (after --init arhmm: over the SLDS steps)")
        q.add_argument("--natural-step", default=defaults.natural_step,
                       choices=NATURAL_STEPS,
                       help="q(theta) step: SGD on the unconstrained coordinates (linear, "
                            "default), landing exactly on eta - lr * natgrad (exact), or SGD "
                            "with the exact step where SGD overshoots it (guarded)")
        q.add_argument("--max-iters", type=int, default=defaults.max_iters,
                       help="mean-field block updates per step")
        q.add_argument("--window", type=int, default=defaults.window,
                       help="mocap6: cut the training sequences into windows of this many "
                            "frames (stride half a window)")
        q.add_argument("--init", default=defaults.init, choices=["random", "arhmm"],
                       help="slds: start the switching dynamics at random or from an AR-HMM "
                            "fitted to the latents of an LDS-SVAE trained first")
        q.add_argument("--init-steps", type=int, default=defaults.init_steps,
                       help="--init arhmm: LDS-SVAE training steps")
        q.add_argument("--freeze-networks", action="store_true",
                       help="--init arhmm: keep the LDS-SVAE's encoder and decoder fixed")
        q.add_argument("--warm-start", action="store_true",
                       help="slds: start each step's mean field from the previous step's "
                            "q(k) instead of a fresh random one (after --init arhmm: from "
                            "the AR-HMM segmentation)")
        q.add_argument("--fast", action="store_true", help="fewer samples in evaluation")
        q.add_argument("--no-progress", action="store_true",
                       help="no progress bar: one line (step, loss) per --checkpoint-every "
                            f"steps instead ({LOG_EVERY} when checkpoints are off)")
        q.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY,
                       help="write a checkpoint every this many training steps (0: never), "
                            "which --resume continues from after an interruption")

    f = sub.add_parser("fit", help="train a model and write a run folder")
    common(f, FitConfig())
    f.add_argument("--out", required=True, help="output folder")
    f.add_argument("--resume", action="store_true", help="continue the run in --out")
    d = sub.add_parser("demo", help="fit on BasicMotions with good defaults (< 10 min)")
    common(d, DEMO)
    d.add_argument("--out", default="svae_demo", help="output folder (default svae_demo)")
    e = sub.add_parser("evaluate", help="score a finished run on its held-out data")
    e.add_argument("run", help="run folder written by fit")
    e.add_argument("--dataset", default=None,
                   help="the run's data at another path (its fingerprint must match)")
    e.add_argument("--data-path", default=None, help="mocap6: the folder at another path")
    return p


def _check_config(cfg: FitConfig) -> None:
    if cfg.window is not None:
        if cfg.dataset != "mocap6":
            raise CLIError(f"--window applies to --dataset mocap6 only (got {cfg.dataset!r})")
        if cfg.window < 2:
            raise CLIError(f"--window must be >= 2; got {cfg.window}")
    for name, low in (("K", 1), ("D", 1), ("hidden", 1), ("steps", 0), ("max_iters", 1)):
        if getattr(cfg, name) < low:
            raise CLIError(f"--{name.replace('_', '-')} must be >= {low}; "
                           f"got {getattr(cfg, name)}")
    if cfg.natural_step not in NATURAL_STEPS:  # reached by FitConfig built in code
        raise CLIError(f"--natural-step must be one of {', '.join(NATURAL_STEPS)}; "
                       f"got {cfg.natural_step!r}")
    if cfg.natgrad_schedule not in NATGRAD_SCHEDULES:
        raise CLIError(f"--natgrad-schedule must be one of {', '.join(NATGRAD_SCHEDULES)}; "
                       f"got {cfg.natgrad_schedule!r}")
    for name in ("lr", "natgrad_lr"):
        v = getattr(cfg, name)
        if not (np.isfinite(v) and v > 0):
            raise CLIError(f"--{name.replace('_', '-')} must be a positive number; got {v}")
    if cfg.init == "arhmm":
        if cfg.family != "slds":
            raise CLIError(f"--init arhmm needs --family slds (got {cfg.family}): it sets "
                           "the switching dynamics")
        if cfg.init_steps < 1:
            raise CLIError(f"--init-steps must be >= 1; got {cfg.init_steps}")
    elif cfg.freeze_networks:
        raise CLIError("--freeze-networks needs --init arhmm (it keeps the initialisation's "
                       "trained networks; random networks would stay random)")
    if cfg.warm_start and (cfg.family != "slds" or cfg.K < 2):
        raise CLIError(f"--warm-start needs --family slds with --K >= 2 (got family "
                       f"{cfg.family}, K = {cfg.K}): it carries the switching chain's q(k)")


def _on_sigterm(signum, frame):  # pragma: no cover - exercised by hand
    raise KeyboardInterrupt


# XLA CPU settings for the command's own process (``docs/design.md``, XLA CPU settings): XLA's
# long-standing elemental fusion emitter instead of the newer MLIR one. The training step of
# `bench/bench_step.py` compiles in 14.1 s instead of 22.3 s and the process peaks at
# 1.02 GB instead of 2.09 GB, at about the same step time (44.7 vs 42.6 ms). A flag the user
# already names in XLA_FLAGS is left as the user set it.
XLA_CPU_DEFAULTS = ("--xla_cpu_use_fusion_emitters=false",)


def _set_xla_cpu_defaults() -> bool:
    """Add `XLA_CPU_DEFAULTS` to ``XLA_FLAGS`` before JAX creates its backends (XLA reads
    the variable then); returns False, changing nothing, when the backends already exist."""
    try:  # JAX has no public query for this
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            return False
    except (ImportError, AttributeError):  # pragma: no cover - a JAX without it
        pass
    os.environ["XLA_FLAGS"] = merge_xla_flags(os.environ.get("XLA_FLAGS", ""),
                                              XLA_CPU_DEFAULTS)
    return True


def merge_xla_flags(flags: str, extra) -> str:
    """``flags`` (an ``XLA_FLAGS`` value) followed by each ``--name=value`` of ``extra``
    whose name ``flags`` does not already set (the user's setting wins)."""
    named = {f.split("=")[0] for f in flags.split()}
    return " ".join([*flags.split(), *(f for f in extra if f.split("=")[0] not in named)])


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``numpyro-svae`` console script."""
    args = _parser().parse_args(argv)
    _set_xla_cpu_defaults()
    # SIGTERM (kill, timeout) unwinds like Ctrl-C, so the staging folder is removed
    prev = None
    if threading.current_thread() is threading.main_thread():
        prev = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(args)
    finally:
        if prev is not None:
            signal.signal(signal.SIGTERM, prev)


def _main(args) -> int:
    try:
        if args.command == "evaluate":
            m = cmd_evaluate(pathlib.Path(args.run), dataset=args.dataset,
                             data_path=args.data_path)
            print(json.dumps(m, indent=1))
            return 0
        data_path = None if args.data_path is None else os.path.abspath(args.data_path)
        cfg = FitConfig(  # paths stored absolute: a run can be resumed from anywhere
            dataset=resolve_dataset(args.dataset), data_path=data_path, family=args.family,
            K=args.K,
            D=args.D, hidden=args.hidden, steps=args.steps, seed=args.seed, lr=args.lr,
            natgrad_lr=args.natgrad_lr, max_iters=args.max_iters, fast=args.fast,
            init=args.init, init_steps=args.init_steps, freeze_networks=args.freeze_networks,
            window=args.window, natural_step=args.natural_step,
            natgrad_schedule=args.natgrad_schedule, warm_start=args.warm_start)
        _check_config(cfg)
        if args.checkpoint_every < 0:
            raise CLIError(f"--checkpoint-every must be >= 0 (0: no checkpoints); got "
                           f"{args.checkpoint_every}")
        out = pathlib.Path(args.out)
        resume = getattr(args, "resume", False)
        if args.command == "demo" and out.exists() and not resume:
            if not (out / "checkpoint.json").exists():  # a complete or interrupted run
                raise CLIError(f"output folder {str(out)!r} exists and is not a run folder")
            shutil.rmtree(out)  # a previous demo run: start afresh
        m = cmd_fit(cfg, out, resume=resume, progress=not args.no_progress,
                    checkpoint_every=args.checkpoint_every)
        print(f"wrote {out}/report.md")
        print(json.dumps(m, indent=1))
        return 0
    except CLIError as e:
        print(f"numpyro-svae: error: {e}", file=sys.stderr)
        return 2
    except NotImplementedError as e:
        print(f"numpyro-svae: error: not supported yet: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"numpyro-svae: interrupted{': ' if str(e) else ''}{e}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Real-data evaluation: SLDS-SVAE vs LDS-SVAE vs classical baselines.

``python bench/bench_real.py [--mocap6 PATH] [--fast] [--only mocap6|basic_motions]
[--models M,...] [--seed S --natural-step linear|exact|guarded --natgrad-schedule
constant|cosine --test-trial T --warm-start --impute-masks M --save-state DIR --load-state DIR
--out FILE]``

Data sets (``numpyro_svae.datasets``; standardised with training statistics):

* ``mocap6`` (``load_mocap6(PATH)``, default ``DEFAULT_MOCAP6``, outside the package;
  skipped with a message when absent): the five training trials are cut into windows
  of ``WINDOW`` frames (stride ``STRIDE``, tails dropped) for *every* model; the held-out
  trial ``14_14`` (387 frames, 6 exercises) is scored whole.  ``--test-trial`` holds out
  another trial instead (``MOCAP6_TEST_TRIALS``: those whose exercises all occur in the
  other five), to check a recipe chosen on ``14_14`` on a trial it was not chosen on.
* ``basic_motions`` (``load_basic_motions()``): 10 train / 10 test sequences of 400 frames
  (4 clips of different activities each).

Models, all fitted to the same training frames with the same number of regimes ``K``
(``CONFIG``): BasicMotions ``K = 4`` (its number of classes); mocap6 ``K = 8``, not the 12
exercise classes of the training trials, because dynamax's AR-HMM M-step (no prior on the
regression weights) turns non-finite with ``K = 12`` (and with ``K = 8`` in float32) on these
1,671 training frames; the HMM baselines are fitted in float64, the SVAEs in float32:

* ``slds_svae`` / ``lds_svae``: ``numpyro_svae.models`` SLDS / LDS with MLP decoder and the
  CLI's ``build`` (``GaussianPotentialEncoder``, ``SVAEGuide``, ``natural_gradient``,
  ``SVAE_ELBO``), full-batch SVI for ``steps`` steps with ``SVI.stable_update`` (a step with
  a non-finite loss keeps the state; counted in ``timing.skipped_steps``).  500 steps on
  mocap6: longer runs over-fit the 26 training windows (3,000 steps with ``natgrad_lr =
  0.01``: held-out bound -20.6 vs -7.9 nats per frame, imputation RMSE 1.03 vs 0.90;
  docs/benchmarks.md).  mocap6 (``CONFIG``): the first ``kl_warmup_steps`` with
  ``SVAE_ELBO(local_kl_weight=kl_warmup_weight)`` (without it the LDS-SVAE's latents
  collapse); the SLDS-SVAE starts from ``numpyro_svae.initialize.arhmm_init`` (``init =
  "arhmm"``: the LDS-SVAE run above, an AR(1)-HMM on its latent means, q(theta) from that
  segmentation with ``init_pseudo_count``, networks carried over; this is the command's
  ``fit --init arhmm``, ``numpyro_svae.cli.switching_start``) and then trains
  ``final_steps`` steps, the networks fixed when ``freeze_networks``
  (``--freeze-networks``); ``natural_step`` is the command's ``--natural-step`` (``linear``: SGD
  on the unconstrained coordinates; ``exact``: natural-parameter steps, ``--natural-step exact``
  here; both compared over three seeds on mocap6 in docs/benchmarks.md; ``guarded``: the
  linear step, with the exact step for a factor where the straight line overshoots it, mocap6's
  rule, in both SVAE stages and the LDS-SVAE row, docs/design.md; BasicMotions
  keeps ``linear``); ``natgrad_schedule`` is the command's ``--natgrad-schedule`` for the SLDS row
  (``cosine``: the natural-gradient rate decays to 0 over the SLDS steps; mocap6's recipe,
  better on average over three seeds but not in every run, docs/benchmarks.md; the
  LDS-SVAE row keeps the constant rate, as the switching initialisation's first stage does;
  BasicMotions, trained from a random start for 250 steps, keeps ``constant``);
* ``arhmm`` / ``gaussian_hmm``: ``numpyro_svae.baselines`` (dynamax 1.0.3 linear AR(1)-HMM and
  full-covariance Gaussian HMM, MAP-EM from k-means, ``EM_ITERS`` iterations);
* ``interpolation``: linear interpolation across each gap (imputation only).

Metrics, all on the held-out (test) sequences:

* segmentation: argmax of the SVAE's mean-field ``q(k)`` marginals / the HMMs' Viterbi path
  against the true labels: adjusted Rand index, accuracy after the best one-to-one label
  matching (Hungarian), ``regimes_used`` = number of distinct predicted regimes;
* imputation: ``GAPS_PER_SEQ`` non-overlapping windows of 10-30 frames per test sequence, drawn
  (seeded) strictly inside the sequence, hidden from every model; ``impute_masks`` such masks
  (``CONFIG``; mocap6: 32; BasicMotions: 1), each an
  imputation task of its own on a copy of the test sequences, the first one the mask of the
  earlier single-mask protocol (mask m is the same for any number of masks above m);
  ``impute_rmse`` over the hidden entries of all masks together (standardised units; per mask
  in ``runs.<data set>.timings.<model>.impute_rmse_per_mask``) and ``impute_loglik`` = mean
  Gaussian log density per hidden entry with a diagonal predictive variance (SVAEs: mean and
  variance of ``IMPUTE_SAMPLES`` posterior predictive draws of ``predict.impute`` per
  held-out mean-field start, ``impute_restarts`` starts (mocap6: 16); Gaussian
  HMM: exact moments of the smoothed-mixture predictive; AR-HMM: moments propagated through
  the gap with the smoothed regime marginals, the same forward roll as
  ``baselines.impute``; interpolation: none);
* ``heldout_bound_per_frame``: log-likelihood of the fully observed test sequences per frame
  (all channels together): SVAEs ``predict.importance_weighted_bound(...).predictive`` with
  ``IW_SAMPLES`` samples (a stochastic lower bound on ``log E_q(theta) p(x | theta)``); HMMs the
  exact marginal likelihood (``baselines.heldout_loglik_per_frame``); interpolation: none.

``seconds`` is the wall time of a model's fit and evaluation (compilation included).  Writes
``bench/results/real.json`` (rows of other (data set, model) pairs already in the file are
kept, so ``--only`` / ``--models`` runs update their own rows; ``--fast`` writes nothing
unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_svae import baselines, cli, datasets, metrics, predict

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_MOCAP6 = ROOT.parent / "shared" / "data" / "mocap6"
DEFAULT_SEED = 0
SEED = DEFAULT_SEED  # --seed
SAVE_STATE: pathlib.Path | None = None  # --save-state
LOAD_STATE: pathlib.Path | None = None  # --load-state
METRIC_KEYS = ("ari", "accuracy", "impute_rmse", "impute_loglik", "heldout_bound_per_frame",
               "regimes_used", "seconds")

# per data set: SVAE sizes and steps, baseline EM iterations, windows and gaps
CONFIG = {
    "mocap6": dict(K=8, window=100, stride=50, D=8, hidden=64, steps=500, lr=3e-3,
                   natgrad_lr=0.05, max_iters=10, em_iters=100, num_lags=1, gaps_per_seq=5,
                   kl_warmup_steps=250, kl_warmup_weight=0.1,
                   init="arhmm", init_pseudo_count=1.0, final_steps=500, freeze_networks=True,
                   impute_restarts=16, natural_step="guarded", natgrad_schedule="cosine",
                   test_trial="14_14", impute_masks=32),
    "basic_motions": dict(K=4, window=None, stride=None, D=4, hidden=64, steps=250, lr=3e-3,
                          natgrad_lr=0.05, max_iters=10, em_iters=100, num_lags=1,
                          gaps_per_seq=2, natural_step="linear", natgrad_schedule="constant"),
}
IMPUTE_SAMPLES, IW_SAMPLES = 50, 16
FAST = dict(steps=15, em_iters=5, impute_samples=4, iw_samples=2)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
    }


# ------------------------------------------------------------------------------------------
# data and masks
# ------------------------------------------------------------------------------------------


def load(name: str, cfg: dict, mocap6_path: pathlib.Path) -> cli.Data:
    """Training windows/sequences and whole test sequences as a `cli.Data`."""
    if name == "mocap6":
        held_out = (cfg["test_trial"],)
        tr = datasets.load_mocap6(mocap6_path, test_sequences=held_out, window=cfg["window"],
                                  stride=cfg["stride"], drop_remainder=True)
        # same train statistics, whole test trial
        te = datasets.load_mocap6(mocap6_path, test_sequences=held_out)
    else:
        tr = te = datasets.load_basic_motions()
    return cli.Data(
        np.asarray(tr.train_x, np.float32), np.asarray(tr.train_labels),
        np.asarray(tr.train_mask, bool), np.asarray(te.test_x, np.float32),
        np.asarray(te.test_labels), np.asarray(te.test_mask, bool), tuple(tr.label_names))


def gap_mask(seed, valid: np.ndarray, gaps: int, lo: int = 10, hi: int = 30) -> np.ndarray:
    """[N, T] bool, True = observed: `gaps` non-overlapping windows of lo..hi frames per
    sequence, inside its real frames, each with an observed frame on both sides.

    `seed`: an int or a tuple of ints (`numpy.random.default_rng`)."""
    rng = np.random.default_rng(seed)
    out = valid.copy()
    for n in range(valid.shape[0]):
        length = int(valid[n].sum())  # real frames are a prefix (padding at the end)
        placed: list[tuple[int, int]] = []
        tries = 0
        while len(placed) < gaps:
            tries += 1
            if tries > 10000:
                raise RuntimeError(f"cannot place {gaps} gaps in a sequence of {length}")
            g = int(rng.integers(lo, hi + 1))
            s = int(rng.integers(1, length - g))  # frames s .. s+g-1, s >= 1, end < length-1
            if all(s + g + 1 <= a or b + 1 <= s for a, b in placed):
                placed.append((s, s + g))
        for a, b in placed:
            out[n, a:b] = False
    return out


# ------------------------------------------------------------------------------------------
# scoring helpers
# ------------------------------------------------------------------------------------------


def segmentation(pred: np.ndarray, labels: np.ndarray, valid: np.ndarray, K: int,
                 num_true: int) -> dict:
    """pred, labels, valid: [N, T'] (aligned). ARI, accuracy, distinct regimes used."""
    ok = valid & (labels >= 0)
    p, t = pred[ok].astype(np.int64), labels[ok].astype(np.int64)
    return {
        "ari": float(metrics.adjusted_rand_index(p, t)),
        "accuracy": float(metrics.best_label_matching(p, t, K, num_true).accuracy),
        "regimes_used": int(len(np.unique(p))),
    }


class ImputeTask(NamedTuple):
    """The imputation task: ``masks`` copies of the test sequences, each with its own gaps.

    x [M * N, T, Dx], valid / observed [M * N, T] (copy m = rows m * N ... (m + 1) * N - 1;
    observed is False in the gaps and in the padding)."""

    x: np.ndarray
    valid: np.ndarray
    observed: np.ndarray
    masks: int


def impute_task(data: cli.Data, seed: int, gaps: int, masks: int) -> ImputeTask:
    """`masks` gap masks on copies of the test sequences; mask 0 is ``gap_mask(seed)`` (the
    single-mask protocol's), mask m > 0 ``gap_mask((seed, m))``."""
    if masks < 1:
        raise ValueError(f"impute_masks must be >= 1, got {masks}")
    valid = np.asarray(data.test_mask, bool)
    observed = np.concatenate([gap_mask(seed if m == 0 else (seed, m), valid, gaps) & valid
                               for m in range(masks)])
    return ImputeTask(np.tile(data.test_x, (masks, 1, 1)), np.tile(valid, (masks, 1)),
                      observed, masks)


def imputation_scores(task: ImputeTask, mean, var) -> tuple[dict, list[float]]:
    """RMSE and Gaussian log density per hidden entry over all masks (var None: no log
    density), and the RMSE of each mask."""
    x, seen = task.x, task.observed | ~task.valid  # padding is never scored
    out = {"impute_rmse": float(metrics.masked_rmse(x, mean, seen))}
    out["impute_loglik"] = None if var is None else float(
        metrics.gaussian_masked_loglik(x, mean, var, seen))
    n, mean = x.shape[0] // task.masks, np.asarray(mean)
    per_mask = [float(metrics.masked_rmse(x[i:i + n], mean[i:i + n], seen[i:i + n]))
                for i in range(0, x.shape[0], n)]
    return out, per_mask


# ------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------


def _train(run, x, state, steps: int, warm: int, warm_weight: float, tag: str):
    """``steps`` SVI steps with ``stable_update`` (the first ``warm`` with the local KL
    weighted by ``warm_weight``); returns (state, losses [steps], compile seconds).

    The compiled steps are the command's (`cli.Run.update`, on ``run.model_kwargs``)."""
    update = run.update(x)
    warm = min(int(warm), steps)
    # first `warm` steps with the local KL down-weighted (a second compilation)
    update_w = run.update(x, warm_weight) if warm else None
    losses = np.empty(steps)
    compile_s = 0.0
    t1 = time.time()
    for i in range(steps):
        state, loss = (update_w if i < warm else update)(state)
        losses[i] = float(loss)
        if i == 0:
            compile_s = time.time() - t1
        if i % 50 == 0 or i == steps - 1:
            log(f"  {tag} step {i}: loss {losses[i]:.6g}")
    return state, losses, compile_s


def fit_config(family: str, K: int, cfg: dict, fast: bool, dataset: str) -> cli.FitConfig:
    """The command's configuration of an SVAE row (``cli.build(fit_config(...), data)``
    rebuilds the row's model, e.g. to load a ``--save-state`` checkpoint)."""
    fcfg = cli.FitConfig(dataset=dataset, family=family, K=K, D=cfg["D"], hidden=cfg["hidden"],
                         steps=cfg["steps"], seed=SEED, lr=cfg["lr"],
                         natgrad_lr=cfg["natgrad_lr"], max_iters=cfg["max_iters"],
                         natural_step=cfg["natural_step"],
                         # the SLDS row only: the LDS-SVAE row stays the switching
                         # initialisation's first stage (constant rate, `init_stage_config`)
                         natgrad_schedule=cfg["natgrad_schedule"] if family == "slds"
                         else "constant",
                         # the SLDS row only (q(k) of one regime is trivial)
                         warm_start=bool(cfg.get("warm_start")) and family == "slds")
    if family == "slds" and cfg.get("init") == "arhmm":
        # the command's `fit --init arhmm [--freeze-networks]`
        fcfg = dataclasses.replace(fcfg, init="arhmm",
                                   init_steps=FAST["steps"] if fast else cfg["steps"],
                                   freeze_networks=bool(cfg.get("freeze_networks")))
    return fcfg


def run_svae(family: str, data: cli.Data, K: int, cfg: dict, task: ImputeTask,
             fast: bool, dataset: str) -> tuple[dict, dict]:
    fcfg = fit_config(family, K, cfg, fast, dataset)
    timing = {}
    t0 = time.time()
    switching = fcfg.init == "arhmm"
    run = cli.build(fcfg, data)
    x, kw = data.train_x, run.model_kwargs
    if LOAD_STATE is not None:  # --load-state: evaluate a saved fit, no training
        folder = LOAD_STATE / f"{dataset}_{family}_seed{SEED}"
        state, done, losses = cli.load_checkpoint(folder, run.template(SEED, x), fcfg)
        timing.update(loaded_from=str(folder), loaded_step=done, init=time.time() - t0)
        log(f"  loaded the SVI state of step {done} from {folder}")
    else:
        if switching:
            # stage 1 = the LDS-SVAE row's recipe (same steps, seed and local-KL warm-up)
            state, info = cli.switching_start(
                run, data, fcfg, progress=False,
                em_iters=FAST["em_iters"] if fast else cfg["em_iters"],
                pseudo_count=cfg.get("init_pseudo_count", 1.0),
                warmup_steps=cfg.get("kl_warmup_steps", 0),
                warmup_weight=cfg.get("kl_warmup_weight", 0.1))
            timing.update(init_seconds=time.time() - t0, **info)
            log(f"  switching init: {time.time() - t0:.0f} s, transitions per regime "
                f"{info['init_transitions_per_regime']}")
        else:
            state = run.init(SEED, x)  # = svi.init(PRNGKey(SEED)), types as the compiled step's
        timing["init"] = time.time() - t0
        steps = FAST["steps"] if fast else (
            cfg.get("final_steps", cfg["steps"]) if switching else cfg["steps"])
        warm = 0 if switching else cfg.get("kl_warmup_steps", 0)
        t1 = time.time()
        state, losses, timing["compile_first_step"] = _train(
            run, x, state, steps, warm, cfg.get("kl_warmup_weight", 0.1), family)
        timing["steps"] = time.time() - t1 - timing["compile_first_step"]
        timing["seconds_per_step"] = timing["steps"] / max(steps - 1, 1)
        if SAVE_STATE is not None:  # the command's checkpoint format
            folder = SAVE_STATE / f"{dataset}_{family}_seed{SEED}"
            folder.mkdir(parents=True, exist_ok=True)
            cli.save_checkpoint(folder, state, fcfg, steps, losses)
            log(f"  saved the final SVI state to {folder}")
    timing["skipped_steps"] = int(np.sum(~np.isfinite(losses)))
    if not np.any(np.isfinite(losses[-50:])):
        raise RuntimeError(f"{family}_svae diverged on {dataset}")
    params = run.svi.get_params(state)

    N, T, _ = data.test_x.shape
    other = {k: v for k, v in kw.items() if k != "mask"}
    other.update(N=N, T=T)
    guide = run.eval_guide(N, T)  # the command's held-out guide (same parameters)
    row: dict = {}
    t2 = time.time()
    if family == "slds":
        post = guide.posterior(params, data.test_x, mask=data.test_mask, **other)
        marg = np.asarray(post.regime_marginals)  # [N, Tk, K]
        Tk = marg.shape[1]
        row.update(segmentation(marg.argmax(-1), data.test_labels[:, -Tk:],
                                data.test_mask[:, -Tk:], K, len(data.label_names)))
    else:
        row.update(ari=None, accuracy=None, regimes_used=1)
    timing["eval_segmentation"] = time.time() - t2
    t2 = time.time()
    # ``impute_restarts`` held-out mean-field starts, IMPUTE_SAMPLES draws from each
    # (``predict.impute(num_restarts=...)``)
    restarts = cfg.get("impute_restarts", 1)
    restarts = min(restarts, 2) if fast else restarts
    S = (FAST["impute_samples"] if fast else IMPUTE_SAMPLES) * restarts
    imp_kw = dict(other, N=task.x.shape[0])
    imp = predict.impute(run.eval_guide(task.x.shape[0], T), params, task.x, task.observed,
                         num_samples=S, num_restarts=restarts,
                         rng_key=jax.random.key(SEED + 10), **imp_kw)
    samples = np.asarray(imp.samples, np.float64)
    scores, timing["impute_rmse_per_mask"] = imputation_scores(
        task, np.asarray(imp.mean), samples.var(0) + 1e-6)
    row.update(scores)
    del imp, samples
    timing["eval_impute"] = time.time() - t2
    t2 = time.time()
    S = FAST["iw_samples"] if fast else IW_SAMPLES
    iw = predict.importance_weighted_bound(guide, params, data.test_x, num_samples=S,
                                           rng_key=jax.random.key(SEED + 20),
                                           mask=data.test_mask, **other)
    row["heldout_bound_per_frame"] = float(
        np.sum(np.asarray(iw.predictive)) / np.sum(np.asarray(iw.frames)))
    timing["eval_iw_bound"] = time.time() - t2
    timing["final_loss"] = float(losses[-1])
    timing["loss_every_50"] = [float(v) for v in losses[::50]]
    return row, timing


def _hmm_gap_moments(fit: baselines.HMMBaselineFit, x: np.ndarray, observed: np.ndarray):
    """Predictive mean and diagonal variance [N, T, Dx] of every frame given the observed
    frames (observed frames: the data, variance 1 placeholder, never scored)."""
    from dynamax import hidden_markov_model as hmm

    xj = jnp.where(jnp.asarray(observed)[..., None], jnp.asarray(x), 0.0)
    q = np.asarray(baselines._per_sequence(  # masked frames get log-likelihood 0
        lambda i, t, ll: hmm.hmm_smoother(i, t, ll).smoothed_probs, fit, xj,
        jnp.asarray(observed)), np.float64)  # [N, T, K]
    em = fit.params.emissions
    covs = np.asarray(em.covs, np.float64)  # [K, Dx, Dx]
    x64 = np.asarray(x, np.float64)
    mean = x64.copy()
    var = np.ones_like(x64)
    if fit.num_lags == 0:
        mu = np.asarray(em.means, np.float64)  # [K, Dx]
        m = q @ mu
        second = q @ (np.diagonal(covs, axis1=1, axis2=2) + mu**2)
        hid = ~observed
        mean[hid] = m[hid]
        var[hid] = (second - m**2)[hid]
        return mean, np.maximum(var, 1e-9)
    if fit.num_lags != 1:
        raise NotImplementedError("moment propagation is written for AR(1)")
    W = np.asarray(em.weights, np.float64)  # [K, Dx, Dx]
    b = np.asarray(em.biases, np.float64)  # [K, Dx]
    Dx = x.shape[-1]
    for n in range(x.shape[0]):
        first = int(np.argmax(observed[n]))
        m_prev, V_prev = x64[n, first], np.zeros((Dx, Dx))
        for t in range(x.shape[1]):
            if observed[n, t]:
                m_prev, V_prev = x64[n, t], np.zeros((Dx, Dx))
                continue
            mk = np.einsum("kij,j->ki", W, m_prev) + b  # [K, Dx]
            Ck = np.einsum("kij,jl,kml->kim", W, V_prev, W) + covs  # [K, Dx, Dx]
            qt = q[n, t]
            m = qt @ mk
            V = np.einsum("k,kij->ij", qt, Ck + mk[:, :, None] * mk[:, None, :]) \
                - np.outer(m, m)
            mean[n, t], var[n, t] = m, np.diag(V)
            m_prev, V_prev = m, V
    return mean, np.maximum(var, 1e-9)


def run_hmm(kind: str, data: cli.Data, K: int, cfg: dict, task: ImputeTask,
            fast: bool) -> tuple[dict, dict]:
    timing = {}
    iters = FAST["em_iters"] if fast else cfg["em_iters"]
    t0 = time.time()
    key = jax.random.key(SEED)
    # float64: the AR-HMM's M-step (no prior on the regression weights) turns non-finite in
    # float32 for K = 8 on mocap6; the baselines are numpy-output evaluation tools
    x = jnp.asarray(data.train_x, jnp.float64)
    if kind == "arhmm":
        fit = baselines.fit_arhmm(x, K, key=key, num_lags=cfg["num_lags"], num_iters=iters)
    else:
        fit = baselines.fit_gaussian_hmm(x, K, key=key, num_iters=iters)
    lp = np.asarray(fit.log_probs)
    timing["fit"] = time.time() - t0
    timing["em_log_prob_first_last"] = [float(lp[0]), float(lp[-1])]
    if not np.all(np.isfinite(np.asarray(fit.params.emissions.covs))):
        raise RuntimeError(f"{kind} EM produced non-finite parameters")
    t1 = time.time()
    row: dict = {}
    data = data._replace(test_x=np.asarray(data.test_x, np.float64))
    pred = baselines.segment(fit, data.test_x)
    row.update(segmentation(pred, data.test_labels, data.test_mask, K, len(data.label_names)))
    x_imp = np.asarray(task.x, np.float64)
    filled = baselines.impute(fit, x_imp, task.observed)
    _, var = _hmm_gap_moments(fit, x_imp, task.observed)
    scores, timing["impute_rmse_per_mask"] = imputation_scores(task, filled, var)
    row.update(scores)
    if bool(np.all(data.test_mask)):
        row["heldout_bound_per_frame"] = float(baselines.heldout_loglik_per_frame(
            fit, data.test_x))
    else:  # padded test sequences: heldout_loglik_per_frame has no mask
        row["heldout_bound_per_frame"] = None
    timing["eval"] = time.time() - t1
    return row, timing


def run_interpolation(task: ImputeTask) -> tuple[dict, dict]:
    t0 = time.time()
    filled = baselines.interpolate(task.x, task.observed)
    row = dict(ari=None, accuracy=None, regimes_used=None, heldout_bound_per_frame=None)
    scores, per_mask = imputation_scores(task, filled, None)
    row.update(scores)
    return row, {"eval": time.time() - t0, "impute_rmse_per_mask": per_mask}


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------

MODELS = ("slds_svae", "lds_svae", "arhmm", "gaussian_hmm", "interpolation")
# mocap6 trials whose exercises all occur in the other five (14_06 and 14_20 have some
# that occur nowhere else), so a held-out segmentation can be scored against the labels
MOCAP6_TEST_TRIALS = ("14_14", "13_29", "13_30", "13_31")


def run_dataset(name: str, mocap6_path: pathlib.Path, fast: bool, models) -> dict:
    cfg = dict(CONFIG[name])
    data = load(name, cfg, mocap6_path)
    K = cfg["K"]
    num_classes = int(len(np.unique(data.train_labels[data.train_labels >= 0])))
    masks = cfg.get("impute_masks", 1)
    task = impute_task(data, SEED + (1 if name == "mocap6" else 2), cfg["gaps_per_seq"], masks)
    hidden = int((task.valid & ~task.observed).sum())
    log(f"{name}: train {list(data.train_x.shape)}, test {list(data.test_x.shape)}, K = {K}, "
        f"{hidden} hidden test frames in {masks} mask(s) of {cfg['gaps_per_seq']} gaps per "
        "sequence")
    rows, timings = [], {}
    for model in models:
        log(f"{name} / {model} ...")
        t0 = time.time()
        if model.endswith("_svae"):
            row, timing = run_svae(model.split("_")[0], data, K, cfg, task, fast, name)
        elif model == "interpolation":
            row, timing = run_interpolation(task)
        else:
            with jax.enable_x64(True):
                row, timing = run_hmm(model, data, K, cfg, task, fast)
        seconds = time.time() - t0
        full = {"dataset": name, "model": model}
        full.update({k: row.get(k) for k in METRIC_KEYS if k != "seconds"})
        full["seconds"] = round(seconds, 1)
        rows.append(full)
        timings[model] = {k: (round(v, 2) if isinstance(v, float) else v)
                          for k, v in timing.items()}
        if "impute_rmse_per_mask" in timing:
            timings[model]["impute_rmse_per_mask"] = [
                round(v, 4) for v in timing["impute_rmse_per_mask"]]
        timings[model]["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
        log(f"{name} / {model}: {json.dumps(full)}")
    cfg.update(train_classes=num_classes, seed=SEED, impute_samples=IMPUTE_SAMPLES,
               iw_samples=IW_SAMPLES,
               train_shape=list(data.train_x.shape), test_shape=list(data.test_x.shape),
               impute_masks=masks, hidden_test_frames=hidden, gap_lengths="10-30", fast=fast)
    if fast:
        cfg.update(FAST)
    return {"rows": rows, "config": cfg, "timings": timings}


def targets(rows: list[dict]) -> dict:
    by = {r["model"]: r for r in rows if r["dataset"] == "mocap6"}
    if "slds_svae" not in by:
        return {}
    s = by["slds_svae"]
    out = {}
    if "arhmm" in by:
        out["mocap6_ari_slds_ge_arhmm"] = bool(s["ari"] >= by["arhmm"]["ari"])
    for other in ("lds_svae", "interpolation"):
        if other in by:
            out[f"mocap6_rmse_slds_lt_{other}"] = bool(
                s["impute_rmse"] < by[other]["impute_rmse"])
    return out


def table(rows: list[dict]) -> str:
    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    lines = ["| dataset | model | ARI | accuracy | impute RMSE | impute loglik | "
             "held-out bound / frame | regimes used | seconds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['model']} | {f(r['ari'], '.3f')} | "
            f"{f(r['accuracy'], '.3f')} | {f(r['impute_rmse'], '.3f')} | "
            f"{f(r['impute_loglik'], '.3f')} | {f(r['heldout_bound_per_frame'], '.2f')} | "
            f"{f(r['regimes_used'], 'd')} | {f(r['seconds'], '.0f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    global SEED, SAVE_STATE, LOAD_STATE
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mocap6", default=str(DEFAULT_MOCAP6), help="mocap6 folder")
    p.add_argument("--fast", action="store_true", help="smoke run (few steps; no file)")
    p.add_argument("--only", choices=sorted(CONFIG), default=None)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    p.add_argument("--out", default=None, help="results file (default bench/results/real.json)")
    p.add_argument("--kl-warmup", type=int, default=None, metavar="STEPS",
                   help="SVAEs: first STEPS steps with SVAE_ELBO(local_kl_weight=W) (default: "
                        "CONFIG's kl_warmup_steps; the loss logged then is the weighted one)")
    p.add_argument("--kl-warmup-weight", type=float, default=None, metavar="W")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help="networks, training keys, AR-HMM start and gaps (default 0)")
    p.add_argument("--natural-step", choices=cli.NATURAL_STEPS, default=None,
                   help="SVAEs' q(theta) step (default: CONFIG's: mocap6 guarded, "
                        "BasicMotions linear); the command's --natural-step")
    p.add_argument("--test-trial", choices=MOCAP6_TEST_TRIALS, default=None,
                   help="mocap6's held-out trial (default: CONFIG's, 14_14); the others "
                        "offered are those whose exercises all occur in the remaining five")
    p.add_argument("--natgrad-schedule", choices=cli.NATGRAD_SCHEDULES, default=None,
                   help="the SLDS-SVAE's natural-gradient rate (default: CONFIG's: "
                        "mocap6 cosine, BasicMotions constant); the command's "
                        "--natgrad-schedule (after the switching initialisation: the SLDS "
                        "steps only; the LDS-SVAE row keeps the constant rate)")
    p.add_argument("--warm-start", action="store_true",
                   help="SLDS-SVAE: the command's --warm-start (q(k) carried from step to "
                        "step; after the switching initialisation seeded by its "
                        "segmentation)")
    p.add_argument("--impute-masks", type=int, default=None, metavar="M",
                   help="imputation: M gap masks on copies of the test sequences (default: "
                        "CONFIG's: mocap6 32, BasicMotions 1; 1 = the single-mask "
                        "protocol)")
    p.add_argument("--save-state", default=None, metavar="DIR",
                   help="SVAEs: write each row's final SVI state to DIR/<data set>_<family>_"
                        "seed<S>/ as a `numpyro-svae fit` checkpoint (cli.save_checkpoint; "
                        "load with cli.load_checkpoint on cli.build(config, data))")
    p.add_argument("--load-state", default=None, metavar="DIR",
                   help="SVAEs: no training; evaluate the states a --save-state run of the "
                        "same options wrote to DIR (the rows' seconds then count loading and "
                        "evaluation only; the baselines are fitted as usual)")
    args = p.parse_args(argv)
    SAVE_STATE = pathlib.Path(args.save_state) if args.save_state else None
    LOAD_STATE = pathlib.Path(args.load_state) if args.load_state else None
    if LOAD_STATE is not None and not LOAD_STATE.is_dir():
        p.error(f"--load-state: no folder {str(LOAD_STATE)!r}")
    if args.impute_masks is not None and args.impute_masks < 1:
        p.error(f"--impute-masks must be >= 1, got {args.impute_masks}")
    changed = (args.natural_step, args.natgrad_schedule, args.test_trial, args.impute_masks,
               args.load_state) != (None,) * 5 or args.warm_start
    if (args.seed != DEFAULT_SEED or changed) and not (args.out or args.fast):
        # real.json holds the default recipe's rows; other seeds and steps go elsewhere
        p.error("--seed / --natural-step / --natgrad-schedule / --test-trial / --warm-start / "
                "--impute-masks / --load-state need --out "
                f"(bench/results/real.json holds the seed-{DEFAULT_SEED} rows of CONFIG's "
                "recipe)")
    SEED = args.seed
    for c in CONFIG.values():
        if args.natural_step is not None:
            c["natural_step"] = args.natural_step
        if args.natgrad_schedule is not None:
            c["natgrad_schedule"] = args.natgrad_schedule
        if args.warm_start:
            c["warm_start"] = True
        if args.impute_masks is not None:
            c["impute_masks"] = args.impute_masks
    if args.test_trial is not None:
        CONFIG["mocap6"]["test_trial"] = args.test_trial
    for c in CONFIG.values():
        if args.kl_warmup is not None:
            c["kl_warmup_steps"] = args.kl_warmup
        if args.kl_warmup_weight is not None:
            c["kl_warmup_weight"] = args.kl_warmup_weight
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad:
        p.error(f"unknown models {bad}; choose from {MODELS}")
    out = pathlib.Path(args.out) if args.out else (
        None if args.fast else ROOT / "bench" / "results" / "real.json")
    mocap6_path = pathlib.Path(args.mocap6)
    names = [args.only] if args.only else list(CONFIG)
    info = machine()
    t_start = time.time()
    results, skipped = {}, {}
    for name in names:
        if name == "mocap6" and not mocap6_path.exists():
            msg = f"mocap6 folder {str(mocap6_path)!r} not found: skipping mocap6"
            log(msg)
            skipped[name] = msg
            continue
        results[name] = run_dataset(name, mocap6_path, args.fast, models)
    info["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    info["total_seconds"] = round(time.time() - t_start, 1)
    rows = [r for res in results.values() for r in res["rows"]]
    print(table(rows))
    print(json.dumps({"targets": targets(rows), "total_seconds": info["total_seconds"]}))
    if out is None:
        return 0
    doc = {"rows": [], "runs": {}}
    if out.exists():
        try:
            doc = json.loads(out.read_text())
        except json.JSONDecodeError:
            pass
    new = {(r["dataset"], r["model"]) for r in rows}
    kept = [r for r in doc.get("rows", []) if (r["dataset"], r["model"]) not in new]
    doc["rows"] = sorted(kept + rows, key=lambda r: (r["dataset"] != "mocap6",
                                                     MODELS.index(r["model"])))
    runs = doc.get("runs", {})
    for name, res in results.items():
        timings = dict(runs.get(name, {}).get("timings", {}), **res["timings"])
        runs[name] = {"config": res["config"], "timings": timings, "machine": info}
    doc["runs"] = runs
    doc["skipped"] = skipped
    doc["targets"] = targets(doc["rows"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

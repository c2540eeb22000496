"""Reliability helpers of the ``numpyro-svae`` command (`numpyro_svae.cli`).

Pure checks that return a problem as one line of text (or ``None``), so that the command
turns them into its one-line errors before any JAX compilation:

- the data a run was trained on: absolute paths (`resolve_dataset`) and a content
  fingerprint of the loaded arrays (`array_fingerprint`, `fingerprint_problem`);
- the output folder: writable, not under a file (`out_problem`);
- the hidden staging folders ``.<out>.partial-<pid>-*`` that a run assembles its folder in:
  which belong to dead runs (`stale_stages`) and which of those hold a checkpoint;
- interruptions: `TrainingInterrupted` carries the state of the last completed step, and
  `deferred_signals` holds Ctrl-C / SIGTERM back while a checkpoint is being written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import signal
import tempfile
import threading
import time
from typing import Any, NamedTuple

import numpy as np

NAMED_DATASETS = ("basic_motions", "mocap6", "synthetic")
CHECKPOINT_EVERY = 50
"""Default of ``--checkpoint-every``: training steps between two checkpoints of a run."""
LOG_EVERY = 50
"""With ``--no-progress`` and checkpoints off: training steps between two progress lines."""
STALE_AFTER_S = 24 * 3600.0
"""A staging folder untouched for this long (seconds) is stale even if its PID is alive
(process ids are reused)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during training, with what the completed steps produced.

    Attributes
    ----------
    state : Any
        SVI state after the last completed step (the initial state if none completed).
    losses : np.ndarray
        [steps_done] losses of the completed steps of this call.
    """

    def __init__(self, state: Any, losses: np.ndarray):
        super().__init__(f"interrupted after {len(losses)} steps")
        self.state = state
        self.losses = losses


# ------------------------------------------------------------------------------------------
# data identity
# ------------------------------------------------------------------------------------------


def resolve_dataset(dataset: str) -> str:
    """`dataset` as stored in a run: a named dataset unchanged, a file as an absolute path
    (so that a run made in one folder can be resumed or evaluated from another)."""
    if dataset in NAMED_DATASETS:
        return dataset
    return os.path.abspath(os.path.expanduser(dataset))


def is_file_dataset(dataset: str) -> bool:
    return dataset not in NAMED_DATASETS


def array_fingerprint(arrays: dict[str, np.ndarray | None]) -> str:
    """SHA-256 over names, shapes, dtypes and bytes of `arrays` (``None`` = absent).

    Parameters
    ----------
    arrays : dict
        name -> array as read from the data (before any standardisation, so that a
        rescaled copy of the data has another fingerprint), or None.

    Returns
    -------
    str
        64 hexadecimal digits.
    """
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = arrays[name]
        if a is None:
            h.update(f"{name}:absent;".encode())
            continue
        a = np.ascontiguousarray(a)
        h.update(f"{name}:{list(a.shape)}:{a.dtype.str};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def data_record(dataset: str, data_path: str | None, fingerprint: str) -> dict:
    """What a checkpoint stores about its data: where it was read and its fingerprint."""
    path = dataset if is_file_dataset(dataset) else data_path
    return {"dataset": dataset, "path": path, "fingerprint": fingerprint}


def fingerprint_problem(stored: dict | None, fingerprint: str, path: str,
                        where: str) -> str | None:
    """Why the data now loaded from `path` are not the data of the run in `where` whose
    checkpoint record is `stored` (``None`` when they agree or the checkpoint predates
    fingerprints)."""
    if not stored or not stored.get("fingerprint") or stored["fingerprint"] == fingerprint:
        return None
    then = stored.get("path") or stored.get("dataset")
    origin = f", trained on {then!r}" if then != path else ""
    return (f"dataset {path!r} is not the data the run in {where!r} was trained on{origin}: "
            f"fingerprint now {fingerprint[:16]}, stored {stored['fingerprint'][:16]} "
            "(the data were replaced or changed; point --dataset at the original data)")


def missing_dataset_problem(dataset: str, run_dir: pathlib.Path) -> str | None:
    """A file dataset stored in `run_dir`'s checkpoint that is no longer there."""
    if not is_file_dataset(dataset) or os.path.exists(dataset):
        return None
    return (f"the data of {str(run_dir)!r} are gone: the absolute path {dataset!r} stored in "
            "its checkpoint.json does not exist; pass --dataset PATH to give the same data "
            "at another place")


def npz_problem(path: pathlib.Path) -> str | None:
    """Why `path` cannot be a ``.npz`` archive of arrays (``None`` when it can)."""
    import zipfile

    try:
        ok = zipfile.is_zipfile(path)
    except OSError as e:
        return f"dataset file {str(path)!r} cannot be read: {e.strerror or e}"
    if not ok:
        return (f"dataset file {str(path)!r} is not a valid .npz (a zip archive of numeric "
                "arrays as written by numpy.savez)")
    return None


# ------------------------------------------------------------------------------------------
# output folder
# ------------------------------------------------------------------------------------------


def out_problem(out: pathlib.Path) -> str | None:
    """Why the run folder `out` (and its staging folder next to it) cannot be written.

    Walks up to the nearest existing ancestor of ``out``'s parent: it must be a folder in
    which a folder can be created (probed by creating and removing one, which also catches
    read-only file systems and root-owned locations that ``os.access`` misjudges).
    """
    parent = out.absolute().parent
    probe = parent
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return f"--out {str(out)!r} cannot be created: {str(probe)!r} is a file, not a folder"
    if out.exists() and not out.is_dir():
        return f"--out {str(out)!r} is a file, not a run folder"
    try:
        tempfile.TemporaryDirectory(prefix=".numpyro-svae-probe-", dir=probe).cleanup()
    except OSError as e:
        return (f"--out {str(out)!r} is not writable: cannot create folders in "
                f"{str(probe)!r} ({e.strerror or e})")
    return None


# ------------------------------------------------------------------------------------------
# staging folders
# ------------------------------------------------------------------------------------------


def stage_prefix(out: pathlib.Path) -> str:
    """Name prefix of `out`'s staging folders; the process id follows it."""
    return f".{out.name}.partial-"


def make_stage(out: pathlib.Path) -> pathlib.Path:
    """A fresh staging folder next to `out`, named after this process (`stale_stages`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = pathlib.Path(tempfile.mkdtemp(prefix=f"{stage_prefix(out)}{os.getpid()}-",
                                          dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes it private; a run folder is not
    return stage


def publish(stage: pathlib.Path, out: pathlib.Path) -> None:
    """Rename `stage` to `out`, swapping out a previous folder there, so that `out` never
    holds half of a run (the swapped-out folder is a staging name until it is removed)."""
    old = None
    if out.exists():
        old = out.with_name(stage.name + ".old")
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _age(path: pathlib.Path, now: float) -> float:
    try:
        newest = max([path.stat().st_mtime, *(p.stat().st_mtime for p in path.iterdir())])
    except OSError:
        return 0.0
    return now - newest


def stale_stages(out: pathlib.Path, *, max_age: float = STALE_AFTER_S,
                 now: float | None = None) -> list[pathlib.Path]:
    """Staging folders of `out` left by dead runs: their PID (in the name) is not running,
    or nothing in them changed for `max_age` seconds; newest first."""
    prefix = stage_prefix(out)
    parent = out.absolute().parent
    if not parent.is_dir():
        return []
    now = time.time() if now is None else now
    found = []
    for p in parent.iterdir():
        if not (p.name.startswith(prefix) and p.is_dir()):
            continue
        pid_text = p.name[len(prefix):].split("-")[0]
        dead = not pid_text.isdigit() or not _pid_alive(int(pid_text))
        age = _age(p, now)
        if dead or age > max_age:
            found.append((age, p))
    return [p for _, p in sorted(found, key=lambda t: t[0])]


class StageCheckpoint(NamedTuple):
    """A staging folder of a dead run holding a checkpoint that passes its checksum."""

    folder: pathlib.Path
    step: int


def stage_checkpoint(folder: pathlib.Path) -> StageCheckpoint | None:
    """`folder`'s checkpoint when it is complete and its checksum matches, else None."""
    meta_p, npz_p = folder / "checkpoint.json", folder / "checkpoint.npz"
    try:
        meta = json.loads(meta_p.read_text())
        if hashlib.sha256(npz_p.read_bytes()).hexdigest() != meta.get("sha256"):
            return None
        return StageCheckpoint(folder, int(meta["step"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


# ------------------------------------------------------------------------------------------
# signals
# ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def deferred_signals():
    """Hold SIGINT and SIGTERM back for the duration (a checkpoint being written); one that
    arrived is raised as `KeyboardInterrupt` at the end. Outside the main thread, where
    handlers cannot be installed, nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    prev = {s: signal.signal(s, lambda signum, frame: got.append(signum))
            for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in prev.items():
            if h is not None:  # None: a handler not installed from Python; nothing to put back
                signal.signal(s, h)
        if got:
            raise KeyboardInterrupt

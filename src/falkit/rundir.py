"""A run directory, opened safely (DESIGN.md §6; issue 12): one object that every entry point
(`falkit run`, `sweep`, `fast`, the Flower ServerApp) uses to

* refuse a name that is not one path component, an `out_dir` that is a file, a folder that
  falkit did not create;
* compare a run's saved config with the new one, ignoring where results go and where the
  data are read from (`out_dir`, `data.data_root`, `name`, `fl.on_client_failure`), and
  name the keys that differ;
* refuse to resume on different data (a fingerprint of the arrays, `data.json`);
* hold a lock, so that two processes never write one run at once (the second one is told
  who holds it);
* `--overwrite` only after everything was validated, by moving the old run aside first:
  it is deleted once the new run has finished a cycle, and put back if the new run fails
  before that (also after a `kill -9`: the next start puts it back);
* clean up the temporary files of atomic writes a killed process left behind.

A directory is falkit's run iff it holds falkit's `status.json` (written first, before the
config) — `config.toml` alone is a config file, not a run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from falkit import config as config_mod
from falkit.config import Config, check_name, identity
from falkit.errors import ConfigError, FalkitError, RunLocked
from falkit.results import write_atomic

# Who holds a lock, besides pid and host: set by a Ray task of `falkit sweep --ray` ("ray task
# <id>"). A lock held under the same tag is the task's own earlier try, whose node or worker
# died and whose process (and so its lock) may not be gone yet: waited for, OWN_WAIT_S at most,
# instead of skipping the run as one another process holds.
LOCK_TAG = ""
OWN_WAIT_S = 120.0

# write_atomic's temporary files: ".<name>.<8 random characters of mkstemp>"
_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}$")


def is_run(path: Path) -> bool:
    """Whether `path` is a run directory falkit created (its status.json marker)."""
    try:
        status = json.loads((path / "status.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(status, dict) and "cycles" in status and "complete" in status


def check_out_dir(path: Path, what: str = "out_dir") -> None:
    """`path` and every folder above it must be a directory or not exist yet."""
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise ConfigError(f"{what}: {p} is a file, not a directory")


def config_diff(old: Config, new: Config) -> list[str]:
    """`key: old -> new` for every setting that makes the two configs different runs."""
    a, b = identity(old), identity(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def data_fingerprint(ds: Any, dataset: str) -> dict[str, Any]:
    """SHA-256 of the train and test arrays a run uses (pixels, labels, shapes) of `ds`
    (an ImageDataset)."""

    def digest(*arrays: Any) -> str:
        h = hashlib.sha256()
        for a in arrays:
            arr = np.ascontiguousarray(a.numpy() if isinstance(a, torch.Tensor) else a)
            h.update(f"{arr.dtype.str}{arr.shape}".encode())
            h.update(memoryview(arr).cast("B"))
        return h.hexdigest()

    return {"dataset": dataset, "train": digest(ds.x_train, ds.y_train),
            "test": digest(ds.x_test, ds.y_test), "num_train": len(ds.y_train),
            "num_test": len(ds.y_test)}


class RunDir:
    """One run directory. `inspect` reads only; `open` (a context manager) locks and
    prepares it for writing."""

    def __init__(self, path: Path, flag: str = "--overwrite"):
        self.path = path
        self.flag = flag  # how the user asks to discard a run (Flower: overwrite=true)
        self.aside = path.parent / f".{path.name}.replaced"
        self.lock_path = path.parent / f".{path.name}.lock"
        self._lock_fd: int | None = None
        self._committed = True

    @classmethod
    def of(cls, cfg: Config, flag: str = "--overwrite") -> RunDir:
        check_name(cfg.run_name(), "name")
        out_dir = Path(cfg.out_dir).expanduser()
        check_out_dir(out_dir)
        return cls(out_dir / cfg.run_name(), flag)

    # -- reading ------------------------------------------------------------------------
    def saved_config(self) -> Config | None:
        path = self.path / "config.toml"
        if not path.is_file():
            return None
        try:
            return config_mod.loads(path.read_text(encoding="utf-8"))
        except (FalkitError, ValueError, OSError) as e:
            raise FalkitError(f"{path}: cannot read the run's config ({e}); start the run "
                              f"again with {self.flag}") from None

    def status(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def inspect(self, cfg: Config, overwrite: bool) -> str:
        """'new' | 'resume' | 'complete', or a one-line error: the path is a file, a folder
        falkit did not create, or a run of another config. An overwrite that was killed is
        undone first (under the lock), so the answer is about the run the user left."""
        if self.aside.exists() and self._lock_fd is None:
            self._lock()
            try:
                self._recover()
            finally:
                self._unlock()
        p = self.path
        if p.exists() and not p.is_dir():
            raise ConfigError(f"run directory {p} is a file; choose another name= or out_dir=")
        if not p.is_dir() or not any(p.iterdir()):
            return "new"
        if not is_run(p):
            raise ConfigError(f"{p} exists and is not a falkit run (no status.json); falkit "
                              "never deletes it: choose another name= or out_dir=")
        if overwrite:
            return "new"
        if not self.status().get("cycles_done") and not (p / "checkpoint").exists():
            return "new"  # no cycle finished (failed or killed in its first): nothing to lose
        saved = self.saved_config()
        if saved is None:
            return "new"  # killed between status.json and config.toml: nothing ran yet
        diff = config_diff(saved, cfg)
        if diff:
            shown = "; ".join(diff[:4]) + (f"; ... ({len(diff)} keys)" if len(diff) > 4 else "")
            done = self.status().get("cycles_done", 0)
            raise ConfigError(f"{p} holds a run with a different config ({shown}); choose "
                              f"another name= (or out_dir=), or set those keys back to "
                              f"continue it; {self.flag} would discard its {done} finished "
                              "cycle(s)")
        return "complete" if self.status().get("complete") else "resume"

    # -- writing ------------------------------------------------------------------------
    @contextlib.contextmanager
    def open(self, cfg: Config, overwrite: bool, fingerprint: dict[str, Any] | None = None,
             cycles: int | None = None):
        """Lock the run, recover from an interrupted overwrite, check the data, move an old
        run aside (overwrite), write status.json and config.toml; yields the state
        ('new' | 'resume' | 'complete'). Call `commit()` once the new run has finished a
        cycle; an exception before that puts the old run back."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock()
        except OSError as e:
            raise FalkitError(f"cannot write {self.path}: {e.strerror or e}") from None
        try:
            self._recover()
            state = self.inspect(cfg, overwrite)
            if state == "resume" and fingerprint is not None:
                self._check_data(fingerprint)
            if state == "complete":
                yield state
                return
            if overwrite and self.path.exists():
                os.replace(self.path, self.aside)
                self._committed = False
            self.path.mkdir(parents=True, exist_ok=True)
            self._clean_temp()
            if state == "new":
                write_atomic(self.path / "status.json", json.dumps(
                    {"complete": False, "cycles_done": 0,
                     "cycles": cycles if cycles is not None else cfg.budget.cycles}) + "\n")
            write_atomic(self.path / "config.toml", config_mod.dumps(cfg))
            if fingerprint is not None:
                write_atomic(self.path / "data.json", json.dumps(fingerprint, indent=1) + "\n")
            yield state
            self.commit()  # ended without an error: the new run stands
        except BaseException:
            self._rollback()
            raise
        finally:
            self._unlock()

    def commit(self) -> None:
        """The new run has a finished cycle: the run it replaced is deleted for good."""
        if not self._committed:
            shutil.rmtree(self.aside, ignore_errors=True)
            self._committed = True

    def _rollback(self) -> None:
        if not self._committed and self.aside.exists():
            shutil.rmtree(self.path, ignore_errors=True)
            os.replace(self.aside, self.path)
            self._committed = True

    def _recover(self) -> None:
        """An overwrite that was killed: the new run keeps its place once it finished a
        cycle, else the old run is put back."""
        if not self.aside.is_dir():
            return
        if self.path.is_dir() and is_run(self.path) and self.status().get("cycles_done"):
            shutil.rmtree(self.aside, ignore_errors=True)
            return
        if self.path.exists():
            if not is_run(self.path):
                raise ConfigError(f"{self.path} is not a falkit run, and {self.aside} holds "
                                  "the run an interrupted --overwrite moved aside: move one "
                                  "of them away by hand")
            shutil.rmtree(self.path)
        os.replace(self.aside, self.path)

    def _check_data(self, fingerprint: dict[str, Any]) -> None:
        try:
            saved = json.loads((self.path / "data.json").read_text())
        except (OSError, ValueError):
            return  # a run from before fingerprints: this start records one
        keys = ("train", "test", "num_train", "num_test")
        if any(saved.get(k) != fingerprint.get(k) for k in keys):
            raise ConfigError(f"{self.path} was run on different data than "
                              f"{fingerprint['dataset']} holds now (data.json: train/test "
                              f"arrays differ); restore the data, or pass {self.flag} to "
                              "start again")

    def _clean_temp(self) -> None:
        for folder in (self.path, self.path / "checkpoint"):
            if folder.is_dir():
                for f in folder.iterdir():
                    if f.is_file() and _TEMP.match(f.name):
                        f.unlink(missing_ok=True)

    def _lock(self) -> None:
        deadline = time.monotonic() + OWN_WAIT_S
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 512).decode(errors="replace").strip() or "another process"
                os.close(fd)
                if LOCK_TAG and f"({LOCK_TAG})" in holder and time.monotonic() < deadline:
                    time.sleep(0.5)  # this task's own dying try: its lock goes with it
                    continue
                raise RunLocked(f"{self.path} is in use by {holder}; wait for it to end "
                                "(or stop it) and run again", holder) from None
            try:  # the holder may have released and unlinked the file after we opened it
                same = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        cmd = LOCK_TAG or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200]
        os.write(fd, (f"falkit pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')} ({cmd})\n").encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.lock_path)
            os.close(self._lock_fd)
            self._lock_fd = None


def load_checkpoint(run: RunDir) -> Any:
    """checkpoint/latest.pt, or None; an unreadable one is a one-line error saying how to
    start the run again."""
    path = run.path / "checkpoint" / "latest.pt"
    if not path.is_file():
        return None
    try:
        # onto the CPU: a run may resume on another device than it was saved from (a CUDA
        # checkpoint on a machine without CUDA); the loop moves the tensors to its device
        ck = torch.load(path, weights_only=False, map_location="cpu")
        if not isinstance(ck, dict) or "cycle" not in ck:
            raise ValueError("not a falkit checkpoint")
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        raise FalkitError(f"the checkpoint of run {run.path} is unreadable "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          f"start the run again with {run.flag}") from None
    return ck

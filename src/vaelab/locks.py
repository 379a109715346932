"""The lock of a run directory, RUN/.lock: one trainer at a time, and a lock left by a process that
is gone taken over."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vaelab.errors import RunError

LOCK = ".lock"



def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def locked(run_dir: str | Path) -> Iterator[None]:
    """Hold `run_dir/.lock` for this process; refuse if a live process holds it.

    A lock left by a process of this machine that is gone (killed, crashed) is taken over, and so
    is one written on another machine (whose processes cannot be checked from here). An empty lock
    is a trainer between creating and writing it, or one killed then: it is refused for
    `EMPTY_LOCK_SECONDS` and taken over after. Any other file of that name is not vaelab's and is
    refused, never deleted.
    """
    path = Path(run_dir) / LOCK
    if path.is_dir() or (path.exists() and not path.is_file()):
        raise RunError(f"{path}: is not a lock file (a folder?); remove it if no trainer is running")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            pid, host = holder.get("pid"), holder.get("host")
            if not (isinstance(pid, int) and isinstance(host, str)):
                age = _empty_for(path)
                if age is None:
                    raise RunError(
                        f"{path}: is not a lock vaelab wrote (no process id and host in it); vaelab "
                        "will not remove a file it did not write: move it away"
                    ) from None
                if age < EMPTY_LOCK_SECONDS:
                    raise RunError(
                        f"{run_dir}: a trainer is starting in it; wait for it or try again"
                    ) from None
            if isinstance(pid, int) and host == me["host"] and _pid_alive(pid):
                raise RunError(
                    f"{run_dir}: held by a running trainer (process {pid} on {host}); "
                    "wait for it or stop it first"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise RunError(f"{run_dir}: could not take the lock {path}")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            if _read_lock(path).get("pid") == me["pid"]:
                os.unlink(path)


EMPTY_LOCK_SECONDS = 10.0  # an empty lock older than this is a trainer killed before writing it


def _empty_for(path: Path) -> float | None:
    """Seconds since an empty file was last changed; None if it holds something."""
    try:
        st = path.stat()
    except FileNotFoundError:  # (its process removed it meanwhile: nothing in the way)
        return math.inf
    return max(0.0, time.time() - st.st_mtime) if st.st_size == 0 else None


def _read_lock(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}

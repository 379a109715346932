"""Files written whole or not at all: a temporary file in the same folder, flushed, fsynced and
renamed over the old one, so a reader (or a crash) never sees half a file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from vaelab.errors import RunError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that the file is either the old one or the whole new one.

    Raises:
        RunError: the folder cannot be created or the file not written (full disk, no
            permission); the previous file, if any, is left as it was.
    """
    path = Path(path)
    if path.is_dir():
        raise RunError(f"{path}: is a folder; the file cannot be written there")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise RunError(f"{path}: cannot be written ({blocking} is a file, not a folder)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise RunError(f"{path}: cannot be written ({os_reason(e)})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):  # ENOSPC, EIO, EACCES...: one line, the old file is intact
            kept = "; the previous version is kept" if path.exists() else ""
            raise RunError(f"{path}: cannot be written ({os_reason(e)}){kept}") from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save through a temporary file (load it back with weights_only=True)."""
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def os_reason(e: OSError) -> str:
    """An OSError's reason in a few words ("No space left on device")."""
    return e.strerror or " ".join(str(e).split())[:200] or type(e).__name__

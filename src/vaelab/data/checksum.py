"""SHA-256 of files, read in chunks, and a check that refuses a mismatch."""

from __future__ import annotations

import hashlib
from pathlib import Path

from vaelab.errors import DataError

_CHUNK = 1 << 20  # 1 MiB: constant memory whatever the file size


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file as 64 lowercase hex digits.

    Args:
        path: the file to hash; read in 1 MiB chunks.
    Returns:
        The hex digest.
    Raises:
        DataError: the file cannot be read.
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except OSError as e:
        raise DataError(f"{path}: cannot be read to check its checksum ({e.strerror or e})") from e
    return digest.hexdigest()


def verify(path: str | Path, expected: str, what: str) -> None:
    """Refuse a file whose SHA-256 is not `expected`.

    Args:
        path: the file to check.
        expected: the SHA-256 it must have (hex, any case).
        what: a few words saying what the file is, for the message (e.g. "MNIST wheel").
    Raises:
        DataError: one line naming the file, what it is, and both digests.
    """
    actual = sha256_file(path)
    if actual != expected.lower():
        raise DataError(
            f"{what} {path}: sha256 is {actual}, expected {expected.lower()}; "
            "the file is corrupt or not the one published, so it was not used"
        )

"""Process settings that keep training and evaluation on the CPU's fast paths, and the memory
left to the process."""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path


def reuse_freed_memory() -> None:
    """Let glibc keep freed chunk buffers for reuse instead of unmapping them (once per process).

    Every training step and evaluation chunk allocates temporaries larger than glibc's mmap
    threshold (a batch's logits, the optimizer's buffers, tens of MB per evaluation chunk);
    glibc's default returns them to the OS and the next step page-faults them back, which took
    ~40% of the evaluation time on a 2-core VM (measured). Buffers over 32 MB are still mapped
    apart. The process keeps up to its peak working memory after use.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not sys.platform.startswith("linux"):
        return
    _MALLOC_TUNED = True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's largest allowed value
    mallopt(m_trim_threshold, 256 * 2**20)


_MALLOC_TUNED = False


def available_memory() -> int | None:
    """Bytes this process could still allocate, or None where that cannot be read (not Linux).

    Linux's MemAvailable plus free swap, or, if less, what the memory cgroup (a container's
    limit) leaves beside the memory its processes hold (page cache, which the kernel gives back,
    is not counted as held). Generous on purpose: it is there to refuse what can never fit, not
    to predict swapping.
    """
    found = []
    try:
        meminfo = {
            line.split(":")[0]: int(line.split()[1]) * 1024
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith(("MemAvailable:", "SwapFree:"))
        }
        if "MemAvailable" in meminfo:
            found.append(meminfo["MemAvailable"] + meminfo.get("SwapFree", 0))
    except (OSError, ValueError, IndexError):
        pass
    cgroup = _cgroup_room()
    if cgroup is not None:
        found.append(cgroup)
    return min(found) if found else None


def _cgroup_room(proc: Path = Path("/proc/self/cgroup"), mount: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory cgroup's limit less its processes' own memory (anonymous pages), v2 or v1."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, rel = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy
            files = ("memory.max", "memory.stat", "anon")
            roots = [mount / rel.lstrip("/"), mount]
        elif "memory" in controllers.split(","):  # v1
            files = ("memory.limit_in_bytes", "memory.stat", "total_rss")
            roots = [mount / "memory" / rel.lstrip("/"), mount / "memory"]
        else:
            continue
        for root in roots:
            try:
                limit = (root / files[0]).read_text().strip()
                stat = dict(row.split() for row in (root / files[1]).read_text().splitlines())
            except (OSError, ValueError):
                continue
            if limit == "max" or int(limit) >= 2**60:  # no limit
                break
            return max(0, int(limit) - int(stat.get(files[2], 0)))
    return None


def beyond_memory(nbytes: int) -> str | None:
    """"more than the N GiB of memory available" when `nbytes` could not be allocated now, else
    None (also where the memory available cannot be read)."""
    available = available_memory()
    if available is not None and nbytes > available:
        return f"more than the {size_text(available)} of memory available"
    return None


def size_text(nbytes: float) -> str:
    """A size in GiB from 1 GiB up, in MiB from 1 MiB up, in KiB below."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= size:
            return f"{nbytes / size:,.1f} {unit}"
    return f"{nbytes / 2**10:,.1f} KiB"

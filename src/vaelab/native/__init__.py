"""The fused MLP step as native code (its work between the matrix products, and where the CPU has
AVX-512 or AVX2 the products and the seed's whole step): step.c, compiled on first use.

`library()` compiles step.c with the machine's C compiler (`$CC`, else `cc`; `-O3 -march=native`,
about a second) into `$VAELAB_HOME/native/` (default `~/.cache/vaelab/native/`), loads it with
ctypes and checks every function against PyTorch on small random inputs (`check.py`). The file's
name carries a digest of the source, the flags, the compiler's version and the CPU's features,
so another machine or compiler builds its own, and a process only ever loads a file that it or an
identical set-up built (a file there that does not load is built again).

Where PyTorch runs on GNU OpenMP (libgomp, as its Linux wheels do), step.c is built with
`-fopenmp` and linked to the very runtime PyTorch loaded, so that its parallel loops run on
PyTorch's threads, as many as `torch.set_num_threads` says, and never start a second pool; a
build that cannot (another compiler's runtime, no libgomp) is made again without it, and its
loops run on one thread. `openmp()` says which. `VAELAB_NATIVE_OPENMP=0` asks for the build
without.

Where any of that fails (no compiler, a failed build, a failed check) `library()` returns None,
`reason()` says why in one line, and the step runs the same arithmetic as PyTorch operations.
`VAELAB_NATIVE=0` asks for the PyTorch path.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from vaelab.data.mnist import cache_dir

SOURCE = Path(__file__).with_name("step.c")
# no -ffast-math: NaNs and infinities go through as in PyTorch (step.c's header). -fno-trapping-math
# (no floating-point traps, which nothing enables) lets GCC compute both sides of a select where
# the CPU has no masked vectors: without it, an AVX2 build left the likelihood pass scalar (8 x
# as long as vectorized); the values are the same
FLAGS = (
    "-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd"
)
BUILD_SECONDS = 120

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {  # name: (restype, argtypes), as step.c declares them
    "reparameterize": (ctypes.c_double, (_P, _P, _P, _I, _I, _F, _P, _P, _P)),
    "bernoulli_head": (ctypes.c_double, (_P, _P, _I, _I, _F, _F, _P, _P, _P)),
    "activation_back": (None, (_P, _P, _I, _I, ctypes.c_int, _P)),
    "latent_back": (None, (_P, _P, _P, _P, _I, _I, _F, _P, _P, _P, _P)),
    "transpose": (None, (_P, _I, _I, _P)),
    "latent_forward": (
        ctypes.c_double, (_P, _I, _I, _I, _P, _P, _P, _P, _P, _F, _P, _P, _I, _P, _P, _P, _P, _P, _P, _P)
    ),
    "latent_backward": (
        None,
        (_P, _P, _I, _I, ctypes.c_int, _P, _P, _P, _P, _P, _P, _P, _I, _F, _P, _I, _P, _P, _P, _P, _P,
         _P, _P, _P),
    ),
    "rmsprop": (None, (_P, _P, _P, _I, _F, _F, _F, _F)),
    "sparse_rows": (_I, (_P, _I, _I, _I, _P, _P, _P)),
    "sparse_columns": (None, (_P, _P, _P, _I, _I, _P, _P, _P)),
    "sparse_product": (None, (_P, _P, _P, _I, _P, _I, _P, _P)),
    "gather_levels": (_I, (_P, _I, _I, _P, _I, _P)),
    "gemm_tiled": (_I, ()),
    "gemm": (None, (_P, _I, _I, _P, _I, _P, _P, _I, _I, _I)),
    "pool_use": (_I, (_I, _I)),
    "pool_counts": (_I, (_I,)),
    "pool_delay": (None, (_I,)),
    "current_cpu": (_I, ()),
    "mlp_step_bytes": (_I, (_I, _I, _I, _I, _I)),
    "mlp_step": (_I, (_P, _I, _I, _I, _I, _I, _F, _F, _F, _F, ctypes.c_double, _P)),
}

_reason = ""


def reason() -> str:
    """Why `library()` returned None ('' when it did not)."""
    library()
    return _reason


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _remove_stale_builds(folder: Path) -> None:
    """Remove the temporary files of builds that were killed part-way: older than a build may take,
    so never one that another process is writing now."""
    for old in folder.glob(".build-*.so"):
        with contextlib.suppress(OSError):  # (gone already: another process removed it)
            if time.time() - old.stat().st_mtime > 2 * BUILD_SECONDS:
                old.unlink()


def openmp_runtime() -> str | None:
    """The file of the GNU OpenMP runtime (libgomp) this process has loaded, PyTorch's, or None
    (another runtime, or a system without /proc)."""
    import torch  # noqa: F401  (PyTorch loads its runtime on import)

    with contextlib.suppress(OSError):
        for line in Path("/proc/self/maps").read_text().splitlines():
            fields = line.split(maxsplit=5)  # address, perms, offset, dev, inode, path
            path = Path(fields[5]) if len(fields) == 6 else None
            if path and path.name.startswith("libgomp") and ".so" in path.name and path.is_file():
                return str(path)
    return None


def _openmp_flags() -> tuple[str, ...]:
    """The extra arguments of a build on PyTorch's OpenMP runtime, or () where there is none (or
    VAELAB_NATIVE_OPENMP=0). The runtime's own file comes in as an input, `--as-needed` drops the
    compiler's default -lgomp where that file already provides every symbol, and `-z defs` fails
    the link, rather than a later call, where it does not (another compiler's runtime)."""
    if os.environ.get("VAELAB_NATIVE_OPENMP", "1").strip() == "0":
        return ()
    runtime = openmp_runtime()
    return ("-fopenmp", "-Wl,-z,defs", "-Wl,--as-needed", runtime) if runtime else ()


def _build(compiler: list[str], out: Path, extra: tuple[str, ...] = ()) -> str:
    """Compile step.c into `out` (atomically), with `extra` arguments after the source; returns
    '' or why it failed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(out.parent)
    fd, tmp = tempfile.mkstemp(suffix=".so", prefix=".build-", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [*compiler, *FLAGS, "-o", tmp, str(SOURCE), *extra, "-lm"],
            capture_output=True, text=True, timeout=BUILD_SECONDS,
        )
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no message"])[0]
            return f"{' '.join(compiler)} failed on {SOURCE.name}: {first}"
        os.replace(tmp, out)
        return ""
    except subprocess.TimeoutExpired:
        return f"{' '.join(compiler)} took over {BUILD_SECONDS} s on {SOURCE.name}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_openmp = False


def openmp() -> bool:
    """Whether the library's parallel loops run on PyTorch's OpenMP threads (else on one)."""
    return library() is not None and _openmp


_unpinned: set[int] | None = None  # the calling thread's CPUs before helper_thread pinned it


def helper_thread(on: bool) -> bool:
    """Share the whole step's output-layer weight gradient with a helper thread (step.c's
    `pool_use`: the step goes on while the helper computes it, and takes what the helper has not)
    while the training steps run on one thread because another process keeps a core busy;
    returns whether it is on. On, the calling thread is pinned to the CPU it is on and the helper
    to another of its CPUs (so that the two never take turns on one core while the busy process
    has the other); off, the calling thread gets its CPUs back. It stays off without the library
    or a second CPU, or where threads cannot be pinned. Call it off before giving PyTorch more
    threads (a thread started while this one is pinned would be pinned as well)."""
    global _unpinned
    lib = library()
    if not on or lib is None or not hasattr(os, "sched_setaffinity"):
        if lib is not None:
            lib.pool_use(0, -1)
        if _unpinned is not None:
            os.sched_setaffinity(0, _unpinned)
            _unpinned = None
        return False
    cpus = _unpinned if _unpinned is not None else os.sched_getaffinity(0)
    here = lib.current_cpu()
    others = sorted(cpus - {here})
    if here not in cpus or not others or not lib.pool_use(1, others[0]):
        return False
    try:
        os.sched_setaffinity(0, {here})
    except OSError:
        lib.pool_use(0, -1)
        return False
    _unpinned = cpus
    return True


@functools.cache
def library():
    """The compiled step.c as a ctypes library, or None (then `reason()` says why): built on
    PyTorch's OpenMP runtime where there is one and that build passes its check, else without."""
    global _reason, _openmp
    extra = _openmp_flags()
    lib = _library(extra) if extra else None
    _openmp = lib is not None
    if lib is None:
        lib = _library(())
    if lib is not None:
        _reason = ""  # (a failed OpenMP build does not make the library missing)
    return lib


def _library(extra: tuple[str, ...]):
    """`library()` with these extra build arguments (their own file), or None."""
    global _reason
    if os.environ.get("VAELAB_NATIVE", "1").strip() == "0":
        _reason = "VAELAB_NATIVE=0"
        return None
    compiler = shlex.split(os.environ.get("CC") or "cc") or ["cc"]  # ("ccache gcc" is two words)
    shown = " ".join(compiler)
    if shutil.which(compiler[0]) is None:
        _reason = f"no C compiler found ({shown})"
        return None
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        source = SOURCE.read_text()
        parts = [source, " ".join(FLAGS + extra), version, platform.machine(), _cpu_features()]
        key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
        path = cache_dir() / "native" / f"step-{key}.so"
        lib = _load(compiler, path, extra)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:  # (RuntimeError: no home folder)
        _reason = f"cannot build or load step.c ({getattr(e, 'strerror', None) or e or type(e).__name__})"
        return None
    if isinstance(lib, str):
        _reason = lib
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    from vaelab.native.check import failures

    bad = failures(lib)
    if bad:
        _reason = f"its {', '.join(bad)} differed from PyTorch's (the compiler's output is not used)"
        return None
    return lib


def _load(compiler: list[str], path: Path, extra: tuple[str, ...] = ()):
    """The library at `path`, built first if it is not there, and built again if the file there
    does not load (another machine's, a damaged file); or why not, as a string."""
    if not path.exists():
        why = _build(compiler, path, extra)
        if why:
            return why
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        why = _build(compiler, path, extra)
        return why or ctypes.CDLL(str(path))

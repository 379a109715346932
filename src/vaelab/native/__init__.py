"""The fused MLP step's elementwise work as native code: step.c, compiled on first use.

`library()` compiles step.c with the machine's C compiler (`$CC`, else `cc`; `-O3 -march=native`,
about a second) into `$VAELAB_HOME/native/` (default `~/.cache/vaelab/native/`), loads it with
ctypes and checks it against PyTorch on a small batch. The file's name carries a digest of the
source, the flags, the compiler's version and the CPU's features, so another machine or compiler
builds its own, and a process only ever loads a file that it or an identical set-up built.

Where any of that fails (no compiler, a failed build, a failed check) `library()` returns None,
`reason()` says why in one line, and the step runs the same arithmetic as PyTorch operations.
`VAELAB_NATIVE=0` asks for the PyTorch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("step.c")
# no -ffast-math: NaNs and infinities go through as in PyTorch (step.c's header)
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno", "-fopenmp-simd")
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


def _build(compiler: str, out: Path) -> str:
    """Compile step.c into `out` (atomically); returns '' or why it failed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", prefix=".build-", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *FLAGS, "-o", tmp, str(SOURCE), "-lm"],
            capture_output=True, text=True, timeout=BUILD_SECONDS,
        )
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no message"])[0]
            return f"{compiler} failed on {SOURCE.name}: {first}"
        os.replace(tmp, out)
        return ""
    except subprocess.TimeoutExpired:
        return f"{compiler} took over {BUILD_SECONDS} s on {SOURCE.name}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _self_check(lib) -> str:
    """Compare each function with PyTorch's operations on a small random batch; '' or what differs."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    B, D, K = 7, 37, 3
    ptr = torch.Tensor.data_ptr
    logits = torch.randn(B, D, generator=g) * 6
    target = torch.rand(B, D, generator=g)
    dl, db, work = torch.empty(B, D), torch.empty(D), torch.empty(D)
    recon = lib.bernoulli_head(ptr(logits), ptr(target), B, D, 5.0, 0.5, ptr(dl), ptr(db), ptr(work))
    clipped = logits.clamp(-5.0, 5.0)
    want = torch.where(logits.abs() < 5.0, (torch.sigmoid(clipped) - target) * 0.5, 0.0)
    good = abs(recon - F.binary_cross_entropy_with_logits(clipped, target, reduction="sum").item()) < 1e-3
    good = good and torch.allclose(dl, want, atol=1e-6) and torch.allclose(db, want.sum(0), atol=1e-5)
    mean, log_var, eps = (torch.randn(B, K, generator=g) for _ in range(3))
    std, noise, z = torch.empty(B, K), torch.empty(B, K), torch.empty(B, K)
    kl = lib.reparameterize(ptr(mean), ptr(log_var), ptr(eps), B, K, 1.0, ptr(std), ptr(noise), ptr(z))
    want_kl = (-0.5 * (1 + log_var - mean**2 - log_var.exp())).sum().item()
    want_z = mean + (0.5 * log_var).exp() * eps
    good = good and abs(kl - want_kl) < 1e-4 and torch.allclose(z, want_z, atol=1e-6)
    if not good:
        return "its check against PyTorch failed (the compiler's output is not trusted)"
    return ""


@functools.cache
def library():
    """The compiled step.c as a ctypes library, or None (then `reason()` says why)."""
    global _reason
    if os.environ.get("VAELAB_NATIVE", "1").strip() == "0":
        _reason = "VAELAB_NATIVE=0"
        return None
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        _reason = f"no C compiler found ({compiler})"
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        _reason = f"{compiler} --version failed ({type(e).__name__})"
        return None
    try:
        source = SOURCE.read_text()
    except OSError as e:
        _reason = f"cannot read {SOURCE} ({e.strerror or type(e).__name__})"
        return None
    parts = [source, " ".join(FLAGS), version, platform.machine(), _cpu_features()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    home = Path(os.environ.get("VAELAB_HOME") or "~/.cache/vaelab").expanduser()
    path = home / "native" / f"step-{key}.so"
    try:
        if not path.exists():
            _reason = _build(compiler, path)
            if _reason:
                return None
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        _reason = f"cannot build or load {path} ({e.strerror or type(e).__name__})"
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    _reason = _self_check(lib)
    return None if _reason else lib

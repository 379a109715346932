"""Where a model runs: picking a device, what torch.compile needs on it, and bf16 autocast."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sysconfig
from pathlib import Path

import torch

from vaelab.errors import RunError


def pick_device(name: str | torch.device, where: str = "option --device") -> torch.device:
    """`auto` (a GPU if there is one), or the device asked for if this machine has it; `where`
    names the option or argument in messages."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise RunError(f"{where}: {name!r} is not a device torch knows (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"{where}: cuda was asked for but no CUDA device is available")
    if device.type == "cuda" and (device.index or 0) >= (visible := torch.cuda.device_count()):
        raise RunError(f"{where}: {device} was asked for but {visible} CUDA devices are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RunError(f"{where}: mps was asked for but MPS is not available")
    return device


def compile_problem(device: torch.device) -> str | None:
    """Why torch.compile cannot build its kernels for `device` on this machine, or None."""
    if device.type == "cpu":  # Inductor writes C++ kernels with Python bindings and builds them
        from torch._inductor import cpp_builder

        try:
            cpp_builder.get_cpp_compiler()
        except Exception:
            return "torch.compile on a CPU needs a C++ compiler (g++ or clang++, or $CXX); none was found"
    elif device.type == "cuda":  # Triton, which builds a small C launcher
        if importlib.util.find_spec("triton") is None:
            return "torch.compile on CUDA needs the triton package; it is not installed"
        if not any(shutil.which(c) for c in (os.environ.get("CC", "cc"), "gcc", "clang")):
            return "torch.compile on CUDA needs a C compiler (cc, gcc or clang, or $CC); none was found"
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not header.is_file():
        missing = f"{header} is missing (Debian: apt-get install python3-dev)"
        return f"torch.compile needs Python's C headers; {missing}"
    return None


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 matrix units (AVX-512 BF16 or AMX); emulated otherwise."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(precision: str, device: torch.device):
    """A factory of the context that runs a step in `precision` (bf16: autocast; fp32: nothing)."""
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


@contextlib.contextmanager
def flush_denormals():
    """Tiny gradients late in training become denormal floats, which slow every step ~2x."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)  # the default (torch cannot report the previous mode)


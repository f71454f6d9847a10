"""Device names from users (command line, suite configs), checked before any work starts."""

from __future__ import annotations

import torch

from .errors import BenchError

COMPUTE_TYPES = ("cpu", "cuda", "mps", "xpu")  # torch device types that run the benchmark


def resolve_device(name: str, check_available: bool = True) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; anything else must name a
    compute device type and, with ``check_available``, one this process can use (a suite
    on a GPU-less Ray head node names the workers' GPUs). Returns the canonical name."""
    text = str(name).strip()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in COMPUTE_TYPES:
        raise BenchError(f"unknown device {text!r}; use cpu, cuda, cuda:N or auto") from None
    if not check_available:
        return str(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise BenchError(f"device {text!r}: torch sees no CUDA GPU (torch {torch.__version__}, {build}; "
                             "no GPU or no NVIDIA driver); use the CPU (--device cpu, or device: cpu in a suite)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise BenchError(f"device {text!r}: only {count} CUDA GPU(s) visible (cuda:0..cuda:{count - 1})")
    elif device.type != "cpu" and not _available(device):
        raise BenchError(f"device {text!r}: not available in this torch build ({torch.__version__})")
    return str(device)


def _available(device: torch.device) -> bool:
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError):
        return False
    return True

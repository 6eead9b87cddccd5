"""Whether Triton kernels can run on a device: shared by every scheme plugin's ``triton`` backends.

On CUDA they need Triton installed and a minimum compute capability. On the CPU they run only under
Triton's interpreter (``TRITON_INTERPRET=1``, how the kernels are tested without a GPU), so users
never get the slow interpreted path by accident. ``OQ_DISABLE_TRITON=1`` turns every Triton backend
off (e.g. to compare backends, or in tests that want the CPU backends while the interpreter is on:
changing ``TRITON_INTERPRET`` itself after a kernel module was imported does not work, since Triton
reads it when the ``@triton.jit`` decorators run).
"""

from __future__ import annotations

import importlib.util
import os

import torch


DISABLE_ENV = "OQ_DISABLE_TRITON"


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_support(device: torch.device | str, min_capability: tuple[int, int] = (8, 0)) -> tuple[bool, str]:
    """``(ok, reason)`` for running Triton kernels on ``device``.

    ``min_capability`` is the CUDA compute capability the kernel needs, e.g. ``(8, 9)`` for
    float8_e4m3fn tensor-core dots (Ada, Hopper) or ``(8, 0)`` for kernels that only load fp8/int8
    and compute in bf16/fp32.
    """
    device = torch.device(device)
    if os.environ.get(DISABLE_ENV, "0") not in ("", "0"):
        return False, f"disabled by {DISABLE_ENV}=1"
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        cap = torch.cuda.get_device_capability(device)
        if cap < min_capability:
            need = ".".join(map(str, min_capability))
            return False, f"needs CUDA compute capability >= {need}, found {cap[0]}.{cap[1]}"
        return True, f"CUDA compute capability {cap[0]}.{cap[1]}"
    if device.type == "cpu" and interpreter_enabled():
        return True, "CPU under TRITON_INTERPRET=1 (testing only)"
    return False, f"Triton runs on CUDA (on {device.type} only under TRITON_INTERPRET=1)"

"""C MXFP8 quantizer: the ``"cpu"`` quantizer implementation of oq-plugin-mxfp8.

bf16/fp16/float32 ``[..., K]`` (K % 32 == 0, CPU) -> the exact bytes of the torch reference
:func:`oq_plugin_mxfp8.quant.quantize_mxfp8`: ``qdata`` float8_e4m3fn and ``scale`` float8_e8m0fnu
``[..., K/32]``, for both ``scale_mode`` s. Blocks never straddle rows, so a whole tensor (an expert
stack too) is one flat run of blocks. amax is an integer max of the absolute-value bits (which
also flags Inf/NaN: the reference then runs, or :class:`oqcore.NonFiniteError` is raised), the
rceil exponent reproduces torchao's float32 ``log2`` rounding with integers, and float32 -> e4m3
rounding is oq-plugin-fp8's integer encoder (``fp8_e4m3.h``, checked against torch's cast on every
float32 of [-448, 448]). AVX-512 does 16 blocks at a time with vector exponents.

The source is ``csrc/mxfp8_quant.c`` (package data). It includes oq-toolkit's ``oq_kernels.h``
(shared loads), oq-plugin-fp8's ``fp8_e4m3.h`` (:data:`oq_plugin_fp8.cpu.CSRC_DIR` is on its
include path: mxfp8 depends on fp8, never the reverse) and its own ``mx_scale.h`` (the e8m0 rules,
which oq-plugin-mxfp4's quantizer includes too). Built once per machine and cached by
:mod:`oq_toolkit.native`; without a compiler or with ``OQ_COMPILE=0`` the reference runs.

The forward kernel (dequantize-and-GEMV of e4m3 bytes with e8m0 scales) is oq-plugin-fp8's
:func:`oq_plugin_fp8.cpu.fp8_linear` with ``SCALE_E8M0`` (see :mod:`oq_plugin_mxfp8.backends`).
"""

from __future__ import annotations

import ctypes
from importlib.resources import files

import torch

from oq_plugin_fp8.cpu import CSRC_DIR as FP8_CSRC_DIR
from oq_toolkit.native import NativeLibrary, threads_for

_DT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _bind(lib) -> None:
    """Declare the ctypes signature of ``oq_mxfp8_quantize``."""
    P, I, C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.oq_mxfp8_quantize.argtypes = [P, C, I, I, C, P, P, C]
    lib.oq_mxfp8_quantize.restype = I


CSRC_DIR = files("oq_plugin_mxfp8") / "csrc"
"""This plugin's C sources (package data): ``mxfp8_quant.c`` and ``mx_scale.h`` (the e8m0 rules,
also included by oq-plugin-mxfp4's quantizer)."""

LIBRARY = NativeLibrary("oq_mxfp8_cpu", CSRC_DIR / "mxfp8_quant.c", bind=_bind, include_dirs=(CSRC_DIR, FP8_CSRC_DIR))
"""The compiled quantizer, ``csrc/mxfp8_quant.c`` (build, cache and ctypes loading: :mod:`oq_toolkit.native`)."""


def load_library():
    """The compiled quantizer library (a ``ctypes.CDLL``) or ``None``; compiles on first use.

    ``None`` when ``OQ_COMPILE=0`` is set or compiling failed (the reason is in :func:`kernel_status`).
    """
    return LIBRARY.load()


def kernel_status() -> tuple[bool, str]:
    """``(compiled quantizer available, description)`` for reasons and reports; compiles on first call."""
    return LIBRARY.describe("compiled C kernel (mxfp8 quantizer)", "torch reference quantizer")


def _require_finite(w: torch.Tensor) -> None:
    """Before the reference runs in place of the kernel: the NaN/Inf check the kernel would have made."""
    from oqcore.tensor import require_finite

    require_finite(w)


def quantize_mxfp8(w: torch.Tensor, options=None, lib=None, *, check_finite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """C mxfp8 quantizer: ``w [..., K]`` (float32/bf16/fp16, CPU, ``K % 32 == 0``) ->
    ``(qdata float8_e4m3fn [..., K], scale float8_e8m0fnu [..., K/32])``, the bytes and layout of
    :func:`oq_plugin_mxfp8.quant.quantize_mxfp8` for both ``options.scale_mode`` s (``None``: rceil).

    The torch reference runs instead without the kernel (no compiler, ``OQ_COMPILE=0``), for other
    dtypes / devices / empty tensors, and for inputs holding Inf or NaN (unless ``check_finite``:
    then :class:`oqcore.NonFiniteError` on every path). K not divisible by 32 raises the
    reference's ``ValueError``. ``lib`` overrides the library (tests of variant builds).
    """
    from oq_plugin_mxfp8.quant import MX_BLOCK, _mode
    from oq_plugin_mxfp8.quant import quantize_mxfp8 as reference

    lib = lib if lib is not None else load_library()
    if lib is None or w.dim() < 1 or w.numel() == 0 or w.dtype not in _DT_CODES or w.device.type != "cpu" or w.shape[-1] % MX_BLOCK:
        if check_finite:
            _require_finite(w)
        return reference(w, options)
    mode = 1 if _mode(options) == "floor" else 0
    w = w.contiguous()
    k = w.shape[-1]
    n = w.numel() // k
    q = torch.empty(w.shape, dtype=torch.uint8)
    e = torch.empty(*w.shape[:-1], k // MX_BLOCK, dtype=torch.uint8)
    bad = lib.oq_mxfp8_quantize(w.data_ptr(), _DT_CODES[w.dtype], n, k, mode, q.data_ptr(), e.data_ptr(), threads_for(w.numel()))
    if bad != 0:  # Inf/NaN: the reference defines those bytes
        if check_finite:
            from oqcore.errors import NonFiniteError

            raise NonFiniteError(f"tensor of shape {list(w.shape)} holds NaN/Inf")
        return reference(w, options)
    return q.view(torch.float8_e4m3fn), e.view(torch.float8_e8m0fnu)


def quantize_mxfp8_checked(w: torch.Tensor, options=None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_mxfp8` with ``check_finite=True``: the registered ``cpu`` quantizer
    implementation. ``w [..., K]`` -> ``(qdata float8_e4m3fn, scale float8_e8m0fnu [..., K/32])``;
    :class:`oqcore.NonFiniteError` for NaN/Inf, ``ValueError`` for K % 32 != 0."""
    return quantize_mxfp8(w, options, check_finite=True)

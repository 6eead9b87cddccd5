"""C MXFP4 quantizer: the ``"cpu"`` quantizer implementation of oq-plugin-mxfp4.

bf16/fp16/float32 ``[..., K]`` (K % 32 == 0, CPU) -> the exact bytes of the torch reference
:func:`oq_plugin_mxfp4.quant.quantize_mxfp4`: ``qdata`` uint8 ``[..., K/2]`` (packed e2m1) and
``scale`` float8_e8m0fnu ``[..., K/32]``, for both ``scale_mode`` s. Blocks never straddle rows,
so a whole tensor (an expert stack too) is one flat run of blocks. amax is an integer max of the
absolute-value bits (which also flags Inf/NaN: the reference then runs, or
:class:`oqcore.NonFiniteError` is raised), the rceil exponent reproduces torchao's float32 ``log2``
rounding with integers (oq-plugin-mxfp8's rule), and float32 -> e2m1 is ``csrc/fp4_e2m1.h``
(checked against :func:`oq_plugin_mxfp4.fp4.e2m1_encode` in the tests). AVX-512 does 16 blocks at
a time with vector exponents; OpenMP splits the blocks over :func:`oq_toolkit.native.threads_for`
threads. Also serves activations ``[M, K]`` (W4A4).

The source is ``csrc/mxfp4_quant.c`` (package data, with ``fp4_e2m1.h``, which other plugins'
kernels include through :data:`CSRC_DIR`). Built once per machine and cached by
:mod:`oq_toolkit.native`; without a compiler or with ``OQ_COMPILE=0`` the reference runs.
"""

from __future__ import annotations

import ctypes
from importlib.resources import files

import torch

from oq_plugin_mxfp8.cpu import CSRC_DIR as MXFP8_CSRC_DIR  # mx_scale.h: the e8m0 rules
from oq_toolkit.native import NativeLibrary, threads_for

_DT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _bind(lib) -> None:
    """Declare the ctypes signatures of ``oq_mxfp4_quantize`` and the header's test entry ``oq_e2m1_encode``."""
    P, I, C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.oq_mxfp4_quantize.argtypes = [P, C, I, I, C, P, P, C]
    lib.oq_mxfp4_quantize.restype = I
    lib.oq_e2m1_encode.argtypes = [P, I, P, P, C]
    lib.oq_e2m1_encode.restype = C


CSRC_DIR = files("oq_plugin_mxfp4") / "csrc"
"""This plugin's C sources (package data): ``mxfp4_quant.c`` and the e2m1 encoder ``fp4_e2m1.h``
(oq-plugin-nvfp4 puts this directory on its include path)."""

LIBRARY = NativeLibrary("oq_mxfp4_cpu", CSRC_DIR / "mxfp4_quant.c", bind=_bind, include_dirs=(CSRC_DIR, MXFP8_CSRC_DIR))
"""The compiled quantizer, ``csrc/mxfp4_quant.c`` (build, cache and ctypes loading: :mod:`oq_toolkit.native`)."""


def load_library():
    """The compiled quantizer library (a ``ctypes.CDLL``) or ``None``; compiles on first use.

    ``None`` when ``OQ_COMPILE=0`` is set or compiling failed (the reason is in :func:`kernel_status`).
    """
    return LIBRARY.load()


def kernel_status() -> tuple[bool, str]:
    """``(compiled quantizer available, description)`` for reasons and reports; compiles on first call."""
    return LIBRARY.describe("compiled C kernel (mxfp4 quantizer)", "torch reference quantizer")


def _require_finite(w: torch.Tensor) -> None:
    """Before the reference runs in place of the kernel: the NaN/Inf check the kernel would have made."""
    from oqcore.tensor import require_finite

    require_finite(w)


def quantize_mxfp4(
    w: torch.Tensor, options=None, lib=None, *, check_finite: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """C mxfp4 quantizer: ``w [..., K]`` (float32/bf16/fp16, CPU, ``K % 32 == 0``; weights ``[N, K]``,
    expert stacks ``[E, N, K]``, activations ``[M, K]``) -> ``(qdata uint8 [..., K/2],
    scale float8_e8m0fnu [..., K/32])``, the bytes and layout of
    :func:`oq_plugin_mxfp4.quant.quantize_mxfp4` for both ``options.scale_mode`` s (``None``: rceil).

    The torch reference runs instead without the kernel (no compiler, ``OQ_COMPILE=0``), for other
    dtypes / devices / empty tensors, and for inputs holding Inf or NaN (unless ``check_finite``:
    then :class:`oqcore.NonFiniteError` on every path). K not divisible by 32 raises the
    reference's ``ValueError``. ``lib`` overrides the library (tests of variant builds).
    """
    from oq_plugin_mxfp4.quant import MX_BLOCK, scale_mode
    from oq_plugin_mxfp4.quant import quantize_mxfp4 as reference

    lib = lib if lib is not None else load_library()
    if (
        lib is None
        or w.dim() < 1
        or w.numel() == 0
        or w.dtype not in _DT_CODES
        or w.device.type != "cpu"
        or w.shape[-1] % MX_BLOCK
    ):
        if check_finite:
            _require_finite(w)
        return reference(w, options)
    mode = 1 if scale_mode(options) == "floor" else 0
    w = w.contiguous()
    k = w.shape[-1]
    n = w.numel() // k
    q = torch.empty(*w.shape[:-1], k // 2, dtype=torch.uint8)
    e = torch.empty(*w.shape[:-1], k // MX_BLOCK, dtype=torch.uint8)
    bad = lib.oq_mxfp4_quantize(
        w.data_ptr(), _DT_CODES[w.dtype], n, k, mode, q.data_ptr(), e.data_ptr(), threads_for(w.numel())
    )
    if bad != 0:  # Inf/NaN: the reference defines those bytes
        if check_finite:
            from oqcore.errors import NonFiniteError

            raise NonFiniteError(f"tensor of shape {list(w.shape)} holds NaN/Inf (mxfp4 quantizer)")
        return reference(w, options)
    return q, e.view(torch.float8_e8m0fnu)


def quantize_mxfp4_checked(w: torch.Tensor, options=None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_mxfp4` with ``check_finite=True``: the registered ``cpu`` quantizer
    implementation. ``w [..., K]`` -> ``(qdata uint8 [..., K/2], scale float8_e8m0fnu [..., K/32])``;
    :class:`oqcore.NonFiniteError` for NaN/Inf, ``ValueError`` for K % 32 != 0."""
    return quantize_mxfp4(w, options, check_finite=True)

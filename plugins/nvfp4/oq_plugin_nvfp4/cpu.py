"""C NVFP4 quantizer: the ``"cpu"`` quantizer implementation of oq-plugin-nvfp4.

bf16/fp16/float32 ``[N, K]`` / ``[M, K]`` / ``[E, N, K]`` (K % 16 == 0, CPU) -> the exact bytes of
the torch reference :func:`oq_plugin_nvfp4.quant.quantize_nvfp4` (compressed-tensors' NVFP4):
``qdata`` uint8 ``[..., K/2]``, ``scale`` float8_e4m3fn ``[..., K/16]``, ``global_scale`` float32
``[1]`` / ``[E, 1]``.

Two passes over the input: the first takes ``max |w|`` of the tensor (of each expert) as an integer
max of the absolute-value bits, which also flags Inf/NaN (then :class:`oqcore.NonFiniteError`, or
the reference runs), and derives the global scale with the reference's float32 operations (a
reciprocal, then a product; for bf16 the first pass also keeps every block's maximum, 2 bytes
per block); the second quantizes 16 blocks of 16 at a time (AVX-512: block maxima
by a transpose-and-max tree, e4m3 scales with oq-plugin-fp8's integer encoder ``fp8_e4m3.h``,
elements by true division, e2m1 codes by an arithmetic form of oq-plugin-mxfp4's encoder
``fp4_e2m1.h`` (no compare-into-mask ops: checked equal to it on all 2**32 float32 bit patterns,
``oq_nvfp4_check_e2m1``), packing by ``fp4_e2m1.h``; the scalar path uses ``fp4_e2m1.h`` as is).
bf16 input (AVX-512) takes no element divisions: with ``y = fl(x / t)`` monotone in ``x``, each
e2m1 decision (``y != 0``, ``y > 0.25``, ``y >= 0.75``, ... ``y > 5``) holds exactly when the real
``x / t`` passes a bound with a 25-bit significand (the decision point +- half a float32 ulp, ties
resolved as round-to-nearest-even resolves them), so per block the smallest passing bf16 ``|x|`` is
``bound * t`` (exact in double) rounded up to float32 then to bf16, and an element's code is a
binary search of its ``|x|`` bits among the block's 7 bounds (``nv_codes_bf16_bounds``; divisors
that are not positive and finite take the division path). Same bytes, tested on every bf16
element under many divisors and on quotients within float32 ulps of every bound.

The source is ``csrc/nvfp4_quant.c`` (package data), compiled with ``-ffp-contract=off`` by
:mod:`oq_toolkit.native` (cached per machine); without a compiler or with ``OQ_COMPILE=0`` the
reference runs.
"""

from __future__ import annotations

import ctypes
from importlib.resources import files

import torch

from oq_plugin_fp8.cpu import CSRC_DIR as FP8_CSRC_DIR
from oq_toolkit.native import NativeLibrary, threads_for

_DT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _bind(lib) -> None:
    """Declare the ctypes signature of ``oq_nvfp4_quantize``."""
    P, I, C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.oq_nvfp4_quantize.argtypes = [P, C, I, I, C, P, P, P, C]
    lib.oq_nvfp4_quantize.restype = I
    lib.oq_nvfp4_check_e2m1.argtypes = [I, I]
    lib.oq_nvfp4_check_e2m1.restype = I


CSRC_DIR = files("oq_plugin_nvfp4") / "csrc"
"""This plugin's C sources (package data): ``nvfp4_quant.c``."""
E2M1_CSRC_DIR = files("oq_plugin_mxfp4") / "csrc"
"""oq-plugin-mxfp4's C headers: ``fp4_e2m1.h`` (the e2m1 encoder and packing)."""

LIBRARY = NativeLibrary(
    "oq_nvfp4_cpu",
    CSRC_DIR / "nvfp4_quant.c",
    extra_flags=("-ffp-contract=off",),
    bind=_bind,
    include_dirs=(FP8_CSRC_DIR, E2M1_CSRC_DIR),
)
"""The compiled quantizer, ``csrc/nvfp4_quant.c`` (build, cache and ctypes loading: :mod:`oq_toolkit.native`)."""


def load_library():
    """The compiled quantizer library (a ``ctypes.CDLL``) or ``None``; compiles on first use.

    ``None`` when ``OQ_COMPILE=0`` is set or compiling failed (the reason is in :func:`kernel_status`).
    """
    return LIBRARY.load()


def kernel_status() -> tuple[bool, str]:
    """``(compiled quantizer available, description)`` for reasons and reports; compiles on first call."""
    return LIBRARY.describe("compiled C kernel (nvfp4 quantizer)", "torch reference quantizer")


def _non_finite(w: torch.Tensor):
    from oqcore.errors import NonFiniteError

    return NonFiniteError(f"tensor of shape {list(w.shape)} holds NaN/Inf")


def quantize_nvfp4(
    w: torch.Tensor,
    options=None,
    lib=None,
    *,
    global_scale: torch.Tensor | None = None,
    check_finite: bool = False,
    amax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """C nvfp4 quantizer: ``w`` ``[N, K]`` / ``[M, K]`` / ``[E, N, K]`` (float32/bf16/fp16, CPU,
    ``K % 16 == 0``) -> ``(qdata uint8 [..., K/2], scale float8_e4m3fn [..., K/16], global_scale
    float32 [1] or [E, 1])``, the bytes of :func:`oq_plugin_nvfp4.quant.quantize_nvfp4` (same
    ``global_scale`` override, and the same ``amax``: an externally reduced per-tensor amax, from
    which the global scale is made exactly as the reference makes it; the kernel's amax pass
    still runs, to find NaN/Inf).

    The torch reference runs instead without the kernel (no compiler, ``OQ_COMPILE=0``), for other
    dtypes / devices (meta too) / ranks / empty tensors, and for inputs holding Inf or NaN (unless
    ``check_finite``: then :class:`oqcore.NonFiniteError` on every path). K not divisible by 16,
    more than 3 dims or a bad ``global_scale`` / ``amax`` raise the reference's ``ValueError``. A
    non-finite ``amax`` (the whole tensor holds NaN/Inf) raises :class:`oqcore.NonFiniteError`
    with ``check_finite``. ``lib`` overrides the library (tests of variant builds).
    """
    from oq_plugin_nvfp4.quant import NV_BLOCK, _check_global, _check_k, global_scale_of_amax
    from oq_plugin_nvfp4.quant import quantize_nvfp4 as reference

    _check_k(w)
    if amax is not None:
        if global_scale is not None:
            raise ValueError("nvfp4: give global_scale or amax, not both (amax determines the global scale)")
        global_scale = global_scale_of_amax(amax, w)  # checks amax's shape
        if check_finite and not bool(torch.isfinite(amax).all()):
            raise _non_finite_amax(w)
    if global_scale is not None:
        _check_global(global_scale, w)
    lib = lib if lib is not None else load_library()
    if (
        lib is None
        or w.numel() == 0
        or w.dtype not in _DT_CODES
        or w.device.type != "cpu"
        or (global_scale is not None and global_scale.device.type != "cpu")
    ):
        if check_finite:
            from oqcore.formats import require_finite

            require_finite(w)
        return reference(w, options, global_scale=global_scale)
    w = w.contiguous()
    k = w.shape[-1]
    experts = w.shape[0] if w.dim() == 3 else 1
    per = w.numel() // experts
    if global_scale is None:
        g = torch.empty((experts, 1) if w.dim() == 3 else (1,), dtype=torch.float32)
    else:
        g = global_scale.contiguous().clone()
    q = torch.empty(*w.shape[:-1], k // 2, dtype=torch.uint8)
    s = torch.empty(*w.shape[:-1], k // NV_BLOCK, dtype=torch.uint8)
    bad = lib.oq_nvfp4_quantize(
        w.data_ptr(),
        _DT_CODES[w.dtype],
        experts,
        per,
        int(global_scale is not None),
        g.data_ptr(),
        q.data_ptr(),
        s.data_ptr(),
        threads_for(w.numel()),
    )
    if bad != 0:  # Inf/NaN: the reference defines those bytes
        if check_finite:
            raise _non_finite(w)
        return reference(w, options, global_scale=global_scale)
    return q, s.view(torch.float8_e4m3fn), g


def _non_finite_amax(w: torch.Tensor):
    from oqcore.errors import NonFiniteError

    return NonFiniteError(f"the amax given for the tensor of shape {list(w.shape)} holds NaN/Inf (so does the whole tensor)")


def quantize_nvfp4_checked(
    w: torch.Tensor, options=None, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`quantize_nvfp4` with ``check_finite=True``: the registered ``cpu`` quantizer
    implementation. ``w [..., K]`` -> ``(qdata uint8 [..., K/2], scale float8_e4m3fn [..., K/16],
    global_scale float32 [1] / [E, 1])``; ``amax``: an externally reduced per-tensor amax
    (``[*lead, 1, 1]`` float32); :class:`oqcore.NonFiniteError` for NaN/Inf (in ``w`` or
    ``amax``), ``ValueError`` for K % 16 != 0 or a bad ``amax`` shape."""
    return quantize_nvfp4(w, options, check_finite=True, amax=amax)

"""CPU weight-only kernels for float8_e4m3fn weights: fused dequantize-and-GEMV, tiled dequantize-and-GEMM.

The fp8 weight ``q [N, K]`` stays in memory as bytes; scales are a grid ``s[N // gr, K // gc]`` (float32,
or e8m0 exponent bytes for MX), so one kernel serves fp8 per-tensor (``gr=N, gc=K``), per-channel
(``gr=1, gc=K``), 128x128 blocks (``gr=gc=128``, partial edge blocks) and mxfp8 (``gr=1, gc=32``, e8m0).

Why a small C kernel and not inductor: measured on this project's 2-core AVX-512 machine
(4096x4096, batch 1; bf16 ``F.linear`` ~1.6-2.5 ms):

- eager ``q.to(bfloat16)`` alone: ~80 ms; eager 256-entry table lookup ``lut[q.long()]``: ~120 ms;
- inductor-fused ``(x[:, None] * q.float()[None]).sum(-1)``: ~4.3 ms (fp8 -> float goes through a
  non-vectorized conversion); the same with integer bit manipulation on int32 views: ~8-30 ms
  (inductor 2.13 lowers ``view(float32)`` of an int32 vector to a scalar store/bit_cast/load loop);
- this kernel: fp8 bytes sign-extended to int32 lanes, exponent rebias ``(mag << 20) + (120 << 23)``
  with subnormals fixed up by ``(1 + m/8) * 2^-6 - 2^-6 = m * 2^-9`` (exact), times the group
  scale, FMA with float32 activations: ~0.7-1.2 ms (every fp8 weight key and mxfp8).

It is compiled once per machine with the system C compiler (``cc -O3 -march=native -fopenmp``,
about a second) into a cache directory (``OQ_CPU_KERNEL_CACHE``, default ``~/.cache/oqcore``) and
loaded through ctypes (calls release the GIL). AVX-512 intrinsics where the compiler targets them,
a portable C loop otherwise. Without a compiler, or with ``OQ_COMPILE=0``, an eager torch path
runs instead (the same tiles, dequantized by torch ops: correct, slower).

Nothing of bf16/float32 weight size is kept: per call, batch ``M <= GEMV_MAX_M`` reads the bytes
once and converts them in registers; larger batches dequantize ``TILE_BYTES`` of rows at a time
into a per-thread scratch buffer reused across calls and layers and run ``torch.mm`` on it.

This module is generic over the scale grid: schemes with e4m3 elements and e8m0 block scales
(oq-plugin-mxfp8, which depends on oq-plugin-fp8 for it) call :func:`fp8_linear` with
``SCALE_E8M0``; this plugin knows nothing about them.

The same library holds the ``"cpu"`` quantizer implementation of the six fp8 keys
(:func:`quantize_fp8_grouped`): bf16/fp16/float32 ``[N, K]`` (a 3D stack one matrix at a time) ->
the torch reference's exact bytes. amax is an integer max of the input's
absolute-value bits (which also flags Inf/NaN: the reference then runs), scales and ``w / scale`` are
single IEEE float32 operations, and float32 -> e4m3 rounding (RNE, subnormals) is integer bit
manipulation, checked against torch's cast on all 2.28e9 float32 values of [-448, 448]. Measured
(2 cores, bf16 4096x4096): 8-14 GB/s of bf16 read vs ~0.2-0.3 GB/s eager.

The C source is ``csrc/fp8_cpu.c`` (package data), with ``csrc/fp8_e4m3.h`` (the e4m3 encoder, also
included by other schemes' kernels) and oq-toolkit's ``oq_kernels.h`` (shared load helpers).
"""

from __future__ import annotations

import ctypes
import threading
from importlib.resources import files

import torch

from oq_toolkit.native import NativeLibrary, threads_for

GEMV_MAX_M = 4
"""Batches up to this size run the fused GEMV (register-blocked over 4 tokens); larger ones the
tiled dequantize + ``torch.mm`` path (which is compute-bound like bf16 GEMM from ~16 tokens on)."""

TILE_BYTES = 4 << 20
"""Size of the dequantized scratch tile of the large-batch path (4 MiB: 512 rows of K=4096 in bf16)."""

SCALE_FLOAT32 = 0
SCALE_E8M0 = 1


_scratch = threading.local()


def _bind(lib) -> None:
    """Declare the ctypes signatures of every exported function (GEMV, dequantizer, quantizers)."""
    P, I, C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.oq_fp8_gemv.argtypes = [P, I, I, P, I, I, P, C, I, I, I, P, I, C]
    lib.oq_fp8_gemv.restype = None
    lib.oq_fp8_dequant_rows.argtypes = [P, I, I, I, P, C, I, I, I, P, C, C]
    lib.oq_fp8_dequant_rows.restype = None
    _bind_quantizers(lib)


CSRC_DIR = files("oq_plugin_fp8") / "csrc"
"""This plugin's C sources and headers (package data): ``fp8_cpu.c`` (this module's kernels) and
``fp8_e4m3.h`` (float32 -> e4m3 rounding, scalar and AVX-512), which kernels of other schemes with
e4m3 elements include by passing this directory as a :class:`~oq_toolkit.native.NativeLibrary`
include dir (oq-plugin-mxfp8's quantizer does)."""

LIBRARY = NativeLibrary("oq_fp8_cpu", CSRC_DIR / "fp8_cpu.c", bind=_bind, include_dirs=(CSRC_DIR,))
"""The compiled kernels of this module, ``csrc/fp8_cpu.c`` (build, cache and ctypes loading:
:mod:`oq_toolkit.native`)."""


def load_library():
    """The compiled kernel library (a ``ctypes.CDLL``) or ``None``; compiles on first use.

    ``None`` when ``OQ_COMPILE=0`` is set or compiling failed (the reason is in :func:`kernel_status`).
    """
    return LIBRARY.load()


def kernel_status() -> tuple[bool, str]:
    """``(compiled kernel available, description)`` for backend reasons and reports."""
    return LIBRARY.describe(
        "compiled C kernel (fused fp8 dequantize-and-GEMV, tiled dequantize + torch.mm)", "eager torch tiles (slow)"
    )


def _check(q: torch.Tensor, scale: torch.Tensor, kind: int, gr: int, gc: int, ld: int) -> None:
    n, k = q.shape
    if q.element_size() != 1 or not q.is_contiguous() or not scale.is_contiguous():
        raise ValueError("expected contiguous 1-byte weights and contiguous scales")
    if kind == SCALE_FLOAT32 and scale.dtype != torch.float32:
        raise ValueError(f"float32 scales expected, got {scale.dtype}")
    need = ((n - 1) // gr) * ld + (k - 1) // gc + 1
    if scale.numel() < need:
        raise ValueError(f"scale grid too small: {scale.numel()} < {need} for weight {tuple(q.shape)}")


def _eager_dequant_rows(q, n0, n1, scale, kind, gr, gc, ld, dtype):
    """Torch-ops dequantization of rows ``[n0, n1)``: float32 math, result in ``dtype``."""
    k = q.shape[1]
    w = q[n0:n1].view(torch.float8_e4m3fn).float()
    if kind == SCALE_E8M0:
        e = scale.view(torch.uint8).reshape(-1).to(torch.int32)
        s = torch.where(e == 0, torch.full_like(e, 0x00800000), torch.where(e == 255, torch.full_like(e, 0x7FC00000), e << 23))
        s = s.view(torch.float32)
    else:
        s = scale.reshape(-1).float()
    rows = torch.arange(n0, n1) // gr
    cols = torch.arange(k) // gc
    return (w * s[rows[:, None] * ld + cols[None, :]]).to(dtype)


def _tile_rows(k: int, elt: int) -> int:
    return max(16, (TILE_BYTES // max(k * elt, 1)) // 16 * 16)


def _scratch_for(numel: int, dtype: torch.dtype) -> torch.Tensor:
    # one buffer per (thread, dtype), shared by every layer: TILE_BYTES, never a whole weight
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = bufs[dtype] = torch.empty(numel, dtype=dtype)
    return buf


def fp8_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, kind: int, gr: int, gc: int, ld: int
) -> torch.Tensor:
    """:func:`fp8_linear_eager`; under ``torch.compile`` as the opaque op ``oq_fp8::linear``.

    Dynamo cannot trace the ctypes call, and at the graph break it frees tensors whose
    ``data_ptr()`` the call still needs (wrong results, see :mod:`oq_plugin_fp8.ops`): the op runs
    the same function with live tensors and no graph break. Same arguments and result.
    """
    if torch.compiler.is_compiling():
        from oq_plugin_fp8 import ops

        return ops.linear(x, q, scale, kind, gr, gc, ld)
    return fp8_linear_eager(x, q, scale, kind, gr, gc, ld)


def fp8_linear_eager(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, kind: int, gr: int, gc: int, ld: int
) -> torch.Tensor:
    """``y[m, n] = sum_k x[m, k] * fp8(q[n, k]) * s[(n // gr) * ld + k // gc]`` on the CPU.

    - ``x``: ``[M, K]`` activations (bf16, fp16 or float32), CPU.
    - ``q``: ``[N, K]`` contiguous float8_e4m3fn (or its uint8 bytes), never converted as a whole.
    - ``scale``: contiguous grid read as a flat array with row stride ``ld``: float32 (``kind =
      SCALE_FLOAT32``) or float8_e8m0fnu/uint8 exponents (``SCALE_E8M0``: ``2^(e-127)``, byte 0 =
      ``2^-126``, as MX's e8m0 scales).
    - ``gr``/``gc``: rows/columns per scale group (``N``/``K`` for a single group).

    Returns float32 ``[M, N]``. ``M <= GEMV_MAX_M``: fused GEMV, float32 dequantization and
    accumulation (the reference's numbers up to summation order). Larger ``M``: tiles of rows
    dequantized (float32 ``q * s``) into a scratch of ``x``'s compute dtype (bf16 for bf16
    activations: weights rounded once to bf16, float32 accumulation in ``torch.mm``; float32
    otherwise), then ``torch.mm``.
    """
    _check(q, scale, kind, gr, gc, ld)
    m, k = x.shape
    n = q.shape[0]
    lib = load_library()
    nthreads = torch.get_num_threads()
    if lib is not None and m <= GEMV_MAX_M:
        xf = x.float().contiguous()
        y = torch.empty(m, n, dtype=torch.float32)
        lib.oq_fp8_gemv(q.data_ptr(), n, k, xf.data_ptr(), k, m, scale.data_ptr(), kind, gr, gc, ld, y.data_ptr(), n, nthreads)
        return y
    cdt = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    xc = x.to(cdt).contiguous()
    rows = min(n, _tile_rows(k, torch.finfo(cdt).bits // 8))
    buf = _scratch_for(rows * k, cdt) if lib is not None else None
    y = torch.empty(m, n, dtype=torch.float32)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        if lib is not None:
            w = buf[: (n1 - n0) * k].view(n1 - n0, k)
            lib.oq_fp8_dequant_rows(
                q.data_ptr(), k, n0, n1, scale.data_ptr(), kind, gr, gc, ld, w.data_ptr(), int(cdt == torch.bfloat16), nthreads
            )
        else:
            w = _eager_dequant_rows(q, n0, n1, scale, kind, gr, gc, ld, cdt)
        y[:, n0:n1] = torch.mm(xc, w.t())
    return y


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, kind: int, gr: int, gc: int, ld: int, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize all rows of ``q [N, K]`` into a new ``[N, K]`` tensor of ``dtype`` (float32 or
    bf16) with the compiled kernel (eager torch without it). For tests and tools, not forwards."""
    _check(q, scale, kind, gr, gc, ld)
    n, k = q.shape
    lib = load_library()
    if lib is None:
        return _eager_dequant_rows(q, 0, n, scale, kind, gr, gc, ld, dtype)
    out = torch.empty(n, k, dtype=dtype)
    lib.oq_fp8_dequant_rows(q.data_ptr(), k, 0, n, scale.data_ptr(), kind, gr, gc, ld, out.data_ptr(), int(dtype == torch.bfloat16), torch.get_num_threads())
    return out


# ---------------------------------------------------------------------------------------------
# Quantizers (quantizer implementation "cpu"): same bytes as oq_plugin_fp8.quant
# ---------------------------------------------------------------------------------------------

_DT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _bind_quantizers(lib) -> None:
    P, I, C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.oq_fp8_quantize.argtypes = [P, C, I, I, I, I, P, P, C]
    lib.oq_fp8_quantize.restype = I
    lib.oq_fp8_quantize_scaled.argtypes = [P, C, I, I, I, I, P, P, C]
    lib.oq_fp8_quantize_scaled.restype = I
    lib.oq_f32_to_e4m3.argtypes = [P, I, C, C, P]
    lib.oq_f32_to_e4m3.restype = None


def _quantizable(w: torch.Tensor) -> bool:
    return w.dim() >= 2 and w.numel() > 0 and w.dtype in _DT_CODES and w.device.type == "cpu"


def _fallback(w: torch.Tensor, check_finite: bool) -> None:
    """Before a torch reference runs in place of the kernel: the NaN/Inf check the kernel would have made."""
    if check_finite:
        from oqcore.tensor import require_finite

        require_finite(w)


def _nonfinite(w: torch.Tensor):
    from oqcore.errors import NonFiniteError

    return NonFiniteError(f"tensor of shape {list(w.shape)} holds NaN/Inf")


def quantize_fp8_grouped(
    w: torch.Tensor, g, lib=None, *, check_finite: bool = False, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """C fp8 quantizer: ``w [..., R, C]`` (float32/bf16/fp16, CPU) -> ``(q float8_e4m3fn, scale float32)``,
    the bytes and layout of :func:`oq_plugin_fp8.quant.quantize_grouped` for grouping ``g``.

    Leading dims (experts) are quantized one ``[R, C]`` matrix at a time into one output stack. The
    torch reference runs instead when the kernel is unavailable (no compiler, ``OQ_COMPILE=0``), for
    other dtypes / devices / empty tensors, and for a matrix holding Inf or NaN (the kernel detects
    it in its amax) unless ``check_finite``, which raises :class:`oqcore.NonFiniteError` for such
    input on every path (the registered ``cpu`` quantizer: the core then skips its own pass).

    ``amax``: an externally reduced per-group amax (float32, the group grid, see
    :mod:`oq_plugin_fp8.quant`): the scales are made from it by the reference's
    :func:`~oq_plugin_fp8.quant.scale_from_amax` and the kernel runs its quantize pass alone
    (``oq_fp8_quantize_scaled``, which flags Inf/NaN in ``w`` itself). A non-finite ``amax`` (the
    whole tensor holds NaN/Inf somewhere) raises :class:`oqcore.NonFiniteError` with
    ``check_finite``, else the reference runs. ``ValueError`` for an ``amax`` of another shape.
    """
    from oq_plugin_fp8.quant import quantize_grouped

    lib = lib if lib is not None else load_library()
    if amax is not None:
        return _quantize_scaled(w, g, amax, lib, check_finite)
    if lib is None or not _quantizable(w):
        _fallback(w, check_finite)
        return quantize_grouped(w, g)
    w = w.contiguous()
    r, c = w.shape[-2], w.shape[-1]
    gr, gc = g.extents(r, c)
    nr, nc = -(-r // gr), -(-c // gc)
    lead = tuple(w.shape[:-2])
    b = 1
    for d in lead:
        b *= d
    q = torch.empty(w.shape, dtype=torch.uint8)
    scale = torch.empty(*lead, nr, nc, dtype=torch.float32)
    dt, nthreads, esz = _DT_CODES[w.dtype], threads_for(w.numel()), w.element_size()
    wp, qp, sp = w.data_ptr(), q.data_ptr(), scale.data_ptr()
    for e in range(b):
        bad = lib.oq_fp8_quantize(wp + e * r * c * esz, dt, r, c, gr, gc, qp + e * r * c, sp + e * nr * nc * 4, nthreads)
        if bad > 0 and check_finite:
            raise _nonfinite(w)
        if bad != 0:  # Inf/NaN (or -1: out of memory): the reference defines those bytes
            _fallback(w, check_finite)
            return quantize_grouped(w, g)
    if g.tensor_scale:
        scale = scale.squeeze(-1)
    return q.view(torch.float8_e4m3fn), scale


def _quantize_scaled(w: torch.Tensor, g, amax: torch.Tensor, lib, check_finite: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_fp8_grouped` with a given ``amax`` (checked against ``w`` and ``g``)."""
    from oq_plugin_fp8.quant import check_amax, quantize_grouped, scale_from_amax

    a = check_amax(amax, w, g)
    if not bool(torch.isfinite(a).all()):
        if check_finite:
            from oqcore.errors import NonFiniteError

            raise NonFiniteError(f"the amax given for the tensor of shape {list(w.shape)} holds NaN/Inf (so does the whole tensor)")
        return quantize_grouped(w, g, a)  # the reference defines those bytes
    if lib is None or not _quantizable(w):
        _fallback(w, check_finite)
        return quantize_grouped(w, g, a)
    w = w.contiguous()
    r, c = w.shape[-2], w.shape[-1]
    gr, gc = g.extents(r, c)
    grid = scale_from_amax(a).contiguous()  # the reference's float32 ops: its scales exactly
    nr, nc = grid.shape[-2], grid.shape[-1]
    b = w.numel() // (r * c)
    q = torch.empty(w.shape, dtype=torch.uint8)
    dt, nthreads, esz = _DT_CODES[w.dtype], threads_for(w.numel()), w.element_size()
    wp, qp, sp = w.data_ptr(), q.data_ptr(), grid.data_ptr()
    for e in range(b):
        bad = lib.oq_fp8_quantize_scaled(wp + e * r * c * esz, dt, r, c, gr, gc, sp + e * nr * nc * 4, qp + e * r * c, nthreads)
        if bad != 0:  # Inf/NaN in w
            if check_finite:
                raise _nonfinite(w)
            return quantize_grouped(w, g, a)
    scale = grid.squeeze(-1) if g.tensor_scale else grid
    return q.view(torch.float8_e4m3fn), scale


def fp8_cpu_quantizers() -> dict[str, tuple]:
    """Key name -> ``(quantize, dequantize)`` for the ``"cpu"`` quantizer backend (all six fp8 keys).

    Importing and registering compiles nothing: the kernel is built (or loaded from the cache) on
    the first call. Dequantization is the reference's (it is not on the load path)."""
    from oq_plugin_fp8.quant import GROUPINGS, TORCH_QUANTIZERS

    def make(g):
        """The registered quantize function for grouping ``g``."""

        def quantize(w: torch.Tensor, options=None) -> tuple[torch.Tensor, torch.Tensor]:
            """C fp8 quantizer of one grouping: ``w [N, K]`` / ``[E, N, K]`` (float32/bf16/fp16) ->
            ``(qdata float8_e4m3fn, scale float32)``, the torch reference's bytes (which runs
            instead without the kernel). Raises :class:`oqcore.NonFiniteError` for NaN/Inf."""
            return quantize_fp8_grouped(w, g, check_finite=True)

        return quantize

    return {name: (make(g), TORCH_QUANTIZERS[name][1]) for name, g in GROUPINGS.items()}

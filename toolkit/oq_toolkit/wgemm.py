"""Fused CPU GEMM for 8-bit and 4-bit weights: ``y = A @ W^T`` with the weight kept as e4m3 / int8 / e2m1 codes.

:func:`wgemm` serves every CPU forward of the 8-bit schemes, weight-only (bf16 activations) and
W8A8 (activation codes quantized by the caller), and of 4-bit e2m1 weights (W4A16, and W4A8 with
mxfp8 activations):

- ``a [M, K]``: ``torch.bfloat16`` activations (``a_fmt=BF16``) or the 1-byte codes of quantized
  activations (``a_fmt=E4M3``: float8_e4m3fn or its uint8 view; ``a_fmt=INT8``: int8 or uint8 view),
  quantized by the scheme's own quantizer (one implementation of each formula: the toolkit
  quantizes nothing);
- ``q [N, K]``: weight codes, ``q_fmt`` ``E4M3`` or ``INT8`` (1-byte dtype, any view); or
  ``q [N, K/2]`` packed 4-bit codes, ``q_fmt=E2M1`` (``torch.uint8`` or ``float4_e2m1fn_x2``; K
  even; element ``2j`` of a row in the LOW nibble of byte ``j``, as torchao ``pack_uint4``,
  compressed-tensors ``pack_fp4_to_uint8`` and ``oq_plugin_mxfp4.fp4.pack_fp4``; e2m1 codes:
  magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6, bit 3 the sign). The toolkit knows the element format and
  scale grids, not the schemes: mxfp4 is ``E2M1`` with an e8m0 grid ``(1, 32, K/32)``, nvfp4
  ``E2M1`` with a float8_e4m3fn grid ``(1, 16, K/16)`` and ``w_scale_mul = 1 / global_scale``;
- ``a_scale`` / ``w_scale``: ``None`` (scale 1) or a contiguous scale grid, float32, e8m0 bytes
  (``torch.uint8`` or ``torch.float8_e8m0fnu``; ``2**(e-127)``, byte 0 = ``2**-126`` as
  ``oq_plugin_mxfp8.quant.exponent_to_scale``) or ``torch.float8_e4m3fn`` (decoded exactly; folded
  into E2M1 weights, taken as float32 elsewhere), with grid ``(rows, cols, ld)``: the scale of
  element ``(r, k)`` is ``scale.flatten()[(r // rows) * ld + k // cols]``. Per-tensor: ``(M or N,
  K, 1)``; per-token / per-channel: ``(1, K, 1)``; 1x128 groups ``(1, 128, ceil(K/128))``; 128x128
  blocks ``(128, 128, ceil(K/128))``; MX ``(1, 32, ceil(K/32))`` (e8m0); NVFP4 ``(1, 16, K/16)``
  (float8_e4m3fn).
- ``w_scale_mul`` (keyword-only, float, default 1): one float32 multiplier of the whole product
  (nvfp4's ``1 / global_scale``), applied once per output to the float32 sum, after the sums and
  before the bias: ``y = float32(sum) * float32(w_scale_mul) (+ bias)``.
- result: ``[M, N]``, ``y[m, n] = w_scale_mul * sum_k A(m, k) W(n, k) (+ bias[n])``, ``A = dec(a) * sa``,
  ``W = dec(q) * sw``, float32 by default.
- epilogue (keyword-only): ``bias`` ``[N]`` (float32, or bfloat16 widened exactly) is added to the
  float32 sum in the kernel, and ``out_dtype=torch.bfloat16`` writes the result as bf16, rounded
  once to nearest even: the output is allocated once, in its final dtype, and is bit-identical to
  ``(wgemm(...) + bias.float()).to(out_dtype)`` (tested on every path).

Numerics. e4m3 codes, int8 codes, bf16 activations and e8m0 powers of two are exact in bf16, so
every product of decoded values is exact in float32. Every path accumulates in float32 over a
K-chunk (a run of K inside one float32 scale group of both operands) and then adds
``partial * (sa * sw)``; e8m0 scales are folded into the decoded bf16 values (exact: a byte that
would take a value out of bf16's normal range, i.e. outside ``[10, 246]``, makes the call redo the
product with the scales as float32). e2m1 values (2 significant bits) times an e8m0 or e4m3
scale (at most 4 significant bits) are exact in bf16 too: both grids are folded into the decoded
weights (16-entry bf16 tables per scale byte) whatever their group size (a multiple of 16), so
mxfp4 and nvfp4 weights need no float32 K-chunks; for e2m1 the foldable e8m0 bytes are
``[2, 252]`` (others: the float32 retry), e4m3-scaled values always lie in ``[2**-10, 2688]``.
Bound, every path and shape (tested)::

    |y - y_ref| <= 2 * K * eps32 * (|A| @ |W|^T)      elementwise, eps32 = 2**-23

with ``y_ref`` the float64 product of the float32-dequantized ``A`` and ``W`` (the reference
forward ``F.linear(A_f32, W_f32)`` is within the same bound; ``W`` includes ``w_scale_mul``, whose
one float32 multiply adds at most half an ulp). The AMX and AVX512-BF16 instructions
treat bf16 subnormal inputs and float32 subnormal results as zero: values below ``2**-126`` (only
reachable through float32 scales below ``2**-117``) are lost, an absolute error of that order.

Kernels (``csrc/wgemm.c``, compiled per machine by :mod:`oq_toolkit.native`, ``-march=native``):

1. AMX-BF16 (x86 with AMX, Linux grants ``XTILEDATA``): the weight is the AMX A operand (rows of
   32 bf16 decoded from the codes into a per-thread panel of 32 rows), the activations are packed
   once per call into VNNI B tiles; C tiles are ``y^T``. Register block 32 n x 32 m.
2. AVX512-BF16 without AMX (e.g. AMD Zen 4/5): ``vdpbf16ps``, 4 weight rows decoded once into an L1
   buffer and reused for every row of ``M`` (register block 4 n x 4 m).
3. portable C (every other CPU, and ``-DOQ_GENERIC`` builds): float32 loops with the same chunking.
4. E2M1 weights with M <= 4 on AVX512-BF16 CPUs (chosen by the default path up to M = 3, above
   which AMX is as fast): the packed codes are decoded in registers (``vpmovzxbd`` of 16 bytes,
   nibbles to 16-bit table indices, ``vpermw`` from the 16-entry table of the group's scale) and
   fed straight to ``vdpbf16ps`` against every row of M: the 4-bit stream is read once and never
   written back decoded.

Fast paths need float32 scale groups along K that are whole multiples of 32 (or the full K) and
e8m0 groups of a multiple of 32 (E2M1 weights: folded e8m0 / e4m3 groups of a multiple of 16);
other grids run the portable loops. Without a compiler (or with
``OQ_COMPILE=0``) :func:`wgemm_reference` runs instead: the same product with torch ops (float32
dequantization and ``torch.mm``; slow, correct, same bound).

Which kernel for which M (measured on this project's machine: Intel Xeon with AMX-BF16, 2 cores,
shared with other jobs, torch 2.13; ``python bench/wgemm_micro.py --threads 1 --clock thread``,
4096x4096, CPU ms of one thread, best of 20; the 2-thread wall clock of this shared machine varied
10x between identical calls, bf16 ``F.linear`` included)::

    M                                  1      4     16     64    256
    bf16 F.linear (oneDNN, AMX)     1.99   1.99   2.17   4.09  11.55
    fp8 128x128 block / bf16        1.67   1.84   1.88   3.60  14.83
    fp8 128x128 block / e4m3 token  1.65   1.80   1.88   3.66  14.49
    fp8 128x128 block / e4m3 1x128  1.69   1.81   1.92   3.45  15.15
    fp8 channel / bf16              1.63   1.68   1.65   2.97  12.53
    fp8 channel / e4m3 token        1.72   1.70   1.71   2.92  11.91
    fp8 channel / e4m3 1x128        1.57   1.76   1.90   3.83  14.99
    mxfp8 / bf16                    1.96   2.01   1.97   3.30  11.88
    mxfp8 / e4m3 1x32 e8m0          1.99   1.87   2.00   3.46  11.94
    int8 channel / bf16             1.65   1.62   1.66   3.09  11.69
    int8 channel / int8 token       1.71   1.75   1.77   2.97  12.15

E2M1 weights (``python bench/wgemm_micro.py --only e2m1 --threads 1 --clock thread``, same
machine, 4096x4096; ratio = bf16 ``F.linear`` time / wgemm time, bf16 timed paired with each cell;
mxfp4 = e8m0 1x32 grid, nvfp4 = e4m3 1x16 grid + ``w_scale_mul``; W4A8 = e4m3 codes with an e8m0
1x32 activation grid)::

    M                                  1      4     16    256
    bf16 F.linear (oneDNN, AMX)     2.03   1.92   2.00   9.89
    mxfp4 / bf16                    0.97   1.60   1.50  10.43     2.09x  1.20x  1.29x  0.95x
    mxfp4 / e4m3 1x32 e8m0 (W4A8)   0.96   1.59   1.64  10.69     2.11x  1.20x  1.22x  0.93x
    nvfp4 / bf16                    1.03   1.79   1.79   9.31     1.97x  1.07x  1.12x  1.06x
    nvfp4 / e4m3 1x32 e8m0 (W4A8)   1.10   1.82   1.79   9.14     1.85x  1.05x  1.11x  1.00x

(CPU ms of one thread, best of 100; ratios against the fastest bf16 time seen for that M.) Two
threads, wall clock, idle machine (``python bench/wgemm_micro.py --only e2m1 --reps 100``), ratio
to bf16 at M = 1 / 4 / 16 / 256: mxfp4 2.24 / 1.22 / 1.28 / 0.88x, mxfp4 W4A8 2.22 / 1.21 / 1.28 /
0.89x, nvfp4 1.94 / 1.10 / 1.14 / 0.87x, nvfp4 W4A8 2.12 / 1.09 / 1.15 / 0.87x (0.57-0.67 ms at
M = 1 against bf16's 1.28). At
M = 1 the in-register decode is bound by ``vdpbf16ps`` and the decode instructions, not by
memory (the 8 MB of codes stream at ~8 GB/s on one thread); the same kernel with M = 4 is
``vdpbf16ps``-bound (16 per 32 codes), hence AMX from M = 4 on.

The fused AMX kernel is within 0.76-0.99x of oneDNN's AMX bf16 GEMM at M = 256 (float32
K-groups, i.e. 128x128 weight blocks or 1x128 activation groups, cost a scaled flush per 128 of K:
the 0.76-0.80x rows), so it runs at every M: no dequantize-to-scratch + ``torch.mm`` path, whose
bf16 rounding of ``dec(q) * s`` would also break the bound above. Without AMX the AVX512-BF16 path
runs at every M; here it reaches 64-80 GFLOP/s on one thread from M = 16 on, the throughput of
``vdpbf16ps`` itself on this CPU (76 GFLOP/s in a register-only loop), ~4x slower than AMX, so a
forward backend on such a CPU may prefer its own scratch + ``torch.mm`` for large M:
:func:`available_paths` says which path runs (``[0] == PATH_AMX``).

MiniLM-sized layers (the default ``oq quantize`` model: fp8 128x128 weight blocks, bias, bf16
output; ``bench/wgemm_micro.py --epilogue``, recipe in its docstring): bf16 ``F.linear`` time /
wgemm time, e4m3 1x128 activations (bf16 activations within a few %), best of 200 (2 threads:
wall clock; 1 thread: thread CPU time, best of 100)::

    M                      64    144    304    608
    K=384  N=384   2 thr  1.05   1.01   1.22   0.73      1 thr  1.05   0.88   0.69   0.75
    K=384  N=1536  2 thr  0.96   0.87   0.80   0.82      1 thr  0.98   0.89   0.77   0.74
    K=1536 N=384   2 thr  1.29   1.09   1.06   1.41      1 thr  1.19   0.92   0.77   0.82

Threads: OpenMP over blocks of weight rows, ``torch.get_num_threads()`` threads; with M >= 256 and
N <= 512 the threads split M instead (each decodes every weight block and streams only the
activations it packed). The ctypes call (one pointer to the packed arguments, ~12 us per call
all told) releases the GIL. Under ``torch.compile`` :func:`wgemm` is the custom op ``oq_toolkit::wgemm``
(fake implementation: ``[M, N]`` of ``out_dtype``), so a traced forward has no graph break and the eager
result; eager calls skip the dispatcher (~20 us per call).
"""

from __future__ import annotations

import ctypes
import struct
import threading
from importlib.resources import files
from typing import Optional

import torch

from oq_toolkit.native import NativeLibrary

BF16 = 0
"""``a_fmt``: bf16 activations."""
E4M3 = 1
"""``a_fmt`` / ``q_fmt``: float8_e4m3fn codes."""
INT8 = 2
"""``a_fmt`` / ``q_fmt``: int8 codes."""
E2M1 = 3
"""``q_fmt``: 4-bit e2m1 weight codes, two per byte: ``q`` uint8 ``[N, K/2]``, element ``2j`` in the
low nibble of byte ``j`` (values 0, .5, 1, 1.5, 2, 3, 4, 6; bit 3 the sign). Weights only."""

PATH_AUTO, PATH_AMX, PATH_BF16, PATH_SCALAR = 0, 1, 2, 3
"""Kernel paths of ``csrc/wgemm.c`` (``path=`` of :func:`wgemm_eager` forces one, for tests and benchmarks)."""

_SK_NONE, _SK_F32, _SK_E8M0, _SK_E4M3 = 0, 1, 2, 3


def _bind(lib) -> None:
    """Declare the ctypes signatures of ``oq_wgemm``, ``oq_wgemm_v`` and ``oq_wgemm_paths``."""
    P, I, C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.oq_wgemm.argtypes = [C, C, I, I, I, P, C, P, C, I, I, I, P, C, P, C, I, I, I, P, C, P, ctypes.c_float]
    lib.oq_wgemm.restype = C
    lib.oq_wgemm_v.argtypes = [P]
    lib.oq_wgemm_v.restype = C
    lib.oq_wgemm_paths.argtypes = []
    lib.oq_wgemm_paths.restype = C


CSRC_DIR = files("oq_toolkit") / "csrc"
"""The toolkit's C sources (package data): ``wgemm.c``."""

LIBRARY = NativeLibrary("oq_wgemm", CSRC_DIR / "wgemm.c", bind=_bind)
"""The compiled ``csrc/wgemm.c`` (build, cache and ctypes loading: :mod:`oq_toolkit.native`)."""

_PATH_NAMES = {PATH_AMX: "AMX-BF16", PATH_BF16: "AVX512-BF16", PATH_SCALAR: "portable C"}


def available_paths(lib=None) -> list[int]:
    """The kernel paths the compiled library can run on this CPU (``PATH_*``), fastest first; ``[]``
    without the library."""
    lib = lib if lib is not None else LIBRARY.load()
    if lib is None:
        return []
    mask = lib.oq_wgemm_paths()
    return [p for p in (PATH_AMX, PATH_BF16, PATH_SCALAR) if mask & (1 << p)]


def kernel_status() -> tuple[bool, str]:
    """``(compiled kernel available, description)`` for backend reasons and reports: names the
    fastest path this CPU runs (AMX-BF16, AVX512-BF16 or portable C)."""
    paths = available_paths() if LIBRARY.load() is not None else []
    best = _PATH_NAMES[paths[0]] if paths else "portable C"
    return LIBRARY.describe(f"compiled C kernel (fused 8-/4-bit weight GEMM, {best})", "torch dequantize + mm (slow)")


# ---------------------------------------------------------------------------------------------
# argument checks


def _codes(t: torch.Tensor, fmt: int, what: str) -> torch.Tensor:
    if fmt == E2M1 and what == "q":
        if t.dtype not in _E2M1_DTYPES:
            raise ValueError(f"q: E2M1 weights are packed uint8 codes [N, K/2] (two per byte), got {t.dtype}")
        return t
    if fmt not in (E4M3, INT8):
        allowed = f"E4M3 ({E4M3}), INT8 ({INT8}) or E2M1 ({E2M1})" if what == "q" else f"E4M3 ({E4M3}) or INT8 ({INT8})"
        raise ValueError(f"{what}: format {fmt} is not {allowed}")
    if t.element_size() != 1 or t.dtype == torch.bool:
        raise ValueError(f"{what}: expected 1-byte codes (uint8 / int8 / float8_e4m3fn), got {t.dtype}")
    return t  # the bytes are what the kernel reads (a view would cost ~1 us per call)


_E8M0_DTYPES = (torch.uint8, getattr(torch, "float8_e8m0fnu", torch.uint8))
_E2M1_DTYPES = (torch.uint8,) + ((torch.float4_e2m1fn_x2,) if hasattr(torch, "float4_e2m1fn_x2") else ())


def _scale(s: Optional[torch.Tensor], grid, rows: int, k: int, what: str):
    """``(tensor or None, kind, gr, gc, ld)`` of a scale grid, checked against ``[rows, k]``."""
    if s is None:
        return None, _SK_NONE, 1, 1, 1
    if not isinstance(s, torch.Tensor) or not s.is_cpu:
        raise ValueError(f"{what}: expected a CPU tensor, got {type(s).__name__}")
    if s.dtype == torch.float32:
        kind = _SK_F32
    elif s.dtype in _E8M0_DTYPES:
        kind, s = _SK_E8M0, s.view(torch.uint8)
    elif s.dtype == torch.float8_e4m3fn:
        kind, s = _SK_E4M3, s.view(torch.uint8)
    else:
        raise ValueError(f"{what}: scales must be float32 or e8m0 bytes (uint8 / float8_e8m0fnu), or float8_e4m3fn, got {s.dtype}")
    try:
        gr, gc, ld = grid
        gr, gc, ld = int(gr), int(gc), int(ld)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: grid must be (rows, cols, ld) integers, got {grid!r}") from None
    if gr < 1 or gc < 1 or ld < 0:
        raise ValueError(f"{what}: grid (rows, cols, ld) = {(gr, gc, ld)} needs rows, cols >= 1 and ld >= 0")
    per_row = (k - 1) // gc + 1
    if ld < per_row and rows > gr:
        raise ValueError(f"{what}: grid row stride ld={ld} < {per_row} groups per row")
    need = ((rows - 1) // gr) * ld + per_row if rows and k else 0
    if s.numel() < need:
        raise ValueError(f"{what}: {s.numel()} scales < {need} needed by grid {(gr, gc, ld)} over [{rows}, {k}]")
    return (s if s.is_contiguous() else s.contiguous()), kind, gr, gc, ld


_OUT_DTYPES = (torch.float32, torch.bfloat16)


def _epilogue(bias, out_dtype, n: int):
    """``(float32 contiguous bias or None, out_bf16 flag)``, checked against ``N``."""
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype: expected torch.float32 or torch.bfloat16, got {out_dtype!r}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_cpu:
            raise ValueError(f"bias: expected a CPU tensor, got {type(bias).__name__}")
        if bias.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"bias: expected float32, bfloat16 or float16, got {bias.dtype}")
        if bias.dim() != 1 or bias.shape[0] != n:
            raise ValueError(f"bias: expected shape [{n}] (N, the rows of q), got {tuple(bias.shape)}")
        bias = bias.contiguous() if bias.dtype == torch.float32 else bias.float()
    return bias, int(out_dtype == torch.bfloat16)


_ARGS = struct.Struct("22qf4x")
_TLS = threading.local()


def _call(lib, *args) -> int:
    """``oq_wgemm(*args)`` through ``oq_wgemm_v``: the 22 integer arguments (pointers as addresses,
    0 for none) and the float32 ``w_scale_mul`` (bits in the low half of a 23rd int64, little
    endian) packed into this thread's int64 buffer, one ctypes argument instead of 23 converted
    ones (~3 us less per call)."""
    buf = getattr(_TLS, "buf", None)
    if buf is None:
        buf = _TLS.buf = (ctypes.c_int64 * 23)()
        _TLS.addr = ctypes.addressof(buf)
    _ARGS.pack_into(buf, 0, *args)
    return lib.oq_wgemm_v(_TLS.addr)


def _prepare(a, a_fmt, a_scale, a_grid, q, q_fmt, w_scale, w_grid):
    """Checked, normalized arguments: ``(a, a_fmt, (as, kind, ar, ac, ald), q, q_fmt, (ws, kind, gr, gc, wld))``."""
    if not isinstance(a, torch.Tensor) or not isinstance(q, torch.Tensor):
        raise ValueError("a and q must be tensors")
    if not a.is_cpu or not q.is_cpu:
        raise ValueError(f"CPU tensors expected, got a on {a.device}, q on {q.device}")
    if a.dim() != 2 or q.dim() != 2:
        raise ValueError(f"expected a [M, K] and q [N, K], got {tuple(a.shape)} and {tuple(q.shape)}")
    m, k = a.shape
    n, kq = q.shape
    if q_fmt == E2M1:
        if k % 2:
            raise ValueError(f"q_fmt=E2M1 packs two codes per byte: K must be even, got a [M, K] = {tuple(a.shape)}")
        if kq * 2 != k:
            raise ValueError(f"q: E2M1 weights are [N, K/2] = [N, {k // 2}] bytes for a [M, K={k}], got {tuple(q.shape)}")
    elif k != kq:
        raise ValueError(f"expected a [M, K] and q [N, K], got {tuple(a.shape)} and {tuple(q.shape)}")
    if not a.is_contiguous() or not q.is_contiguous():
        raise ValueError("a and q must be contiguous")
    if a_fmt == BF16:
        if a.dtype != torch.bfloat16:
            raise ValueError(f"a_fmt=BF16 needs torch.bfloat16 activations, got {a.dtype}")
    else:
        a = _codes(a, a_fmt, "a")
    q = _codes(q, q_fmt, "q")
    if q_fmt == E2M1 and q.dtype != torch.uint8:
        q = q.view(torch.uint8)  # float4_e2m1fn_x2: the same bytes
    sa = _scale(a_scale, a_grid, m, k, "a_scale")
    sw = _scale(w_scale, w_grid, n, k, "w_scale")
    if a_fmt == BF16 and sa[1] == _SK_E8M0:  # bf16 values are not in a range where folding is exact
        sa = (_e8m0_to_f32(sa[0]), _SK_F32, *sa[2:])
    # e4m3 scales are folded into e2m1 weights only (products exact in bf16); elsewhere float32 (exact)
    if sa[1] == _SK_E4M3:
        sa = (_e4m3_to_f32(sa[0]), _SK_F32, *sa[2:])
    if sw[1] == _SK_E4M3 and q_fmt != E2M1:
        sw = (_e4m3_to_f32(sw[0]), _SK_F32, *sw[2:])
    return a, a_fmt, sa, q, q_fmt, sw


def _e4m3_to_f32(b: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn scale bytes -> float32 (exact; 0x7F / 0xFF -> NaN)."""
    return b.view(torch.float8_e4m3fn).float()


def _wmul(w_scale_mul) -> float:
    """``w_scale_mul`` checked (a Python number or a one-element tensor) and rounded to float32
    (the value the kernel multiplies by)."""
    if isinstance(w_scale_mul, torch.Tensor):
        if w_scale_mul.numel() != 1:
            raise ValueError(f"w_scale_mul: expected one number, got a tensor of shape {tuple(w_scale_mul.shape)}")
        w_scale_mul = w_scale_mul.item()
    if isinstance(w_scale_mul, bool) or not isinstance(w_scale_mul, (int, float)):
        raise ValueError(f"w_scale_mul: expected a float, got {type(w_scale_mul).__name__}")
    v = float(w_scale_mul)
    if v == 1.0:
        return v
    try:
        return struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:  # beyond float32's range: what the float32 cast gives (inf)
        return float(torch.tensor(v, dtype=torch.float32))


def _e8m0_to_f32(e: torch.Tensor) -> torch.Tensor:
    """e8m0 bytes -> float32 multipliers, ``2**(e-127)``, byte 0 -> ``2**-126``, 255 -> NaN."""
    e32 = e.to(torch.int32).clamp(min=1)
    return torch.where(e == 255, torch.nan, (e32 << 23).view(torch.float32))


# ---------------------------------------------------------------------------------------------
# entry points


def wgemm(a, a_fmt, a_scale, a_grid, q, q_fmt, w_scale, w_grid, *, bias: Optional[torch.Tensor] = None,
          out_dtype: torch.dtype = torch.float32, w_scale_mul: float = 1.0) -> torch.Tensor:
    """``[M, N] = w_scale_mul * A @ W^T (+ bias)`` for 8-bit or 4-bit weight codes (see the module docstring for the
    arguments, grid convention and error bound). ``bias``: ``None`` or ``[N]`` float32 / bfloat16 / float16 (widened exactly),
    added to the float32 sum; ``out_dtype``: ``torch.float32`` (default) or ``torch.bfloat16`` (one
    round to nearest even of the biased float32 sum: bit-identical to ``(y + bias).to(out_dtype)``);
    ``w_scale_mul``: a float32 multiplier of the whole product (e.g. nvfp4's ``1 / global_scale``),
    applied once per output to the float32 sum, before the bias.

    Eager calls run :func:`wgemm_eager` directly; under ``torch.compile`` the call is the opaque
    custom op ``oq_toolkit::wgemm`` (no graph break, the eager result). Raises ``ValueError`` for
    inconsistent shapes, dtypes or grids (programming errors: the plugins check user input).
    """
    if torch.compiler.is_compiling():
        ag = tuple(int(v) for v in a_grid) if a_scale is not None else (1, 1, 1)
        wg = tuple(int(v) for v in w_grid) if w_scale is not None else (1, 1, 1)
        return torch.ops.oq_toolkit.wgemm(a, int(a_fmt), a_scale, *ag, q, int(q_fmt), w_scale, *wg, bias, out_dtype, float(w_scale_mul))
    return wgemm_eager(a, a_fmt, a_scale, a_grid, q, q_fmt, w_scale, w_grid, bias=bias, out_dtype=out_dtype, w_scale_mul=w_scale_mul)


def wgemm_eager(a, a_fmt, a_scale, a_grid, q, q_fmt, w_scale, w_grid, *, bias: Optional[torch.Tensor] = None,
                out_dtype: torch.dtype = torch.float32, w_scale_mul: float = 1.0, path: int = PATH_AUTO, lib=None) -> torch.Tensor:
    """:func:`wgemm` without the compile dispatch. ``path`` forces a kernel path (``PATH_*``; one
    this CPU cannot run, or a grid the fast paths do not take, runs the portable loops); ``lib`` a
    library (e.g. a ``-DOQ_GENERIC`` build); :func:`wgemm_reference` runs when none loads."""
    a, a_fmt, (sa, ska, ar, ac, ald), q, q_fmt, (sw, skw, gr, gc, wld) = _prepare(a, a_fmt, a_scale, a_grid, q, q_fmt, w_scale, w_grid)
    lib = lib if lib is not None else LIBRARY.load()
    m, k = a.shape
    n = q.shape[0]
    bias, out_bf16 = _epilogue(bias, out_dtype, n)
    wmul = _wmul(w_scale_mul)
    if lib is None:
        return _finish(_reference(a, a_fmt, (sa, ska, ar, ac, ald), q, q_fmt, (sw, skw, gr, gc, wld), wmul), bias, out_dtype)
    y = torch.empty(m, n, dtype=out_dtype)
    nthreads = torch.get_num_threads()
    ap, qp, yp = a.data_ptr(), q.data_ptr(), y.data_ptr()
    bp = bias.data_ptr() if bias is not None else 0
    r = _call(lib, path, nthreads, m, n, k, ap, a_fmt, sa.data_ptr() if sa is not None else 0, ska, ar, ac, ald,
              qp, q_fmt, sw.data_ptr() if sw is not None else 0, skw, gr, gc, wld, bp, out_bf16, yp, wmul)
    if r == -2:  # an e8m0 byte outside the exactly-foldable range: those scales as float32 chunks
        if ska == _SK_E8M0:
            sa, ska = _e8m0_to_f32(sa), _SK_F32
        if skw == _SK_E8M0:
            sw, skw = _e8m0_to_f32(sw), _SK_F32
        r = _call(lib, path, nthreads, m, n, k, ap, a_fmt, sa.data_ptr() if sa is not None else 0, ska, ar, ac, ald,
                  qp, q_fmt, sw.data_ptr() if sw is not None else 0, skw, gr, gc, wld, bp, out_bf16, yp, wmul)
    if r < 0:
        raise MemoryError(f"oq_wgemm: could not allocate its buffers for M={m}, N={n}, K={k}")
    return y


def _finish(y: torch.Tensor, bias, out_dtype) -> torch.Tensor:
    """The epilogue with torch ops: float32 ``y + bias``, then one rounding to ``out_dtype``."""
    if bias is not None:
        y += bias
    return y if out_dtype == torch.float32 else y.to(out_dtype)


def _dequant(t: torch.Tensor, fmt: int, s, kind: int, gr: int, gc: int, ld: int, r0: int = 0) -> torch.Tensor:
    """float32 ``dec(t) * scale`` of the rows ``[r0, r0 + len(t))`` of an operand (torch ops)."""
    if fmt == BF16:
        x = t.float()
    elif fmt == E4M3:
        x = t.view(torch.float8_e4m3fn).float()
    elif fmt == E2M1:
        b = t.view(torch.uint8)
        codes = torch.stack((b & 0x0F, b >> 4), dim=-1).reshape(b.shape[0], b.shape[1] * 2)
        x = _E2M1_VALUES[codes.long()]
    else:
        x = t.view(torch.int8).float()
    if kind == _SK_NONE:
        return x
    if kind == _SK_F32:
        sf = s.reshape(-1).float()
    elif kind == _SK_E4M3:
        sf = _e4m3_to_f32(s.reshape(-1))
    else:
        sf = _e8m0_to_f32(s.reshape(-1))
    r, k = x.shape
    idx = (torch.arange(r0, r0 + r) // gr)[:, None] * ld + (torch.arange(k) // gc)[None, :]
    return x * sf[idx]


_E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _reference(a, a_fmt, sa, q, q_fmt, sw, wmul: float = 1.0) -> torch.Tensor:
    af = _dequant(a, a_fmt, *sa)
    n, k = q.shape[0], a.shape[1]
    y = torch.empty(a.shape[0], n, dtype=torch.float32)
    rows = max(1, (16 << 20) // max(4 * k, 1))  # float32 weight tiles of 16 MiB, never the whole weight
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        y[:, n0:n1] = torch.mm(af, _dequant(q[n0:n1], q_fmt, *sw, r0=n0).t())
    if wmul != 1.0:
        y *= wmul
    return y


def wgemm_reference(a, a_fmt, a_scale, a_grid, q, q_fmt, w_scale, w_grid, *, bias: Optional[torch.Tensor] = None,
                    out_dtype: torch.dtype = torch.float32, w_scale_mul: float = 1.0) -> torch.Tensor:
    """The same product with torch ops (float32 dequantization of ``A`` and of ``W`` in tiles of
    rows, then ``torch.mm``, then ``* w_scale_mul``, ``+ bias`` and ``.to(out_dtype)``): what
    :func:`wgemm` runs without the compiled library."""
    a, a_fmt, sa, q, q_fmt, sw = _prepare(a, a_fmt, a_scale, a_grid, q, q_fmt, w_scale, w_grid)
    bias, _ = _epilogue(bias, out_dtype, q.shape[0])
    return _finish(_reference(a, a_fmt, sa, q, q_fmt, sw, _wmul(w_scale_mul)), bias, out_dtype)


# ---------------------------------------------------------------------------------------------
# torch.library op


@torch.library.custom_op("oq_toolkit::wgemm", mutates_args=())
def _wgemm_op(
    a: torch.Tensor, a_fmt: int, a_scale: Optional[torch.Tensor], ar: int, ac: int, ald: int,
    q: torch.Tensor, q_fmt: int, w_scale: Optional[torch.Tensor], gr: int, gc: int, wld: int,
    bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.float32, w_scale_mul: float = 1.0,
) -> torch.Tensor:
    """:func:`wgemm_eager` as one op (grids passed as their three integers)."""
    return wgemm_eager(
        a.contiguous(), a_fmt, a_scale.contiguous() if a_scale is not None else None, (ar, ac, ald),
        q.contiguous(), q_fmt, w_scale.contiguous() if w_scale is not None else None, (gr, gc, wld),
        bias=bias, out_dtype=out_dtype, w_scale_mul=w_scale_mul,
    )


@_wgemm_op.register_fake
def _wgemm_fake(a, a_fmt, a_scale, ar, ac, ald, q, q_fmt, w_scale, gr, gc, wld, bias=None, out_dtype=torch.float32, w_scale_mul=1.0):
    return a.new_empty((a.shape[0], q.shape[0]), dtype=out_dtype)

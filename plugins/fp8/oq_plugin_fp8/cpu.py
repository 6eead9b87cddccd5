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

This module is generic over the scale grid: oq-plugin-mxfp8 (which depends on oq-plugin-fp8 for
it) uses it with e8m0 scales.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
import warnings

import torch

GEMV_MAX_M = 4
"""Batches up to this size run the fused GEMV (register-blocked over 4 tokens); larger ones the
tiled dequantize + ``torch.mm`` path (which is compute-bound like bf16 GEMM from ~16 tokens on)."""

TILE_BYTES = 4 << 20
"""Size of the dequantized scratch tile of the large-batch path (4 MiB: 512 rows of K=4096 in bf16)."""

SCALE_FLOAT32 = 0
SCALE_E8M0 = 1

C_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <stdlib.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(OQ_GENERIC)
#include <immintrin.h>
#define OQ_AVX512 1
#endif

/* Scale of group g of a row: float32 grid or e8m0 bytes (2^(e-127); byte 0 -> 2^-126, 255 -> NaN
   as the mxfp8 reference's exponent_to_scale). */
static inline float scale_at(const void* srow, int kind, int64_t g) {
    if (kind == 0) return ((const float*)srow)[g];
    uint32_t e = ((const uint8_t*)srow)[g];
    uint32_t bits = e == 0 ? 0x00800000u : (e == 255 ? 0x7FC00000u : e << 23);
    float f; memcpy(&f, &bits, 4); return f;
}

/* float8_e4m3fn byte -> float32, exact for every code but the NaN codes 0x7F/0xFF (weights never hold them). */
static inline float dec1(uint8_t b) {
    uint32_t mag = b & 0x7Fu, bits;
    float f;
    if (mag < 8) { f = (float)mag * 0.001953125f; }          /* subnormal: mag * 2^-9 */
    else { bits = (mag << 20) + (120u << 23); memcpy(&f, &bits, 4); } /* exponent rebias 7 -> 127 */
    return (b & 0x80u) ? -f : f;
}

#ifdef OQ_AVX512
static inline __m512 dec16(__m128i b) {
    __m512i v = _mm512_cvtepi8_epi32(b);                 /* sign-extended: bit 31 = fp8 sign */
    __m512i mag = _mm512_and_si512(v, _mm512_set1_epi32(0x7F));
    __m512i bits = _mm512_add_epi32(_mm512_slli_epi32(mag, 20), _mm512_set1_epi32(120 << 23));
    __mmask16 sub = _mm512_cmplt_epi32_mask(mag, _mm512_set1_epi32(8));
    /* subnormals: (1 + mag/8) * 2^-6 - 2^-6 = mag * 2^-9 exactly */
    bits = _mm512_mask_add_epi32(bits, sub, bits, _mm512_set1_epi32(1 << 23));
    __m512 f = _mm512_castsi512_ps(bits);
    f = _mm512_mask_sub_ps(f, sub, f, _mm512_set1_ps(0.015625f));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(f),
                               _mm512_and_si512(v, _mm512_set1_epi32((int)0x80000000u))));
}
static inline __mmask16 tailmask(int64_t r) { return r >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << r) - 1u); }
/* 16 dequantized weights q*s from k (masked past len) */
static inline __m512 wvec(const uint8_t* q, int64_t k, int64_t len, __m512 s) {
    __mmask16 m = tailmask(len - k);
    return _mm512_mul_ps(dec16(_mm_maskz_loadu_epi8(m, q + k)), s);
}
#endif

/* Dequantize row n's [K] into out (float32) */
static void dequant_row_f32(const uint8_t* row, const void* srow, int kind, int64_t gc, int64_t K, float* out) {
#ifdef OQ_AVX512
    int64_t k = 0;
    for (int64_t k0 = 0, g = 0; k0 < K; k0 += gc, g++) {
        int64_t k1 = k0 + gc < K ? k0 + gc : K;
        __m512 s = _mm512_set1_ps(scale_at(srow, kind, g));
        for (k = k0; k < k1; k += 16) {
            __mmask16 m = tailmask(k1 - k);
            _mm512_mask_storeu_ps(out + k, m, _mm512_mul_ps(dec16(_mm_maskz_loadu_epi8(m, row + k)), s));
        }
    }
#else
    for (int64_t k = 0; k < K; k++) out[k] = dec1(row[k]) * scale_at(srow, kind, k / gc);
#endif
}

/* y[m, n] = sum_k x[m, k] * dec(q[n, k]) * s[n / gr, k / gc], rows n in [n0, n1). x float32 [M, K]
   (row stride ldx), y float32 [M, N] (row stride ldy). M <= 64. */
void oq_fp8_gemv(const uint8_t* q, int64_t N, int64_t K, const float* x, int64_t ldx, int64_t M,
                 const void* sc, int kind, int64_t gr, int64_t gc, int64_t sc_ld,
                 float* y, int64_t ldy, int nthreads) {
    int64_t esz = kind == 0 ? 4 : 1;
    #pragma omp parallel num_threads(nthreads)
    {
        float wbuf[256] __attribute__((aligned(64)));
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const uint8_t* row = q + n * K;
            const void* srow = (const char*)sc + (n / gr) * sc_ld * esz;
#ifdef OQ_AVX512
            if (M == 1) {
                __m512 a0 = _mm512_setzero_ps(), a1 = a0;
                for (int64_t k0 = 0, g = 0; k0 < K; k0 += gc, g++) {
                    int64_t k1 = k0 + gc < K ? k0 + gc : K;
                    __m512 s = _mm512_set1_ps(scale_at(srow, kind, g));
                    int64_t k = k0;
                    for (; k + 32 <= k1; k += 32) {
                        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_mul_ps(dec16(_mm_loadu_si128((const __m128i*)(row + k))), s), a0);
                        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), _mm512_mul_ps(dec16(_mm_loadu_si128((const __m128i*)(row + k + 16))), s), a1);
                    }
                    for (; k < k1; k += 16) {
                        __mmask16 m = tailmask(k1 - k);
                        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + k), _mm512_mul_ps(dec16(_mm_maskz_loadu_epi8(m, row + k)), s), a0);
                    }
                }
                y[n] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
                continue;
            }
            __m512 acc[64];
            for (int64_t m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
            for (int64_t c0 = 0; c0 < K; c0 += 256) {
                int64_t c1 = c0 + 256 < K ? c0 + 256 : K, len = c1 - c0;
                /* dequantize the chunk once (scale group changes only at multiples of 16) */
                for (int64_t k = c0; k < c1; k += 16) {
                    __mmask16 mk = tailmask(c1 - k);
                    __m512 s = _mm512_set1_ps(scale_at(srow, kind, k / gc));
                    _mm512_store_ps(wbuf + (k - c0), _mm512_maskz_mul_ps(mk, dec16(_mm_maskz_loadu_epi8(mk, row + k)), s));
                }
                /* four tokens at a time: four independent FMA chains share each weight load */
                int64_t m = 0;
                for (; m + 4 <= M; m += 4) {
                    const float* x0 = x + m * ldx + c0;
                    const float* x1 = x0 + ldx;
                    const float* x2 = x1 + ldx;
                    const float* x3 = x2 + ldx;
                    __m512 b0 = acc[m], b1 = acc[m + 1], b2 = acc[m + 2], b3 = acc[m + 3];
                    for (int64_t k = 0; k < len; k += 16) {
                        __mmask16 mk = tailmask(len - k);
                        __m512 w = _mm512_load_ps(wbuf + k);
                        b0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, x0 + k), w, b0);
                        b1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, x1 + k), w, b1);
                        b2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, x2 + k), w, b2);
                        b3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, x3 + k), w, b3);
                    }
                    acc[m] = b0; acc[m + 1] = b1; acc[m + 2] = b2; acc[m + 3] = b3;
                }
                for (; m < M; m++) {
                    const float* xm = x + m * ldx + c0;
                    __m512 a = acc[m], a2 = _mm512_setzero_ps();
                    for (int64_t k = 0; k < len; k += 16)
                        a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tailmask(len - k), xm + k), _mm512_load_ps(wbuf + k), a);
                    acc[m] = _mm512_add_ps(a, a2);
                }
            }
            for (int64_t m = 0; m < M; m++) y[m * ldy + n] = _mm512_reduce_add_ps(acc[m]);
#else
            float acc[64];
            for (int64_t m = 0; m < M; m++) acc[m] = 0.f;
            for (int64_t c0 = 0; c0 < K; c0 += 256) {
                int64_t c1 = c0 + 256 < K ? c0 + 256 : K, len = c1 - c0;
                for (int64_t k = c0; k < c1; k++) wbuf[k - c0] = dec1(row[k]) * scale_at(srow, kind, k / gc);
                for (int64_t m = 0; m < M; m++) {
                    const float* xm = x + m * ldx + c0;
                    float a = 0.f;
                    for (int64_t k = 0; k < len; k++) a += xm[k] * wbuf[k];
                    acc[m] += a;
                }
            }
            for (int64_t m = 0; m < M; m++) y[m * ldy + n] = acc[m];
#endif
        }
    }
}

/* Dequantize rows [n0, n1) into out [n1-n0, K]: float32 (out_bf16 = 0) or bf16 bits (round to nearest even). */
void oq_fp8_dequant_rows(const uint8_t* q, int64_t K, int64_t n0, int64_t n1,
                         const void* sc, int kind, int64_t gr, int64_t gc, int64_t sc_ld,
                         void* out, int out_bf16, int nthreads) {
    int64_t esz = kind == 0 ? 4 : 1;
    #pragma omp parallel num_threads(nthreads)
    {
        float* tmp = out_bf16 ? (float*)aligned_alloc(64, sizeof(float) * (size_t)((K + 16) / 16 * 16)) : 0;
        #pragma omp for schedule(static)
        for (int64_t n = n0; n < n1; n++) {
            const void* srow = (const char*)sc + (n / gr) * sc_ld * esz;
            float* dst = out_bf16 ? tmp : (float*)out + (n - n0) * K;
            dequant_row_f32(q + n * K, srow, kind, gc, K, dst);
            if (out_bf16) {
                uint16_t* o = (uint16_t*)out + (n - n0) * K;
                int64_t k = 0;
#ifdef OQ_AVX512
                for (; k + 16 <= K; k += 16) {
                    __m512i b = _mm512_castps_si512(_mm512_load_ps(tmp + k));
                    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
                    b = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
                    _mm256_storeu_si256((__m256i*)(o + k), _mm512_cvtepi32_epi16(b));
                }
#endif
                for (; k < K; k++) {
                    uint32_t b; memcpy(&b, tmp + k, 4);
                    o[k] = (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
                }
            }
        }
        free(tmp);
    }
}

"""

_lock = threading.Lock()
_lib = None
_lib_error: str | None = None
_scratch = threading.local()


def _cache_dir() -> str:
    base = os.environ.get("OQ_CPU_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "oqcore")
    return os.path.join(base, "cpu_kernels")


def _cpu_identity() -> str:
    """The CPU's feature flags: ``-march=native`` code is only valid on a CPU that has them all, so
    they are part of the cache key (a home directory may outlive or travel between machines)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return os.uname().machine


def _compile(path: str, cc: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "fp8_kernels.c")
        with open(src, "w") as f:
            f.write(C_SOURCE)
        out = os.path.join(tmp, "k.so")
        # no -ffast-math: linking it would set flush-to-zero for the whole process
        cmd = [cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", src, "-o", out]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()[-500:]}")
        os.replace(out, path)  # atomic: concurrent processes never load a half-written library


def load_library():
    """The compiled kernel library (a ``ctypes.CDLL``) or ``None``; compiles on first use.

    ``None`` when ``OQ_COMPILE=0`` is set or compiling failed (the reason is in :func:`kernel_status`).
    """
    global _lib, _lib_error
    if os.environ.get("OQ_COMPILE", "1") == "0":
        return None
    if _lib is not None or _lib_error is not None:
        return _lib
    with _lock:
        if _lib is not None or _lib_error is not None:
            return _lib
        cc = os.environ.get("CC", "cc")
        key = hashlib.sha256((C_SOURCE + cc + os.uname().machine + _cpu_identity()).encode()).hexdigest()[:16]
        path = os.path.join(_cache_dir(), f"oq_fp8_cpu_{key}.so")
        try:
            if not os.path.exists(path):
                _compile(path, cc)
            lib = ctypes.CDLL(path)
        except Exception as e:  # no compiler, read-only home, ...: stay correct through eager torch
            _lib_error = f"{type(e).__name__}: {e}"
            warnings.warn(f"oqcore fp8 CPU kernels unavailable, running eager torch tiles: {_lib_error}", stacklevel=2)
            return None
        P, I, C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.oq_fp8_gemv.argtypes = [P, I, I, P, I, I, P, C, I, I, I, P, I, C]
        lib.oq_fp8_gemv.restype = None
        lib.oq_fp8_dequant_rows.argtypes = [P, I, I, I, P, C, I, I, I, P, C, C]
        lib.oq_fp8_dequant_rows.restype = None
        _lib = lib
        return lib


def kernel_status() -> tuple[bool, str]:
    """``(compiled kernel available, description)`` for backend reasons and reports."""
    lib = load_library()
    if lib is not None:
        return True, "compiled C kernel (fused fp8 dequantize-and-GEMV, tiled dequantize + torch.mm)"
    if os.environ.get("OQ_COMPILE", "1") == "0":
        return False, "OQ_COMPILE=0: eager torch tiles (slow)"
    return False, f"C kernel unavailable ({_lib_error}): eager torch tiles (slow)"


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
    """``y[m, n] = sum_k x[m, k] * fp8(q[n, k]) * s[(n // gr) * ld + k // gc]`` on the CPU.

    - ``x``: ``[M, K]`` activations (bf16, fp16 or float32), CPU.
    - ``q``: ``[N, K]`` contiguous float8_e4m3fn (or its uint8 bytes), never converted as a whole.
    - ``scale``: contiguous grid read as a flat array with row stride ``ld``: float32 (``kind =
      SCALE_FLOAT32``) or float8_e8m0fnu/uint8 exponents (``SCALE_E8M0``: ``2^(e-127)``, byte 0 =
      ``2^-126`` as the mxfp8 reference).
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

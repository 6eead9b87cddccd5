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

The same library holds the quantizers of the ``"cpu"`` quantizer backend (:func:`quantize_fp8_grouped`
for the six fp8 keys, :func:`quantize_mxfp8` for mxfp8): bf16/fp16/float32 ``[N, K]`` (a 3D stack one
matrix at a time) -> the torch references' exact bytes. amax is an integer max of the input's
absolute-value bits (which also flags Inf/NaN: the reference then runs), scales and ``w / scale`` are
single IEEE float32 operations, and float32 -> e4m3 rounding (RNE, subnormals) is integer bit
manipulation, checked against torch's cast on all 2.28e9 float32 values of [-448, 448]. Measured
(2 cores, bf16 4096x4096): 8-14 GB/s of bf16 read vs ~0.2-0.3 GB/s eager.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from oqcore.native import C_HELPERS, NativeLibrary, compile_disabled

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

/* ---------------------------------------------------------------------------------------------
   Quantizers (float32 / bf16 / fp16 weights -> float8_e4m3fn bytes), bit-exact with the torch
   references of oq_plugin_fp8.quant and oq_plugin_mxfp8.quant. No -ffast-math: every float op
   below is one IEEE float32 operation (division stays division), rounding is done with integers.
   dt: 0 = float32, 1 = bf16, 2 = fp16.
   --------------------------------------------------------------------------------------------- */


/* Absolute-value bits in the input's own format: for non-negative IEEE values integer order is
   numeric order (and NaN > Inf > every finite value), so max |w| is an integer max. */
OQ_INLINE uint32_t abs_bits1(const void* w, int dt, int64_t i) {
    if (dt == 0) return ((const uint32_t*)w)[i] & 0x7FFFFFFFu;
    return ((const uint16_t*)w)[i] & 0x7FFFu;
}
OQ_INLINE uint32_t inf_bits(int dt) { return dt == 0 ? 0x7F800000u : (dt == 1 ? 0x7F80u : 0x7C00u); }

/* Software prefetch of element i (a no-op without the builtin). Measured on this project's VM: the
   hardware prefetcher alone leaves streaming passes that compute per element stalled on memory
   (per-tensor fp8 4096x4096: 4 -> 9 GB/s on one thread); 1 KB of bf16 ahead is enough. */
#define OQ_PREFETCH_AHEAD 512
#if defined(__GNUC__)
#define OQ_PREFETCH(w, dt, i) __builtin_prefetch((const char*)(w) + (i) * ((dt) == 0 ? 4 : 2), 0, 3)
#else
#define OQ_PREFETCH(w, dt, i) ((void)0)
#endif

OQ_INLINE float bits_to_f32(uint32_t b, int dt) {
    if (dt == 2) return half_to_f32(b);
    if (dt == 1) b <<= 16;
    float f; memcpy(&f, &b, 4); return f;
}
OQ_INLINE float load1(const void* w, int dt, int64_t i) {
    if (dt == 0) return ((const float*)w)[i];
    return bits_to_f32(((const uint16_t*)w)[i], dt);
}

/* float32 -> float8_e4m3fn byte, round to nearest even, integer arithmetic. y finite, |y| <= 448
   (the callers clamp). zero_fix: +-0.0 -> 0x00 (compressed-tensors' "+ 0.0"); otherwise -0.0 -> 0x80. */
OQ_INLINE uint8_t f32_to_e4m3(float y, int zero_fix) {
    uint32_t b; memcpy(&b, &y, 4);
    uint32_t sign = (b >> 24) & 0x80u, a = b & 0x7FFFFFFFu, r;
    if (a == 0 && zero_fix) return 0;
    if (a >= (121u << 23)) {              /* >= 2^-6: normal e4m3, rebias 127 -> 7, drop 20 bits RNE */
        uint32_t t = a - (120u << 23);
        r = (t + 0x7FFFFu + ((t >> 20) & 1u)) >> 20;
    } else {                              /* subnormal e4m3: round(|y| / 2^-9), 8 -> 0x08 = 2^-6 */
        uint32_t E = a >> 23, m = (a & 0x7FFFFFu) | (E ? 0x800000u : 0u);
        uint32_t s = 141u - (E ? E : 1u);
        if (s > 31u) s = 31u;
        uint32_t q = m >> s, rem = m & ((1u << s) - 1u), half = 1u << (s - 1u);
        r = q + (uint32_t)(rem > half || (rem == half && (q & 1u)));
    }
    return (uint8_t)(sign | r);
}

#ifdef OQ_AVX512
OQ_INLINE __m512 load16(const void* w, int dt, int64_t i, __mmask16 m) {
    if (dt == 0) return _mm512_maskz_loadu_ps(m, (const float*)w + i);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t*)w + i);
    if (dt == 1) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

/* 16 lanes of f32_to_e4m3 (same integer algorithm) */
OQ_INLINE __m128i e4m3_16(__m512 y, int zero_fix) {
    const __m512i one = _mm512_set1_epi32(1);
    __m512i b = _mm512_castps_si512(y);
    __m512i a = _mm512_and_si512(b, _mm512_set1_epi32(0x7FFFFFFF));
    __m512i sign = _mm512_and_si512(_mm512_srli_epi32(b, 24), _mm512_set1_epi32(0x80));
    __m512i t = _mm512_sub_epi32(a, _mm512_set1_epi32(120 << 23));
    __m512i rn = _mm512_srli_epi32(_mm512_add_epi32(t, _mm512_add_epi32(_mm512_set1_epi32(0x7FFFF),
                                   _mm512_and_si512(_mm512_srli_epi32(t, 20), one))), 20);
    __mmask16 sub = _mm512_cmplt_epu32_mask(a, _mm512_set1_epi32(121 << 23));
    __m512i r = rn;
    if (sub) {
        __m512i E = _mm512_srli_epi32(a, 23);
        __mmask16 nz = _mm512_test_epi32_mask(E, E);
        __m512i m = _mm512_and_si512(a, _mm512_set1_epi32(0x7FFFFF));
        m = _mm512_mask_or_epi32(m, nz, m, _mm512_set1_epi32(0x800000));
        __m512i s = _mm512_sub_epi32(_mm512_set1_epi32(141), _mm512_max_epu32(E, one));
        s = _mm512_min_epi32(_mm512_max_epi32(s, one), _mm512_set1_epi32(31));  /* normal lanes: unused */
        __m512i q = _mm512_srlv_epi32(m, s);
        __m512i rem = _mm512_and_si512(m, _mm512_sub_epi32(_mm512_sllv_epi32(one, s), one));
        __m512i half = _mm512_sllv_epi32(one, _mm512_sub_epi32(s, one));
        __mmask16 up = _mm512_cmpgt_epu32_mask(rem, half)
                     | (_mm512_cmpeq_epi32_mask(rem, half) & _mm512_test_epi32_mask(q, one));
        r = _mm512_mask_mov_epi32(rn, sub, _mm512_mask_add_epi32(q, up, q, one));
    }
    r = _mm512_or_si512(r, sign);
    if (zero_fix) r = _mm512_maskz_mov_epi32(_mm512_test_epi32_mask(a, a), r);
    return _mm512_cvtepi32_epi8(r);
}
#endif

/* max |w[i]| bits (input format) over i in [off, off + len) */
OQ_INLINE uint32_t seg_amax(const void* w, int dt, int64_t off, int64_t len) {
    uint32_t mx = 0;
    int64_t i = 0;
#ifdef OQ_AVX512
    if (dt == 0) {
        __m512i acc = _mm512_setzero_si512(), msk = _mm512_set1_epi32(0x7FFFFFFF);
        const uint32_t* p = (const uint32_t*)w + off;
        for (; i < len; i += 16) {
            __mmask16 m = tailmask(len - i);
            OQ_PREFETCH(w, dt, off + i + OQ_PREFETCH_AHEAD);
            acc = _mm512_max_epu32(acc, _mm512_and_si512(_mm512_maskz_loadu_epi32(m, p + i), msk));
        }
        return _mm512_reduce_max_epu32(acc);
    } else {
        __m512i acc0 = _mm512_setzero_si512(), acc1 = acc0, msk = _mm512_set1_epi16(0x7FFF);
        const uint16_t* p = (const uint16_t*)w + off;
        for (; i + 64 <= len; i += 64) {
            OQ_PREFETCH(w, dt, off + i + OQ_PREFETCH_AHEAD);
            OQ_PREFETCH(w, dt, off + i + OQ_PREFETCH_AHEAD + 32);
            acc0 = _mm512_max_epu16(acc0, _mm512_and_si512(_mm512_loadu_si512(p + i), msk));
            acc1 = _mm512_max_epu16(acc1, _mm512_and_si512(_mm512_loadu_si512(p + i + 32), msk));
        }
        for (; i < len; i += 32) {
            int64_t r = len - i;
            __mmask32 m = r >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << r) - 1u);
            acc0 = _mm512_max_epu16(acc0, _mm512_and_si512(_mm512_maskz_loadu_epi16(m, p + i), msk));
        }
        acc0 = _mm512_max_epu16(acc0, acc1);
        __m256i h = _mm256_max_epu16(_mm512_castsi512_si256(acc0), _mm512_extracti64x4_epi64(acc0, 1));
        __m128i x = _mm_max_epu16(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        /* minpos on the complement finds the max */
        x = _mm_minpos_epu16(_mm_xor_si128(x, _mm_set1_epi16(-1)));
        return (~(uint32_t)_mm_extract_epi16(x, 0)) & 0xFFFFu;
    }
#endif
    for (; i < len; i++) { uint32_t v = abs_bits1(w, dt, off + i); mx = v > mx ? v : mx; }
    return mx;
}

/* q[i] = e4m3(clamp(w[i] / scale, +-448)) with the "+ 0.0" zero rule, i in [off, off + len) */
OQ_INLINE void seg_quant(const void* w, int dt, int64_t off, int64_t len, float scale, uint8_t* q) {
    int64_t i = 0;
#ifdef OQ_AVX512
    __m512 s = _mm512_set1_ps(scale), hi = _mm512_set1_ps(448.0f), lo = _mm512_set1_ps(-448.0f);
    for (; i < len; i += 16) {
        __mmask16 m = tailmask(len - i);
        OQ_PREFETCH(w, dt, off + i + OQ_PREFETCH_AHEAD);
        __m512 y = _mm512_div_ps(load16(w, dt, off + i, m), s);
        y = _mm512_min_ps(_mm512_max_ps(y, lo), hi);
        _mm_mask_storeu_epi8(q + off + i, m, e4m3_16(y, 1));
    }
#endif
    for (; i < len; i++) {
        float y = load1(w, dt, off + i) / scale;
        y = y > 448.0f ? 448.0f : (y < -448.0f ? -448.0f : y);
        q[off + i] = f32_to_e4m3(y, 1);
    }
}

OQ_INLINE float fp8_scale_of(uint32_t amax_bits, int dt) {
    float s = bits_to_f32(amax_bits, dt) / 448.0f;           /* IEEE float32 division, as the reference */
    return s == 0.0f ? 1.1920928955078125e-07f : s;          /* torch.finfo(torch.float32).eps */
}

/* Groups (gi, gj0 .. gj1) of one group row, rows [r0, r1): amax row by row (contiguous segments,
   prefetch friendly), scales, then quantize while the rows are in L2. Returns the number of groups
   holding Inf/NaN. */
#define OQ_CHUNK_MAX 64
OQ_INLINE int64_t quant_chunk(const void* w, int dt, int64_t K, int64_t gc, int64_t r0, int64_t r1,
                              int64_t gj0, int64_t gj1, uint8_t* q, float* srow) {
    uint32_t mx[OQ_CHUNK_MAX] = {0};
    float sc[OQ_CHUNK_MAX];
    int64_t bad = 0, cend = gj1 * gc < K ? gj1 * gc : K;
    for (int64_t r = r0; r < r1; r++) {
        /* the chunk's rows are K apart: fetch two rows ahead, the hardware prefetcher restarts per row */
        if (r + 2 < r1)
            for (int64_t c = gj0 * gc; c < cend; c += (dt == 0 ? 16 : 32)) OQ_PREFETCH(w, dt, (r + 2) * K + c);
        for (int64_t j = gj0; j < gj1; j++) {
            int64_t c0 = j * gc, c1 = c0 + gc < cend ? c0 + gc : cend;
            uint32_t v = seg_amax(w, dt, r * K + c0, c1 - c0);
            mx[j - gj0] = v > mx[j - gj0] ? v : mx[j - gj0];
        }
    }
    for (int64_t j = gj0; j < gj1; j++) {
        if (mx[j - gj0] >= inf_bits(dt)) { bad++; continue; }
        sc[j - gj0] = srow[j] = fp8_scale_of(mx[j - gj0], dt);
    }
    if (bad) return bad;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t j = gj0; j < gj1; j++) {
            int64_t c0 = j * gc, c1 = c0 + gc < cend ? c0 + gc : cend;
            seg_quant(w, dt, r * K + c0, c1 - c0, sc[j - gj0], q);
        }
    return 0;
}

static int64_t quant_grid_dt(const void* w, int dt, int64_t N, int64_t K, int64_t gr, int64_t gc,
                             uint8_t* q, float* scale, int nthreads) {
    int64_t nr = (N + gr - 1) / gr, nc = (K + gc - 1) / gc, ng = nr * nc, bad = 0;
    if (ng >= 2 * nthreads || (ng >= nthreads && gr * gc <= (1 << 16))) {
        /* enough groups: tasks of cb groups of one group row (~256 KB of input, so the second
           pass hits L2), at least 2 tasks per thread when there are enough groups */
        int64_t esz = dt == 0 ? 4 : 2, rows = gr < N ? gr : N;
        int64_t cb = (256 << 10) / (esz * rows * gc);
        cb = cb < 1 ? 1 : (cb > OQ_CHUNK_MAX ? OQ_CHUNK_MAX : cb);
        cb = cb > nc ? nc : cb;
        while (cb > 1 && nr * ((nc + cb - 1) / cb) < 2 * nthreads) cb = (cb + 1) / 2;
        int64_t nch = (nc + cb - 1) / cb, ntask = nr * nch;
        #pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+:bad)
        for (int64_t t = 0; t < ntask; t++) {
            int64_t gi = t / nch, gj0 = (t % nch) * cb, gj1 = gj0 + cb < nc ? gj0 + cb : nc;
            int64_t r0 = gi * gr, r1 = r0 + gr < N ? r0 + gr : N;
            bad += quant_chunk(w, dt, K, gc, r0, r1, gj0, gj1, q, scale + gi * nc);
        }
        return bad;
    }
    /* few large groups (per tensor): amax per (row, group column) in parallel over rows, reduce,
       then quantize in parallel over rows */
    uint32_t* ra = (uint32_t*)malloc(sizeof(uint32_t) * (size_t)(N * nc));
    if (!ra) return -1;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t j = 0; j < nc; j++) {
            int64_t c0 = j * gc, c1 = c0 + gc < K ? c0 + gc : K;
            ra[n * nc + j] = seg_amax(w, dt, n * K + c0, c1 - c0);
        }
    for (int64_t g = 0; g < ng; g++) {
        int64_t gi = g / nc, gj = g % nc, r1 = (gi + 1) * gr < N ? (gi + 1) * gr : N;
        uint32_t mx = 0;
        for (int64_t n = gi * gr; n < r1; n++) mx = ra[n * nc + gj] > mx ? ra[n * nc + gj] : mx;
        if (mx >= inf_bits(dt)) bad++;
        else scale[g] = fp8_scale_of(mx, dt);
    }
    free(ra);
    if (bad) return bad;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t j = 0; j < nc; j++) {
            int64_t c0 = j * gc, c1 = c0 + gc < K ? c0 + gc : K;
            seg_quant(w, dt, n * K + c0, c1 - c0, scale[(n / gr) * nc + j], q);
        }
    return 0;
}

/* fp8 grouped quantizer: w [N, K] contiguous (dt), groups gr x gc (partial edge groups), q [N, K]
   bytes, scale [ceil(N/gr), ceil(K/gc)] float32. Returns the number of groups holding Inf/NaN (the
   caller then uses the torch reference; q/scale are garbage) or -1 on allocation failure. */
int64_t oq_fp8_quantize(const void* w, int dt, int64_t N, int64_t K, int64_t gr, int64_t gc,
                        uint8_t* q, float* scale, int nthreads) {
    switch (dt) {  /* constant dt per instantiation: the loads are specialized */
    case 0: return quant_grid_dt(w, 0, N, K, gr, gc, q, scale, nthreads);
    case 1: return quant_grid_dt(w, 1, N, K, gr, gc, q, scale, nthreads);
    default: return quant_grid_dt(w, 2, N, K, gr, gc, q, scale, nthreads);
    }
}

/* The scalar converter, exported for the exhaustive tests: out[i] = e4m3(y[i]) (y pre-clamped). */
void oq_f32_to_e4m3(const float* y, int64_t n, int zero_fix, int vector, uint8_t* out) {
    int64_t i = 0;
#ifdef OQ_AVX512
    if (vector)
        for (; i + 16 <= n; i += 16) _mm_storeu_si128((__m128i*)(out + i), e4m3_16(_mm512_loadu_ps(y + i), zero_fix));
#endif
    for (; i < n; i++) out[i] = f32_to_e4m3(y[i], zero_fix);
}

/* ---------------------------------------------------------------------------------------------
   MXFP8 (oq_plugin_mxfp8.quant): blocks of 32 along K, e8m0 exponent bytes, elements saturate to
   +-448, -0.0 stays 0x80 (no zero point). mode 0 = rceil (torchao RCEIL, its float32 log2 rounding
   reproduced with integers as rceil_exponent), 1 = floor (OCP: floor(log2 amax) - 8).
   --------------------------------------------------------------------------------------------- */

/* biased e8m0 byte of clamp(ceil(fl32(log2(descale))), -127, 127) + 127; descale finite, >= 0 */
OQ_INLINE uint32_t mx_rceil_exponent(float descale) {
    uint32_t bits; memcpy(&bits, &descale, 4);
    int32_t biased = (int32_t)((bits >> 23) & 0xFFu), mant = (int32_t)(bits & 0x7FFFFFu), e;
    if (biased == 0) {
        int32_t sub_i = mant - (1 << 22);
        e = sub_i > 0 ? -126 - (2 * sub_i <= 22) : -127;
    } else {
        int32_t k = biased - 127, n = k > 0 ? k : -k - 1;
        int32_t limit = n >= 64 ? 22 : n >= 32 ? 11 : n >= 16 ? 5 : n >= 8 ? 2 : n >= 4 ? 1 : 0;
        e = mant == 0 ? k : k + 1 - (mant <= limit);
    }
    e = e < -127 ? -127 : (e > 127 ? 127 : e);
    return (uint32_t)(e + 127);
}

/* biased e8m0 byte of the floor rule from amax's float32 bits (finite) */
OQ_INLINE uint32_t mx_floor_exponent(uint32_t amax_bits) {
    int32_t e = (int32_t)((amax_bits >> 23) & 0xFFu) - 127 - 8;
    e = e < -127 ? -127 : (e > 128 ? 128 : e);
    return (uint32_t)(e + 127);
}

OQ_INLINE float f32_from_bits(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }

/* quantize nb consecutive blocks of 32 from element off; returns the number of blocks holding Inf/NaN */
OQ_INLINE int64_t mx_row(const void* w, int dt, int64_t off, int64_t nb, int mode, uint8_t* q, uint8_t* ex) {
    int64_t bad = 0;
    for (int64_t b = 0; b < nb; b++) {
        int64_t o = off + b * 32;
#ifdef OQ_AVX512
        __m512 x0 = load16(w, dt, o, (__mmask16)0xFFFF), x1 = load16(w, dt, o + 16, (__mmask16)0xFFFF);
        __m512i am = _mm512_set1_epi32(0x7FFFFFFF);
        uint32_t mx = _mm512_reduce_max_epu32(_mm512_max_epu32(_mm512_and_si512(_mm512_castps_si512(x0), am),
                                                               _mm512_and_si512(_mm512_castps_si512(x1), am)));
#else
        uint32_t mx = 0;
        for (int64_t i = 0; i < 32; i++) {
            float v = load1(w, dt, o + i); uint32_t vb; memcpy(&vb, &v, 4); vb &= 0x7FFFFFFFu;
            mx = vb > mx ? vb : mx;
        }
#endif
        if (mx >= 0x7F800000u) { bad++; continue; }
        uint32_t e;
        float f;  /* multiplier (rceil) or divisor (floor) */
        if (mode == 0) {
            e = mx_rceil_exponent(f32_from_bits(mx) / 448.0f);
            f = e == 0 ? 1.0f : f32_from_bits((254u - e < 1u ? 1u : 254u - e) << 23);
        } else {
            e = mx_floor_exponent(mx);
            f = f32_from_bits((e < 1u ? 1u : e) << 23);
        }
        ex[o / 32] = (uint8_t)e;
#ifdef OQ_AVX512
        __m512 s = _mm512_set1_ps(f), hi = _mm512_set1_ps(448.0f), lo = _mm512_set1_ps(-448.0f);
        __m512 y0 = mode == 0 ? _mm512_mul_ps(x0, s) : _mm512_div_ps(x0, s);
        __m512 y1 = mode == 0 ? _mm512_mul_ps(x1, s) : _mm512_div_ps(x1, s);
        y0 = _mm512_min_ps(_mm512_max_ps(y0, lo), hi);
        y1 = _mm512_min_ps(_mm512_max_ps(y1, lo), hi);
        _mm_storeu_si128((__m128i*)(q + o), e4m3_16(y0, 0));
        _mm_storeu_si128((__m128i*)(q + o + 16), e4m3_16(y1, 0));
#else
        for (int64_t i = 0; i < 32; i++) {
            float v = load1(w, dt, o + i), y = mode == 0 ? v * f : v / f;
            y = y > 448.0f ? 448.0f : (y < -448.0f ? -448.0f : y);
            q[o + i] = f32_to_e4m3(y, 0);
        }
#endif
    }
    return bad;
}

#ifdef OQ_AVX512
/* 16 lanes of mx_rceil_exponent (the same integer rules, lane by lane) */
OQ_INLINE __m512i mx_rceil_exponent16(__m512 descale) {
    const __m512i one = _mm512_set1_epi32(1), zero = _mm512_setzero_si512();
    __m512i bits = _mm512_castps_si512(descale);
    __m512i biased = _mm512_srli_epi32(bits, 23), mant = _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFF));
    __m512i k = _mm512_sub_epi32(biased, _mm512_set1_epi32(127));
    /* n = k > 0 ? k : -k - 1 (k = 0 gives 0 instead of -1: the same limit, 0) */
    __m512i n = _mm512_max_epi32(k, _mm512_sub_epi32(zero, _mm512_add_epi32(k, one)));
    __m512i limit = zero;
    limit = _mm512_mask_mov_epi32(limit, _mm512_cmpge_epi32_mask(n, _mm512_set1_epi32(4)), one);
    limit = _mm512_mask_mov_epi32(limit, _mm512_cmpge_epi32_mask(n, _mm512_set1_epi32(8)), _mm512_set1_epi32(2));
    limit = _mm512_mask_mov_epi32(limit, _mm512_cmpge_epi32_mask(n, _mm512_set1_epi32(16)), _mm512_set1_epi32(5));
    limit = _mm512_mask_mov_epi32(limit, _mm512_cmpge_epi32_mask(n, _mm512_set1_epi32(32)), _mm512_set1_epi32(11));
    limit = _mm512_mask_mov_epi32(limit, _mm512_cmpge_epi32_mask(n, _mm512_set1_epi32(64)), _mm512_set1_epi32(22));
    __m512i e = _mm512_add_epi32(k, one);
    e = _mm512_mask_sub_epi32(e, _mm512_cmple_epi32_mask(mant, limit), e, one);
    e = _mm512_mask_mov_epi32(e, _mm512_cmpeq_epi32_mask(mant, zero), k);
    __mmask16 sub = _mm512_cmpeq_epi32_mask(biased, zero);
    if (sub) {  /* subnormal descale */
        __m512i si = _mm512_sub_epi32(mant, _mm512_set1_epi32(1 << 22));
        __m512i es = _mm512_set1_epi32(-126);
        es = _mm512_mask_sub_epi32(es, _mm512_cmple_epi32_mask(_mm512_add_epi32(si, si), _mm512_set1_epi32(22)), es, one);
        es = _mm512_mask_mov_epi32(es, _mm512_cmple_epi32_mask(si, zero), _mm512_set1_epi32(-127));
        e = _mm512_mask_mov_epi32(e, sub, es);
    }
    e = _mm512_min_epi32(_mm512_max_epi32(e, _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));
    return _mm512_add_epi32(e, _mm512_set1_epi32(127));
}

/* Lane b of the result = max over the 16 lanes of v[b] (unsigned): a transpose-and-max tree,
   45 instructions for 16 horizontal reductions. */
OQ_INLINE __m512i hmax_epu32_16x16(const __m512i* v) {
    __m512i r[8], t[4], u[2];
    for (int i = 0; i < 8; i++)  /* per 128-bit lane: [max(a0,a2), max(b0,b2), max(a1,a3), max(b1,b3)] */
        r[i] = _mm512_max_epu32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)  /* per 128-bit lane: blocks 4i..4i+3, partial over that lane */
        t[i] = _mm512_max_epu32(_mm512_unpacklo_epi64(r[2 * i], r[2 * i + 1]), _mm512_unpackhi_epi64(r[2 * i], r[2 * i + 1]));
    for (int i = 0; i < 2; i++)
        u[i] = _mm512_max_epu32(_mm512_shuffle_i32x4(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_i32x4(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_max_epu32(_mm512_shuffle_i32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* 16 consecutive blocks of 32 (512 elements) from element o, all lanes at once: amax, exponents and
   multipliers as 16-lane vectors (mx_row does the same per block with scalar code). Returns 1 if a
   block holds Inf/NaN (outputs then undefined). */
OQ_INLINE int64_t mx_group16(const void* w, int dt, int64_t o, int mode, uint8_t* q, uint8_t* ex) {
    const __m512i am = _mm512_set1_epi32(0x7FFFFFFF), one = _mm512_set1_epi32(1);
    __m512i v[16];
    for (int b = 0; b < 16; b++) {
        OQ_PREFETCH(w, dt, o + 512 + 32 * b);
        OQ_PREFETCH(w, dt, o + 512 + 32 * b + 16);
        __m512i x0 = _mm512_castps_si512(load16(w, dt, o + 32 * b, (__mmask16)0xFFFF));
        __m512i x1 = _mm512_castps_si512(load16(w, dt, o + 32 * b + 16, (__mmask16)0xFFFF));
        v[b] = _mm512_max_epu32(_mm512_and_si512(x0, am), _mm512_and_si512(x1, am));
    }
    __m512i mx = hmax_epu32_16x16(v);
    if (_mm512_cmpge_epu32_mask(mx, _mm512_set1_epi32(0x7F800000))) return 1;
    __m512i e;
    __m512 f;  /* multiplier (rceil) or divisor (floor) per block */
    if (mode == 0) {
        e = mx_rceil_exponent16(_mm512_div_ps(_mm512_castsi512_ps(mx), _mm512_set1_ps(448.0f)));
        __m512i fe = _mm512_max_epi32(_mm512_sub_epi32(_mm512_set1_epi32(254), e), one);
        fe = _mm512_mask_mov_epi32(fe, _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512()), _mm512_set1_epi32(127));
        f = _mm512_castsi512_ps(_mm512_slli_epi32(fe, 23));
    } else {
        e = _mm512_sub_epi32(_mm512_srli_epi32(mx, 23), _mm512_set1_epi32(127 + 8));
        e = _mm512_min_epi32(_mm512_max_epi32(e, _mm512_set1_epi32(-127)), _mm512_set1_epi32(128));
        e = _mm512_add_epi32(e, _mm512_set1_epi32(127));
        f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_max_epi32(e, one), 23));
    }
    _mm_storeu_si128((__m128i*)(ex + o / 32), _mm512_cvtepi32_epi8(e));
    const __m512 hi = _mm512_set1_ps(448.0f), lo = _mm512_set1_ps(-448.0f);
    for (int b = 0; b < 16; b++) {
        __m512 s = _mm512_permutexvar_ps(_mm512_set1_epi32(b), f);
        __m512 x0 = load16(w, dt, o + 32 * b, (__mmask16)0xFFFF), x1 = load16(w, dt, o + 32 * b + 16, (__mmask16)0xFFFF);
        __m512 y0 = mode == 0 ? _mm512_mul_ps(x0, s) : _mm512_div_ps(x0, s);
        __m512 y1 = mode == 0 ? _mm512_mul_ps(x1, s) : _mm512_div_ps(x1, s);
        y0 = _mm512_min_ps(_mm512_max_ps(y0, lo), hi);
        y1 = _mm512_min_ps(_mm512_max_ps(y1, lo), hi);
        _mm_storeu_si128((__m128i*)(q + o + 32 * b), e4m3_16(y0, 0));
        _mm_storeu_si128((__m128i*)(q + o + 32 * b + 16), e4m3_16(y1, 0));
    }
    return 0;
}
#endif

OQ_INLINE int64_t mx_blocks(const void* w, int dt, int64_t nblocks, int mode, uint8_t* q, uint8_t* ex, int nthreads) {
    int64_t bad = 0, done = 0;
#ifdef OQ_AVX512
    int64_t ngroups = nblocks / 16;
    #pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+:bad)
    for (int64_t g = 0; g < ngroups; g++) bad += mx_group16(w, dt, g * 512, mode, q, ex);
    done = ngroups * 16;
#endif
    int64_t rest = nblocks - done, per = (rest + nthreads - 1) / nthreads;
    if (per < 64) per = 64;
    #pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+:bad)
    for (int64_t b0 = done; b0 < nblocks; b0 += per)
        bad += mx_row(w, dt, b0 * 32, (b0 + per < nblocks ? b0 + per : nblocks) - b0, mode, q, ex);
    return bad;
}

/* mxfp8 quantizer: w [N, K] contiguous (dt), K % 32 == 0, q [N, K] bytes, ex [N, K/32] e8m0 bytes.
   Blocks never straddle rows, so the tensor is processed as one flat run of N*K/32 blocks. Returns
   nonzero when a block holds Inf/NaN (the caller then uses the torch reference, or raises). */
int64_t oq_mxfp8_quantize(const void* w, int dt, int64_t N, int64_t K, int mode, uint8_t* q, uint8_t* ex, int nthreads) {
    int64_t nb = N * (K / 32);
    switch (dt) {  /* literal dt per call: the inlined block code is specialized per input format */
    case 0: return mx_blocks(w, 0, nb, mode, q, ex, nthreads);
    case 1: return mx_blocks(w, 1, nb, mode, q, ex, nthreads);
    default: return mx_blocks(w, 2, nb, mode, q, ex, nthreads);
    }
}
"""

_scratch = threading.local()


def _bind(lib) -> None:
    """Declare the ctypes signatures of every exported function (GEMV, dequantizer, quantizers)."""
    P, I, C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.oq_fp8_gemv.argtypes = [P, I, I, P, I, I, P, C, I, I, I, P, I, C]
    lib.oq_fp8_gemv.restype = None
    lib.oq_fp8_dequant_rows.argtypes = [P, I, I, I, P, C, I, I, I, P, C, C]
    lib.oq_fp8_dequant_rows.restype = None
    _bind_quantizers(lib)


LIBRARY = NativeLibrary("oq_fp8_cpu", C_HELPERS + C_SOURCE, bind=_bind)
"""The compiled kernels of this module (build, cache and ctypes loading: :mod:`oqcore.native`)."""


def load_library():
    """The compiled kernel library (a ``ctypes.CDLL``) or ``None``; compiles on first use.

    ``None`` when ``OQ_COMPILE=0`` is set or compiling failed (the reason is in :func:`kernel_status`).
    """
    return LIBRARY.load()


def kernel_status() -> tuple[bool, str]:
    """``(compiled kernel available, description)`` for backend reasons and reports."""
    ok, reason = LIBRARY.status()
    if ok:
        return True, "compiled C kernel (fused fp8 dequantize-and-GEMV, tiled dequantize + torch.mm)"
    if compile_disabled():
        return False, "OQ_COMPILE=0: eager torch tiles (slow)"
    return False, f"C kernel {reason}: eager torch tiles (slow)"


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


# ---------------------------------------------------------------------------------------------
# Quantizers (backend "cpu"): same bytes as oq_plugin_fp8.quant / oq_plugin_mxfp8.quant
# ---------------------------------------------------------------------------------------------

_DT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _bind_quantizers(lib) -> None:
    P, I, C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.oq_fp8_quantize.argtypes = [P, C, I, I, I, I, P, P, C]
    lib.oq_fp8_quantize.restype = I
    lib.oq_f32_to_e4m3.argtypes = [P, I, C, C, P]
    lib.oq_f32_to_e4m3.restype = None
    lib.oq_mxfp8_quantize.argtypes = [P, C, I, I, C, P, P, C]
    lib.oq_mxfp8_quantize.restype = I


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


def quantize_fp8_grouped(w: torch.Tensor, g, lib=None, *, check_finite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """C fp8 quantizer: ``w [..., R, C]`` (float32/bf16/fp16, CPU) -> ``(q float8_e4m3fn, scale float32)``,
    the bytes and layout of :func:`oq_plugin_fp8.quant.quantize_grouped` for grouping ``g``.

    Leading dims (experts) are quantized one ``[R, C]`` matrix at a time into one output stack. The
    torch reference runs instead when the kernel is unavailable (no compiler, ``OQ_COMPILE=0``), for
    other dtypes / devices / empty tensors, and for a matrix holding Inf or NaN (the kernel detects
    it in its amax) unless ``check_finite``, which raises :class:`oqcore.NonFiniteError` for such
    input on every path (the registered ``cpu`` quantizer: the core then skips its own pass).
    """
    from oq_plugin_fp8.quant import quantize_grouped

    lib = lib if lib is not None else load_library()
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
    dt, nthreads, esz = _DT_CODES[w.dtype], torch.get_num_threads(), w.element_size()
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


def fp8_cpu_quantizers() -> dict[str, tuple]:
    """Key name -> ``(quantize, dequantize)`` for the ``"cpu"`` quantizer backend (all six fp8 keys).

    Importing and registering compiles nothing: the kernel is built (or loaded from the cache) on
    the first call. Dequantization is the reference's (it is not on the load path)."""
    from oq_plugin_fp8.quant import GROUPINGS, TORCH_QUANTIZERS

    def make(g):
        """The registered quantize function for grouping ``g``."""

        def quantize(w: torch.Tensor, options=None) -> tuple[torch.Tensor, torch.Tensor]:
            """``w [N, K]`` / ``[E, N, K]`` -> ``(qdata float8_e4m3fn, scale float32)``; NonFiniteError for NaN/Inf."""
            return quantize_fp8_grouped(w, g, check_finite=True)

        quantize.__doc__ = f"C fp8 quantizer for {g}; bytes equal the torch reference (eager fallback); NonFiniteError for NaN/Inf."
        return quantize

    return {name: (make(g), TORCH_QUANTIZERS[name][1]) for name, g in GROUPINGS.items()}


def quantize_mxfp8(w: torch.Tensor, options=None, lib=None, *, check_finite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """C mxfp8 quantizer (backend ``"cpu"`` of oq-plugin-mxfp8): the bytes and layout of
    ``oq_plugin_mxfp8.quant.quantize_mxfp8`` (qdata float8_e4m3fn, scale float8_e8m0fnu
    ``[..., K/32]``) for both ``scale_mode`` s. The torch reference runs instead without the kernel,
    for other dtypes / devices / empty tensors, and for inputs holding Inf or NaN (unless
    ``check_finite``: then :class:`oqcore.NonFiniteError` on every path); K not divisible by 32
    raises the reference's error."""
    from oq_plugin_mxfp8.quant import MX_BLOCK, _mode
    from oq_plugin_mxfp8.quant import quantize_mxfp8 as reference

    lib = lib if lib is not None else load_library()
    if lib is None or w.dim() < 1 or w.numel() == 0 or w.dtype not in _DT_CODES or w.device.type != "cpu" or w.shape[-1] % MX_BLOCK:
        _fallback(w, check_finite)
        return reference(w, options)
    mode = 1 if _mode(options) == "floor" else 0
    w = w.contiguous()
    k = w.shape[-1]
    n = w.numel() // k
    q = torch.empty(w.shape, dtype=torch.uint8)
    e = torch.empty(*w.shape[:-1], k // MX_BLOCK, dtype=torch.uint8)
    bad = lib.oq_mxfp8_quantize(w.data_ptr(), _DT_CODES[w.dtype], n, k, mode, q.data_ptr(), e.data_ptr(), torch.get_num_threads())
    if bad != 0:
        if check_finite:
            raise _nonfinite(w)
        return reference(w, options)
    return q.view(torch.float8_e4m3fn), e.view(torch.float8_e8m0fnu)


def quantize_mxfp8_checked(w: torch.Tensor, options=None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_mxfp8` with ``check_finite=True``: the registered ``cpu`` quantizer of oq-plugin-mxfp8."""
    return quantize_mxfp8(w, options, check_finite=True)

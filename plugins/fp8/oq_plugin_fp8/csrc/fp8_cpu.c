/* fp8_cpu.c: CPU kernels of oq-plugin-fp8 (built and loaded by oq_plugin_fp8.cpu).

   - oq_fp8_gemv / oq_fp8_dequant_rows: float8_e4m3fn weights q [N, K] with a scale grid (float32,
     or e8m0 exponent bytes for MX), fused dequantize-and-GEMV and row dequantization;
   - oq_fp8_quantize: the fp8 grouped quantizer, bit-exact with oq_plugin_fp8.quant;
   - oq_fp8_quantize_scaled: the same with the scales given (an externally reduced amax);
   - oq_f32_to_e4m3: the scalar/vector float32 -> e4m3 converter, exported for the exhaustive tests.

   Shared helpers (OQ_INLINE, OQ_AVX512, load1/load16/tailmask, half_to_f32, OQ_PREFETCH) come from
   oq_kernels.h (oq-toolkit), the e4m3 encoder from fp8_e4m3.h (next to this file). */
#include <stdlib.h>

#include "oq_kernels.h"
#include "fp8_e4m3.h"

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
   references of oq_plugin_fp8.quant. No -ffast-math: every float op below is one IEEE float32
   operation (division stays division), rounding is done with integers.
   dt: 0 = float32, 1 = bf16, 2 = fp16.
   --------------------------------------------------------------------------------------------- */

/* Absolute-value bits in the input's own format: for non-negative IEEE values integer order is
   numeric order (and NaN > Inf > every finite value), so max |w| is an integer max. */
OQ_INLINE uint32_t abs_bits1(const void* w, int dt, int64_t i) {
    if (dt == 0) return ((const uint32_t*)w)[i] & 0x7FFFFFFFu;
    return ((const uint16_t*)w)[i] & 0x7FFFu;
}
OQ_INLINE uint32_t inf_bits(int dt) { return dt == 0 ? 0x7F800000u : (dt == 1 ? 0x7F80u : 0x7C00u); }

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

/* seg_quant that also reports Inf/NaN input (returns 1 then; the bytes are undefined): the pass of
   oq_fp8_quantize_scaled, which has no amax pass of its own to find them in */
OQ_INLINE int seg_quant_chk(const void* w, int dt, int64_t off, int64_t len, float scale, uint8_t* q) {
    int64_t i = 0;
    int bad = 0;
#ifdef OQ_AVX512
    __m512 s = _mm512_set1_ps(scale), hi = _mm512_set1_ps(448.0f), lo = _mm512_set1_ps(-448.0f);
    __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF), inf = _mm512_set1_epi32(0x7F800000);
    __mmask16 nf = 0;
    for (; i < len; i += 16) {
        __mmask16 m = tailmask(len - i);
        OQ_PREFETCH(w, dt, off + i + OQ_PREFETCH_AHEAD);
        __m512 x = load16(w, dt, off + i, m);  /* exact: bf16/fp16 Inf/NaN stay Inf/NaN */
        nf |= _mm512_cmpge_epu32_mask(_mm512_and_si512(_mm512_castps_si512(x), absmask), inf);
        __m512 y = _mm512_div_ps(x, s);
        y = _mm512_min_ps(_mm512_max_ps(y, lo), hi);
        _mm_mask_storeu_epi8(q + off + i, m, e4m3_16(y, 1));
    }
    bad = nf != 0;
#endif
    for (; i < len; i++) {
        if (abs_bits1(w, dt, off + i) >= inf_bits(dt)) bad = 1;
        float y = load1(w, dt, off + i) / scale;
        y = y > 448.0f ? 448.0f : (y < -448.0f ? -448.0f : y);
        q[off + i] = f32_to_e4m3(y, 1);
    }
    return bad;
}

OQ_INLINE int64_t quant_scaled_dt(const void* w, int dt, int64_t N, int64_t K, int64_t gr, int64_t gc,
                                  const float* scale, uint8_t* q, int nthreads) {
    int64_t nc = (K + gc - 1) / gc, bad = 0;
    #pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+:bad)
    for (int64_t n = 0; n < N; n++)
        for (int64_t j = 0; j < nc; j++) {
            int64_t c0 = j * gc, c1 = c0 + gc < K ? c0 + gc : K;
            bad += seg_quant_chk(w, dt, n * K + c0, c1 - c0, scale[(n / gr) * nc + j], q);
        }
    return bad;
}

/* fp8 grouped quantizer with GIVEN scales (tensor parallelism: the scales of the whole tensor,
   computed by the caller from an all-reduced amax): w [N, K] contiguous (dt), groups gr x gc,
   scale [ceil(N/gr), ceil(K/gc)] float32 (finite, > 0), q [N, K] bytes: the second pass of
   oq_fp8_quantize alone. Returns nonzero when w holds Inf/NaN (q is then garbage). */
int64_t oq_fp8_quantize_scaled(const void* w, int dt, int64_t N, int64_t K, int64_t gr, int64_t gc,
                               const float* scale, uint8_t* q, int nthreads) {
    switch (dt) {
    case 0: return quant_scaled_dt(w, 0, N, K, gr, gc, scale, q, nthreads);
    case 1: return quant_scaled_dt(w, 1, N, K, gr, gc, scale, q, nthreads);
    default: return quant_scaled_dt(w, 2, N, K, gr, gc, scale, q, nthreads);
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

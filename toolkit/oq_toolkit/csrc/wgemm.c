/* wgemm.c: fused CPU GEMM for 8-bit and 4-bit weights (built and loaded by oq_toolkit.wgemm).

   y[m, n] = wmul * sum_k A(m, k) * W(n, k) (+ bias[n]), float32 or bf16 [M, N], with A = dec(a) * sa,
   W = dec(q) * sw (epilogue: one float32 multiply by wmul when it is not 1, one float32 add of the
   bias, then one round-to-nearest-even to bf16 when asked, bit-identical to torch's
   (y + bias).to(torch.bfloat16); out1 / out16):
   - a [M, K]: bf16 activations, or 8-bit codes (e4m3 / int8) of quantized activations;
   - q [N, K]: e4m3 or int8 weight codes, or [N, K/2] packed e2m1 codes (FMT_E2M1: element 2j in
     the low nibble of byte j);
   - sa / sw: scale grids, float32 (applied per K-chunk to the fp32 partial sums) or e8m0 bytes
     (folded into the decoded bf16 values, exact; a byte whose power of two would leave bf16's
     normal range makes oq_wgemm return -2 and the caller retries with float32 scales), or e4m3
     bytes (SK_E4M3, e2m1 weights only: folded, exact).

   Every decoded value (e4m3 code, int8 code, bf16, times a power of two in range) is exact in
   bf16, so each product is exact in fp32; accumulation is fp32 over a K-chunk (a run of K inside
   one float32 scale group of both operands), then acc += partial * (sa * sw). The bf16 dot
   product instructions treat subnormal bf16 inputs / fp32 results as zero (values below 2^-126).

   Paths (one per call, chosen by oq_wgemm's `path`, 0 = best available):
   1 AMX-BF16: the weight is the AMX A operand (rows n x 32 k bf16 decoded into a per-thread
     panel), the activations are packed once per call into VNNI B tiles (B[k/2][m][k%2]); C tiles
     are y^T, written out through 16x16 register transposes. M <= 16: 64-row panels, four C
     accumulators, K-chunks side by side in column slots (amx_small; 9 <= M <= 16 with K-chunks:
     amx_pipe32); larger M: 2 x 2 C tiles per 32 rows x 32 m, chunk scaling pipelined behind the
     next chunk (amx_mblock; one chunk and K <= 512: amx_rows32). Needs
     __AMX_BF16__ at build time and the Linux XTILEDATA permission at run time.
   2 AVX512-BF16: vdpbf16ps, weight rows decoded once per 4-row block into an L1 buffer and reused
     for every row of M (register block 4 n x up to 4 m).
   3 portable C (also what -DOQ_GENERIC builds have): float32 loops, same chunking.
   e2m1 weights decode through per-scale 16-entry bf16 tables (E2M1_LUT_*) on paths 1 and 2; for
   M <= E2M1_GEMV_MAX_M path 2 runs run_e2m1_gemv (decode in registers, no decoded row stored). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "oq_kernels.h"

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(OQ_AVX512) && defined(__AVX512BF16__)
#define WG_BF16 1
#endif
#if defined(WG_BF16) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__) && defined(SYS_arch_prctl)
#define WG_AMX 1
#endif

enum { FMT_BF16 = 0, FMT_E4M3 = 1, FMT_INT8 = 2, FMT_E2M1 = 3 };
enum { SK_NONE = 0, SK_F32 = 1, SK_E8M0 = 2, SK_E4M3 = 3 };
enum { PATH_AUTO = 0, PATH_AMX = 1, PATH_BF16 = 2, PATH_SCALAR = 3 };

/* e2m1 weights: the AVX512-BF16 path runs the in-register decode (run_e2m1_gemv) up to this M,
   and PATH_AUTO picks it over AMX up to E2M1_AUTO_MAX_M (measured, see oq_toolkit.wgemm) */
#define E2M1_GEMV_MAX_M 4
#define E2M1_AUTO_MAX_M 3

typedef struct {
    int64_t M, N, K, Kp;           /* Kp: K rounded up to 32 */
    const void* a; int a_fmt;
    const void* as; int as_kind; int64_t ar, ac, ald;
    const uint8_t* q; int q_fmt;
    const void* ws; int ws_kind; int64_t gr, gc, wld;
    void* y;                       /* float32 or bf16 (out_bf16) [M, N], row stride N */
    const float* bias;             /* float32 [N] added to every row, or NULL */
    int out_bf16;                  /* 1: y is bf16, each value rounded once (to nearest even) */
    int64_t nck;                   /* K-chunks: [ck0[c], ck1[c]), float32 scale columns acol[c] / wcol[c] */
    const int64_t *ck0, *ck1, *acol, *wcol;
    const int64_t* arow;           /* (m / ar) * ald per row of M (float32 activation scales) */
    int* bad;                      /* set when an e8m0 scale cannot be folded exactly (vector paths) */
    float wmul;                    /* multiplier of every float32 sum before the bias (1: none) */
} WG;

/* ---------------------------------------------------------------------------------------------
   Scalar helpers (exact) */

static inline float f32_bits(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }

/* float8_e4m3fn byte -> float32, exact (the NaN codes 0x7F/0xFF are not weight or activation codes) */
static inline float dec_e4m3(uint8_t b) {
    uint32_t mag = b & 0x7Fu;
    float f = mag < 8 ? (float)mag * 0.001953125f : f32_bits((mag << 20) + (120u << 23));
    return (b & 0x80u) ? -f : f;
}

static inline float dec_code(uint8_t b, int fmt) { return fmt == FMT_INT8 ? (float)(int8_t)b : dec_e4m3(b); }

/* e2m1 code (low 4 bits) -> float32: magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6, sign bit 3 */
static const float E2M1_F32[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f, -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

/* Element k of row `row` of a [rows, K] operand of format fmt (E2M1: K/2 bytes per row, element
   2j in the low nibble of byte j) -> float32, exact */
static inline float dec_at(const uint8_t* base, int fmt, int64_t K, int64_t row, int64_t k) {
    if (fmt != FMT_E2M1) return dec_code(base[row * K + k], fmt);
    uint8_t b = base[row * (K / 2) + k / 2];
    return E2M1_F32[(k & 1) ? b >> 4 : b & 15];
}

/* e8m0 byte -> float32: 2^(e-127), byte 0 -> 2^-126 (oq_plugin_mxfp8.quant.exponent_to_scale) */
static inline float e8m0_f32(uint8_t e) { return f32_bits(e == 0 ? 0x00800000u : (e == 255 ? 0x7FC00000u : (uint32_t)e << 23)); }

/* Scale of element (r, k) of a grid (rows per group g_r, cols per group g_c, row stride ld) as
   float32; 1 for SK_NONE. */
static inline float grid_f32(const void* s, int kind, int64_t gr_, int64_t gc_, int64_t ld, int64_t r, int64_t k) {
    if (kind == SK_NONE) return 1.0f;
    int64_t i = (r / gr_) * ld + k / gc_;
    if (kind == SK_E4M3) return dec_e4m3(((const uint8_t*)s)[i]);
    return kind == SK_F32 ? ((const float*)s)[i] : e8m0_f32(((const uint8_t*)s)[i]);
}

/* The end of the K-chunk starting at k0: the next float32 scale-group boundary of either operand */
static inline int64_t chunk_end(const WG* p, int64_t k0) {
    int64_t e = p->K;
    if (p->as_kind == SK_F32 && p->ac < p->K) { int64_t b = (k0 / p->ac + 1) * p->ac; if (b < e) e = b; }
    if (p->ws_kind == SK_F32 && p->gc < p->K) { int64_t b = (k0 / p->gc + 1) * p->gc; if (b < e) e = b; }
    return e;
}

/* float32 scale of activation row m / weight row offset wro (= (n / gr) * wld) in chunk c; 1 without */
static inline float sa_at(const WG* p, int64_t m, int64_t c) {
    return p->as_kind == SK_F32 ? ((const float*)p->as)[p->arow[m] + p->acol[c]] : 1.0f;
}
static inline float sw_at(const WG* p, int64_t wro, int64_t c) {
    return p->ws_kind == SK_F32 ? ((const float*)p->ws)[wro + p->wcol[c]] : 1.0f;
}

/* float32 -> bf16 bits, round to nearest even, subnormals kept, every NaN -> 0xFFFF: what
   torch's vectorized tensor conversion .to(torch.bfloat16) writes (ATen cvtfp32_bf16; only its
   scalar c10 path, e.g. a 0-dim tensor, writes 0x7FC0), so bit-identical to it */
static inline uint16_t f32_to_bf16_rne(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    if ((b & 0x7FFFFFFFu) > 0x7F800000u) return 0xFFFF;
    return (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

/* The epilogue of one output element: y[m, n] = v (+ bias[n]), as float32 or bf16 */
static inline void out1(const WG* p, int64_t m, int64_t n, float v) {
    if (p->wmul != 1.0f) v *= p->wmul;
    if (p->bias) v += p->bias[n];
    if (p->out_bf16) ((uint16_t*)p->y)[m * p->N + n] = f32_to_bf16_rne(v);
    else ((float*)p->y)[m * p->N + n] = v;
}

/* Growable per-thread buffers (64-byte aligned), kept across calls: no allocation per call */
static void* tls_buf(int slot, size_t bytes) {
    static __thread void* ptr[7];
    static __thread size_t cap[7];
    if (cap[slot] < bytes) {
        free(ptr[slot]);
        size_t sz = (bytes + 63) & ~(size_t)63;
        ptr[slot] = aligned_alloc(64, sz);
        cap[slot] = ptr[slot] ? sz : 0;
    }
    return ptr[slot];
}

/* ---------------------------------------------------------------------------------------------
   Portable path */

static int run_scalar(const WG* p, int nthreads) {
    const int64_t M = p->M, N = p->N, K = p->K;
    float* af = (float*)tls_buf(0, (size_t)M * K * 4);
    if (!af) return -1;
    /* decoded activations, e8m0 scales folded (exact), float32 scales left to the chunks */
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) {
            float v = p->a_fmt == FMT_BF16 ? bits_to_f32(((const uint16_t*)p->a)[m * K + k], 1)
                                           : dec_code(((const uint8_t*)p->a)[m * K + k], p->a_fmt);
            if (p->as_kind == SK_E8M0) v *= grid_f32(p->as, SK_E8M0, p->ar, p->ac, p->ald, m, k);
            af[m * K + k] = v;
        }
    int fail = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        float* w = (float*)tls_buf(1, (size_t)K * 4);
        if (!w) {
            #pragma omp atomic write
            fail = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            if (!w) continue;
            for (int64_t k = 0; k < K; k++) {
                float v = dec_at(p->q, p->q_fmt, K, n, k);
                /* e8m0 and e4m3 (E2M1 weights only) scales folded: products of <= 6 significant bits, exact */
                if (p->ws_kind == SK_E8M0 || p->ws_kind == SK_E4M3) v *= grid_f32(p->ws, p->ws_kind, p->gr, p->gc, p->wld, n, k);
                w[k] = v;
            }
            for (int64_t m = 0; m < M; m++) {
                const float* x = af + m * K;
                float tot = 0.0f;
                for (int64_t c = 0; c < p->nck; c++) {
                    float acc = 0.0f;
                    for (int64_t k = p->ck0[c]; k < p->ck1[c]; k++) acc += x[k] * w[k];
                    tot += acc * (sa_at(p, m, c) * sw_at(p, (n / p->gr) * p->wld, c));
                }
                out1(p, m, n, tot);
            }
        }
    }
    return fail ? -1 : PATH_SCALAR;
}

#ifdef WG_BF16
/* ---------------------------------------------------------------------------------------------
   AVX-512 decode of 32 codes -> 32 bf16 (16-bit lanes), exact */

static inline __m512i subnormal_table(void) {
    /* bf16 bits of mag * 2^-9 for the e4m3 subnormal magnitudes 0..7 (lanes 8..31 unused) */
    uint16_t t[32] __attribute__((aligned(64))) = {0};
    for (int i = 1; i < 8; i++) { float f = (float)i * 0.001953125f; uint32_t b; memcpy(&b, &f, 4); t[i] = (uint16_t)(b >> 16); }
    return _mm512_load_si512(t);
}

/* r codes (r >= 1; lanes past r are 0) of format fmt at p -> bf16; fold: add delta to the
   exponent of every nonzero value (e8m0 scale 2^delta, in range: exact) */
static inline __m512i dec32(const uint8_t* p, int64_t r, int fmt, __m512i sub_tab, int fold, int delta) {
    __mmask32 m = r >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << r) - 1u);
    __m256i raw = _mm256_maskz_loadu_epi8(m, p);
    __m512i out;
    if (fmt == FMT_INT8) {
        __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(raw)));
        __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(raw, 1)));
        out = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
        if (fold) {
            __mmask32 nz = _mm512_test_epi16_mask(out, _mm512_set1_epi16(0x7FFF));
            out = _mm512_mask_add_epi16(out, nz, out, _mm512_set1_epi16((short)(delta * 128)));
        }
        return out;
    }
    __m512i v = _mm512_cvtepu8_epi16(raw);
    /* normals: exponent rebias 7 -> 127 in bf16 bits: (mag << 4) + (120 << 7) */
    __m512i r16 = _mm512_add_epi16(_mm512_and_si512(_mm512_slli_epi16(v, 4), _mm512_set1_epi16(0x07F0)),
                                   _mm512_set1_epi16(120 << 7));
    __mmask32 sub = _mm512_testn_epi16_mask(v, _mm512_set1_epi16(0x78)); /* mag < 8: table (index = low 5 bits = mag) */
    r16 = _mm512_mask_permutexvar_epi16(r16, sub, v, sub_tab);
    if (fold) {
        __mmask32 nz = _mm512_test_epi16_mask(v, _mm512_set1_epi16(0x7F));
        r16 = _mm512_mask_add_epi16(r16, nz, r16, _mm512_set1_epi16((short)(delta * 128)));
    }
    /* sign: r | ((v << 8) & 0x8000) */
    return _mm512_ternarylogic_epi32(r16, _mm512_slli_epi16(v, 8), _mm512_set1_epi16((short)0x8000), 0xF8);
}

/* ---------------------------------------------------------------------------------------------
   e2m1 (4-bit) weights: 32 codes (16 bytes, element 2j in the low nibble of byte j) -> 32 bf16
   through a 16-entry table per 16 elements, vpermw. The tables are the bf16 values of
   e2m1(c) * scale for every scale byte (e8m0: 2^(e-127); e4m3: the float8_e4m3fn value): both
   products are exact in bf16 (<= 2 + 4 significant bits; e8m0 bytes 2..252 keep every nonzero
   product a normal bf16, other bytes set *bad; e4m3 products lie in [2^-10, 2688]). */

static uint16_t E2M1_LUT_E8M0[256][16] __attribute__((aligned(64)));
static uint16_t E2M1_LUT_E4M3[256][16] __attribute__((aligned(64)));

/* the scale of an e4m3 grid byte (0x7F / 0xFF: NaN) */
static inline float e4m3_scale_f32(uint8_t b) { return (b & 0x7Fu) == 0x7Fu ? f32_bits(0x7FC00000u) : dec_e4m3(b); }

__attribute__((constructor)) static void e2m1_tables(void) {
    for (int b = 0; b < 256; b++)
        for (int c = 0; c < 16; c++) {
            E2M1_LUT_E8M0[b][c] = f32_to_bf16_rne(E2M1_F32[c] * e8m0_f32((uint8_t)b));
            E2M1_LUT_E4M3[b][c] = f32_to_bf16_rne(E2M1_F32[c] * e4m3_scale_f32((uint8_t)b));
        }
}

static inline int e8m0_e2m1_bad(uint8_t e) { return e < 2 || e > 252; }

/* Group bookkeeping of a weight row's scale grid along K in steps of 32 (group size gc, a
   multiple of 16 or >= K): g = group of element k, in = k - (start of g) */
typedef struct { int64_t g, in, gc, K; } GPos;

static inline GPos gpos_at(int64_t k0, int64_t gc, int64_t K) { GPos r = {k0 / gc, k0 % gc, gc, K}; return r; }

/* the groups of elements k and k + 16 (the second half of the 32; the first past K: same group) */
static inline __attribute__((always_inline)) int64_t gpos_g1(const GPos* s, int64_t k) {
    return (s->in + 16 >= s->gc && k + 16 < s->K) ? s->g + 1 : s->g;
}

static inline __attribute__((always_inline)) void gpos_step(GPos* s) {
    s->in += 32;
    while (s->in >= s->gc) { s->in -= s->gc; s->g++; }
}

/* The mode of a folded e2m1 weight grid (see e2m1_dec32): 0 no folded scale, 1 one scale byte
   per 32 codes (group size a multiple of 32, or the whole K), 2 two (a multiple of 16 only); 3 and
   4: modes 1 and 2 with groups of exactly 32 / 16 (mxfp4 / nvfp4: group index k / 32 or k / 16) */
static inline int e2m1_mode(int skind, int64_t gc, int64_t K) {
    if (skind != SK_E8M0 && skind != SK_E4M3) return 0;
    if (gc % 32 == 0 || gc >= K) return gc == 32 ? 3 : 1;
    return gc == 16 ? 4 : 2;
}

/* 32 codes k..k+31 (k < K, k % 32 == 0) of an e2m1 row (src: its bytes, srow: its scale bytes,
   gp: the group position of k) -> bf16 with the scales folded. mode is a compile-time constant
   at every call (always inlined). */
static inline __attribute__((always_inline)) __m512i e2m1_dec32(const uint8_t* src, const uint8_t* srow, const uint16_t (*lut)[16],
                                                                 const int mode, int64_t k, int64_t K, const GPos* gp, const int full) {
    __m512i t;
    if (mode == 0) {
        t = _mm512_broadcast_i64x4(_mm256_load_si256((const __m256i*)E2M1_LUT_E8M0[127]));
    } else {
        const int64_t g0 = mode == 3 ? k >> 5 : mode == 4 ? k >> 4 : gp->g;
        if (mode == 1 || mode == 3) {
            t = _mm512_broadcast_i64x4(_mm256_load_si256((const __m256i*)lut[srow[g0]]));
        } else { /* two tables, no test of equality (a data-dependent branch) */
            const int64_t g1 = mode == 4 ? (k + 16 < K ? g0 + 1 : g0) : gpos_g1(gp, k);
            t = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_load_si256((const __m256i*)lut[srow[g0]])),
                                   _mm256_load_si256((const __m256i*)lut[srow[g1]]), 1);
        }
    }
    /* full: k + 32 <= K known at the call (no test) */
    __m128i raw = full || k + 32 <= K ? _mm_loadu_si128((const __m128i*)(src + (k >> 1)))
                                      : _mm_maskz_loadu_epi8((__mmask16)((1u << ((K - k) >> 1)) - 1u), src + (k >> 1));
    __m512i v = _mm512_cvtepu8_epi32(raw); /* byte j -> dword j */
    /* dword j = (b & 15) | (b >> 4) << 16: word 2j = element 2j, word 2j + 1 = element 2j + 1 */
    __m512i idx;
    if (mode == 2 || mode == 4) { /* bit 4 of each word selects the half of the table */
        idx = _mm512_ternarylogic_epi32(v, _mm512_slli_epi32(v, 12), _mm512_set1_epi32(0x000F000F), 0xA8); /* (A | B) & C */
        idx = _mm512_or_si512(idx, _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi32(0x00100010), 1));
    } else { /* both halves of the table are the same: bit 4 is don't-care */
        idx = _mm512_or_si512(v, _mm512_slli_epi32(v, 12));
    }
    return _mm512_permutexvar_epi16(idx, t);
}

/* 1 when an e8m0 scale byte of [k0, k1) of a weight row cannot be folded into e2m1 values exactly */
static inline int e2m1_span_bad(const uint8_t* srow, int64_t k0, int64_t k1, int64_t gc, int64_t K) {
    int bad = 0;
    const int64_t e = (k1 < K ? k1 : K) - 1;
    for (int64_t j = k0 / gc; j <= e / gc; j++) bad |= (uint8_t)(srow[j] - 2) > 250;
    return bad;
}

static inline __attribute__((always_inline)) void dec_span_e2m1_m(const uint8_t* src, const uint8_t* srow, const uint16_t (*lut)[16], const int mode,
                                                                  int64_t K, int64_t k0, int64_t k1, int64_t g_c, uint16_t* out, int64_t ostep) {
    GPos gp = gpos_at(k0, mode ? g_c : K + 32, K);
    for (int64_t k = k0; k < k1; k += 32, gpos_step(&gp)) {
        if ((k & 127) == 0) __builtin_prefetch(src + k / 2 + 1024, 0, 3);
        __m512i v = k < K ? e2m1_dec32(src, srow, lut, mode, k, K, &gp, 0) : _mm512_setzero_si512();
        _mm512_storeu_si512(out + ((k - k0) / 32) * ostep, v);
    }
}

/* Values [k0, k1) (multiples of 32) of e2m1 row `row` as bf16, scales folded (see dec_span) */
static inline void dec_span_e2m1(const uint8_t* base, int64_t row, int64_t K, int64_t k0, int64_t k1, const void* s, int skind,
                                 int64_t g_r, int64_t g_c, int64_t ld, uint16_t* out, int64_t ostep, int* bad) {
    const uint8_t* src = base + row * (K / 2);
    const int mode = e2m1_mode(skind, g_c, K);
    const uint8_t* srow = mode ? (const uint8_t*)s + (row / g_r) * ld : NULL;
    const uint16_t (*lut)[16] = skind == SK_E4M3 ? E2M1_LUT_E4M3 : E2M1_LUT_E8M0;
    if (skind == SK_E8M0 && k0 < K && e2m1_span_bad(srow, k0, k1, g_c, K)) *bad = 1;
    switch (mode) {
    case 0: dec_span_e2m1_m(src, srow, lut, 0, K, k0, k1, g_c, out, ostep); break;
    case 1: dec_span_e2m1_m(src, srow, lut, 1, K, k0, k1, g_c, out, ostep); break;
    case 2: dec_span_e2m1_m(src, srow, lut, 2, K, k0, k1, g_c, out, ostep); break;
    case 3: dec_span_e2m1_m(src, srow, lut, 3, K, k0, k1, g_c, out, ostep); break;
    default: dec_span_e2m1_m(src, srow, lut, 4, K, k0, k1, g_c, out, ostep); break;
    }
}

/* Row `row` (of `rows` valid) of an operand as Kp bf16 values at out: codes decoded (e8m0 folded)
   or bf16 copied; zeros past K, and a zero row past `rows`. */
static inline void dec_span(const void* base, int fmt, int64_t row, int64_t rows, int64_t K, int64_t k0, int64_t k1,
                            const void* s, int skind, int64_t g_r, int64_t g_c, int64_t ld, __m512i tab, uint16_t* out,
                            int64_t ostep, int* bad) {
    /* values [k0, k1) of the row (k0, k1 multiples of 32); block k / 32 goes to out + ((k - k0) / 32) * ostep */
    if (row >= rows) {
        for (int64_t k = k0; k < k1; k += 32) _mm512_storeu_si512(out + ((k - k0) / 32) * ostep, _mm512_setzero_si512());
        return;
    }
    if (fmt == FMT_E2M1) {
        dec_span_e2m1((const uint8_t*)base, row, K, k0, k1, s, skind, g_r, g_c, ld, out, ostep, bad);
        return;
    }
    if (fmt == FMT_BF16) {
        const uint16_t* src = (const uint16_t*)base + row * K;
        for (int64_t k = k0; k < k1; k += 32) {
            int64_t r = K - k;
            __mmask32 m = r >= 32 ? (__mmask32)0xFFFFFFFFu : (r <= 0 ? 0 : (__mmask32)((1u << r) - 1u));
            _mm512_storeu_si512(out + ((k - k0) / 32) * ostep, _mm512_maskz_loadu_epi16(m, src + k));
        }
        return;
    }
    const uint8_t* src = (const uint8_t*)base + row * K;
    const uint8_t* srow = skind == SK_E8M0 ? (const uint8_t*)s + (row / g_r) * ld : NULL;
    int64_t g = srow ? k0 / g_c : 0, in_g = srow ? k0 % g_c : 0; /* group of k, position in it (no division per step) */
    for (int64_t k = k0; k < k1; k += 32, in_g += 32) {
        if (in_g >= g_c) { g++; in_g = 0; }
        int delta = srow ? (int)srow[g] - 127 : 0;
        /* decoded exponents are -9..8 (e4m3) / 0..7 (int8): 2^delta keeps them normal bf16 (byte 255 = NaN is out too) */
        if (delta < -117 || delta > 119) *bad = 1;
        /* software prefetch 1 KB ahead: the hardware prefetcher alone leaves this stream stalled
           on memory (as measured for the fp8 GEMV, oq_kernels.h OQ_PREFETCH) */
        __builtin_prefetch(src + k + 1024, 0, 3);
        __m512i v = k < K ? dec32(src + k, K - k, fmt, tab, srow != NULL, delta) : _mm512_setzero_si512();
        _mm512_storeu_si512(out + ((k - k0) / 32) * ostep, v);
    }
}

/* Row `row` (of `rows` valid) of an operand as Kp bf16 values: codes decoded (e8m0 folded) or
   bf16 copied; zeros past K, and a zero row past `rows`. Block k / 32 at out + (k / 32) * ostep. */
static inline void dec_row(const void* base, int fmt, int64_t row, int64_t rows, int64_t K, int64_t Kp,
                           const void* s, int skind, int64_t g_r, int64_t g_c, int64_t ld, __m512i tab, uint16_t* out, int64_t ostep, int* bad) {
    dec_span(base, fmt, row, rows, K, 0, Kp, s, skind, g_r, g_c, ld, tab, out, ostep, bad);
}

/* ---------------------------------------------------------------------------------------------
   AVX512-BF16 path: 4 weight rows decoded per block, register block 4 n x MB m */

static inline __attribute__((always_inline)) void bf16_block(const WG* p, int MB, const uint16_t* wb, const uint16_t* ab,
                                                             int64_t n0, int64_t m0) {
    const int64_t Kp = p->Kp, N = p->N, M = p->M;
    __m512 tot[4][4];
    for (int i = 0; i < 4; i++) for (int j = 0; j < MB; j++) tot[i][j] = _mm512_setzero_ps();
    int64_t wro[4];
    for (int i = 0; i < 4; i++) wro[i] = ((n0 + i < N ? n0 + i : 0) / p->gr) * p->wld;
    for (int64_t c = 0; c < p->nck; c++) {
        int64_t k0 = p->ck0[c], k1 = p->ck1[c];
        __m512 acc[4][4];
        for (int i = 0; i < 4; i++) for (int j = 0; j < MB; j++) acc[i][j] = _mm512_setzero_ps();
        for (int64_t k = k0; k < k1; k += 32) {
            __m512bh w[4], x[4];
            for (int i = 0; i < 4; i++) w[i] = (__m512bh)_mm512_loadu_si512(wb + i * Kp + k);
            for (int j = 0; j < MB; j++) x[j] = (__m512bh)_mm512_loadu_si512(ab + (m0 + j) * Kp + k);
            for (int i = 0; i < 4; i++) for (int j = 0; j < MB; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], w[i], x[j]);
        }
        for (int i = 0; i < 4; i++) {
            float sw = sw_at(p, wro[i], c);
            for (int j = 0; j < MB; j++)
                tot[i][j] = _mm512_fmadd_ps(acc[i][j], _mm512_set1_ps(sa_at(p, m0 + j < M ? m0 + j : 0, c) * sw), tot[i][j]);
        }
    }
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < MB; j++)
            if (n0 + i < N && m0 + j < M) out1(p, m0 + j, n0 + i, _mm512_reduce_add_ps(tot[i][j]));
}

static int run_bf16(const WG* p, int nthreads) {
    const int64_t M = p->M, N = p->N, Kp = p->Kp;
    const __m512i tab = subnormal_table();
    const int64_t Mp = (M + 3) / 4 * 4;
    uint16_t* ab = (uint16_t*)tls_buf(0, (size_t)Mp * Kp * 2);
    if (!ab) return -1;
    for (int64_t m = 0; m < Mp; m++)
        dec_row(p->a, p->a_fmt, m, M, p->K, Kp, p->as, p->as_kind, p->ar, p->ac, p->ald, tab, ab + m * Kp, 32, p->bad);
    int fail = 0;
    const int64_t nb = (N + 3) / 4;
    #pragma omp parallel num_threads(nthreads)
    {
        uint16_t* wb = (uint16_t*)tls_buf(1, (size_t)4 * Kp * 2);
        if (!wb) {
            #pragma omp atomic write
            fail = 1;
        }
        #pragma omp for schedule(dynamic, 4)  /* a preempted thread (busy machine) does not hold the others back */
        for (int64_t b = 0; b < nb; b++) {
            if (!wb) continue;
            int64_t n0 = b * 4;
            for (int i = 0; i < 4; i++)
                dec_row(p->q, p->q_fmt, n0 + i, N, p->K, Kp, p->ws, p->ws_kind, p->gr, p->gc, p->wld, tab, wb + i * Kp, 32, p->bad);
            int64_t m0 = 0;
            for (; m0 + 4 <= M; m0 += 4) bf16_block(p, 4, wb, ab, n0, m0);
            switch (M - m0) {
            case 3: bf16_block(p, 3, wb, ab, n0, m0); break;
            case 2: bf16_block(p, 2, wb, ab, n0, m0); break;
            case 1: bf16_block(p, 1, wb, ab, n0, m0); break;
            default: break;
            }
        }
    }
    return fail ? -1 : PATH_BF16;
}

/* ---------------------------------------------------------------------------------------------
   e2m1 weights, small M (AVX512-BF16 path, also chosen by PATH_AUTO up to E2M1_GEMV_MAX_M): the
   codes are decoded in registers (dec_e2m1_32) and used at once by vdpbf16ps against MB <= 4
   activation rows; 4 weight rows per block, so the 4-bit stream is read once at memory speed and
   never written back decoded. Same chunking and scaling as bf16_block. */

/* 1 when an e8m0 scale byte of weight rows n0..n0+3 cannot be folded into e2m1 values exactly */
static int e2m1_block_bad(const WG* p, int64_t n0) {
    if (p->ws_kind != SK_E8M0) return 0;
    int bad = 0;
    for (int i = 0; i < 4 && n0 + i < p->N; i++)
        if (i == 0 || (n0 + i) / p->gr != (n0 + i - 1) / p->gr)
            bad |= e2m1_span_bad((const uint8_t*)p->ws + ((n0 + i) / p->gr) * p->wld, 0, p->K, p->gc, p->K);
    return bad;
}

/* mode (a compile-time constant at each call): 0 no folded weight scale (one table), 1 one scale
   byte per 32 codes (folded group size a multiple of 32), 2 two (a multiple of 16 only); 3 and 4:
   modes 1 and 2 with groups of exactly 32 / 16 (mxfp4 / nvfp4: group index k / 32 or k / 16) */
static inline __attribute__((always_inline)) void e2m1_block(const WG* p, const int MB, const int mode, const uint16_t* ab, int64_t n0, int64_t m0) {
    const int64_t Kp = p->Kp, N = p->N, M = p->M, K = p->K;
    const uint16_t (*lut)[16] = p->ws_kind == SK_E4M3 ? E2M1_LUT_E4M3 : E2M1_LUT_E8M0;
    const uint8_t* src[4];
    const uint8_t* srow[4];
    int64_t wro[4];
    for (int i = 0; i < 4; i++) {
        int64_t n = n0 + i < N ? n0 + i : N - 1; /* rows past N repeat the last one (not stored) */
        src[i] = p->q + n * (K / 2);
        wro[i] = (n / p->gr) * p->wld;
        srow[i] = mode ? (const uint8_t*)p->ws + wro[i] : NULL;
    }
    __m512 tot[4][4];
    for (int i = 0; i < 4; i++) for (int j = 0; j < MB; j++) tot[i][j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < p->nck; c++) {
        int64_t k0 = p->ck0[c], k1 = p->ck1[c];
        __m512 acc[4][4];
        for (int i = 0; i < 4; i++) for (int j = 0; j < MB; j++) acc[i][j] = _mm512_setzero_ps();
        GPos gp = gpos_at(k0, mode ? p->gc : K + 32, K);
        for (int64_t k = k0; k < k1; k += 32, gpos_step(&gp)) {
            __m512bh w[4], x[4];
            for (int i = 0; i < 4; i++) {
                if ((k & 127) == 0) __builtin_prefetch(src[i] + k / 2 + 1024, 0, 3);
                w[i] = (__m512bh)e2m1_dec32(src[i], srow[i], lut, mode, k, K, &gp, 0);
            }
            for (int j = 0; j < MB; j++) x[j] = (__m512bh)_mm512_loadu_si512(ab + (m0 + j) * Kp + k);
            for (int i = 0; i < 4; i++) for (int j = 0; j < MB; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], w[i], x[j]);
        }
        for (int i = 0; i < 4; i++) {
            float sw = sw_at(p, wro[i], c);
            for (int j = 0; j < MB; j++)
                tot[i][j] = _mm512_fmadd_ps(acc[i][j], _mm512_set1_ps(sa_at(p, m0 + j < M ? m0 + j : 0, c) * sw), tot[i][j]);
        }
    }
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < MB; j++)
            if (n0 + i < N && m0 + j < M) out1(p, m0 + j, n0 + i, _mm512_reduce_add_ps(tot[i][j]));
}

/* e2m1_block for M = 1 with the accumulators as named registers (GCC keeps the [4][4] arrays of
   e2m1_block in memory, a store per accumulator per step) and the full 32-code steps free of the
   tail test */
static inline __attribute__((always_inline)) void e2m1_block1(const WG* p, const int mode, const uint16_t* ab, int64_t n0) {
    const int64_t N = p->N, K = p->K;
    const uint16_t (*lut)[16] = p->ws_kind == SK_E4M3 ? E2M1_LUT_E4M3 : E2M1_LUT_E8M0;
    const uint8_t *s0, *s1, *s2, *s3, *r0 = NULL, *r1 = NULL, *r2 = NULL, *r3 = NULL;
    int64_t wro[4];
    for (int i = 0; i < 4; i++) wro[i] = ((n0 + i < N ? n0 + i : N - 1) / p->gr) * p->wld;
    s0 = p->q + (n0 < N ? n0 : N - 1) * (K / 2);
    s1 = p->q + (n0 + 1 < N ? n0 + 1 : N - 1) * (K / 2);
    s2 = p->q + (n0 + 2 < N ? n0 + 2 : N - 1) * (K / 2);
    s3 = p->q + (n0 + 3 < N ? n0 + 3 : N - 1) * (K / 2);
    if (mode) {
        r0 = (const uint8_t*)p->ws + wro[0]; r1 = (const uint8_t*)p->ws + wro[1];
        r2 = (const uint8_t*)p->ws + wro[2]; r3 = (const uint8_t*)p->ws + wro[3];
    }
    __m512 t0 = _mm512_setzero_ps(), t1 = t0, t2 = t0, t3 = t0;
    for (int64_t c = 0; c < p->nck; c++) {
        const int64_t k0 = p->ck0[c], k1 = p->ck1[c], kf = k1 < (K & ~(int64_t)31) ? k1 : (K & ~(int64_t)31);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        GPos gp = gpos_at(k0, mode ? p->gc : K + 32, K);
        int64_t k = k0;
        for (; k < kf; k += 32, gpos_step(&gp)) {
            if ((k & 127) == 0) {
                __builtin_prefetch(s0 + (k >> 1) + 1024, 0, 3); __builtin_prefetch(s1 + (k >> 1) + 1024, 0, 3);
                __builtin_prefetch(s2 + (k >> 1) + 1024, 0, 3); __builtin_prefetch(s3 + (k >> 1) + 1024, 0, 3);
            }
            const __m512bh x = (__m512bh)_mm512_loadu_si512(ab + k);
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)e2m1_dec32(s0, r0, lut, mode, k, K, &gp, 1), x);
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)e2m1_dec32(s1, r1, lut, mode, k, K, &gp, 1), x);
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)e2m1_dec32(s2, r2, lut, mode, k, K, &gp, 1), x);
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)e2m1_dec32(s3, r3, lut, mode, k, K, &gp, 1), x);
        }
        for (; k < k1; k += 32, gpos_step(&gp)) { /* the partial last step (K % 32 != 0) */
            const __m512bh x = (__m512bh)_mm512_loadu_si512(ab + k);
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)e2m1_dec32(s0, r0, lut, mode, k, K, &gp, 0), x);
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)e2m1_dec32(s1, r1, lut, mode, k, K, &gp, 0), x);
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)e2m1_dec32(s2, r2, lut, mode, k, K, &gp, 0), x);
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)e2m1_dec32(s3, r3, lut, mode, k, K, &gp, 0), x);
        }
        const float sa = sa_at(p, 0, c);
        t0 = _mm512_fmadd_ps(a0, _mm512_set1_ps(sa * sw_at(p, wro[0], c)), t0);
        t1 = _mm512_fmadd_ps(a1, _mm512_set1_ps(sa * sw_at(p, wro[1], c)), t1);
        t2 = _mm512_fmadd_ps(a2, _mm512_set1_ps(sa * sw_at(p, wro[2], c)), t2);
        t3 = _mm512_fmadd_ps(a3, _mm512_set1_ps(sa * sw_at(p, wro[3], c)), t3);
    }
    out1(p, 0, n0, _mm512_reduce_add_ps(t0));
    if (n0 + 1 < N) out1(p, 0, n0 + 1, _mm512_reduce_add_ps(t1));
    if (n0 + 2 < N) out1(p, 0, n0 + 2, _mm512_reduce_add_ps(t2));
    if (n0 + 3 < N) out1(p, 0, n0 + 3, _mm512_reduce_add_ps(t3));
}

/* every row of M against weight rows n0..n0+3, in blocks of 4 rows of M */
static inline __attribute__((always_inline)) void e2m1_rows(const WG* p, const int mode, const uint16_t* ab, int64_t n0) {
    const int64_t M = p->M;
    if (M == 1) { e2m1_block1(p, mode, ab, n0); return; }
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4) e2m1_block(p, 4, mode, ab, n0, m0);
    switch (M - m0) {
    case 3: e2m1_block(p, 3, mode, ab, n0, m0); break;
    case 2: e2m1_block(p, 2, mode, ab, n0, m0); break;
    case 1: e2m1_block(p, 1, mode, ab, n0, m0); break;
    default: break;
    }
}

static int run_e2m1_gemv(const WG* p, int nthreads) {
    const int64_t M = p->M, N = p->N, Kp = p->Kp;
    const __m512i tab = subnormal_table();
    const int64_t Mp = (M + 3) / 4 * 4;
    uint16_t* ab = (uint16_t*)tls_buf(0, (size_t)Mp * Kp * 2);
    if (!ab) return -1;
    for (int64_t m = 0; m < Mp; m++)
        dec_row(p->a, p->a_fmt, m, M, p->K, Kp, p->as, p->as_kind, p->ar, p->ac, p->ald, tab, ab + m * Kp, 32, p->bad);
    const int mode = e2m1_mode(p->ws_kind, p->gc, p->K);
    const int64_t nb = (N + 3) / 4;
    int bad = 0;
    #pragma omp parallel for num_threads(nthreads) schedule(dynamic, 8) reduction(|:bad)
    for (int64_t b = 0; b < nb; b++) {
        bad |= e2m1_block_bad(p, b * 4);
        if (mode == 0) e2m1_rows(p, 0, ab, b * 4);
        else if (mode == 1) e2m1_rows(p, 1, ab, b * 4);
        else if (mode == 2) e2m1_rows(p, 2, ab, b * 4);
        else if (mode == 3) e2m1_rows(p, 3, ab, b * 4);
        else e2m1_rows(p, 4, ab, b * 4);
    }
    if (bad) *p->bad = 1;
    return PATH_BF16;
}
#endif /* WG_BF16 */

#ifdef WG_AMX
/* ---------------------------------------------------------------------------------------------
   AMX-BF16 path */

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static int amx_permitted(void) {
    static int state = -1; /* -1 unknown, 0 refused, 1 granted (process-wide permission) */
    if (state < 0) state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : 0;
    return state;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed, aligned(64))) TileCfg;

static void amx_config(void) {
    TileCfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) { c.colsb[t] = 64; c.rows[t] = 16; }
    _tile_loadconfig(&c);
}

/* tiles: 0..3 C (n-sub i, m-sub j) = 2 * i + j; 4, 5 A (weight rows n0..n0+15, n0+16..n0+31);
   6, 7 B (activation m-blocks). Weight panel wp: 32 rows x Kp bf16; activation panels bp: per
   16-row m-block, Kp/32 VNNI tiles of 1 KB. */
/* r[0..15] = the rows of the transpose of s (16 rows, stride ss floats): 4 shuffle stages */
static inline __attribute__((always_inline)) void tr16(const float* s, int64_t ss, __m512* r) {
    __m512 t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(s + i * ss);
    for (int i = 0; i < 8; i++) { t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]); t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]); }
    for (int i = 0; i < 4; i++) {
        __m512d a0 = _mm512_castps_pd(t[4 * i]), a1 = _mm512_castps_pd(t[4 * i + 1]);
        __m512d a2 = _mm512_castps_pd(t[4 * i + 2]), a3 = _mm512_castps_pd(t[4 * i + 3]);
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
            t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
        }
    for (int j = 0; j < 8; j++) { r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88); r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd); }
}

/* 16 float32 -> bf16 bits, lane-wise f32_to_bf16_rne */
static inline __attribute__((always_inline)) __m256i bf16_rne16(__m512 v) {
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(b, _mm512_set1_epi32(0x7FFFFFFF)), _mm512_set1_epi32(0x7F800000));
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0xFFFF));
    return _mm512_cvtepi32_epi16(r);
}

/* y[m0 + i, n0 .. n0 + 15] (first cols valid) = v (+ bias) as float32 or bf16: the vector
   epilogue (the bf16 rounding is f32_to_bf16_rne's, lane-wise) */
static inline __attribute__((always_inline)) void out16(const WG* p, int64_t m, int64_t n0, __m512 v, int64_t cols) {
    const __mmask16 k = cols >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << cols) - 1u);
    if (p->wmul != 1.0f) v = _mm512_mul_ps(v, _mm512_set1_ps(p->wmul));
    if (p->bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, p->bias + n0));
    if (!p->out_bf16) { _mm512_mask_storeu_ps((float*)p->y + m * p->N + n0, k, v); return; }
    _mm256_mask_storeu_epi16((uint16_t*)p->y + m * p->N + n0, k, bf16_rne16(v));
}

/* y[m, n0 .. n0 + 31] (first cols valid) = (v0, v1) (+ bias): out16 twice, but a full bf16 row
   as one 64-byte store instead of two half-line stores */
static inline __attribute__((always_inline)) void out32(const WG* p, int64_t m, int64_t n0, __m512 v0, __m512 v1, int64_t cols) {
    if (!p->out_bf16 || cols < 32) {
        out16(p, m, n0, v0, cols < 16 ? cols : 16);
        if (cols > 16) out16(p, m, n0 + 16, v1, cols - 16);
        return;
    }
    if (p->wmul != 1.0f) { v0 = _mm512_mul_ps(v0, _mm512_set1_ps(p->wmul)); v1 = _mm512_mul_ps(v1, _mm512_set1_ps(p->wmul)); }
    if (p->bias) { v0 = _mm512_add_ps(v0, _mm512_loadu_ps(p->bias + n0)); v1 = _mm512_add_ps(v1, _mm512_loadu_ps(p->bias + n0 + 16)); }
    _mm512_storeu_si512((uint16_t*)p->y + m * p->N + n0, _mm512_inserti64x4(_mm512_castsi256_si512(bf16_rne16(v0)), bf16_rne16(v1), 1));
}

/* y[m0 .. m0 + rows - 1, n0 .. n0 + cols - 1] (at most 16 x 16) = transpose of a [n][m] block s
   (stride ss floats), through the epilogue */
static inline void store_t16(const WG* p, const float* s, int64_t ss, int64_t m0, int64_t n0, int64_t rows, int64_t cols) {
    if (rows <= 0 || cols <= 0) return;
    __m512 r[16];
    tr16(s, ss, r);
    for (int64_t i = 0; i < rows && i < 16; i++) out16(p, m0 + i, n0, r[i], cols);
}

/* store_t16 of two [n][m] blocks side by side in n: s0 -> n0 .. n0 + 15, s1 -> n0 + 16 .. n0 + 31
   (cols <= 32 valid), rows of one m written together (out32) */
static inline void store_t32(const WG* p, const float* s0, const float* s1, int64_t ss, int64_t m0, int64_t n0, int64_t rows, int64_t cols) {
    if (rows <= 0 || cols <= 0) return;
    if (cols <= 16) { store_t16(p, s0, ss, m0, n0, rows, cols); return; }
    __m512 r0[16], r1[16];
    tr16(s0, ss, r0);
    tr16(s1, ss, r1);
    for (int64_t i = 0; i < rows && i < 16; i++) out32(p, m0 + i, n0, r0[i], r1[i], cols);
}

/* tot[n][m] (+)= tmp * (sa[m] * sw[n]) for the flush of chunk c; tmp tile (i, j) holds [16 n][16 m] */
static inline void amx_post(const WG* p, const float* tmp, float* tot, const float* sa, const int64_t* wro, int two, int64_t c, int first) {
    __m512 sa0 = _mm512_loadu_ps(sa), sa1 = _mm512_loadu_ps(sa + 16), s0 = sa0, s1 = sa1;
    int64_t last = -1;
    for (int i = 0; i < 2; i++)
        for (int r = 0; r < 16; r++) {
            if (wro[i * 16 + r] != last) {
                last = wro[i * 16 + r];
                __m512 sw = _mm512_set1_ps(sw_at(p, last, c));
                s0 = _mm512_mul_ps(sa0, sw);
                s1 = _mm512_mul_ps(sa1, sw);
            }
            float* o = tot + (i * 16 + r) * 32;
            __m512 t0 = _mm512_load_ps(tmp + (2 * i) * 256 + r * 16);
            _mm512_store_ps(o, first ? _mm512_mul_ps(t0, s0) : _mm512_fmadd_ps(t0, s0, _mm512_load_ps(o)));
            if (two) {
                __m512 t1 = _mm512_load_ps(tmp + (2 * i + 1) * 256 + r * 16);
                _mm512_store_ps(o + 16, first ? _mm512_mul_ps(t1, s1) : _mm512_fmadd_ps(t1, s1, _mm512_load_ps(o + 16)));
            }
        }
}

/* tiles: 0..3 C (n-sub i, m-sub j) = 2 * i + j; 4, 5 A (weight rows n0..n0+15, n0+16..n0+31);
   6, 7 B (m-blocks mb, mb + 1 when two). wp: row n0 of the weight panel; the A tile of rows
   16 i.. at step s is at wp + s * astep + i * a16 with row stride astride bytes; wro[i]: (n / gr) * wld of row n0 + i; bp: per 16-row m-block, Kp/32 VNNI tiles of 1 KB; sa_tab[c * Mp + m]: float32
   activation scales per chunk. Software-pipelined: the scaling of chunk c's partial sums (vector
   code on tmp) is issued after chunk c + 1's tile instructions, so the two overlap. */
static void amx_mblock(const WG* p, const uint16_t* wp, int64_t astep, int64_t a16, int64_t astride, const uint32_t* bp,
                       const float* sa_tab, int64_t Mp, int64_t n0, const int64_t* wro, int64_t mb, int two, float* tmp, float* tot) {
    const int64_t Kp = p->Kp, N = p->N, M = p->M, nkb = Kp / 32;
    const int64_t m0 = mb * 16;
    const uint32_t* b0 = bp + mb * nkb * 256;
    const uint32_t* b1 = b0 + nkb * 256;
    for (int64_t c = 0; c < p->nck; c++) {
        int64_t s0 = p->ck0[c] / 32, s1 = (p->ck1[c] + 31) / 32;
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int64_t s = s0; s < s1; s++) {
            _tile_loadd(4, wp + s * astep, astride);
            _tile_loadd(5, wp + s * astep + a16, astride);
            _tile_loadd(6, b0 + s * 256, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(2, 5, 6);
            if (two) {
                _tile_loadd(7, b1 + s * 256, 64);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(3, 5, 7);
            }
        }
        if (c > 0) amx_post(p, tmp + ((c - 1) & 1) * 1024, tot, sa_tab + (c - 1) * Mp + m0, wro, two, c - 1, c == 1);
        float* t = tmp + (c & 1) * 1024;
        _tile_stored(0, t, 64);
        _tile_stored(2, t + 512, 64);
        if (two) { _tile_stored(1, t + 256, 64); _tile_stored(3, t + 768, 64); }
    }
    amx_post(p, tmp + ((p->nck - 1) & 1) * 1024, tot, sa_tab + (p->nck - 1) * Mp + m0, wro, two, p->nck - 1, p->nck == 1);
    int64_t mv = M - m0 < 32 ? M - m0 : 32, nv = N - n0 < 32 ? N - n0 : 32;
    for (int js = 0; js < 1 + two; js++)
        store_t32(p, tot + js * 16, tot + 16 * 32 + js * 16, 32, m0 + js * 16, n0, mv - js * 16, nv);
}

/* M <= 16: one B tile, four weight sub-tiles (64-row panel wp, rows n0..n0+63): four independent
   C accumulators (0..3), A tiles 4/5 alternating, B tile 6. Column j of a C tile is row m = j / S
   of M, chunk slot j % S (see run_amx); tot[n][j] (16 floats per row n) collects the scaled
   flushes, y[m][n] = the sum of its S slots. */
static void amx_small(const WG* p, const uint16_t* wp, const uint32_t* bp, int64_t n0, int S, float* tmp, float* tot) {
    const int64_t Kp = p->Kp, N = p->N, M = p->M;
    const size_t wstride = (size_t)Kp * 2; /* row-major panel: measured faster here than tile-major (decode streams one row at a time) */
    int64_t wro[64];
    for (int i = 0; i < 64; i++) wro[i] = ((n0 + i < N ? n0 + i : 0) / p->gr) * p->wld;
    const int scaled = p->as_kind == SK_F32 || p->ws_kind == SK_F32;
    for (int64_t c0 = 0; c0 < p->nck; c0 += S) {
        int64_t c1 = c0 + S < p->nck ? c0 + S : p->nck;
        int64_t s0 = p->ck0[c0] / 32, s1 = (p->ck1[c1 - 1] + 31) / 32;
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int64_t s = s0; s < s1; s++) {
            const uint16_t* w = wp + s * 32;
            _tile_loadd(6, bp + s * 256, 64);
            _tile_loadd(4, w, wstride);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(5, w + 16 * Kp, wstride);
            _tile_dpbf16ps(1, 5, 6);
            _tile_loadd(4, w + 32 * Kp, wstride);
            _tile_dpbf16ps(2, 4, 6);
            _tile_loadd(5, w + 48 * Kp, wstride);
            _tile_dpbf16ps(3, 5, 6);
        }
        float* dst = c0 == 0 ? tot : tmp; /* the first flush lands in tot directly */
        _tile_stored(0, dst, 64);
        _tile_stored(1, dst + 256, 64);
        _tile_stored(2, dst + 512, 64);
        _tile_stored(3, dst + 768, 64);
        if (!scaled) continue; /* one chunk, nothing to scale */
        /* column j: m = j / S, chunk c0 + j % S (slots past c1 hold zeros: any finite scale) */
        float sav[16] __attribute__((aligned(64)));
        float swv[16] __attribute__((aligned(64)));
        int64_t cj[16];
        for (int j = 0; j < 16; j++) {
            int64_t m = j / S, c = c0 + j % S;
            cj[j] = c < c1 ? c : c0;
            sav[j] = sa_at(p, m < M ? m : 0, cj[j]);
        }
        __m512 sa = _mm512_load_ps(sav), sc = sa;
        /* one weight scale per row when the weight has no float32 K-groups (or one slot) */
        const int sw_row = p->ws_kind != SK_F32 || p->gc >= p->K || S == 1;
        int64_t last = -1;
        for (int r = 0; r < 64; r++) {
            if (sw_row) sc = _mm512_mul_ps(sa, _mm512_set1_ps(sw_at(p, wro[r], c0)));
            else if (wro[r] != last) { /* rows of one weight scale group share the vector */
                last = wro[r];
                for (int j = 0; j < 16; j++) swv[j] = sw_at(p, last, cj[j]);
                sc = _mm512_mul_ps(sa, _mm512_load_ps(swv));
            }
            __m512 t = _mm512_load_ps(dst + r * 16);
            _mm512_store_ps(tot + r * 16, c0 == 0 ? _mm512_mul_ps(t, sc) : _mm512_fmadd_ps(t, sc, _mm512_load_ps(tot + r * 16)));
        }
    }
    int64_t nv = N - n0 < 64 ? N - n0 : 64;
    if (S == 1) {
        for (int is = 0; is < 4; is++) store_t16(p, tot + is * 256, 16, 0, n0 + is * 16, M, nv - is * 16);
        return;
    }
    for (int64_t j = 0; j < M; j++)
        for (int64_t i = 0; i < nv; i++) {
            float acc = 0.0f;
            for (int sl = 0; sl < S; sl++) acc += tot[i * 16 + j * S + sl];
            out1(p, j, n0 + i, acc);
        }
}

/* Several K-chunks, one 16-row m-block (rows m0..m0+15 of M, VNNI panel bm) x 32 weight rows
   n0..n0+31 (A tile of rows 16 i.. at step s: wh + s * astep + i * a16, row stride astride bytes):
   C tiles {0, 1} for even chunks and {2, 3} for odd ones; chunk c + 1's products are issued
   before chunk c's tiles are stored and scaled, so a flush never waits for its own accumulation
   chain to drain (AMX executes in order). tot: [32 n][16 m]. Used for 9 <= M <= 16 only: for
   larger M, 2 x 2 tiles over 32 m (amx_mblock) measured faster despite their exposed drains. */
static void amx_pipe32(const WG* p, const uint16_t* wh, int64_t astep, int64_t a16, int64_t astride, const uint32_t* bm,
                       int64_t m0, int64_t n0, float* tmp, float* tot) {
    const int64_t N = p->N, M = p->M;
    int64_t wro[32];
    for (int i = 0; i < 32; i++) wro[i] = ((n0 + i < N ? n0 + i : 0) / p->gr) * p->wld;
    for (int64_t c = 0; c <= p->nck; c++) {
        if (c < p->nck) {
            int64_t s0 = p->ck0[c] / 32, s1 = (p->ck1[c] + 31) / 32;
            if (c & 1) {
                _tile_zero(2); _tile_zero(3);
                for (int64_t s = s0; s < s1; s++) {
                    _tile_loadd(6, bm + s * 256, 64);
                    _tile_loadd(4, wh + s * astep, astride);
                    _tile_dpbf16ps(2, 4, 6);
                    _tile_loadd(5, wh + s * astep + a16, astride);
                    _tile_dpbf16ps(3, 5, 6);
                }
            } else {
                _tile_zero(0); _tile_zero(1);
                for (int64_t s = s0; s < s1; s++) {
                    _tile_loadd(6, bm + s * 256, 64);
                    _tile_loadd(4, wh + s * astep, astride);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_loadd(5, wh + s * astep + a16, astride);
                    _tile_dpbf16ps(1, 5, 6);
                }
            }
        }
        if (c == 0) continue;
        const int64_t cp = c - 1; /* store and scale the previous chunk */
        float* t = tmp + (cp & 1) * 512;
        if (cp & 1) { _tile_stored(2, t, 64); _tile_stored(3, t + 256, 64); }
        else { _tile_stored(0, t, 64); _tile_stored(1, t + 256, 64); }
        float sav[16] __attribute__((aligned(64)));
        for (int j = 0; j < 16; j++) sav[j] = sa_at(p, m0 + j < M ? m0 + j : 0, cp);
        const __m512 sa = _mm512_load_ps(sav);
        __m512 sc = sa;
        int64_t last = -1;
        for (int r = 0; r < 32; r++) {
            if (wro[r] != last) { last = wro[r]; sc = _mm512_mul_ps(sa, _mm512_set1_ps(sw_at(p, last, cp))); }
            __m512 v = _mm512_load_ps(t + r * 16);
            _mm512_store_ps(tot + r * 16, cp == 0 ? _mm512_mul_ps(v, sc) : _mm512_fmadd_ps(v, sc, _mm512_load_ps(tot + r * 16)));
        }
    }
    int64_t nv = N - n0 < 32 ? N - n0 : 32, mv = M - m0 < 16 ? M - m0 : 16;
    store_t32(p, tot, tot + 256, 16, m0, n0, mv, nv);
}

/* One K-chunk (no float32 K-groups), 32 weight rows n0.. x every 16-row m-block: C tiles {0, 1}
   and {2, 3} alternate between m-blocks, and m-block i's tiles are stored, scaled and written
   after m-block i + 1's products are issued, so no store waits for its own accumulation chain to
   drain. tmp: 2 x 512 floats. */
static void amx_rows32(const WG* p, const uint16_t* wh, int64_t astep, int64_t a16, int64_t astride, const uint32_t* bp,
                       const float* sa_tab, const int64_t* wro, int64_t n0, int64_t mb0, int64_t mb1, float* tmp) {
    const int64_t N = p->N, M = p->M, nkb = p->Kp / 32, s1 = (p->K + 31) / 32;
    const int64_t nv = N - n0 < 32 ? N - n0 : 32;
    for (int64_t mb = mb0; mb <= mb1; mb++) {
        if (mb < mb1) {
            const uint32_t* bm = bp + mb * nkb * 256;
            if (mb & 1) {
                _tile_zero(2); _tile_zero(3);
                for (int64_t s = 0; s < s1; s++) {
                    _tile_loadd(6, bm + s * 256, 64);
                    _tile_loadd(4, wh + s * astep, astride);
                    _tile_dpbf16ps(2, 4, 6);
                    _tile_loadd(5, wh + s * astep + a16, astride);
                    _tile_dpbf16ps(3, 5, 6);
                }
            } else {
                _tile_zero(0); _tile_zero(1);
                for (int64_t s = 0; s < s1; s++) {
                    _tile_loadd(6, bm + s * 256, 64);
                    _tile_loadd(4, wh + s * astep, astride);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_loadd(5, wh + s * astep + a16, astride);
                    _tile_dpbf16ps(1, 5, 6);
                }
            }
        }
        if (mb == mb0) continue;
        const int64_t pm = mb - 1, m0 = pm * 16;
        float* t = tmp + (pm & 1) * 512;
        if (pm & 1) { _tile_stored(2, t, 64); _tile_stored(3, t + 256, 64); }
        else { _tile_stored(0, t, 64); _tile_stored(1, t + 256, 64); }
        const __m512 sa = _mm512_loadu_ps(sa_tab + m0);
        int64_t last = -1;
        __m512 sc = sa;
        for (int r = 0; r < 32; r++) {
            if (wro[r] != last) { last = wro[r]; sc = _mm512_mul_ps(sa, _mm512_set1_ps(sw_at(p, last, 0))); }
            _mm512_store_ps(t + r * 16, _mm512_mul_ps(_mm512_load_ps(t + r * 16), sc));
        }
        const int64_t mv = M - m0 < 16 ? M - m0 : 16;
        store_t32(p, t, t + 256, 16, m0, n0, mv, nv);
    }
}

static int run_amx(const WG* p, int nthreads) {
    const int64_t M = p->M, N = p->N, Kp = p->Kp, nkb = Kp / 32;
    const __m512i tab = subnormal_table();
    const int64_t nmb = (M + 15) / 16, nmbp = nmb + (nmb & 1); /* m-blocks, padded to pairs */
    uint32_t* bp = (uint32_t*)tls_buf(0, (size_t)nmbp * nkb * 1024);
    if (!bp) return -1;
    int fail = 0;
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(16));
    /* M <= 16 with several K-chunks: S chunk slots per row of M (S * Mp2 = 16 columns, Mp2 = M
       rounded up to a power of two): k-step s of chunk c goes to column m * S + c % S, the other
       columns of that tile are 0, so a C tile accumulates S chunks side by side and is flushed
       (scaled) once per S chunks instead of once per chunk. */
    const int small = M <= 16;
    int S = 1;
    if (small && p->nck > 1) { int mp2 = 1; while (mp2 < M) mp2 *= 2; S = 16 / mp2; }
    int64_t* step_chunk = NULL;
    if (S > 1) {
        step_chunk = (int64_t*)tls_buf(5, (size_t)nkb * 8);
        if (!step_chunk) return -1;
        for (int64_t c = 0; c < p->nck; c++)
            for (int64_t st = p->ck0[c] / 32; st < (p->ck1[c] + 31) / 32; st++) step_chunk[st] = c;
        memset(bp, 0, (size_t)nkb * 1024);
    }
    /* activations -> VNNI panels: dword r of row m's k-block = pair (2r, 2r+1) -> tile row r, column m.
       Per 16-row m-block: the rows decoded into a row-major scratch, then one 16 x 16 dword
       transpose per k-block (measured 608 x 384: ~4x faster than a 16-lane scatter per row and
       k-block). M <= 16 with chunk slots (S > 1): scattered to the slot columns. */
    #pragma omp parallel num_threads(M >= 64 ? nthreads : 1)
    {
        uint16_t* rows16 = (uint16_t*)tls_buf(2, (size_t)16 * Kp * 2);
        if (!rows16) {
            #pragma omp atomic write
            fail = 1;
        }
        if (S > 1) {
            #pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++) {
                if (!rows16) continue;
                dec_row(p->a, p->a_fmt, m, M, p->K, Kp, p->as, p->as_kind, p->ar, p->ac, p->ald, tab, rows16, 32, p->bad);
                for (int64_t kb = 0; kb < nkb; kb++)
                    _mm512_i32scatter_epi32(bp + kb * 256 + m * S + step_chunk[kb] % S, idx, _mm512_loadu_si512(rows16 + kb * 32), 4);
            }
        } else {
            #pragma omp for schedule(static)
            for (int64_t mb = 0; mb < nmbp; mb++) {
                if (!rows16) continue;
                for (int64_t i = 0; i < 16; i++)
                    dec_row(p->a, p->a_fmt, mb * 16 + i, M, p->K, Kp, p->as, p->as_kind, p->ar, p->ac, p->ald, tab, rows16 + i * Kp, 32, p->bad);
                uint32_t* dst = bp + mb * nkb * 256;
                for (int64_t kb = 0; kb < nkb; kb++) {
                    __m512 r[16];
                    tr16((const float*)(rows16 + kb * 32), Kp / 2, r);
                    for (int i = 0; i < 16; i++) _mm512_store_ps((float*)(dst + kb * 256 + i * 16), r[i]);
                }
            }
        }
    }
    if (fail) return -1;
    /* float32 activation scales per (chunk, row of M), 1 without (large-M path) */
    float* sa_tab = NULL;
    if (!small) {
        sa_tab = (float*)tls_buf(6, (size_t)p->nck * nmbp * 16 * 4);
        if (!sa_tab) return -1;
        for (int64_t c = 0; c < p->nck; c++)
            for (int64_t m = 0; m < nmbp * 16; m++) sa_tab[c * nmbp * 16 + m] = sa_at(p, m < M ? m : 0, c);
    }
    /* Weight panels, measured on this project's Xeon (2 MB L2): M <= 16 64 rows, row-major; packed
       activations up to 1 MB (M <= 128 at K = 4096): 32 rows, row-major (decoding one row at a time
       streams best); larger: 128-row tile-major panels (1 MB at K = 4096; strided A tile loads from
       a big row-major panel thrash L1 sets), m-pairs outer and 32-row sub-panels inner, so the
       packed activations stream from L3 once per 128 rows instead of once per 32. */
    const int tiled = !small && nmbp * 16 * Kp * 2 > (1 << 20);
    const int64_t rows = small ? 64 : tiled ? 128 : 32, nb = (N + rows - 1) / rows;
    /* Work items (part of M, block of weight rows). One part (every m-block) per item for small M
       or one thread: blocks handed out one at a time (schedule dynamic, 1: a preempted thread on a
       busy machine does not hold the others back). Large M: M split into nthreads parts of whole
       m-pairs, one per thread (chunk nb), each thread decoding every weight block itself: the
       packed activations it streams are then the half it packed (its own L2) and not all of them.
       Measured (2 threads, wall, e4m3 1x128 activations x 128x128 fp8 blocks): 608x384x384 202 ->
       176 us, 608x1536x384 846 -> 661, 304x1536x384 431 -> 365; neutral at M = 144, slower at
       M = 64 and with N >= 1536 (the duplicated weight decode), hence M >= 256 and N <= 512. */
    const int64_t nparts = (!small && nthreads > 1 && nmb >= 16 && nb * rows <= 512) ? nthreads : 1, chunk = nparts > 1 ? nb : 1;
    #pragma omp parallel num_threads(nthreads)
    {
        uint16_t* wp = (uint16_t*)tls_buf(1, (size_t)rows * Kp * 2);
        float* tmp = (float*)tls_buf(3, (size_t)(2 * 1024 + 32 * 32) * 4); /* two flush buffers, tot */
        if (!wp || !tmp) {
            #pragma omp atomic write
            fail = 1;
        } else {
            amx_config();
        }
        #pragma omp for schedule(dynamic, chunk)
        for (int64_t it = 0; it < nparts * nb; it++) {
            if (!wp || !tmp) continue;
            const int64_t part = it / nb, b = it - part * nb, n0 = b * rows;
            const int64_t mb0 = 2 * (part * (nmbp / 2) / nparts), mb1e = 2 * ((part + 1) * (nmbp / 2) / nparts);
            const int64_t mb1 = mb1e < nmb ? mb1e : nmb;
            if (small) {
                for (int i = 0; i < rows; i++)
                    dec_row(p->q, p->q_fmt, n0 + i, N, p->K, Kp, p->ws, p->ws_kind, p->gr, p->gc, p->wld, tab, wp + i * Kp, 32, p->bad);
                if (S == 1 && p->nck > 1) { /* 9 <= M <= 16: two 32-row halves */
                    amx_pipe32(p, wp, 32, 16 * Kp, Kp * 2, bp, 0, n0, tmp, tmp + 1024);
                    if (n0 + 32 < N) amx_pipe32(p, wp + 32 * Kp, 32, 16 * Kp, Kp * 2, bp, 0, n0 + 32, tmp, tmp + 1024);
                }
                else amx_small(p, wp, bp, n0, S, tmp, tmp + 1024);
                continue;
            }
            for (int i = 0; i < rows; i++)
                dec_row(p->q, p->q_fmt, n0 + i, N, p->K, Kp, p->ws, p->ws_kind, p->gr, p->gc, p->wld, tab,
                        tiled ? wp + i * 32 : wp + i * Kp, tiled ? rows * 32 : 32, p->bad);
            int64_t wro[128]; /* (n / gr) * wld per row of the block, once (not per m-pair) */
            for (int i = 0; i < rows; i++) wro[i] = ((n0 + i < N ? n0 + i : 0) / p->gr) * p->wld;
            /* one K-chunk and a 32-row weight slab that stays in L1 (K <= 512): pipelined m-blocks
               (measured 256x1536x384: 525 -> 460 us on one thread; slower from K = 1536 on) */
            if (p->nck == 1 && !tiled && Kp <= 512) {
                for (int64_t sp = 0; sp < rows && n0 + sp < N; sp += 32) {
                    if (tiled) amx_rows32(p, wp + sp * 32, rows * 32, 512, 64, bp, sa_tab, wro + sp, n0 + sp, mb0, mb1, tmp);
                    else amx_rows32(p, wp, 32, 16 * Kp, Kp * 2, bp, sa_tab, wro, n0, mb0, mb1, tmp);
                }
                continue;
            }
            for (int64_t mb = mb0; mb < mb1; mb += 2)
                for (int64_t sp = 0; sp < rows && n0 + sp < N; sp += 32) {
                    if (tiled) amx_mblock(p, wp + sp * 32, rows * 32, 512, 64, bp, sa_tab, nmbp * 16, n0 + sp, wro + sp, mb, mb + 1 < nmb, tmp, tmp + 2048);
                    else amx_mblock(p, wp, 32, 16 * Kp, Kp * 2, bp, sa_tab, nmbp * 16, n0 + sp, wro, mb, mb + 1 < nmb, tmp, tmp + 2048);
                }
        }
        if (wp && tmp) _tile_release();
    }
    return fail ? -1 : PATH_AMX;
}
#endif /* WG_AMX */

/* Bit mask of the paths this build can run here: 1 << PATH_AMX, 1 << PATH_BF16, 1 << PATH_SCALAR. */
int oq_wgemm_paths(void) {
    int m = 1 << PATH_SCALAR;
#ifdef WG_BF16
    m |= 1 << PATH_BF16;
#endif
#ifdef WG_AMX
    if (amx_permitted()) m |= 1 << PATH_AMX;
#endif
    return m;
}

/* y ([M, N], row stride N) = wmul * A @ W^T (+ bias) (see the top of this file): float32, or bf16
   when out_bf16 (one rounding to nearest even of the float32 sum, as torch's .to(bfloat16)); wmul:
   one float32 multiply of each sum (skipped when 1); bias: float32 [N] or NULL, added to the
   float32 result before that rounding. Every pointer is a contiguous tensor; grids are (rows per
   group, cols per group, row stride); kinds SK_*. path: PATH_AUTO or a PATH_* to force (tests,
   benchmarks). Fast paths need every float32 scale group boundary in K (ac, gc when < K) and every
   e8m0 group (ac, gc) to be a multiple of 32 (e2m1 weights: folded e8m0 / e4m3 weight groups a
   multiple of 16); else (or when the forced path is not available) the portable path runs.
   Returns the path that ran, -1 when a buffer could not be allocated, -2 when an e8m0 scale byte
   is outside [10, 246] (e2m1 weights: [2, 252]; 2^delta would take a decoded value out of bf16's
   normal range: y is garbage, call again with the scales as float32). */
int oq_wgemm(int path, int nthreads, int64_t M, int64_t N, int64_t K,
             const void* a, int a_fmt, const void* as, int as_kind, int64_t ar, int64_t ac, int64_t ald,
             const uint8_t* q, int q_fmt, const void* ws, int ws_kind, int64_t gr, int64_t gc, int64_t wld,
             const float* bias, int out_bf16, void* y, float wmul) {
    int bad = 0;
    WG p = {M, N, K, (K + 31) / 32 * 32, a, a_fmt, as, as_kind, ar, ac, ald, q, q_fmt, ws, ws_kind, gr, gc, wld, y,
            bias, out_bf16 != 0, 0, NULL, NULL, NULL, NULL, NULL, &bad, wmul};
    if (M <= 0 || N <= 0) return PATH_SCALAR;
    if (K <= 0) {
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++) out1(&p, m, n, 0.0f);
        return PATH_SCALAR;
    }
    /* chunk and row tables (slot 4 of the calling thread: the paths use slots 0..3) */
    int64_t* tab = (int64_t*)tls_buf(4, (size_t)(4 * (K + 1) + M) * 8);
    if (!tab) return -1;
    int64_t *ck0 = tab, *ck1 = tab + (K + 1), *acol = tab + 2 * (K + 1), *wcol = tab + 3 * (K + 1), *arow = tab + 4 * (K + 1);
    int64_t nck = 0;
    for (int64_t k0 = 0; k0 < K; nck++) {
        int64_t k1 = chunk_end(&p, k0);
        ck0[nck] = k0; ck1[nck] = k1; acol[nck] = k0 / ac; wcol[nck] = k0 / gc;
        k0 = k1;
    }
    for (int64_t m = 0; m < M; m++) arow[m] = (m / ar) * ald;
    p.nck = nck; p.ck0 = ck0; p.ck1 = ck1; p.acol = acol; p.wcol = wcol; p.arow = arow;
    if (nthreads < 1 || M * N * K < (1 << 18)) nthreads = 1; /* tiny products: waking a second thread costs more than it saves */
    int aligned;
    if (q_fmt == FMT_E2M1) /* e2m1 weights: folded (e8m0 / e4m3) weight groups of a multiple of 16 along K */
        aligned = (as_kind == SK_NONE || ac >= K || ac % 32 == 0) && (as_kind != SK_E8M0 || ac % 32 == 0 || ac >= K)
                  && (ws_kind == SK_NONE || gc >= K || (ws_kind == SK_F32 ? gc % 32 == 0 : gc % 16 == 0));
    else
        aligned = (as_kind == SK_NONE || ac >= K || ac % 32 == 0) && (ws_kind == SK_NONE || gc >= K || gc % 32 == 0)
                  && (as_kind != SK_E8M0 || ac % 32 == 0 || ac >= K) && (ws_kind != SK_E8M0 || gc % 32 == 0 || gc >= K);
    int avail = oq_wgemm_paths();
    int auto_path = path == PATH_AUTO;
    if (path == PATH_AUTO) path = (avail & (1 << PATH_AMX)) ? PATH_AMX : (avail & (1 << PATH_BF16)) ? PATH_BF16 : PATH_SCALAR;
    /* e2m1 weights, small M: the in-register decode (reads the 4-bit stream once, nothing stored) */
    if (q_fmt == FMT_E2M1 && M <= E2M1_AUTO_MAX_M && auto_path && (avail & (1 << PATH_BF16))) path = PATH_BF16;
    if (!aligned || !(avail & (1 << path))) path = PATH_SCALAR;
    int r = -1;
#ifdef WG_AMX
    if (path == PATH_AMX) r = run_amx(&p, nthreads);
#endif
#ifdef WG_BF16
    if (path == PATH_BF16) r = q_fmt == FMT_E2M1 && M <= E2M1_GEMV_MAX_M ? run_e2m1_gemv(&p, nthreads) : run_bf16(&p, nthreads);
#endif
    if (path == PATH_SCALAR) r = run_scalar(&p, nthreads);
    return bad && r > 0 ? -2 : r;
}

/* oq_wgemm with its 23 arguments packed as int64 / pointer values in v[0..22] (wmul: its float32
   bits in the low 32 bits of v[22]), in order: one
   pointer argument for the Python caller (ctypes converts 22 typed arguments in ~3 us, which
   is 5-10% of a 64 x 384 x 384 product; one packed buffer costs ~0.5 us). */
int oq_wgemm_v(const int64_t* v) {
    return oq_wgemm((int)v[0], (int)v[1], v[2], v[3], v[4], (const void*)(intptr_t)v[5], (int)v[6], (const void*)(intptr_t)v[7],
                    (int)v[8], v[9], v[10], v[11], (const uint8_t*)(intptr_t)v[12], (int)v[13], (const void*)(intptr_t)v[14],
                    (int)v[15], v[16], v[17], v[18], (const float*)(intptr_t)v[19], (int)v[20], (void*)(intptr_t)v[21],
                    f32_bits((uint32_t)v[22]));
}

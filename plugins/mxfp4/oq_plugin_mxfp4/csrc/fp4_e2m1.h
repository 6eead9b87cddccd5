/* fp4_e2m1.h: float32 -> e2m1 (FP4, OCP MX v1.0 section 5.3.3) codes for CPU kernels (oq-plugin-mxfp4).

   Exactly oq_plugin_mxfp4.fp4.e2m1_encode (torchao's f32_to_f4_unpacked): round to nearest, ties to
   the even code, saturating to +-6; the sign bit of the input becomes bit 3 of the code, so -0.0 and
   negatives that round to zero give code 8. NaN gives code 0 or 8 (its sign bit), as the torch
   encoder, whose comparisons are false for NaN (callers reject non-finite input first);
   oq_f32x16_to_e2m1_nonan is the faster AVX-512 form for input without NaN.
   Checked on dense float32 samples of [-8, 8], every tie point and its neighbours, -0.0 and tiny
   negatives, scalar and AVX-512 paths (tests/plugins/mxfp4/test_mxfp4_cpu_quant.py).

   Packing (oq_plugin_mxfp4.fp4.pack_fp4, torchao pack_uint4, compressed-tensors pack_fp4_to_uint8):
   element 2j in the low nibble of byte j, element 2j + 1 in the high nibble.

   Part of oq_plugin_mxfp4's package data (csrc/): kernels of other schemes with e2m1 elements
   (oq-plugin-nvfp4) include it by adding oq_plugin_mxfp4.cpu.CSRC_DIR to their include_dirs. */
#ifndef OQ_FP4_E2M1_H
#define OQ_FP4_E2M1_H

#include "oq_kernels.h"

/* The value of each of the 16 codes (fp4.E2M1_VALUES) */
static const float OQ_E2M1_VALUES[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                         -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

/* float32 -> e2m1 code (0-15). A magnitude passing k of the 7 decision points gets code k; at a tie
   the comparison is > where the code below is even (0.25, 1.25, 2.5, 5: stay down) and >= where the
   code above is even (0.75, 1.75, 3.5: go up). Float comparisons, so NaN passes none (fp4.py). */
OQ_INLINE uint8_t oq_f32_to_e2m1(float x) {
    uint32_t b; memcpy(&b, &x, 4);
    uint32_t ab = b & 0x7FFFFFFFu;
    float a; memcpy(&a, &ab, 4);
    uint32_t code = (uint32_t)(a > 0.25f) + (uint32_t)(a >= 0.75f) + (uint32_t)(a > 1.25f) + (uint32_t)(a >= 1.75f)
                  + (uint32_t)(a > 2.5f) + (uint32_t)(a >= 3.5f) + (uint32_t)(a > 5.0f);
    return (uint8_t)(code | ((b >> 28) & 8u));
}

/* Two codes -> one packed byte (c0 = element 2j in the low nibble) */
OQ_INLINE uint8_t oq_e2m1_pack2(uint8_t c0, uint8_t c1) { return (uint8_t)(c0 | (c1 << 4)); }

#ifdef OQ_AVX512
/* 16 lanes of oq_f32_to_e2m1: the codes (0-15) in the 32-bit lanes. Ordered comparisons (_OQ):
   false for NaN, as the scalar path. */
OQ_INLINE __m512i oq_f32x16_to_e2m1(__m512 x) {
    const __m512i one = _mm512_set1_epi32(1);
    __m512i b = _mm512_castps_si512(x);
    __m512 a = _mm512_castsi512_ps(_mm512_and_si512(b, _mm512_set1_epi32(0x7FFFFFFF)));
    __m512i c = _mm512_and_si512(_mm512_srli_epi32(b, 28), _mm512_set1_epi32(8));
    /* two independent chains of masked increments (shorter dependency chain than one) */
    __m512i d = _mm512_setzero_si512();
    c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(a, _mm512_set1_ps(0.25f), _CMP_GT_OQ), c, one);
    d = _mm512_mask_add_epi32(d, _mm512_cmp_ps_mask(a, _mm512_set1_ps(0.75f), _CMP_GE_OQ), d, one);
    c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(a, _mm512_set1_ps(1.25f), _CMP_GT_OQ), c, one);
    d = _mm512_mask_add_epi32(d, _mm512_cmp_ps_mask(a, _mm512_set1_ps(1.75f), _CMP_GE_OQ), d, one);
    c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(a, _mm512_set1_ps(2.5f), _CMP_GT_OQ), c, one);
    d = _mm512_mask_add_epi32(d, _mm512_cmp_ps_mask(a, _mm512_set1_ps(3.5f), _CMP_GE_OQ), d, one);
    c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(a, _mm512_set1_ps(5.0f), _CMP_GT_OQ), c, one);
    return _mm512_add_epi32(c, d);
}

/* oq_f32x16_to_e2m1 for non-NaN input (NaN gives 7 or 15, +-6), in integer and float arithmetic
   instead of compares into masks (those issue on one port only, the one that also widens bf16 and
   packs; these on two): about 10 % faster in the mxfp4 quantizer. |y| is first clamped to 6 on its
   bits; |y| >= 1: the float32 bits rebased to e2m1's exponent bias (1) and rounded to one mantissa
   bit, nearest even, with an integer add-and-shift; |y| < 1: 2|y| converted to an integer with
   the instruction's embedded nearest-even rounding (codes 0, 1, 2: 0.25 -> 0, 0.75 -> 2). */
OQ_INLINE __m512i oq_f32x16_to_e2m1_nonan(__m512 x) {
    __m512i b = _mm512_castps_si512(x);
    __m512i a = _mm512_min_epu32(_mm512_and_si512(b, _mm512_set1_epi32(0x7FFFFFFF)), _mm512_set1_epi32(0x40C00000));
    __m512i sub = _mm512_cvt_roundps_epi32(_mm512_add_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(a)),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512i t = _mm512_sub_epi32(a, _mm512_set1_epi32(126 << 23));  /* exponent rebased: 1.0 -> 1 << 23 */
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(t, 22), _mm512_set1_epi32(1));
    __m512i nrm = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(t, _mm512_set1_epi32(0x1FFFFF)), lsb), 22);
    __m512i lt1 = _mm512_srai_epi32(_mm512_sub_epi32(a, _mm512_set1_epi32(0x3F800000)), 31);  /* -1 where |y| < 1 */
    __m512i code = _mm512_ternarylogic_epi32(lt1, sub, nrm, 0xCA);                            /* lt1 ? sub : nrm */
    return _mm512_ternarylogic_epi32(_mm512_srli_epi32(b, 28), _mm512_set1_epi32(8), code, 0xEA);  /* | sign */
}

/* 16 codes (32-bit lanes, as oq_f32x16_to_e2m1 returns) -> 8 packed bytes in the low half of the
   result (byte j = lane 2j | lane 2j+1 << 4). */
OQ_INLINE __m128i oq_e2m1_pack16(__m512i codes) {
    /* 64-bit lane j holds lane 2j in bits 0-31 and lane 2j+1 in bits 32-63: >> 28 moves the
       latter to bits 4-7; the conversion keeps the low byte. */
    return _mm512_cvtepi64_epi8(_mm512_or_si512(codes, _mm512_srli_epi64(codes, 28)));
}

/* 32 codes (elements 0-15 in lo, 16-31 in hi) -> 16 packed bytes */
OQ_INLINE __m128i oq_e2m1_pack32(__m512i lo, __m512i hi) {
    return _mm_unpacklo_epi64(oq_e2m1_pack16(lo), oq_e2m1_pack16(hi));
}
#endif

#endif /* OQ_FP4_E2M1_H */

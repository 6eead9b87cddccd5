/* oq_kernels.h: C helpers shared by the scheme plugins' CPU kernels (oq-toolkit).

   Every NativeLibrary puts this directory on the include path (-I) and hashes this file into its
   cache key, so a kernel source just does #include "oq_kernels.h", and editing a helper here
   rebuilds every kernel that includes it.

   Element formats: dt = 0 float32, 1 bf16, 2 fp16. Every conversion to float32 here is exact
   (integer bit manipulation or an exact hardware conversion): the quantizers built on these loads
   reproduce the torch references byte for byte. No -ffast-math anywhere (see oq_toolkit.native).

   OQ_AVX512 is defined (and <immintrin.h> included) when the compiler targets AVX-512 F, BW and VL
   (-march=native on such a CPU) and OQ_GENERIC is not defined: kernels test it to pick their
   intrinsics paths; -DOQ_GENERIC builds the portable C loops only (how the tests check them). */
#ifndef OQ_KERNELS_H
#define OQ_KERNELS_H

#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(OQ_GENERIC)
#include <immintrin.h>
#define OQ_AVX512 1
#endif

#define OQ_INLINE static inline __attribute__((always_inline))

/* fp16 bits -> float32, exact (integer only): IEEE 754 binary16 -> binary32, subnormals normalized */
OQ_INLINE float half_to_f32(uint32_t h) {
    uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu, bits;
    if (e == 0x1F) bits = sign | 0x7F800000u | (m << 13);
    else if (e) bits = sign | ((e + 112u) << 23) | (m << 13);
    else if (!m) bits = sign;
    else { e = 113; while (!(m & 0x400u)) { m <<= 1; e--; } bits = sign | (e << 23) | ((m & 0x3FFu) << 13); }
    float f; memcpy(&f, &bits, 4); return f;
}

/* The bits of one element in format dt (float32 bits, or the 16 bits of bf16/fp16) -> float32, exact */
OQ_INLINE float bits_to_f32(uint32_t b, int dt) {
    if (dt == 2) return half_to_f32(b);
    if (dt == 1) b <<= 16;
    float f; memcpy(&f, &b, 4); return f;
}

/* Element i of w (format dt) as float32, exact */
OQ_INLINE float load1(const void* w, int dt, int64_t i) {
    if (dt == 0) return ((const float*)w)[i];
    return bits_to_f32(((const uint16_t*)w)[i], dt);
}

/* Software prefetch of element i of w (format dt) into all cache levels; never faults, a no-op
   without the builtin. Measured on this project's VM: the hardware prefetcher alone leaves
   streaming passes that compute per element stalled on memory (per-tensor fp8 4096x4096: 4 -> 9
   GB/s on one thread); OQ_PREFETCH_AHEAD elements (1 KB of bf16) ahead is enough. */
#define OQ_PREFETCH_AHEAD 512
#if defined(__GNUC__)
#define OQ_PREFETCH(w, dt, i) __builtin_prefetch((const char*)(w) + (i) * ((dt) == 0 ? 4 : 2), 0, 3)
#else
#define OQ_PREFETCH(w, dt, i) ((void)0)
#endif

#ifdef OQ_AVX512
/* Mask of the first min(r, 16) lanes (r >= 0: the elements left in a row) */
OQ_INLINE __mmask16 tailmask(int64_t r) { return r >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << r) - 1u); }

/* 16 elements of w (format dt) from element i as float32 (lanes outside m are 0, and their memory
   is not read), exact conversions */
OQ_INLINE __m512 load16(const void* w, int dt, int64_t i, __mmask16 m) {
    if (dt == 0) return _mm512_maskz_loadu_ps(m, (const float*)w + i);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t*)w + i);
    if (dt == 1) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}
#endif

#endif /* OQ_KERNELS_H */

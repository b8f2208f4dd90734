/* Shared by every fourbit CPU kernel: element types, exact conversions, ISA attributes, threads.
 *
 * Conversions round exactly as torch's CPU casts do (the reference's `.to(dtype)`):
 *   float32 -> bfloat16   round to nearest even on the bit pattern; any NaN becomes 0xffff (torch's
 *                         vectorised cast; measured: torch.full(n, nan).to(bfloat16) is 0xffff for n = 1..1000)
 *   float32 -> float16    IEEE round to nearest even (F16C's vcvtps2ph with imm 0, and our scalar twin);
 *                         overflow to inf, subnormals kept, NaN quieted with its sign (0x7e00 / 0xfe00)
 *   16-bit -> float32     exact.
 * Build flags include -ffp-contract=off: a multiply-add is fused only where written as fma, because the
 * reference rounds the product first everywhere else.
 */
#ifndef FOURBIT_CPU_COMMON_H
#define FOURBIT_CPU_COMMON_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define FB_X86 1
#include <immintrin.h>
#define FB_AVX2 __attribute__((target("avx2,fma,f16c,bmi2")))
#define FB_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2")))
#else
#define FB_X86 0
#endif

enum { FB_F32 = 0, FB_F16 = 1, FB_BF16 = 2, FB_F64 = 3 };   /* element types, as fourbit/cpu/_lib.py names them */
enum { FB_SCALAR = 0, FB_ISA_AVX2 = 1, FB_ISA_AVX512 = 2 };   /* instruction sets, best last */

extern int fb_isa; /* the instruction set every op uses; set once by fourbit_cpu_set_isa */

static inline uint32_t fb_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float fb_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline uint16_t fb_to_bf16(float f) {
    uint32_t u = fb_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0xffff;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float fb_from_bf16(uint16_t h) { return fb_float((uint32_t)h << 16); }

static inline uint16_t fb_to_f16(float f) {
    uint32_t u = fb_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u | (uint16_t)((a >> 13) & 0x3ffu);  /* NaN, quieted */
    if (a >= 0x477ff000u) return sign | 0x7c00u;    /* rounds to inf: |f| >= 65520 */
    if (a < 0x38800000u) {                           /* |f| < 2^-14: a float16 subnormal (or zero) */
        float r = fb_float(a) + 0.5f;                /* the sum's ulp is 2^-24, the subnormal step: one RNE rounding */
        return sign | (uint16_t)(fb_bits(r) - 0x3f000000u);
    }
    a += 0xc8000fffu + ((a >> 13) & 1u);             /* exponent rebias (-112 << 23) and RNE at bit 13 */
    return sign | (uint16_t)(a >> 13);
}

static inline float fb_from_f16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return fb_float(sign | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0));
    if (e == 0) return fb_float(sign | fb_bits((float)m * 0x1p-24f));
    return fb_float(sign | ((e + 112) << 23) | (m << 13));
}

static inline float fb_load(const void *p, int64_t i, int dtype) {
    switch (dtype) {
        case FB_F16: return fb_from_f16(((const uint16_t *)p)[i]);
        case FB_BF16: return fb_from_bf16(((const uint16_t *)p)[i]);
        case FB_F64: return (float)((const double *)p)[i];
        default: return ((const float *)p)[i];
    }
}

static inline void fb_store(void *p, int64_t i, float v, int dtype) {
    switch (dtype) {
        case FB_F16: ((uint16_t *)p)[i] = fb_to_f16(v); break;
        case FB_BF16: ((uint16_t *)p)[i] = fb_to_bf16(v); break;
        case FB_F64: ((double *)p)[i] = (double)v; break;
        default: ((float *)p)[i] = v;
    }
}

static inline int fb_dtype_size(int dtype) { return dtype == FB_F32 ? 4 : dtype == FB_F64 ? 8 : 2; }

/* Fork-join over [0, n): `fn(ctx, begin, end)` on up to `threads` threads (the caller is one of
 * them), ranges cut at multiples of `align`, none given fewer than `min_per_thread` items. */
typedef void (*fb_range_fn)(void *ctx, int64_t begin, int64_t end);
void fb_parallel_for(int64_t n, int64_t align, int64_t min_per_thread, int threads, fb_range_fn fn, void *ctx);

/* Hint 2 MiB pages for a large output that has not been touched yet (fresh torch.empty memory). */
void fb_hint_huge_pages(void *p, size_t bytes);

#if FB_X86
/* 8 float32 -> 8 bfloat16 / float16 (128 bits), rounded as above. */
FB_AVX2 static inline __m128i fb_bf16x8_avx2(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                                     _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
    r = _mm256_srli_epi32(r, 16);
    __m256i ordered = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_ORD_Q));
    r = _mm256_blendv_epi8(_mm256_set1_epi32(0xffff), r, ordered);
    r = _mm256_packus_epi32(r, r);                      /* in-lane: [0..3 0..3 | 4..7 4..7] */
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(r, 0x08));
}

FB_AVX2 static inline __m256 fb_load8_avx2(const void *p, int64_t i, int dtype) {
    switch (dtype) {
        case FB_F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
        case FB_BF16: return _mm256_castsi256_ps(_mm256_slli_epi32(
                          _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i))), 16));
        default: return _mm256_loadu_ps((const float *)p + i);
    }
}

FB_AVX2 static inline void fb_store8_avx2(void *p, int64_t i, __m256 v, int dtype) {
    switch (dtype) {
        case FB_F16: _mm_storeu_si128((__m128i *)((uint16_t *)p + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT)); break;
        case FB_BF16: _mm_storeu_si128((__m128i *)((uint16_t *)p + i), fb_bf16x8_avx2(v)); break;
        case FB_F64:
            _mm256_storeu_pd((double *)p + i, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
            _mm256_storeu_pd((double *)p + i + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
            break;
        default: _mm256_storeu_ps((float *)p + i, v);
    }
}

FB_AVX2 static inline float fb_hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#endif

/* Nearest entry of a sorted 256-entry code, exactly as fourbit/nf4/blockwise.py's nearest_code:
 * below = #{midpoints < s}, midpoints fl(c[j] + c[j+1]) * 0.5; s exactly on a midpoint goes to the
 * even index; NaN goes to 255 (torch.bucketize puts it past every boundary).
 *
 * A binary search costs 8 dependent probes per value. Instead a table indexed by the top bits of |s|
 * (sign, exponent, 7 mantissa bits; everything below 2^-32 in one bin, everything from 2 up in
 * another) gives, per bin, the nearest index `lo` of its smallest value. With 7 mantissa bits a bin
 * is narrower than the gap between the dynamic maps' midpoints, so it holds at most one midpoint
 * and s's index is lo + (s > mid[lo]) + (s == mid[lo] and lo odd). A bin that holds more (another
 * code may) is flagged and its values take the binary search. */
#ifndef FOURBIT_CPU_NEAREST_H
#define FOURBIT_CPU_NEAREST_H

#include "common.h"

#define FB_NEAREST_ELO 95                                 /* 2^-32: bin 0 is everything below */
#define FB_NEAREST_EHI 128                                /* 2^1: the last bin is everything from here */
#define FB_NEAREST_BINS ((FB_NEAREST_EHI - FB_NEAREST_ELO) * 128 + 2)
#define FB_NEAREST_COMPLEX 0x100

typedef struct {
    float code[256];
    float mid[256];                              /* 255 midpoints; mid[255] = NaN never compares true */
    uint16_t bins[2 * FB_NEAREST_BINS + 2];      /* positive bins, then negative; +2: 32-bit gathers read past */
    int simple;                                  /* no bin flagged complex */
} fb_nearest;

/* The table for `code` (256 float32, ascending), built once per distinct code and kept for the
 * process (a handful of codes: the two dynamic maps). Past FB_NEAREST_CACHED distinct codes the table
 * is built for the call alone: *owned then points at it and the caller frees it (a cached table is
 * never freed, so no thread can lose one it is reading). */
#define FB_NEAREST_CACHED 64
const fb_nearest *fb_nearest_for(const float *code, fb_nearest **owned);

static inline int fb_nearest_search(const fb_nearest *t, float s) {
    if (s != s) return 255;
    int lo = 0, hi = 255;                        /* lower bound: first midpoint >= s */
    while (lo < hi) {
        int m = (lo + hi) >> 1;
        if (t->mid[m] < s) lo = m + 1; else hi = m;
    }
    if (lo < 255 && t->mid[lo] == s && (lo & 1)) lo++;
    return lo;
}

static inline int fb_nearest_bin(float s) {
    uint32_t u = fb_bits(s), a = u & 0x7fffffffu;
    int32_t bin = (int32_t)(a >> 16) - (FB_NEAREST_ELO << 7) + 1;
    bin = bin < 0 ? 0 : (bin > FB_NEAREST_BINS - 1 ? FB_NEAREST_BINS - 1 : bin);
    return bin + ((u >> 31) ? FB_NEAREST_BINS : 0);
}

static inline int fb_nearest_index(const fb_nearest *t, float s) {
    int entry = t->bins[fb_nearest_bin(s)];
    if (s != s || (entry & FB_NEAREST_COMPLEX)) return fb_nearest_search(t, s);
    int lo = entry & 0xff;
    float m = t->mid[lo];
    return lo + (s > m) + ((s == m) & lo & 1);
}

#if FB_X86
/* Indices (dword lanes) of 8 values. */
FB_AVX2 static inline __m256i fb_nearest8_avx2(const fb_nearest *t, __m256 s) {
    __m256i u = _mm256_castps_si256(s);
    __m256i bin = _mm256_sub_epi32(_mm256_srli_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), 16),
                                   _mm256_set1_epi32((FB_NEAREST_ELO << 7) - 1));
    bin = _mm256_min_epi32(_mm256_max_epi32(bin, _mm256_setzero_si256()), _mm256_set1_epi32(FB_NEAREST_BINS - 1));
    bin = _mm256_add_epi32(bin, _mm256_and_si256(_mm256_srai_epi32(u, 31), _mm256_set1_epi32(FB_NEAREST_BINS)));
    __m256i entry = _mm256_i32gather_epi32((const int *)t->bins, bin, 2);
    __m256i lo = _mm256_and_si256(entry, _mm256_set1_epi32(0xff));
    __m256 m = _mm256_i32gather_ps(t->mid, lo, 4);
    __m256i above = _mm256_castps_si256(_mm256_cmp_ps(s, m, _CMP_GT_OQ));
    __m256i tie = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(s, m, _CMP_EQ_OQ)), _mm256_slli_epi32(lo, 31));
    __m256i q = _mm256_sub_epi32(_mm256_sub_epi32(lo, above), _mm256_srai_epi32(tie, 31));
    __m256i slow = _mm256_or_si256(_mm256_and_si256(entry, _mm256_set1_epi32(FB_NEAREST_COMPLEX)),
                                   _mm256_castps_si256(_mm256_cmp_ps(s, s, _CMP_UNORD_Q)));
    if (!_mm256_testz_si256(slow, slow)) {
        uint32_t lanes[8];
        float vals[8];
        _mm256_storeu_si256((__m256i *)lanes, q);
        _mm256_storeu_ps(vals, s);
        for (int i = 0; i < 8; i++) lanes[i] = (uint32_t)fb_nearest_index(t, vals[i]);
        q = _mm256_loadu_si256((const __m256i *)lanes);
    }
    return q;
}
#endif

#endif

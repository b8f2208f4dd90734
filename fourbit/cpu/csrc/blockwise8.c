/* 8-bit blockwise quantize / dequantize with a 256-entry code, equal bit for bit to
 * fourbit/nf4/blockwise.py (double quantization's nested scales, the 8-bit optimizer states):
 *   absmax[b] = max |x| over the block (NaN if the block holds one); s = fl(x * fl(1 / absmax[b]));
 *   q = nearest(code, s) (nearest.h), 0 for a whole block whose absmax is 0;
 *   dequantize: to_dtype(fl(code[q] * absmax[b])). */
#include "nearest.h"

#include <pthread.h>
#include <stdlib.h>

static pthread_mutex_t nearest_lock = PTHREAD_MUTEX_INITIALIZER;
static fb_nearest *nearest_cache[FB_NEAREST_CACHED];

static void nearest_build(fb_nearest *t, const float *code) {
    memcpy(t->code, code, sizeof t->code);
    for (int j = 0; j < 255; j++) t->mid[j] = (code[j] + code[j + 1]) * 0.5f;
    t->mid[255] = NAN;
    t->simple = 1;
    for (int side = 0; side < 2; side++) {
        for (int bin = 0; bin < FB_NEAREST_BINS; bin++) {
            /* |s| range of the bin as bit patterns [a0, a1] */
            uint32_t a0 = bin == 0 ? 0u : (uint32_t)(bin - 1 + (FB_NEAREST_ELO << 7)) << 16;
            uint32_t a1 = bin == 0 ? ((uint32_t)FB_NEAREST_ELO << 23) - 1u
                        : bin == FB_NEAREST_BINS - 1 ? 0x7f800000u : a0 | 0xffffu;
            float s0 = fb_float(a0 | (side ? 0x80000000u : 0)), s1 = fb_float(a1 | (side ? 0x80000000u : 0));
            if (side) { float tmp = s0; s0 = s1; s1 = tmp; }  /* negative: larger magnitude first */
            int lo = fb_nearest_search(t, s0), hi = fb_nearest_search(t, s1);
            int ok = hi - lo <= 1;  /* then every s of the bin has index lo or lo + 1: nearest.h's formula */
            t->bins[side * FB_NEAREST_BINS + bin] = (uint16_t)(lo | (ok ? 0 : FB_NEAREST_COMPLEX));
            t->simple &= ok;
        }
    }
    t->bins[2 * FB_NEAREST_BINS] = t->bins[2 * FB_NEAREST_BINS + 1] = 0;
}

const fb_nearest *fb_nearest_for(const float *code, fb_nearest **owned) {
    const fb_nearest *found = NULL;
    *owned = NULL;
    pthread_mutex_lock(&nearest_lock);
    int i = 0;
    for (; i < FB_NEAREST_CACHED && nearest_cache[i]; i++)
        if (!memcmp(nearest_cache[i]->code, code, sizeof nearest_cache[i]->code)) { found = nearest_cache[i]; break; }
    if (!found) {
        fb_nearest *t = (fb_nearest *)malloc(sizeof *t);
        if (t) {
            nearest_build(t, code);
            if (i < FB_NEAREST_CACHED) nearest_cache[i] = t;  /* kept for the process */
            else *owned = t;                                  /* the cache is full: the caller frees it */
            found = t;
        }
    }
    pthread_mutex_unlock(&nearest_lock);
    return found;
}

typedef struct {
    const void *x;
    int dtype;
    int64_t n, bs;
    const fb_nearest *t;
    uint8_t *q;
    float *absmax;
} qb_ctx;

static float qb_absmax_scalar(const void *x, int dtype, int64_t e, int64_t end, float m) {
    for (; e < end; e++) {
        float a = fabsf(fb_load(x, e, dtype));
        m = (a > m || a != a) ? a : m;   /* NaN sticks, as torch's amax */
    }
    return m;
}

static void qb_portable(void *arg, int64_t b0, int64_t b1) {
    qb_ctx *c = (qb_ctx *)arg;
    for (int64_t b = b0; b < b1; b++) {
        int64_t e0 = b * c->bs, end = e0 + c->bs < c->n ? e0 + c->bs : c->n;
        float m = qb_absmax_scalar(c->x, c->dtype, e0, end, 0.0f);
        c->absmax[b] = m;
        float r = 1.0f / m;
        for (int64_t e = e0; e < end; e++)
            c->q[e] = m == 0.0f ? 0 : (uint8_t)fb_nearest_index(c->t, fb_load(c->x, e, c->dtype) * r);
    }
}

#if FB_X86
FB_AVX2 static inline uint64_t fb_pack8_avx2(__m256i q) {
    /* dword lanes 0..255 -> 8 bytes */
    __m256i w = _mm256_packus_epi32(q, q);          /* [0..3 0..3 | 4..7 4..7] words */
    __m128i lo = _mm256_castsi256_si128(w), hi = _mm256_extracti128_si256(w, 1);
    __m128i bytes = _mm_packus_epi16(_mm_unpacklo_epi64(lo, hi), _mm_setzero_si128());
    return (uint64_t)_mm_cvtsi128_si64(bytes);
}

FB_AVX2 float fb_absmax_avx2(const void *x, int dtype, int64_t e, int64_t end) {
    __m256 m8 = _mm256_setzero_ps(), nan8 = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (; e + 8 <= end; e += 8) {
        __m256 a = _mm256_andnot_ps(sign, fb_load8_avx2(x, e, dtype));
        nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
        m8 = _mm256_max_ps(m8, a);
    }
    float lanes[8], m = 0.0f;
    _mm256_storeu_ps(lanes, m8);
    for (int i = 0; i < 8; i++) m = lanes[i] > m ? lanes[i] : m;
    if (_mm256_movemask_ps(nan8)) m = NAN;
    return qb_absmax_scalar(x, dtype, e, end, m);
}

FB_AVX2 static void qb_avx2(void *arg, int64_t b0, int64_t b1) {
    qb_ctx *c = (qb_ctx *)arg;
    for (int64_t b = b0; b < b1; b++) {
        int64_t e0 = b * c->bs, end = e0 + c->bs < c->n ? e0 + c->bs : c->n, e = e0;
        float m = fb_absmax_avx2(c->x, c->dtype, e0, end);
        c->absmax[b] = m;
        if (m == 0.0f) { memset(c->q + e0, 0, (size_t)(end - e0)); continue; }
        float r = 1.0f / m;
        const __m256 r8 = _mm256_set1_ps(r);
        for (; e + 8 <= end; e += 8) {
            uint64_t bytes = fb_pack8_avx2(fb_nearest8_avx2(c->t, _mm256_mul_ps(fb_load8_avx2(c->x, e, c->dtype), r8)));
            memcpy(c->q + e, &bytes, 8);
        }
        for (; e < end; e++) c->q[e] = (uint8_t)fb_nearest_index(c->t, fb_load(c->x, e, c->dtype) * r);
    }
}
#endif

int fourbit_quantize_blockwise(const void *x, int dtype, int64_t n, int64_t bs, const float *code, uint8_t *q,
                               float *absmax, int threads) {
    fb_nearest *owned;
    const fb_nearest *t = fb_nearest_for(code, &owned);
    if (!t) return -1;
    qb_ctx c = {x, dtype, n, bs, t, q, absmax};
    fb_range_fn fn = qb_portable;
#if FB_X86
    if (fb_isa >= FB_ISA_AVX2) fn = qb_avx2;
#endif
    fb_parallel_for((n + bs - 1) / bs, 1, (1 << 15) / bs + 1, threads, fn, &c);
    free(owned);
    return 0;
}

typedef struct {
    const uint8_t *q;
    int64_t n, bs;
    const float *code, *absmax;
    void *out;
    int dtype;
} db_ctx;

static void db_portable(void *arg, int64_t b0, int64_t b1) {
    db_ctx *c = (db_ctx *)arg;
    for (int64_t b = b0; b < b1; b++) {
        int64_t e = b * c->bs, end = e + c->bs < c->n ? e + c->bs : c->n;
        float s = c->absmax[b];
        for (; e < end; e++) fb_store(c->out, e, c->code[c->q[e]] * s, c->dtype);
    }
}

#if FB_X86
FB_AVX2 static void db_avx2(void *arg, int64_t b0, int64_t b1) {
    db_ctx *c = (db_ctx *)arg;
    for (int64_t b = b0; b < b1; b++) {
        int64_t e = b * c->bs, end = e + c->bs < c->n ? e + c->bs : c->n;
        float s = c->absmax[b];
        const __m256 s8 = _mm256_set1_ps(s);
        for (; e + 8 <= end; e += 8) {
            __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c->q + e)));
            fb_store8_avx2(c->out, e, _mm256_mul_ps(_mm256_i32gather_ps(c->code, idx, 4), s8), c->dtype);
        }
        for (; e < end; e++) fb_store(c->out, e, c->code[c->q[e]] * s, c->dtype);
    }
}
#endif

int fourbit_dequantize_blockwise(const uint8_t *q, int64_t n, int64_t bs, const float *code, const float *absmax,
                                 void *out, int dtype, int threads) {
    db_ctx c = {q, n, bs, code, absmax, out, dtype};
    fb_range_fn fn = db_portable;
#if FB_X86
    if (fb_isa >= FB_ISA_AVX2) fn = db_avx2;
#endif
    fb_parallel_for((n + bs - 1) / bs, 1, (1 << 16) / bs + 1, threads, fn, &c);
    return 0;
}

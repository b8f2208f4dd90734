/* 4-bit blockwise quantize / dequantize (NF4, FP4), equal bit for bit to fourbit/nf4/quant.py.
 *
 * Layout: x flat (n,), blocks of `bs` consecutive elements (blocks cross rows), packed byte j holds
 * element 2j in its high nibble and 2j+1 in its low one; an odd n pads the last low nibble with the
 * code of 0.0.
 *   quantize:    absmax[b] = max |x|; s = fl(x * fl(1 / max(absmax[b], 1e-38)));
 *                nf4: q = #{thresholds < s};  fp4: q = bits[#{thresholds < |s|}] | (s < 0) << 3
 *   dequantize:  out[i] = to_dtype(fl(code[q[i]] * scale[i / bs])), scale = absmax, or with double
 *                quantization fl(code8[qabs[b]] * absmax2[b / 256]) + offset (two roundings).
 *
 * AVX2 decode of 8 values from 4 packed bytes: broadcast the 32-bit word, shift each lane so its
 * nibble's low 3 bits index `vpermps` into the codes 0-7 and 8-15 (two registers), and its bit 3 lands
 * on the sign bit that `vblendvps` reads: 6 vector instructions per 8 weights, scale applied once per
 * 8 by one multiply (the reference's own rounding). AVX-512: `vpermps` on a zmm reads 16 entries, so
 * one lookup per 16 weights. */
#include "common.h"

typedef struct {
    const uint8_t *packed;
    int64_t n, bs;
    const float *code;              /* (16,) */
    const float *absmax;            /* (nb,) float32 scales, or with nested: */
    const uint8_t *qabs;            /* (nb,) 8-bit codes of absmax - offset */
    const float *absmax2, *code8;   /* (ceil(nb / nbs),), (256,) */
    float offset;
    int nbs_log2;                   /* nested blocks hold 2^nbs_log2 scales (256) */
    int64_t b0;                     /* block number of element 0 (a chunk of a larger weight) */
    void *out;
    int dtype;
} deq4_ctx;

static inline float deq4_scale(const deq4_ctx *c, int64_t b) {
    b += c->b0;
    if (c->qabs) {
        float s = c->code8[c->qabs[b]] * c->absmax2[b >> c->nbs_log2];
        return s + c->offset;
    }
    return c->absmax[b];
}

static inline int nibble(const uint8_t *packed, int64_t i) { return (packed[i >> 1] >> ((i & 1) ? 0 : 4)) & 15; }

static void deq4_scalar(const deq4_ctx *c, int64_t e, int64_t end, float scale) {
    for (; e < end; e++) fb_store(c->out, e, c->code[nibble(c->packed, e)] * scale, c->dtype);
}

#if FB_X86
/* 8 codes from the 4 bytes at p (element order) */
#define DEQ4_DECODE8(p)                                                                                   \
    ({                                                                                                   \
        __m256i v_ = _mm256_castps_si256(_mm256_broadcast_ss((const float *)(p)));                      \
        __m256i i_ = _mm256_srlv_epi32(v_, right);                                                       \
        _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, i_), _mm256_permutevar8x32_ps(hi, i_),              \
                         _mm256_castsi256_ps(_mm256_sllv_epi32(v_, left)));                             \
    })

/* 16 float32 -> 16 bfloat16 when none is NaN (a finite block scale: |code| <= 1), 2 shuffles per 16 */
FB_AVX2 static inline __m256i bf16x16_finite(__m256 a, __m256 b) {
    const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff);
    __m256i ua = _mm256_castps_si256(a), ub = _mm256_castps_si256(b);
    ua = _mm256_srli_epi32(_mm256_add_epi32(ua, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(ua, 16), one))), 16);
    ub = _mm256_srli_epi32(_mm256_add_epi32(ub, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(ub, 16), one))), 16);
    return _mm256_permute4x64_epi64(_mm256_packus_epi32(ua, ub), 0xd8);  /* [a0-3 b0-3 | a4-7 b4-7] -> in order */
}

FB_AVX2 static void deq4_avx2(void *arg, int64_t b0, int64_t b1) {
    const deq4_ctx *c = (const deq4_ctx *)arg;
    const __m256 lo = _mm256_loadu_ps(c->code), hi = _mm256_loadu_ps(c->code + 8);
    const __m256i right = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);  /* nibble i of the word -> bits 0-3 */
    const __m256i left = _mm256_setr_epi32(24, 28, 16, 20, 8, 12, 0, 4);   /* its bit 3 -> bit 31 */
    for (int64_t b = b0; b < b1; b++) {
        int64_t e = b * c->bs, end = e + c->bs < c->n ? e + c->bs : c->n;
        const float scale = deq4_scale(c, b);
        const __m256 s = _mm256_set1_ps(scale);
        const uint8_t *q = c->packed;
        if (c->dtype == FB_BF16 && isfinite(scale)) {
            for (; e + 16 <= end; e += 16) {
                __m256 w0 = _mm256_mul_ps(DEQ4_DECODE8(q + (e >> 1)), s), w1 = _mm256_mul_ps(DEQ4_DECODE8(q + (e >> 1) + 4), s);
                _mm256_storeu_si256((__m256i *)((uint16_t *)c->out + e), bf16x16_finite(w0, w1));
            }
        } else if (c->dtype == FB_F32) {
            for (; e + 16 <= end; e += 16) {
                _mm256_storeu_ps((float *)c->out + e, _mm256_mul_ps(DEQ4_DECODE8(q + (e >> 1)), s));
                _mm256_storeu_ps((float *)c->out + e + 8, _mm256_mul_ps(DEQ4_DECODE8(q + (e >> 1) + 4), s));
            }
        }
        for (; e + 8 <= end; e += 8) fb_store8_avx2(c->out, e, _mm256_mul_ps(DEQ4_DECODE8(q + (e >> 1)), s), c->dtype);
        deq4_scalar(c, e, end, scale);
    }
}

FB_AVX512 static void deq4_avx512(void *arg, int64_t b0, int64_t b1) {
    const deq4_ctx *c = (const deq4_ctx *)arg;
    const __m512 table = _mm512_loadu_ps(c->code);
    const __m512i pick = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m512i right = _mm512_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24, 4, 0, 12, 8, 20, 16, 28, 24);
    for (int64_t b = b0; b < b1; b++) {
        int64_t e = b * c->bs, end = e + c->bs < c->n ? e + c->bs : c->n;
        const __m512 s = _mm512_set1_ps(deq4_scale(c, b));
        for (; e + 16 <= end; e += 16) {
            __m512i v = _mm512_castsi128_si512(_mm_loadl_epi64((const __m128i *)(c->packed + (e >> 1))));
            __m512i idx = _mm512_srlv_epi32(_mm512_permutexvar_epi32(pick, v), right);
            __m512 w = _mm512_mul_ps(_mm512_permutexvar_ps(idx, table), s);
            switch (c->dtype) {
                case FB_F16: _mm256_storeu_si256((__m256i *)((uint16_t *)c->out + e), _mm512_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT)); break;
                case FB_BF16:
                    fb_store8_avx2(c->out, e, _mm512_castps512_ps256(w), FB_BF16);
                    fb_store8_avx2(c->out, e + 8, _mm512_extractf32x8_ps(w, 1), FB_BF16);
                    break;
                case FB_F64:
                    _mm512_storeu_pd((double *)c->out + e, _mm512_cvtps_pd(_mm512_castps512_ps256(w)));
                    _mm512_storeu_pd((double *)c->out + e + 8, _mm512_cvtps_pd(_mm512_extractf32x8_ps(w, 1)));
                    break;
                default: _mm512_storeu_ps((float *)c->out + e, w);
            }
        }
        deq4_scalar(c, e, end, deq4_scale(c, b));
    }
}
#endif

static void deq4_portable(void *arg, int64_t b0, int64_t b1) {
    const deq4_ctx *c = (const deq4_ctx *)arg;
    for (int64_t b = b0; b < b1; b++) {
        int64_t e = b * c->bs, end = e + c->bs < c->n ? e + c->bs : c->n;
        deq4_scalar(c, e, end, deq4_scale(c, b));
    }
}

/* Elements [e0, e0 + n) of the weight (e0 a multiple of bs) into out[0, n). */
int fourbit_dequantize_4bit(const uint8_t *packed, int64_t e0, int64_t n, int64_t bs, const float *code,
                            const float *absmax, const uint8_t *qabs, const float *absmax2, const float *code8,
                            float offset, int64_t nested_bs, void *out, int dtype, int threads) {
    if (e0 % bs || nested_bs < 1 || (nested_bs & (nested_bs - 1))) return -1;
    deq4_ctx c = {packed + e0 / 2, n, bs, code, absmax, qabs, absmax2, code8, offset, __builtin_ctzll(nested_bs), e0 / bs,
                  out, dtype};
    int64_t nb = (n + bs - 1) / bs;
    fb_range_fn fn = deq4_portable;
#if FB_X86
    if (fb_isa == FB_ISA_AVX512) fn = deq4_avx512;
    else if (fb_isa == FB_ISA_AVX2) fn = deq4_avx2;
#endif
    fb_hint_huge_pages(out, (size_t)n * fb_dtype_size(dtype));
    fb_parallel_for(nb, 1, (1 << 16) / bs + 1, threads, fn, &c);
    return 0;
}

/* ---- quantize ---------------------------------------------------------------------------------- */
typedef struct {
    const void *x;
    int dtype;
    int64_t n, bs;
    int fp4;
    const float *thresholds;   /* nf4: 15 ascending; fp4: 7 magnitude thresholds */
    const uint8_t *fp4_bits;   /* (8,) magnitude rank -> low 3 bits */
    uint8_t *packed;
    float *absmax;
    int nonfinite;             /* set by any thread that meets NaN or inf (the caller then raises) */
} q4_ctx;

static inline int q4_encode(const q4_ctx *c, float s) {
    int q = 0;
    if (!c->fp4) {
        for (int t = 0; t < 15; t++) q += c->thresholds[t] < s;
        return q;
    }
    float a = fabsf(s);
    for (int t = 0; t < 7; t++) q += c->thresholds[t] < a;
    return c->fp4_bits[q] | ((s < 0.0f) << 3);
}

static void q4_block_scalar(q4_ctx *c, int64_t e, int64_t end, float recip) {
    for (; e < end; e += 2) {
        int hi = q4_encode(c, fb_load(c->x, e, c->dtype) * recip);
        int lo = q4_encode(c, e + 1 < end ? fb_load(c->x, e + 1, c->dtype) * recip : 0.0f);
        c->packed[e >> 1] = (uint8_t)(hi << 4 | lo);
    }
}

static void q4_portable(void *arg, int64_t b0, int64_t b1) {
    q4_ctx *c = (q4_ctx *)arg;
    for (int64_t b = b0; b < b1; b++) {
        int64_t e0 = b * c->bs, end = e0 + c->bs < c->n ? e0 + c->bs : c->n;
        float m = 0.0f;
        int bad = 0;
        for (int64_t e = e0; e < end; e++) {
            float a = fabsf(fb_load(c->x, e, c->dtype));
            bad |= !(a < INFINITY);
            m = a > m ? a : m;
        }
        if (bad) { __atomic_store_n(&c->nonfinite, 1, __ATOMIC_RELAXED); m = NAN; }
        c->absmax[b] = m;
        q4_block_scalar(c, e0, end, 1.0f / (m > 1e-38f ? m : 1e-38f));
    }
}

#if FB_X86
FB_AVX2 static void q4_avx2(void *arg, int64_t b0, int64_t b1) {
    q4_ctx *c = (q4_ctx *)arg;
    const __m256 sign = _mm256_set1_ps(-0.0f), inf = _mm256_set1_ps(INFINITY);
    const __m256i nibbles = _mm256_setr_epi8(0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                             0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    __m256 t[15];
    int nt = c->fp4 ? 7 : 15;
    for (int i = 0; i < nt; i++) t[i] = _mm256_set1_ps(c->thresholds[i]);
    for (int64_t b = b0; b < b1; b++) {
        int64_t e0 = b * c->bs, end = e0 + c->bs < c->n ? e0 + c->bs : c->n, e = e0;
        __m256 m8 = _mm256_setzero_ps(), bad8 = _mm256_setzero_ps();
        for (; e + 8 <= end; e += 8) {
            __m256 a = _mm256_andnot_ps(sign, fb_load8_avx2(c->x, e, c->dtype));
            bad8 = _mm256_or_ps(bad8, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));
            m8 = _mm256_max_ps(m8, a);
        }
        float m = 0.0f, lanes[8];
        _mm256_storeu_ps(lanes, m8);
        for (int i = 0; i < 8; i++) m = lanes[i] > m ? lanes[i] : m;
        int bad = _mm256_movemask_ps(bad8) != 0;
        for (; e < end; e++) {
            float a = fabsf(fb_load(c->x, e, c->dtype));
            bad |= !(a < INFINITY);
            m = a > m ? a : m;
        }
        if (bad) { __atomic_store_n(&c->nonfinite, 1, __ATOMIC_RELAXED); m = NAN; }
        c->absmax[b] = m;
        float recip = 1.0f / (m > 1e-38f ? m : 1e-38f);
        const __m256 r = _mm256_set1_ps(recip);
        for (e = e0; e + 8 <= end; e += 8) {
            __m256 s = _mm256_mul_ps(fb_load8_avx2(c->x, e, c->dtype), r);
            __m256i q = _mm256_setzero_si256();
            __m256 key = c->fp4 ? _mm256_andnot_ps(sign, s) : s;
            for (int i = 0; i < nt; i++) q = _mm256_sub_epi32(q, _mm256_castps_si256(_mm256_cmp_ps(t[i], key, _CMP_LT_OQ)));
            if (c->fp4) {
                uint32_t ranks[8];
                _mm256_storeu_si256((__m256i *)ranks, q);
                for (int i = 0; i < 8; i++) ranks[i] = c->fp4_bits[ranks[i]];
                q = _mm256_or_si256(_mm256_loadu_si256((const __m256i *)ranks),
                                    _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(s, _mm256_setzero_ps(), _CMP_LT_OQ)),
                                                     _mm256_set1_epi32(8)));
            }
            /* qword j holds codes 2j (low dword) and 2j+1: (low << 4) | high is byte j in bits 0-7 */
            __m256i pairs = _mm256_or_si256(_mm256_slli_epi64(q, 4), _mm256_srli_epi64(q, 32));
            __m256i bytes = _mm256_shuffle_epi8(pairs, nibbles);
            uint32_t word = (uint32_t)(_mm256_extract_epi16(bytes, 0) & 0xffff) | (uint32_t)_mm256_extract_epi16(bytes, 8) << 16;
            memcpy(c->packed + (e >> 1), &word, 4);
        }
        q4_block_scalar(c, e, end, recip);
    }
}
#endif

int fourbit_quantize_4bit(const void *x, int dtype, int64_t n, int64_t bs, int fp4, const float *thresholds,
                          const uint8_t *fp4_bits, uint8_t *packed, float *absmax, int threads) {
    q4_ctx c = {x, dtype, n, bs, fp4, thresholds, fp4_bits, packed, absmax, 0};
    int64_t nb = (n + bs - 1) / bs;
    fb_range_fn fn = q4_portable;
#if FB_X86
    if (fb_isa >= FB_ISA_AVX2) fn = q4_avx2;
#endif
    fb_parallel_for(nb, 1, (1 << 15) / bs + 1, threads, fn, &c);
    return c.nonfinite;
}

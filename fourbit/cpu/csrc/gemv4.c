/* y = x @ W^T + bias for a few rows of x (decode, M <= a few dozen) against a 4-bit weight W: [N, K].
 *
 * The weight is decoded in registers and never written: per 8 weights, one 32-bit load, two shifts,
 * two vpermps and a blend give the float32 codes (quant4.c), one FMA per row of x accumulates them.
 * The block scale multiplies each block's partial sum once: y[m, n] = sum_b s_b * sum_{k in b} c_k x_mk,
 * float32 throughout (W's values are exact there; x is widened exactly), rounded once to x's dtype.
 * The reference (`fourbit.nf4.matmul`) rounds W to x's dtype and runs F.linear: the two agree within
 * F.linear's own tolerance against float64 (tests/test_cpu_kernels.py), not bit for bit.
 *
 * Rows of W are split over threads. Tiles of up to 4 rows of x share one decode; a single row keeps
 * four partial sums so that the FMA latency (4 cycles) hides behind the decode. A weight whose rows
 * do not start on a block boundary (K % blocksize != 0) decodes each row into a float32 scratch row
 * first (scalar decode, then the same dot products). */
#include "common.h"

#include <stdlib.h>

typedef struct {
    const float *x;          /* (M, K) float32 */
    int64_t M, K, N, bs;
    const uint8_t *packed;
    const float *code, *absmax;
    const uint8_t *qabs;
    const float *absmax2, *code8;
    float offset;
    int nbs_log2;                   /* nested blocks hold 2^nbs_log2 scales (256) */
    const float *bias;       /* (N,) float32 or NULL */
    void *out;               /* (M, N) */
    int dtype;
#if FB_X86
    __m256i tables[4];       /* byte k of each of the 16 codes, in both lanes (DECODE32) */
#endif
} gemv_ctx;

static inline float gemv_scale(const gemv_ctx *c, int64_t b) {
    if (c->qabs) {
        float s = c->code8[c->qabs[b]] * c->absmax2[b >> c->nbs_log2];
        return s + c->offset;
    }
    return c->absmax[b];
}

static void gemv_row_decode(const gemv_ctx *c, int64_t n, float *w) {
    for (int64_t k = 0, e = n * c->K; k < c->K; k++, e++)
        w[k] = c->code[(c->packed[e >> 1] >> ((e & 1) ? 0 : 4)) & 15] * gemv_scale(c, e / c->bs);
}

static void gemv_store(const gemv_ctx *c, int64_t m, int64_t n, float acc) {
    if (c->bias) acc += c->bias[n];
    fb_store(c->out, m * c->N + n, acc, c->dtype);
}

static void gemv_portable(void *arg, int64_t n0, int64_t n1) {
    const gemv_ctx *c = (const gemv_ctx *)arg;
    float *w = (float *)malloc((size_t)(c->K > 0 ? c->K : 1) * sizeof(float));
    if (!w) return;
    for (int64_t n = n0; n < n1; n++) {
        gemv_row_decode(c, n, w);
        for (int64_t m = 0; m < c->M; m++) {
            float acc = 0.0f;
            const float *xm = c->x + m * c->K;
            for (int64_t k = 0; k < c->K; k++) acc += w[k] * xm[k];
            gemv_store(c, m, n, acc);
        }
    }
    free(w);
}

#if FB_X86
/* Decode 32 weights (16 packed bytes) to float32 with byte shuffles: the 16 codes' bytes make four
 * 16-entry byte tables (tab[0..3], each broadcast to both lanes), so vpshufb looks up 32 nibbles per
 * instruction, and two rounds of unpacks interleave the four byte planes into float32 lanes. The
 * bytes are broadcast to both lanes, lane 0 keeps the high nibbles (even elements), lane 1 the low
 * ones (odd elements), so no widening shuffle is needed; the lanes then come out in the order
 * (0 2 4 6 | 1 3 5 7) within every 8 elements, and x is permuted once per call to match
 * (gemv_permute_x). 12 shuffles, 2 integer ops per 32 weights against 16 vpermps and 8 blends for
 * the 8-at-a-time lookup of quant4.c: 10.9 against 7.0 G weights/s on one core here (L2-resident
 * weight), since this CPU issues shuffles on two pipes. */
#define DECODE32(q, w0, w1, w2, w3)                                                                       \
    do {                                                                                                 \
        __m256i b_ = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(q)));                 \
        __m256i i_ = _mm256_and_si256(_mm256_srlv_epi64(b_, nib_shift), low4);                           \
        __m256i p0_ = _mm256_shuffle_epi8(tab0, i_), p1_ = _mm256_shuffle_epi8(tab1, i_);                \
        __m256i p2_ = _mm256_shuffle_epi8(tab2, i_), p3_ = _mm256_shuffle_epi8(tab3, i_);                \
        __m256i l01_ = _mm256_unpacklo_epi8(p0_, p1_), h01_ = _mm256_unpackhi_epi8(p0_, p1_);            \
        __m256i l23_ = _mm256_unpacklo_epi8(p2_, p3_), h23_ = _mm256_unpackhi_epi8(p2_, p3_);            \
        w0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01_, l23_));                                     \
        w1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01_, l23_));                                     \
        w2 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01_, h23_));                                     \
        w3 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01_, h23_));                                     \
    } while (0)

#define DECODE_CONSTANTS                                                                                 \
    const __m256i tab0 = c->tables[0], tab1 = c->tables[1], tab2 = c->tables[2], tab3 = c->tables[3];   \
    const __m256i nib_shift = _mm256_setr_epi64x(4, 4, 0, 0), low4 = _mm256_set1_epi8(15)

/* rows [n0, n1) of W against MT rows of x (permuted) starting at m0; K % bs == 0, bs % 32 == 0 */
__attribute__((always_inline)) FB_AVX2 static inline void gemv_tile_avx2(const gemv_ctx *c, int64_t n0, int64_t n1,
                                                                          int64_t m0, const int MT) {
    DECODE_CONSTANTS;
    const int64_t K = c->K, bs = c->bs, per_row = K / bs;
    const float *x = c->x + m0 * K;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = c->packed + (n * K >> 1);
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t j = 0; j < per_row; j++) {
            const __m256 s = _mm256_set1_ps(gemv_scale(c, n * per_row + j));
            const uint8_t *q = row + (j * bs >> 1);
            const float *xb = x + j * bs;
            /* independent partial sums: an FMA's 4-cycle latency must hide behind the decode, so one
             * row of x keeps four chains and more rows two each (one chain per row left x = 1 at
             * 2.7 weights per cycle against 3.5 with four, L2-resident) */
            const int NACC = MT == 1 ? 4 : 2;  /* a constant once inlined (MT is) */
            __m256 a[4][4];
            for (int m = 0; m < MT; m++)
                for (int i = 0; i < NACC; i++) a[m][i] = _mm256_setzero_ps();
            for (int64_t k = 0; k < bs; k += 32, q += 16) {
                __m256 w0, w1, w2, w3;
                DECODE32(q, w0, w1, w2, w3);
                for (int m = 0; m < MT; m++) {
                    const float *xm = xb + m * K + k;
                    a[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), a[m][0]);
                    a[m][1 % NACC] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), a[m][1 % NACC]);
                    a[m][2 % NACC] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xm + 16), a[m][2 % NACC]);
                    a[m][3 % NACC] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xm + 24), a[m][3 % NACC]);
                }
            }
            for (int m = 0; m < MT; m++) {
                __m256 sum = _mm256_add_ps(a[m][0], a[m][1]);
                if (NACC == 4) sum = _mm256_add_ps(sum, _mm256_add_ps(a[m][2 % NACC], a[m][3 % NACC]));
                acc[m] = _mm256_fmadd_ps(sum, s, acc[m]);
            }
        }
        for (int m = 0; m < MT; m++) gemv_store(c, m0 + m, n, fb_hsum_avx2(acc[m]));
    }
}

FB_AVX2 static void gemv_avx2(void *arg, int64_t n0, int64_t n1) {
    const gemv_ctx *c = (const gemv_ctx *)arg;
    if (c->K % c->bs) {
        float *w = (float *)malloc((size_t)c->K * sizeof(float));
        if (!w) return;
        for (int64_t n = n0; n < n1; n++) {
            gemv_row_decode(c, n, w);
            for (int64_t m = 0; m < c->M; m++) {
                const float *xm = c->x + m * c->K;
                __m256 a = _mm256_setzero_ps();
                int64_t k = 0;
                for (; k + 8 <= c->K; k += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(xm + k), a);
                float acc = fb_hsum_avx2(a);
                for (; k < c->K; k++) acc += w[k] * xm[k];
                gemv_store(c, m, n, acc);
            }
        }
        free(w);
        return;
    }
    int64_t m = 0;
    for (; m + 4 <= c->M; m += 4) gemv_tile_avx2(c, n0, n1, m, 4);
    switch (c->M - m) {
        case 3: gemv_tile_avx2(c, n0, n1, m, 3); break;
        case 2: gemv_tile_avx2(c, n0, n1, m, 2); break;
        case 1: gemv_tile_avx2(c, n0, n1, m, 1); break;
    }
}
#endif

/* x: (M, K) in x_dtype (widened here); bias: (N,) float32 or NULL; out: (M, N) in out_dtype. */
int fourbit_gemv_4bit(const void *x, int x_dtype, int64_t M, int64_t K, const uint8_t *packed, int64_t N, int64_t bs,
                      const float *code, const float *absmax, const uint8_t *qabs, const float *absmax2,
                      const float *code8, float offset, int64_t nested_bs, const float *bias, void *out, int out_dtype,
                      int threads) {
    if (nested_bs < 1 || (nested_bs & (nested_bs - 1))) return -1;
    float *xf = (float *)malloc((size_t)(M * K > 0 ? M * K : 1) * sizeof(float));
    if (!xf) return -1;
    gemv_ctx c = {xf, M, K, N, bs, packed, code, absmax, qabs, absmax2, code8, offset, __builtin_ctzll(nested_bs), bias, out,
                  out_dtype};
    fb_range_fn fn = gemv_portable;
    int permute = 0;
#if FB_X86
    if (fb_isa >= FB_ISA_AVX2) {
        fn = gemv_avx2;
        permute = K % bs == 0;
        uint8_t bytes[4][32];
        for (int i = 0; i < 16; i++)
            for (int k = 0; k < 4; k++) bytes[k][i] = bytes[k][i + 16] = (uint8_t)(fb_bits(code[i]) >> (8 * k));
        memcpy(c.tables, bytes, sizeof bytes);
    }
#endif
    /* the decode's lane order within each 8 elements (DECODE32) */
    static const int order[8] = {0, 2, 4, 6, 1, 3, 5, 7};
    for (int64_t i = 0; i < M * K; i++) xf[i] = fb_load(x, permute ? (i & ~7) + order[i & 7] : i, x_dtype);
    /* a thread per 2^17 weights at least (64 KiB packed): a team costs tens of microseconds */
    fb_parallel_for(N, 1, (1 << 17) / (K > 0 ? K : 1) + 1, threads, fn, &c);
    free(xf);
    return 0;
}

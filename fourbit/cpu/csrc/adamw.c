/* Fused AdamW steps, equal bit for bit to fourbit/nf4/adamw.py (its docstring gives the rounding of
 * every torch op; constants arrive already rounded to float32, as torch rounds Python scalars):
 *
 *   32-bit:  m = fma(g, 1-b1, fl(m b1));  v = fma(fl((1-b2) g), g, fl(v b2))
 *            P = fl(P decay) if weight decay;  P = fma(fl(m / fl(sqrt(v) + eps c2)), -lr c2/c1, P)
 *   8-bit:   m = fl(qmap1[q1] absmax1[b]), v = fl(qmap2[q2] absmax2[b]); m, v as above;
 *            d = fl(fl(sqrt(v) / c2) + eps);  P = fl(P decay);  P = fl(P + fl(fl(-lr/c1 m) / d));
 *            then m, v requantized per 256-block (blockwise8.c's rule).
 * sqrt and division are IEEE (vsqrtps, vdivps, sqrtf): the reference's sqrt_rn. P is read and written
 * in p's dtype (fp32 / fp16 / bf16), g in its own. One pass over memory: a 256-element block's new
 * m and v wait in a stack buffer until the block's absmax is known. */
#include "nearest.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    void *p;
    const void *g;
    int p_dtype, g_dtype;
    int64_t n;
    float *m, *v;                           /* 32-bit states */
    uint8_t *q1, *q2;                       /* 8-bit states */
    float *absmax1, *absmax2;
    const fb_nearest *t1, *t2;
    float b1, omb1, b2, omb2, decay, c2, eps, step_size;  /* 32-bit: eps = eps c2, step_size = -lr c2/c1 */
    int decay_on;
} adamw_ctx;

#define QBLOCK 256

static void a32_portable(void *arg, int64_t e, int64_t end) {
    adamw_ctx *c = (adamw_ctx *)arg;
    for (; e < end; e++) {
        float g = fb_load(c->g, e, c->g_dtype), P = fb_load(c->p, e, c->p_dtype);
        float m = fmaf(g, c->omb1, c->m[e] * c->b1);
        float v = fmaf(c->omb2 * g, g, c->v[e] * c->b2);
        if (c->decay_on) P = P * c->decay;
        float denom = sqrtf(v) + c->eps;
        P = fmaf(m / denom, c->step_size, P);
        c->m[e] = m, c->v[e] = v;
        fb_store(c->p, e, P, c->p_dtype);
    }
}

#if FB_X86
FB_AVX2 static void a32_avx2(void *arg, int64_t e, int64_t end) {
    adamw_ctx *c = (adamw_ctx *)arg;
    const __m256 b1 = _mm256_set1_ps(c->b1), omb1 = _mm256_set1_ps(c->omb1), b2 = _mm256_set1_ps(c->b2),
                 omb2 = _mm256_set1_ps(c->omb2), decay = _mm256_set1_ps(c->decay), eps = _mm256_set1_ps(c->eps),
                 step = _mm256_set1_ps(c->step_size);
    for (; e + 8 <= end; e += 8) {
        __m256 g = fb_load8_avx2(c->g, e, c->g_dtype), P = fb_load8_avx2(c->p, e, c->p_dtype);
        __m256 m = _mm256_fmadd_ps(g, omb1, _mm256_mul_ps(_mm256_loadu_ps(c->m + e), b1));
        __m256 v = _mm256_fmadd_ps(_mm256_mul_ps(omb2, g), g, _mm256_mul_ps(_mm256_loadu_ps(c->v + e), b2));
        if (c->decay_on) P = _mm256_mul_ps(P, decay);
        P = _mm256_fmadd_ps(_mm256_div_ps(m, _mm256_add_ps(_mm256_sqrt_ps(v), eps)), step, P);
        _mm256_storeu_ps(c->m + e, m);
        _mm256_storeu_ps(c->v + e, v);
        fb_store8_avx2(c->p, e, P, c->p_dtype);
    }
    a32_portable(arg, e, end);
}
#endif

int fourbit_adamw_32bit(void *p, int p_dtype, const void *g, int g_dtype, float *m, float *v, int64_t n, float b1,
                        float omb1, float b2, float omb2, float eps_c2, float decay, int decay_on, float step_size,
                        int threads) {
    adamw_ctx c = {p, g, p_dtype, g_dtype, n, m, v, NULL, NULL, NULL, NULL, NULL, NULL,
                   b1, omb1, b2, omb2, decay, 0.0f, eps_c2, step_size, decay_on};
    fb_range_fn fn = a32_portable;
#if FB_X86
    if (fb_isa >= FB_ISA_AVX2) fn = a32_avx2;
#endif
    fb_parallel_for(n, 64, 1 << 15, threads, fn, &c);
    return 0;
}

/* ---- 8-bit states ------------------------------------------------------------------------------- */
static float requantize_scalar(const fb_nearest *t, const float *x, int64_t len, uint8_t *q) {
    float m = 0.0f;
    for (int64_t i = 0; i < len; i++) {
        float a = fabsf(x[i]);
        m = (a > m || a != a) ? a : m;
    }
    float r = 1.0f / m;
    for (int64_t i = 0; i < len; i++) q[i] = m == 0.0f ? 0 : (uint8_t)fb_nearest_index(t, x[i] * r);
    return m;
}

static void a8_portable(void *arg, int64_t b0, int64_t b1) {
    adamw_ctx *c = (adamw_ctx *)arg;
    float mb[QBLOCK], vb[QBLOCK];
    for (int64_t b = b0; b < b1; b++) {
        int64_t e0 = b * QBLOCK, len = e0 + QBLOCK < c->n ? QBLOCK : c->n - e0;
        float s1 = c->absmax1[b], s2 = c->absmax2[b];
        for (int64_t i = 0; i < len; i++) {
            int64_t e = e0 + i;
            float g = fb_load(c->g, e, c->g_dtype), P = fb_load(c->p, e, c->p_dtype);
            float m = fmaf(g, c->omb1, (c->t1->code[c->q1[e]] * s1) * c->b1);
            float v = fmaf(c->omb2 * g, g, (c->t2->code[c->q2[e]] * s2) * c->b2);
            float denom = sqrtf(v) / c->c2 + c->eps;
            if (c->decay_on) P = P * c->decay;
            P = P + (c->step_size * m) / denom;
            fb_store(c->p, e, P, c->p_dtype);
            mb[i] = m, vb[i] = v;
        }
        c->absmax1[b] = requantize_scalar(c->t1, mb, len, c->q1 + e0);
        c->absmax2[b] = requantize_scalar(c->t2, vb, len, c->q2 + e0);
    }
}

#if FB_X86
float fb_absmax_avx2(const void *x, int dtype, int64_t e, int64_t end);

/* A full block of QBLOCK values (a8_avx2 sends a partial last block to the portable path). */
FB_AVX2 static float requantize_avx2(const fb_nearest *t, const float *x, uint8_t *q) {
    float m = fb_absmax_avx2(x, FB_F32, 0, QBLOCK);
    if (m == 0.0f) { memset(q, 0, QBLOCK); return m; }
    const __m256 r8 = _mm256_set1_ps(1.0f / m);
    const __m256i pack = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                          0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    for (int i = 0; i < QBLOCK; i += 8) {
        __m256i idx = _mm256_shuffle_epi8(fb_nearest8_avx2(t, _mm256_mul_ps(_mm256_loadu_ps(x + i), r8)), pack);
        uint64_t bytes = (uint64_t)(uint32_t)_mm256_extract_epi32(idx, 0) | (uint64_t)(uint32_t)_mm256_extract_epi32(idx, 4) << 32;
        memcpy(q + i, &bytes, 8);
    }
    return m;
}

FB_AVX2 static void a8_avx2(void *arg, int64_t b0, int64_t b1) {
    adamw_ctx *c = (adamw_ctx *)arg;
    float mb[QBLOCK] __attribute__((aligned(32))), vb[QBLOCK] __attribute__((aligned(32)));
    const __m256 beta1 = _mm256_set1_ps(c->b1), omb1 = _mm256_set1_ps(c->omb1), beta2 = _mm256_set1_ps(c->b2),
                 omb2 = _mm256_set1_ps(c->omb2), decay = _mm256_set1_ps(c->decay), eps = _mm256_set1_ps(c->eps),
                 c2 = _mm256_set1_ps(c->c2), step = _mm256_set1_ps(c->step_size);
    for (int64_t b = b0; b < b1; b++) {
        int64_t e0 = b * QBLOCK, len = e0 + QBLOCK < c->n ? QBLOCK : c->n - e0, i = 0;
        if (len < QBLOCK) { a8_portable(arg, b, b + 1); continue; }
        const __m256 s1 = _mm256_set1_ps(c->absmax1[b]), s2 = _mm256_set1_ps(c->absmax2[b]);
        for (; i < QBLOCK; i += 8) {
            int64_t e = e0 + i;
            __m256 g = fb_load8_avx2(c->g, e, c->g_dtype), P = fb_load8_avx2(c->p, e, c->p_dtype);
            __m256i i1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c->q1 + e)));
            __m256i i2 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c->q2 + e)));
            __m256 m = _mm256_mul_ps(_mm256_i32gather_ps(c->t1->code, i1, 4), s1);
            __m256 v = _mm256_mul_ps(_mm256_i32gather_ps(c->t2->code, i2, 4), s2);
            m = _mm256_fmadd_ps(g, omb1, _mm256_mul_ps(m, beta1));
            v = _mm256_fmadd_ps(_mm256_mul_ps(omb2, g), g, _mm256_mul_ps(v, beta2));
            __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), c2), eps);
            if (c->decay_on) P = _mm256_mul_ps(P, decay);
            P = _mm256_add_ps(P, _mm256_div_ps(_mm256_mul_ps(step, m), denom));
            fb_store8_avx2(c->p, e, P, c->p_dtype);
            _mm256_store_ps(mb + i, m);
            _mm256_store_ps(vb + i, v);
        }
        c->absmax1[b] = requantize_avx2(c->t1, mb, c->q1 + e0);
        c->absmax2[b] = requantize_avx2(c->t2, vb, c->q2 + e0);
    }
}
#endif

int fourbit_adamw_8bit(void *p, int p_dtype, const void *g, int g_dtype, uint8_t *q1, uint8_t *q2, float *absmax1,
                       float *absmax2, const float *qmap1, const float *qmap2, int64_t n, float b1, float omb1,
                       float b2, float omb2, float c2, float eps, float decay, int decay_on, float step_size,
                       int threads) {
    fb_nearest *own1, *own2;
    const fb_nearest *t1 = fb_nearest_for(qmap1, &own1), *t2 = fb_nearest_for(qmap2, &own2);
    if (!t1 || !t2) {
        free(own1), free(own2);
        return -1;
    }
    adamw_ctx c = {p, g, p_dtype, g_dtype, n, NULL, NULL, q1, q2, absmax1, absmax2, t1, t2,
                   b1, omb1, b2, omb2, decay, c2, eps, step_size, decay_on};
    fb_range_fn fn = a8_portable;
#if FB_X86
    if (fb_isa >= FB_ISA_AVX2) fn = a8_avx2;
#endif
    fb_parallel_for((n + QBLOCK - 1) / QBLOCK, 1, 64, threads, fn, &c);
    free(own1), free(own2);
    return 0;
}

/* ---- many tensors in one call ------------------------------------------------------------------
 * An optimizer steps every parameter with the same hyperparameters; one call for all of them pays the
 * Python and fork-join cost once instead of per tensor (420 LoRA tensors of ~12k values each). The
 * team splits the concatenated index space (elements, or 256-blocks for 8-bit), so small tensors
 * share a thread's chunk and a large one spreads over all threads. Each tensor sees exactly the
 * single-tensor kernel's arithmetic on its own elements: the same bytes. */
typedef struct {
    int count;
    const int64_t *start;       /* count + 1 prefix sums of the units per tensor */
    adamw_ctx *each;            /* per tensor: the single-tensor context */
    fb_range_fn fn;
} many_ctx;

/* The last tensor whose units start at or before b (start: count + 1 prefix sums). */
static int first_at(const int64_t *start, int count, int64_t b) {
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (start[mid] <= b) lo = mid; else hi = mid - 1;
    }
    return lo;
}

static void many_run(void *arg, int64_t b, int64_t e) {
    many_ctx *c = (many_ctx *)arg;
    for (int t = first_at(c->start, c->count, b); t < c->count && c->start[t] < e; t++) {
        int64_t tb = b > c->start[t] ? b - c->start[t] : 0;
        int64_t te = (e < c->start[t + 1] ? e : c->start[t + 1]) - c->start[t];
        if (te > tb) c->fn(&c->each[t], tb, te);
    }
}

static int many_prepare(int count, const int64_t *n, int64_t unit, int64_t **start, adamw_ctx **each) {
    *start = (int64_t *)malloc((size_t)(count + 1) * sizeof(int64_t));
    *each = (adamw_ctx *)calloc((size_t)count, sizeof(adamw_ctx));
    if (!*start || !*each) { free(*start), free(*each); return -1; }
    (*start)[0] = 0;
    for (int t = 0; t < count; t++) (*start)[t + 1] = (*start)[t] + (n[t] + unit - 1) / unit;
    return 0;
}

int fourbit_adamw_32bit_many(int count, void **p, const int *p_dtype, const void **g, const int *g_dtype, float **m,
                             float **v, const int64_t *n, float b1, float omb1, float b2, float omb2, float eps_c2,
                             float decay, int decay_on, float step_size, int threads) {
    int64_t *start;
    adamw_ctx *each;
    if (count <= 0) return 0;
    if (many_prepare(count, n, 1, &start, &each)) return -1;
    for (int t = 0; t < count; t++)
        each[t] = (adamw_ctx){p[t], g[t], p_dtype[t], g_dtype[t], n[t], m[t], v[t], NULL, NULL, NULL, NULL, NULL, NULL,
                              b1, omb1, b2, omb2, decay, 0.0f, eps_c2, step_size, decay_on};
    many_ctx c = {count, start, each, a32_portable};
#if FB_X86
    if (fb_isa >= FB_ISA_AVX2) c.fn = a32_avx2;
#endif
    fb_parallel_for(start[count], 64, 1 << 15, threads, many_run, &c);
    free(start), free(each);
    return 0;
}

int fourbit_adamw_8bit_many(int count, void **p, const int *p_dtype, const void **g, const int *g_dtype, uint8_t **q1,
                            uint8_t **q2, float **absmax1, float **absmax2, const float *qmap1, const float *qmap2,
                            const int64_t *n, float b1, float omb1, float b2, float omb2, float c2, float eps,
                            float decay, int decay_on, float step_size, int threads) {
    int64_t *start;
    adamw_ctx *each;
    fb_nearest *own1, *own2;
    if (count <= 0) return 0;
    const fb_nearest *t1 = fb_nearest_for(qmap1, &own1), *t2 = fb_nearest_for(qmap2, &own2);
    if (!t1 || !t2 || many_prepare(count, n, QBLOCK, &start, &each)) {
        free(own1), free(own2);
        return -1;
    }
    for (int t = 0; t < count; t++)
        each[t] = (adamw_ctx){p[t], g[t], p_dtype[t], g_dtype[t], n[t], NULL, NULL, q1[t], q2[t], absmax1[t], absmax2[t],
                              t1, t2, b1, omb1, b2, omb2, decay, c2, eps, step_size, decay_on};
    many_ctx c = {count, start, each, a8_portable};
#if FB_X86
    if (fb_isa >= FB_ISA_AVX2) c.fn = a8_avx2;
#endif
    fb_parallel_for(start[count], 1, 64, threads, many_run, &c);
    free(start), free(each), free(own1), free(own2);
    return 0;
}

/* ---- which tensors hold a NaN or an infinity ---------------------------------------------------
 * The optimizer skips a parameter whose gradient is not finite, and asks before it steps any. An
 * all-ones exponent field is the test (inf and NaN in every float format); an integer OR-reduction,
 * which the compiler vectorizes (a float one it may not reorder). */
typedef struct {
    int count;
    const int64_t *start;
    const void **x;
    const int *dtype;
    uint8_t *bad;
} finite_ctx;

static int any_nonfinite(const void *x, int dtype, int64_t b, int64_t e) {
    uint32_t acc = 0;
    if (dtype == FB_F32) {
        const uint32_t *u = (const uint32_t *)x;
        for (int64_t i = b; i < e; i++) acc |= (u[i] & 0x7f800000u) == 0x7f800000u;
    } else if (dtype == FB_F64) {
        const uint64_t *u = (const uint64_t *)x;
        for (int64_t i = b; i < e; i++) acc |= (u[i] & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
    } else {
        const uint16_t *u = (const uint16_t *)x;
        uint16_t exp = dtype == FB_F16 ? 0x7c00 : 0x7f80;
        for (int64_t i = b; i < e; i++) acc |= (u[i] & exp) == exp;
    }
    return acc != 0;
}

static void finite_run(void *arg, int64_t b, int64_t e) {
    finite_ctx *c = (finite_ctx *)arg;
    for (int t = first_at(c->start, c->count, b); t < c->count && c->start[t] < e; t++) {
        int64_t tb = b > c->start[t] ? b - c->start[t] : 0;
        int64_t te = (e < c->start[t + 1] ? e : c->start[t + 1]) - c->start[t];
        if (te > tb && any_nonfinite(c->x[t], c->dtype[t], tb, te)) __atomic_store_n(&c->bad[t], 1, __ATOMIC_RELAXED);
    }
}

/* bad[t] = 1 where tensor t (n[t] values of dtype[t]) holds a NaN or an infinity, else 0. */
int fourbit_nonfinite_many(int count, const void **x, const int *dtype, const int64_t *n, uint8_t *bad, int threads) {
    int64_t *start;
    adamw_ctx *unused;
    if (count <= 0) return 0;
    if (many_prepare(count, n, 1, &start, &unused)) return -1;
    free(unused);
    memset(bad, 0, (size_t)count);
    finite_ctx c = {count, start, x, dtype, bad};
    fb_parallel_for(start[count], 64, 1 << 16, threads, finite_run, &c);
    free(start);
    return 0;
}

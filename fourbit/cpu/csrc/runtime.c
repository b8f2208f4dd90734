/* The instruction-set choice, the thread team and the huge-page hint shared by every kernel. */
#include "common.h"

#include <pthread.h>
#include <sys/mman.h>

int fb_isa = FB_SCALAR;

/* The best instruction set this CPU and OS run (gcc's CPUID probe also checks that the OS saves the
 * AVX / AVX-512 registers), so a kernel never executes an instruction the machine lacks. */
int fourbit_cpu_best_isa(void) {
#if FB_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
        && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2"))
        return FB_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2")
        && __builtin_cpu_supports("f16c"))
        return FB_ISA_AVX2;
#endif
    return FB_SCALAR;
}

/* Use `isa` (clamped to what the machine runs); returns the one in use. */
int fourbit_cpu_set_isa(int isa) {
    int best = fourbit_cpu_best_isa();
    fb_isa = isa < 0 ? 0 : (isa > best ? best : isa);
    return fb_isa;
}

#define FB_MAX_THREADS 256

typedef struct {
    fb_range_fn fn;
    void *ctx;
    int64_t begin, end;
} fb_range;

static void *fb_thread_main(void *arg) {
    fb_range *r = (fb_range *)arg;
    r->fn(r->ctx, r->begin, r->end);
    return NULL;
}

/* A new team per call: 15-30 us to start and join a thread here, paid only by calls long enough to
 * split (min_per_thread), and no idle threads left spinning between calls on a shared machine. */
void fb_parallel_for(int64_t n, int64_t align, int64_t min_per_thread, int threads, fb_range_fn fn, void *ctx) {
    if (n <= 0) return;
    if (align < 1) align = 1;
    if (min_per_thread < 1) min_per_thread = 1;
    int64_t units = (n + align - 1) / align;
    int64_t by_work = n / min_per_thread;
    int64_t t = threads;
    if (t > FB_MAX_THREADS) t = FB_MAX_THREADS;
    if (t > by_work) t = by_work;
    if (t > units) t = units;
    if (t <= 1) {
        fn(ctx, 0, n);
        return;
    }
    fb_range r[FB_MAX_THREADS];
    pthread_t tid[FB_MAX_THREADS];
    int started[FB_MAX_THREADS];
    for (int64_t i = 0; i < t; i++) {
        int64_t b = units * i / t * align, e = units * (i + 1) / t * align;
        r[i].fn = fn, r[i].ctx = ctx, r[i].begin = b, r[i].end = e < n ? e : n;
    }
    for (int64_t i = 1; i < t; i++) started[i] = pthread_create(&tid[i], NULL, fb_thread_main, &r[i]) == 0;
    fn(ctx, r[0].begin, r[0].end);
    for (int64_t i = 1; i < t; i++) {
        if (started[i]) pthread_join(tid[i], NULL);
        else fn(ctx, r[i].begin, r[i].end);  /* no thread to be had: do its share here */
    }
}

void fb_hint_huge_pages(void *p, size_t bytes) {
#ifdef MADV_HUGEPAGE
    const uintptr_t huge = (uintptr_t)2 << 20;
    if (bytes < 2 * huge) return;
    uintptr_t b = ((uintptr_t)p + huge - 1) & ~(huge - 1), e = ((uintptr_t)p + bytes) & ~(huge - 1);
    if (e > b) madvise((void *)b, e - b, MADV_HUGEPAGE);  /* advice only: failure changes nothing */
#else
    (void)p, (void)bytes;
#endif
}

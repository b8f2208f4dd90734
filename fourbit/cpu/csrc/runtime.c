/* The instruction-set choice, the thread team and the huge-page hint shared by every kernel. */
#include "common.h"

#include <pthread.h>
#include <stdlib.h>
#include <sys/mman.h>
#ifdef _OPENMP
#include <omp.h>
#endif

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

/* How many threads [0, n) is worth (each gets at least min_per_thread items; ranges cut at multiples
 * of align), and the chunk size that gives each thread four chunks: a late or slow thread leaves
 * less behind. Returns 1 when the loop should run inline. */
static int64_t fb_split(int64_t n, int64_t align, int64_t min_per_thread, int threads, int64_t *chunk) {
    if (align < 1) align = 1;
    if (min_per_thread < 1) min_per_thread = 1;
    int64_t units = (n + align - 1) / align;
    int64_t t = threads < FB_MAX_THREADS ? threads : FB_MAX_THREADS;
    if (t > n / min_per_thread) t = n / min_per_thread;
    if (t > units) t = units;
    if (t < 1) t = 1;
    *chunk = (units + 4 * t - 1) / (4 * t) * align;
    return t;
}

#ifdef _OPENMP
/* torch's own OpenMP team. The library is loaded after torch, whose libgomp.so.1 is already in the
 * process, so the dynamic loader binds this library to that same runtime: one team of threads for
 * torch's ops and fourbit's kernels, kept alive (spin, then sleep) between calls, instead of threads
 * started per call that compete with torch's for the cores (_lib.py checks the binding). Chunks are
 * claimed from a counter, so a team thread that starts late leaves its share to the others. */
void fb_parallel_for(int64_t n, int64_t align, int64_t min_per_thread, int threads, fb_range_fn fn, void *ctx) {
    if (n <= 0) return;
    int64_t chunk, t = fb_split(n, align, min_per_thread, threads, &chunk);
    if (t <= 1 || omp_in_parallel()) {  /* inside torch's parallel region: its team is busy, run inline */
        fn(ctx, 0, n);
        return;
    }
    int64_t chunks = (n + chunk - 1) / chunk, next = 0;
#pragma omp parallel num_threads((int)t)
    {
        for (;;) {
            int64_t i = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
            if (i >= chunks) break;
            int64_t b = i * chunk, e = b + chunk < n ? b + chunk : n;
            fn(ctx, b, e);
        }
    }
}

int fourbit_cpu_openmp(void) { return 1; }

#else
/* Built without OpenMP (the compiler has none): a fork-join of threads started per call. */
/* A fork-join job on the heap: helpers may start late (a busy core) and outlive the call; the last
 * one to leave frees it. Work is handed out in chunks from an atomic counter, so the caller never
 * waits for a helper that has not started: it takes the chunks itself, and waits only for chunks a
 * helper has claimed. On a machine whose other core is busy this costs one thread start, not a
 * scheduling quantum (tests/helpers.py measured 15 ms waits for torch's OpenMP team there). */
typedef struct {
    fb_range_fn fn;
    void *ctx;
    int64_t n, chunk, chunks;
    int64_t next;               /* atomic: next chunk to claim */
    int64_t done;               /* chunks finished, under lock */
    int refs;                   /* atomic: threads still holding the job */
    pthread_mutex_t lock;
    pthread_cond_t finished;
} fb_job;

static void fb_job_release(fb_job *job) {
    if (__atomic_sub_fetch(&job->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        pthread_mutex_destroy(&job->lock);
        pthread_cond_destroy(&job->finished);
        free(job);
    }
}

static void fb_job_work(fb_job *job) {
    int64_t mine = 0;
    for (;;) {
        int64_t i = __atomic_fetch_add(&job->next, 1, __ATOMIC_ACQ_REL);
        if (i >= job->chunks) break;
        int64_t b = i * job->chunk, e = b + job->chunk < job->n ? b + job->chunk : job->n;
        job->fn(job->ctx, b, e);
        mine++;
    }
    if (mine) {
        pthread_mutex_lock(&job->lock);
        job->done += mine;
        if (job->done == job->chunks) pthread_cond_signal(&job->finished);
        pthread_mutex_unlock(&job->lock);
    }
}

static void *fb_helper_main(void *arg) {
    fb_job *job = (fb_job *)arg;
    fb_job_work(job);
    fb_job_release(job);
    return NULL;
}

void fb_parallel_for(int64_t n, int64_t align, int64_t min_per_thread, int threads, fb_range_fn fn, void *ctx) {
    if (n <= 0) return;
    int64_t chunk, t = fb_split(n, align, min_per_thread, threads, &chunk);
    fb_job *job = t > 1 ? (fb_job *)calloc(1, sizeof *job) : NULL;
    if (!job) {
        fn(ctx, 0, n);
        return;
    }
    job->fn = fn, job->ctx = ctx, job->n = n, job->chunk = chunk;
    job->chunks = (n + job->chunk - 1) / job->chunk;
    job->refs = 1;
    pthread_mutex_init(&job->lock, NULL);
    pthread_cond_init(&job->finished, NULL);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (int64_t i = 1; i < t; i++) {
        pthread_t tid;
        __atomic_add_fetch(&job->refs, 1, __ATOMIC_ACQ_REL);
        if (pthread_create(&tid, &attr, fb_helper_main, job) != 0) {
            __atomic_sub_fetch(&job->refs, 1, __ATOMIC_ACQ_REL);  /* no thread to be had: fewer helpers */
            break;
        }
    }
    pthread_attr_destroy(&attr);
    fb_job_work(job);
    pthread_mutex_lock(&job->lock);
    while (job->done < job->chunks) pthread_cond_wait(&job->finished, &job->lock);
    pthread_mutex_unlock(&job->lock);
    fb_job_release(job);
}

int fourbit_cpu_openmp(void) { return 0; }
#endif

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

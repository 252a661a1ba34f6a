/* A small worker pool for the CPU kernels (declared in cpu_threads.h).
 *
 * Why not OpenMP: its fork-join ends every parallel region in a barrier that waits for every
 * thread of the team, so one worker the OS has not scheduled (another process on the core, a
 * spinning thread of torch's own OpenMP pool) stalls the whole call, and a decode step makes
 * a few hundred such calls. Here the caller takes chunks itself and waits only for chunks a
 * worker has already claimed: a worker that is late finds nothing left and costs nothing.
 *
 * A job is published as one 64-bit word, (generation << 32 | next chunk); claiming a chunk is
 * a compare-and-swap on that word, so a worker still holding an old generation can never take
 * a chunk of a newer job. The job's function and context live in a two-entry ring indexed by
 * generation: entry g & 1 is rewritten only for job g + 2, which cannot start before job g + 1
 * has been published, and then every claim of generation g fails.
 *
 * Idle workers poll for a new job for IDLE_NS (the next kernel call of a step comes within
 * microseconds), yielding the core to anything else runnable, then sleep on a futex. Which
 * thread computes a chunk never changes its result: the kernels' chunks write disjoint
 * outputs, each in the same order of operations as on one thread.
 */
#define _GNU_SOURCE
#include "cpu_threads.h"

#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#ifdef __linux__
#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>
#define HAVE_POOL 1
#endif

#define MAX_THREADS 256
#define IDLE_NS 200000 /* 200 µs of polling before a worker sleeps */

typedef struct {
    _Atomic(chunk_fn) fn;
    _Atomic(void *) ctx;
    _Atomic int64_t chunks;
    _Atomic int width; /* threads that take part in this job, the caller included */
} job_t;

static struct {
    job_t jobs[2];
    _Atomic uint64_t next;  /* generation << 32 | next unclaimed chunk */
    _Atomic int64_t done;   /* chunks finished by workers in the current job */
    _Atomic uint32_t gen;   /* generation of the latest job; the futex word */
    _Atomic int sleepers;   /* workers blocked in futex_wait */
    int started;            /* workers running (ids 1..started) */
    uint32_t last;          /* generation of the caller's last job (under run_lock) */
    pthread_mutex_t run_lock, start_lock;
} pool = {.run_lock = PTHREAD_MUTEX_INITIALIZER, .start_lock = PTHREAD_MUTEX_INITIALIZER};

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Take the next chunk of job `g`, if any is left: 1 and *chunk set, else 0. */
static int claim(uint32_t g, int64_t chunks, int64_t *chunk) {
    uint64_t cur = atomic_load_explicit(&pool.next, memory_order_acquire);
    for (;;) {
        int64_t i = (int64_t)(cur & 0xffffffffu);
        if ((uint32_t)(cur >> 32) != g || i >= chunks) return 0;
        if (atomic_compare_exchange_weak_explicit(&pool.next, &cur, cur + 1,
                                                  memory_order_acq_rel, memory_order_acquire)) {
            *chunk = i;
            return 1;
        }
    }
}

#ifdef HAVE_POOL
static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* The generation of the next job after `seen`: poll, then sleep until one is published. */
static uint32_t wait_for_job(uint32_t seen) {
    const int64_t start = now_ns();
    for (int64_t polls = 0;; polls++) {
        uint32_t g = atomic_load_explicit(&pool.gen, memory_order_acquire);
        if (g != seen) return g;
        if (polls % 64 != 63 || now_ns() - start < IDLE_NS) {
            for (int i = 0; i < 16; i++) relax();
            if (polls % 64 == 63) sched_yield(); /* anything else runnable on this core goes first */
            continue;
        }
        atomic_fetch_add(&pool.sleepers, 1); /* seq_cst: pool_run reads it after bumping gen */
        while (atomic_load(&pool.gen) == seen)
            syscall(SYS_futex, &pool.gen, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
        atomic_fetch_sub(&pool.sleepers, 1);
    }
}

static void *worker(void *arg) {
    const int id = (int)(intptr_t)arg;
    uint32_t seen = atomic_load(&pool.gen);
    for (;;) {
        const uint32_t g = wait_for_job(seen);
        seen = g;
        job_t *job = &pool.jobs[g & 1];
        if (id >= atomic_load_explicit(&job->width, memory_order_relaxed)) continue;
        chunk_fn fn = atomic_load_explicit(&job->fn, memory_order_relaxed);
        void *ctx = atomic_load_explicit(&job->ctx, memory_order_relaxed);
        const int64_t chunks = atomic_load_explicit(&job->chunks, memory_order_relaxed);
        int64_t c;
        while (claim(g, chunks, &c)) { /* success proves fn/ctx/chunks are job g's */
            fn(ctx, c, id);
            atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
        }
    }
    return NULL;
}

/* A forked child has the pool's state but none of its workers (a benchmark's or a test's
 * child process): it starts its own on its first call, and no lock a parent's thread held at
 * the fork stays taken. */
static void forget_workers(void) {
    pool.started = 0;
    atomic_store(&pool.sleepers, 0);
    pthread_mutex_init(&pool.run_lock, NULL);
    pthread_mutex_init(&pool.start_lock, NULL);
}

static pthread_once_t fork_handler = PTHREAD_ONCE_INIT;

static void install_fork_handler(void) { pthread_atfork(NULL, NULL, forget_workers); }

/* Start workers until `threads` threads (the caller included) can run; returns how many can. */
static int reserve(int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads - 1 <= pool.started) return threads;
    pthread_once(&fork_handler, install_fork_handler);
    pthread_mutex_lock(&pool.start_lock);
    sigset_t all, old; /* workers take no signals: Python handles them on its main thread */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    while (pool.started < threads - 1) {
        pthread_t t;
        if (pthread_create(&t, &attr, worker, (void *)(intptr_t)(pool.started + 1)) != 0) break;
        pool.started++;
    }
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    int can = pool.started + 1;
    pthread_mutex_unlock(&pool.start_lock);
    return can < threads ? can : threads;
}
#endif

/* Threads the pool can give a kernel asked for `threads` (starting workers if needed). */
int pool_threads(int threads) {
#ifdef HAVE_POOL
    return threads <= 1 ? 1 : reserve(threads);
#else
    (void)threads;
    return 1;
#endif
}

void pool_run(chunk_fn fn, void *ctx, int64_t chunks, int threads) {
#ifdef HAVE_POOL
    if (threads > 1) threads = reserve(threads);
    /* one job at a time: a second caller (another Python thread) runs its kernel alone */
    if (threads > 1 && chunks > 1 && pthread_mutex_trylock(&pool.run_lock) == 0) {
        const uint32_t g = pool.last + 1;
        job_t *job = &pool.jobs[g & 1];
        atomic_store_explicit(&job->fn, fn, memory_order_relaxed);
        atomic_store_explicit(&job->ctx, ctx, memory_order_relaxed);
        atomic_store_explicit(&job->chunks, chunks, memory_order_relaxed);
        atomic_store_explicit(&job->width, threads, memory_order_relaxed);
        atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
        atomic_store_explicit(&pool.next, (uint64_t)g << 32, memory_order_release);
        atomic_store(&pool.gen, g); /* seq_cst, then the sleepers read: no lost wake-up */
        if (atomic_load(&pool.sleepers) > 0)
            syscall(SYS_futex, &pool.gen, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
        int64_t c, mine = 0;
        while (claim(g, chunks, &c)) {
            fn(ctx, c, 0);
            mine++;
        }
        while (atomic_load_explicit(&pool.done, memory_order_acquire) + mine < chunks) relax();
        pool.last = g;
        pthread_mutex_unlock(&pool.run_lock);
        return;
    }
#else
    (void)threads;
#endif
    for (int64_t c = 0; c < chunks; c++) fn(ctx, c, 0);
}

int64_t chunk_items(int64_t items, int64_t most, int64_t align, int threads, int per_thread) {
    if (align < 1) align = 1;
    int64_t size = most;
    if (threads > 1) { /* small enough that every thread gets `per_thread` chunks */
        int64_t even = (items + (int64_t)threads * per_thread - 1) / ((int64_t)threads * per_thread);
        if (even < size) size = even;
    }
    size = size / align * align;
    return size < align ? align : size;
}

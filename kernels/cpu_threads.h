/* The CPU kernels' worker pool (cpu_threads.c): every kernel splits its work into chunks that
 * write disjoint outputs and hands them to pool_run. */
#ifndef COLD_RAY_CPU_THREADS_H
#define COLD_RAY_CPU_THREADS_H

#include <stdint.h>

/* fn(ctx, chunk, thread): compute one chunk; `thread` in [0, threads) indexes per-thread
 * scratch (0 is the caller). */
typedef void (*chunk_fn)(void *ctx, int64_t chunk, int thread);

/* Run fn for every chunk in [0, chunks) on up to `threads` threads, the caller included;
 * returns when all are done. */
void pool_run(chunk_fn fn, void *ctx, int64_t chunks, int threads);

/* Items per chunk when `items` are split for `threads` threads: at most `most`, fewer where
 * that gives every thread `per_thread` chunks to balance, a multiple of `align` (at least one). */
int64_t chunk_items(int64_t items, int64_t most, int64_t align, int threads, int per_thread);

/* Threads a kernel asked for `threads` gets (workers are started on first use). */
int pool_threads(int threads);

#endif

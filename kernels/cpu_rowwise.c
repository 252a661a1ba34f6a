/* The row-wise operations of a forward pass on CPU, fp32, each one call instead of a chain of
 * torch operators (on CPU F.rms_norm alone runs eight of them, ~10 µs at one row, and a
 * SmolLM2 step makes 61 of them):
 *   add_rms_norm      x += d (the residual stream; d may be NULL), y = x / rms(x) * w
 *   rope_cache_write  rotate each token's q and k heads in place (rotate-half, as
 *                     `llama.apply_rope`) and write its k and v heads into the layer's cache at
 *                     (its slot, its position), fp32 or rounded to bf16 (nearest-even, as
 *                     torch rounds)
 *   silu_mul          y = silu(gate) * up, gate and up the halves of each row of [rows, 2 n]
 * Each row is computed alone and in the same order whatever the batch, so a row's result does
 * not depend on the other rows, nor on the thread that computes it. Threads take runs of rows,
 * and only where a call has enough of them to pay for handing work over (a prefill chunk, not
 * a decode step's few rows).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_threads.h"

/* Floats a call must touch before its rows are split across threads (≈ 10 µs of work); a
 * thread takes at least this many at a time. */
#define PARALLEL_FLOATS (1 << 15)

/* Run fn over rows [0, rows) in runs of rows of `width` floats each: threads where it pays. */
typedef struct {
    void (*rows_fn)(void *ctx, int64_t r0, int64_t r1);
    void *ctx;
    int64_t rows, per_chunk;
} rows_job;

static void rows_chunk(void *arg, int64_t c, int thread) {
    (void)thread;
    const rows_job *j = arg;
    int64_t r0 = c * j->per_chunk, r1 = r0 + j->per_chunk;
    j->rows_fn(j->ctx, r0, r1 < j->rows ? r1 : j->rows);
}

static void for_rows(void (*fn)(void *, int64_t, int64_t), void *ctx, int64_t rows,
                     int64_t width, int threads) {
    if (threads <= 1 || rows * width < 2 * PARALLEL_FLOATS) {
        fn(ctx, 0, rows);
        return;
    }
    int64_t least = (PARALLEL_FLOATS + width - 1) / width;
    int64_t per = chunk_items(rows, rows, 1, threads, 2);
    if (per < least) per = least;
    rows_job job = {fn, ctx, rows, per};
    pool_run(rows_chunk, &job, (rows + per - 1) / per, threads);
}

typedef struct {
    float *x;
    const float *d, *w;
    float *y;
    int64_t n;
    float eps;
} norm_job;

static void norm_rows(void *arg, int64_t r0, int64_t r1) {
    const norm_job *j = arg;
    const int64_t n = j->n;
    for (int64_t r = r0; r < r1; r++) {
        float *xr = j->x + r * n, *yr = j->y + r * n;
        float sq = 0.0f;
        if (j->d) {
            const float *dr = j->d + r * n;
            for (int64_t i = 0; i < n; i++) {
                xr[i] += dr[i];
                sq += xr[i] * xr[i];
            }
        } else {
            for (int64_t i = 0; i < n; i++) sq += xr[i] * xr[i];
        }
        const float inv = 1.0f / sqrtf(sq / (float)n + j->eps);
        for (int64_t i = 0; i < n; i++) yr[i] = xr[i] * inv * j->w[i];
    }
}

void add_rms_norm(float *x, const float *d, const float *w, float *y, int64_t rows, int64_t n,
                  float eps, int threads) {
    norm_job job = {x, d, w, y, n, eps};
    for_rows(norm_rows, &job, rows, 2 * n, threads);
}

/* x[j] <- x[j] cos[j] - x[j + h] sin[j], x[j + h] <- x[j + h] cos[j + h] + x[j] sin[j + h] */
static inline void rotate(float *x, const float *cos, const float *sin, int64_t dim) {
    const int64_t half = dim / 2;
    for (int64_t j = 0; j < half; j++) {
        const float a = x[j], b = x[j + half];
        x[j] = a * cos[j] - b * sin[j];
        x[j + half] = b * cos[j + half] + a * sin[j + half];
    }
}

typedef struct {
    float *qkv;
    const float *cos, *sin;
    const int64_t *positions, *slots;
    void *k_cache, *v_cache;
    int64_t q_heads, kv_heads, dim, s_slot, s_head, s_pos;
    int bf16;
} rope_job;

/* fp32 -> bf16, round to nearest, ties to even; a NaN stays a (quiet) NaN. */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* `n` floats into the cache at element `at`, as the cache holds them. */
static inline void store(void *cache, int64_t at, const float *src, int64_t n, int bf16) {
    if (!bf16) {
        memcpy((float *)cache + at, src, n * sizeof(float));
        return;
    }
    uint16_t *dst = (uint16_t *)cache + at;
    for (int64_t i = 0; i < n; i++) dst[i] = to_bf16(src[i]);
}

static void rope_rows(void *arg, int64_t r0, int64_t r1) {
    const rope_job *j = arg;
    const int64_t dim = j->dim, width = (j->q_heads + 2 * j->kv_heads) * dim;
    for (int64_t r = r0; r < r1; r++) {
        float *row = j->qkv + r * width;
        const int64_t pos = j->positions[r];
        const float *c = j->cos + pos * dim, *s = j->sin + pos * dim;
        for (int64_t h = 0; h < j->q_heads + j->kv_heads; h++) rotate(row + h * dim, c, s, dim);
        const int64_t at = j->slots[r] * j->s_slot + pos * j->s_pos;
        for (int64_t h = 0; h < j->kv_heads; h++) {
            store(j->k_cache, at + h * j->s_head, row + (j->q_heads + h) * dim, dim, j->bf16);
            store(j->v_cache, at + h * j->s_head, row + (j->q_heads + j->kv_heads + h) * dim, dim,
                  j->bf16);
        }
    }
}

/* qkv: [rows, q_heads + 2 kv_heads, dim] contiguous (q heads, then k, then v); cos, sin:
 * [max_len, dim] tables; k_cache / v_cache: one layer's [slots, kv_heads, max_len, dim] with
 * the given strides in elements (dim contiguous), fp32 or (kv_bf16) bf16. */
void rope_cache_write(float *qkv, const float *cos, const float *sin, const int64_t *positions,
                      const int64_t *slots, void *k_cache, void *v_cache, int64_t rows,
                      int64_t q_heads, int64_t kv_heads, int64_t dim, int64_t s_slot,
                      int64_t s_head, int64_t s_pos, int kv_bf16, int threads) {
    rope_job job = {qkv, cos, sin, positions, slots, k_cache, v_cache, q_heads, kv_heads, dim,
                    s_slot, s_head, s_pos, kv_bf16};
    for_rows(rope_rows, &job, rows, (q_heads + 2 * kv_heads) * dim, threads);
}

typedef struct {
    const float *gate_up;
    float *y;
    int64_t n;
} silu_job;

static void silu_rows(void *arg, int64_t r0, int64_t r1) {
    const silu_job *j = arg;
    for (int64_t r = r0; r < r1; r++) {
        const float *g = j->gate_up + r * 2 * j->n, *u = g + j->n;
        float *yr = j->y + r * j->n;
        for (int64_t i = 0; i < j->n; i++) yr[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

void silu_mul(const float *gate_up, float *y, int64_t rows, int64_t n, int threads) {
    silu_job job = {gate_up, y, n};
    for_rows(silu_rows, &job, rows, 3 * n, threads);
}

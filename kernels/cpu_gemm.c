/* Products y[r] = W x[r] (+ bias) on CPU, fp32, for any number of rows r, with W laid out in
 * panels of 16 output features: panels[p][k][j] = W[16 p + j][k] (cpu_gemm.py makes it). One
 * copy of the weights in this layout serves every step, decode and prefill alike.
 *
 * A decode step of a few rows reads every weight once and does two FLOPs per weight and row,
 * so its speed is the speed of streaming W from memory. Row-major W read with a dot product per
 * output feature streams several rows at once and ends each with a horizontal sum; the panel
 * layout streams W front to back in one pass, each 64-byte load feeding 16 outputs, with no
 * horizontal sums. Rows are taken `row_block` at a time, panel by panel, so W is read from
 * memory once however many rows (later blocks find the panel in L2), and each load feeds
 * `row_block` rows. A prefill chunk of hundreds of rows runs the same loop, bound by arithmetic:
 * `row_block` is then what keeps the FMA units busy, and it is the number of accumulators the
 * CPU's vector registers hold (cpu_gemm.py picks it from the CPU's flags).
 *
 * Threads take chunks of whole panels (and, for many rows, of rows): every output is computed
 * by one thread in the same order — two partial sums over k mod 2, added at the end — whatever
 * the number of rows, the row block or the threads, so a row's result depends on nothing else.
 *
 * Panels may hold bf16 weights (gemm_panels_bf16): each is widened to fp32 exactly as it is
 * loaded (a 16-bit shift) and the arithmetic is the fp32 kernel's, in its order, so the result
 * is bit for bit the fp32 kernel's on the bf16-rounded weights, from half the bytes.
 */
#include <stdint.h>
#include <string.h>

#include "cpu_threads.h"

/* That order is kept only if the compiler may not reassociate: the library is built with
 * -ffast-math for the attention kernel's reductions, which this file does not need. */
#if defined(__clang__)
#pragma clang fp reassociate(off)
#elif defined(__GNUC__)
#pragma GCC optimize("no-associative-math")
#endif

/* How far ahead the kernels ask for weights (in 16-float steps of the stream, 4 KiB): the
 * hardware prefetcher alone ramps up too slowly on the many short streams of a step. */
#define PREFETCH_STEPS 64

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* The panel loop works in the CPU's own vector width: one AVX-512 register holds a panel's 16
 * floats, elsewhere a panel is PARTS registers of LANES floats. (GCC lowers a 64-byte vector on
 * AVX2 through the stack: every accumulator is stored and reloaded at each step, 10x slower.)
 * Lane by lane the arithmetic is the same, so the result does not depend on the width. */
#if defined(__AVX512F__)
#define LANES 16
#else
#define LANES 8
#endif
#define PARTS (16 / LANES)
typedef float vreg __attribute__((vector_size(LANES * 4)));
typedef uint16_t u16xl __attribute__((vector_size(LANES * 2), aligned(2)));
typedef uint32_t u32xl __attribute__((vector_size(LANES * 4)));

ALWAYS_INLINE vreg loadv(const float *p) {
    vreg v;
    memcpy(&v, p, sizeof v);
    return v;
}

ALWAYS_INLINE vreg loadv_bf16(const uint16_t *p) {
    u16xl h;
    memcpy(&h, p, sizeof h);
    u32xl wide = __builtin_convertvector(h, u32xl) << 16;
    vreg v;
    memcpy(&v, &wide, sizeof v);
    return v;
}

/* Part q of weights k * 16 .. k * 16 + 15 of a panel, fp32 or bf16 (`bf16` is a constant at
 * each call). */
ALWAYS_INLINE vreg weights_part(const void *wp, int64_t k, int q, int bf16) {
    return bf16 ? loadv_bf16((const uint16_t *)wp + k * 16 + q * LANES)
                : loadv((const float *)wp + k * 16 + q * LANES);
}

/* One panel (16 output features) for `rows` (1-8) rows of x; `rows` and `bf16` are constants
 * at each call site, so the loops over rows unroll and the accumulators stay in registers. */
ALWAYS_INLINE void panel(const float *x, const void *w, const float *bias, float *y,
                         int64_t rows, int64_t k_in, int64_t n_out, int64_t p, int bf16) {
    vreg acc[8][2][PARTS];
    for (int r = 0; r < 8; r++)
        for (int q = 0; q < PARTS; q++) acc[r][0][q] = acc[r][1][q] = (vreg){0};
    const int64_t size = bf16 ? 2 : 4;
    const char *wp = (const char *)w + p * 16 * k_in * size;
    int64_t k = 0;
    for (; k + 2 <= k_in; k += 2) {
        __builtin_prefetch(wp + (k + PREFETCH_STEPS) * 16 * size);
        __builtin_prefetch(wp + (k + PREFETCH_STEPS + 1) * 16 * size);
        vreg w0[PARTS], w1[PARTS];
        for (int q = 0; q < PARTS; q++) {
            w0[q] = weights_part(wp, k, q, bf16);
            w1[q] = weights_part(wp, k + 1, q, bf16);
        }
        for (int64_t r = 0; r < rows; r++) {
            const float x0 = x[r * k_in + k], x1 = x[r * k_in + k + 1];
            for (int q = 0; q < PARTS; q++) {
                acc[r][0][q] += x0 * w0[q];
                acc[r][1][q] += x1 * w1[q];
            }
        }
    }
    if (k < k_in) {
        vreg wk[PARTS];
        for (int q = 0; q < PARTS; q++) wk[q] = weights_part(wp, k, q, bf16);
        for (int64_t r = 0; r < rows; r++)
            for (int q = 0; q < PARTS; q++) acc[r][0][q] += x[r * k_in + k] * wk[q];
    }
    for (int q = 0; q < PARTS; q++) {
        vreg b = {0};
        if (bias) b = loadv(bias + p * 16 + q * LANES);
        for (int64_t r = 0; r < rows; r++) {
            vreg sum = (acc[r][0][q] + acc[r][1][q]) + b;
            memcpy(y + r * n_out + p * 16 + q * LANES, &sum, sizeof sum);
        }
    }
}

/* Rows [r0, r1) of one panel, `block` (1-8) rows at a time. */
ALWAYS_INLINE void panel_rows(const float *x, const void *w, const float *bias, float *y,
                              int64_t r0, int64_t r1, int64_t block, int64_t k_in, int64_t n_out,
                              int64_t p, int bf16) {
    for (int64_t r = r0; r < r1; r += block) {
        const float *xr = x + r * k_in;
        float *yr = y + r * n_out;
        switch (r1 - r < block ? r1 - r : block) {
        case 1: panel(xr, w, bias, yr, 1, k_in, n_out, p, bf16); break;
        case 2: panel(xr, w, bias, yr, 2, k_in, n_out, p, bf16); break;
        case 3: panel(xr, w, bias, yr, 3, k_in, n_out, p, bf16); break;
        case 4: panel(xr, w, bias, yr, 4, k_in, n_out, p, bf16); break;
        case 5: panel(xr, w, bias, yr, 5, k_in, n_out, p, bf16); break;
        case 6: panel(xr, w, bias, yr, 6, k_in, n_out, p, bf16); break;
        case 7: panel(xr, w, bias, yr, 7, k_in, n_out, p, bf16); break;
        default: panel(xr, w, bias, yr, 8, k_in, n_out, p, bf16);
        }
    }
}

static void panel_rows_f32(const float *x, const void *w, const float *bias, float *y,
                           int64_t r0, int64_t r1, int64_t block, int64_t k_in, int64_t n_out,
                           int64_t p) {
    panel_rows(x, w, bias, y, r0, r1, block, k_in, n_out, p, 0);
}

static void panel_rows_bf16(const float *x, const void *w, const float *bias, float *y,
                            int64_t r0, int64_t r1, int64_t block, int64_t k_in, int64_t n_out,
                            int64_t p) {
    panel_rows(x, w, bias, y, r0, r1, block, k_in, n_out, p, 1);
}

typedef struct {
    const float *x;
    const void *w;
    const float *bias;
    float *y;
    int64_t rows, k_in, n_out, block, panels_per_chunk, rows_per_chunk, panel_chunks;
    void (*rows_fn)(const float *, const void *, const float *, float *, int64_t, int64_t,
                    int64_t, int64_t, int64_t, int64_t);
} gemm_job;

/* Chunk c: panels [pc * panels_per_chunk, ...) of rows [rc * rows_per_chunk, ...), panel by
 * panel, so the chunk's weights leave memory once for all its rows. */
static void gemm_chunk(void *arg, int64_t c, int thread) {
    (void)thread;
    const gemm_job *j = arg;
    const int64_t pc = c % j->panel_chunks, rc = c / j->panel_chunks;
    const int64_t p0 = pc * j->panels_per_chunk, r0 = rc * j->rows_per_chunk;
    int64_t p1 = p0 + j->panels_per_chunk, r1 = r0 + j->rows_per_chunk;
    if (p1 > j->n_out / 16) p1 = j->n_out / 16;
    if (r1 > j->rows) r1 = j->rows;
    for (int64_t p = p0; p < p1; p++)
        j->rows_fn(j->x, j->w, j->bias, j->y, r0, r1, j->block, j->k_in, j->n_out, p);
}

static void gemm(const float *x, const void *w, const float *bias, float *y, int64_t rows,
                 int64_t k_in, int64_t n_out, int64_t block, int64_t cache_bytes, int threads,
                 int bf16) {
    const int64_t panels = n_out / 16, row_bytes = k_in * (int64_t)sizeof(float);
    if (block < 1 || block > 8) block = block < 1 ? 1 : 8;
    int64_t rows_per_chunk = cache_bytes / 2 / row_bytes / block * block;
    if (rows_per_chunk < block) rows_per_chunk = block;
    const int64_t row_chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
    int64_t per = cache_bytes / 4 / (16 * k_in * (bf16 ? 2 : 4));
    /* enough panel chunks that each thread gets several, unless the rows split enough */
    per = chunk_items(panels, per < 1 ? 1 : per, 1, row_chunks >= 4 * threads ? 1 : threads, 4);
    gemm_job job = {x, w, bias, y, rows, k_in, n_out, block, per, rows_per_chunk,
                    (panels + per - 1) / per, bf16 ? panel_rows_bf16 : panel_rows_f32};
    pool_run(gemm_chunk, &job, job.panel_chunks * row_chunks, threads);
}

/* x: [rows, k_in], y: [rows, n_out], both contiguous; w: [n_out / 16, k_in, 16]; bias: [n_out]
 * or NULL. n_out must be a multiple of 16. block: rows per register block (1-8); cache_bytes:
 * the per-core L2 size, which bounds a chunk (a quarter of it in weights, half in rows of x);
 * threads: threads to use, the caller included. */
void gemm_panels(const float *x, const float *w, const float *bias, float *y, int64_t rows,
                 int64_t k_in, int64_t n_out, int64_t block, int64_t cache_bytes, int threads) {
    gemm(x, w, bias, y, rows, k_in, n_out, block, cache_bytes, threads, 0);
}

/* gemm_panels over bf16 panels (the raw 16-bit patterns). */
void gemm_panels_bf16(const float *x, const uint16_t *w, const float *bias, float *y,
                      int64_t rows, int64_t k_in, int64_t n_out, int64_t block,
                      int64_t cache_bytes, int threads) {
    gemm(x, w, bias, y, rows, k_in, n_out, block, cache_bytes, threads, 1);
}

/* Products with a row-major weight W [n_out, k_in] (fp32 or bf16): y[r][o] = dot(x[r], W[o]).
 * The LM head reads the tied embedding this way, so one copy of its rows serves lookups, the
 * restricted CoLD head and the head's product. A block of `nc` outputs by `nr` rows keeps
 * nr x nc 16-lane accumulators in registers (cpu_gemm.py picks the block from the CPU's
 * registers); the block's rows of W leave memory once and are read from L1 for the next rows
 * of x. Every output is dot()'s order — lane j sums k = j (mod 16) in order, hsum_parts's tree,
 * then the tail in order — whatever the rows, the block or the threads. */
ALWAYS_INLINE vreg row_part(const char *row, int64_t k, int q, int bf16) {
    return bf16 ? loadv_bf16((const uint16_t *)row + k + q * LANES)
                : loadv((const float *)row + k + q * LANES);
}

ALWAYS_INLINE float row_at(const char *row, int64_t k, int bf16) {
    if (!bf16) return ((const float *)row)[k];
    uint32_t u = (uint32_t)((const uint16_t *)row)[k] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* The sum of 16 lanes (held as PARTS registers, lanes 0-7 first on AVX2) by a fixed tree:
 * lanes j and j + 8, then j + 4, j + 2, j + 1. */
ALWAYS_INLINE float hsum_parts(const vreg *v) {
    float lanes[16];
    memcpy(lanes, v, sizeof lanes);
    for (int width = 8; width >= 1; width /= 2)
        for (int j = 0; j < width; j++) lanes[j] += lanes[j + width];
    return lanes[0];
}

/* Sum of a[i] * b[i] for i < n: 16 lanes (lane j sums i = j mod 16 in order), hsum_parts's
 * tree, then the tail in order. */
ALWAYS_INLINE float dot(const float *a, const float *b, int64_t n) {
    vreg acc[PARTS];
    for (int q = 0; q < PARTS; q++) acc[q] = (vreg){0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int q = 0; q < PARTS; q++)
            acc[q] += loadv(a + i + q * LANES) * loadv(b + i + q * LANES);
    float sum = hsum_parts(acc);
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* Outputs [o0, o0 + nc) of rows [0, nr) of x (nr, nc in 1-4, bf16: constants at each call);
 * `ahead`: ask for the next block's rows of W while reading this one's. Lanes in the CPU's
 * vector width (see `panel`): lane j still sums k = j (mod 16) in order. */
ALWAYS_INLINE void dot_block(const float *x, const char *w, float *y, int64_t k_in,
                             int64_t n_out, int64_t o0, int nr, int nc, int bf16, int ahead) {
    vreg acc[4][4][PARTS];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++)
            for (int q = 0; q < PARTS; q++) acc[r][c][q] = (vreg){0};
    const int64_t size = bf16 ? 2 : 4, whole = k_in / 16 * 16, row = k_in * size;
    const char *wb = w + o0 * row;
    for (int64_t k = 0; k < whole; k += 16) {
        vreg xv[4][PARTS], wv[4][PARTS];
        for (int c = 0; c < nc; c++) {
            if (ahead) __builtin_prefetch(wb + (nc + c) * row + k * size);
            for (int q = 0; q < PARTS; q++) wv[c][q] = row_part(wb + c * row, k, q, bf16);
        }
        for (int r = 0; r < nr; r++)
            for (int q = 0; q < PARTS; q++) xv[r][q] = loadv(x + r * k_in + k + q * LANES);
        for (int r = 0; r < nr; r++)
            for (int c = 0; c < nc; c++)
                for (int q = 0; q < PARTS; q++) acc[r][c][q] += xv[r][q] * wv[c][q];
    }
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nc; c++) {
            float sum = hsum_parts(acc[r][c]);
            for (int64_t k = whole; k < k_in; k++) /* a fused multiply-add in every variant */
                sum = __builtin_fmaf(x[r * k_in + k], row_at(wb + c * row, k, bf16), sum);
            y[r * n_out + o0 + c] = sum;
        }
}

typedef struct {
    const float *x;
    const char *w;
    float *y;
    int64_t rows, k_in, n_out, nr, nc, per_chunk;
    int bf16;
} rows_job;

/* One block with the register shape (nr, nc) — each shape a compiled loop of its own, so only
 * the shapes the blocking can pick (and their edges) are compiled: 2 x 2 and 1 x 2 for 16-
 * and 32-register ISAs, 4 x 4 where AVX-512 is. */
static void dot_shape(const float *x, const char *w, float *y, int64_t k_in, int64_t n_out,
                      int64_t o, int nr, int nc, int bf16, int ahead) {
#define DOT(r, c)                                                                        \
    do {                                                                                 \
        if (bf16) dot_block(x, w, y, k_in, n_out, o, r, c, 1, ahead);                    \
        else dot_block(x, w, y, k_in, n_out, o, r, c, 0, ahead);                         \
        return;                                                                          \
    } while (0)
    if (nr == 2 && nc == 2) DOT(2, 2);
    if (nr == 1 && nc == 2) DOT(1, 2);
    if (nr == 2 && nc == 1) DOT(2, 1);
#ifdef __AVX512F__
    if (nr == 4 && nc == 4) DOT(4, 4);
    if (nr == 1 && nc == 4) DOT(1, 4);
    if (nr == 4 && nc == 1) DOT(4, 1);
#endif
    for (int r = 0; r < nr; r++) /* any other shape: output by output */
        for (int c = 0; c < nc; c++) {
            if (bf16) dot_block(x + r * k_in, w, y + r * n_out, k_in, n_out, o + c, 1, 1, 1, 0);
            else dot_block(x + r * k_in, w, y + r * n_out, k_in, n_out, o + c, 1, 1, 0, 0);
        }
#undef DOT
}

/* Chunk c: outputs [c * per_chunk, ...), block by block, each block for every row of x; the
 * last rows and outputs that do not fill a block go one at a time. */
static void rows_chunk(void *arg, int64_t c, int thread) {
    (void)thread;
    const rows_job *j = arg;
    int64_t o1 = (c + 1) * j->per_chunk;
    if (o1 > j->n_out) o1 = j->n_out;
    for (int64_t o = c * j->per_chunk; o < o1; o += j->nc) {
        const int nc = o1 - o < j->nc ? 1 : (int)j->nc;
        if (nc < j->nc) { /* the chunk's last outputs */
            for (; o < o1; o++)
                for (int64_t r = 0; r < j->rows; r++)
                    dot_shape(j->x + r * j->k_in, j->w, j->y + r * j->n_out, j->k_in, j->n_out,
                              o, 1, 1, j->bf16, 0);
            break;
        }
        int64_t r0 = 0;
        for (; r0 + j->nr <= j->rows; r0 += j->nr)
            dot_shape(j->x + r0 * j->k_in, j->w, j->y + r0 * j->n_out, j->k_in, j->n_out, o,
                      (int)j->nr, nc, j->bf16, r0 == 0 && o + 2 * nc <= o1);
        for (; r0 < j->rows; r0++)
            dot_shape(j->x + r0 * j->k_in, j->w, j->y + r0 * j->n_out, j->k_in, j->n_out, o, 1,
                      nc, j->bf16, r0 == 0 && o + 2 * nc <= o1);
    }
}

/* x: [rows, k_in], y: [rows, n_out], both contiguous; w: [n_out, k_in] contiguous, fp32 or
 * (w_bf16) bf16. nr, nc: rows and outputs per register block (1-4); cache_bytes: the per-core
 * L2 size (a quarter of it in rows of W per chunk); threads: threads to use, the caller
 * included. */
void gemm_rows(const float *x, const void *w, float *y, int64_t rows, int64_t k_in,
               int64_t n_out, int64_t nr, int64_t nc, int64_t cache_bytes, int w_bf16,
               int threads) {
    nr = nr < 1 ? 1 : nr > 4 ? 4 : nr;
    nc = nc < 1 ? 1 : nc > 4 ? 4 : nc;
    int64_t per = cache_bytes / 4 / (k_in * (w_bf16 ? 2 : 4));
    per = chunk_items(n_out, per < nc ? nc : per, nc, threads, 4);
    rows_job job = {x, w, y, rows, k_in, n_out, nr, nc, per, w_bf16};
    pool_run(rows_chunk, &job, (n_out + per - 1) / per, threads);
}

/* LoRA on a few rows, straight from an adapter slot's row-major factors:
 * y[r] += scale * B (A x[r]) for r < rows (at most 4), with A: [rank, k_in], B: [n_out, rank],
 * x: [rows, k_in] contiguous, y rows `y_stride` floats apart; rank at most 1024 (the shrunk
 * rows live on the stack). Returns -1 beyond those limits. Each factor is read from memory
 * once for all rows; every sum is dot()'s order. */
int lora_small(const float *x, const float *A, const float *B, float scale, float *y,
               int64_t rows, int64_t k_in, int64_t rank, int64_t n_out, int64_t y_stride) {
    if (rank > 1024 || rows > 4 || rows < 0) return -1;
    float t[4][1024];
    for (int64_t j = 0; j < rank; j++) {
        if (j + 4 < rank)  /* four rows of A ahead */
            for (int64_t c = 0; c < k_in; c += 16) __builtin_prefetch(A + (j + 4) * k_in + c);
        for (int64_t r = 0; r < rows; r++) t[r][j] = scale * dot(x + r * k_in, A + j * k_in, k_in);
    }
    for (int64_t c = 0; c < 32 * rank && c < n_out * rank; c += 16) __builtin_prefetch(B + c);
    for (int64_t o = 0; o < n_out; o++) {
        const float *b = B + o * rank;
        if (o % 16 == 0 && o + 32 < n_out) /* the block of 16 outputs two blocks ahead */
            for (int64_t c = 0; c < 16 * rank; c += 16) __builtin_prefetch(b + 32 * rank + c);
        for (int64_t r = 0; r < rows; r++) y[r * y_stride + o] += dot(t[r], b, rank);
    }
    return 0;
}

typedef struct {
    const float *x, *A, *B;
    float *y;
    float scale;
    int64_t rows, k_in, rank, n_out, y_stride;
} lora_job;

static void lora_chunk(void *arg, int64_t c, int thread) {
    (void)thread;
    const lora_job *j = arg;
    const int64_t r0 = 4 * c, n = j->rows - r0 < 4 ? j->rows - r0 : 4;
    lora_small(j->x + r0 * j->k_in, j->A, j->B, j->scale, j->y + r0 * j->y_stride, n, j->k_in,
               j->rank, j->n_out, j->y_stride);
}

/* lora_small for any number of rows of one adapter, four at a time, the fours across threads
 * (a decode step's run of expert rows); each row exactly as lora_small computes it alone.
 * Returns -1 beyond lora_small's rank limit. */
int lora_rows(const float *x, const float *A, const float *B, float scale, float *y,
              int64_t rows, int64_t k_in, int64_t rank, int64_t n_out, int64_t y_stride,
              int threads) {
    if (rank > 1024 || rows < 0) return -1;
    lora_job job = {x, A, B, y, scale, rows, k_in, rank, n_out, y_stride};
    pool_run(lora_chunk, &job, (rows + 3) / 4, threads);
    return 0;
}

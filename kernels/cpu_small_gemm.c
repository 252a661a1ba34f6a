/* Decode-sized products on CPU: y[r] = W x[r] (+ bias) for a few rows r, fp32, with W laid out
 * in panels of 16 output features: panels[p][k][j] = W[16 p + j][k] (cpu_gemm.py makes it).
 *
 * A decode step of a few rows reads every weight once and does two FLOPs per weight and row,
 * so its speed is the speed of streaming W from memory. Row-major W read with a dot product per
 * output feature streams several rows at once and ends each with a horizontal sum; the panel
 * layout streams W front to back in one pass, each 64-byte load feeding 16 outputs, with no
 * horizontal sums. Rows are taken eight at a time, panel by panel, so W is read from memory
 * once however many rows (later groups find the panel in L2), and each load feeds up to eight
 * rows.
 *
 * Every output is summed in the same order (two partial sums over k mod 2, added at the end)
 * whatever the number of rows, so a row's result does not depend on the batch.
 */
#include <stdint.h>
#include <string.h>

/* That order is kept only if the compiler may not reassociate: the library is built with
 * -ffast-math for the attention kernel's reductions, which this file does not need. */
#if defined(__clang__)
#pragma clang fp reassociate(off)
#elif defined(__GNUC__)
#pragma GCC optimize("no-associative-math")
#endif

typedef float vec16 __attribute__((vector_size(64), aligned(4)));

/* How far ahead the kernels ask for weights (in 16-float steps of the stream, 4 KiB): the
 * hardware prefetcher alone ramps up too slowly on the many short streams of a step. */
#define PREFETCH_STEPS 64

#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE vec16 load16(const float *p) {
    vec16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* One panel (16 output features) for `rows` (1-8) rows of x; `rows` is a constant at each call
 * site, so the loops over it unroll. */
ALWAYS_INLINE void panel(const float *x, const float *w, const float *bias, float *y,
                         int64_t rows, int64_t k_in, int64_t n_out, int64_t p) {
    vec16 acc[8][2];
    memset(acc, 0, sizeof acc);
    const float *wp = w + p * 16 * k_in;
    int64_t k = 0;
    for (; k + 2 <= k_in; k += 2) {
        __builtin_prefetch(wp + (k + PREFETCH_STEPS) * 16);
        __builtin_prefetch(wp + (k + PREFETCH_STEPS + 1) * 16);
        vec16 w0 = load16(wp + k * 16), w1 = load16(wp + k * 16 + 16);
        for (int64_t r = 0; r < rows; r++) {
            acc[r][0] += x[r * k_in + k] * w0;
            acc[r][1] += x[r * k_in + k + 1] * w1;
        }
    }
    if (k < k_in) {
        vec16 wk = load16(wp + k * 16);
        for (int64_t r = 0; r < rows; r++) acc[r][0] += x[r * k_in + k] * wk;
    }
    vec16 b = {0};
    if (bias) b = load16(bias + p * 16);
    for (int64_t r = 0; r < rows; r++) {
        vec16 sum = (acc[r][0] + acc[r][1]) + b;
        memcpy(y + r * n_out + p * 16, &sum, sizeof sum);
    }
}

/* x: [rows, k_in], y: [rows, n_out], both contiguous; w: [n_out / 16, k_in, 16]; bias: [n_out]
 * or NULL. n_out must be a multiple of 16. */
void small_gemm(const float *x, const float *w, const float *bias, float *y, int64_t rows,
                int64_t k_in, int64_t n_out) {
    /* panel by panel (16 x k_in floats, in L2 after its first group of rows), so W is read from
     * memory once however many rows */
    for (int64_t p = 0; p < n_out / 16; p++) {
        for (int64_t r0 = 0; r0 < rows; r0 += 8) {
            const float *xr = x + r0 * k_in;
            float *yr = y + r0 * n_out;
            int64_t left = rows - r0;
            switch (left) {
            case 1: panel(xr, w, bias, yr, 1, k_in, n_out, p); break;
            case 2: panel(xr, w, bias, yr, 2, k_in, n_out, p); break;
            case 3: panel(xr, w, bias, yr, 3, k_in, n_out, p); break;
            case 4: panel(xr, w, bias, yr, 4, k_in, n_out, p); break;
            case 5: panel(xr, w, bias, yr, 5, k_in, n_out, p); break;
            case 6: panel(xr, w, bias, yr, 6, k_in, n_out, p); break;
            case 7: panel(xr, w, bias, yr, 7, k_in, n_out, p); break;
            default: panel(xr, w, bias, yr, 8, k_in, n_out, p);
            }
        }
    }
}

/* The sum of a vector's lanes by a fixed tree: lanes j and j + 8, then j + 4, j + 2, j + 1. */
ALWAYS_INLINE float hsum16(vec16 v) {
    float lanes[16];
    memcpy(lanes, &v, sizeof lanes);
    for (int width = 8; width >= 1; width /= 2)
        for (int j = 0; j < width; j++) lanes[j] += lanes[j + width];
    return lanes[0];
}

/* Sum of a[i] * b[i] for i < n: 16 lanes, then hsum16's tree, then the tail in order. */
ALWAYS_INLINE float dot(const float *a, const float *b, int64_t n) {
    vec16 acc = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) acc += load16(a + i) * load16(b + i);
    float sum = hsum16(acc);
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* GCC before 12 has no __builtin_shufflevector; COLD_RAY_NO_SHUFFLEVECTOR forces the fallback
 * (the tests build it to check that both give the same bits). */
#if defined(__has_builtin) && !defined(COLD_RAY_NO_SHUFFLEVECTOR)
#if __has_builtin(__builtin_shufflevector)
#define HAVE_SHUFFLEVECTOR 1
#endif
#endif

/* out[j] = hsum16(v[j]) for 16 vectors at once: the same tree, as four levels of pairwise
 * halving across vectors (no per-vector horizontal sum). */
#ifdef HAVE_SHUFFLEVECTOR
ALWAYS_INLINE vec16 reduce16(const vec16 *v) {
    vec16 w1[8], w2[4], w3[2];
    for (int i = 0; i < 8; i++)  /* [lanes of v[2i] | v[2i+1]], 8 partial sums each */
        w1[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17,
                                        18, 19, 20, 21, 22, 23) +
                __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24,
                                        25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; i++)  /* four outputs, 4 partial sums each */
        w2[i] = __builtin_shufflevector(w1[2 * i], w1[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16,
                                        17, 18, 19, 24, 25, 26, 27) +
                __builtin_shufflevector(w1[2 * i], w1[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20,
                                        21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++)  /* eight outputs, 2 partial sums each */
        w3[i] = __builtin_shufflevector(w2[2 * i], w2[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16,
                                        17, 20, 21, 24, 25, 28, 29) +
                __builtin_shufflevector(w2[2 * i], w2[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18,
                                        19, 22, 23, 26, 27, 30, 31);
    return __builtin_shufflevector(w3[0], w3[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24,
                                   26, 28, 30) +
           __builtin_shufflevector(w3[0], w3[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25,
                                   27, 29, 31);
}
#else
ALWAYS_INLINE vec16 reduce16(const vec16 *v) {
    vec16 out;
    for (int q = 0; q < 16; q++) out[q] = hsum16(v[q]);
    return out;
}
#endif

/* LoRA on a few rows, straight from an adapter slot's row-major factors:
 * y[r] += scale * B (A x[r]) for r < rows (at most 4), with A: [rank, k_in], B: [n_out, rank],
 * x: [rows, k_in] contiguous, y rows `y_stride` floats apart; rank at most 1024 (the shrunk
 * rows live on the stack). Returns -1 beyond those limits. Each factor is read from memory
 * once for all rows; 16 outputs of the expansion are reduced together (no per-output
 * horizontal sum). */
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
    int64_t o = 0, whole = rank / 16 * 16;
    for (; o + 16 <= n_out; o += 16) {
        const float *b = B + o * rank;
        if (o + 32 < n_out)  /* the block of 16 outputs two blocks ahead */
            for (int64_t c = 0; c < 16 * rank; c += 16) __builtin_prefetch(b + 32 * rank + c);
        for (int64_t r = 0; r < rows; r++) {
            vec16 acc[16];
            memset(acc, 0, sizeof acc);
            for (int64_t j = 0; j < whole; j += 16) {
                vec16 tj = load16(t[r] + j);
                for (int q = 0; q < 16; q++) acc[q] += tj * load16(b + q * rank + j);
            }
            vec16 sum = reduce16(acc);
            for (int q = 0; q < 16; q++)  /* rank's tail beyond whole vectors, in order */
                for (int64_t j = whole; j < rank; j++) sum[q] += t[r][j] * b[q * rank + j];
            vec16 out = load16(y + r * y_stride + o) + sum;
            memcpy(y + r * y_stride + o, &out, sizeof out);
        }
    }
    for (; o < n_out; o++)
        for (int64_t r = 0; r < rows; r++) y[r * y_stride + o] += dot(t[r], B + o * rank, rank);
    return 0;
}

/* Decode-sized products on CPU: y[r] = W x[r] (+ bias) for a few rows r, fp32, with W laid out
 * in panels of 16 output features: panels[p][k][j] = W[16 p + j][k] (cpu_gemm.py makes it).
 *
 * A decode step of one or two rows reads every weight once and does two FLOPs per weight, so
 * its speed is the speed of streaming W from memory. Row-major W read with a dot product per
 * output feature streams several rows at once and ends each with a horizontal sum; the panel
 * layout streams W front to back in one pass, each 64-byte load feeding 16 outputs, with no
 * horizontal sums. Rows are taken four at a time, so up to four rows read W once.
 *
 * Every output is summed in the same order (four partial sums over k mod 4, added pairwise at
 * the end) whatever the number of rows, so a row's result does not depend on the batch.
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

#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE vec16 load16(const float *p) {
    vec16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* One panel (16 output features) for `rows` (1-4) rows of x; `rows` is a constant at each call
 * site, so the loops over it unroll. */
ALWAYS_INLINE void panel(const float *x, const float *w, const float *bias, float *y,
                         int64_t rows, int64_t k_in, int64_t n_out, int64_t p) {
    vec16 acc[4][4];
    memset(acc, 0, sizeof acc);
    const float *wp = w + p * 16 * k_in;
    int64_t k = 0;
    for (; k + 4 <= k_in; k += 4) {
        for (int64_t j = 0; j < 4; j++) {
            vec16 wk = load16(wp + (k + j) * 16);
            for (int64_t r = 0; r < rows; r++) acc[r][j] += x[r * k_in + k + j] * wk;
        }
    }
    for (int64_t j = 0; k < k_in; k++, j++) {
        vec16 wk = load16(wp + k * 16);
        for (int64_t r = 0; r < rows; r++) acc[r][j] += x[r * k_in + k] * wk;
    }
    vec16 b = {0};
    if (bias) b = load16(bias + p * 16);
    for (int64_t r = 0; r < rows; r++) {
        vec16 sum = ((acc[r][0] + acc[r][1]) + (acc[r][2] + acc[r][3])) + b;
        memcpy(y + r * n_out + p * 16, &sum, sizeof sum);
    }
}

/* x: [rows, k_in], y: [rows, n_out], both contiguous; w: [n_out / 16, k_in, 16]; bias: [n_out]
 * or NULL. n_out must be a multiple of 16. */
void small_gemm(const float *x, const float *w, const float *bias, float *y, int64_t rows,
                int64_t k_in, int64_t n_out) {
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
        const float *xr = x + r0 * k_in;
        float *yr = y + r0 * n_out;
        int64_t left = rows - r0;
        for (int64_t p = 0; p < n_out / 16; p++) {
            if (left == 1) panel(xr, w, bias, yr, 1, k_in, n_out, p);
            else if (left == 2) panel(xr, w, bias, yr, 2, k_in, n_out, p);
            else if (left == 3) panel(xr, w, bias, yr, 3, k_in, n_out, p);
            else panel(xr, w, bias, yr, 4, k_in, n_out, p);
        }
    }
}

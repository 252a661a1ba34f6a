/* The row-wise operations of a forward pass on CPU, fp32, each one call instead of a chain of
 * torch operators (on CPU F.rms_norm alone runs eight of them, ~10 µs at one row, and a
 * SmolLM2 step makes 61 of them):
 *   add_rms_norm      x += d (the residual stream; d may be NULL), y = x / rms(x) * w
 *   rope_cache_write  rotate each token's q and k heads in place (rotate-half, as
 *                     `llama.apply_rope`) and write its k and v heads into the layer's cache at
 *                     (its slot, its position)
 *   silu_mul          y = silu(gate) * up, gate and up the halves of each row of [rows, 2 n]
 * Each row is computed alone and in the same order whatever the batch, so a row's result does
 * not depend on the other rows.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

void add_rms_norm(float *x, const float *d, const float *w, float *y, int64_t rows, int64_t n,
                  float eps) {
    for (int64_t r = 0; r < rows; r++) {
        float *xr = x + r * n, *yr = y + r * n;
        float sq = 0.0f;
        if (d) {
            const float *dr = d + r * n;
            for (int64_t i = 0; i < n; i++) {
                xr[i] += dr[i];
                sq += xr[i] * xr[i];
            }
        } else {
            for (int64_t i = 0; i < n; i++) sq += xr[i] * xr[i];
        }
        const float inv = 1.0f / sqrtf(sq / (float)n + eps);
        for (int64_t i = 0; i < n; i++) yr[i] = xr[i] * inv * w[i];
    }
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

/* qkv: [rows, q_heads + 2 kv_heads, dim] contiguous (q heads, then k, then v); cos, sin:
 * [max_len, dim] tables; k_cache / v_cache: one layer's [slots, kv_heads, max_len, dim] with
 * the given strides (dim contiguous). */
void rope_cache_write(float *qkv, const float *cos, const float *sin, const int64_t *positions,
                      const int64_t *slots, float *k_cache, float *v_cache, int64_t rows,
                      int64_t q_heads, int64_t kv_heads, int64_t dim, int64_t s_slot,
                      int64_t s_head, int64_t s_pos) {
    const int64_t width = (q_heads + 2 * kv_heads) * dim;
    for (int64_t r = 0; r < rows; r++) {
        float *row = qkv + r * width;
        const int64_t pos = positions[r];
        const float *c = cos + pos * dim, *s = sin + pos * dim;
        for (int64_t h = 0; h < q_heads + kv_heads; h++) rotate(row + h * dim, c, s, dim);
        const int64_t at = slots[r] * s_slot + pos * s_pos;
        for (int64_t h = 0; h < kv_heads; h++) {
            memcpy(k_cache + at + h * s_head, row + (q_heads + h) * dim, dim * sizeof(float));
            memcpy(v_cache + at + h * s_head, row + (q_heads + kv_heads + h) * dim,
                   dim * sizeof(float));
        }
    }
}

void silu_mul(const float *gate_up, float *y, int64_t rows, int64_t n) {
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate_up + r * 2 * n, *u = g + n;
        float *yr = y + r * n;
        for (int64_t i = 0; i < n; i++) yr[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

/* Decode attention on CPU: each decode token attends to positions 0..positions[i] of its own
 * KV-cache slot, reading that slot's keys and values once for all the query heads that share
 * a K/V head (grouped-query attention). fp32 in and out; built by cpu_attention.py.
 *
 * Per (token, K/V head): scores of every query in the group against every cached key, a
 * softmax per query, then the weighted sum of the values. The order of every sum depends only
 * on that token's own data, so the result does not depend on what else is in the batch.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE void one_head(const float *q, const float *k, const float *v, float *out,
                            int64_t len, int64_t groups, int64_t dim, int64_t token_stride,
                            float scale, float *scores) {
    for (int64_t t = 0; t < len; t++) {
        const float *kt = k + t * token_stride;
        for (int64_t g = 0; g < groups; g++) {
            const float *qg = q + g * dim;
            float acc = 0.f;
            for (int64_t d = 0; d < dim; d++) acc += qg[d] * kt[d];
            scores[g * len + t] = acc * scale;
        }
    }
    for (int64_t g = 0; g < groups; g++) {
        float *s = scores + g * len, top = s[0], sum = 0.f;
        for (int64_t t = 1; t < len; t++) top = s[t] > top ? s[t] : top;
        for (int64_t t = 0; t < len; t++) {
            s[t] = expf(s[t] - top);
            sum += s[t];
        }
        float inv = 1.f / sum;
        for (int64_t t = 0; t < len; t++) s[t] *= inv;
    }
    memset(out, 0, sizeof(float) * groups * dim);
    for (int64_t t = 0; t < len; t++) {
        const float *vt = v + t * token_stride;
        for (int64_t g = 0; g < groups; g++) {
            float p = scores[g * len + t], *o = out + g * dim;
            for (int64_t d = 0; d < dim; d++) o[d] += p * vt[d];
        }
    }
}

/* q, out: [n, heads, dim] contiguous; k, v: one layer's cache, [slots, kv_heads, max_len, dim]
 * with the given strides (in floats) and unit stride along dim. Returns 0, or -1 when out of
 * memory. */
int decode_attention(const float *q, const float *k, const float *v, float *out,
                     const int64_t *slots, const int64_t *positions, int64_t n, int64_t heads,
                     int64_t kv_heads, int64_t dim, int64_t slot_stride, int64_t head_stride,
                     int64_t token_stride, float scale) {
    int64_t groups = heads / kv_heads, longest = 1;
    for (int64_t i = 0; i < n; i++)
        if (positions[i] + 1 > longest) longest = positions[i] + 1;
    float *scores = malloc(sizeof(float) * groups * longest);
    if (!scores) return -1;
    for (int64_t i = 0; i < n; i++) {
        for (int64_t h = 0; h < kv_heads; h++) {
            int64_t cache = slots[i] * slot_stride + h * head_stride, query = (i * heads + h * groups) * dim;
            /* the common head sizes get a loop the compiler unrolls and vectorises fully */
            if (dim == 64)
                one_head(q + query, k + cache, v + cache, out + query, positions[i] + 1, groups,
                         64, token_stride, scale, scores);
            else if (dim == 128)
                one_head(q + query, k + cache, v + cache, out + query, positions[i] + 1, groups,
                         128, token_stride, scale, scores);
            else
                one_head(q + query, k + cache, v + cache, out + query, positions[i] + 1, groups,
                         dim, token_stride, scale, scores);
        }
    }
    free(scores);
    return 0;
}

/* Decode attention on CPU: each decode token attends to positions 0..positions[i] of its own
 * KV-cache slot, reading that slot's keys and values once for all the query heads that share
 * a K/V head (grouped-query attention). fp32 in and out, the cache fp32 or bf16 (widened as it
 * is read); built by cpu_attention.py.
 *
 * Per (token, K/V head): scores of every query in the group against every cached key, a
 * softmax per query, then the weighted sum of the values. The order of every sum depends only
 * on that token's own data, so the result does not depend on what else is in the batch. Threads
 * take (token, K/V head) pairs one at a time: rows of different lengths balance themselves, and
 * a pair's result does not depend on the thread that computes it.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_threads.h"

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* Element i of a cache row, fp32 or bf16 (a bf16 is the top half of the fp32 of its value). */
ALWAYS_INLINE float kv_at(const void *row, int64_t i, int bf16) {
    if (!bf16) return ((const float *)row)[i];
    uint32_t u = (uint32_t)((const uint16_t *)row)[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* `dim` and `bf16` are constants at each call site: the loops unroll and vectorise. */
ALWAYS_INLINE void one_head(const float *q, const void *k, const void *v, float *out,
                            int64_t len, int64_t groups, int64_t dim, int64_t token_stride,
                            float scale, float *scores, int bf16) {
    const int64_t step = token_stride * (bf16 ? 2 : 4); /* bytes from one position to the next */
    for (int64_t t = 0; t < len; t++) {
        const char *kt = (const char *)k + t * step;
        for (int64_t g = 0; g < groups; g++) {
            const float *qg = q + g * dim;
            float acc = 0.f;
            for (int64_t d = 0; d < dim; d++) acc += qg[d] * kv_at(kt, d, bf16);
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
        const char *vt = (const char *)v + t * step;
        for (int64_t g = 0; g < groups; g++) {
            float p = scores[g * len + t], *o = out + g * dim;
            for (int64_t d = 0; d < dim; d++) o[d] += p * kv_at(vt, d, bf16);
        }
    }
}

typedef struct {
    const float *q;
    const char *k, *v;
    float *out, *scores; /* scores: `longest` x groups floats per thread */
    const int64_t *slots, *positions;
    int64_t heads, kv_heads, groups, dim, slot_stride, head_stride, token_stride, longest;
    float scale;
    int bf16;
} attention_job;

/* Chunk c: token c / kv_heads, K/V head c % kv_heads. */
static void attention_chunk(void *arg, int64_t c, int thread) {
    const attention_job *j = arg;
    const int64_t i = c / j->kv_heads, h = c % j->kv_heads, len = j->positions[i] + 1;
    const int64_t cache = j->slots[i] * j->slot_stride + h * j->head_stride;
    const int64_t query = (i * j->heads + h * j->groups) * j->dim;
    float *scores = j->scores + (int64_t)thread * j->groups * j->longest;
    const char *k = j->k + cache * (j->bf16 ? 2 : 4), *v = j->v + cache * (j->bf16 ? 2 : 4);
    const float *qi = j->q + query;
    float *out = j->out + query;
    /* the common head sizes get a loop the compiler unrolls and vectorises fully */
#define HEAD(dim, bf16) \
    one_head(qi, k, v, out, len, j->groups, dim, j->token_stride, j->scale, scores, bf16)
    if (j->bf16) {
        if (j->dim == 64) HEAD(64, 1);
        else if (j->dim == 128) HEAD(128, 1);
        else HEAD(j->dim, 1);
    } else {
        if (j->dim == 64) HEAD(64, 0);
        else if (j->dim == 128) HEAD(128, 0);
        else HEAD(j->dim, 0);
    }
#undef HEAD
}

/* q, out: [n, heads, dim] contiguous; k, v: one layer's cache, [slots, kv_heads, max_len, dim]
 * with the given strides (in elements) and unit stride along dim, fp32 or (kv_bf16) bf16.
 * Returns 0, or -1 when out of memory. */
int decode_attention(const float *q, const void *k, const void *v, float *out,
                     const int64_t *slots, const int64_t *positions, int64_t n, int64_t heads,
                     int64_t kv_heads, int64_t dim, int64_t slot_stride, int64_t head_stride,
                     int64_t token_stride, float scale, int kv_bf16, int threads) {
    int64_t groups = heads / kv_heads, longest = 1;
    for (int64_t i = 0; i < n; i++)
        if (positions[i] + 1 > longest) longest = positions[i] + 1;
    threads = pool_threads(threads);
    float *scores = malloc(sizeof(float) * groups * longest * threads);
    if (!scores) return -1;
    attention_job job = {q, k, v, out, scores, slots, positions, heads, kv_heads, groups, dim,
                         slot_stride, head_stride, token_stride, longest, scale, kv_bf16};
    pool_run(attention_chunk, &job, n * kv_heads, threads);
    free(scores);
    return 0;
}

/* Decode attention of one query row's heads over one KV head's paged cache, shared by
 * paged_attention.c and decode_step.c.
 *
 * Cache layout, for K and for V: [num_kv_heads, num_blocks, block_size, head_dim] float32, so one
 * (KV head, block) is a contiguous [block_size, head_dim] tile, found through a request's block table.
 * attend_one: scores of all positions (K read once), an exact softmax in float32, then the V-weighted
 * sum (V read once), for `group` query heads sharing the KV head. head_dim % LANES == 0.
 * attend_range / combine_ranges: the same over a block-aligned range of positions, as an unnormalized
 * partial (max score, sum of exponentials, weighted V sum), and the exact merge of a row's partials
 * (split-K), so that a few long rows can spread over threads and still read each K/V byte once.
 */
#ifndef TM_ATTENTION_TILE_H
#define TM_ATTENTION_TILE_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vec8.h"

/* scores[j] = q . k[j] for the n (<= 4) rows of k; head_dim % LANES == 0. Four independent
 * accumulators keep the FMA pipeline full (one chain is latency-bound at ~1/4 of the rate). */
static inline void dot4(float *scores, const float *q, const float *k, int64_t n, int64_t head_dim) {
    v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    const float *k1 = k + (n > 1 ? 1 : 0) * head_dim, *k2 = k + (n > 2 ? 2 : 0) * head_dim;
    const float *k3 = k + (n > 3 ? 3 : 0) * head_dim;
    for (int64_t d = 0; d < head_dim; d += LANES) {
        const v8 qv = *(const v8 *)(q + d);
        a0 += qv * *(const v8 *)(k + d);
        a1 += qv * *(const v8 *)(k1 + d);
        a2 += qv * *(const v8 *)(k2 + d);
        a3 += qv * *(const v8 *)(k3 + d);
    }
    const float s[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
    for (int64_t j = 0; j < n; ++j) scores[j] = s[j];
}

/* out += sum_j p[j] * v[j] over n rows of v; four chains as above. */
static inline void axpy_rows(float *restrict out, const float *p, const float *v, int64_t n, int64_t head_dim) {
    for (int64_t d = 0; d < head_dim; d += LANES) {
        v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        int64_t j = 0;
        for (; j + 4 <= n; j += 4) {
            a0 += p[j] * *(const v8 *)(v + j * head_dim + d);
            a1 += p[j + 1] * *(const v8 *)(v + (j + 1) * head_dim + d);
            a2 += p[j + 2] * *(const v8 *)(v + (j + 2) * head_dim + d);
            a3 += p[j + 3] * *(const v8 *)(v + (j + 3) * head_dim + d);
        }
        for (; j < n; ++j) a0 += p[j] * *(const v8 *)(v + j * head_dim + d);
        *(v8 *)(out + d) += (a0 + a1) + (a2 + a3);
    }
}

/* Asks for the n floats at p ahead of use (one request per 64-byte line): blocks sit at random
 * places in the cache, so the hardware prefetcher restarts at every block and stalls on memory. */
static inline void prefetch_tile(const float *p, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(p + i, 0, 2);
}

/* The [block_size, head_dim] tile of one KV head in the block_index-th block of a request. */
static inline const float *tile(const float *cache, int64_t head_base, const int64_t *table, int64_t block_index,
                                int64_t block_size, int64_t head_dim) {
    return cache + (head_base + table[block_index]) * block_size * head_dim;
}

/* scores[g * (end - start) + j - start] = q_g . k_j for the group query heads and positions j in
 * [start, end) of one KV head (head_base = kv_head * num_blocks); start is a multiple of block_size. */
static void range_scores(float *restrict scores, const float *restrict q, const float *k_cache, const int64_t *table,
                         int64_t head_base, int64_t start, int64_t end, int64_t group, int64_t block_size,
                         int64_t head_dim) {
    const int64_t len = end - start;
    for (int64_t pos = start; pos < end; pos += block_size) {
        const int64_t b = pos / block_size;
        const float *k = tile(k_cache, head_base, table, b, block_size, head_dim);
        const int64_t n = end - pos < block_size ? end - pos : block_size;
        if (pos + block_size < end)
            prefetch_tile(tile(k_cache, head_base, table, b + 1, block_size, head_dim), block_size * head_dim);
        for (int64_t g = 0; g < group; ++g)
            for (int64_t t = 0; t < n; t += 4)
                dot4(scores + g * len + pos - start + t, q + g * head_dim, k + t * head_dim, n - t < 4 ? n - t : 4,
                     head_dim);
    }
}

/* s[i] = exp((s[i] - max) * scale) over len scores in place; stores the raw max, returns the sum. */
static inline float exp_scores(float *s, int64_t len, float scale, float *max_out) {
    float max = s[0];
    for (int64_t i = 1; i < len; ++i) max = s[i] > max ? s[i] : max;
    float sum = 0.0f;
    for (int64_t i = 0; i < len; ++i) {
        s[i] = expf((s[i] - max) * scale);
        sum += s[i];
    }
    *max_out = max;
    return sum;
}

/* out[g * out_stride + d] += sum_j p_g[j] v_j[d] over positions j in [start, end) (range_scores' layout
 * for p) of one KV head. */
static void range_weighted_sum(float *restrict out, int64_t out_stride, const float *restrict probs,
                               const float *v_cache, const int64_t *table, int64_t head_base, int64_t start,
                               int64_t end, int64_t group, int64_t block_size, int64_t head_dim) {
    const int64_t len = end - start;
    for (int64_t pos = start; pos < end; pos += block_size) {
        const int64_t b = pos / block_size;
        const float *v = tile(v_cache, head_base, table, b, block_size, head_dim);
        const int64_t n = end - pos < block_size ? end - pos : block_size;
        if (pos + block_size < end)
            prefetch_tile(tile(v_cache, head_base, table, b + 1, block_size, head_dim), block_size * head_dim);
        for (int64_t g = 0; g < group; ++g)
            axpy_rows(out + g * out_stride, probs + g * len + pos - start, v, n, head_dim);
    }
}

static void attend_one(
    float *restrict out, const float *restrict q, const float *k_cache, const float *v_cache,
    const int64_t *table, int64_t seq_len, int64_t group, int64_t kv_head, int64_t num_blocks,
    int64_t block_size, int64_t head_dim, float scale, float *restrict scores /* [group, seq_len] */) {
    const int64_t head_base = kv_head * num_blocks;
    range_scores(scores, q, k_cache, table, head_base, 0, seq_len, group, block_size, head_dim);
    for (int64_t g = 0; g < group; ++g) {
        float *s = scores + g * seq_len, max;
        const float inv = 1.0f / exp_scores(s, seq_len, scale, &max);
        for (int64_t i = 0; i < seq_len; ++i) s[i] *= inv;
    }
    memset(out, 0, (size_t)(group * head_dim) * sizeof(float));
    range_weighted_sum(out, head_dim, scores, v_cache, table, head_base, 0, seq_len, group, block_size, head_dim);
}

/* One partial per query head g: part[g * (head_dim + 2) + ...] = [sum_j e_j v_j (head_dim floats) | max
 * raw score m | sum_j e_j] over positions j in [start, end), e_j = exp((q . k_j - m) * scale). start is a
 * multiple of block_size; start < end. */
static void attend_range(
    float *restrict part, const float *restrict q, const float *k_cache, const float *v_cache,
    const int64_t *table, int64_t start, int64_t end, int64_t group, int64_t kv_head, int64_t num_blocks,
    int64_t block_size, int64_t head_dim, float scale, float *restrict scores /* [group, end - start] */) {
    const int64_t head_base = kv_head * num_blocks, len = end - start, part_stride = head_dim + 2;
    range_scores(scores, q, k_cache, table, head_base, start, end, group, block_size, head_dim);
    for (int64_t g = 0; g < group; ++g) {
        float *p = part + g * part_stride;
        p[head_dim + 1] = exp_scores(scores + g * len, len, scale, &p[head_dim]);
        memset(p, 0, (size_t)head_dim * sizeof(float));
    }
    range_weighted_sum(part, part_stride, scores, v_cache, table, head_base, start, end, group, block_size, head_dim);
}

/* out[head_dim] = the softmax-weighted V sum over the num_parts partials of one query head, which lie
 * part_step floats apart (attend_range's layout); a partial with a zero sum is empty and skipped. */
static void combine_ranges(float *restrict out, const float *parts, int64_t num_parts, int64_t part_step,
                           int64_t head_dim, float scale) {
    float max = parts[head_dim];
    for (int64_t i = 1; i < num_parts; ++i) {
        const float *p = parts + i * part_step;
        if (p[head_dim + 1] > 0.0f && p[head_dim] > max) max = p[head_dim];
    }
    float total = 0.0f;
    memset(out, 0, (size_t)head_dim * sizeof(float));
    for (int64_t i = 0; i < num_parts; ++i) {
        const float *p = parts + i * part_step;
        if (p[head_dim + 1] <= 0.0f) continue;
        const float w = expf((p[head_dim] - max) * scale);
        total += w * p[head_dim + 1];
        for (int64_t d = 0; d < head_dim; ++d) out[d] += w * p[d];
    }
    const float inv = 1.0f / total;
    for (int64_t d = 0; d < head_dim; ++d) out[d] *= inv;
}

#endif

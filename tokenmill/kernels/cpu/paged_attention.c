/* Decode attention over the paged, head-major KV cache, read in place (no gather).
 *
 * Cache layout, for K and for V: [num_kv_heads, num_blocks, block_size, row], rows of float32, float16 or
 * int8 with a scale (kv_type, kv_cache.h), so one (KV head, block) is a contiguous [block_size, row] tile. Request r
 * attends with its single query row rows[r] ([num_heads, head_dim] at query + rows[r] * num_heads *
 * head_dim) over positions [0, seq_lens[r]), found through block_tables[r * table_stride + position /
 * block_size].
 *
 * One task = one (request, KV head): the `group` query heads sharing that KV head read its K/V once.
 * Per task: scores of all positions (K read once), an exact softmax in float32, then the V-weighted
 * sum (V read once). Tasks are independent and write disjoint output rows, so they run in parallel
 * on the OpenMP pool (libgomp: torch's own, already loaded, so no second thread pool competes).
 */
#include <stdlib.h>

#include "attention_tile.h"

/* Returns 0; 1 when a scratch allocation failed, 2 when head_dim is not a multiple of 8 (the output
 * is then incomplete). */
int tm_paged_decode_attention(
    float *out, const float *query, const void *k_cache, const void *v_cache, int kv_type, const int64_t *rows,
    const int64_t *seq_lens, const int64_t *block_tables, int64_t table_stride, int64_t num_reqs,
    int64_t num_heads, int64_t num_kv_heads, int64_t num_blocks, int64_t block_size, int64_t head_dim,
    float scale, int num_threads) {
    if (head_dim % LANES != 0) return 2;
    const int64_t group = num_heads / num_kv_heads;
    const int64_t row_stride = num_heads * head_dim;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) reduction(| : failed)
    for (int64_t task = 0; task < num_reqs * num_kv_heads; ++task) {
        const int64_t r = task / num_kv_heads, h = task % num_kv_heads;
        const int64_t seq_len = seq_lens[r];
        float *scores = malloc((size_t)(group * amx_score_row(seq_len, block_size)) * sizeof(float));
        if (scores == NULL) {
            failed |= 1;
            continue;
        }
        const int64_t offset = rows[r] * row_stride + h * group * head_dim;
        attend_one(out + offset, query + offset, k_cache, v_cache, kv_type, block_tables + r * table_stride, seq_len,
                   group, h, num_blocks, block_size, head_dim, scale, scores);
        free(scores);
    }
    return failed;
}

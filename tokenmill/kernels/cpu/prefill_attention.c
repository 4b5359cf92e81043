/* Causal attention of prompt rows (prefill and chunked-prefill steps) over the paged, head-major KV cache:
 * prefill_tile.h's tasks on the OpenMP pool.
 *
 * Request r's query rows q_starts[r] .. + q_lens[r] - 1 sit at positions seq_lens[r] - q_lens[r] + j and
 * see positions <= their own, all of them already in the cache (the step's K/V are written first).
 *
 * Invariants: float32 (the caches' rows: kv_type, kv_cache.h); query rows [T, num_heads, head_dim]
 * with row stride q_stride, heads contiguous; out [T, num_heads, head_dim] contiguous; head_dim % 8 == 0;
 * q_lens[r] <= seq_lens[r].
 */
#include <omp.h>
#include <stdlib.h>

#include "prefill_tile.h"

/* Returns 0; 1 when scratch memory could not be allocated; 2 when head_dim % 8 != 0 (out untouched). */
int tm_prefill_attention(float *out, const float *query, int64_t q_stride, const void *k_cache, const void *v_cache,
                         int kv_type, const int64_t *q_starts, const int64_t *q_lens, const int64_t *seq_lens,
                         const int64_t *block_tables, int64_t table_stride, int64_t num_reqs, int64_t num_heads,
                         int64_t num_kv_heads, int64_t num_blocks, int64_t block_size, int64_t head_dim, float scale,
                         int num_threads) {
    if (head_dim % LANES != 0) return 2;
    const int64_t group = num_heads / num_kv_heads;
    const int64_t n_tasks = prefill_num_tasks(q_lens, num_reqs, num_kv_heads);
    attention_task *tasks = (attention_task *)malloc((size_t)(n_tasks > 0 ? n_tasks : 1) * sizeof(attention_task));
    const int64_t per_thread = prefill_scratch_floats(group, head_dim);
    float *scratch = (float *)aligned_alloc(64, (size_t)((per_thread * num_threads + 15) / 16 * 16) * sizeof(float));
    if (tasks == NULL || scratch == NULL) {
        free(tasks);
        free(scratch);
        return 1;
    }
    prefill_tasks(tasks, q_lens, num_reqs, num_kv_heads);
#pragma omp parallel num_threads(num_threads)
    {
        float *mine = scratch + per_thread * omp_get_thread_num();
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n_tasks; ++i) {
            const attention_task *t = &tasks[i];
            const int64_t r = t->req;
            attend_block(out + q_starts[r] * num_heads * head_dim, query + q_starts[r] * q_stride, q_stride, k_cache,
                         v_cache, kv_type, block_tables + r * table_stride, seq_lens[r], q_lens[r], t, num_heads, group,
                         num_blocks, block_size, head_dim, scale, mine);
        }
    }
    free(tasks);
    free(scratch);
    return 0;
}

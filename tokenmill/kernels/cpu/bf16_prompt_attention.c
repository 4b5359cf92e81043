/* Causal attention of whole-context prompts (no cached prefix) on AMX-BF16 tiles (bf16_attention_amx.h), over
 * the step's own rotated bf16 q/k/v rows: the layer-by-layer path's alternative to torch's fused attention for
 * a bf16 model, chosen by the execution plan (worker/plan.py) where it measures faster.
 *
 * Work split: phase 1 packs each (prompt, KV head)'s K and V (one task each); phase 2 runs (prompt, KV head,
 * block of 16 query rows) tasks, all the KV head's query heads in each, the blocks that see the most keys first,
 * dynamically.
 * Invariants: q [T, num_heads * head_dim], k and v [T, num_kv_heads * head_dim] rows with the given row strides
 * (elements), bf16 or float32 (src_bf16; rounded to bf16 as read); out [T, num_heads * head_dim] rows of stride
 * out_stride, bf16 or float32 (out_bf16); prompt i owns rows starts[i] .. starts[i] + lens[i] - 1.
 */
#include <omp.h>
#include <stdlib.h>

#include "bf16_attention_amx.h"

/* 1 when tm_bf16_prompt_attention runs here for head_dim. */
int tm_bf16_prompt_attention_ready(int64_t head_dim) { return amx_attention_fits(head_dim, 1); }

/* Returns 0; 1 when memory could not be allocated; 2 when this CPU, head_dim or a prompt's length is not
 * supported (amx_attention_fits; out untouched). */
int tm_bf16_prompt_attention(void *out, int64_t out_stride, int out_bf16, const void *q, int64_t q_stride,
                             const void *k, int64_t k_stride, const void *v, int64_t v_stride, int src_bf16,
                             const int64_t *starts, const int64_t *lens, int64_t num_prompts, int64_t num_heads,
                             int64_t num_kv_heads, int64_t head_dim, float scale, int num_threads) {
#if TM_HAVE_AMX_ATTENTION
    int64_t max_t = 1, packed_total = 0, num_tasks = 0;
    for (int64_t i = 0; i < num_prompts; ++i) {
        if (!amx_attention_fits(head_dim, lens[i])) return 2;
        max_t = lens[i] > max_t ? lens[i] : max_t;
        packed_total += num_kv_heads * amx_packed_kv_elems(lens[i], head_dim);
        num_tasks += num_kv_heads * ((lens[i] + 15) / 16);
    }
    const int64_t scratch_bytes = amx_attention_scratch_bytes(max_t, head_dim);
    int64_t *offsets = malloc((size_t)num_prompts * sizeof(int64_t));
    int64_t *tasks = malloc((size_t)(num_tasks > 0 ? num_tasks : 1) * 3 * sizeof(int64_t));
    uint16_t *packed = aligned_alloc(64, (size_t)((packed_total * 2 + 63) / 64 * 64 + 64));
    char *scratch = aligned_alloc(64, (size_t)(scratch_bytes * num_threads));
    if (offsets == NULL || tasks == NULL || packed == NULL || scratch == NULL) {
        free(offsets), free(tasks), free(packed), free(scratch);
        return 1;
    }
    /* Tasks (prompt, KV head, first row), the last query blocks (most keys) first. */
    int64_t n = 0, max_blocks = 0;
    for (int64_t i = 0, off = 0; i < num_prompts; ++i) {
        offsets[i] = off;
        off += num_kv_heads * amx_packed_kv_elems(lens[i], head_dim);
        max_blocks = (lens[i] + 15) / 16 > max_blocks ? (lens[i] + 15) / 16 : max_blocks;
    }
    for (int64_t b = max_blocks - 1; b >= 0; --b)
        for (int64_t i = 0; i < num_prompts; ++i)
            if (b * 16 < lens[i])
                for (int64_t h = 0; h < num_kv_heads; ++h, ++n) {
                    tasks[3 * n] = i;
                    tasks[3 * n + 1] = h;
                    tasks[3 * n + 2] = b * 16;
                }
    const int64_t group = num_heads / num_kv_heads, esize = src_bf16 ? 2 : 4, out_esize = out_bf16 ? 2 : 4;
#pragma omp parallel num_threads(num_threads)
    {
        bf16_amx_load_config_rows(16);
        void *mine = scratch + scratch_bytes * omp_get_thread_num();
#pragma omp for schedule(dynamic, 1)
        for (int64_t j = 0; j < num_prompts * num_kv_heads; ++j) {
            const int64_t i = j / num_kv_heads, h = j % num_kv_heads, t = lens[i];
            amx_pack_kv(packed + offsets[i] + h * amx_packed_kv_elems(t, head_dim),
                        (const char *)k + (starts[i] * k_stride + h * head_dim) * esize, k_stride,
                        (const char *)v + (starts[i] * v_stride + h * head_dim) * esize, v_stride, src_bf16, t,
                        head_dim);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t j = 0; j < num_tasks; ++j) {
            const int64_t i = tasks[3 * j], h = tasks[3 * j + 1], row0 = tasks[3 * j + 2], t = lens[i];
            const int64_t rows = t - row0 < 16 ? t - row0 : 16;
            const int64_t first = h * group * head_dim; /* the KV head's first query head */
            amx_attend_group((char *)out + (starts[i] * out_stride + first) * out_esize, out_stride, out_bf16,
                             (const char *)q + (starts[i] * q_stride + first) * esize, q_stride, src_bf16,
                             packed + offsets[i] + h * amx_packed_kv_elems(t, head_dim), t, row0, rows, group,
                             head_dim, scale, mine);
        }
        _tile_release();
    }
    free(offsets), free(tasks), free(packed), free(scratch);
    return 0;
#else
    (void)out, (void)out_stride, (void)out_bf16, (void)q, (void)q_stride, (void)k, (void)k_stride, (void)v;
    (void)v_stride, (void)src_bf16;
    (void)starts, (void)lens, (void)num_prompts, (void)num_heads, (void)num_kv_heads, (void)head_dim, (void)scale;
    (void)num_threads;
    return 2;
#endif
}

/* Causal attention of whole-context prompts (no cached prefix) in bf16, on AMX-BF16 tiles or with AVX512-BF16's
 * vdpbf16ps (bf16_attention_amx.h), over the step's own rotated bf16 q/k/v rows: the layer-by-layer path's
 * alternative to torch's fused attention for a bf16 model, chosen by the execution plan (worker/plan.py) where it
 * measures faster.
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
    for (int64_t i = 0; i < num_prompts; ++i)
        if (!amx_attention_fits(head_dim, lens[i])) return 2;
    amx_prompt_plan plan = {0};
    const amx_out dst = {out, out_stride, out_bf16 ? AMX_OUT_BF16 : AMX_OUT_F32};
    if (amx_plan_prompts(&plan, lens, lens, num_prompts, num_kv_heads, head_dim, num_threads, 0) != 0) return 1;
#pragma omp parallel num_threads(num_threads)
    amx_attend_prompts(&plan, &dst, q, q_stride, k, k_stride, v, v_stride, src_bf16, starts, lens,
                       num_prompts, num_heads, num_kv_heads, head_dim, scale, NULL);
    amx_free_prompt_plan(&plan);
    return 0;
#else
    (void)out, (void)out_stride, (void)out_bf16, (void)q, (void)q_stride, (void)k, (void)k_stride, (void)v;
    (void)v_stride, (void)src_bf16;
    (void)starts, (void)lens, (void)num_prompts, (void)num_heads, (void)num_kv_heads, (void)head_dim, (void)scale;
    (void)num_threads;
    return 2;
#endif
}

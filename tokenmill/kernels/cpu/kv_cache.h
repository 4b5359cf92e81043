/* The paged KV cache as the CPU kernels read and write it.
 *
 * Layout, for K and for V: [num_kv_heads, num_blocks, block_size, head_dim], so one (KV head, block) is a
 * contiguous [block_size, head_dim] tile, found through a request's block table. Elements are float32, or
 * IEEE float16 when the kernel is called with kv_f16 != 0 (`--kv-cache-dtype float16`): half the bytes for
 * decode attention to stream, converted to float32 on load (F16C's vcvtph2ps, 8 at a time) and rounded
 * to nearest on store. Arithmetic is float32 either way.
 */
#ifndef TM_KV_CACHE_H
#define TM_KV_CACHE_H

#include <stdint.h>
#include <string.h>

#include "vec8.h"
#if defined(__F16C__)
#include <immintrin.h>
#endif

static inline int64_t kv_elem_bytes(int kv_f16) { return kv_f16 ? 2 : 4; }

/* The [block_size, head_dim] tile of one KV head (head_base = kv_head * num_blocks) in the block_index-th
 * block of a request. */
static inline const void *tile(const void *cache, int kv_f16, int64_t head_base, const int64_t *table,
                               int64_t block_index, int64_t block_size, int64_t head_dim) {
    return (const char *)cache + (head_base + table[block_index]) * block_size * head_dim * kv_elem_bytes(kv_f16);
}

/* Elements i .. i + 7 of a cache tile (or row) as float32; kv_f16 is a constant once inlined. */
static inline __attribute__((always_inline)) v8 load_kv8(const void *base, int64_t i, int kv_f16) {
    if (kv_f16) {
#if defined(__F16C__)
        return (v8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + i)));
#else
        v8 out;
        for (int j = 0; j < LANES; ++j) out[j] = (float)((const _Float16 *)base)[i + j];
        return out;
#endif
    }
    return *(const v8 *)((const float *)base + i);
}

/* n (% 8 == 0) float32 values of src into elements i .. i + n - 1 of the cache. */
static inline void store_kv_row(void *cache, int64_t i, const float *src, int64_t n, int kv_f16) {
    if (!kv_f16) {
        memcpy((float *)cache + i, src, (size_t)n * sizeof(float));
        return;
    }
    uint16_t *dst = (uint16_t *)cache + i;
#if defined(__F16C__)
    for (int64_t j = 0; j < n; j += LANES)
        _mm_storeu_si128((__m128i *)(dst + j), _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
#else
    for (int64_t j = 0; j < n; ++j) ((_Float16 *)dst)[j] = (_Float16)src[j];
#endif
}

/* Elements i .. i + n - 1 (n % 8 == 0) of the cache as float32 in out. */
static inline void load_kv_row(float *out, const void *cache, int64_t i, int64_t n, int kv_f16) {
    if (!kv_f16) {
        memcpy(out, (const float *)cache + i, (size_t)n * sizeof(float));
        return;
    }
    for (int64_t j = 0; j < n; j += LANES) *(v8 *)(out + j) = load_kv8(cache, i + j, 1);
}

#endif

/* The paged KV cache as the CPU kernels read and write it.
 *
 * Layout, for K and for V: [num_kv_heads, num_blocks, block_size, row], so one (KV head, block) is a
 * contiguous [block_size, row] tile, found through a request's block table. The row of one position and
 * head depends on kv_type (kernels/cpu/kv_cache.py's codes, `--kv-cache-dtype`):
 *   KV_F32: head_dim float32;
 *   KV_F16: head_dim IEEE float16 (F16C's vcvtph2ps on load, round to nearest on store);
 *   KV_I8:  head_dim int8 q then one float32 scale s (unaligned), x ~= s * q with q in [-127, 127] and
 *           s = max |x| * (1 / 127) per position and head (symmetric, q = x * (1 / s) rounded to nearest
 *           even).
 *   KV_BF16: bfloat16 (rounded to nearest even), and not by rows: a tile's values are interleaved in pairs, the
 *           operand order of AVX512-BF16's vdpbf16ps and of AMX-BF16's B tiles, so the products read the cache as
 *           it lies (attention_tile.h's bf16_* functions):
 *             K tile [head_dim / 2][block_size][2]: position j's dims d, d + 1 share a 32-bit pair, and each
 *               pair of dims runs down all positions (a 16-position column is one vdpbf16ps operand of q . k);
 *             V tile [block_size / 2][head_dim][2]: positions j, j + 1 share a pair, each pair of positions
 *               runs across all dims (16 dims of it: one operand of the probability-weighted sum).
 *           block_size and head_dim are even (kv_cache.py checks). bf16_index gives an element's place.
 * Loads (load_kv8) return float32 values *without* the int8 scale: the readers apply kv_row_scale once per
 * row (to a dot product, or to a softmax weight). Arithmetic is float32 throughout. kv_type is a constant
 * once inlined. head_dim % 8 == 0 for KV_F16, KV_I8 and KV_BF16. load_kv8, load_kv16 and load_kv_row read rows,
 * so not KV_BF16's tiles: its readers unpack a tile first (unpack_bf16_tile) or use the bf16 products.
 */
#ifndef TM_KV_CACHE_H
#define TM_KV_CACHE_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "vec8.h"
#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512BW__)
#include <immintrin.h>
#endif

enum { KV_F32 = 0, KV_F16 = 1, KV_I8 = 2, KV_BF16 = 3 };

/* Bytes of one element, and elements (int8: bytes) of one row, scale included. */
static inline int64_t kv_elem_bytes(int kv_type) { return kv_type == KV_F32 ? 4 : kv_type == KV_I8 ? 1 : 2; }
static inline int64_t kv_row_elems(int kv_type, int64_t head_dim) {
    return kv_type == KV_I8 ? head_dim + (int64_t)sizeof(float) : head_dim;
}
static inline int64_t kv_row_bytes(int kv_type, int64_t head_dim) {
    return kv_row_elems(kv_type, head_dim) * kv_elem_bytes(kv_type);
}

/* The [block_size, row] tile of one KV head (head_base = kv_head * num_blocks) in the block_index-th
 * block of a request. */
static inline const void *tile(const void *cache, int kv_type, int64_t head_base, const int64_t *table,
                               int64_t block_index, int64_t block_size, int64_t head_dim) {
    return (const char *)cache + (head_base + table[block_index]) * block_size * kv_row_bytes(kv_type, head_dim);
}

/* Elements i .. i + 7 of a cache tile (or row) as float32, unscaled. */
static inline __attribute__((always_inline)) v8 load_kv8(const void *base, int64_t i, int kv_type) {
    if (kv_type == KV_F16) {
#if defined(__F16C__)
        return (v8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + i)));
#else
        v8 out;
        for (int j = 0; j < LANES; ++j) out[j] = (float)((const _Float16 *)base)[i + j];
        return out;
#endif
    }
    if (kv_type == KV_I8) {
#if defined(__AVX2__)
        const __m128i q = _mm_loadl_epi64((const __m128i *)((const int8_t *)base + i));
        return (v8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
#else
        v8 out;
        for (int j = 0; j < LANES; ++j) out[j] = (float)((const int8_t *)base)[i + j];
        return out;
#endif
    }
    return *(const v8 *)((const float *)base + i);
}

#if defined(__AVX512F__)
/* 16 floats (zmm), for the AVX-512 tiles of attention_tile.h; aligned(4) as v8. */
typedef float v16 __attribute__((vector_size(64), aligned(4)));
#define LANES16 16

/* Elements i .. i + 15 of a cache tile (or row) as float32, unscaled (load_kv8's, 16 at once). */
static inline __attribute__((always_inline)) v16 load_kv16(const void *base, int64_t i, int kv_type) {
    if (kv_type == KV_F16)
        return (v16)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i)));
    if (kv_type == KV_I8) {
        const __m128i q = _mm_loadu_si128((const __m128i *)((const int8_t *)base + i));
        return (v16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
    }
    return *(const v16 *)((const float *)base + i);
}

/* lo + hi halves of a v16, as a v8. */
static inline __attribute__((always_inline)) v8 fold16(v16 a) {
    return (v8)_mm256_add_ps(_mm512_castps512_ps256((__m512)a), (__m256)_mm512_extractf64x4_pd((__m512d)a, 1));
}
#endif

/* The factor of the row whose first element is element `row` of base: the int8 scale, else 1. */
static inline __attribute__((always_inline)) float kv_row_scale(const void *base, int64_t row, int64_t head_dim,
                                                               int kv_type) {
    if (kv_type != KV_I8) return 1.0f;
    float s;
    memcpy(&s, (const int8_t *)base + row + head_dim, sizeof(s));
    return s;
}

/* The place of position j's element d in a KV_BF16 tile of K (is_value 0) or V (1), in elements. */
static inline int64_t bf16_index(int is_value, int64_t j, int64_t d, int64_t block_size, int64_t head_dim) {
    return is_value ? ((j >> 1) * head_dim + d) * 2 + (j & 1) : ((d >> 1) * block_size + j) * 2 + (d & 1);
}

/* out[d] = position j's element d of a KV_BF16 tile t, as float32. */
static inline void unpack_bf16_row(float *restrict out, const void *t, int64_t j, int is_value, int64_t block_size,
                                   int64_t head_dim) {
    for (int64_t d = 0; d < head_dim; ++d)
        out[d] = bf16_to_f32(((const uint16_t *)t)[bf16_index(is_value, j, d, block_size, head_dim)]);
}

/* out[j * head_dim + d] = position j's element d, as float32, for the first n positions of a KV_BF16 tile. */
static inline void unpack_bf16_tile(float *restrict out, const void *t, int64_t n, int is_value, int64_t block_size,
                                    int64_t head_dim) {
    for (int64_t j = 0; j < n; ++j) unpack_bf16_row(out + j * head_dim, t, j, is_value, block_size, head_dim);
}

/* The head_dim float32 values of src into row `row` (counted from cache: the slot (KV head, block) * block_size +
 * position) of the K (is_value 0) or V (1) cache. */
static inline void store_kv_row(void *cache, int64_t row, const float *src, int64_t head_dim, int kv_type,
                                int64_t block_size, int is_value) {
    char *dst = (char *)cache + row * kv_row_bytes(kv_type, head_dim);
    if (kv_type == KV_BF16) {
        uint16_t *t = (uint16_t *)cache + row / block_size * block_size * head_dim, h[head_dim];
        const int64_t j = row % block_size;
        f32_row_to_bf16(h, src, head_dim);
#if defined(__AVX512BW__)
        if (head_dim % 32 == 0) { /* 16 dims (V) or 16 dim pairs (K) a store */
            if (is_value) { /* the low (j even) or high (odd) halves of the pair row's 32-bit lanes */
                uint16_t *pair_row = t + (j >> 1) * head_dim * 2;
                const __mmask32 keep = (j & 1) ? (__mmask32)0xaaaaaaaau : (__mmask32)0x55555555u;
                for (int64_t d = 0; d < head_dim; d += 16) {
                    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(h + d)));
                    _mm512_mask_storeu_epi16(pair_row + d * 2, keep, (j & 1) ? _mm512_slli_epi32(w, 16) : w);
                }
            } else { /* each 32-bit lane a dim pair, scattered block_size pairs apart */
                const __m512i apart = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3,
                                                                          2, 1, 0),
                                                         _mm512_set1_epi32((int)block_size));
                for (int64_t d = 0; d < head_dim; d += 32)
                    _mm512_i32scatter_epi32((uint32_t *)t + j + d / 2 * block_size, apart,
                                            _mm512_loadu_si512((const void *)(h + d)), 4);
            }
            return;
        }
#endif
        if (is_value) { /* every other element of the pair row (j, j + 1) */
            uint16_t *dst = t + (j >> 1) * head_dim * 2 + (j & 1);
            for (int64_t d = 0; d < head_dim; ++d) dst[2 * d] = h[d];
        } else { /* dim pairs, block_size pairs apart */
            uint32_t *dst = (uint32_t *)t + j;
            for (int64_t i = 0; i < head_dim / 2; ++i) memcpy(dst + i * block_size, h + 2 * i, sizeof(uint32_t));
        }
    } else if (kv_type == KV_F32) {
        memcpy(dst, src, (size_t)head_dim * sizeof(float));
    } else if (kv_type == KV_F16) {
#if defined(__F16C__)
        for (int64_t j = 0; j < head_dim; j += LANES)
            _mm_storeu_si128((__m128i *)((uint16_t *)dst + j),
                             _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
#else
        for (int64_t j = 0; j < head_dim; ++j) ((_Float16 *)dst)[j] = (_Float16)src[j];
#endif
    } else {
        float amax = 0.0f;
        for (int64_t j = 0; j < head_dim; ++j) amax = fabsf(src[j]) > amax ? fabsf(src[j]) : amax;
        /* Multiplications and a reciprocal only, so -ffast-math cannot change the rounding: kv_cache.py's
         * quantize_kv_rows computes the same float32 operations. */
        const float scale = amax * (1.0f / 127.0f), inv = amax > 0.0f ? 1.0f / scale : 0.0f;
        int8_t *q = (int8_t *)dst;
#if defined(__AVX2__)
        for (int64_t j = 0; j < head_dim; j += LANES) { /* round to nearest even; |x * inv| <= 127 */
            const __m256i i32 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(src + j), _mm256_set1_ps(inv)));
            const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
            _mm_storel_epi64((__m128i *)(q + j), _mm_packs_epi16(i16, i16));
        }
#else
        for (int64_t j = 0; j < head_dim; ++j) q[j] = (int8_t)nearbyintf(src[j] * inv);
#endif
        memcpy(q + head_dim, &scale, sizeof(scale));
    }
}

/* The row whose first element is element `row` of base, as head_dim float32 values (int8: scaled). */
static inline void load_kv_row(float *out, const void *base, int64_t row, int64_t head_dim, int kv_type) {
    if (kv_type == KV_F32) {
        memcpy(out, (const float *)base + row, (size_t)head_dim * sizeof(float));
        return;
    }
    const float s = kv_row_scale(base, row, head_dim, kv_type);
    for (int64_t j = 0; j < head_dim; j += LANES) {
        const v8 x = kv_type == KV_I8 ? load_kv8(base, row + j, KV_I8) * s : load_kv8(base, row + j, KV_F16);
        memcpy(out + j, &x, sizeof(x));
    }
}

#endif

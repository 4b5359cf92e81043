/* Decode attention over a KV_BF16 cache on AMX-BF16 tiles: attention_tile.h's range_scores / range_weighted_sum for
 * one KV head's `group` query heads, where the CPU has AMX (amx_decode_fits). The cache's pair-interleaved tiles
 * (kv_cache.h) are B tiles as they lie:
 *   K tile: row p = dim pair p (2p, 2p + 1) over the block's positions, block_size * 4 bytes; 16 such rows from
 *           column c * 16 are the B operand of q . k for 32 dims and 16 positions.
 *   V tile: row p = position pair p (2p, 2p + 1) over all dims, head_dim * 4 bytes; block_size / 2 rows from dim d are
 *           the B operand of p . v for 16 dims and the block's positions.
 * The A operands are the group's queries (rounded to bf16 once per range) and its probabilities (rounded to bf16 in
 * place: attention_tile.h's probs_to_bf16_in_place, defined before this header is included). Products and sums are
 * float32; the same roundings as the vdpbf16ps path, so the two agree to float order.
 *
 * Tiles (amx_decode_load_config, loaded by attention_tile.h's range_scores on its thread before amx_range_scores and
 * kept for the range's amx_range_weighted_sum): C 0-3, group rows x 16 float32 (a block's scores of 16 positions, or
 * 16 output dims); A 4, group rows x 32 query dims; A 5, group rows x block_size probabilities; B 6, 16 dim pairs
 * x 16 positions of K; B 7, block_size / 2 position pairs x 16 dims of V.
 * Scores and probabilities: rows sstride (amx_score_row) floats apart, written up to the range's last whole block.
 */
#ifndef TM_BF16_DECODE_AMX_H
#define TM_BF16_DECODE_AMX_H

#include <stdint.h>
#include <string.h>

#include "bf16_panels.h"
#include "kv_cache.h"

/* Floats between score rows of a range of len positions on the tiles: whole blocks, since a block's C tiles and
 * probability A tile span it. */
static inline int64_t amx_score_row(int64_t len, int64_t block_size) {
    return (len + block_size - 1) / block_size * block_size;
}

/* 0 builds the vdpbf16ps decode path on AMX CPUs too (A/B builds: benchmarks/kernel_build_ab.py
 * --variant-cflags=-DTM_AMX_DECODE=0). */
#ifndef TM_AMX_DECODE
#define TM_AMX_DECODE 1
#endif

#if TM_HAVE_AMX && defined(__AVX512BF16__) && TM_AMX_DECODE
#define TM_HAVE_AMX_DECODE 1

/* Whether the tiles take this shape: at most 16 query heads per KV head (A rows), blocks of 16 or 32 positions
 * (a probability A tile of at most 64 bytes), 64-dim output chunks; and the process may use AMX. */
static inline int amx_decode_fits(int64_t group, int64_t block_size, int64_t head_dim) {
    return group <= 16 && (block_size == 16 || block_size == 32) && head_dim % 64 == 0 && bf16_amx_ready();
}

static inline void amx_decode_load_config(int64_t group, int64_t block_size) {
    bf16_tile_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.rows[t] = (uint8_t)(t == 6 ? 16 : t == 7 ? block_size / 2 : group);
        cfg.colsb[t] = (uint16_t)(t == 5 ? block_size * 2 : 64);
    }
    __asm__ __volatile__("" : : "r"(&cfg) : "memory"); /* keeps the stores (bf16_amx_load_config_rows) */
    _tile_loadconfig(&cfg);
}

/* scores[g * sstride + j - start] = q_g . k_j for the group's heads and positions j of [start, end) (block-aligned
 * start), and past end up to the last block's end (values of whatever the cache holds there). */
static void amx_range_scores(float *restrict scores, int64_t sstride, const float *restrict q, const void *k_cache,
                             const void *v_cache, const int64_t *table, int64_t head_base, int64_t start, int64_t end,
                             int64_t group, int64_t block_size, int64_t head_dim) {
    const int64_t tile_bytes = block_size * head_dim * 2, pair_row = block_size * 4;
    uint16_t qb[group * head_dim];
    for (int64_t i = 0; i < group * head_dim; i += 16)
        _mm256_storeu_si256((__m256i *)(qb + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(q + i)));
    for (int64_t b = start / block_size; b < start / block_size + KV_PREFETCH_BLOCKS && b * block_size < end; ++b)
        prefetch_tile(tile(k_cache, KV_BF16, head_base, table, b, block_size, head_dim), tile_bytes);
    for (int64_t pos = start; pos < end; pos += block_size) {
        const int64_t b = pos / block_size;
        const uint16_t *t = (const uint16_t *)tile(k_cache, KV_BF16, head_base, table, b, block_size, head_dim);
        const void *ahead = prefetch_target(k_cache, v_cache, KV_BF16, table, head_base, start, end, b, 0, block_size,
                                            head_dim, KV_PREFETCH_BLOCKS);
        for (int64_t c = 0; c * 16 < block_size; ++c) {
            if (ahead != NULL) prefetch_tile((const char *)ahead + c * tile_bytes * 16 / block_size,
                                             tile_bytes * 16 / block_size);
            _tile_zero(0);
            for (int64_t d = 0; d < head_dim; d += 32) {
                _tile_loadd(4, qb + d, head_dim * 2);
                _tile_loadd(6, t + (d / 2 * block_size + c * 16) * 2, pair_row);
                _tile_dpbf16ps(0, 4, 6);
            }
            _tile_stored(0, scores + pos - start + c * 16, sstride * 4);
        }
    }
}

/* out[g * out_stride + d] += sum_j p_g[j] v_j[d] over positions j of [start, end) (amx_range_scores' layout for p,
 * whose rows it rounds to bf16 in place, zero from end to the last block's end). The last block's positions past end
 * come from a copy with zeros there: the cache past a request's end may hold anything. */
static void amx_range_weighted_sum(float *restrict out, int64_t out_stride, float *restrict probs, int64_t sstride,
                                   const void *v_cache, const int64_t *table, int64_t head_base, int64_t start,
                                   int64_t end, int64_t group, int64_t block_size, int64_t head_dim) {
    const int64_t len = end - start, padded = amx_score_row(len, block_size), tile_bytes = block_size * head_dim * 2;
    probs_to_bf16_in_place(probs, sstride, group, len, padded);
    const int64_t last = (end - 1) / block_size, tail = end - last * block_size;
    uint16_t masked[tail < block_size ? block_size * head_dim : 1];
    if (tail < block_size) { /* whole pair rows up to end, the odd last position's partner lanes zeroed */
        const uint16_t *t = (const uint16_t *)tile(v_cache, KV_BF16, head_base, table, last, block_size, head_dim);
        memset(masked, 0, sizeof(masked));
        memcpy(masked, t, (size_t)((tail + 1) / 2 * head_dim * 2) * sizeof(uint16_t));
        if (tail & 1)
            for (int64_t d = 0; d < head_dim; ++d) masked[(tail / 2 * head_dim + d) * 2 + 1] = 0;
    }
    for (int64_t d0 = 0; d0 < head_dim; d0 += 64) {
        _tile_loadd(0, out + d0 + 0, out_stride * 4);
        _tile_loadd(1, out + d0 + 16, out_stride * 4);
        _tile_loadd(2, out + d0 + 32, out_stride * 4);
        _tile_loadd(3, out + d0 + 48, out_stride * 4);
        for (int64_t pos = start; pos < end; pos += block_size) {
            const int64_t b = pos / block_size;
            const uint16_t *t = b == last && tail < block_size
                                    ? masked
                                    : (const uint16_t *)tile(v_cache, KV_BF16, head_base, table, b, block_size,
                                                             head_dim);
            if (d0 == 0) {
                const void *ahead = prefetch_target(NULL, v_cache, KV_BF16, table, head_base, start, end, b, 1,
                                                    block_size, head_dim, KV_PREFETCH_BLOCKS);
                if (ahead != NULL) prefetch_tile(ahead, tile_bytes);
            }
            _tile_loadd(5, (const uint16_t *)probs + pos - start, sstride * 4);
            _tile_loadd(7, t + (d0 + 0) * 2, head_dim * 4);
            _tile_dpbf16ps(0, 5, 7);
            _tile_loadd(7, t + (d0 + 16) * 2, head_dim * 4);
            _tile_dpbf16ps(1, 5, 7);
            _tile_loadd(7, t + (d0 + 32) * 2, head_dim * 4);
            _tile_dpbf16ps(2, 5, 7);
            _tile_loadd(7, t + (d0 + 48) * 2, head_dim * 4);
            _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, out + d0 + 0, out_stride * 4);
        _tile_stored(1, out + d0 + 16, out_stride * 4);
        _tile_stored(2, out + d0 + 32, out_stride * 4);
        _tile_stored(3, out + d0 + 48, out_stride * 4);
    }
}
#else
#define TM_HAVE_AMX_DECODE 0
static inline int amx_decode_fits(int64_t group, int64_t block_size, int64_t head_dim) {
    (void)group, (void)block_size, (void)head_dim;
    return 0;
}
#endif

#endif

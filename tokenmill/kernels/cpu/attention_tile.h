/* Decode attention of one query row's heads over one KV head's paged cache, shared by
 * paged_attention.c and step_forward.c.
 *
 * Cache layout and element types (kv_type: float32, float16 or int8 rows with a scale): kv_cache.h.
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

#include "exp2_16.h"
#include "kv_cache.h"
#include "vec8.h"
#if defined(__AVX__)
#include <immintrin.h>
#endif

/* Software prefetch spread over a tile's compute: `steps` calls of prefetch_advance each ask for the next
 * share of [next, end), so the memory requests go out while the tile computes instead of in one burst that
 * stalls (the fill buffers are full) before any compute starts. */
typedef struct {
    const char *next, *end;
    int64_t per_step; /* bytes per call */
} prefetch_cursor;

static inline prefetch_cursor prefetch_spread(const void *p, int64_t bytes, int64_t steps) {
    prefetch_cursor c = {(const char *)p, (const char *)p + (p != NULL ? bytes : 0), 0};
    c.per_step = steps > 0 ? (bytes / steps + 63) / 64 * 64 : bytes;
    return c;
}

static inline __attribute__((always_inline)) void prefetch_advance(prefetch_cursor *c) {
    const char *stop = c->next + c->per_step < c->end ? c->next + c->per_step : c->end;
    for (; c->next < stop; c->next += 64) __builtin_prefetch(c->next, 0, 2);
}

/* Query heads per register tile: QK keeps HEADS_PER_TILE x 4 position accumulators and the 4 K vectors of
 * one 8-float column (16 registers); PV keeps HEADS_PER_TILE x 4 output vectors of a 32-float column. With
 * AVX-512, 16-float columns (QK) and 64-float ones (PV) of the same shape in zmm registers: half the loads,
 * conversions and FMAs (one layer's decode attention over a float16 cache, 64 x 320 positions: 0.70 -> 0.66 ms in
 * L3, 1.36 -> 1.29 from memory). */
#define HEADS_PER_TILE 3

/* Horizontal sums of four vectors: {hsum(a0), hsum(a1), hsum(a2), hsum(a3)}. */
static inline __attribute__((always_inline)) void hsum4(float *out, v8 a0, v8 a1, v8 a2, v8 a3) {
#if defined(__AVX__)
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps((__m256)a0, (__m256)a1), _mm256_hadd_ps((__m256)a2, (__m256)a3));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
#else
    out[0] = hsum(a0), out[1] = hsum(a1), out[2] = hsum(a2), out[3] = hsum(a3);
#endif
}

/* scores[g * stride + j] = q_g . k_j for heads g < heads (a constant once inlined, <= HEADS_PER_TILE) and
 * the n (<= block) rows of one K tile: 4 rows at a time, each K vector loaded once for all heads. Rows
 * past n are computed from row t's data but never stored. kv_type: a constant once inlined. pf:
 * prefetch_advance once per 4 rows. */
static inline __attribute__((always_inline)) void qk_tile(float *restrict scores, int64_t stride,
                                                         const float *restrict q, const void *k, int64_t n,
                                                         int heads, int64_t head_dim, int kv_type,
                                                         prefetch_cursor *pf) {
    const int64_t rs = kv_row_elems(kv_type, head_dim);
    for (int64_t t = 0; t < n; t += 4) {
        prefetch_advance(pf);
        const int64_t r0 = t * rs, r1 = t + 1 < n ? r0 + rs : r0;
        const int64_t r2 = t + 2 < n ? r0 + 2 * rs : r0, r3 = t + 3 < n ? r0 + 3 * rs : r0;
        v8 acc[HEADS_PER_TILE][4];
        for (int g = 0; g < heads; ++g) acc[g][0] = acc[g][1] = acc[g][2] = acc[g][3] = (v8){0};
        int64_t d = 0;
#if defined(__AVX512F__)
        { /* 16 floats at a time, folded to 8 for the sums */
            v16 wide[HEADS_PER_TILE][4];
            for (int g = 0; g < heads; ++g) wide[g][0] = wide[g][1] = wide[g][2] = wide[g][3] = (v16){0};
            for (; d + LANES16 <= head_dim; d += LANES16) {
                const v16 x0 = load_kv16(k, r0 + d, kv_type), x1 = load_kv16(k, r1 + d, kv_type);
                const v16 x2 = load_kv16(k, r2 + d, kv_type), x3 = load_kv16(k, r3 + d, kv_type);
                for (int g = 0; g < heads; ++g) {
                    const v16 qv = *(const v16 *)(q + g * head_dim + d);
                    wide[g][0] += qv * x0, wide[g][1] += qv * x1, wide[g][2] += qv * x2, wide[g][3] += qv * x3;
                }
            }
            for (int g = 0; g < heads; ++g)
                for (int j = 0; j < 4; ++j) acc[g][j] = fold16(wide[g][j]);
        }
#endif
        for (; d < head_dim; d += LANES) {
            const v8 x0 = load_kv8(k, r0 + d, kv_type), x1 = load_kv8(k, r1 + d, kv_type);
            const v8 x2 = load_kv8(k, r2 + d, kv_type), x3 = load_kv8(k, r3 + d, kv_type);
            for (int g = 0; g < heads; ++g) {
                const v8 qv = *(const v8 *)(q + g * head_dim + d);
                acc[g][0] += qv * x0, acc[g][1] += qv * x1, acc[g][2] += qv * x2, acc[g][3] += qv * x3;
            }
        }
        const float f[4] = {kv_row_scale(k, r0, head_dim, kv_type), kv_row_scale(k, r1, head_dim, kv_type),
                            kv_row_scale(k, r2, head_dim, kv_type), kv_row_scale(k, r3, head_dim, kv_type)};
        for (int g = 0; g < heads; ++g) {
            float s[4];
            hsum4(s, acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
            for (int64_t j = 0; j < 4 && t + j < n; ++j) scores[g * stride + t + j] = s[j] * f[j];
        }
    }
}

/* out[g * out_stride + d] += sum_j p[g * p_stride + j] v_j[d] for heads g < heads (<= HEADS_PER_TILE, a
 * constant once inlined) over the n rows of one V tile: 64-float (AVX-512) or 32-float columns in registers, each
 * V vector loaded once for all heads; a head_dim % 32 remainder 8 floats at a time. pf: prefetch_advance once per 4
 * rows of each column. */
static inline __attribute__((always_inline)) void pv_tile(float *restrict out, int64_t out_stride,
                                                         const float *restrict p, int64_t p_stride, const void *v,
                                                         int64_t n, int heads, int64_t head_dim, int kv_type,
                                                         prefetch_cursor *pf) {
    const int64_t rs = kv_row_elems(kv_type, head_dim);
    int64_t d = 0;
#if defined(__AVX512F__)
    for (; d + 4 * LANES16 <= head_dim; d += 4 * LANES16) { /* 64-float columns in 12 zmm accumulators */
        v16 acc[HEADS_PER_TILE][4];
        for (int g = 0; g < heads; ++g)
            for (int c = 0; c < 4; ++c) acc[g][c] = *(const v16 *)(out + g * out_stride + d + c * LANES16);
        for (int64_t j = 0; j < n; ++j) {
            if (j % 4 == 0) prefetch_advance(pf);
            const int64_t row = j * rs + d;
            const float f = kv_row_scale(v, j * rs, head_dim, kv_type);
            v16 w[HEADS_PER_TILE];
            for (int g = 0; g < heads; ++g) w[g] = (v16){0} + p[g * p_stride + j] * f;
            for (int c = 0; c < 4; ++c) {
                const v16 x = load_kv16(v, row + c * LANES16, kv_type);
                for (int g = 0; g < heads; ++g) acc[g][c] += w[g] * x;
            }
        }
        for (int g = 0; g < heads; ++g)
            for (int c = 0; c < 4; ++c) *(v16 *)(out + g * out_stride + d + c * LANES16) = acc[g][c];
    }
#endif
    for (; d + 4 * LANES <= head_dim; d += 4 * LANES) {
        v8 acc[HEADS_PER_TILE][4];
        for (int g = 0; g < heads; ++g)
            for (int c = 0; c < 4; ++c) acc[g][c] = *(const v8 *)(out + g * out_stride + d + c * LANES);
        for (int64_t j = 0; j < n; ++j) {
            if (j % 4 == 0) prefetch_advance(pf);
            /* The heads' weights first, then one V vector at a time: 12 accumulators, 3 weights and one V
             * vector fill the 16 registers (all four V vectors at once spill an accumulator). */
            const int64_t row = j * rs + d;
            const float f = kv_row_scale(v, j * rs, head_dim, kv_type);
            v8 w[HEADS_PER_TILE];
            for (int g = 0; g < heads; ++g) w[g] = (v8){0} + p[g * p_stride + j] * f;
            for (int c = 0; c < 4; ++c) {
                const v8 x = load_kv8(v, row + c * LANES, kv_type);
                for (int g = 0; g < heads; ++g) acc[g][c] += w[g] * x;
            }
        }
        for (int g = 0; g < heads; ++g)
            for (int c = 0; c < 4; ++c) *(v8 *)(out + g * out_stride + d + c * LANES) = acc[g][c];
    }
    for (; d < head_dim; d += LANES)
        for (int g = 0; g < heads; ++g) {
            v8 acc = *(const v8 *)(out + g * out_stride + d);
            for (int64_t j = 0; j < n; ++j)
                acc += p[g * p_stride + j] * kv_row_scale(v, j * rs, head_dim, kv_type) *
                       load_kv8(v, j * rs + d, kv_type);
            *(v8 *)(out + g * out_stride + d) = acc;
        }
}

/* The group's query heads in tiles of HEADS_PER_TILE, each tile's head count a compile-time constant. */
#define FOR_HEAD_TILES(group, g0, heads, CALL)                                  \
    for (int64_t g0 = 0; g0 < (group); g0 += HEADS_PER_TILE) {                  \
        switch ((group) - g0 < HEADS_PER_TILE ? (int)((group) - g0) : HEADS_PER_TILE) { \
            case 1: { const int heads = 1; CALL; break; }                       \
            case 2: { const int heads = 2; CALL; break; }                       \
            default: { const int heads = HEADS_PER_TILE; CALL; break; }         \
        }                                                                       \
    }

/* Asks for the nbytes at p ahead of use (one request per 64-byte line): blocks sit at random
 * places in the cache, so the hardware prefetcher restarts at every block and stalls on memory. */
static inline void prefetch_tile(const void *p, int64_t nbytes) {
    for (int64_t i = 0; i < nbytes; i += 64) __builtin_prefetch((const char *)p + i, 0, 2);
}

/* Blocks ahead a range's reader prefetches. Measured on the AMX Xeon (decode attention of 64 requests x 320
 * positions, 30 layers' caches, float16): the next block's tiles in one burst at each block's start, 1.51 ms per
 * layer; spread over the block's compute (prefetch_cursor) 1, 2, 4 and 8 blocks ahead, 1.41, 1.36, 1.38, 1.37. On
 * the Zen 4 (the same over shuffled blocks, interleaved medians), 2 -> 4 blocks ahead: bfloat16 0.657 -> 0.624 and
 * 0.660 -> 0.628 ms with 2 threads, 1.135 -> 1.043 with one; int8 0.612 -> 0.585 (8 and 16: no better). */
#define KV_PREFETCH_BLOCKS 4

/* The tile a range's reader asks for while it computes on block b of [start, end): the K tile `distance` blocks
 * ahead (KV_PREFETCH_BLOCKS, or a pass's width), past the range's last K block the first V tiles (the weighted sum
 * reads them next); for the weighted sum (v_phase), the V tile that far ahead; NULL past the end. */
static inline const void *prefetch_target(const void *k_cache, const void *v_cache, int kv_type, const int64_t *table,
                                          int64_t head_base, int64_t start, int64_t end, int64_t b, int v_phase,
                                          int64_t block_size, int64_t head_dim, int64_t distance) {
    const int64_t first = start / block_size, last = (end - 1) / block_size, ahead = b + distance;
    if (ahead <= last) return tile(v_phase ? v_cache : k_cache, kv_type, head_base, table, ahead, block_size, head_dim);
    if (v_phase || ahead - last - 1 + first > last) return NULL;
    return tile(v_cache, kv_type, head_base, table, ahead - last - 1 + first, block_size, head_dim);
}

/* prefetch_advance calls one block of n positions makes over the group's head tiles: qk_tile one per 4
 * positions; pv_tile (pv) one per 4 positions and register column (64 floats with AVX-512 where head_dim allows,
 * else 32). */
static inline int64_t tile_steps(int64_t n, int64_t group, int64_t head_dim, int pv) {
    int64_t columns = 1;
    if (pv) {
#if defined(__AVX512F__)
        const int64_t column = head_dim % 64 == 0 ? 64 : 32;
#else
        const int64_t column = 32;
#endif
        columns = head_dim >= column ? head_dim / column : 1;
    }
    return (n + 3) / 4 * ((group + HEADS_PER_TILE - 1) / HEADS_PER_TILE) * columns;
}

#if defined(__AVX512BF16__)
/* Rows g < group of probs (stride floats apart) rounded to bf16 in place: row g's first len values as bf16 from the
 * row's first byte, then zeros up to zero_to bf16 values (zero_to <= 2 * stride). */
static inline void probs_to_bf16_in_place(float *probs, int64_t stride, int64_t group, int64_t len, int64_t zero_to) {
    for (int64_t g = 0; g < group; ++g) {
        float *row = probs + g * stride;
        uint16_t *bf = (uint16_t *)row; /* writes [2i, 2i + 32) bytes after reading [4i, 4i + 64): in place */
        for (int64_t i = 0; i < len; i += 16) {
            const __mmask16 m = len - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (len - i)) - 1u);
            _mm256_mask_storeu_epi16(bf + i, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, row + i)));
        }
        memset(bf + len, 0, (size_t)(zero_to - len) * sizeof(uint16_t));
    }
}
#endif

#include "bf16_decode_amx.h" /* after prefetch_tile and prefetch_target, which it uses */

/* ---- KV_BF16 caches (kv_cache.h's pair-interleaved tiles) ----
 * With AVX512-BF16, where block_size % 16 == 0 and head_dim % 32 == 0 (bf16_products): q . k as vdpbf16ps of a
 * query pair (q_d, q_d+1) broadcast against a K column of 16 positions' (k_d, k_d+1), so no horizontal sums;
 * p . v as vdpbf16ps of a probability pair (p_j, p_j+1) broadcast against 16 dims of V's (v_j, v_j+1). Queries and
 * probabilities are rounded to bf16 (the products and sums stay float32). Elsewhere (no AVX512-BF16, other
 * shapes) a tile is unpacked to float32 rows and the float32 tiles above run on it. */
static inline int bf16_products(int64_t block_size, int64_t head_dim) {
#if defined(__AVX512BF16__)
    return block_size % 16 == 0 && head_dim % 32 == 0;
#else
    (void)block_size, (void)head_dim;
    return 0;
#endif
}

#if defined(__AVX512BF16__)
/* Columns of 16 positions one q . k pass reads: each query pair's broadcast serves this many K loads. */
#define BF16_QK_COLUMNS 4

/* scores[g * stride + c * 16 + j] = q_g . k of position j of column c, for heads g < heads and columns c < ncols
 * (both constants once inlined: no branch or spill in the loop; ncols <= BF16_QK_COLUMNS); column c's pair d2 at
 * cols[c] + d2 * col_stride (32-bit pairs); qp: the heads' queries as bf16 pairs, head_dim / 2 per head. Positions
 * past valid (of the last column) are not stored. pf: ncols cursors, advanced once per 4 pairs. */
static inline __attribute__((always_inline)) void bf16_qk_columns(
    float *restrict scores, int64_t stride, const uint32_t *restrict qp, const uint32_t *const *cols, int ncols,
    int64_t col_stride, int64_t valid, int heads, int64_t head_dim, prefetch_cursor *pf) {
    __m512 acc[HEADS_PER_TILE][BF16_QK_COLUMNS];
    for (int g = 0; g < heads; ++g)
        for (int c = 0; c < ncols; ++c) acc[g][c] = _mm512_setzero_ps();
    for (int64_t d2 = 0; d2 < head_dim / 2; ++d2) {
        if ((d2 & 3) == 0)
            for (int c = 0; c < ncols; ++c) prefetch_advance(&pf[c]);
        __m512bh k[BF16_QK_COLUMNS];
        for (int c = 0; c < ncols; ++c) k[c] = (__m512bh)_mm512_loadu_si512(cols[c] + d2 * col_stride);
        for (int g = 0; g < heads; ++g) {
            const __m512bh qv = (__m512bh)_mm512_set1_epi32((int)qp[g * (head_dim / 2) + d2]);
            for (int c = 0; c < ncols; ++c) acc[g][c] = _mm512_dpbf16_ps(acc[g][c], qv, k[c]);
        }
    }
    const __mmask16 tail = valid >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << valid) - 1u);
    for (int g = 0; g < heads; ++g)
        for (int c = 0; c < ncols; ++c)
            _mm512_mask_storeu_ps(scores + g * stride + c * 16, c == ncols - 1 ? tail : (__mmask16)0xffff, acc[g][c]);
}

/* bf16_qk_columns with ncols and heads as constants: one copy per (ncols, heads) pair. */
static inline __attribute__((always_inline)) void bf16_qk_pass(
    float *restrict scores, int64_t stride, const uint32_t *restrict qp, const uint32_t *const *cols, int ncols,
    int64_t col_stride, int64_t valid, int heads, int64_t head_dim, prefetch_cursor *pf) {
    switch (ncols) {
        case 1: bf16_qk_columns(scores, stride, qp, cols, 1, col_stride, valid, heads, head_dim, pf); break;
        case 2: bf16_qk_columns(scores, stride, qp, cols, 2, col_stride, valid, heads, head_dim, pf); break;
        case 3: bf16_qk_columns(scores, stride, qp, cols, 3, col_stride, valid, heads, head_dim, pf); break;
        default: bf16_qk_columns(scores, stride, qp, cols, BF16_QK_COLUMNS, col_stride, valid, heads, head_dim, pf);
    }
}

/* range_scores over a KV_BF16 cache with bf16_products. */
static void bf16_range_scores(float *restrict scores, int64_t sstride, const float *restrict q, const void *k_cache,
                              const void *v_cache, const int64_t *table, int64_t head_base, int64_t start,
                              int64_t end, int64_t group, int64_t block_size, int64_t head_dim) {
    const int64_t len = end - start, tile_bytes = block_size * head_dim * 2, per_block = block_size / 16;
    uint32_t qp[group * head_dim / 2];
    for (int64_t i = 0; i < group * head_dim; i += 16)
        _mm256_storeu_si256((__m256i *)((uint16_t *)qp + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(q + i)));
    /* a pass reads BF16_QK_COLUMNS columns: it asks for the next pass's blocks (at least KV_PREFETCH_BLOCKS ahead) */
    const int64_t pass_blocks = (BF16_QK_COLUMNS + per_block - 1) / per_block;
    const int64_t distance = pass_blocks > KV_PREFETCH_BLOCKS ? pass_blocks : KV_PREFETCH_BLOCKS;
    for (int64_t b = start / block_size; b < start / block_size + distance && b * block_size < end; ++b)
        prefetch_tile(tile(k_cache, KV_BF16, head_base, table, b, block_size, head_dim), tile_bytes);
    const int64_t num_cols = (len + 15) / 16;
    for (int64_t c0 = 0; c0 < num_cols; c0 += BF16_QK_COLUMNS) {
        const int ncols = num_cols - c0 < BF16_QK_COLUMNS ? (int)(num_cols - c0) : BF16_QK_COLUMNS;
        const uint32_t *cols[BF16_QK_COLUMNS];
        prefetch_cursor pf[BF16_QK_COLUMNS];
        for (int c = 0; c < ncols; ++c) {
            const int64_t b = (start + (c0 + c) * 16) / block_size, sub = (c0 + c) % per_block;
            cols[c] = (const uint32_t *)tile(k_cache, KV_BF16, head_base, table, b, block_size, head_dim) + sub * 16;
            /* a block's first column asks for the tile `distance` blocks ahead, spread over this pass */
            pf[c] = prefetch_spread(sub == 0 ? prefetch_target(k_cache, v_cache, KV_BF16, table, head_base, start,
                                                               end, b, 0, block_size, head_dim, distance)
                                             : NULL,
                                    tile_bytes, head_dim / 8);
        }
        const int64_t valid = len - (c0 + ncols - 1) * 16;
        float *s = scores + c0 * 16;
        FOR_HEAD_TILES(group, g0, heads,
                       bf16_qk_pass(s + g0 * sstride, sstride, qp + g0 * (head_dim / 2), cols, ncols, block_size, valid,
                                    heads, head_dim, pf))
    }
}

/* out[g * out_stride + d + c * 16 + i] += sum_j p_g[j] v_j[d + c * 16 + i] over the n positions of one V tile
 * (pairs of positions, 32-bit lanes: t) for heads g < heads and the dims of cols 16-float columns from d (both
 * constants once inlined), in registers, each V vector loaded once for all heads. pp: the heads' probabilities as
 * bf16 pairs, rows p_stride pairs apart; a last odd position's partner lanes are masked off (its probability is 0,
 * but the cache past a request's end is not initialized). */
static inline __attribute__((always_inline)) void bf16_pv_columns(float *restrict out, int64_t out_stride,
                                                                 const uint32_t *restrict pp, int64_t p_stride,
                                                                 const uint32_t *t, int64_t n, int heads,
                                                                 int64_t head_dim, int64_t d, int cols,
                                                                 prefetch_cursor *pf) {
    __m512 acc[HEADS_PER_TILE][4];
    for (int g = 0; g < heads; ++g)
        for (int c = 0; c < cols; ++c) acc[g][c] = _mm512_loadu_ps(out + g * out_stride + d + c * 16);
    const int64_t pairs = (n + 1) / 2;
    for (int64_t j2 = 0; j2 < pairs; ++j2) {
        if ((j2 & 1) == 0) prefetch_advance(pf);
        const __mmask32 keep = 2 * j2 + 1 < n ? (__mmask32)0xffffffffu : (__mmask32)0x55555555u;
        __m512bh x[4];
        for (int c = 0; c < cols; ++c)
            x[c] = (__m512bh)_mm512_maskz_mov_epi16(keep, _mm512_loadu_si512(t + j2 * head_dim + d + c * 16));
        for (int g = 0; g < heads; ++g) {
            const __m512bh w = (__m512bh)_mm512_set1_epi32((int)pp[g * p_stride + j2]);
            for (int c = 0; c < cols; ++c) acc[g][c] = _mm512_dpbf16_ps(acc[g][c], w, x[c]);
        }
    }
    for (int g = 0; g < heads; ++g)
        for (int c = 0; c < cols; ++c) _mm512_storeu_ps(out + g * out_stride + d + c * 16, acc[g][c]);
}

/* out[g * out_stride + d] += sum_j p_g[j] v_j[d] over the n positions of one V tile, for heads g < heads (a
 * constant once inlined): 64-dim columns, then a 32-dim one where head_dim % 64 == 32. */
static inline __attribute__((always_inline)) void bf16_pv_tile(float *restrict out, int64_t out_stride,
                                                              const uint32_t *restrict pp, int64_t p_stride,
                                                              const uint32_t *t, int64_t n, int heads,
                                                              int64_t head_dim, prefetch_cursor *pf) {
    int64_t d = 0;
    for (; d + 64 <= head_dim; d += 64) bf16_pv_columns(out, out_stride, pp, p_stride, t, n, heads, head_dim, d, 4, pf);
    if (d < head_dim) bf16_pv_columns(out, out_stride, pp, p_stride, t, n, heads, head_dim, d, 2, pf);
}

/* range_weighted_sum over a KV_BF16 cache with bf16_products; rounds probs to bf16 in place first (row g's first
 * len bf16 values, then a 0 for a last odd position's partner). */
static void bf16_range_weighted_sum(float *restrict out, int64_t out_stride, float *restrict probs, int64_t sstride,
                                    const void *v_cache, const int64_t *table, int64_t head_base, int64_t start,
                                    int64_t end, int64_t group, int64_t block_size, int64_t head_dim) {
    const int64_t len = end - start, tile_bytes = block_size * head_dim * 2;
    probs_to_bf16_in_place(probs, sstride, group, len, len + (len & 1)); /* within the row: len + 1 <= 2 * len */
    for (int64_t pos = start; pos < end; pos += block_size) {
        const int64_t b = pos / block_size, n = end - pos < block_size ? end - pos : block_size;
        const uint32_t *t = (const uint32_t *)tile(v_cache, KV_BF16, head_base, table, b, block_size, head_dim);
        prefetch_cursor pf = prefetch_spread(prefetch_target(NULL, v_cache, KV_BF16, table, head_base, start, end, b,
                                                             1, block_size, head_dim, KV_PREFETCH_BLOCKS),
                                             tile_bytes, (n + 3) / 4 * ((group + HEADS_PER_TILE - 1) / HEADS_PER_TILE)
                                                             * ((head_dim + 63) / 64));
        const uint32_t *pp = (const uint32_t *)probs + (pos - start) / 2;
        FOR_HEAD_TILES(group, g0, heads,
                       bf16_pv_tile(out + g0 * out_stride, out_stride, pp + g0 * sstride, sstride, t, n, heads,
                                    head_dim, &pf))
    }
}
#endif

/* range_scores / range_weighted_sum over a KV_BF16 cache without bf16_products: each tile unpacked to float32
 * rows, then the float32 tiles. */
static void bf16_unpacked_scores(float *restrict scores, int64_t sstride, const float *restrict q,
                                 const void *k_cache, const int64_t *table, int64_t head_base, int64_t start,
                                 int64_t end, int64_t group, int64_t block_size, int64_t head_dim) {
    float rows[block_size * head_dim];
    prefetch_cursor none = prefetch_spread(NULL, 0, 1);
    for (int64_t pos = start; pos < end; pos += block_size) {
        const int64_t n = end - pos < block_size ? end - pos : block_size;
        unpack_bf16_tile(rows, tile(k_cache, KV_BF16, head_base, table, pos / block_size, block_size, head_dim), n,
                         0, block_size, head_dim);
        float *s = scores + pos - start;
        FOR_HEAD_TILES(group, g0, heads,
                       qk_tile(s + g0 * sstride, sstride, q + g0 * head_dim, rows, n, heads, head_dim, KV_F32, &none))
    }
}

static void bf16_unpacked_weighted_sum(float *restrict out, int64_t out_stride, const float *restrict probs,
                                       int64_t sstride, const void *v_cache, const int64_t *table, int64_t head_base,
                                       int64_t start, int64_t end, int64_t group, int64_t block_size,
                                       int64_t head_dim) {
    float rows[block_size * head_dim];
    prefetch_cursor none = prefetch_spread(NULL, 0, 1);
    for (int64_t pos = start; pos < end; pos += block_size) {
        const int64_t n = end - pos < block_size ? end - pos : block_size;
        unpack_bf16_tile(rows, tile(v_cache, KV_BF16, head_base, table, pos / block_size, block_size, head_dim), n,
                         1, block_size, head_dim);
        const float *p = probs + pos - start;
        FOR_HEAD_TILES(group, g0, heads,
                       pv_tile(out + g0 * out_stride, out_stride, p + g0 * sstride, sstride, rows, n, heads, head_dim,
                               KV_F32, &none))
    }
}

/* Floats between range_scores' rows for a range of len positions: whole blocks on the AMX tiles (a block's C tiles
 * and probability A tile span it; bf16_decode_amx.h), len elsewhere. At most amx_score_row(len, block_size). */
static inline int64_t score_row_floats(int kv_type, int64_t len, int64_t group, int64_t block_size,
                                       int64_t head_dim) {
    return kv_type == KV_BF16 && amx_decode_fits(group, block_size, head_dim) ? amx_score_row(len, block_size) : len;
}

/* scores[g * sstride + j - start] = q_g . k_j for the group query heads and positions j in [start, end) of one KV
 * head (head_base = kv_head * num_blocks); start is a multiple of block_size; sstride = score_row_floats(...). On
 * the AMX tiles, loads their configuration on the calling thread, kept for range_weighted_sum. */
static void range_scores(float *restrict scores, int64_t sstride, const float *restrict q, const void *k_cache,
                         const void *v_cache, int kv_type, const int64_t *table, int64_t head_base, int64_t start,
                         int64_t end, int64_t group, int64_t block_size, int64_t head_dim) {
    if (kv_type == KV_BF16) {
#if TM_HAVE_AMX_DECODE
        if (amx_decode_fits(group, block_size, head_dim)) {
            amx_decode_load_config(group, block_size);
            amx_range_scores(scores, sstride, q, k_cache, v_cache, table, head_base, start, end, group, block_size,
                             head_dim);
            return;
        }
#endif
#if defined(__AVX512BF16__)
        if (bf16_products(block_size, head_dim)) {
            bf16_range_scores(scores, sstride, q, k_cache, v_cache, table, head_base, start, end, group, block_size,
                              head_dim);
            return;
        }
#endif
        bf16_unpacked_scores(scores, sstride, q, k_cache, table, head_base, start, end, group, block_size, head_dim);
        return;
    }
    const int64_t tile_bytes = block_size * kv_row_bytes(kv_type, head_dim);
    for (int64_t b = start / block_size; b < start / block_size + KV_PREFETCH_BLOCKS && b * block_size < end; ++b)
        prefetch_tile(tile(k_cache, kv_type, head_base, table, b, block_size, head_dim), tile_bytes);
    for (int64_t pos = start; pos < end; pos += block_size) {
        const int64_t b = pos / block_size;
        const void *k = tile(k_cache, kv_type, head_base, table, b, block_size, head_dim);
        const int64_t n = end - pos < block_size ? end - pos : block_size;
        prefetch_cursor pf = prefetch_spread(prefetch_target(k_cache, v_cache, kv_type, table, head_base, start, end,
                                                             b, 0, block_size, head_dim, KV_PREFETCH_BLOCKS),
                                             tile_bytes, tile_steps(n, group, head_dim, 0));
        float *s = scores + pos - start;
#define TM_QK_TILES(kind) \
    FOR_HEAD_TILES(group, g0, heads,                                                                               \
                   qk_tile(s + g0 * sstride, sstride, q + g0 * head_dim, k, n, heads, head_dim, kind, &pf))
        switch (kv_type) { /* one copy of the tiles per element type */
            case KV_F16: TM_QK_TILES(KV_F16); break;
            case KV_I8: TM_QK_TILES(KV_I8); break;
            default: TM_QK_TILES(KV_F32);
        }
#undef TM_QK_TILES
    }
}

/* s[i] = exp((s[i] - max) * scale) over len scores in place; stores the raw max, returns the sum. With AVX-512,
 * 16 at a time as 2^x (exp2_16.h): a decode step of 64 requests x 320 positions runs ~17k such rows (9 query heads x
 * 30 layers each). */
static inline float exp_scores(float *s, int64_t len, float scale, float *max_out) {
#if defined(__AVX512F__)
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 16 <= len; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + j));
    const __mmask16 tail = (__mmask16)((1u << (len - j)) - 1u);
    if (len > j) vmax = _mm512_mask_max_ps(vmax, tail, vmax, _mm512_maskz_loadu_ps(tail, s + j));
    const float top = _mm512_reduce_max_ps(vmax), scale2 = scale * 1.44269504088896341f; /* e^(x s) = 2^(x s2) */
    const __m512 vscale = _mm512_set1_ps(scale2), m = _mm512_set1_ps(top * scale2);
    __m512 vsum = _mm512_setzero_ps();
    for (j = 0; j + 16 <= len; j += 16) {
        const __m512 e = exp2_16(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), vscale, m));
        vsum = _mm512_add_ps(vsum, e);
        _mm512_storeu_ps(s + j, e);
    }
    if (len > j) {
        const __m512 e = exp2_16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(tail, s + j), vscale, m));
        vsum = _mm512_mask_add_ps(vsum, tail, vsum, e);
        _mm512_mask_storeu_ps(s + j, tail, e);
    }
    *max_out = top;
    return _mm512_reduce_add_ps(vsum);
#else
    float max = s[0];
    for (int64_t i = 1; i < len; ++i) max = s[i] > max ? s[i] : max;
    float sum = 0.0f;
    for (int64_t i = 0; i < len; ++i) {
        s[i] = expf((s[i] - max) * scale);
        sum += s[i];
    }
    *max_out = max;
    return sum;
#endif
}

/* out[g * out_stride + d] += sum_j p_g[j] v_j[d] over positions j in [start, end) of one KV head, p in
 * range_scores' layout (rows sstride apart). KV_BF16 on the AMX tiles or with bf16_products rounds probs to bf16 in
 * place. */
static void range_weighted_sum(float *restrict out, int64_t out_stride, float *restrict probs, int64_t sstride,
                               const void *v_cache, int kv_type, const int64_t *table, int64_t head_base,
                               int64_t start, int64_t end, int64_t group, int64_t block_size, int64_t head_dim) {
    if (kv_type == KV_BF16) {
#if TM_HAVE_AMX_DECODE
        if (amx_decode_fits(group, block_size, head_dim)) {
            amx_range_weighted_sum(out, out_stride, probs, sstride, v_cache, table, head_base, start, end, group,
                                   block_size, head_dim);
            return;
        }
#endif
#if defined(__AVX512BF16__)
        if (bf16_products(block_size, head_dim)) {
            bf16_range_weighted_sum(out, out_stride, probs, sstride, v_cache, table, head_base, start, end, group,
                                    block_size, head_dim);
            return;
        }
#endif
        bf16_unpacked_weighted_sum(out, out_stride, probs, sstride, v_cache, table, head_base, start, end, group,
                                   block_size, head_dim);
        return;
    }
    const int64_t tile_bytes = block_size * kv_row_bytes(kv_type, head_dim);
    for (int64_t pos = start; pos < end; pos += block_size) {
        const int64_t b = pos / block_size;
        const void *v = tile(v_cache, kv_type, head_base, table, b, block_size, head_dim);
        const int64_t n = end - pos < block_size ? end - pos : block_size;
        prefetch_cursor pf = prefetch_spread(prefetch_target(NULL, v_cache, kv_type, table, head_base, start, end, b, 1,
                                                             block_size, head_dim, KV_PREFETCH_BLOCKS),
                                             tile_bytes, tile_steps(n, group, head_dim, 1));
        const float *p = probs + pos - start;
#define TM_PV_TILES(kind)                                                                                 \
    FOR_HEAD_TILES(group, g0, heads,                                                                      \
                   pv_tile(out + g0 * out_stride, out_stride, p + g0 * sstride, sstride, v, n, heads, head_dim, kind, \
                           &pf))
        switch (kv_type) {
            case KV_F16: TM_PV_TILES(KV_F16); break;
            case KV_I8: TM_PV_TILES(KV_I8); break;
            default: TM_PV_TILES(KV_F32);
        }
#undef TM_PV_TILES
    }
}

static void attend_one(
    float *restrict out, const float *restrict q, const void *k_cache, const void *v_cache, int kv_type,
    const int64_t *table, int64_t seq_len, int64_t group, int64_t kv_head, int64_t num_blocks,
    int64_t block_size, int64_t head_dim, float scale,
    float *restrict scores /* [group, amx_score_row(seq_len, block_size)] */) {
    const int64_t head_base = kv_head * num_blocks;
    const int64_t sstride = score_row_floats(kv_type, seq_len, group, block_size, head_dim);
    range_scores(scores, sstride, q, k_cache, v_cache, kv_type, table, head_base, 0, seq_len, group, block_size,
                 head_dim);
    for (int64_t g = 0; g < group; ++g) {
        float *s = scores + g * sstride, max;
        const float inv = 1.0f / exp_scores(s, seq_len, scale, &max);
        for (int64_t i = 0; i < seq_len; ++i) s[i] *= inv;
    }
    memset(out, 0, (size_t)(group * head_dim) * sizeof(float));
    range_weighted_sum(out, head_dim, scores, sstride, v_cache, kv_type, table, head_base, 0, seq_len, group,
                       block_size, head_dim);
}

/* One partial per query head g: part[g * (head_dim + 2) + ...] = [sum_j e_j v_j (head_dim floats) | max
 * raw score m | sum_j e_j] over positions j in [start, end), e_j = exp((q . k_j - m) * scale). start is a
 * multiple of block_size; start < end. */
static void attend_range(
    float *restrict part, const float *restrict q, const void *k_cache, const void *v_cache, int kv_type,
    const int64_t *table, int64_t start, int64_t end, int64_t group, int64_t kv_head, int64_t num_blocks,
    int64_t block_size, int64_t head_dim, float scale,
    float *restrict scores /* [group, amx_score_row(end - start, block_size)] */) {
    const int64_t head_base = kv_head * num_blocks, len = end - start, part_stride = head_dim + 2;
    const int64_t sstride = score_row_floats(kv_type, len, group, block_size, head_dim);
    range_scores(scores, sstride, q, k_cache, v_cache, kv_type, table, head_base, start, end, group, block_size,
                 head_dim);
    for (int64_t g = 0; g < group; ++g) {
        float *p = part + g * part_stride;
        p[head_dim + 1] = exp_scores(scores + g * sstride, len, scale, &p[head_dim]);
        memset(p, 0, (size_t)head_dim * sizeof(float));
    }
    range_weighted_sum(part, part_stride, scores, sstride, v_cache, kv_type, table, head_base, start, end, group,
                       block_size, head_dim);
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

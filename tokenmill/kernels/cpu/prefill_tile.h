/* Causal attention of a block of prompt rows over the paged, head-major KV cache (attention_tile.h's
 * layout), read in place, flash-attention style: scores by chunks of PANEL positions, an online softmax,
 * never the whole score matrix. Shared by prefill_attention.c and step_forward.c.
 *
 * A request's query rows 0 .. q_len - 1 sit at positions seq_len - q_len + j and see positions <= their
 * own, all of them already in the cache (the step's K/V are written first).
 *
 * One task = (request, KV head, block of Q_BLOCK query rows): its group * Q_BLOCK query vectors share each
 * K/V chunk. Per chunk of PANEL positions: the chunk's K is transposed into a [head_dim][PANEL] panel, so the
 * scores are f32_panels.h's tiles (6 query vectors x PANEL positions); masked, exponentiated against the
 * running row maximum; then V's rows are added, weighted, into the output accumulators 6 vectors x 16
 * lanes at a time. prefill_tasks lists them longest first (the last query blocks see the most positions),
 * for a dynamic schedule; tasks write disjoint output rows.
 *
 * Invariants: float32 query and output rows (the caches' rows: kv_type, kv_cache.h); query rows
 * [q_len, num_heads, head_dim] with row stride q_stride, heads contiguous; out [q_len, num_heads, head_dim]
 * contiguous; head_dim % 8 == 0; q_len <= seq_len.
 */
#ifndef TM_PREFILL_TILE_H
#define TM_PREFILL_TILE_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "attention_tile.h"
#include "f32_panels.h"

#define Q_BLOCK 16

typedef struct {
    int64_t req, kv_head, row0, rows;
} attention_task;

/* e^x per lane for x <= 0 (scores minus their running maximum): 2^n * e^r with n = round(x / ln 2), |r| <=
 * ln 2 / 2, e^r by Cephes' degree-6 polynomial (about 1 ulp); x below -87 gives 0. */
static inline v8 exp_v8(v8 x) {
    const __m256 floor_x = _mm256_set1_ps(-87.0f);
    const __m256 underflow = _mm256_cmp_ps((__m256)x, floor_x, _CMP_LT_OQ);
    x = (v8)_mm256_max_ps((__m256)x, floor_x);
    const v8 n = (v8)_mm256_round_ps((__m256)(x * 1.44269504088896341f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const v8 r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v8 p = (v8){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32((__m256)n), _mm256_set1_epi32(127)), 23);
    return (v8)_mm256_andnot_ps(underflow, (__m256)(p * (v8)_mm256_castsi256_ps(bits)));
}

/* o[r][d0 .. d0 + 8 * width) += sum_c p[r * PANEL + c] * v[c][same] over the chunk's n positions, for
 * rows r < rows (<= WEIGHTED_ROWS) and width <= 2 (constants once inlined). 6 x 2 accumulators, the two
 * V vectors and the broadcast fit the 16 AVX2 registers: more and the compiler spills an accumulator,
 * which chains every step through a store and a reload. */
#define WEIGHTED_ROWS 6
static inline __attribute__((always_inline)) void weighted_rows(float *o, int64_t o_stride, const float *p,
                                                               const float *const *v, int64_t n, int64_t d0,
                                                               int width, int rows) {
    v8 acc[WEIGHTED_ROWS][2];
    for (int r = 0; r < rows; ++r)
        for (int w = 0; w < width; ++w) acc[r][w] = *(const v8 *)(o + r * o_stride + d0 + w * LANES);
    for (int64_t c = 0; c < n; ++c) {
        v8 vv[2];
        for (int w = 0; w < width; ++w) vv[w] = *(const v8 *)(v[c] + d0 + w * LANES);
        for (int r = 0; r < rows; ++r) {
            const v8 pb = (v8){0} + p[r * PANEL + c];
            for (int w = 0; w < width; ++w) acc[r][w] += pb * vv[w];
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int w = 0; w < width; ++w) *(v8 *)(o + r * o_stride + d0 + w * LANES) = acc[r][w];
}

/* kt[i * PANEL + c] = K row c's element i (scaled) for the chunk's PANEL positions (krows[c] == NULL: zeros),
 * in 8 x 8 blocks transposed in registers. */
static inline void transpose_keys(float *kt, const void *const *krows, const int64_t *offsets, int64_t d,
                                  int kv_type) {
    float f[PANEL]; /* the rows' int8 scales */
    for (int c = 0; c < PANEL; ++c) f[c] = krows[c] == NULL ? 0.0f : kv_row_scale(krows[c], offsets[c], d, kv_type);
    for (int c0 = 0; c0 < PANEL; c0 += LANES)
        for (int64_t i = 0; i < d; i += LANES) {
            __m256 r[LANES];
            for (int l = 0; l < LANES; ++l) {
                const v8 x = krows[c0 + l] == NULL ? (v8){0} : load_kv8(krows[c0 + l], offsets[c0 + l] + i, kv_type);
                r[l] = (__m256)(kv_type == KV_I8 ? x * f[c0 + l] : x);
            }
            const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
            const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
            const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
            const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
            const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
            const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
            const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
            const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
            float *out = kt + i * PANEL + c0;
            _mm256_storeu_ps(out + 0 * PANEL, _mm256_permute2f128_ps(u0, u4, 0x20));
            _mm256_storeu_ps(out + 1 * PANEL, _mm256_permute2f128_ps(u1, u5, 0x20));
            _mm256_storeu_ps(out + 2 * PANEL, _mm256_permute2f128_ps(u2, u6, 0x20));
            _mm256_storeu_ps(out + 3 * PANEL, _mm256_permute2f128_ps(u3, u7, 0x20));
            _mm256_storeu_ps(out + 4 * PANEL, _mm256_permute2f128_ps(u0, u4, 0x31));
            _mm256_storeu_ps(out + 5 * PANEL, _mm256_permute2f128_ps(u1, u5, 0x31));
            _mm256_storeu_ps(out + 6 * PANEL, _mm256_permute2f128_ps(u2, u6, 0x31));
            _mm256_storeu_ps(out + 7 * PANEL, _mm256_permute2f128_ps(u3, u7, 0x31));
        }
}

#if defined(__AVX512F__)
/* A KV_BF16 chunk of n <= PANEL positions from position j0 of one block (block_size % PANEL == 0, head_dim % 16 ==
 * 0): its keys as the [head_dim][PANEL] panel (a K tile's dim pair over 16 positions is one vector: low halves dim
 * 2i, high 2i + 1; zero past n) and its values as float32 rows vbuf[c * head_dim + d] (a V tile's pair row:
 * positions 2p, 2p + 1). */
static inline void unpack_bf16_chunk(float *restrict kt, float *restrict vbuf, const void *k_tile, const void *v_tile,
                                     int64_t j0, int64_t n, int64_t block_size, int64_t head_dim) {
    const __mmask16 live = n >= PANEL ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u);
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    const uint32_t *k = (const uint32_t *)k_tile + j0, *v = (const uint32_t *)v_tile + (j0 >> 1) * head_dim;
    for (int64_t i = 0; i < head_dim / 2; ++i) {
        const __m512i x = _mm512_maskz_loadu_epi32(live, k + i * block_size);
        _mm512_storeu_si512(kt + 2 * i * PANEL, _mm512_slli_epi32(x, 16));
        _mm512_storeu_si512(kt + (2 * i + 1) * PANEL, _mm512_and_si512(x, high));
    }
    for (int64_t p = 0; 2 * p < n; ++p)
        for (int64_t d = 0; d < head_dim; d += 16) {
            const __m512i x = _mm512_loadu_si512(v + p * head_dim + d);
            _mm512_storeu_si512(vbuf + 2 * p * head_dim + d, _mm512_slli_epi32(x, 16));
            _mm512_storeu_si512(vbuf + (2 * p + 1) * head_dim + d, _mm512_and_si512(x, high));
        }
}
#endif

static void attend_block(float *out, const float *query, int64_t q_stride, const void *k_cache, const void *v_cache,
                         int kv_type, const int64_t *table, int64_t seq_len, int64_t q_len, const attention_task *t,
                         int64_t num_heads, int64_t group, int64_t num_blocks, int64_t block_size, int64_t head_dim,
                         float scale, float *scratch) {
    const int64_t m_rows = group * t->rows, d = head_dim;
    float *qbuf = scratch, *obuf = qbuf + m_rows * d, *scores = obuf + m_rows * d, *kt = scores + m_rows * PANEL;
    float *row_max = kt + d * PANEL, *row_sum = row_max + m_rows, *vbuf = row_sum + m_rows; /* vbuf: not KV_F32 */
    float *kbuf = vbuf + d * PANEL; /* KV_BF16's K rows, unpacked */
    const int k_type = kv_type == KV_BF16 ? KV_F32 : kv_type; /* how transpose_keys reads krows */
#if defined(__AVX512F__)
    const int bf16_chunk = kv_type == KV_BF16 && block_size % PANEL == 0 && head_dim % 16 == 0;
#else
    const int bf16_chunk = 0;
#endif
    const float *vrows[PANEL];
    const int64_t first_pos = seq_len - q_len + t->row0; /* position of the block's first query row */
    /* Query vector m = j * group + g: row j of the block, head kv_head * group + g; pre-scaled. */
    for (int64_t j = 0; j < t->rows; ++j)
        for (int64_t g = 0; g < group; ++g) {
            const float *src = query + (t->row0 + j) * q_stride + (t->kv_head * group + g) * d;
            float *dst = qbuf + (j * group + g) * d;
            for (int64_t i = 0; i < d; ++i) dst[i] = src[i] * scale;
        }
    for (int64_t m = 0; m < m_rows * d; ++m) obuf[m] = 0.0f;
    for (int64_t m = 0; m < m_rows; ++m) {
        row_max[m] = -INFINITY;
        row_sum[m] = 0.0f;
    }
    const int64_t end = first_pos + t->rows; /* positions [0, end) are seen by some row */
    const int64_t head_base = t->kv_head * num_blocks;
    for (int64_t c0 = 0; c0 < end; c0 += PANEL) {
        const int64_t n = end - c0 < PANEL ? end - c0 : PANEL;
        const void *krows[PANEL]; /* K tile and element offset of each chunk position; NULL past n */
        int64_t offsets[PANEL];
        for (int64_t c = 0; c < PANEL; ++c) {
            krows[c] = NULL;
            if (c >= n) continue;
            const int64_t pos = c0 + c, offset = pos % block_size * kv_row_elems(kv_type, d);
            const void *v = tile(v_cache, kv_type, head_base, table, pos / block_size, block_size, d);
            krows[c] = tile(k_cache, kv_type, head_base, table, pos / block_size, block_size, d);
            offsets[c] = offset;
            if (kv_type == KV_BF16) { /* pair-interleaved tiles: both rows as float32 */
                vrows[c] = vbuf + c * d;
                if (bf16_chunk) continue; /* unpack_bf16_chunk, below */
                unpack_bf16_row(kbuf + c * d, krows[c], pos % block_size, 0, block_size, d);
                unpack_bf16_row(vbuf + c * d, v, pos % block_size, 1, block_size, d);
                krows[c] = kbuf + c * d;
                offsets[c] = 0;
            } else if (kv_type != KV_F32) { /* the chunk's V rows as float32, for weighted_rows */
                load_kv_row(vbuf + c * d, v, offset, d, kv_type);
                vrows[c] = vbuf + c * d;
            } else {
                vrows[c] = (const float *)v + offset;
            }
        }
#if defined(__AVX512F__)
        if (bf16_chunk) /* the chunk lies in one block: K pairs are a panel already, V pairs rows */
            unpack_bf16_chunk(kt, vbuf, tile(k_cache, KV_BF16, head_base, table, c0 / block_size, block_size, d),
                              tile(v_cache, KV_BF16, head_base, table, c0 / block_size, block_size, d),
                              c0 % block_size, n, block_size, d);
        else
#endif
            transpose_keys(kt, krows, offsets, d, k_type);
        panel_rows(scores, PANEL, qbuf, d, kt, NULL, PANEL, d, d, m_rows, 0);
        for (int64_t m = 0; m < m_rows; ++m) {
            /* Row m (query row j = m / group) sees chunk positions c <= first_pos + j - c0. */
            const int64_t limit = first_pos + m / group - c0 + 1;
            const int64_t valid = limit < n ? limit : n;
            float *s = scores + m * PANEL;
            if (valid <= 0) {
                for (int64_t c = 0; c < PANEL; ++c) s[c] = 0.0f;
                continue;
            }
            v8 lo = *(v8 *)s, hi = *(v8 *)(s + LANES);
            if (valid < PANEL) /* the diagonal chunk, or the last one: mask the positions past the row */
                for (int c = 0; c < LANES; ++c) {
                    if (c >= valid) lo[c] = -1e30f;
                    if (c + LANES >= valid) hi[c] = -1e30f;
                }
            const float old_max = row_max[m], chunk_max = hmax((v8)_mm256_max_ps((__m256)lo, (__m256)hi));
            const float mx = chunk_max > old_max ? chunk_max : old_max;
            const float correction = old_max == -INFINITY ? 0.0f : exp_v8((v8){0} + (old_max - mx))[0];
            lo = exp_v8(lo - mx);
            hi = exp_v8(hi - mx);
            *(v8 *)s = lo;
            *(v8 *)(s + LANES) = hi;
            const float sum = hsum(lo + hi);
            row_sum[m] = row_sum[m] * correction + sum;
            row_max[m] = mx;
            if (correction != 1.0f)
                for (int64_t i = 0; i < d; ++i) obuf[m * d + i] *= correction;
        }
        for (int64_t m = 0; m < m_rows; m += WEIGHTED_ROWS) {
            float *o = obuf + m * d;
            const float *p = scores + m * PANEL;
            int64_t d0 = 0;
            if (m_rows - m >= WEIGHTED_ROWS) {
                for (; d0 + 2 * LANES <= d; d0 += 2 * LANES) weighted_rows(o, d, p, vrows, n, d0, 2, WEIGHTED_ROWS);
                for (; d0 < d; d0 += LANES) weighted_rows(o, d, p, vrows, n, d0, 1, WEIGHTED_ROWS);
            } else {
                for (int64_t r = 0; r < m_rows - m; ++r)
                    for (d0 = 0; d0 < d; d0 += LANES) weighted_rows(o + r * d, d, p + r * PANEL, vrows, n, d0, 1, 1);
            }
        }
    }
    for (int64_t j = 0; j < t->rows; ++j)
        for (int64_t g = 0; g < group; ++g) {
            const int64_t m = j * group + g;
            const float inv = 1.0f / row_sum[m];
            float *dst = out + ((t->row0 + j) * num_heads + t->kv_head * group + g) * d;
            for (int64_t i = 0; i < d; ++i) dst[i] = obuf[m * d + i] * inv;
        }
}

/* Floats of scratch one thread needs for attend_block. */
static inline int64_t prefill_scratch_floats(int64_t group, int64_t head_dim) {
    const int64_t m_max = group * Q_BLOCK;
    return 2 * m_max * head_dim + m_max * PANEL + 3 * head_dim * PANEL + 2 * m_max + 16;
}

/* Number of attend_block tasks for requests of q_lens[0 .. num_reqs). */
static inline int64_t prefill_num_tasks(const int64_t *q_lens, int64_t num_reqs, int64_t num_kv_heads) {
    int64_t n = 0;
    for (int64_t r = 0; r < num_reqs; ++r) n += (q_lens[r] + Q_BLOCK - 1) / Q_BLOCK * num_kv_heads;
    return n;
}

/* Fills tasks (prefill_num_tasks of them), roughly longest first: later query blocks see more positions. */
static inline void prefill_tasks(attention_task *tasks, const int64_t *q_lens, int64_t num_reqs, int64_t num_kv_heads) {
    int64_t n = 0, max_q = 0;
    for (int64_t r = 0; r < num_reqs; ++r) max_q = q_lens[r] > max_q ? q_lens[r] : max_q;
    for (int64_t row0 = (max_q - 1) / Q_BLOCK * Q_BLOCK; row0 >= 0; row0 -= Q_BLOCK)
        for (int64_t r = 0; r < num_reqs; ++r)
            for (int64_t h = 0; h < num_kv_heads && row0 < q_lens[r]; ++h) {
                const int64_t rows = q_lens[r] - row0 < Q_BLOCK ? q_lens[r] - row0 : Q_BLOCK;
                tasks[n++] = (attention_task){r, h, row0, rows};
            }
}

#endif

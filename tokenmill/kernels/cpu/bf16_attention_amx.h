/* Causal self-attention of prompts on AMX-BF16 tiles: bf16 operands, float32 scores, softmax and accumulation.
 * Shared by bf16_prompt_attention.c (the layer-by-layer path's candidate: prompts whose whole context is in the call)
 * and step_forward.c (a bf16 model's one-call forward: there also a chunk whose prefix a KV_BF16 cache holds). On a
 * CPU with AVX512-BF16 but no AMX (Zen 4, Cooper Lake) the two products run on vdpbf16ps instead (bf16_dp_tile: the
 * packed layouts below hold, for each input pair, the 16 lanes of a vdpbf16ps operand), everything else unchanged;
 * the amx_ names stay.
 *
 * Where a (prompt, KV head)'s K and V come from (amx_kv):
 *   - packed (amx_pack_kv): the prompt's K and V rows rounded to bf16 into the layouts the tiles read (zero past the
 *     prompt's length):
 *        K^T: [key block of 16][d block of 32][16 input pairs][16 keys][2]   (a B tile per (key block, d block))
 *        V:   [key block of 32][d block of 16][16 key pairs][16 dims][2]    (a B tile per (key block, d block))
 *   - a KV_BF16 cache of 16-position multiples (amx_cache_view; on the tiles only): K's tiles as they lie there
 *     (kv_cache.h's [head_dim / 2][block_size][2]: 16 positions of 16 dim pairs are a B tile, its rows block_size * 4
 *     bytes apart), V's tiles gathered in key order (amx_gather_v: [keys / 2][head_dim][2], zero past the last key;
 *     32 keys of 16 dims are a B tile, its rows head_dim * 4 bytes apart).
 * Two phases, so that threads can split the work finely:
 *   1. per (prompt, KV head): its K/V packed, or its V gathered;
 *   2. amx_attend_group: one task = (prompt, KV head, block of 16 query rows), for each of the KV head's query
 *      heads: scores S = Q K^T for the keys the block can see (whole tiles of 16; the diagonal tile masked), an
 *      exact softmax per row in float32 (AVX-512: one row of a score tile is one vector), P rounded to bf16,
 *      O = P V on four accumulator tiles (64 dims) at a time, then O / sum written as float32 or bf16 rows, or into
 *      a projection's bf16 input tiles (amx_out); one head's scores run on the tiles while the previous head's
 *      softmax settles.
 * The score and probability rows of a block stay in the thread's scratch (amx_attention_scratch_bytes): all the
 * prompt's keys at once, which bounds them at AMX_ATTENTION_MAX_KEYS.
 *
 * Tiles: the configuration of bf16_amx_load_config_rows(16) (tiles 0-3 accumulators, 4-5 A, 6-7 B; 16 rows x
 * 64 bytes each); the caller loads it on every thread first.
 * Invariants: head_dim % 32 == 0 and <= AMX_ATTENTION_MAX_DIM; rows of q, k, v, out are head-contiguous with the
 * given row strides (elements); of a prompt of t keys whose last n are its rows in the step, row i sits at position
 * t - n + i and sees keys 0 .. t - n + i.
 */
#ifndef TM_BF16_ATTENTION_AMX_H
#define TM_BF16_ATTENTION_AMX_H

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16_panels.h"
#include "exp2_16.h"
#include "kv_cache.h"

#define AMX_ATTENTION_MAX_DIM 256
#define AMX_ATTENTION_MAX_KEYS 8192

static inline int64_t amx_keys16(int64_t t) { return (t + 15) / 16 * 16; }
static inline int64_t amx_keys32(int64_t t) { return (t + 31) / 32 * 32; }

/* bf16 elements of one (prompt of t tokens, KV head)'s packed K^T plus V (amx_pack_kv's layout). */
static inline int64_t amx_packed_kv_elems(int64_t t, int64_t head_dim) {
    return amx_keys16(t) * head_dim + amx_keys32(t) * head_dim;
}

/* Elements of one (prompt, KV head)'s own buffer in an amx_prompt_plan of t keys: its packed K^T and V, or, with the
 * K/V read from a cache (from_cache), its V tiles gathered (amx_gather_v). */
static inline int64_t amx_head_kv_elems(int from_cache, int64_t t, int64_t head_dim) {
    return from_cache ? amx_keys32(t) * head_dim : amx_packed_kv_elems(t, head_dim);
}

/* Score and probability rows of a prompt of t tokens: padded off multiples of 4 KiB, so a tile's 16 rows fall in
 * distinct L1 sets. */
static inline int64_t amx_score_stride(int64_t t) { return amx_keys32(t) + 32; }

/* Bytes of one query head's block buffers (amx_head_block) for prompts of up to max_t tokens (a multiple of 64). */
static inline int64_t amx_head_block_bytes(int64_t max_t, int64_t head_dim) {
    const int64_t keys = amx_score_stride(max_t);
    return (16 * keys * 4 /* scores */ + 16 * keys * 2 /* probabilities */ + 16 * head_dim * 2 /* Q block */ +
            16 * head_dim * 4 /* output block */ + 63) / 64 * 64;
}

/* Per-thread scratch bytes of amx_attend_group for prompts of up to max_t tokens: two head blocks in flight. */
static inline int64_t amx_attention_scratch_bytes(int64_t max_t, int64_t head_dim) {
    return 2 * amx_head_block_bytes(max_t, head_dim);
}


/* The prompts of one call (bf16_prompt_attention.c) or step (step_forward.c) that attend on AMX tiles: per prompt
 * its packed K/V offset (-1: not on AMX), (prompt, KV head, first row) tasks with the query blocks that see the
 * most keys first, and the packed K/V then each thread's scratch in one allocation. from_cache: the K/V are read
 * from a KV_BF16 cache (amx_cache_view) and the packed part holds only each (prompt, KV head)'s V tiles gathered
 * (amx_gather_v). */
typedef struct {
    int64_t *offsets; /* [num_prompts] */
    int64_t *tasks;   /* [num_tasks, 3] */
    int64_t num_tasks;
    uint16_t *kv;     /* packed K/V, then the threads' scratch */
    char *scratch;
    int64_t scratch_bytes; /* per thread */
    int from_cache;
} amx_prompt_plan;

/* A KV_BF16 cache as the prompts of a step read it (kv_cache.h's layout and pair-interleaved tiles): request i's
 * blocks through tables + i * table_stride, its keys 0 .. seq_lens[i] - 1 (its query rows the last of them, their
 * K/V written there already); block_size % 16 == 0. */
typedef struct {
    const uint16_t *k_cache, *v_cache;
    const int64_t *tables;
    int64_t table_stride;
    const int64_t *seq_lens;
    int64_t num_blocks, block_size;
} amx_cache_view;

/* Where one (prompt, KV head)'s K and V tiles lie: amx_pack_kv's copy (packed), or K in the cache (k_cache,
 * head_base = KV head * num_blocks and table: the request's blocks, as kv_cache.h's tile takes them) and V gathered
 * (v_rows: pair rows in key order, amx_gather_v). */
typedef struct {
    const uint16_t *packed;
    const void *k_cache;
    const uint16_t *v_rows;
    const int64_t *table;
    int64_t head_base, block_size;
} amx_kv;

/* The B tile of K^T for keys 16 kb .. 16 kb + 15 and dims 32 db .. 32 db + 31; *stride: its row stride (bytes). */
static inline const uint16_t *amx_k_tile(const amx_kv *kv, int64_t kb, int64_t db, int64_t head_dim,
                                         int64_t *stride) {
    if (kv->packed != NULL) {
        *stride = 64;
        return kv->packed + (kb * (head_dim / 32) + db) * 512;
    }
    const int64_t bs = kv->block_size, pos = kb * 16;
    *stride = bs * 4;
    return (const uint16_t *)tile(kv->k_cache, KV_BF16, kv->head_base, kv->table, pos / bs, bs, head_dim) +
           (db * 16 * bs + pos % bs) * 2;
}

/* The B tile of V for keys 32 kb .. 32 kb + 31 (16 pair rows) and dims 16 db .. 16 db + 15; *stride as above. */
static inline const uint16_t *amx_v_tile(const amx_kv *kv, int64_t t, int64_t kb, int64_t db, int64_t head_dim,
                                         int64_t *stride) {
    if (kv->packed != NULL) {
        *stride = 64;
        return kv->packed + amx_keys16(t) * head_dim + (kb * (head_dim / 16) + db) * 512;
    }
    *stride = head_dim * 4;
    return kv->v_rows + kb * 32 * head_dim + db * 32;
}

static void amx_free_prompt_plan(amx_prompt_plan *a) {
    free(a->offsets), free(a->tasks), free(a->kv);
    a->offsets = a->tasks = NULL;
    a->kv = NULL;
    a->num_tasks = 0;
}

/* Tasks in descending order of the keys their query block sees (the first of each: that count). */
static int amx_task_order(const void *a, const void *b) {
    const int64_t x = ((const int64_t *)a)[0], y = ((const int64_t *)b)[0];
    return x < y ? 1 : x > y ? -1 : 0;
}

/* Plans the prompts i with lens[i] > 0 query rows (0: not on AMX), the last of keys[i] keys (amx_attention_fits
 * holds for keys[i]): keys == lens (whole-context prompts) unless from_cache. Returns 0, or 1 when memory could not
 * be allocated (nothing left allocated). */
static int amx_plan_prompts(amx_prompt_plan *a, const int64_t *lens, const int64_t *keys, int64_t num_prompts,
                            int64_t num_kv_heads, int64_t head_dim, int num_threads, int from_cache) {
    int64_t packed = 0, max_t = 0;
    a->from_cache = from_cache;
    a->offsets = (int64_t *)malloc((size_t)(num_prompts > 0 ? num_prompts : 1) * sizeof(int64_t));
    if (a->offsets == NULL) return 1;
    for (int64_t i = 0; i < num_prompts; ++i) {
        a->offsets[i] = lens[i] > 0 ? packed : -1;
        if (lens[i] > 0) {
            packed += num_kv_heads * amx_head_kv_elems(from_cache, keys[i], head_dim);
            a->num_tasks += num_kv_heads * ((lens[i] + 15) / 16);
            max_t = keys[i] > max_t ? keys[i] : max_t;
        }
    }
    if (a->num_tasks == 0) return 0;
    const int64_t kv_bytes = (packed * 2 + 63) / 64 * 64;
    a->scratch_bytes = amx_attention_scratch_bytes(max_t, head_dim);
    a->tasks = (int64_t *)malloc((size_t)a->num_tasks * 3 * sizeof(int64_t));
    a->kv = (uint16_t *)aligned_alloc(64, (size_t)(kv_bytes + a->scratch_bytes * num_threads));
    if (a->tasks == NULL || a->kv == NULL) {
        amx_free_prompt_plan(a);
        return 1;
    }
    a->scratch = (char *)a->kv + kv_bytes;
    int64_t *order = (int64_t *)malloc((size_t)a->num_tasks * 4 * sizeof(int64_t)), n = 0;
    if (order == NULL) {
        amx_free_prompt_plan(a);
        return 1;
    }
    for (int64_t i = 0; i < num_prompts; ++i)
        for (int64_t row0 = 0; row0 < lens[i]; row0 += 16)
            for (int64_t h = 0; h < num_kv_heads; ++h, ++n) {
                const int64_t last = keys[i] - lens[i] + (row0 + 16 < lens[i] ? row0 + 16 : lens[i]);
                order[4 * n] = last, order[4 * n + 1] = i, order[4 * n + 2] = h, order[4 * n + 3] = row0;
            }
    qsort(order, (size_t)n, 4 * sizeof(int64_t), amx_task_order);
    for (int64_t j = 0; j < n; ++j)
        for (int c = 0; c < 3; ++c) a->tasks[3 * j + c] = order[4 * j + 1 + c];
    free(order);
    return 0;
}

#if (TM_HAVE_AMX && defined(__AVX512F__)) || defined(__AVX512BF16__)
#define TM_HAVE_AMX_ATTENTION 1
/* 16 elements of a row at element i as bf16: copied (src_bf16) or rounded from float32 (nearest even). */
static inline __m256i amx_load16_bf16(const void *row, int64_t i, int src_bf16) {
    if (src_bf16) return _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + i));
    return (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps((const float *)row + i));
}

/* Packs the t rows of one KV head (k + j * k_stride, v + j * v_stride; head_dim elements each, bf16 or float32
 * as src_bf16) into packed [amx_packed_kv_elems(t, head_dim)]: K^T first, then V. */
static void amx_pack_kv(uint16_t *packed, const void *k, int64_t k_stride, const void *v, int64_t v_stride,
                        int src_bf16, int64_t t, int64_t head_dim) {
    const int64_t esize = src_bf16 ? 2 : 4, kb16 = amx_keys16(t) / 16, kb32 = amx_keys32(t) / 32;
    const int64_t d32 = head_dim / 32, d16 = head_dim / 16;
    uint16_t *kt = packed, *vt = packed + amx_keys16(t) * head_dim;
    const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(16));
    /* K^T: a key's 32 inputs of a d block are 16 input pairs (32-bit lanes), scattered down its column. */
    for (int64_t kb = 0; kb < kb16; ++kb)
        for (int64_t n = 0; n < 16; ++n) {
            const int64_t key = kb * 16 + n;
            const char *row = (const char *)k + key * k_stride * esize;
            for (int64_t db = 0; db < d32; ++db) {
                uint32_t *tile = (uint32_t *)(kt + (kb * d32 + db) * 512);  /* [16 pairs][16 keys] of pairs */
                __m512i pairs = _mm512_setzero_si512();
                if (key < t)
                    pairs = _mm512_inserti64x4(_mm512_castsi256_si512(amx_load16_bf16(row, db * 32, src_bf16)),
                                               amx_load16_bf16(row, db * 32 + 16, src_bf16), 1);
                _mm512_i32scatter_epi32(tile + n, column, pairs, 4);
            }
        }
    /* V: two keys' rows interleaved element by element into 32-bit pairs. */
    for (int64_t kb = 0; kb < kb32; ++kb)
        for (int64_t i = 0; i < 16; ++i) {
            const int64_t key = kb * 32 + 2 * i;
            const char *row0 = (const char *)v + key * v_stride * esize, *row1 = row0 + v_stride * esize;
            for (int64_t db = 0; db < d16; ++db) {
                const __m512i a = key < t ? _mm512_cvtepu16_epi32(amx_load16_bf16(row0, db * 16, src_bf16))
                                          : _mm512_setzero_si512();
                const __m512i b = key + 1 < t ? _mm512_cvtepu16_epi32(amx_load16_bf16(row1, db * 16, src_bf16))
                                              : _mm512_setzero_si512();
                _mm512_storeu_si512(vt + (kb * d16 + db) * 512 + i * 32, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
            }
        }
}

/* The t keys' V tiles of one KV head (head_base = KV head * num_blocks) of a KV_BF16 cache, through the request's
 * block table, copied in key order into v_rows [amx_keys32(t) * head_dim], pair rows as the cache has them, zero
 * past key t - 1 (the cache past a request's end may hold anything, and P's zeros there would not cancel a NaN). */
static void amx_gather_v(uint16_t *v_rows, const void *v_cache, int64_t head_base, const int64_t *table,
                         int64_t block_size, int64_t t, int64_t head_dim) {
    const int64_t tile_elems = block_size * head_dim, padded = amx_keys32(t);
    for (int64_t b = 0; b * block_size < t; ++b) { /* whole pair rows up to padded keys */
        const int64_t n = padded - b * block_size < block_size ? padded - b * block_size : block_size;
        memcpy(v_rows + b * tile_elems, tile(v_cache, KV_BF16, head_base, table, b, block_size, head_dim),
               (size_t)(n * head_dim) * sizeof(uint16_t));
    }
    for (int64_t j = t; j < padded; ++j)
        for (int64_t d = 0; d < head_dim; ++d) v_rows[((j >> 1) * head_dim + d) * 2 + (j & 1)] = 0;
}

/* Where the attention's output rows go: float32 or bf16 rows (stride elements apart), or bf16 in bf16_panels.h's
 * BF16_TILED blocks of stride (a k_pad) columns, a projection's input as its AMX products read it. */
enum { AMX_OUT_F32 = 0, AMX_OUT_BF16 = 1, AMX_OUT_BF16_TILES = 2 };
typedef struct {
    void *base;
    int64_t stride;
    int kind;
} amx_out;

/* The bf16 element index of (row, col) in a bf16 out. */
static inline int64_t amx_out_index(const amx_out *out, int64_t row, int64_t col) {
    return out->kind == AMX_OUT_BF16_TILES ? bf16_x_index(BF16_TILED, out->stride, row, col) : row * out->stride + col;
}

/* One query head's 16-row block in flight: its bf16 queries, float32 scores, bf16 probabilities (rows
 * amx_score_stride apart), output sums and the rows' 1 / sum. Two of these per thread let one head's softmax finish
 * while the tiles work on another's scores (amx_attend_group). */
typedef struct {
    float *s;
    uint16_t *p, *qb;
    float *ob;
    float inv_sum[16];
} amx_head_block;

static inline amx_head_block amx_block_at(void *scratch, int64_t t, int64_t head_dim) {
    const int64_t s_stride = amx_score_stride(t);
    amx_head_block b;
    b.s = (float *)scratch;
    b.p = (uint16_t *)(b.s + 16 * s_stride);
    b.qb = b.p + 16 * s_stride;
    b.ob = (float *)(b.qb + 16 * head_dim);
    return b;
}

/* Phase 1: the block's queries (rows row0 .. row0 + rows - 1 at q + j * q_stride) to bf16 (zero rows past them),
 * then S = Q K^T (amx_block_scores, dp_block_scores). */
static void amx_block_queries(amx_head_block *b, const void *q, int64_t q_stride, int src_bf16, int64_t row0,
                              int64_t rows, int64_t head_dim) {
    const int64_t esize = src_bf16 ? 2 : 4;
    for (int64_t r = 0; r < 16; ++r) {
        const char *row = (const char *)q + (row0 + r) * q_stride * esize;
        for (int64_t d = 0; d < head_dim; d += 16)
            _mm256_storeu_si256((__m256i *)(b->qb + r * head_dim + d),
                                r < rows ? amx_load16_bf16(row, d, src_bf16) : _mm256_setzero_si256());
    }
}

#if defined(__AVX512BF16__)
/* out[r * out_stride + 16 j ..] (float32, 16 lanes) = sum over input pairs i < pairs of x's pair i of row r (32 bits
 * at x + r * x_stride + 2 i) times panel j's 16-lane pair vector i (at w + j * panel_stride + (i / 16) *
 * block_stride + (i % 16) * 32), by vdpbf16ps, for rows r < 8 and panels j < panels (1 or 2, a constant once
 * inlined): one broadcast per row and input pair feeds both panels, the 16 sums stay in registers. */
static inline __attribute__((always_inline)) void bf16_dp_tile(float *out, int64_t out_stride, const uint16_t *x,
                                                              int64_t x_stride, const uint16_t *w,
                                                              int64_t panel_stride, int panels, int64_t pairs,
                                                              int64_t block_stride) {
    __m512 acc[8][2];
    for (int r = 0; r < 8; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t i0 = 0; i0 < pairs; i0 += 16) {
        const uint16_t *wb = w + (i0 / 16) * block_stride;
        const int64_t n = pairs - i0 < 16 ? pairs - i0 : 16;
        for (int64_t i = 0; i < n; ++i) {
            const __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void *)(wb + i * 32));
            const __m512bh w1 =
                panels > 1 ? (__m512bh)_mm512_loadu_si512((const void *)(wb + panel_stride + i * 32)) : w0;
            for (int r = 0; r < 8; ++r) {
                int32_t pair;
                memcpy(&pair, x + r * x_stride + 2 * (i0 + i), sizeof(pair));
                const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, w0);
                if (panels > 1) acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, w1);
            }
        }
    }
    for (int r = 0; r < 8; ++r) {
        _mm512_storeu_ps(out + r * out_stride, acc[r][0]);
        if (panels > 1) _mm512_storeu_ps(out + r * out_stride + 16, acc[r][1]);
    }
}

/* amx_block_scores on vdpbf16ps: S = Q K^T for the keys the block can see, 8 rows x 2 key blocks per tile (rows past
 * `rows` are Q's zero rows; their scores are never read). Packed K/V only (kv->packed). */
static void dp_block_scores(amx_head_block *b, const amx_kv *kv, int64_t t, int64_t pos0, int64_t rows,
                            int64_t head_dim) {
    const int64_t key_blocks = amx_keys16(pos0 + rows) / 16, s_stride = amx_score_stride(t), d32 = head_dim / 32;
    const uint16_t *packed = kv->packed;
    for (int64_t kb = 0; kb < key_blocks; kb += 2)
        for (int64_t r0 = 0; r0 < rows; r0 += 8) {
            float *out = b->s + r0 * s_stride + kb * 16;
            const uint16_t *x = b->qb + r0 * head_dim, *w = packed + kb * d32 * 512;
            if (key_blocks - kb > 1)
                bf16_dp_tile(out, s_stride, x, head_dim, w, d32 * 512, 2, head_dim / 2, 512);
            else
                bf16_dp_tile(out, s_stride, x, head_dim, w, d32 * 512, 1, head_dim / 2, 512);
        }
}

/* amx_block_weighted's products on vdpbf16ps: O = P V for the block's rows, 8 rows x 2 blocks of 16 dims per tile,
 * over the keys up to its last whole 32. Packed K/V only (kv->packed). */
static void dp_block_weighted(amx_head_block *b, const amx_kv *kv, int64_t t, int64_t pos0, int64_t rows,
                              int64_t head_dim) {
    const int64_t keys32 = amx_keys32(pos0 + rows), s_stride = amx_score_stride(t), d16 = head_dim / 16;
    const uint16_t *vt = kv->packed + amx_keys16(t) * head_dim;
    for (int64_t db = 0; db < d16; db += 2)
        for (int64_t r0 = 0; r0 < rows; r0 += 8) {
            float *out = b->ob + r0 * head_dim + db * 16;
            const uint16_t *x = b->p + r0 * s_stride, *w = vt + db * 512;
            if (d16 - db > 1)
                bf16_dp_tile(out, head_dim, x, s_stride, w, 512, 2, keys32 / 2, d16 * 512);
            else
                bf16_dp_tile(out, head_dim, x, s_stride, w, 512, 1, keys32 / 2, d16 * 512);
        }
}
#endif

#if TM_HAVE_AMX
/* S = Q K^T on the tiles for the keys the block can see (its rows at positions pos0 ..), four key blocks per pass
 * (accumulators 0-3: the TDPs of one accumulator form a chain, so four chains keep the unit busy; head_dim 64: Q's two
 * input blocks stay in tiles 4 and 5 throughout). */
static void amx_block_scores(amx_head_block *b, const amx_kv *kv, int64_t t, int64_t pos0, int64_t rows,
                             int64_t head_dim) {
    const int64_t key_blocks = amx_keys16(pos0 + rows) / 16, s_stride = amx_score_stride(t), d32 = head_dim / 32;
    int64_t st; /* a K tile's row stride */
    if (d32 == 2) {
        _tile_loadd(4, b->qb, head_dim * 2);
        _tile_loadd(5, b->qb + 32, head_dim * 2);
    }
    for (int64_t kb = 0; kb < key_blocks; kb += 4) {
        const int64_t nk = key_blocks - kb < 4 ? key_blocks - kb : 4;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        if (d32 == 2) {
/* Key block kb + j's two input blocks into accumulator acc (tiles 6, 7 hold its K). */
#define TM_S_BLOCK(acc, j)                                          \
    _tile_loadd(6, amx_k_tile(kv, kb + (j), 0, head_dim, &st), st); \
    _tile_loadd(7, amx_k_tile(kv, kb + (j), 1, head_dim, &st), st); \
    _tile_dpbf16ps(acc, 4, 6);                                      \
    _tile_dpbf16ps(acc, 5, 7);
            TM_S_BLOCK(0, 0)
            if (nk > 1) { TM_S_BLOCK(1, 1) }
            if (nk > 2) { TM_S_BLOCK(2, 2) }
            if (nk > 3) { TM_S_BLOCK(3, 3) }
#undef TM_S_BLOCK
        } else {
            for (int64_t db = 0; db < d32; ++db) {
                _tile_loadd(4, b->qb + db * 32, head_dim * 2);
                _tile_loadd(6, amx_k_tile(kv, kb, db, head_dim, &st), st);
                _tile_dpbf16ps(0, 4, 6);
                if (nk > 1) {
                    _tile_loadd(7, amx_k_tile(kv, kb + 1, db, head_dim, &st), st);
                    _tile_dpbf16ps(1, 4, 7);
                }
                if (nk > 2) {
                    _tile_loadd(6, amx_k_tile(kv, kb + 2, db, head_dim, &st), st);
                    _tile_dpbf16ps(2, 4, 6);
                }
                if (nk > 3) {
                    _tile_loadd(7, amx_k_tile(kv, kb + 3, db, head_dim, &st), st);
                    _tile_dpbf16ps(3, 4, 7);
                }
            }
        }
        _tile_stored(0, b->s + kb * 16, s_stride * 4);
        if (nk > 1) _tile_stored(1, b->s + (kb + 1) * 16, s_stride * 4);
        if (nk > 2) _tile_stored(2, b->s + (kb + 2) * 16, s_stride * 4);
        if (nk > 3) _tile_stored(3, b->s + (kb + 3) * 16, s_stride * 4);
    }
}

#endif

/* Phase 2: an exact softmax per row over keys 0 .. pos0 + r (causal), P rounded to bf16 and zero past them, to
 * the block's last whole 32 keys. */
static void amx_block_softmax(amx_head_block *b, int64_t t, int64_t pos0, int64_t rows, float scale) {
    const int64_t keys32 = amx_keys32(pos0 + rows), s_stride = amx_score_stride(t);
    const float scale2 = scale * 1.44269504088896341f; /* e^(s scale) = 2^(s scale2) */
    const __m512 vscale = _mm512_set1_ps(scale2);
    for (int64_t r = 0; r < rows; ++r) {
        float *sr = b->s + r * s_stride;
        uint16_t *pr = b->p + r * s_stride;
        const int64_t seen = pos0 + r + 1;
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        int64_t j = 0;
        for (; j + 16 <= seen; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(sr + j));
        const __mmask16 tail = (__mmask16)((1u << (seen - j)) - 1u);
        if (seen > j) vmax = _mm512_mask_max_ps(vmax, tail, vmax, _mm512_maskz_loadu_ps(tail, sr + j));
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vmax) * scale2);
        __m512 vsum = _mm512_setzero_ps();
        for (j = 0; j < keys32; j += 16) {
            const int64_t left = seen - j;
            const __mmask16 valid = left >= 16 ? (__mmask16)0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1u);
            const __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(sr + j), vscale, m);
            const __m512 e = _mm512_maskz_mov_ps(valid, exp2_16(x));
            vsum = _mm512_add_ps(vsum, e);
            _mm256_storeu_si256((__m256i *)(pr + j), (__m256i)_mm512_cvtneps_pbh(e));
        }
        b->inv_sum[r] = 1.0f / _mm512_reduce_add_ps(vsum);
    }
    for (int64_t r = rows; r < 16; ++r) memset(b->p + r * s_stride, 0, (size_t)keys32 * 2);
}

/* Phase 3: O = P V (on the tiles: four 16-dim accumulators at a time; dp_block_weighted), then O / sum to the output
 * rows (amx_block_store). */
#if TM_HAVE_AMX
static void amx_block_weighted(amx_head_block *b, const amx_kv *kv, int64_t t, int64_t pos0, int64_t rows,
                               int64_t head_dim) {
    const int64_t keys32 = amx_keys32(pos0 + rows), s_stride = amx_score_stride(t), d16 = head_dim / 16;
    int64_t st; /* a V tile's row stride */
    for (int64_t d0 = 0; d0 < d16; d0 += 4) {
        const int64_t nd = d16 - d0 < 4 ? d16 - d0 : 4;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t kb = 0; kb < keys32 / 32; ++kb) {
            _tile_loadd(4, b->p + kb * 32, s_stride * 2);
            _tile_loadd(6, amx_v_tile(kv, t, kb, d0, head_dim, &st), st);
            _tile_dpbf16ps(0, 4, 6);
            if (nd > 1) { _tile_loadd(7, amx_v_tile(kv, t, kb, d0 + 1, head_dim, &st), st); _tile_dpbf16ps(1, 4, 7); }
            if (nd > 2) { _tile_loadd(6, amx_v_tile(kv, t, kb, d0 + 2, head_dim, &st), st); _tile_dpbf16ps(2, 4, 6); }
            if (nd > 3) { _tile_loadd(7, amx_v_tile(kv, t, kb, d0 + 3, head_dim, &st), st); _tile_dpbf16ps(3, 4, 7); }
        }
        _tile_stored(0, b->ob + d0 * 16, head_dim * 4);
        if (nd > 1) _tile_stored(1, b->ob + (d0 + 1) * 16, head_dim * 4);
        if (nd > 2) _tile_stored(2, b->ob + (d0 + 2) * 16, head_dim * 4);
        if (nd > 3) _tile_stored(3, b->ob + (d0 + 3) * 16, head_dim * 4);
    }
}
#endif

/* O / sum to out's rows row .. and columns col .. (16 at a time; col % 16 == 0). */
static void amx_block_store(const amx_head_block *b, const amx_out *out, int64_t row, int64_t col, int64_t rows,
                            int64_t head_dim) {
    for (int64_t r = 0; r < rows; ++r) {
        const __m512 inv = _mm512_set1_ps(b->inv_sum[r]);
        for (int64_t d = 0; d < head_dim; d += 16) {
            const __m512 o = _mm512_mul_ps(_mm512_loadu_ps(b->ob + r * head_dim + d), inv);
            if (out->kind == AMX_OUT_F32)
                _mm512_storeu_ps((float *)out->base + (row + r) * out->stride + col + d, o);
            else
                _mm256_storeu_si256((__m256i *)((uint16_t *)out->base + amx_out_index(out, row + r, col + d)),
                                    (__m256i)_mm512_cvtneps_pbh(o));
        }
    }
}

/* Query rows row0 .. row0 + rows - 1 (rows <= 16, at positions pos0 ..) of the `heads` query heads that share one KV
 * head of a prompt of t keys (kv: that KV head's), head i's rows at q + i * head_dim + j * q_stride (bf16 or float32
 * as src_bf16), its output row j at out's row out_row + j, columns out_col + i * head_dim ... Pipelined over the
 * heads: head i + 1's scores run on the tiles between head i's softmax and its P V, so the vector stores of P have
 * reached L1 when the tiles load them (and the tiles' score stores before the vector loads). scratch:
 * amx_attention_scratch_bytes(t). Not on the tiles (tiles 0): kv packed. */
static void amx_attend_group(const amx_out *out, int64_t out_row, int64_t out_col, const void *q, int64_t q_stride,
                             int src_bf16, const amx_kv *kv, int64_t t, int64_t pos0, int64_t row0, int64_t rows,
                             int64_t heads, int64_t head_dim, float scale, void *scratch, int tiles) {
    const int64_t esize = src_bf16 ? 2 : 4;
    amx_head_block blocks[2] = {amx_block_at(scratch, t, head_dim),
                                amx_block_at((char *)scratch + amx_head_block_bytes(t, head_dim), t, head_dim)};
/* The block's two products on the tiles (tiles) or on vdpbf16ps. */
#if TM_HAVE_AMX && defined(__AVX512BF16__)
#define TM_SCORES(blk) (tiles ? amx_block_scores : dp_block_scores)(blk, kv, t, pos0, rows, head_dim)
#define TM_WEIGHTED(blk) (tiles ? amx_block_weighted : dp_block_weighted)(blk, kv, t, pos0, rows, head_dim)
#elif TM_HAVE_AMX
#define TM_SCORES(blk) amx_block_scores(blk, kv, t, pos0, rows, head_dim)
#define TM_WEIGHTED(blk) amx_block_weighted(blk, kv, t, pos0, rows, head_dim)
#else
#define TM_SCORES(blk) dp_block_scores(blk, kv, t, pos0, rows, head_dim)
#define TM_WEIGHTED(blk) dp_block_weighted(blk, kv, t, pos0, rows, head_dim)
#endif
    (void)tiles;
    amx_block_queries(&blocks[0], q, q_stride, src_bf16, row0, rows, head_dim);
    TM_SCORES(&blocks[0]);
    for (int64_t i = 0; i < heads; ++i) {
        amx_head_block *cur = &blocks[i & 1], *next = &blocks[(i + 1) & 1];
        amx_block_softmax(cur, t, pos0, rows, scale);
        if (i + 1 < heads) {
            amx_block_queries(next, (const char *)q + (i + 1) * head_dim * esize, q_stride, src_bf16, row0, rows,
                              head_dim);
            TM_SCORES(next);
        }
        TM_WEIGHTED(cur);
        amx_block_store(cur, out, out_row + row0, out_col + i * head_dim, rows, head_dim);
    }
#undef TM_SCORES
#undef TM_WEIGHTED
}
/* The planned prompts' attention, inside a parallel region (every thread calls it): each (prompt, KV head)'s K/V
 * packed (or, from_cache, its V gathered), then the tasks. Prompt i owns rows starts[i] .. + lens[i] - 1 of q
 * [.., num_heads * head_dim] and out (its columns head by head), and of k and v [.., num_kv_heads * head_dim]
 * (row strides in elements, bf16 or float32 as src_bf16) unless the plan is from_cache: its K/V then come from cache
 * (on the tiles only), its rows the last lens[i] of cache->seq_lens[i] keys. Leaves no barrier after the tasks. */
static void amx_attend_prompts(const amx_prompt_plan *a, const amx_out *out, const void *q,
                               int64_t q_stride, const void *k, int64_t k_stride, const void *v, int64_t v_stride,
                               int src_bf16, const int64_t *starts, const int64_t *lens, int64_t num_prompts,
                               int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale,
                               const amx_cache_view *cache) {
    const int64_t group = num_heads / num_kv_heads, esize = src_bf16 ? 2 : 4;
    const int tiles = bf16_amx_ready(); /* else vdpbf16ps */
#if TM_HAVE_AMX
    if (tiles) bf16_amx_load_config_rows(16);
#endif
    /* per prompt: its keys (the cache's context, or the prompt itself) and its first key's place in its per-head
     * buffer (K^T then V packed; from the cache, V gathered) */
#define TM_KEYS(i) (a->from_cache ? cache->seq_lens[i] : lens[i])
#define TM_HEAD_ELEMS(i) amx_head_kv_elems(a->from_cache, TM_KEYS(i), head_dim)
#pragma omp for schedule(dynamic, 1)
    for (int64_t j = 0; j < num_prompts * num_kv_heads; ++j) {
        const int64_t i = j / num_kv_heads, h = j % num_kv_heads;
        if (a->offsets[i] < 0) continue;
        uint16_t *dst = a->kv + a->offsets[i] + h * TM_HEAD_ELEMS(i);
        if (a->from_cache)
            amx_gather_v(dst, cache->v_cache, h * cache->num_blocks, cache->tables + i * cache->table_stride,
                         cache->block_size, TM_KEYS(i), head_dim);
        else
            amx_pack_kv(dst, (const char *)k + (starts[i] * k_stride + h * head_dim) * esize, k_stride,
                        (const char *)v + (starts[i] * v_stride + h * head_dim) * esize, v_stride, src_bf16, lens[i],
                        head_dim);
    }
    void *scratch = a->scratch + a->scratch_bytes * omp_get_thread_num();
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t j = 0; j < a->num_tasks; ++j) {
        const int64_t i = a->tasks[3 * j], h = a->tasks[3 * j + 1], row0 = a->tasks[3 * j + 2], t = TM_KEYS(i);
        const int64_t first = h * group * head_dim; /* the KV head's first query head */
        const uint16_t *own = a->kv + a->offsets[i] + h * TM_HEAD_ELEMS(i);
        amx_kv kv = {own, NULL, NULL, NULL, 0, 0};
        if (a->from_cache)
            kv = (amx_kv){NULL, cache->k_cache, own, cache->tables + i * cache->table_stride, h * cache->num_blocks,
                          cache->block_size};
        amx_attend_group(out, starts[i], first, (const char *)q + (starts[i] * q_stride + first) * esize, q_stride,
                         src_bf16, &kv, t, t - lens[i] + row0, row0, lens[i] - row0 < 16 ? lens[i] - row0 : 16, group,
                         head_dim, scale, scratch, tiles);
    }
#undef TM_KEYS
#undef TM_HEAD_ELEMS
#if TM_HAVE_AMX
    if (tiles) _tile_release();
#endif
}
#else
#define TM_HAVE_AMX_ATTENTION 0
#endif

/* 1 when amx_attend_group runs here for head_dim and prompts of t tokens: on AMX tiles the process was granted, or
 * on vdpbf16ps. */
static inline int amx_attention_fits(int64_t head_dim, int64_t t) {
#if defined(__AVX512BF16__)
    const int products = 1;
#else
    const int products = bf16_amx_ready();
#endif
    return TM_HAVE_AMX_ATTENTION && products && head_dim % 32 == 0 && head_dim <= AMX_ATTENTION_MAX_DIM &&
           t <= AMX_ATTENTION_MAX_KEYS;
}

#endif

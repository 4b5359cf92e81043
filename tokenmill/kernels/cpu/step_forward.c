/* A whole Llama decoder forward for one engine step in one call: every layer's norms, projections, rotary,
 * K/V write and paged attention, inside one OpenMP parallel region with barriers between the phases. A step
 * is decode rows (one new token per request), prompt chunks (several rows per request), or both.
 *
 * Why: at one token a layer's weights take ~120 us to stream (int8), while running it as ~15 torch /
 * ctypes calls costs about as much again in dispatch, allocation and thread-pool fork/join. Here the
 * threads stay in one region for the whole step and meet at ~10 barriers per layer. A prompt step gains
 * less, but still the host work between the ~10 regions per layer, during which the other threads wait.
 *
 * Arithmetic, per layer, row by row (as models/llama.py computes it):
 *   residual += previous sublayer output (layer 0: residual = embeddings)
 *   x = rmsnorm(residual) * input_norm;  qkv = x W_qkv^T (+ b);  rotary on q and k;  k, v -> cache
 *   a = softmax(q k^T * scale) v over the request's cached positions (attention_tile.h)
 *   residual += a W_o^T (+ b);  x = rmsnorm(residual) * post_norm
 *   h = silu(x W_gate^T) * (x W_up^T);  out = h W_down^T
 * and finally hidden = rmsnorm(residual + out) * final_norm.
 * A bf16 model's MLP runs fused where it can (fused_mlp): the gate/up product writes bf16 silu(gate) * up, the down
 * projection's input, instead of float32 gate and up rows; an int8 model's likewise (int8_fused_mlp) writes float32
 * silu(gate) * up, which the down projection's per-row pass quantizes.
 * A projection is float32 in 16-channel panels (f32_panels.h), W8A8 int8 in 16-channel panels
 * (int8_panels.h; each input row quantized per token by int8_quantize.h, down_proj's input rotated by
 * Hadamard blocks in the same pass) or W4A16 int4 (int4_dot.h: 4-bit weight groups, each group of 32
 * inputs quantized to 16 bits on its own) as the tm_linear says; at steps of int4_bf16_min_rows rows or more, int4
 * weights are multiplied as bf16 panels dequantized pass by pass (int4_bf16.h) with the bf16 products, fused MLP
 * included, as a bf16 model's.
 *
 * A prompt of at most amx_attention_max_rows keys attends on AMX-BF16 tiles or vdpbf16ps instead
 * (bf16_attention_amx.h; set for a bf16 or int8/int4 model where the execution plan chose that kernel): with a
 * KV_BF16 cache of 16-position multiples on AMX tiles (amx_cache_prompts), its K/V read from the cache, so a chunk of
 * a cached prefix too; elsewhere a whole-context prompt (no cached prefix) only, its q/k/v rounded to bf16 from the
 * step's rotated rows.
 *
 * Work split: projections by panels (float32, int8, bf16; guided grabs of PANELS_PER_GRAB, over row chunks
 * whose quantized or float input stays in L2, as int8_gemm.c and f32_gemm.c block them) or blocks of
 * INT4_CHANNELS output channels (static: each thread streams its half of every weight). Attention of a pure
 * decode step by (request, KV head) tasks or, with fewer tasks than 2 per thread, by block-aligned ranges
 * of each one's positions merged after (split-K); of any other step by (request, KV head) tasks for its one-row
 * requests (a decode step's path) and prefill_tile.h's (request, KV head, query block) tasks for the other rows not
 * on AMX tiles. The per-row phases by rows.
 *
 * Invariants: all float tensors but the K/V caches (rows of kv_type, kv_cache.h) are float32 and contiguous;
 * head_dim % 8 == 0; positions index the rotary tables; slots[t] is the cache slot of row t's token; request
 * r owns rows q_starts[r] .. + q_lens[r] - 1 (in order, together all rows), the last q_lens[r] of its
 * seq_lens[r] positions; the K/V caches have the head-major layout of kv_cache.h.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "attention_tile.h"
#include "bf16_attention_amx.h"
#include "bf16_panels.h"
#include "f32_panels.h"
#include "int4_bf16.h"
#include "int4_dot.h"
#include "int8_amx.h"
#include "int8_panels.h"
#include "int8_quantize.h"
#include "prefill_tile.h"
#include "shm_all_reduce.h"
#include "row_ops.h"
#include "work_split.h"

enum { TM_FLOAT32 = 0, TM_INT8 = 1, TM_INT4 = 2, TM_BF16 = 3 };

/* Phases of phase_seconds (step_forward.py's PHASES, same order): the per-row work (residual adds, norms,
 * activation quantization, silu * up), the projections, rotary + K/V write, attention, and under tensor parallelism
 * the all-reduces (waiting for the other ranks included). */
enum {
    TM_PHASE_ROWS = 0, TM_PHASE_PROJECTIONS = 1, TM_PHASE_ROTARY_KV = 2, TM_PHASE_ATTENTION = 3, TM_PHASE_ALL_REDUCE = 4,
    TM_NUM_PHASES = 5
};

typedef struct {
    const void *weight;     /* float32 panels [num_panels(n), k, PANEL] (f32_panels.h); int8 panels
                               [int8_num_panels(n), int8_quads(k), 16, 4] (int8_panels.h); or int4 packed
                               [n_pad, k / 2] (int4_dot.h) */
    const int32_t *rowsum;  /* int8: sums of each weight row, padded to whole panels */
    const float *scale;     /* int8: per-output-channel scales, padded to whole panels */
    const uint16_t *group_scale, *group_min; /* int4: fp16 [n_pad / 4, k / 32, 4] each */
    const float *bias;      /* [n] or NULL */
    int64_t n, k;
    int64_t rotation_block; /* int8: Hadamard block applied to the input, or 0 */
    int64_t format;         /* TM_FLOAT32, TM_INT8, TM_INT4 or TM_BF16 (bf16_panels.h; input rows rounded to bf16) */
    int64_t levels;         /* int8: activation levels, 255 or 127 (int8_quantize.h) */
} tm_linear;

typedef struct {
    const float *input_norm, *post_norm; /* [hidden] */
    tm_linear qkv, o, gate_up, down;
    void *k_cache, *v_cache; /* [num_kv_heads, num_blocks, block_size, row], rows of kv_type (kv_cache.h) */
} tm_layer;

typedef struct {
    int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate;
    int64_t num_blocks, block_size;
    int64_t kv_type; /* the K/V caches' rows: KV_F32, KV_F16 or KV_I8 (kv_cache.h) */
    float eps, attn_scale;
    const tm_layer *layers;
    const float *final_norm;         /* [hidden] */
    const float *rope_cos, *rope_sin; /* [max_positions, head_dim] */
    int64_t row_chunk_bytes;          /* rows_per_chunk's budget */
    int64_t amx_attention_max_rows;   /* prompts of up to this many keys attend in bf16 (bf16_attention_amx.h; a
                                         bf16 or int8/int4 model's; whole-context ones only unless
                                         amx_cache_prompts applies); 0: never */
    /* Tensor parallelism (tp_world > 1): this rank's share of the model; o and down are row-parallel, their
     * outputs summed over the ranks (shm_all_reduce.h, segment tp_segment of tp_capacity floats per slot) before
     * the residual add: written straight into this rank's slot and summed by the residual add that reads them
     * (TP_SUM), which saves a copy in and a write and read of the sum (2 ranks, W1: all-reduces 0.83 -> 0.16 s of a
     * 20 s run). tp_seq: the all-reduce counter this rank shares with its Python side. */
    char *tp_segment;
    int64_t tp_rank, tp_world, tp_capacity;
    uint64_t *tp_seq;
    double tp_timeout_s;
    /* Per local KV head, (i, n): this rank is sharer i of n of that head's group, and attends only the step's rows
     * row_share(rows, i, n) of it, the others left zero (distributed/sharding.py); NULL: every head is its own. */
    const int64_t *kv_row_shares;
    int64_t fuse_int8_mlp; /* 1: int8 MLPs run fused where int8_fused_mlp holds; 0: never (A/B runs and tests) */
    int64_t int4_bf16_min_rows; /* steps of at least this many rows multiply int4 weights on the bf16 units, their
                                   panels dequantized grab by grab (int4_bf16.h; inputs rounded to bf16); 0: never */
    int64_t prefetch_weights; /* 1: a projection's passes prefetch the weights of the pair their thread takes next
                                 (bf16_panels.h, int8_vnni.h; prefetch_stream.h); 0: never (A/B runs) */
    int64_t amx_cache_prompts; /* 1: with a KV_BF16 cache on AMX tiles, prompts (a cached prefix's chunks too) read
                                  their K/V from the cache; 0: whole-context prompts from the step's rows (A/B runs) */
    int64_t amx_direct_o; /* 1: AMX prompts write their rows of a bf16 o projection's input themselves; 0: float32
                             rows, rounded by its prepare_row like every other row's (A/B runs and tests) */
} tm_model;

/* [*start, *end): share i of n of `rows` rows, contiguous and differing by at most one (sharding.py's even_share). */
static void row_share(int64_t rows, int64_t i, int64_t n, int64_t *start, int64_t *end) {
    const int64_t base = rows / n, extra = rows % n;
    *start = i * base + (i < extra ? i : extra);
    *end = *start + base + (i < extra ? 1 : 0);
}

/* Whether this rank attends any of rows [first, first + count) of local KV head h's group (of `rows` in the step). */
static int owns_any_row(const tm_model *m, int64_t h, int64_t first, int64_t count, int64_t rows) {
    if (m->kv_row_shares == NULL || m->kv_row_shares[2 * h + 1] <= 1) return 1;
    int64_t start, end;
    row_share(rows, m->kv_row_shares[2 * h], m->kv_row_shares[2 * h + 1], &start, &end);
    return first < end && first + count > start;
}

static int owns_row(const tm_model *m, int64_t h, int64_t row, int64_t rows) {
    return owns_any_row(m, h, row, 1, rows);
}

/* The products a rank with shared KV groups (kv_row_shares) can skip in a step of R rows: a shared group's query
 * columns of qkv are needed only in the rows the rank attends for it, and o_proj's inputs of shared groups are zero
 * in the rows it attends for none of them. A rank lists its own groups first (sharding.py), so those rows need only
 * o_proj's first inputs. Row ranges are widened to whole 16-row blocks (AMX tiles start there); the extra rows are
 * computed as before (exact: zero inputs, or query rows nobody reads). */
#define TM_MAX_SHARED 4
typedef struct {
    int64_t count;                    /* qkv column ranges [col0, col1) computed for rows [row0, row1) only */
    int64_t col0[TM_MAX_SHARED], col1[TM_MAX_SHARED], row0[TM_MAX_SHARED], row1[TM_MAX_SHARED];
    int64_t o_k_len;                  /* o_proj: rows outside [full0, full1) take its first o_k_len inputs; 0: all */
    int64_t full0, full1;
} shared_rows;

static void plan_shared_rows(const tm_model *m, int64_t rows, shared_rows *s) {
    memset(s, 0, sizeof(*s));
    if (m->kv_row_shares == NULL) return;
    const int64_t width = m->num_heads / m->num_kv_heads * m->head_dim; /* a group's query columns */
    int64_t last_own = -1, full0 = rows, full1 = 0, shared = 0;
    for (int64_t h = 0; h < m->num_kv_heads; ++h) {
        if (m->kv_row_shares[2 * h + 1] <= 1) {
            last_own = h;
            continue;
        }
        int64_t start, end;
        row_share(rows, m->kv_row_shares[2 * h], m->kv_row_shares[2 * h + 1], &start, &end);
        if (start < end) { /* widened to whole 16-row blocks; an empty share stays empty */
            start = start / 16 * 16;
            end = (end + 15) / 16 * 16 < rows ? (end + 15) / 16 * 16 : rows;
        } else {
            start = end = 0;
        }
        ++shared;
        if (start < end) {
            full0 = start < full0 ? start : full0;
            full1 = end > full1 ? end : full1;
        }
        if (s->count < TM_MAX_SHARED) {
            const int64_t i = s->count++;
            s->col0[i] = h * width, s->col1[i] = (h + 1) * width, s->row0[i] = start, s->row1[i] = end;
        }
    }
    if (shared > 0 && last_own >= 0) {
        s->o_k_len = (last_own + 1) * width;
        s->full0 = full0 < full1 ? full0 : 0;
        s->full1 = full0 < full1 ? full1 : 0;
    }
}

/* [*lo, *hi): the rows of [m0, m0 + rows) that columns [c0, c1) of a projection are computed for. */
static inline void rows_for_columns(const shared_rows *s, int64_t c0, int64_t c1, int64_t m0, int64_t rows,
                                    int64_t *lo, int64_t *hi) {
    *lo = m0, *hi = m0 + rows;
    if (s == NULL) return;
    for (int64_t i = 0; i < s->count; ++i)
        if (c0 >= s->col0[i] && c1 <= s->col1[i]) {
            *lo = s->row0[i] > m0 ? s->row0[i] : m0;
            *hi = s->row1[i] < m0 + rows ? s->row1[i] : m0 + rows;
            return;
        }
}

/* Segments of rows [m0, m0 + rows) with the inputs each takes (k_full, or the shared_rows' o_k_len rounded up to
 * `align` outside its full rows): up to 3, returns how many. */
static inline int input_segments(const shared_rows *s, int64_t k_full, int64_t align, int64_t m0, int64_t rows,
                                 int64_t seg0[3], int64_t seg1[3], int64_t k_len[3]) {
    const int64_t end = m0 + rows;
    if (s == NULL || s->o_k_len <= 0) {
        seg0[0] = m0, seg1[0] = end, k_len[0] = k_full;
        return 1;
    }
    int64_t prefix = (s->o_k_len + align - 1) / align * align;
    prefix = prefix < k_full ? prefix : k_full;
    /* [full0, full1) clamped to [m0, end): ascending, as full0 <= full1 (plan_shared_rows) */
    const int64_t cut[4] = {m0, s->full0 > m0 ? (s->full0 < end ? s->full0 : end) : m0,
                            s->full1 > m0 ? (s->full1 < end ? s->full1 : end) : m0, end};
    int count = 0;
    for (int i = 0; i < 3; ++i) {
        if (cut[i] >= cut[i + 1]) continue;
        seg0[count] = cut[i], seg1[count] = cut[i + 1], k_len[count] = i == 1 ? k_full : prefix;
        ++count;
    }
    return count;
}

/* Per-row input of a projection: for int8, row x quantized (and rotated) into u / low / step; for
 * int4, into int16 groups (in the same buffer as u) with their group_step / group_sum, or, at a step whose int4
 * products run on the bf16 units (int4_bf16), bf16 rows as for bf16 weights. */
typedef struct {
    uint8_t *u;   /* [num_rows, k_pad] bytes, or [num_rows, k_pad] int16 for int4 */
    float *low;   /* [num_rows] */
    float *step;  /* [num_rows] */
    float *group_step, *group_sum; /* [num_rows, k_pad / 32] each */
    int64_t k_pad;
    int64_t bf16_stride; /* bf16: u's x_stride (bf16_panels.h): k_pad (rows), or BF16_TILED where the products run
                            on AMX tiles (blocks of each projection's own k_pad) */
    int int4_bf16;       /* this step multiplies int4 weights as dequantized bf16 panels */
    uint16_t *int4_panels; /* with int4_bf16: per thread, int4_panel_stride elements for one pair of panels */
    int64_t int4_panel_stride;
    int prefetch_weights; /* the model's prefetch_weights */
} quantized_rows;

/* 1 when projection l multiplies bf16 rows on the bf16 units at this step: bf16 weights, or int4 ones at an int4_bf16
 * step. */
static inline int multiplies_in_bf16(const tm_linear *l, const quantized_rows *qr) {
    return l->format == TM_BF16 || (l->format == TM_INT4 && qr->int4_bf16);
}

/* The calling thread's scratch for an int4 projection's pair of dequantized panels (bf16_out.pair_panels). */
static inline uint16_t *own_int4_panels(const quantized_rows *qr) {
    return qr->int4_panels + omp_get_thread_num() * qr->int4_panel_stride;
}

static inline void prepare_row(const tm_linear *l, const float *x_row, int64_t m, quantized_rows *qr, float *scratch) {
    const int64_t g_stride = qr->k_pad / INT4_GROUP;
    if (l->format == TM_INT8)
        qr->low[m] = quantize_row(x_row, l->k, l->rotation_block, scratch, qr->u + m * qr->k_pad, &qr->step[m],
                                  l->levels);
    else if (multiplies_in_bf16(l, qr))
        bf16_store_x_row((uint16_t *)qr->u, qr->bf16_stride, bf16_k_pad(l->k), m, x_row, l->k);
    else if (l->format == TM_INT4)
        int4_quantize_row(x_row, l->k, (int16_t *)qr->u + m * qr->k_pad, qr->group_step + m * g_stride,
                          qr->group_sum + m * g_stride);
}

static inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

/* A projection's input rows are kept in L2 while every panel passes over them (int8_gemm.c's and f32_gemm.c's
 * blocking): more rows are taken in chunks of the model's row_chunk_bytes (half the core's L2, from the
 * caller), each chunk streaming the weights once more. Steps of up to UNCHUNKED_ROWS rows (decode batches)
 * take all rows at once: their weights stream from memory once. */
#define UNCHUNKED_ROWS 64

/* Rows per chunk of `bytes_per_row` for a step of num_rows rows: a multiple of `tile` rows (at least one), the
 * chunks as even as that allows (270 rows in budgets of 256: 160 + 110, not 256 + 14, whose small remainder would
 * stream every weight once more for a few rows, on the slow tail path). */
static inline int64_t rows_per_chunk(int64_t chunk_bytes, int64_t bytes_per_row, int64_t tile, int64_t num_rows) {
    if (num_rows <= UNCHUNKED_ROWS) return num_rows > 0 ? num_rows : 1;
    int64_t rows = chunk_bytes / bytes_per_row / tile * tile;
    rows = rows < tile ? tile : rows;
    const int64_t chunks = (num_rows + rows - 1) / rows;
    return round_up((num_rows + chunks - 1) / chunks, tile);
}

/* y [num_rows, n] = x [num_rows, k] (row stride k) through l; x already prepared (prepare_row) for int8, int4 and
 * bf16. accumulate (bf16 weights only, adds_into_residual): y += the product instead. columns, inputs: NULL, or the
 * products this rank may skip (shared_rows): qkv's column ranges restricted to row ranges (float32, int8 and bf16
 * panels; y's rows left out of a range are not written), o_proj's input prefix outside its full rows (float32 and
 * bf16); other formats compute everything.
 * A worksharing loop: every thread of the region must call it; it ends with a barrier. */
static void linear_phase(const tm_linear *l, float *y, const float *x, const quantized_rows *qr, int64_t num_rows,
                         int64_t chunk_bytes, int accumulate, const shared_rows *columns, const shared_rows *inputs) {
    const int64_t n = l->n;
    int64_t seg0[3], seg1[3], k_len[3], lo, hi;
    if (l->format == TM_FLOAT32) {
        const int64_t chunk = rows_per_chunk(chunk_bytes, l->k * (int64_t)sizeof(float), PANEL_ROWS, num_rows);
        for (int64_t m0 = 0; m0 < num_rows; m0 += chunk) {
            const int64_t rows = num_rows - m0 < chunk ? num_rows - m0 : chunk;
            const int segments = input_segments(inputs, l->k, 1, m0, rows, seg0, seg1, k_len);
#pragma omp for schedule(guided, PANELS_PER_GRAB) nowait
            for (int64_t p = 0; p < num_panels(n); ++p) {
                rows_for_columns(columns, p * PANEL, (p + 1) * PANEL < n ? (p + 1) * PANEL : n, m0, rows, &lo, &hi);
                for (int i = 0; i < segments; ++i) {
                    const int64_t a = seg0[i] > lo ? seg0[i] : lo, b = seg1[i] < hi ? seg1[i] : hi;
                    if (a < b)
                        panel_rows(y + a * n, n, x + a * l->k, l->k, (const float *)l->weight, l->bias, n, l->k,
                                   k_len[i], b - a, p);
                }
            }
        }
#pragma omp barrier
    } else if (l->format == TM_INT8) {
        /* whole tiles of every int8 tile: AMX row blocks (16 rows, or one partial block of a decode batch, where
         * the CPU has AMX-INT8), the AVX2 tile (5 rows) and the paired one (4) */
        const int amx_rows = int8_amx_rows(num_rows, l->k);
#if TM_HAVE_AMX_INT8
        if (amx_rows) bf16_amx_load_config_rows(amx_rows);
#endif
        const int64_t np = int8_num_panels(n), pairs = (np + 1) / 2;
        const int64_t chunk =
            rows_per_chunk(chunk_bytes, round_up(l->k, K_ALIGN), 160 /* 32, 5 and 4 divide it */, num_rows);
        for (int64_t m0 = 0; m0 < num_rows; m0 += chunk) {
            const int64_t rows = num_rows - m0 < chunk ? num_rows - m0 : chunk;
#pragma omp for schedule(guided, PANELS_PER_GRAB / 2) nowait
            for (int64_t q = 0; q < pairs; ++q) {
                const int64_t c1 = (2 * q + 2) * 16 < n ? (2 * q + 2) * 16 : n;
                rows_for_columns(columns, 2 * q * 16, c1, m0, rows, &lo, &hi);
                if (lo < hi)
                    int8_panel_rows_amx(y, n, qr->u, qr->k_pad, qr->low, qr->step, (const int8_t *)l->weight,
                                        l->scale, l->rowsum, l->bias, n, l->k, lo, hi - lo, 2 * q,
                                        2 * q + 1 < np ? 2 : 1, l->levels, amx_rows, 2 * q + 2,
                                        qr->prefetch_weights ? next_pair_panels(np, q) : 0);
            }
        }
#pragma omp barrier
#if TM_HAVE_AMX_INT8
        if (amx_rows) _tile_release();
#endif
    } else if (multiplies_in_bf16(l, qr)) {
        /* AMX 16-row blocks where the CPU has them (each thread configures its tiles for the phase). int4 weights:
         * each grab dequantizes its pair of panels into the thread's scratch first (kp == k: k % 64 == 0). */
        const int int4 = l->format == TM_INT4;
        const int amx_rows = bf16_amx_rows(num_rows);
#if TM_HAVE_AMX
        if (amx_rows) bf16_amx_load_config_rows(amx_rows);
#endif
        const int64_t np = bf16_num_panels(n), pairs = (np + 1) / 2, kp = bf16_k_pad(l->k);
        const int64_t chunk = rows_per_chunk(chunk_bytes, kp * 2, 32, num_rows);
        bf16_out out = bf16_plain_out(y, 0, n, l->bias);
        out.accumulate = accumulate;
        out.pair_panels = int4 ? own_int4_panels(qr) : NULL;
        bf16_pending pend;
        pend.blocks = 0;
        for (int64_t m0 = 0; m0 < num_rows; m0 += chunk) {
            const int64_t rows = num_rows - m0 < chunk ? num_rows - m0 : chunk;
            const int segments = input_segments(inputs, kp, BF16_K_BLOCK, m0, rows, seg0, seg1, k_len);
#pragma omp for schedule(guided, PANELS_PER_GRAB / 2) nowait
            for (int64_t q = 0; q < pairs; ++q) {
                const int64_t c0 = 2 * q * BF16_PANEL, c1 = c0 + 2 * BF16_PANEL < n ? c0 + 2 * BF16_PANEL : n;
                rows_for_columns(columns, c0, c1, m0, rows, &lo, &hi);
                if (int4 && lo < hi) /* pend (AMX) keeps the last pass's sums, not its weights */
                    int4_bf16_pair((uint16_t *)out.pair_panels, (const uint8_t *)l->weight, l->group_scale,
                                   l->group_min, round_up(n, INT4_CHANNELS), l->k, 2 * q,
                                   2 * q + 1 < np ? 2 * q + 1 : -1);
                for (int i = 0; i < segments; ++i) {
                    const int64_t a = seg0[i] > lo ? seg0[i] : lo, b = seg1[i] < hi ? seg1[i] : hi;
                    if (a < b)
                        bf16_panel_rows(&out, (const uint16_t *)qr->u, qr->bf16_stride,
                                        int4 ? NULL : (const uint16_t *)l->weight, kp, k_len[i], a, b - a, 2 * q,
                                        2 * q + 1 < np ? 2 : 1, amx_rows,
                                        q + 1 < pairs && !int4 && qr->prefetch_weights ? 2 * q + 2 : -1, 1,
                                        &pend);
                }
            }
        }
        bf16_flush(&pend);
#pragma omp barrier
#if TM_HAVE_AMX
        if (amx_rows) _tile_release();
#endif
    } else {
#pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < n; n0 += INT4_CHANNELS) {
            int4_output_block(y, n, (const int16_t *)qr->u, qr->k_pad, qr->group_step, qr->group_sum,
                              qr->k_pad / INT4_GROUP, (const uint8_t *)l->weight, l->group_scale, l->group_min, n0,
                              n, num_rows, l->k);
            if (l->bias != NULL)
                for (int64_t m = 0; m < num_rows; ++m)
                    for (int64_t j = n0; j < n0 + INT4_CHANNELS && j < n; ++j) y[m * n + j] += l->bias[j];
        }
    }
}

/* 1 when a layer's MLP runs fused (gate_up_silu_phase): gate/up and down projections multiplied as bf16 (bf16
 * weights, or int4 ones at an int4_bf16 step), no gate/up bias, the intermediate size in whole 32-input blocks (so
 * the down projection reads no padding). */
static inline int fused_mlp(const tm_layer *ly, int64_t intermediate, const quantized_rows *qr) {
    return multiplies_in_bf16(&ly->gate_up, qr) && multiplies_in_bf16(&ly->down, qr) && ly->gate_up.bias == NULL &&
           intermediate % BF16_K_BLOCK == 0;
}

/* h bf16 (h_stride: qr's bf16_stride, rows of qr's k_pad or tiles of h_k_pad) = silu(x W_gate^T) * (x W_up^T), the
 * down projection's input [num_rows, h_k_pad], for a fused MLP
 * (fused_mlp): each pass takes a gate panel and the up panel of the same channels (I / 16 panels apart in
 * gate_up's [gate; up] packing) and writes their product, so the float32 gate/up rows are never stored.
 * x: qr's bf16 rows (prepare_row). A worksharing loop like linear_phase (ends with a barrier). */
static void gate_up_silu_phase(const tm_linear *l, uint16_t *h, int64_t h_stride, int64_t h_k_pad,
                               const quantized_rows *qr, int64_t num_rows, int64_t chunk_bytes) {
    const int int4 = l->format == TM_INT4; /* each grab dequantizes its gate panel and up panel first */
    const int amx_rows = bf16_amx_rows(num_rows);
#if TM_HAVE_AMX
    if (amx_rows) bf16_amx_load_config_rows(amx_rows);
#endif
    const int64_t half = bf16_num_panels(l->n) / 2, kp = bf16_k_pad(l->k);
    const bf16_out out = {NULL, 0, l->n, NULL, h, h_stride, h_k_pad, half, NULL, NULL, 0,
                          int4 ? own_int4_panels(qr) : NULL};
    const int64_t chunk = rows_per_chunk(chunk_bytes, kp * 2, 32, num_rows);
    bf16_pending pend;
    pend.blocks = 0;
    for (int64_t m0 = 0; m0 < num_rows; m0 += chunk) {
        const int64_t rows = num_rows - m0 < chunk ? num_rows - m0 : chunk;
#pragma omp for schedule(guided, PANELS_PER_GRAB / 2) nowait
        for (int64_t q = 0; q < half; ++q) {
            if (int4)
                int4_bf16_pair((uint16_t *)out.pair_panels, (const uint8_t *)l->weight, l->group_scale, l->group_min,
                               l->n, l->k, q, q + half);
            bf16_panel_rows(&out, (const uint16_t *)qr->u, qr->bf16_stride, int4 ? NULL : (const uint16_t *)l->weight,
                            kp, kp, m0, rows, q, 2, amx_rows, q + 1 < half && !int4 && qr->prefetch_weights ? q + 1 : -1,
                            1, &pend);
        }
    }
    bf16_flush(&pend);
#pragma omp barrier
#if TM_HAVE_AMX
    if (amx_rows) _tile_release();
#endif
}

/* 1 when a layer's int8 MLP runs fused (int8_gate_up_silu_phase): int8 gate/up and down projections, the intermediate
 * size in whole panels (so gate_up's up half starts at a panel: [gate; up] panel-packed as one projection). */
static inline int int8_fused_mlp(const tm_layer *ly, int64_t intermediate) {
    return ly->gate_up.format == TM_INT8 && ly->down.format == TM_INT8 && intermediate % I8_PANEL == 0;
}

/* Rows an int8 fused MLP's grab takes at a time into its thread's scratch ([SILU_ROWS][4 panels of 16]: the gate and
 * up outputs of two panels of channels, 40 KiB); a multiple of every int8 tile's rows (AMX 16 and 32, VNNI 8, AVX2 5,
 * paired 4). */
#define SILU_ROWS 160

/* h [num_rows, intermediate] float32 (row stride h_stride) = silu(x W_gate^T) * (x W_up^T) for an int8 fused MLP
 * (int8_fused_mlp): each grab takes two panels of channels, their gate panels and their up panels (intermediate / 16
 * panels later in gate_up's [gate; up] packing) over SILU_ROWS rows at a time into the thread's scratch, through the
 * same tiles as linear_phase (the same sums and epilogue: the same float32 gate and up values), and writes their
 * silu product: the float32 gate/up rows [num_rows, 2 * intermediate] are never stored and read back (at a 2048-row
 * prompt step 25 MB past the L3 here). x: qr's quantized rows. A worksharing loop like linear_phase (ends with a
 * barrier). */
static void int8_gate_up_silu_phase(const tm_linear *l, float *h, int64_t h_stride, const quantized_rows *qr,
                                    int64_t num_rows, int64_t intermediate, float *scratch, int64_t chunk_bytes) {
    const int amx_rows = int8_amx_rows(num_rows, l->k);
#if TM_HAVE_AMX_INT8
    if (amx_rows) bf16_amx_load_config_rows(amx_rows);
#endif
    const int64_t half = intermediate / I8_PANEL, pairs = (half + 1) / 2;
    const int64_t panel_bytes = int8_quads(l->k) * I8_PANEL * I8_QUAD, stride = 4 * I8_PANEL;
    const int64_t chunk = rows_per_chunk(chunk_bytes, round_up(l->k, K_ALIGN), 160, num_rows);
    for (int64_t m0 = 0; m0 < num_rows; m0 += chunk) {
        const int64_t rows = num_rows - m0 < chunk ? num_rows - m0 : chunk;
#pragma omp for schedule(guided, PANELS_PER_GRAB / 2) nowait
        for (int64_t q = 0; q < pairs; ++q) {
            const int64_t num = 2 * q + 1 < half ? 2 : 1, width = num * I8_PANEL;
            for (int64_t r0 = m0; r0 < m0 + rows; r0 += SILU_ROWS) {
                const int64_t n_rows = m0 + rows - r0 < SILU_ROWS ? m0 + rows - r0 : SILU_ROWS;
                /* the last rows of the pass prefetch this side's next pair: 2 panels on from `first` */
                const int64_t next_num =
                    r0 + SILU_ROWS >= m0 + rows && qr->prefetch_weights ? next_pair_panels(half, q) : 0;
                for (int64_t side = 0; side < 2; ++side) { /* gate panels into columns 0 .., up panels into 32 .. */
                    const int64_t first = side * half + 2 * q, c = first * I8_PANEL;
                    int8_panel_rows_amx(scratch + side * 2 * I8_PANEL, stride, qr->u + r0 * qr->k_pad, qr->k_pad,
                                        qr->low + r0, qr->step + r0, (const int8_t *)l->weight + first * panel_bytes,
                                        l->scale + c, l->rowsum + c, l->bias == NULL ? NULL : l->bias + c, width,
                                        l->k, 0, n_rows, 0, num, l->levels, amx_rows, 2, next_num);
                }
                for (int64_t r = 0; r < n_rows; ++r)
                    silu_mul_row(h + (r0 + r) * h_stride + 2 * q * I8_PANEL, scratch + r * stride,
                                 scratch + r * stride + 2 * I8_PANEL, width);
            }
        }
    }
#pragma omp barrier
#if TM_HAVE_AMX_INT8
    if (amx_rows) _tile_release();
#endif
}

/* 1 when projection l adds its output straight into the residual stream (linear_phase's accumulate, bf16
 * products): the float32 [rows, hidden] output is then never written and read back by the next per-row pass, which
 * at prompt steps streams through L3 (2048 rows: 4.7 MB an array). */
static inline int adds_into_residual(const tm_model *m, const tm_linear *l, const quantized_rows *qr) {
    return multiplies_in_bf16(l, qr) && m->tp_world <= 1; /* a rank's partial output is summed over the ranks first */
}

/* Where a normed row for projection l goes: x's row when l reads float32 rows (TM_FLOAT32), else the thread's
 * scratch row, which prepare_row reads at once from L1 (x's row would be written back through L2 and L3 unread). */
static inline float *norm_row_for(const tm_linear *l, float *x_row, float *scratch_row) {
    return l->format == TM_FLOAT32 ? x_row : scratch_row;
}

/* res[0 .. n) += a sublayer's output rows: `count` arrays `stride` floats apart summed first, (p0 + p1) + p2 ...,
 * as shm_all_reduce sums the ranks' slots (the same bits as that sum added after), or one array (count 1). */
static inline void add_sublayer_row(float *res, const float *first, int64_t count, int64_t stride, int64_t n) {
    if (count == 1) {
        for (int64_t i = 0; i < n; ++i) res[i] += first[i];
        return;
    }
    const float *second = first + stride;
    if (count == 2) {
        for (int64_t i = 0; i < n; ++i) res[i] += first[i] + second[i];
        return;
    }
    for (int64_t i = 0; i < n; ++i) {
        float sum = first[i] + second[i];
        for (int64_t c = 2; c < count; ++c) sum += first[c * stride + i];
        res[i] += sum;
    }
}

/* The step's prompts that attend on AMX tiles: those of 2 or more rows and at most max_rows keys that the kernel
 * takes, whole-context ones (no cached prefix) only unless from_cache (their K/V read from a KV_BF16 cache, cached
 * prefix and all). amx_lens [2 * num_reqs] (caller's): per request its rows there or 0, then q_lens with those set to
 * 0 (what the other tasks take). */
static void select_amx_prompts(int64_t *amx_lens, const int64_t *q_lens, const int64_t *seq_lens, int64_t num_reqs,
                               int64_t max_rows, int64_t head_dim, int from_cache) {
    for (int64_t r = 0; r < num_reqs; ++r) {
        const int64_t t = q_lens[r], keys = seq_lens[r];
        const int on_amx =
            t > 1 && (t == keys || from_cache) && keys <= max_rows && amx_attention_fits(head_dim, keys);
        amx_lens[r] = on_amx ? t : 0;
        amx_lens[num_reqs + r] = on_amx ? 0 : t;
    }
}

/* hidden: in, the embeddings of the step's tokens [num_rows, hidden]; out, the final normed hidden
 * states. Row t's token sits at positions[t] and writes its K/V to cache slot slots[t]. Request r (of
 * num_reqs) owns rows q_starts[r] .. + q_lens[r] - 1, attending over its seq_lens[r] positions through
 * block_tables[r * table_stride ...].
 * keep_rows: NULL (num_keep < 0: every row), or the num_keep rows, ascending, whose final hidden states the caller
 * reads (a prompt's last row, where it samples): the last layer takes only those rows past its attention (every
 * row's K/V is still written), and hidden's other rows are left undefined.
 * phase_seconds: NULL, or [TM_NUM_PHASES] to which each phase's wall time is added (thread 0's clock between
 * the barriers that end the phases).
 * Returns 0; 1 when scratch memory could not be allocated; 2 when head_dim % 8 != 0 (hidden untouched); 3 when a
 * tensor-parallel all-reduce failed (a rank died, or did not arrive within tp_timeout_s, or the rows exceed
 * tp_capacity). */
int tm_step_forward(const tm_model *m, float *hidden, const int64_t *positions, const int64_t *slots, int64_t num_rows,
                   const int64_t *q_starts, const int64_t *q_lens, const int64_t *seq_lens, const int64_t *block_tables,
                   int64_t table_stride, int64_t num_reqs, const int64_t *keep_rows, int64_t num_keep,
                   int num_threads, double *phase_seconds) {
    const int64_t R = num_rows, N = num_reqs, H = m->hidden, D = m->head_dim, I = m->intermediate;
    const int64_t num_heads = m->num_heads, num_kv_heads = m->num_kv_heads, group = num_heads / num_kv_heads;
    const int64_t q_size = num_heads * D, kv_size = num_kv_heads * D, qkv_n = q_size + 2 * kv_size;
    if (D % LANES != 0) return 2;
    const int pure_decode = R == N; /* every request has one row */
    int64_t max_k = H > I ? H : I;
    max_k = max_k > q_size ? max_k : q_size;
    const int64_t k_pad = round_up(max_k, K_ALIGN);
    /* int4 products on the bf16 units at this step: each thread's pair of dequantized panels, 2 x max_k x 16 bf16 */
    const int int4_bf16 = m->int4_bf16_min_rows > 0 && R >= m->int4_bf16_min_rows;
    const int64_t int4_panel_floats = max_k * BF16_PANEL;
    /* Per thread: the attention's scratch (decode scores, or a prefill_tile.h block's), the rotation's, one normed
     * row (norm_row_for), then int8_gate_up_silu_phase's gate and up rows. */
    int64_t max_decode_seq = 1; /* the longest context of a one-row request: its attend_one scores */
    for (int64_t r = 0; r < N; ++r)
        if (q_lens[r] == 1) max_decode_seq = seq_lens[r] > max_decode_seq ? seq_lens[r] : max_decode_seq;
    const int64_t decode_scratch = group * amx_score_row(max_decode_seq, m->block_size);
    const int64_t attention_scratch =
        pure_decode ? decode_scratch
                    : (decode_scratch > prefill_scratch_floats(group, D) ? decode_scratch
                                                                         : prefill_scratch_floats(group, D));
    const int64_t per_thread = round_up(attention_scratch + max_k + H + SILU_ROWS * 4 * I8_PANEL, 16);
    /* Split-K attention (fewer than 2 (request, KV head) tasks per thread): ranges per (request, KV head). */
    const int64_t max_splits =
        pure_decode ? (2 * (int64_t)num_threads + N * num_kv_heads - 1) / (N * num_kv_heads) : 0;
    /* Any other step: prompts on AMX tiles where the model allows (amx_lens, amx; whole-context ones only unless
     * amx_from_cache), one-row requests (decode rows beside the prompts) as a decode step's (request, KV head) tasks
     * (decode_reqs), the rest prefill_tile.h's tasks (task_q_lens: those of the other two, 0). */
    int64_t *amx_lens = NULL, *decode_reqs = NULL, num_decode_reqs = 0;
    amx_prompt_plan amx = {0};
    /* A KV_BF16 cache of 16-position multiples on AMX tiles: the prompts read their K/V from it (written by the
     * rotary phase before attention), a cached prefix included; else from the step's rows, whole-context only. */
    const int amx_from_cache = TM_HAVE_AMX_ATTENTION && m->kv_type == KV_BF16 && m->block_size % 16 == 0 &&
                               bf16_amx_ready() && m->amx_cache_prompts;
    uint8_t *amx_row = NULL; /* per row: 1 when its request attends on AMX tiles */
    if (!pure_decode) {
        amx_lens = (int64_t *)malloc((size_t)N * 3 * sizeof(int64_t) + (size_t)R);
        if (amx_lens == NULL) return 1;
        decode_reqs = amx_lens + 2 * N;
        amx_row = (uint8_t *)(amx_lens + 3 * N);
        select_amx_prompts(amx_lens, q_lens, seq_lens, N, m->amx_attention_max_rows, D, amx_from_cache);
        for (int64_t r = 0; r < N; ++r)
            if (q_lens[r] == 1) {
                decode_reqs[num_decode_reqs++] = r;
                amx_lens[N + r] = 0;
            }
        if (m->amx_attention_max_rows > 0 && amx_plan_prompts(&amx, amx_lens, amx_from_cache ? seq_lens : amx_lens, N,
                                                              num_kv_heads, D, num_threads, amx_from_cache) != 0) {
            free(amx_lens);
            return 1;
        }
        memset(amx_row, 0, (size_t)R);
        for (int64_t r = 0; r < N; ++r)
            if (amx_lens[r] > 0) memset(amx_row + q_starts[r], 1, (size_t)amx_lens[r]);
    }
    const int64_t *task_q_lens = amx_lens != NULL ? amx_lens + N : q_lens;
    const int64_t num_tasks = pure_decode ? 0 : prefill_num_tasks(task_q_lens, N, num_kv_heads);
    attention_task *tasks = NULL;
    if (num_tasks > 0) {
        tasks = (attention_task *)malloc((size_t)num_tasks * sizeof(attention_task));
        if (tasks == NULL) {
            amx_free_prompt_plan(&amx), free(amx_lens);
            return 1;
        }
        prefill_tasks(tasks, task_q_lens, N, num_kv_heads);
    }

    /* One allocation, 64-byte aligned pieces (sizes in floats, each a multiple of 16). */
    /* The bf16 inputs (u, and x when it holds a fused MLP's bf16 h rows) are readable up to whole 16-row blocks
     * (bf16_panel_rows' rows_padded): R16 rows. */
    const int64_t R16 = round_up(R, 16), x_floats = R * max_k > R16 * k_pad / 2 ? R * max_k : R16 * k_pad / 2;
    const int64_t sizes[] = {R * H /* residual */, x_floats /* x */, R * qkv_n, R * q_size /* q */,
                             R * q_size /* attention out */, R * 2 * I /* gate_up */, R * H /* sublayer out */,
                             2 * R /* low, step */, R16 * k_pad / 2 /* u: int8 bytes, int4's int16 or bf16 */,
                             per_thread * num_threads, R * num_heads * max_splits * (D + 2) /* attention partials */,
                             2 * R * k_pad / INT4_GROUP /* group_step, group_sum */,
                             int4_bf16 ? num_threads * int4_panel_floats : 0 /* int4 panels, per thread */};
    const int num_pieces = (int)(sizeof(sizes) / sizeof(sizes[0]));
    int64_t total = 0;
    for (int i = 0; i < num_pieces; ++i) total += round_up(sizes[i], 16);
    float *arena = (float *)aligned_alloc(64, (size_t)total * sizeof(float));
    if (arena == NULL) {
        free(tasks), free(amx_lens);
        amx_free_prompt_plan(&amx);
        return 1;
    }
    float *piece[13];
    int64_t offset = 0;
    for (int i = 0; i < num_pieces; offset += round_up(sizes[i], 16), ++i) piece[i] = arena + offset;
    float *residual = piece[0], *x = piece[1], *qkv = piece[2], *q = piece[3], *attn = piece[4], *gate_up = piece[5];
    float *out = piece[6], *thread_scratch = piece[9], *partials = piece[10];
    quantized_rows qr = {(uint8_t *)piece[8], piece[7], piece[7] + R, piece[11], piece[11] + R * k_pad / INT4_GROUP,
                         k_pad, bf16_amx_rows(R) ? BF16_TILED : k_pad, int4_bf16, (uint16_t *)piece[12],
                         2 * int4_panel_floats, (int)m->prefetch_weights};
    const int64_t slots_per_head = m->num_blocks * m->block_size;
    shared_rows skip; /* the products this rank's share of the shared groups' rows lets it skip */
    plan_shared_rows(m, R, &skip);
    int tp_failed = 0; /* an all-reduce failed (a rank did not arrive in time): the later ones are skipped */
    /* The sum of a row-parallel projection's outputs over the ranks goes through their shared slots in place where
     * a step's rows fit one (TP_SUM); the last sublayer output is then sub_count arrays sub_stride floats apart. */
    const int tp_in_place = m->tp_world > 1 && R * H <= m->tp_capacity;
    const float *sub_first = out;
    int64_t sub_count = 1, sub_stride = 0;

#pragma omp parallel num_threads(num_threads)
    {
        float *scores = thread_scratch + per_thread * omp_get_thread_num(); /* the attention's scratch */
        float *rotation_scratch = scores + attention_scratch, *norm_row = rotation_scratch + max_k;
        float *silu_scratch = norm_row + H; /* int8_gate_up_silu_phase's */
        const int timing = phase_seconds != NULL && omp_get_thread_num() == 0;
        int64_t rows = R; /* the rows past attention: R, in the last layer num_keep when keep_rows is given */
        double mark = timing ? omp_get_wtime() : 0.0;
/* After a worksharing loop's closing barrier: the time since the previous mark goes to `phase`. */
#define END_PHASE(phase)                         \
    if (timing) {                                \
        const double now_ = omp_get_wtime();     \
        phase_seconds[phase] += now_ - mark;     \
        mark = now_;                             \
    }
/* Tensor parallelism: the row-parallel projection's partial output (count floats) summed over the ranks, by one
 * thread while the others wait at the single's closing barrier. In place (tp_in_place): the projection wrote it
 * into this rank's slot of the next collective (SUBLAYER_DST), which is published, and once every rank's is, the
 * sum is read from the slots by the next per-row pass (sub_*); else `out` is all-reduced. */
#define TP_SUM(count)                                                                                          \
    if (m->tp_world > 1) {                                                                                     \
        _Pragma("omp single") if (!tp_failed) {                                                                \
            const uint64_t seq_ = ++*m->tp_seq;                                                                \
            if (tp_in_place) {                                                                                 \
                shm_publish(m->tp_segment, (int)m->tp_rank, seq_);                                             \
                tp_failed = shm_wait(m->tp_segment, 0, (int)m->tp_world, seq_, m->tp_timeout_s) != 0;          \
                sub_first = shm_slot(m->tp_segment, (int)m->tp_world, m->tp_capacity, seq_, 0);                \
                sub_count = m->tp_world, sub_stride = m->tp_capacity;                                          \
            } else {                                                                                           \
                tp_failed = shm_all_reduce(m->tp_segment, (int)m->tp_rank, (int)m->tp_world, m->tp_capacity,  \
                                           out, (count), seq_, m->tp_timeout_s) != 0;                          \
            }                                                                                                  \
        }                                                                                                      \
        END_PHASE(TM_PHASE_ALL_REDUCE)                                                                         \
    }
/* Where a row-parallel projection writes (not adding into the residual): this rank's slot of the next all-reduce
 * (tp_in_place), else out. Read after a barrier that follows the last change of *tp_seq: the same on every thread. */
#define SUBLAYER_DST() (tp_in_place ? shm_slot(m->tp_segment, (int)m->tp_world, m->tp_capacity, *m->tp_seq + 1, \
                                               (int)m->tp_rank) : out)
        if (tp_in_place) { /* the first in-place sum's slots: free once every rank has finished the last collective */
#pragma omp single
            tp_failed = shm_wait(m->tp_segment, 0, (int)m->tp_world, *m->tp_seq, m->tp_timeout_s) != 0;
        }
        for (int64_t l = 0; l < m->num_layers; ++l) {
            const tm_layer *ly = &m->layers[l];
#pragma omp for schedule(static)
            for (int64_t r = 0; r < R; ++r) {
                float *res = residual + r * H;
                if (l == 0)
                    memcpy(res, hidden + r * H, (size_t)H * sizeof(float));
                else if (!adds_into_residual(m, &m->layers[l - 1].down, &qr))
                    add_sublayer_row(res, sub_first + r * H, sub_count, sub_stride, H);
                float *normed = norm_row_for(&ly->qkv, x + r * H, norm_row);
                rms_norm_row(normed, res, ly->input_norm, m->eps, H);
                prepare_row(&ly->qkv, normed, r, &qr, rotation_scratch);
            }
            END_PHASE(TM_PHASE_ROWS)
            linear_phase(&ly->qkv, qkv, x, &qr, R, m->row_chunk_bytes, 0, skip.count > 0 ? &skip : NULL, NULL);
            END_PHASE(TM_PHASE_PROJECTIONS)

#pragma omp for schedule(static)
            for (int64_t r = 0; r < R; ++r) {
                const float *c = m->rope_cos + positions[r] * D, *s = m->rope_sin + positions[r] * D;
                float *row = qkv + r * qkv_n, *k = row + q_size, *v = k + kv_size;
                for (int64_t h = 0; h < num_heads; ++h) rotate_head(q + r * q_size + h * D, row + h * D, c, s, D);
                for (int64_t h = 0; h < num_kv_heads; ++h) {
                    rotate_head(k + h * D, k + h * D, c, s, D);
                    const int64_t dst = h * slots_per_head + slots[r];
                    store_kv_row(ly->k_cache, dst, k + h * D, D, (int)m->kv_type, m->block_size, 0);
                    store_kv_row(ly->v_cache, dst, v + h * D, D, (int)m->kv_type, m->block_size, 1);
                }
            }
            END_PHASE(TM_PHASE_ROTARY_KV)

            /* A pure decode step with enough (request, KV head) tasks: one each. Fewer (a few long rows): each
             * one's positions split into block-aligned ranges over the threads, merged after (split-K). Any
             * other step: the AMX prompts, the one-row requests' (request, KV head) tasks, then prefill_tile.h's
             * query-block tasks for the rest. Same values on every thread, so every thread runs the same loops. */
            const int decode_tasks = pure_decode && N * num_kv_heads >= 2 * (int64_t)omp_get_num_threads();
            /* The AMX prompts write their rows of the o projection's bf16 input themselves where it takes the
             * attention rows as they are (its prepare_row then skips them): not where the last layer compacts
             * kept rows, nor where rows of shared KV groups are zeroed after. */
            const int o_direct = m->amx_direct_o && amx.num_tasks > 0 && multiplies_in_bf16(&ly->o, &qr) &&
                                 ly->o.k == q_size && bf16_k_pad(q_size) == q_size && m->kv_row_shares == NULL &&
                                 !(l == m->num_layers - 1 && keep_rows != NULL);
            if (!pure_decode) {
#if TM_HAVE_AMX_ATTENTION
                if (amx.num_tasks > 0) { /* q from the rotated queries, k and v from the cache or the fused rows */
                    const amx_cache_view view = {(const uint16_t *)ly->k_cache, (const uint16_t *)ly->v_cache,
                                                 block_tables, table_stride, seq_lens, m->num_blocks, m->block_size};
                    const int tiled = qr.bf16_stride == BF16_TILED;
                    const amx_out dst = o_direct ? (amx_out){qr.u, tiled ? q_size : qr.bf16_stride,
                                                             tiled ? AMX_OUT_BF16_TILES : AMX_OUT_BF16}
                                                 : (amx_out){attn, q_size, AMX_OUT_F32};
                    amx_attend_prompts(&amx, &dst, q, q_size, qkv + q_size, qkv_n, qkv + q_size + kv_size, qkv_n, 0,
                                       q_starts, amx_lens, N, num_heads, num_kv_heads, D, m->attn_scale,
                                       amx_from_cache ? &view : NULL);
                }
#endif
#pragma omp for schedule(dynamic, 1) nowait
                for (int64_t task = 0; task < num_decode_reqs * num_kv_heads; ++task) {
                    const int64_t r = decode_reqs[task / num_kv_heads], h = task % num_kv_heads;
                    if (!owns_row(m, h, q_starts[r], R)) continue; /* zeroed below */
                    const int64_t offset = q_starts[r] * q_size + h * group * D;
                    attend_one(attn + offset, q + offset, ly->k_cache, ly->v_cache, (int)m->kv_type,
                               block_tables + r * table_stride, seq_lens[r], group, h, m->num_blocks, m->block_size, D,
                               m->attn_scale, scores);
                }
#pragma omp for schedule(dynamic, 1)
                for (int64_t i = 0; i < num_tasks; ++i) {
                    const attention_task *t = &tasks[i];
                    const int64_t r = t->req, first = q_starts[r] * q_size;
                    if (!owns_any_row(m, t->kv_head, q_starts[r] + t->row0, t->rows, R)) continue; /* zeroed below */
                    attend_block(attn + first, q + first, q_size, ly->k_cache, ly->v_cache, (int)m->kv_type,
                                 block_tables + r * table_stride, seq_lens[r], q_lens[r], t, num_heads, group,
                                 m->num_blocks, m->block_size, D, m->attn_scale, scores);
                }
            } else if (decode_tasks) {
#pragma omp for schedule(dynamic, 1)
                for (int64_t task = 0; task < N * num_kv_heads; ++task) {
                    const int64_t r = task / num_kv_heads, h = task % num_kv_heads;
                    const int64_t offset = q_starts[r] * q_size + h * group * D;
                    if (!owns_row(m, h, q_starts[r], R)) { /* another rank attends it: zero, summed once */
                        memset(attn + offset, 0, (size_t)(group * D) * sizeof(float));
                        continue;
                    }
                    attend_one(attn + offset, q + offset, ly->k_cache, ly->v_cache, (int)m->kv_type,
                               block_tables + r * table_stride,
                               seq_lens[r], group, h, m->num_blocks, m->block_size, D, m->attn_scale, scores);
                }
            } else {
                const int64_t splits = max_splits, part_stride = D + 2;
#pragma omp for schedule(dynamic, 1)
                for (int64_t task = 0; task < N * num_kv_heads * splits; ++task) {
                    const int64_t r = task / (num_kv_heads * splits), h = task / splits % num_kv_heads;
                    const int64_t s = task % splits, seq_len = seq_lens[r];
                    const int64_t seq_blocks = (seq_len + m->block_size - 1) / m->block_size;
                    const int64_t start = s * ((seq_blocks + splits - 1) / splits) * m->block_size;
                    const int64_t end = start + ((seq_blocks + splits - 1) / splits) * m->block_size;
                    float *part = partials + ((r * num_kv_heads + h) * splits + s) * group * part_stride;
                    if (start >= seq_len) {
                        for (int64_t g = 0; g < group; ++g) part[g * part_stride + D + 1] = 0.0f; /* empty */
                        continue;
                    }
                    attend_range(part, q + q_starts[r] * q_size + h * group * D, ly->k_cache, ly->v_cache,
                                 (int)m->kv_type, block_tables + r * table_stride, start, end < seq_len ? end : seq_len,
                                 group, h, m->num_blocks, m->block_size, D, m->attn_scale, scores);
                }
#pragma omp for schedule(static)
                for (int64_t t = 0; t < N * num_heads; ++t) {
                    const int64_t r = t / num_heads, hq = t % num_heads, h = hq / group, g = hq % group;
                    const float *first = partials + ((r * num_kv_heads + h) * splits * group + g) * part_stride;
                    combine_ranges(attn + q_starts[r] * q_size + hq * D, first, splits, group * part_stride, D,
                                   m->attn_scale);
                }
            }

            if (m->kv_row_shares != NULL && !decode_tasks) {
                /* The other paths attended every row: zero the rows of shared groups another rank attends. */
#pragma omp for schedule(static)
                for (int64_t r = 0; r < R; ++r)
                    for (int64_t h = 0; h < num_kv_heads; ++h)
                        if (!owns_row(m, h, r, R)) memset(attn + r * q_size + h * group * D, 0,
                                                          (size_t)(group * D) * sizeof(float));
            }
            END_PHASE(TM_PHASE_ATTENTION)
            if (l == m->num_layers - 1 && keep_rows != NULL) {
                /* Only the kept rows go on: their residual and attention rows move to rows 0 .. num_keep - 1, in
                 * order (ascending, so row keep_rows[i] >= i is read before anything overwrites it). */
#pragma omp single
                for (int64_t i = 0; i < num_keep; ++i) {
                    if (keep_rows[i] == i) continue;
                    memcpy(residual + i * H, residual + keep_rows[i] * H, (size_t)H * sizeof(float));
                    memcpy(attn + i * q_size, attn + keep_rows[i] * q_size, (size_t)q_size * sizeof(float));
                }
                rows = num_keep;
                if (rows == 0) break; /* the same on every thread */
            }
            if (ly->o.format != TM_FLOAT32) {
#pragma omp for schedule(static)
                for (int64_t r = 0; r < rows; ++r)
                    if (!o_direct || !amx_row[r]) prepare_row(&ly->o, attn + r * q_size, r, &qr, rotation_scratch);
            }
            END_PHASE(TM_PHASE_ROWS)
            const int o_adds = adds_into_residual(m, &ly->o, &qr);
            /* (past keep_rows' compaction the rows are no longer the step's: all inputs) */
            linear_phase(&ly->o, o_adds ? residual : SUBLAYER_DST(), attn, &qr, rows, m->row_chunk_bytes, o_adds, NULL,
                         rows == R && skip.o_k_len > 0 ? &skip : NULL);
            END_PHASE(TM_PHASE_PROJECTIONS)
            TP_SUM(rows * H)

#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; ++r) {
                float *res = residual + r * H;
                if (!o_adds) add_sublayer_row(res, sub_first + r * H, sub_count, sub_stride, H);
                float *normed = norm_row_for(&ly->gate_up, x + r * H, norm_row);
                rms_norm_row(normed, res, ly->post_norm, m->eps, H);
                prepare_row(&ly->gate_up, normed, r, &qr, rotation_scratch);
            }
            END_PHASE(TM_PHASE_ROWS)
            const int down_adds = adds_into_residual(m, &ly->down, &qr);
            if (fused_mlp(ly, I, &qr)) { /* silu(gate) * up in bf16 straight into x, the down projection's input */
                gate_up_silu_phase(&ly->gate_up, (uint16_t *)x, qr.bf16_stride, bf16_k_pad(I), &qr, rows,
                                   m->row_chunk_bytes);
                quantized_rows h_rows = qr;
                h_rows.u = (uint8_t *)x;
                linear_phase(&ly->down, down_adds ? residual : SUBLAYER_DST(), NULL, &h_rows, rows,
                             m->row_chunk_bytes, down_adds, NULL, NULL);
                END_PHASE(TM_PHASE_PROJECTIONS)
                TP_SUM(rows * H)
                continue;
            }
            const int int8_fused = m->fuse_int8_mlp && int8_fused_mlp(ly, I);
            if (int8_fused) { /* silu(gate) * up in float32 straight into x, the down projection's input */
                int8_gate_up_silu_phase(&ly->gate_up, x, I, &qr, rows, I, silu_scratch, m->row_chunk_bytes);
            } else {
                linear_phase(&ly->gate_up, gate_up, x, &qr, rows, m->row_chunk_bytes, 0, NULL, NULL);
            }
            END_PHASE(TM_PHASE_PROJECTIONS)

#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; ++r) {
                const float *gate = gate_up + r * 2 * I;
                if (!int8_fused) silu_mul_row(x + r * I, gate, gate + I, I);
                prepare_row(&ly->down, x + r * I, r, &qr, rotation_scratch);
            }
            END_PHASE(TM_PHASE_ROWS)
            linear_phase(&ly->down, down_adds ? residual : SUBLAYER_DST(), x, &qr, rows, m->row_chunk_bytes,
                         down_adds, NULL, NULL);
            END_PHASE(TM_PHASE_PROJECTIONS)
            TP_SUM(rows * H)
        }
        const int last_down_adds = adds_into_residual(m, &m->layers[m->num_layers - 1].down, &qr);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
            float *res = residual + r * H;
            if (!last_down_adds) add_sublayer_row(res, sub_first + r * H, sub_count, sub_stride, H);
            rms_norm_row(hidden + (keep_rows != NULL ? keep_rows[r] : r) * H, res, m->final_norm, m->eps, H);
        }
        END_PHASE(TM_PHASE_ROWS)
#undef END_PHASE
#undef TP_SUM
#undef SUBLAYER_DST
    }
    free(arena);
    free(tasks), free(amx_lens);
    amx_free_prompt_plan(&amx);
    return tp_failed ? 3 : 0;
}

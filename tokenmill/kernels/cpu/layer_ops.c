/* The small per-token operations of a Llama decoder layer, each fused into one call: on the CPU at
 * decode batch sizes a layer's time outside its GEMMs is mostly torch dispatch (~50 small ops per
 * layer); these replace ~40 of them. Tensors are float32, rows contiguous, except in the _bf16 variants, which
 * read and write a bfloat16 model's activations (bf16.h) while the residual stream and arithmetic stay float32.
 *
 * Rows are independent, so large batches split rows across the OpenMP pool (torch's libgomp); small
 * ones run on the calling thread, where a parallel region would cost more than the work.
 */
#include "bf16.h"
#include "kv_cache.h"
#include "row_ops.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define PARALLEL_MIN_ROWS 32

/* residual == NULL: out = norm(x) * weight. Otherwise residual += x, then out = norm(residual) * weight.
 * norm(r) = r / sqrt(mean(r^2) + eps). out may alias x. */
void tm_rms_norm(float *out, const float *x, float *residual, const float *weight, float eps, int64_t num_rows,
                 int64_t hidden, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (num_rows >= PARALLEL_MIN_ROWS)
    for (int64_t t = 0; t < num_rows; ++t) {
        const float *src = x + t * hidden;
        if (residual != NULL) {
            float *res = residual + t * hidden;
#pragma omp simd
            for (int64_t i = 0; i < hidden; ++i) res[i] += src[i];
            src = res;
        }
        rms_norm_row(out + t * hidden, src, weight, eps, hidden);
    }
}

/* As tm_rms_norm, for a bf16 model: out is bf16; x is bf16 (x_bf16 != 0) or float32; residual (float32, or
 * NULL) += x first and is what gets normalized. weight is float32 (the bf16 weight's exact values). */
void tm_rms_norm_bf16(uint16_t *out, const void *x, int x_bf16, float *residual, const float *weight, float eps,
                      int64_t num_rows, int64_t hidden, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (num_rows >= PARALLEL_MIN_ROWS)
    for (int64_t t = 0; t < num_rows; ++t) {
        float row[hidden];
        const float *src = row;
        if (x_bf16)
            bf16_row_to_f32(row, (const uint16_t *)x + t * hidden, hidden);
        else
            src = (const float *)x + t * hidden;
        if (residual != NULL) {
            float *res = residual + t * hidden;
#pragma omp simd
            for (int64_t i = 0; i < hidden; ++i) res[i] += src[i];
            src = res;
        }
        rms_norm_row(row, src, weight, eps, hidden);
        f32_row_to_bf16(out + t * hidden, row, hidden);
    }
}

/* out[t, j] = silu(x[t, j]) * x[t, width + j] for j < width (x: [num_rows, 2 * width]). */
void tm_silu_and_mul(float *out, const float *x, int64_t num_rows, int64_t width, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (num_rows >= PARALLEL_MIN_ROWS)
    for (int64_t t = 0; t < num_rows; ++t) {
        const float *gate = x + t * 2 * width;
        silu_mul_row(out + t * width, gate, gate + width, width);
    }
}

/* As tm_silu_and_mul with bf16 x and out (float32 arithmetic). */
void tm_silu_and_mul_bf16(uint16_t *out, const uint16_t *x, int64_t num_rows, int64_t width, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (num_rows >= PARALLEL_MIN_ROWS)
    for (int64_t t = 0; t < num_rows; ++t) {
        float gate[width], up[width];
        bf16_row_to_f32(gate, x + t * 2 * width, width);
        bf16_row_to_f32(up, x + t * 2 * width + width, width);
        silu_mul_row(gate, gate, up, width);
        f32_row_to_bf16(out + t * width, gate, width);
    }
}

/* qkv: [num_rows, row_stride], each row [q (num_heads * D) | k (num_kv_heads * D) | v (num_kv_heads * D) ...].
 * Writes rotated q to q_out ([num_rows, num_heads, D] contiguous), rotates k in place, and stores k and v
 * at slot slots[t] of the head-major caches ([num_kv_heads, slots_per_head, row], rows of kv_type, kv_cache.h, in
 * blocks of block_size; D % 8 == 0 unless KV_F32). cos/sin: [num_rows, D]. */
void tm_rotary_write_kv(float *q_out, float *qkv, int64_t row_stride, const float *cos, const float *sin,
                        void *k_cache, void *v_cache, int kv_type, const int64_t *slots, int64_t num_rows,
                        int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t slots_per_head,
                        int64_t block_size, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (num_rows >= PARALLEL_MIN_ROWS)
    for (int64_t t = 0; t < num_rows; ++t) {
        float *row = qkv + t * row_stride;
        const float *c = cos + t * head_dim, *s = sin + t * head_dim;
        for (int64_t h = 0; h < num_heads; ++h)
            rotate_head(q_out + (t * num_heads + h) * head_dim, row + h * head_dim, c, s, head_dim);
        float *k = row + num_heads * head_dim, *v = k + num_kv_heads * head_dim;
        for (int64_t h = 0; h < num_kv_heads; ++h) {
            float *kh = k + h * head_dim;
            rotate_head(kh, kh, c, s, head_dim);
            const int64_t dst = h * slots_per_head + slots[t];
            store_kv_row(k_cache, dst, kh, head_dim, kv_type, block_size, 0);
            store_kv_row(v_cache, dst, v + h * head_dim, head_dim, kv_type, block_size, 1);
        }
    }
}

/* ids[t] = the first index of row t's largest value among n (argmax's), values[t] = that value, for rows of x
 * [num_rows, n] (row stride n): one pass for the maximum, one for its first place (the row still in L2). A row
 * holding a NaN or an infinity gets ids[t] = -1 (told apart by the exponent bits: the kernels build with
 * -ffast-math, under which float comparisons assume finite values), and its caller takes torch's reduction. Rows
 * split over the threads; a few rows run on the calling thread. */
typedef uint32_t float_bits __attribute__((may_alias)); /* a float's bits, read in place */

void tm_rows_argmax(int64_t *ids, float *values, const float *x, int64_t num_rows, int64_t n, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (num_rows >= 4)
    for (int64_t t = 0; t < num_rows; ++t) {
        const float *row = x + t * n;
        const float_bits *bits = (const float_bits *)row;
        float best = row[0];
        uint32_t non_finite = 0;
#pragma omp simd reduction(max : best) reduction(| : non_finite)
        for (int64_t i = 0; i < n; ++i) {
            non_finite |= (bits[i] & 0x7f800000u) == 0x7f800000u;
            best = row[i] > best ? row[i] : best;
        }
        int64_t at = 0;
#if defined(__AVX2__)
        const __m256 target = _mm256_set1_ps(best);
        for (; at + 8 <= n; at += 8) {
            const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + at), target, _CMP_EQ_OQ));
            if (hit) {
                at += __builtin_ctz((unsigned)hit);
                break;
            }
        }
#endif
        while (at < n && row[at] != best) ++at;
        ids[t] = non_finite || at >= n ? -1 : at;
        values[t] = best;
    }
}

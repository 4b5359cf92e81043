/* A range of memory prefetched into L2 a few 64-byte lines at a time while a kernel computes: the lines spread evenly
 * over the steps the kernel is expected to take, so the range is in cache by the time the kernel (or its next pass)
 * reads it, without a burst of misses that would stall its own loads. Used for the weights of the pair of panels a
 * projection's thread takes next (bf16_panels.h, int8_vnni.h): where a pass computes long enough per pair, the
 * hardware prefetchers alone start late on each new pair. A NULL base (or no steps): nothing to prefetch.
 */
#ifndef TM_PREFETCH_STREAM_H
#define TM_PREFETCH_STREAM_H

#include <stddef.h>
#include <stdint.h>
#include <xmmintrin.h>

/* A build with -DTM_PREFETCH_STREAMS=0 prefetches nothing through these streams (A/B runs of the whole mechanism:
 * benchmarks/kernel_build_ab.py). */
#ifndef TM_PREFETCH_STREAMS
#define TM_PREFETCH_STREAMS 1
#endif

/* Passes over more rows than this prefetch nothing: prompt chunks, whose weights come back from L2 / L3 once a chunk.
 * Zen 4, SmolLM2-135M's 2048-row prompt steps with every pass prefetching against none, alternated step by step in
 * one engine (a build with -DPREFETCH_STREAM_MAX_ROWS=100000): bf16 0.98-0.99x, int8 0.98-1.00x (3 runs each). */
#ifndef PREFETCH_STREAM_MAX_ROWS
#define PREFETCH_STREAM_MAX_ROWS 64
#endif

typedef struct {
    const char *base;
    int64_t bytes, offset; /* the range's length; prefetched so far */
    int64_t per_step;      /* lines per step */
} prefetch_stream;

static inline prefetch_stream prefetch_stream_over(const void *base, int64_t bytes, int64_t steps) {
    prefetch_stream s = {NULL, 0, 0, 0};
    if (!TM_PREFETCH_STREAMS || base == NULL || bytes <= 0 || steps <= 0) return s;
    s.base = (const char *)base, s.bytes = bytes, s.per_step = (bytes / 64 + steps - 1) / steps;
    return s;
}

static inline void prefetch_stream_step(prefetch_stream *s) {
    for (int64_t i = 0; i < s->per_step && s->offset < s->bytes; ++i, s->offset += 64)
        _mm_prefetch(s->base + s->offset, _MM_HINT_T1);
}

#endif

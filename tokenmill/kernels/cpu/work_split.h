/* How the CPU GEMM loops split weight panels over the OpenMP threads. */
#ifndef TM_WORK_SPLIT_H
#define TM_WORK_SPLIT_H

/* Fewest panels a thread takes at a time in the GEMM loops (f32_gemm.c, int8_gemm.c, bf16_gemm.c, step_forward.c),
 * scheduled `guided`: each thread first takes a long contiguous run of panels (about its share), so its weights
 * stream as one sequential run the hardware prefetcher follows, then smaller grabs balance the tail: on a shared or
 * virtual machine one core often runs slower for a while, and with a static split the other one then waits at the
 * barrier (interleaved A/B of int8 products at 64-2048 rows on the Zen 3: dynamic 1.05-1.08x static). On the AMX
 * Xeon (2026-12-06), guided against dynamic grabs of 4 panels: C forward steps 4-8% faster (bf16 and int8, decode
 * and prompt); static and guided equal there. */
#define PANELS_PER_GRAB 4

#endif

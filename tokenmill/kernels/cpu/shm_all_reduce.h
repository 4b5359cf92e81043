/* The shared-memory all-reduce of the tensor-parallel ranks on one machine (shm_all_reduce.c exports it to Python;
 * step_forward.c calls it between a layer's row-parallel projection and its residual add). */
#ifndef TM_SHM_ALL_REDUCE_H
#define TM_SHM_ALL_REDUCE_H

#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define CONTROL_LINE 64

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

static inline double shm_now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Bytes of the segment for world ranks and capacity floats per slot. */
static inline int64_t shm_segment_bytes(int world, int64_t capacity) {
    return (int64_t)world * CONTROL_LINE + 2 * (int64_t)world * capacity * (int64_t)sizeof(float);
}

/* Returns 0; 1 when n > capacity (nothing done); 2 when some rank did not arrive within timeout_s, 3 when a rank's
 * process is gone (x unchanged). */
static int shm_all_reduce(char *segment, int rank, int world, int64_t capacity, float *x, int64_t n, uint64_t seq,
                          double timeout_s) {
    if (n > capacity) return 1;
    if (world < 2) return 0;
    float *set = (float *)(segment + (int64_t)world * CONTROL_LINE) + (int64_t)(seq % 2) * world * capacity;
    memcpy(set + (int64_t)rank * capacity, x, (size_t)n * sizeof(float));
    __atomic_store_n((uint64_t *)(segment + rank * CONTROL_LINE), seq, __ATOMIC_RELEASE);
    double deadline = 0.0;
    for (int r = 0; r < world; ++r) {
        const uint64_t *line = (const uint64_t *)(segment + r * CONTROL_LINE);
        for (int64_t spins = 0; __atomic_load_n(line, __ATOMIC_ACQUIRE) < seq; ++spins) {
            if (spins < 4096) {
                CPU_RELAX();
                continue;
            }
            sched_yield(); /* a rank that shares a core with this one gets it */
            if (spins % 1024 == 0) {
                const double t = shm_now_s();
                if (deadline == 0.0) deadline = t + timeout_s;
                else if (t > deadline) return 2;
                const int64_t pid = *(const volatile int64_t *)(segment + r * CONTROL_LINE + 8);
                if (pid > 0 && kill((pid_t)pid, 0) != 0 && errno == ESRCH) return 3; /* that rank is gone */
            }
        }
    }
    /* x = ((slot 0 + slot 1) + slot 2) + ...: one pass per slot, each a plain vectorized loop; the same order of
     * additions on every rank. */
    const float *first = set, *second = set + capacity;
    for (int64_t i = 0; i < n; ++i) x[i] = first[i] + second[i];
    for (int r = 2; r < world; ++r) {
        const float *slot = set + (int64_t)r * capacity;
        for (int64_t i = 0; i < n; ++i) x[i] += slot[i];
    }
    return 0;
}

#endif

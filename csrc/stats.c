/*
 * stats.c - the oracle's counters: one rule for the latency buckets, and
 * additions that are atomic, because a key's row is written by C workers
 * (signer.c) and by Python (oracle/stats.py) at once.
 */
#include "internal.h"

#include <math.h>
#include <pthread.h>

static uint64_t bounds[SHMKEY_STAT_BOUNDS];
static pthread_once_t bounds_once = PTHREAD_ONCE_INIT;

static void make_bounds(void)
{
    for (uint32_t i = 0; i < SHMKEY_STAT_BOUNDS; i++)
        bounds[i] = (uint64_t)llround(1000.0 * exp2((double)i / 8.0));
}

/* The upper bound of histogram bucket i (i < SHMKEY_STAT_BOUNDS), in ns. */
uint64_t shmkey_stats_bound_ns(uint32_t i)
{
    pthread_once(&bounds_once, make_bounds);
    return i < SHMKEY_STAT_BOUNDS ? bounds[i] : UINT64_MAX;
}

/* The first bucket whose bound is at least ns. */
static uint32_t bucket_of(uint64_t ns)
{
    uint32_t lo = 0, hi = SHMKEY_STAT_BOUNDS;
    pthread_once(&bounds_once, make_bounds);
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        if (bounds[mid] < ns)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/*
 * Count one private-key request: outcome is a SHMKEY_STAT_* count, elapsed
 * the time of its math (0: refused before it); client_row may be NULL.
 */
void shmkey_stats_record(uint64_t *key_row, uint64_t *client_row, uint32_t outcome,
                         uint64_t elapsed_ns)
{
    static const uint32_t client_word[] = {
        [SHMKEY_STAT_SIGNS] = SHMKEY_CSTAT_OPS,
        [SHMKEY_STAT_DECRYPTS] = SHMKEY_CSTAT_OPS,
        [SHMKEY_STAT_REFUSED_POLICY] = SHMKEY_CSTAT_REFUSED,
        [SHMKEY_STAT_REFUSED_RATE] = SHMKEY_CSTAT_LIMITED,
        [SHMKEY_STAT_ERRORS] = SHMKEY_CSTAT_ERRORS,
    };
    if (outcome > SHMKEY_STAT_ERRORS)
        return;
    __atomic_add_fetch(&key_row[outcome], 1, __ATOMIC_RELAXED);
    if (elapsed_ns) {
        __atomic_add_fetch(&key_row[SHMKEY_STAT_LATENCY_SUM_NS], elapsed_ns, __ATOMIC_RELAXED);
        __atomic_add_fetch(&key_row[SHMKEY_STAT_HIST + bucket_of(elapsed_ns)], 1,
                           __ATOMIC_RELAXED);
    }
    if (client_row)
        __atomic_add_fetch(&client_row[client_word[outcome]], 1, __ATOMIC_RELAXED);
}

void shmkey_stats_signed_in_c(uint64_t *key_row, uint64_t *client_row, uint64_t elapsed_ns)
{
    shmkey_stats_record(key_row, client_row, SHMKEY_STAT_SIGNS, elapsed_ns);
    __atomic_add_fetch(&key_row[SHMKEY_STAT_SIGNS_IN_C], 1, __ATOMIC_RELAXED);
}

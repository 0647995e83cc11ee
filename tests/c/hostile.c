/*
 * hostile.c - a client that attacks the ring it is allowed to open.
 *
 * It claims slots the proper way (so honest clients' slots stay theirs),
 * then fills them with garbage, flips op/in_len/payload while the oracle
 * works on them, writes garbage into their control words, scribbles the
 * header's static fields and posts request tokens for nothing. It never
 * reads a reply. Usage: hostile RING_ID SECONDS SEED
 */
#include "internal.h"

#include <fcntl.h>
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static uint64_t rng_state;

static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

int main(int argc, char **argv)
{
    if (argc != 4)
        return 2;
    char path[256];
    struct stat st;
    snprintf(path, sizeof(path), "/%s", argv[1]);
    int fd = shm_open(path, O_RDWR, 0);
    if (fd < 0 || fstat(fd, &st) != 0)
        return 3;
    uint8_t *base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED)
        return 3;
    snprintf(path, sizeof(path), "/%s-req", argv[1]);
    sem_t *req = sem_open(path, 0);
    if (req == SEM_FAILED)
        return 3;
    struct shmkey_ring_hdr *h = (struct shmkey_ring_hdr *)base;
    /* Our own copy, taken before we start lying in the header. */
    uint32_t nslots = h->nslots, stride = h->slot_stride, size = h->slot_size;
    double seconds = atof(argv[2]);
    rng_state = strtoull(argv[3], NULL, 10) | 1;
    uint64_t end = shmkey_now_ns() + (uint64_t)(seconds * 1e9);
    unsigned long actions[8] = {0};

    while (shmkey_now_ns() < end) {
        uint32_t i = (uint32_t)(rnd() % nslots);
        struct shmkey_slot *s = (struct shmkey_slot *)(base + SHMKEY_ALIGN + (size_t)i * stride);
        uint8_t *payload = (uint8_t *)(s + 1);
        uint64_t ctl = __atomic_load_n(&s->ctl, __ATOMIC_ACQUIRE);
        int action = (int)(rnd() % 8);
        if (action == 6) {             /* header's static fields: the oracle must not care */
            uint32_t *words = (uint32_t *)h;
            int w = (int)(rnd() % 7);  /* magic .. oracle_pid; state is DoS, not tested */
            words[w] ^= (uint32_t)rnd();
            actions[6]++;
            continue;
        }
        if (action == 7) {             /* a request token with no request behind it */
            sem_post(req);
            actions[7]++;
            continue;
        }
        if ((uint32_t)ctl != SHMKEY_SLOT_FREE)
            continue;
        uint64_t mine = (ctl & 0xffffffff00000000ull) | SHMKEY_SLOT_CLAIMED;
        if (!__atomic_compare_exchange_n(&s->ctl, &ctl, mine, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE))
            continue;
        /* The slot is ours now: attack it. */
        s->client_pid = (uint32_t)getpid();
        uint8_t *raw = (uint8_t *)&s->req;
        for (size_t k = 0; k < sizeof(s->req); k++)
            raw[k] = (uint8_t)rnd();
        if (action < 3)
            s->req.op = 1 + (uint32_t)(rnd() % 4);      /* valid ops, garbage params */
        if (action == 1)
            s->req.in_len = (uint32_t)(rnd() % (size + 1));
        for (uint32_t k = 0; k < size; k += 8)
            *(uint64_t *)(payload + k) = rnd();
        uint64_t submitted = (mine & 0xffffffff00000000ull) | SHMKEY_SLOT_SUBMITTED;
        __atomic_store_n(&s->ctl, submitted, __ATOMIC_RELEASE);
        sem_post(req);
        actions[action]++;
        /* While the oracle picks it up and works: keep changing it. */
        for (int k = 0; k < 2000; k++) {
            s->req.in_len = (uint32_t)rnd();
            s->req.op = (uint32_t)rnd() % 6;
            s->req.p[rnd() % 4] = (uint32_t)rnd();
            payload[rnd() % size] ^= 0xff;
            if (action == 5 && k == 1000)  /* garbage in our own control word */
                __atomic_store_n(&s->ctl, rnd(), __ATOMIC_RELEASE);
        }
        /* Give the slot back once answered, as a client would; a slot whose
           control word we wrecked is left for the oracle's reaper. */
        uint64_t done = (submitted & 0xffffffff00000000ull) | SHMKEY_SLOT_DONE;
        uint64_t give_up = shmkey_now_ns() + 50000000ull;
        while (shmkey_now_ns() < give_up) {
            uint64_t now = __atomic_load_n(&s->ctl, __ATOMIC_ACQUIRE);
            if (now == done) {
                __atomic_compare_exchange_n(&s->ctl, &now, done + (1ull << 32) - SHMKEY_SLOT_DONE,
                                            0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
                break;
            }
            if ((uint32_t)now > SHMKEY_SLOT_ABANDONED || (now >> 32) != (submitted >> 32))
                break;
        }
    }
    printf("hostile actions:");
    for (int a = 0; a < 8; a++)
        printf(" %lu", actions[a]);
    printf("\n");
    return 0;
}

/*
 * hostile.c - a client that attacks the only ring it can reach: its own.
 *
 * It connects like any client, then fills its slots with garbage, flips op,
 * in_len and the payload while the oracle works on them, writes garbage
 * into its control words (states that do not exist, other generations,
 * BUSY and DONE it made up), rings the doorbell for nothing, and now and then
 * sends junk on its socket (the oracle must hang up on it) and connects
 * again. It never reads a reply. Usage: hostile SOCKET_PATH SECONDS SEED
 */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static uint64_t rng_state;

static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static struct shmkey_client *open_ring(const char *path)
{
    struct shmkey_client *c = NULL;
    char why[256];
    if (shmkey_client_open(path, -1, SHMKEY_TRANSPORT_SHM, SHMKEY_UID_DEFAULT, 0, 5000, why,
                           sizeof(why), &c) != SHMKEY_OK) {
        fprintf(stderr, "hostile: %s\n", why);
        return NULL;
    }
    return c;
}

int main(int argc, char **argv)
{
    if (argc != 4)
        return 2;
    struct shmkey_client *c = open_ring(argv[1]);
    if (!c)
        return 3;
    double seconds = atof(argv[2]);
    rng_state = strtoull(argv[3], NULL, 10) | 1;
    uint64_t end = shmkey_now_ns() + (uint64_t)(seconds * 1e9);
    unsigned long actions[8] = {0}, reconnects = 0;

    while (shmkey_now_ns() < end) {
        struct cring *r = c->ring;
        uint32_t i = (uint32_t)(rnd() % r->nslots);
        struct shmkey_slot *s = (struct shmkey_slot *)(r->base + (size_t)i * r->stride);
        uint8_t *payload = (uint8_t *)(s + 1);
        uint64_t ctl = __atomic_load_n(&s->ctl, __ATOMIC_ACQUIRE);
        int action = (int)(rnd() % 8);
        if (action == 6) {              /* junk on the socket: the oracle hangs up on us */
            if (rnd() % 64 == 0) {
                char junk[64];
                for (size_t k = 0; k < sizeof(junk); k++)
                    junk[k] = (char)rnd();
                (void)send(r->sock, junk, sizeof(junk), MSG_NOSIGNAL | MSG_DONTWAIT);
                usleep(2000);
                shmkey_client_close(c);
                if (!(c = open_ring(argv[1])))
                    return 4;
                reconnects++;
                actions[6]++;
            }
            continue;
        }
        if (action == 7) {              /* a doorbell with no request behind it */
            (void)send(r->sock, "r", 1, MSG_NOSIGNAL | MSG_DONTWAIT);
            actions[7]++;
            continue;
        }
        if (action == 5) {              /* a made-up state and generation */
            __atomic_store_n(&s->ctl, rnd(), __ATOMIC_RELEASE);
            actions[5]++;
            continue;
        }
        uint8_t *raw = (uint8_t *)&s->req;
        for (size_t k = 0; k < sizeof(s->req); k++)
            raw[k] = (uint8_t)rnd();
        if (action < 3)
            s->req.op = 1 + (uint32_t)(rnd() % 4);      /* valid ops, garbage params */
        if (action == 1)
            s->req.in_len = (uint32_t)(rnd() % (r->slot_size + 1));
        for (uint32_t k = 0; k + 8 <= r->slot_size; k += 8)
            *(uint64_t *)(payload + k) = rnd();
        s->waiters = (uint32_t)rnd();
        uint64_t submitted = (ctl & 0xffffffff00000000ull) | SHMKEY_SLOT_SUBMITTED;
        __atomic_store_n(&s->ctl, submitted, __ATOMIC_RELEASE);
        (void)send(r->sock, "r", 1, MSG_NOSIGNAL | MSG_DONTWAIT);
        actions[action]++;
        /* While the oracle picks it up and works: keep changing it. */
        for (int k = 0; k < 2000; k++) {
            s->req.in_len = (uint32_t)rnd();
            s->req.op = (uint32_t)rnd() % 6;
            s->req.p[rnd() % 4] = (uint32_t)rnd();
            payload[rnd() % r->slot_size] ^= 0xff;
            if (action == 4 && k == 1000)
                __atomic_store_n(&s->ctl, (ctl & 0xffffffff00000000ull) | SHMKEY_SLOT_DONE,
                                 __ATOMIC_RELEASE);
        }
    }
    printf("hostile actions:");
    for (int a = 0; a < 8; a++)
        printf(" %lu", actions[a]);
    printf("\nreconnects: %lu\n", reconnects);
    shmkey_client_close(c);
    return 0;
}

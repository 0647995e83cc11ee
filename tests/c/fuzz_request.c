/*
 * fuzz_request.c - libFuzzer target for the oracle's request parsers.
 *
 * Input byte 0 picks the transport. Ring: the rest is written over one slot
 * (its header fields and payload, as a client could), the slot is marked
 * SUBMITTED, and the worker loop copies, validates and answers it. Socket:
 * the rest is sent as raw bytes on a fresh connection, and the worker loop
 * reads whatever framing it finds. Either way the oracle may answer with an
 * error; it must never read or write outside its buffers, which ASan checks.
 * The ring is unlinked as soon as it is open, so a crash leaves nothing.
 */
#include "internal.h"

#include <fcntl.h>
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#define NSLOTS 4
#define SLOT_SIZE 512

static struct shmkey_server *ring_srv, *sock_srv;
static struct shmkey_work *work;
static uint8_t *ring_base;
static int ctl_client = -1;

static void die(const char *what)
{
    perror(what);
    abort();
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    char name[64], req[80], freen[80];
    snprintf(name, sizeof(name), "/shmkey-fuzz-%d", (int)getpid());
    snprintf(req, sizeof(req), "%s-req", name);
    snprintf(freen, sizeof(freen), "%s-free", name);
    size_t size = shmkey_ring_size(NSLOTS, SLOT_SIZE);
    int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0 || ftruncate(fd, (off_t)size) != 0)
        die("shm_open");
    sem_t *a = sem_open(req, O_CREAT | O_EXCL, 0600, 0);
    sem_t *b = sem_open(freen, O_CREAT | O_EXCL, 0600, NSLOTS);
    if (a == SEM_FAILED || b == SEM_FAILED)
        die("sem_open");
    if (shmkey_server_open_shm(fd, NSLOTS, SLOT_SIZE, 0, req, freen, &ring_srv) != SHMKEY_OK)
        die("server_open_shm");
    ring_base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (ring_base == MAP_FAILED)
        die("mmap");
    close(fd);
    sem_close(a);
    sem_close(b);
    shm_unlink(name);
    sem_unlink(req);
    sem_unlink(freen);

    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv) != 0)
        die("socketpair");
    if (shmkey_server_open_socket(sv[1], 0, SLOT_SIZE, &sock_srv) != SHMKEY_OK)
        die("server_open_socket");
    close(sv[1]);
    ctl_client = sv[0];
    work = shmkey_work_new(SLOT_SIZE);
    return 0;
}

/* Serve whatever the loop accepts, answering with bytes of our own choice. */
static void serve(struct shmkey_server *s, const uint8_t *data, size_t len)
{
    for (int i = 0; i < 8; i++) {
        if (shmkey_server_next(s, work, 0) != SHMKEY_OK)
            return;
        /* Answer with up to 2x the slot: the reply path must clamp it. */
        uint32_t n = (uint32_t)(len * 3) % (2 * SLOT_SIZE);
        static uint8_t reply[2 * SLOT_SIZE];
        memcpy(reply, data, len < sizeof(reply) ? len : sizeof(reply));
        shmkey_server_reply(s, work, (int32_t)(len % 13) - 12, reply, n);
    }
}

static void fuzz_ring(const uint8_t *data, size_t len)
{
    if (len < 1)
        return;
    uint32_t idx = data[0] % NSLOTS;
    data++, len--;
    size_t stride = (shmkey_ring_size(NSLOTS, SLOT_SIZE) - SHMKEY_ALIGN) / NSLOTS;
    struct shmkey_slot *slot = (struct shmkey_slot *)(ring_base + SHMKEY_ALIGN + idx * stride);
    uint64_t gen = slot->ctl >> 32;
    size_t n = len < stride ? len : stride;
    memcpy(slot, data, n);              /* header fields and payload, all client-owned */
    if (n >= sizeof(uint64_t) && (data[0] & 1))
        slot->ctl = (gen << 32) | SHMKEY_SLOT_SUBMITTED;  /* usually: a well-formed submit */
    struct shmkey_ring_hdr *h = (struct shmkey_ring_hdr *)ring_base;
    if (len > 2 && data[1] == 0x5a)
        memcpy(h, data, len < sizeof(*h) ? len : sizeof(*h));  /* and the header */
    sem_t *req = ((struct shmkey_server *)ring_srv)->req_sem;
    sem_post(req);
    serve(ring_srv, data, len);
    shmkey_server_reap(ring_srv);
    shmkey_server_reap(ring_srv);
    /* Leave the slot free for the next input, as a client would. */
    slot->ctl = ((gen + 1) << 32) | SHMKEY_SLOT_FREE;
    while (sem_trywait(req) == 0)
        ;
}

static void fuzz_socket(const uint8_t *data, size_t len)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
        die("socketpair");
    if (shmkey_send_fd(ctl_client, sv[1]) != SHMKEY_OK)
        die("send_fd");
    close(sv[1]);
    if (len && write(sv[0], data, len) < 0)
        die("write");
    shutdown(sv[0], SHUT_WR);           /* a short message ends in EOF, not a stall */
    serve(sock_srv, data, len);
    close(sv[0]);
    serve(sock_srv, data, 0);           /* let the loop notice the hang-up */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t len)
{
    if (len < 1 || len > 4 * SLOT_SIZE)
        return 0;
    if (data[0] & 0x80)
        fuzz_socket(data + 1, len - 1);
    else
        fuzz_ring(data + 1, len - 1);
    return 0;
}

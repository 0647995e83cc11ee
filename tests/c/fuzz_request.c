/*
 * fuzz_request.c - libFuzzer target for the oracle's parsers: the hello,
 * the socket framing and the ring's requests.
 *
 * Input byte 0 picks the target. Ring: the rest is written over one slot of
 * a ring the oracle handed us (its header fields and payload, as a client
 * could), usually marked SUBMITTED, the doorbell rung, and the worker loop
 * copies, validates and answers it. Socket: the rest is sent as raw bytes on
 * a fresh connection (the seeds start with a hello), and the loop reads
 * whatever it finds. Either way the oracle may answer with an error; it must
 * never read or write outside its buffers, which ASan checks.
 */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define NSLOTS 4
#define SLOT_SIZE 512

static struct shmkey_server *srv;
static struct shmkey_work *work;
static uint8_t *ring_base;
static int ring_sock = -1;
static int ctl_client = -1;
static uint32_t stride;

static void die(const char *what)
{
    perror(what);
    abort();
}

/* Serve whatever the loop accepts, answering with bytes of our own choice. */
static void serve(const uint8_t *data, size_t len)
{
    for (int i = 0; i < 8; i++) {
        if (shmkey_server_next(srv, work, 0) != SHMKEY_OK)
            return;
        /* Answer with up to 2x the slot: the reply path must clamp it. */
        uint32_t n = (uint32_t)(len * 3) % (2 * SLOT_SIZE);
        static uint8_t reply[2 * SLOT_SIZE];
        memcpy(reply, data, len < sizeof(reply) ? len : sizeof(reply));
        shmkey_server_reply(srv, work, (int32_t)(len % 14) - 13, reply, n);
    }
}

/* A connection handed over the control socket, as an owned oracle's clients make them. */
static int handed(void)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
        die("socketpair");
    if (shmkey_send_fd(ctl_client, sv[1]) != SHMKEY_OK)
        die("send_fd");
    close(sv[1]);
    return sv[0];
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv) != 0)
        die("socketpair");
    if (shmkey_server_open(sv[1], 0, SHMKEY_TRANSPORT_SHM, NSLOTS, SLOT_SIZE, 0, 1, &srv) !=
        SHMKEY_OK)
        die("server_open");
    close(sv[1]);
    ctl_client = sv[0];
    work = shmkey_work_new(SLOT_SIZE);

    /* Our ring, the way every client gets one: hello, then the welcome's descriptors. */
    ring_sock = handed();
    struct shmkey_hello hello = {SHMKEY_MAGIC, SHMKEY_VERSION, SHMKEY_TRANSPORT_SHM, 0};
    if (write(ring_sock, &hello, sizeof(hello)) != (ssize_t)sizeof(hello))
        die("hello");
    serve(NULL, 0);
    struct shmkey_welcome wel;
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int) * (NSLOTS + 2))];
    } u;
    struct iovec iov = {.iov_base = &wel, .iov_len = sizeof(wel)};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1,
                        .msg_control = u.buf, .msg_controllen = sizeof(u.buf)};
    if (recvmsg(ring_sock, &mh, 0) != (ssize_t)sizeof(wel) || wel.status != SHMKEY_OK)
        die("welcome");
    int fds[NSLOTS + 2];
    memcpy(fds, CMSG_DATA(CMSG_FIRSTHDR(&mh)), sizeof(fds));
    ring_base = mmap(NULL, shmkey_ring_size(NSLOTS, SLOT_SIZE), PROT_READ | PROT_WRITE,
                     MAP_SHARED, fds[0], 0);
    if (ring_base == MAP_FAILED)
        die("mmap");
    for (int i = 0; i < NSLOTS + 2; i++)
        close(fds[i]);
    stride = shmkey_slot_stride(SLOT_SIZE);
    return 0;
}

static void fuzz_ring(const uint8_t *data, size_t len)
{
    if (len < 2)
        return;
    uint32_t idx = data[0] % NSLOTS;
    int submit = data[1] & 1;
    data += 2, len -= 2;
    struct shmkey_slot *slot = (struct shmkey_slot *)(ring_base + idx * stride);
    uint64_t gen = slot->ctl >> 32;
    size_t n = len < stride ? len : stride;
    memcpy(slot, data, n);              /* header fields and payload, all client-owned */
    if (submit)
        slot->ctl = (gen << 32) | SHMKEY_SLOT_SUBMITTED;  /* usually: a well-formed submit */
    (void)send(ring_sock, "r", 1, MSG_DONTWAIT | MSG_NOSIGNAL);
    serve(data, len);
    /* Leave the slot free for the next input, as a client would. */
    slot->ctl = ((gen + 1) << 32) | SHMKEY_SLOT_FREE;
}

static void fuzz_socket(const uint8_t *data, size_t len)
{
    int fd = handed();
    if (len && write(fd, data, len) < 0)
        die("write");
    shutdown(fd, SHUT_WR);              /* a short message ends in EOF, not a stall */
    serve(data, len);
    close(fd);
    serve(data, 0);                     /* let the loop notice the hang-up */
    shmkey_server_reap(srv);            /* and free what it retired */
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

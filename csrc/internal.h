/*
 * internal.h - private state of the C layer: the client and server handles
 * for both transports, and small helpers shared by the .c files.
 * The wire and ring layout is in shmkey.h and nowhere else.
 */
#ifndef SHMKEY_INTERNAL_H
#define SHMKEY_INTERNAL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stdint.h>
#include <stddef.h>
#include <pthread.h>
#include <semaphore.h>
#include <sys/types.h>
#include <time.h>

#include "shmkey.h"

/* The last SHMKEY_E* status (shmkey.h): where C range checks over them end. */
#define SHMKEY_ELAST SHMKEY_ETOKEN

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
               "ctl packs state in the low word that futex waits on");
_Static_assert(sizeof(struct shmkey_ring_hdr) == 64, "header is one cache line");
_Static_assert(sizeof(struct shmkey_slot) % 8 == 0, "slot header alignment");

#define SHMKEY_ALIGN 64u
/* Longest a blocked call sleeps before it looks at the oracle's pulse again. */
#define SHMKEY_LIVENESS_SLICE_MS 20u

struct shmkey_client {
    int transport;
    pid_t owner_pid;            /* process that opened it; a forked child must reopen */
    uint32_t max_payload;
    /* shm */
    uint8_t *base;
    size_t map_len;
    uint32_t nslots, slot_size, stride, slots_offset;
    pid_t oracle_pid;
    uint32_t ncpu;
    uint32_t spin_us;
    sem_t *req_sem;
    sem_t *free_sem;
    /* socket */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int ctl_fd;                 /* SOCK_SEQPACKET to a forked oracle, or -1 */
    char path[108];             /* socket path to connect to, or "" */
    int idle[SHMKEY_MAX_SOCKET_CONNS];
    int nidle;
    int nopen;
};

struct shmkey_server {
    int transport;
    volatile int stopping;
    uint32_t max_payload;
    /* shm: private copies, never re-read from the shared header */
    uint8_t *base;
    size_t map_len;
    uint32_t nslots, slot_size, stride, slots_offset;
    uint32_t ncpu;
    uint32_t spin_us;
    sem_t *req_sem;
    sem_t *free_sem;
    uint64_t *reap_seen;        /* ctl seen by the previous reap, per slot */
    uint64_t *held;             /* per slot: worker pid << 32 | generation + 1; shared
                                   by the oracle's worker processes, never by clients */
    /* socket */
    int epfd;
    int ctl_fd;
    int listening;
    uid_t peer_uid;             /* peers allowed: this uid, root, and members of peer_gid */
    int64_t peer_gid;           /* -1: no group */
};

/* common.c */
int shmkey_status_from_errno(int err);
int shmkey_check_ring_id(const char *id);
uint64_t shmkey_now_ns(void);
pid_t shmkey_self_pid(void);
void shmkey_deadline(struct timespec *ts, uint64_t deadline_ns);
int shmkey_pid_alive(pid_t pid);
uint32_t shmkey_ncpu(void);

static inline void shmkey_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

/* ring.c */
int shmkey_shm_call(struct shmkey_client *c, const struct shmkey_req *req,
                    const uint8_t *in, uint8_t *out, uint32_t out_cap,
                    struct shmkey_resp *resp, uint64_t deadline_ns);
void shmkey_shm_client_close(struct shmkey_client *c);
int shmkey_shm_server_next(struct shmkey_server *s, struct shmkey_work *w,
                           uint32_t timeout_ms);
int shmkey_shm_server_reply(struct shmkey_server *s, struct shmkey_work *w,
                            int32_t status, const uint8_t *out, uint32_t out_len);
void shmkey_shm_server_stop(struct shmkey_server *s);
void shmkey_shm_server_close(struct shmkey_server *s);

/* sock.c */
int shmkey_sock_call(struct shmkey_client *c, const struct shmkey_req *req,
                     const uint8_t *in, uint8_t *out, uint32_t out_cap,
                     struct shmkey_resp *resp, uint64_t deadline_ns);
void shmkey_sock_client_close(struct shmkey_client *c);
int shmkey_sock_server_next(struct shmkey_server *s, struct shmkey_work *w,
                            uint32_t timeout_ms);
int shmkey_sock_server_reply(struct shmkey_server *s, struct shmkey_work *w,
                             int32_t status, const uint8_t *out, uint32_t out_len);
void shmkey_sock_server_close(struct shmkey_server *s);
int shmkey_send_fd(int ctl_fd, int fd);

#endif

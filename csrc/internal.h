/*
 * internal.h - private state of the C layer: the client and server handles,
 * their connections, and small helpers shared by the .c files.
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
#include <sys/mman.h>
#include <sys/types.h>
#include <time.h>

#include "shmkey.h"

/* The last SHMKEY_E* status (shmkey.h): where C range checks over them end. */
#define SHMKEY_ELAST SHMKEY_EBUSY

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
               "ctl packs state in the low word");
_Static_assert(sizeof(struct shmkey_slot) % 8 == 0, "slot header alignment");
_Static_assert(sizeof(struct shmkey_status) <= 4096, "the status page is one page");

#define SHMKEY_ALIGN 64u
#define SHMKEY_STATUS_SIZE 4096u
/* Seals every ring carries; the status page is also sealed against writes. */
#define SHMKEY_RING_SEALS (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)

/* ===================================================================== */
/* client                                                                */
/* ===================================================================== */

/*
 * A ring connection as the client holds it: its socket (the trusted
 * channel, and the liveness signal), the mapped ring, the read-only status
 * page and one wake-up socketpair per slot. Shared by the client's threads, kept
 * alive by references, replaced when the oracle hangs up.
 */
struct expect {
    uint64_t shape, ns;         /* atomic: a request shape, how long it takes (0: not known) */
};

#define CRING_EXPECT 8

struct cring {
    int refs;                   /* atomic */
    int dead;                   /* atomic: the oracle hung up */
    pid_t pid;                  /* process that opened it */
    int sock;
    uint8_t *base;
    size_t map_len;
    const struct shmkey_status *status;
    uint32_t nslots, slot_size, stride, spin_us, ncpu, proc, nprocs;
    int *wake;                  /* per slot: our end of the slot's wake-up socketpair */
    uint32_t spinning;          /* this process's threads spinning on it (atomic) */
    uint8_t *taken;             /* per slot, atomic: one of this process's threads has it */
    uint32_t slot_waiters;      /* threads asleep for a slot (atomic) */
    pthread_mutex_t lock;       /* for those sleepers only */
    pthread_cond_t cond;
    struct expect expect[CRING_EXPECT];     /* by request shape, this process's (a hint) */
};

struct shmkey_client {
    int transport;
    pid_t owner_pid;            /* process that opened it; a forked child reconnects */
    uint32_t max_payload;
    int64_t oracle_uid;         /* who may serve us: SHMKEY_UID_* or a uid */
    int exact_uid;
    uid_t peer_uid;             /* of the oracle, from SO_PEERCRED */
    pid_t peer_pid;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int ctl_fd;                 /* SOCK_SEQPACKET to a forked oracle, or -1 */
    char path[108];             /* socket path to connect to, or "" */
    char why[256];              /* why the latest reconnection failed */
    /* shm */
    struct cring *ring;         /* current ring, or NULL until (re)connected */
    /* socket */
    int idle[SHMKEY_MAX_SOCKET_CONNS];
    int nidle;
    int nopen;
};

/* ===================================================================== */
/* oracle                                                                */
/* ===================================================================== */

enum { CONN_HELLO = 1, CONN_RING, CONN_FRAMES };

/*
 * One client connection as the oracle sees it. Workers find ring
 * connections in the table without a lock; a retired connection is freed
 * only when every worker has passed a quiescent point since (see qs below),
 * so none can still be looking at it. Its descriptors stay open until then,
 * so their numbers cannot be reused under a worker's feet.
 */
struct sconn {
    int fd;
    int state;
    int dead;                   /* atomic: retired */
    int armed;                  /* its fd waits in epoll for the next event */
    uint64_t deadline_ns;       /* a hello or a message must be complete by then; 0: none */
    uint32_t have;              /* bytes of the hello or message read so far */
    uint8_t hello[sizeof(struct shmkey_hello)];
    uint8_t head[4 + sizeof(struct shmkey_req)];   /* socket message: length, request */
    uint8_t *buf;               /* socket message: its payload, slot_size bytes */
    uid_t uid;
    pid_t pid;
    uint64_t serial;            /* unique within the oracle: worker process in the top bits */
    int announced;              /* an OPENED event was queued: CLOSED follows */
    char comm[16];              /* the client's process name, read when it connected */
    uint64_t *stats_row;        /* atomic: its counters, once Python gave it a row */
    /* ring */
    uint8_t *base;
    size_t map_len;
    int *wake;                  /* per slot: the oracle's end of the slot's wake-up socketpair */
    uint32_t next_slot;         /* atomic: where the next scan of this ring starts */
    /* retirement */
    uint64_t snap[SHMKEY_MAX_PROCS];    /* the workers' grace counters when it was retired */
    struct sconn *next_dead;
};

/* A worker's grace-period counter: odd while it may hold connection pointers. */
struct qs_slot {
    uint64_t v;
    uint8_t pad[56];
};

struct shmkey_server {
    volatile int stopping;
    int listening;
    int lfd;                    /* listening socket, or control socket of an owned oracle */
    int epfd;
    int kick;                   /* eventfd, ours alone: more work than awake workers */
    int stop_fd;                /* eventfd, ours alone: readable once stopping */
    int transport;              /* what SHMKEY_TRANSPORT_ANY means */
    uint32_t nslots, slot_size, stride, spin_us, ncpu;
    pid_t oracle_pid;
    uid_t peer_uid;             /* peers allowed: this uid, root, and members of peer_gid */
    int64_t peer_gid;           /* -1: no group */
    struct shmkey_status *status;
    int status_fd;
    uint32_t proc, nprocs;
    pthread_mutex_t lock;       /* the table's writers, the graveyard, accepting */
    struct sconn *conns[SHMKEY_MAX_CONNS];
    uint32_t hw;                /* entries in use are below this (atomic) */
    uint32_t nconns;
    uint32_t nrings;            /* connections that are rings (atomic): worth spinning for */
    struct sconn *grave;
    uint64_t next_reap_ns;
    uint32_t nqs;               /* workers registered (atomic) */
    struct qs_slot qs[SHMKEY_MAX_PROCS];
    uint64_t last_work_ns;      /* atomic: when a worker last took a request; spin only soon after */
    uint64_t next_serial;       /* under lock */
    struct shmkey_conn_event events[SHMKEY_MAX_EVENTS];  /* a queue, under lock */
    uint32_t ev_head, ev_count;
    uint64_t ev_dropped;
    pthread_mutex_t signer_lock;    /* swapping the signer, taking a reference on it */
    struct shmkey_signer *signer;   /* keys signed in C; NULL: Python signs all */
};

/* ===================================================================== */
/* helpers                                                               */
/* ===================================================================== */

/* common.c */
int shmkey_status_from_errno(int err);
uint64_t shmkey_now_ns(void);
pid_t shmkey_self_pid(void);
void shmkey_deadline(struct timespec *ts, uint64_t deadline_ns);
uint32_t shmkey_ncpu(void);
void shmkey_why(char *why, uint32_t whylen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void shmkey_user_name(uint32_t uid, char *out, size_t cap);

static inline void shmkey_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

/* One spin's clock: its budget, and when it last looked around. */
struct shmkey_spin {
    uint64_t last, end, look;
    uint32_t crowded;           /* looks in a row that saw more tasks than cores */
    int yield;                  /* let others on this core run at each look */
};
void shmkey_spin_begin(struct shmkey_spin *sp, uint32_t budget_us, int yield);
/* Stop spinning at the end of the budget, when the spinners want more cores
 * than exist, when preempted, or when the kernel has tasks waiting for a core. */
int shmkey_spin_should_stop(struct shmkey_spin *sp, uint32_t busy, uint32_t ncpu);
uint32_t shmkey_runnable(void);
uint32_t shmkey_status_active(const struct shmkey_status *st, uint32_t nprocs);

/* conn.c: connections, both sides */
int shmkey_conn_dial(struct shmkey_client *c, int transport, uint64_t deadline_ns,
                     struct shmkey_welcome *wel, int *fds, uint32_t maxfds, int *sock_out,
                     char *why, uint32_t whylen);
void shmkey_close_fds(int *fds, uint32_t n);
int shmkey_send_fd(int ctl_fd, int fd);
void shmkey_sconn_retire(struct shmkey_server *s, struct sconn *k);
void shmkey_server_online(struct shmkey_server *s, struct shmkey_work *w, int online);
void shmkey_server_quiescent(struct shmkey_server *s, struct shmkey_work *w);
int shmkey_server_wait(struct shmkey_server *s, struct shmkey_work *w, uint64_t deadline);
int shmkey_server_peek(struct shmkey_server *s, struct shmkey_work *w);
int shmkey_sconn_rearm(struct shmkey_server *s, struct sconn *k);
/* One non-blocking recv from a peer: > 0 bytes read; 0 when there is nothing
 * to do now (no data yet: re-armed; hang-up or error: retired). */
ssize_t shmkey_sconn_recv(struct shmkey_server *s, struct sconn *k, void *dst, size_t want);

/* ring.c */
int shmkey_ring_create(struct shmkey_server *s, struct sconn *k, int *fds, uint32_t *nfds);
void shmkey_ring_unmap(struct shmkey_server *s, struct sconn *k);
int shmkey_cring_attach(int sock, const struct shmkey_welcome *wel, int *fds, uint32_t nfds,
                        struct cring **out, char *why, uint32_t whylen);
void shmkey_cring_put(struct cring *r);
void shmkey_cring_forget(struct cring *r);
int shmkey_shm_call(struct shmkey_client *c, const struct shmkey_req *req,
                    const uint8_t *in, uint8_t *out, uint32_t out_cap,
                    struct shmkey_resp *resp, uint64_t deadline_ns);
int shmkey_shm_submit(struct shmkey_client *c, const struct shmkey_req *req,
                      const uint8_t *in, uint64_t deadline_ns, struct shmkey_ticket *t);
int shmkey_shm_collect(struct shmkey_ticket *t, uint8_t *out, uint32_t out_cap,
                       struct shmkey_resp *resp);
void shmkey_shm_abandon(struct shmkey_ticket *t);
int shmkey_ring_claim(struct shmkey_server *s, struct shmkey_work *w);
int shmkey_ring_spin(struct shmkey_server *s, struct shmkey_work *w);
void shmkey_ring_kick_if_more(struct shmkey_server *s);
int shmkey_ring_reply(struct shmkey_server *s, struct shmkey_work *w,
                      int32_t status, const uint8_t *out, uint32_t out_len);
void shmkey_ring_enter_active(struct shmkey_server *s, struct shmkey_work *w);
void shmkey_ring_look_begin(struct shmkey_server *s, struct shmkey_work *w);
void shmkey_ring_look_end(struct shmkey_server *s, struct shmkey_work *w);
void shmkey_ring_leave_active(struct shmkey_server *s, struct shmkey_work *w);

/* signer.c */
/* 1: w's request was signed and answered here; 0: it is Python's. */
int shmkey_signer_serve(struct shmkey_server *s, struct shmkey_work *w);
void shmkey_signer_release(struct shmkey_server *s);
/* The signature shapes the C signer makes, and its hashes as an index. */
enum { SHMKEY_SHAPE_PKCS1, SHMKEY_SHAPE_PSS, SHMKEY_SHAPE_ECDSA, SHMKEY_SHAPE_ED25519 };
#define SHMKEY_SIGNER_NHASH 3           /* SHA-256, -384, -512 */
#define SHMKEY_SIGNER_MAX_SIG 1024      /* RSA-8192; the largest signature made in C */

/* signer_token.c: the PKCS#11 part of the C signer */
struct signer_token {
    void *dl;                   /* dlopen's reference: the module stays mapped while we live */
    void *fl;                   /* its CK_FUNCTION_LIST */
    uint32_t sig_len;           /* of the token's raw signature (ECDSA: r || s) */
    unsigned long session;      /* CK_SESSION_HANDLE, 0: none; both under the server's signer_lock */
    unsigned long object;       /* CK_OBJECT_HANDLE of the private key */
};
int shmkey_token_open(struct signer_token *t, const char *module_path, uint32_t sig_len);
void shmkey_token_close(struct signer_token *t);
/* Sign w's request of shape (SHMKEY_SHAPE_*) and hash index h on the
 * token; 1 on success, 0 on any error (Python redoes it). */
int shmkey_token_sign(const struct signer_token *t, unsigned long session, unsigned long object,
                      int shape, int h, const struct shmkey_work *w, uint8_t *out,
                      size_t *out_len);

/* stats.c: a signature made in C, counted as Python counts one, and as made in C */
void shmkey_stats_signed_in_c(uint64_t *key_row, uint64_t *client_row, uint64_t elapsed_ns);

/* sock.c */
int shmkey_sock_open(struct shmkey_client *c, uint64_t deadline_ns, char *why, uint32_t whylen);
int shmkey_sock_call(struct shmkey_client *c, const struct shmkey_req *req,
                     const uint8_t *in, uint8_t *out, uint32_t out_cap,
                     struct shmkey_resp *resp, uint64_t deadline_ns);
void shmkey_sock_client_close(struct shmkey_client *c);
int shmkey_frames_read(struct shmkey_server *s, struct sconn *k, struct shmkey_work *w);
int shmkey_frames_reply(struct shmkey_server *s, struct shmkey_work *w,
                        int32_t status, const uint8_t *out, uint32_t out_len);

#endif

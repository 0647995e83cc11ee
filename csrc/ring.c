/*
 * ring.c - the shared-memory transport: one ring per client connection.
 *
 * The oracle makes each ring in a memfd sealed against shrinking, growing
 * and further seals, and hands it over the connection's socket (conn.c), so
 * no other client can reach it and nobody can truncate it under the oracle.
 * Geometry comes with the welcome; neither side reads it back from the pages.
 *
 * A client fills a FREE slot, marks it SUBMITTED and rings the doorbell (a
 * byte on the connection's socket) unless one of the oracle's workers is
 * spinning or about to scan, as the oracle's read-only status page says. A worker claims a
 * SUBMITTED slot (-> BUSY) with one CAS, copies the request out once, zeroes
 * it, and works on the copy. The reply is written under WRITING and published
 * as DONE; the worker wakes a client that sleeps (it set "waiters") with a
 * byte on the slot's wake-up socket. The client copies the reply out, zeroes
 * it, and frees the slot with a new generation. Every CAS compares the whole
 * (generation, state) word, so nobody acts on a slot that moved on.
 *
 * Waiting is adaptive: spin while the oracle's busy threads and ours leave a
 * core free (a cross-core wake-up costs ~8 us here, a spin ~0.5 us), then
 * sleep in poll() on the slot's wake-up socket and the connection: a dead
 * oracle is a hang-up, seen at once.
 */
#include "internal.h"

/* Workers spin for requests only this soon after the last one (any worker's). */
#define SPIN_RECENT_NS 100000000ull

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#define CTL(gen, state) (((uint64_t)(uint32_t)(gen) << 32) | (uint32_t)(state))
#define CTL_STATE(c) ((uint32_t)(c))
#define CTL_GEN(c) ((uint32_t)((c) >> 32))

#define COMPILER_BARRIER() __asm__ __volatile__("" ::: "memory")

/*
 * A request still unclaimed this long after we began to spin waits for a
 * worker that was asleep, and a worker woken across cores takes ~8 us here.
 * Longer means it is queued behind someone, quite possibly behind us, when
 * work outside the oracle holds the other cores. Spinning on would keep it
 * off this core for the whole spin budget; sleeping lets it in.
 */
#ifndef SPIN_UNCLAIMED_NS
#define SPIN_UNCLAIMED_NS 10000u
#endif

/* How often a thread waiting for one of its process's slots looks again. */
#define SLOT_WAIT_SLICE_NS 10000000ull

static inline struct shmkey_slot *slot_at(uint8_t *base, uint32_t stride, uint32_t i)
{
    return (struct shmkey_slot *)(base + (size_t)i * stride);
}

static inline uint8_t *payload_of(struct shmkey_slot *s)
{
    return (uint8_t *)(s + 1);
}

static inline uint64_t ctl_load(struct shmkey_slot *s)
{
    return __atomic_load_n(&s->ctl, __ATOMIC_ACQUIRE);
}

static inline int ctl_cas(struct shmkey_slot *s, uint64_t expect, uint64_t want)
{
    return __atomic_compare_exchange_n(&s->ctl, &expect, want, 0,
                                       __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* ===================================================================== */
/* client                                                                */
/* ===================================================================== */

static int sealed(int fd, int want)
{
    int seals = fcntl(fd, F_GET_SEALS);
    return seals >= 0 && (seals & want) == want;
}

#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010
#endif

static void cring_destroy(struct cring *r)
{
    if (r->base)
        munmap(r->base, r->map_len);
    if (r->status)
        munmap((void *)r->status, SHMKEY_STATUS_SIZE);
    if (r->sock >= 0)
        close(r->sock);
    if (r->wake)
        shmkey_close_fds(r->wake, r->nslots);
    pthread_mutex_destroy(&r->lock);
    pthread_cond_destroy(&r->cond);
    free(r->wake);
    free(r->taken);
    free(r);
}

void shmkey_cring_put(struct cring *r)
{
    if (r && __atomic_sub_fetch(&r->refs, 1, __ATOMIC_ACQ_REL) == 0)
        cring_destroy(r);
}

/* A forked child's copy of its parent's ring: ours to drop, never to use. */
void shmkey_cring_forget(struct cring *r)
{
    if (r)
        cring_destroy(r);
}

/*
 * Take over a ring from a welcome: check what the oracle said against what
 * the descriptors are (sizes, seals, socket types), map it, and keep only
 * the welcome's geometry from then on. fds are consumed either way.
 */
int shmkey_cring_attach(int sock, const struct shmkey_welcome *wel, int *fds, uint32_t nfds,
                        struct cring **out, char *why, uint32_t whylen)
{
    struct stat st;
    pthread_condattr_t ca;
    *out = NULL;
    if (wel->transport != SHMKEY_TRANSPORT_SHM || wel->nslots == 0 ||
        wel->nslots > SHMKEY_MAX_SLOTS || wel->slot_size < SHMKEY_MIN_SLOT_SIZE ||
        wel->slot_size > SHMKEY_MAX_SLOT_SIZE || wel->nprocs == 0 ||
        wel->nprocs > SHMKEY_MAX_PROCS || wel->proc >= wel->nprocs || wel->ncpu == 0 ||
        nfds != wel->nslots + 2) {
        shmkey_why(why, whylen, "the oracle's welcome describes no valid ring");
        shmkey_close_fds(fds, nfds);
        return SHMKEY_EPROTO;
    }
    size_t size = shmkey_ring_size(wel->nslots, wel->slot_size);
    int ok = fstat(fds[0], &st) == 0 && (size_t)st.st_size == size &&
             sealed(fds[0], SHMKEY_RING_SEALS) &&
             fstat(fds[1], &st) == 0 && (size_t)st.st_size == SHMKEY_STATUS_SIZE &&
             sealed(fds[1], SHMKEY_RING_SEALS | F_SEAL_FUTURE_WRITE);
    for (uint32_t i = 2; ok && i < nfds; i++)
        ok = fstat(fds[i], &st) == 0 && S_ISSOCK(st.st_mode);
    if (!ok) {
        shmkey_why(why, whylen, "the oracle's ring is not a sealed memfd of the announced size");
        shmkey_close_fds(fds, nfds);
        return SHMKEY_EPROTO;
    }
    struct cring *r = calloc(1, sizeof(*r));
    if (!r) {
        shmkey_close_fds(fds, nfds);
        return SHMKEY_ESYSTEM;
    }
    r->refs = 1;
    r->pid = getpid();
    r->sock = -1;
    r->nslots = wel->nslots;
    r->slot_size = wel->slot_size;
    r->stride = shmkey_slot_stride(wel->slot_size);
    r->spin_us = wel->spin_us;
    r->ncpu = wel->ncpu;
    (void)shmkey_runnable();    /* its descriptor opened now, before any sandbox */
    r->proc = wel->proc;
    r->nprocs = wel->nprocs;
    pthread_mutex_init(&r->lock, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&r->cond, &ca);
    pthread_condattr_destroy(&ca);
    r->wake = malloc(sizeof(int) * r->nslots);
    r->taken = calloc(r->nslots, 1);
    r->base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
    void *status = mmap(NULL, SHMKEY_STATUS_SIZE, PROT_READ, MAP_SHARED, fds[1], 0);
    r->map_len = size;
    r->status = status == MAP_FAILED ? NULL : status;
    if (r->base == MAP_FAILED)
        r->base = NULL;
    close(fds[0]);
    close(fds[1]);
    if (!r->wake || !r->taken || !r->base || !r->status) {
        shmkey_close_fds(fds + 2, nfds - 2);
        if (r->wake)
            memset(r->wake, 0xff, sizeof(int) * r->nslots);
        cring_destroy(r);
        return SHMKEY_ESYSTEM;
    }
    memcpy(r->wake, fds + 2, sizeof(int) * r->nslots);
    r->sock = sock;
    *out = r;
    return SHMKEY_OK;
}

/* Anything readable on a ring connection is the oracle's end: it never sends there. */
static int sock_dead(int sock)
{
    char b[64];
    ssize_t n = recv(sock, b, sizeof(b), MSG_DONTWAIT);
    return !(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR));
}

static void mark_dead_if_hung_up(struct cring *r)
{
    struct pollfd p = {.fd = r->sock, .events = POLLIN};
    if (poll(&p, 1, 0) > 0 && sock_dead(r->sock))
        __atomic_store_n(&r->dead, 1, __ATOMIC_RELEASE);
}

/*
 * Take slot i for this thread if no other thread of ours has it and the ring
 * says FREE. A DONE slot that none of ours holds is a reply nobody waits for
 * (withdrawn while its worker was still writing it): free it and take it.
 */
static int try_slot(struct cring *r, uint32_t i)
{
    struct shmkey_slot *s = slot_at(r->base, r->stride, i);
    uint32_t st = CTL_STATE(ctl_load(s));
    if (__atomic_load_n(&r->taken[i], __ATOMIC_RELAXED) ||
        (st != SHMKEY_SLOT_FREE && st != SHMKEY_SLOT_DONE))
        return 0;
    if (__atomic_exchange_n(&r->taken[i], 1, __ATOMIC_ACQUIRE))
        return 0;
    uint64_t ctl = ctl_load(s);
    if (CTL_STATE(ctl) == SHMKEY_SLOT_DONE) {
        memset(payload_of(s), 0, r->slot_size);
        ctl_cas(s, ctl, CTL(CTL_GEN(ctl) + 1, SHMKEY_SLOT_FREE));
        ctl = ctl_load(s);
    }
    if (CTL_STATE(ctl) == SHMKEY_SLOT_FREE)
        return 1;
    __atomic_store_n(&r->taken[i], 0, __ATOMIC_RELEASE);
    return 0;
}

/*
 * One of our process's slots, free in the ring too (a slot we abandoned
 * is free again once its worker is done). Sleeps when there is none: other
 * threads' releases wake us, and a slice timer covers abandoned slots.
 */
static int take_slot(struct cring *r, uint64_t deadline_ns, uint32_t *out)
{
    struct timespec ts;
    for (uint32_t i = 0; i < r->nslots; i++)
        if (try_slot(r, i)) {
            *out = i;
            return SHMKEY_OK;
        }
    pthread_mutex_lock(&r->lock);
    __atomic_add_fetch(&r->slot_waiters, 1, __ATOMIC_SEQ_CST);
    int rc;
    for (;;) {
        uint32_t i;
        for (i = 0; i < r->nslots && !try_slot(r, i); i++)
            ;
        if (i < r->nslots) {
            *out = i;
            rc = SHMKEY_OK;
            break;
        }
        if (__atomic_load_n(&r->dead, __ATOMIC_ACQUIRE)) {
            rc = SHMKEY_EUNAVAIL;
            break;
        }
        uint64_t now = shmkey_now_ns();
        if (now >= deadline_ns) {
            rc = SHMKEY_ETIMEDOUT;
            break;
        }
        uint64_t until = now + SLOT_WAIT_SLICE_NS < deadline_ns ? now + SLOT_WAIT_SLICE_NS
                                                                : deadline_ns;
        ts.tv_sec = (time_t)(until / 1000000000u);
        ts.tv_nsec = (long)(until % 1000000000u);
        pthread_cond_timedwait(&r->cond, &r->lock, &ts);
        mark_dead_if_hung_up(r);
    }
    __atomic_sub_fetch(&r->slot_waiters, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&r->lock);
    return rc;
}

static void release_slot(struct cring *r, uint32_t i)
{
    __atomic_store_n(&r->taken[i], 0, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&r->slot_waiters, __ATOMIC_SEQ_CST)) {
        pthread_mutex_lock(&r->lock);
        pthread_cond_broadcast(&r->cond);
        pthread_mutex_unlock(&r->lock);
    }
}

/*
 * Spin while it pays: a free core for us, and the reply not yet there. A
 * client that rang the doorbell (no worker spun) counts the worker it woke:
 * spinning on the core that worker needs would only delay it.
 */
static int no_core_to_spin(const struct cring *r, uint32_t mine, uint32_t woken)
{
    return shmkey_status_active(r->status, r->nprocs) + mine + woken > r->ncpu;
}

static uint64_t spin_for_reply(struct cring *r, struct shmkey_slot *s, uint32_t woken)
{
    uint64_t ctl = ctl_load(s);
    if (r->spin_us == 0 || CTL_STATE(ctl) == SHMKEY_SLOT_DONE)
        return ctl;
    uint32_t mine = __atomic_add_fetch(&r->spinning, 1, __ATOMIC_RELAXED);
    if (no_core_to_spin(r, mine, woken)) {
        __atomic_sub_fetch(&r->spinning, 1, __ATOMIC_RELAXED);
        return ctl;
    }
    struct shmkey_spin sp;
    shmkey_spin_begin(&sp, r->spin_us, 0);
    uint64_t unclaimed_until = sp.last + SPIN_UNCLAIMED_NS;
    for (unsigned i = 1;; i++) {
        ctl = ctl_load(s);
        if (CTL_STATE(ctl) == SHMKEY_SLOT_DONE)
            break;
        shmkey_cpu_relax();
        if ((i & 63) == 0) {
            uint32_t busy = shmkey_status_active(r->status, r->nprocs) +
                            __atomic_load_n(&r->spinning, __ATOMIC_RELAXED);
            if (shmkey_spin_should_stop(&sp, busy, r->ncpu) ||
                (CTL_STATE(ctl) == SHMKEY_SLOT_SUBMITTED && sp.last >= unclaimed_until) ||
                __atomic_load_n(&r->dead, __ATOMIC_RELAXED))
                break;
        }
    }
    __atomic_sub_fetch(&r->spinning, 1, __ATOMIC_RELAXED);
    return ctl;
}

/* Empty a wake-up socket; 1 if the oracle's end is closed (the oracle is gone). */
static int drain(int fd)
{
    char b[64];
    ssize_t n;
    while ((n = read(fd, b, sizeof(b))) > 0)
        if ((size_t)n < sizeof(b))
            return 0;           /* drained: one system call for the usual one byte */
    return n == 0;
}

/*
 * Sleep until slot s moves on from ctl, the oracle hangs up, or until_ns;
 * the slot's new control word. Dekker with the worker: it stores DONE, then
 * reads waiters, and rings the slot's wake-up socket if we sleep.
 */
static uint64_t sleep_for_reply(struct cring *r, struct shmkey_slot *s, uint32_t i, uint64_t ctl,
                                uint64_t until_ns)
{
    __atomic_store_n(&s->waiters, 1, __ATOMIC_SEQ_CST);
    uint64_t now = shmkey_now_ns();
    if (__atomic_load_n(&s->ctl, __ATOMIC_SEQ_CST) == ctl && now < until_ns) {
        struct pollfd p[2] = {{.fd = r->wake[i], .events = POLLIN},
                              {.fd = r->sock, .events = POLLIN}};
        uint64_t left = until_ns - now;
        struct timespec ts = {.tv_sec = (time_t)(left / 1000000000u),
                              .tv_nsec = (long)(left % 1000000000u)};
        if (ppoll(p, 2, &ts, NULL) > 0) {
            if (p[0].revents && drain(r->wake[i]))
                __atomic_store_n(&r->dead, 1, __ATOMIC_RELEASE);
            if (p[1].revents && sock_dead(r->sock))
                __atomic_store_n(&r->dead, 1, __ATOMIC_RELEASE);
        }
    }
    return ctl_load(s);
}

/*
 * Wait for slot i's reply by deadline. *lost is set when the oracle hung
 * up: 1 before any worker took the request (it may be sent again), 2 after.
 * A request expected to take longer than the spin budget (a token's RSA)
 * sleeps until shortly before doze_until, then spins for its end: a wake-up
 * from sleep costs tens of microseconds on a virtual machine's idle core.
 */
static int wait_reply(struct cring *r, struct shmkey_slot *s, uint32_t i, uint32_t gen,
                      uint64_t deadline_ns, uint32_t woken, uint64_t doze_until, int *lost)
{
    uint64_t ctl = ctl_load(s);
    /*
     * No core to spin on now means none when the doze ends, most likely: its
     * wake-up would be the first of two, and would take the core from a
     * signing worker. Sleep until the reply instead.
     */
    if (doze_until &&
        no_core_to_spin(r, __atomic_load_n(&r->spinning, __ATOMIC_RELAXED) + 1, woken))
        doze_until = 0;
    if (doze_until && CTL_STATE(ctl) != SHMKEY_SLOT_DONE) {
        ctl = sleep_for_reply(r, s, i, ctl, doze_until < deadline_ns ? doze_until : deadline_ns);
        /* Spinning now: the worker need not ring (a byte left over costs one spurious wake). */
        __atomic_store_n(&s->waiters, 0, __ATOMIC_RELAXED);
    }
    /* A wake-up left over from an earlier use costs one spurious return from poll. */
    /* After a doze, the worker we may have woken is long at work (in "active"). */
    if (CTL_STATE(ctl) != SHMKEY_SLOT_DONE)
        ctl = spin_for_reply(r, s, doze_until ? 0 : woken);
    for (;;) {
        if (CTL_GEN(ctl) != gen)
            return SHMKEY_EPROTO;       /* our own process freed our slot */
        if (CTL_STATE(ctl) == SHMKEY_SLOT_DONE)
            return SHMKEY_OK;
        if (__atomic_load_n(&r->dead, __ATOMIC_ACQUIRE)) {
            *lost = CTL_STATE(ctl) == SHMKEY_SLOT_SUBMITTED ? 1 : 2;
            return SHMKEY_EUNAVAIL;
        }
        if (shmkey_now_ns() >= deadline_ns)
            return SHMKEY_ETIMEDOUT;
        ctl = sleep_for_reply(r, s, i, ctl, deadline_ns);
    }
}

/*
 * Withdraw a request after a timeout. A request not yet picked up is freed;
 * one in progress is marked ABANDONED so the worker frees it and its reply is
 * never seen by anyone.
 */
static void withdraw(struct cring *r, struct shmkey_slot *s, uint32_t gen)
{
    uint64_t give_up = shmkey_now_ns() + 1000000ull;
    for (;;) {
        uint64_t ctl = ctl_load(s);
        if (CTL_GEN(ctl) != gen)
            return;
        switch (CTL_STATE(ctl)) {
        case SHMKEY_SLOT_SUBMITTED:
            if (ctl_cas(s, ctl, CTL(gen + 1, SHMKEY_SLOT_FREE)))
                return;
            break;
        case SHMKEY_SLOT_DONE:
            memset(payload_of(s), 0, r->slot_size);
            if (ctl_cas(s, ctl, CTL(gen + 1, SHMKEY_SLOT_FREE)))
                return;
            break;
        case SHMKEY_SLOT_BUSY:
            if (ctl_cas(s, ctl, CTL(gen, SHMKEY_SLOT_ABANDONED)))
                return;
            break;
        case SHMKEY_SLOT_WRITING:
            /* A worker is copying a reply: a memcpy. */
            if (shmkey_now_ns() > give_up)
                return;
            shmkey_cpu_relax();
            break;
        default:
            return;
        }
    }
}

/* Write the request into slot i and hand it to the oracle; 1 if we rang (woke a worker). */
static uint32_t submit_slot(struct cring *r, struct shmkey_slot *s, uint32_t gen,
                        const struct shmkey_req *req, const uint8_t *in, uint32_t waiters)
{
    s->waiters = waiters;
    memcpy(&s->req, req, sizeof(*req));
    if (req->in_len)
        memcpy(payload_of(s), in, req->in_len);
    /*
     * Dekker with spinning workers: publish the request, then look for a
     * spinner. A worker leaving its spin first stops counting itself, then
     * scans once more; so either it sees this request or we see it gone and
     * ring, which wakes a sleeper. Ringing while a worker spins would wake a
     * sleeping one for nothing, and it would preempt whoever runs there.
     */
    __atomic_store_n(&s->ctl, CTL(gen, SHMKEY_SLOT_SUBMITTED), __ATOMIC_SEQ_CST);
    uint32_t woken = __atomic_load_n(&r->status->spinners[r->proc], __ATOMIC_SEQ_CST) == 0;
    if (woken) {
        static const char bell = 'r';
        /* Full means rung already; a hang-up shows in the wait. */
        (void)send(r->sock, &bell, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
    }
    return woken;
}

/* Copy slot s's reply out, leave none of it in the ring, free the slot. */
static int take_reply(struct cring *r, struct shmkey_slot *s, uint32_t gen, uint8_t *out,
                      uint32_t out_cap, struct shmkey_resp *resp)
{
    int rc = SHMKEY_OK;
    memcpy(resp, &s->resp, sizeof(*resp));
    COMPILER_BARRIER();
    if (resp->out_len > r->slot_size || resp->out_len > out_cap)
        rc = SHMKEY_EPROTO;
    else if (resp->out_len)
        memcpy(out, payload_of(s), resp->out_len);
    memset(payload_of(s), 0, resp->out_len <= r->slot_size ? resp->out_len : r->slot_size);
    ctl_cas(s, CTL(gen, SHMKEY_SLOT_DONE), CTL(gen + 1, SHMKEY_SLOT_FREE));
    return rc;
}

/*
 * How long this process's requests of one shape (operation, parameters,
 * length, key) take, at the fast end: only a hint for how to wait.
 */
#define EXPECT_LEAD_NS 150000u   /* wake this much before: a timed sleep overshoots ~100 us here */

static struct expect *expect_of(struct cring *r, const struct shmkey_req *req)
{
    uint64_t kid;
    memcpy(&kid, req->key_id, sizeof(kid));
    uint64_t shape = ((uint64_t)req->op | (uint64_t)req->p[0] << 8 | (uint64_t)req->p[1] << 16 |
                      (uint64_t)req->in_len << 40) ^ kid;
    shape |= 1;                 /* 0 marks an empty entry */
    struct expect *e = &r->expect[((shape * 0x9e3779b97f4a7c15ull) >> 32) % CRING_EXPECT];
    if (__atomic_load_n(&e->shape, __ATOMIC_RELAXED) != shape) {
        __atomic_store_n(&e->ns, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&e->shape, shape, __ATOMIC_RELAXED);
    }
    return e;
}

static uint64_t doze_until(const struct cring *r, struct expect *e, uint64_t t0)
{
    uint64_t ns = __atomic_load_n(&e->ns, __ATOMIC_RELAXED);
    if (r->spin_us == 0 || ns <= (uint64_t)r->spin_us * 1000u || ns <= EXPECT_LEAD_NS)
        return 0;
    return t0 + ns - EXPECT_LEAD_NS;
}

static void expect_learn(struct expect *e, uint64_t took)
{
    /* Quick to fall, slow to rise: a low quantile, so that a dozing client
       is more often awake before the reply than woken by it. */
    uint64_t ns = __atomic_load_n(&e->ns, __ATOMIC_RELAXED);
    if (!ns)
        ns = took;
    else if (took < ns)
        ns -= (ns - took) / 2;
    else
        ns += (took - ns) / 16;
    __atomic_store_n(&e->ns, ns, __ATOMIC_RELAXED);
}

static int ring_call(struct cring *r, const struct shmkey_req *req, const uint8_t *in,
                     uint8_t *out, uint32_t out_cap, struct shmkey_resp *resp,
                     uint64_t deadline_ns, int *lost)
{
    uint32_t i;
    if (req->in_len > r->slot_size)
        return SHMKEY_ETOOBIG;
    int rc = take_slot(r, deadline_ns, &i);
    if (rc != SHMKEY_OK)
        return rc;
    struct shmkey_slot *s = slot_at(r->base, r->stride, i);
    uint32_t gen = CTL_GEN(ctl_load(s));
    struct expect *e = expect_of(r, req);
    uint64_t t0 = shmkey_now_ns();
    uint32_t woken = submit_slot(r, s, gen, req, in, 0);
    rc = wait_reply(r, s, i, gen, deadline_ns, woken, doze_until(r, e, t0), lost);
    if (rc == SHMKEY_OK) {
        expect_learn(e, shmkey_now_ns() - t0);
        rc = take_reply(r, s, gen, out, out_cap, resp);
    } else if (!*lost && rc != SHMKEY_EPROTO) {
        withdraw(r, s, gen);
    }
    release_slot(r, i);
    return rc;
}

/*
 * A new ring for c, c->lock held. Its buffers are on the heap: this runs
 * inside OpenSSL ASYNC jobs too, whose stacks are small.
 */
static __attribute__((noinline)) int ring_dial(struct shmkey_client *c, uint64_t deadline_ns,
                                               struct cring **out, char *why, uint32_t whylen)
{
    struct shmkey_welcome wel;
    int sock, rc;
    int *fds = malloc(sizeof(int) * (SHMKEY_MAX_SLOTS + 2));
    if (!fds)
        return SHMKEY_ESYSTEM;
    rc = shmkey_conn_dial(c, SHMKEY_TRANSPORT_SHM, deadline_ns, &wel, fds,
                          SHMKEY_MAX_SLOTS + 2, &sock, why, whylen);
    if (rc == SHMKEY_OK && wel.transport != SHMKEY_TRANSPORT_SHM) {
        shmkey_why(why, whylen, "the oracle offers no ring");
        shmkey_close_fds(fds, wel.nfds);
        close(sock);
        rc = SHMKEY_EUNAVAIL;
    } else if (rc == SHMKEY_OK) {
        rc = shmkey_cring_attach(sock, &wel, fds, wel.nfds, out, why, whylen);
        if (rc != SHMKEY_OK)
            close(sock);
    }
    free(fds);
    return rc;
}

/* The client's current ring, (re)connected if there is none or it died; referenced. */
static int ring_get(struct shmkey_client *c, uint64_t deadline_ns, struct cring **out,
                    char *why, uint32_t whylen)
{
    struct cring *old = NULL, *r;
    int rc;
    pthread_mutex_lock(&c->lock);
    if (c->owner_pid != shmkey_self_pid()) {
        /* Forked: the parent's ring is not ours; a ring is one process's alone. */
        shmkey_cring_forget(c->ring);
        c->ring = NULL;
        c->owner_pid = shmkey_self_pid();
    }
    r = c->ring;
    if (r && !__atomic_load_n(&r->dead, __ATOMIC_ACQUIRE)) {
        __atomic_add_fetch(&r->refs, 1, __ATOMIC_RELAXED);
        pthread_mutex_unlock(&c->lock);
        *out = r;
        return SHMKEY_OK;
    }
    old = r;
    c->ring = NULL;
    rc = ring_dial(c, deadline_ns, &r, why, whylen);
    if (rc == SHMKEY_OK) {
        c->ring = r;
        c->max_payload = r->slot_size;
        __atomic_add_fetch(&r->refs, 1, __ATOMIC_RELAXED);
        *out = r;
    } else {
        snprintf(c->why, sizeof(c->why), "%s", why ? why : "");
    }
    pthread_mutex_unlock(&c->lock);
    shmkey_cring_put(old);
    return rc;
}

int shmkey_shm_open(struct shmkey_client *c, uint64_t deadline_ns, char *why, uint32_t whylen)
{
    struct cring *r;
    int rc = ring_get(c, deadline_ns, &r, why, whylen);
    if (rc == SHMKEY_OK)
        shmkey_cring_put(r);
    return rc;
}

int shmkey_shm_call(struct shmkey_client *c, const struct shmkey_req *req,
                    const uint8_t *in, uint8_t *out, uint32_t out_cap,
                    struct shmkey_resp *resp, uint64_t deadline_ns)
{
    static const char died[] = "the oracle worker serving this request died";
    struct cring *r;
    char why[256];
    int lost = 0;
    int rc = ring_get(c, deadline_ns, &r, why, sizeof(why));
    if (rc != SHMKEY_OK)
        return rc;
    rc = ring_call(r, req, in, out, out_cap, resp, deadline_ns, &lost);
    shmkey_cring_put(r);
    if (lost == 1) {
        /* The connection was dead before any worker saw the request (the oracle
           restarted since our last call): send it again, on a new connection. */
        if ((rc = ring_get(c, deadline_ns, &r, why, sizeof(why))) != SHMKEY_OK)
            return rc;
        lost = 0;
        rc = ring_call(r, req, in, out, out_cap, resp, deadline_ns, &lost);
        shmkey_cring_put(r);
    }
    if (!lost)
        return rc;
    /*
     * The connection died with our request in a worker's hands. If the oracle
     * answers a new one, only the process serving us died (a worker process):
     * say so, as the reply. Otherwise the oracle is gone.
     */
    if ((rc = ring_get(c, deadline_ns, &r, why, sizeof(why))) != SHMKEY_OK)
        return rc == SHMKEY_EIDENTITY || rc == SHMKEY_EACCESS ? rc : SHMKEY_EUNAVAIL;
    shmkey_cring_put(r);
    resp->status = SHMKEY_EINTERNAL;
    resp->out_len = out_cap >= sizeof(died) - 1 ? (uint32_t)sizeof(died) - 1 : 0;
    memcpy(out, died, resp->out_len);
    return SHMKEY_OK;
}

/* Slots free for this process right now (0 while it has no ring). */
int shmkey_shm_free_slots(struct shmkey_client *c)
{
    int n = 0;
    pthread_mutex_lock(&c->lock);
    struct cring *r = c->owner_pid == shmkey_self_pid() ? c->ring : NULL;
    if (r)
        for (uint32_t i = 0; i < r->nslots; i++)
            n += !__atomic_load_n(&r->taken[i], __ATOMIC_RELAXED) &&
                 CTL_STATE(ctl_load(slot_at(r->base, r->stride, i))) == SHMKEY_SLOT_FREE;
    pthread_mutex_unlock(&c->lock);
    return n;
}

void shmkey_shm_client_close(struct shmkey_client *c)
{
    if (c->owner_pid == shmkey_self_pid())
        shmkey_cring_put(c->ring);
    else
        shmkey_cring_forget(c->ring);
    c->ring = NULL;
}

/*
 * The non-blocking call. A ticket holds its slot (this process's flag for
 * it) and a reference on its ring until it is collected or abandoned, so no
 * other request of ours can take that slot, and the generation it carries
 * matches only its own reply. The worker always wakes it (waiters is set
 * before the request is published): its fd, the slot's wake-up socket, is
 * then readable, and stays readable (EOF) once the oracle is gone.
 */
int shmkey_shm_submit(struct shmkey_client *c, const struct shmkey_req *req,
                      const uint8_t *in, uint64_t deadline_ns, struct shmkey_ticket *t)
{
    struct cring *r;
    char why[256];
    t->ring = NULL;
    t->fd = -1;
    int rc = ring_get(c, deadline_ns, &r, why, sizeof(why));
    if (rc != SHMKEY_OK)
        return rc;
    if (req->in_len > r->slot_size) {
        shmkey_cring_put(r);
        return SHMKEY_ETOOBIG;
    }
    uint32_t i;
    for (i = 0; i < r->nslots && !try_slot(r, i); i++)
        ;
    if (i == r->nslots) {
        shmkey_cring_put(r);
        return SHMKEY_EBUSY;
    }
    struct shmkey_slot *s = slot_at(r->base, r->stride, i);
    uint32_t gen = CTL_GEN(ctl_load(s));
    if (drain(r->wake[i])) {            /* a wake-up left over from an earlier use, or EOF */
        __atomic_store_n(&r->dead, 1, __ATOMIC_RELEASE);
        release_slot(r, i);
        shmkey_cring_put(r);
        return SHMKEY_EUNAVAIL;
    }
    submit_slot(r, s, gen, req, in, 1);
    t->ring = r;
    t->slot = i;
    t->gen = gen;
    t->deadline_ns = deadline_ns;
    t->fd = r->wake[i];
    return SHMKEY_OK;
}

static void ticket_done(struct shmkey_ticket *t)
{
    struct cring *r = t->ring;
    release_slot(r, t->slot);
    shmkey_cring_put(r);
    t->ring = NULL;
    t->fd = -1;
}

int shmkey_shm_collect(struct shmkey_ticket *t, uint8_t *out, uint32_t out_cap,
                       struct shmkey_resp *resp)
{
    struct cring *r = t->ring;
    struct shmkey_slot *s = slot_at(r->base, r->stride, t->slot);
    uint64_t ctl = ctl_load(s);
    int rc;
    if (CTL_STATE(ctl) != SHMKEY_SLOT_DONE && CTL_GEN(ctl) == t->gen) {
        /* Drain, then look again: a worker stores DONE before it sends its byte. */
        if (drain(t->fd))
            __atomic_store_n(&r->dead, 1, __ATOMIC_RELEASE);
        ctl = ctl_load(s);
    }
    if (CTL_GEN(ctl) != t->gen) {
        rc = SHMKEY_EPROTO;             /* our own process freed our slot */
    } else if (CTL_STATE(ctl) == SHMKEY_SLOT_DONE) {
        rc = take_reply(r, s, t->gen, out, out_cap, resp);
    } else if (__atomic_load_n(&r->dead, __ATOMIC_ACQUIRE)) {
        rc = SHMKEY_EUNAVAIL;
    } else if (shmkey_now_ns() >= t->deadline_ns) {
        withdraw(r, s, t->gen);
        rc = SHMKEY_ETIMEDOUT;
    } else {
        return SHMKEY_EPENDING;
    }
    ticket_done(t);
    return rc;
}

void shmkey_shm_abandon(struct shmkey_ticket *t)
{
    struct cring *r = t->ring;
    withdraw(r, slot_at(r->base, r->stride, t->slot), t->gen);
    ticket_done(t);
}

/* ===================================================================== */
/* oracle                                                                */
/* ===================================================================== */

/*
 * A new ring for connection k: a memfd of exactly its slots, sealed, mapped
 * by the oracle, and one wake-up socketpair per slot. fds receives what the
 * welcome carries: the memfd, the status page, the client's wake-up ends.
 */
int shmkey_ring_create(struct shmkey_server *s, struct sconn *k, int *fds, uint32_t *nfds)
{
    size_t size = shmkey_ring_size(s->nslots, s->slot_size);
    *nfds = 0;
    int mfd = memfd_create("shmkey-ring", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (mfd < 0)
        return SHMKEY_ESYSTEM;
    if (ftruncate(mfd, (off_t)size) != 0 ||
        fcntl(mfd, F_ADD_SEALS, SHMKEY_RING_SEALS) != 0 ||
        (k->wake = malloc(sizeof(int) * s->nslots)) == NULL) {
        close(mfd);
        return SHMKEY_ESYSTEM;
    }
    memset(k->wake, 0xff, sizeof(int) * s->nslots);
    k->base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    if (k->base == MAP_FAILED) {
        k->base = NULL;
        close(mfd);
        return SHMKEY_ESYSTEM;
    }
    k->map_len = size;
    fds[0] = mfd;
    fds[1] = s->status_fd;
    *nfds = 2;
    for (uint32_t i = 0; i < s->nslots; i++) {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) != 0) {
            for (uint32_t j = 2; j < *nfds; j++)
                close(fds[j]);
            close(mfd);
            *nfds = 0;
            return SHMKEY_ESYSTEM;
        }
        /* Only a byte at a time ever crosses; keep the buffers small. */
        int small = 1024;
        (void)setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));
        k->wake[i] = sv[0];
        fds[(*nfds)++] = sv[1];
    }
    for (uint32_t i = 0; i < s->nslots; i++)
        slot_at(k->base, s->stride, i)->ctl = CTL(1, SHMKEY_SLOT_FREE);
    return SHMKEY_OK;
}

void shmkey_ring_unmap(struct shmkey_server *s, struct sconn *k)
{
    if (k->base)
        munmap(k->base, k->map_len);
    k->base = NULL;
    if (k->wake) {
        shmkey_close_fds(k->wake, s->nslots);
        free(k->wake);
        k->wake = NULL;
    }
}

void shmkey_ring_enter_active(struct shmkey_server *s, struct shmkey_work *w)
{
    if (!w->active) {
        __atomic_add_fetch(&s->status->active[s->proc], 1, __ATOMIC_RELAXED);
        w->active = 1;
    }
}

void shmkey_ring_leave_active(struct shmkey_server *s, struct shmkey_work *w)
{
    if (w->active) {
        __atomic_sub_fetch(&s->status->active[s->proc], 1, __ATOMIC_RELAXED);
        w->active = 0;
    }
}

/*
 * A worker that will look at the rings before it sleeps counts itself with
 * the spinners, so that clients do not ring for it: from just before it
 * publishes a reply made in C (the client's next request may come before it
 * looks again) until it claims one, or until its last scan before sleeping.
 * Under load the worker is then rarely woken, and never for a request it
 * would have found anyway.
 */
void shmkey_ring_look_begin(struct shmkey_server *s, struct shmkey_work *w)
{
    if (!w->looking) {
        __atomic_add_fetch(&s->status->spinners[s->proc], 1, __ATOMIC_SEQ_CST);
        w->looking = 1;
    }
}

/* Then the caller scans once more (the other half of the Dekker pair in submit_slot). */
void shmkey_ring_look_end(struct shmkey_server *s, struct shmkey_work *w)
{
    if (w->looking) {
        __atomic_sub_fetch(&s->status->spinners[s->proc], 1, __ATOMIC_SEQ_CST);
        w->looking = 0;
    }
}

/* Copy the claimed request out once, zero it in the ring, validate the copy. */
static int take(struct shmkey_server *s, struct shmkey_work *w, struct sconn *k, uint32_t j,
                uint64_t ctl)
{
    struct shmkey_slot *sl = slot_at(k->base, s->stride, j);
    shmkey_ring_enter_active(s, w);
    __atomic_store_n(&s->last_work_ns, shmkey_now_ns(), __ATOMIC_RELAXED);
    w->conn = k;
    w->slot = j;
    w->gen = CTL_GEN(ctl);
    memcpy(&w->req, &sl->req, sizeof(w->req));
    COMPILER_BARRIER();
    uint32_t n = w->req.in_len;
    if (n > s->slot_size || n > w->cap) {
        shmkey_ring_reply(s, w, SHMKEY_ETOOBIG, NULL, 0);
        return -1;
    }
    memcpy(w->payload, payload_of(sl), n);
    COMPILER_BARRIER();
    memset(payload_of(sl), 0, n);
    if (w->req.op == SHMKEY_OP_PING) {
        shmkey_ring_reply(s, w, SHMKEY_OK, w->payload, n);
        return -1;
    }
    /* Busy now; a request that came meanwhile is kick_if_more's to see. */
    shmkey_ring_look_end(s, w);
    return 1;
}

/*
 * Claim a SUBMITTED slot in any ring, starting where the last scan left off
 * so that no client waits behind another, nor a client's thread behind its
 * other threads. 1: w holds a request for Python;
 * -1: one was answered here (a ping, or a malformed one); 0: none waiting.
 */
int shmkey_ring_claim(struct shmkey_server *s, struct shmkey_work *w)
{
    uint32_t hw = __atomic_load_n(&s->hw, __ATOMIC_ACQUIRE);
    if (hw == 0)
        return 0;
    uint32_t start = w->cursor;
    for (uint32_t n = 0; n < hw; n++) {
        uint32_t at = (start + n) % hw;
        struct sconn *k = __atomic_load_n(&s->conns[at], __ATOMIC_ACQUIRE);
        if (!k || __atomic_load_n(&k->state, __ATOMIC_ACQUIRE) != CONN_RING ||
            __atomic_load_n(&k->dead, __ATOMIC_RELAXED))
            continue;
        /*
         * Within a ring, too, from the slot after the last one claimed: a
         * client's threads reuse its lowest free slots, which a scan from
         * slot 0 would serve first for as long as more requests came than
         * workers, while a higher slot waited all that time.
         */
        uint32_t first = __atomic_load_n(&k->next_slot, __ATOMIC_RELAXED);
        for (uint32_t m = 0; m < s->nslots; m++) {
            uint32_t j = (first + m) % s->nslots;
            struct shmkey_slot *sl = slot_at(k->base, s->stride, j);
            uint64_t ctl = ctl_load(sl);
            if (CTL_STATE(ctl) == SHMKEY_SLOT_SUBMITTED &&
                ctl_cas(sl, ctl, CTL(CTL_GEN(ctl), SHMKEY_SLOT_BUSY))) {
                w->cursor = at + 1;     /* the next scan starts with the next client */
                __atomic_store_n(&k->next_slot, j + 1, __ATOMIC_RELAXED);
                return take(s, w, k, j, ctl);
            }
        }
    }
    return 0;
}

/* After taking a request: wake another worker if more wait and nobody spins for them. */
void shmkey_ring_kick_if_more(struct shmkey_server *s)
{
    static const uint64_t one = 1;
    if (__atomic_load_n(&s->status->spinners[s->proc], __ATOMIC_SEQ_CST))
        return;
    uint32_t hw = __atomic_load_n(&s->hw, __ATOMIC_ACQUIRE);
    for (uint32_t n = 0; n < hw; n++) {
        struct sconn *k = __atomic_load_n(&s->conns[n], __ATOMIC_ACQUIRE);
        if (!k || __atomic_load_n(&k->state, __ATOMIC_ACQUIRE) != CONN_RING)
            continue;
        for (uint32_t j = 0; j < s->nslots; j++)
            if (CTL_STATE(ctl_load(slot_at(k->base, s->stride, j))) == SHMKEY_SLOT_SUBMITTED) {
                (void)write(s->kick, &one, sizeof(one));
                return;
            }
    }
}

/* A worker that was looking and will not spin: its last scan before it sleeps. */
static int stop_looking(struct shmkey_server *s, struct shmkey_work *w)
{
    if (!w->looking)
        return 0;
    shmkey_ring_look_end(s, w);
    shmkey_server_quiescent(s, w);
    return shmkey_ring_claim(s, w);
}

static uint32_t all_spinners(const struct shmkey_server *s)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < s->nprocs; i++)
        n += __atomic_load_n(&s->status->spinners[i], __ATOMIC_RELAXED);
    return n;
}

/*
 * Spin for a request while cores are to spare and no other worker spins
 * (one spinner finds every ring's requests),
 * counted in the status page's spinners so that clients do not ring (and
 * wake a sleeping worker) meanwhile. Pings found while spinning are answered
 * and the spin goes on; every few microseconds it looks for socket messages
 * and new connections too. Returns as shmkey_ring_claim, or 2 with a socket
 * request in w.
 */
int shmkey_ring_spin(struct shmkey_server *s, struct shmkey_work *w)
{
    if (s->spin_us == 0 || __atomic_load_n(&s->nrings, __ATOMIC_RELAXED) == 0 ||
        all_spinners(s) > w->looking)
        return stop_looking(s, w);
    /* An idle oracle sleeps: spinning pays only while requests keep coming. */
    if (shmkey_now_ns() - __atomic_load_n(&s->last_work_ns, __ATOMIC_RELAXED) >
        SPIN_RECENT_NS)
        return stop_looking(s, w);
    /*
     * Busy workers other than us, plus us, plus a client that may be spinning
     * for its reply (no oracle can see its clients spin: that is theirs to
     * know), must fit the cores. Our own count is in "active" while we were
     * computing.
     */
    uint32_t others = shmkey_status_active(s->status, s->nprocs) - (w->active ? 1 : 0);
    if (others + 2 > s->ncpu)
        return stop_looking(s, w);
    shmkey_ring_enter_active(s, w);
    shmkey_ring_look_begin(s, w);
    int rc = 0;
    struct shmkey_spin sp;
    shmkey_spin_begin(&sp, s->spin_us, 1);
    for (unsigned i = 1;; i++) {
        shmkey_server_quiescent(s, w);
        rc = shmkey_ring_claim(s, w);
        if (rc > 0)
            break;
        if (rc < 0)
            sp.end = shmkey_now_ns() + (uint64_t)s->spin_us * 1000u;
        shmkey_cpu_relax();
        if ((i & 255) == 0 && shmkey_server_peek(s, w) == 1) {
            rc = 2;
            break;
        }
        if ((i & 15) == 0 &&
            (s->stopping ||
             shmkey_spin_should_stop(&sp, shmkey_status_active(s->status, s->nprocs) + 1, s->ncpu)))
            break;
    }
    if (rc == 0) {
        rc = stop_looking(s, w);
    } else if (rc == 2) {
        /* w holds a socket request: whatever came on the rings meanwhile is another's. */
        shmkey_ring_look_end(s, w);
        shmkey_ring_kick_if_more(s);
    }
    return rc;
}

/*
 * Publish the reply for w's slot if the request still stands. If the client
 * abandoned it, free the slot instead; the reply is dropped unseen. A
 * connection already retired is still mapped (the grace period), so this is
 * harmless there.
 */
int shmkey_ring_reply(struct shmkey_server *s, struct shmkey_work *w,
                      int32_t status, const uint8_t *out, uint32_t out_len)
{
    struct sconn *k = w->conn;
    if (!k || w->slot >= s->nslots)
        return SHMKEY_EINVAL;
    struct shmkey_slot *sl = slot_at(k->base, s->stride, w->slot);
    uint32_t gen = (uint32_t)w->gen;
    w->conn = NULL;
    if (out_len > s->slot_size) {
        status = SHMKEY_EINTERNAL;
        out_len = 0;
    }
    if (!ctl_cas(sl, CTL(gen, SHMKEY_SLOT_BUSY), CTL(gen, SHMKEY_SLOT_WRITING))) {
        uint64_t ctl = ctl_load(sl);
        if (ctl == CTL(gen, SHMKEY_SLOT_ABANDONED))
            ctl_cas(sl, ctl, CTL(gen + 1, SHMKEY_SLOT_FREE));
        return SHMKEY_OK;
    }
    if (out_len)
        memcpy(payload_of(sl), out, out_len);
    sl->resp.status = status;
    sl->resp.out_len = out_len;
    __atomic_store_n(&sl->ctl, CTL(gen, SHMKEY_SLOT_DONE), __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&sl->waiters, __ATOMIC_SEQ_CST)) {
        static const char ready = 'd';
        /* Full means woken already; per call, so no client can make it block. */
        (void)send(k->wake[w->slot], &ready, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
    }
    return SHMKEY_OK;
}

/*
 * ring.c - the shared-memory transport.
 *
 * A client takes a free-slot token (semaphore "free"), claims a FREE slot with
 * one CAS, writes its request, marks it SUBMITTED and posts "req". A worker
 * takes a "req" token, claims a SUBMITTED slot (-> BUSY), copies the request
 * out once and works on the copy. The reply is written under WRITING and
 * published as DONE; the client copies it out and frees the slot with a new
 * generation. Every CAS compares the whole (generation, state) word, so no
 * party can act on a slot that moved on without it.
 *
 * Waiting is adaptive: spin while the ring's spinners and workers leave a
 * core free (a cross-core wake-up costs ~8 us here, a spin ~0.5 us), then
 * sleep on a futex (the reply) or a semaphore (tokens) in short slices so
 * that a dead oracle is noticed within SHMKEY_LIVENESS_SLICE_MS.
 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define CTL(gen, state) (((uint64_t)(uint32_t)(gen) << 32) | (uint32_t)(state))
#define CTL_STATE(c) ((uint32_t)(c))
#define CTL_GEN(c) ((uint32_t)((c) >> 32))

/* A CLAIMED slot unchanged this many reaps has lost its client for good. */
#define REAP_STALE_ROUNDS 20

#define COMPILER_BARRIER() __asm__ __volatile__("" ::: "memory")

static inline struct shmkey_ring_hdr *hdr_of(uint8_t *base)
{
    return (struct shmkey_ring_hdr *)base;
}

static inline struct shmkey_slot *slot_at(uint8_t *base, uint32_t off,
                                          uint32_t stride, uint32_t i)
{
    return (struct shmkey_slot *)(base + off + (size_t)i * stride);
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

/* The futex word is the state half of ctl (little-endian: the low word). */
static inline uint32_t *ctl_futex(struct shmkey_slot *s)
{
    return (uint32_t *)&s->ctl;
}

static void futex_wait_ns(uint32_t *addr, uint32_t val, uint64_t ns)
{
    struct timespec ts = {(time_t)(ns / 1000000000u), (long)(ns % 1000000000u)};
    (void)syscall(SYS_futex, addr, FUTEX_WAIT, val, &ts, NULL, 0);
}

static void futex_wake_all(uint32_t *addr)
{
    (void)syscall(SYS_futex, addr, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* ===================================================================== */
/* client                                                                */
/* ===================================================================== */

/*
 * Attach to the ring "/ID" with semaphores "/ID-req" and "/ID-free", where
 * ID is what shmkey_ring_id makes of an oracle's name (nothing else is
 * accepted: it becomes a file name in /dev/shm). The header is validated against the mapping's real size, and only the
 * validated private copy is used afterwards.
 */
int shmkey_client_open_shm(const char *name, struct shmkey_client **out)
{
    char path[256];
    struct stat st;
    struct shmkey_ring_hdr h;
    int rc = SHMKEY_ESYSTEM;

    *out = NULL;
    if (shmkey_check_ring_id(name) != SHMKEY_OK)
        return SHMKEY_EINVAL;
    struct shmkey_client *c = calloc(1, sizeof(*c));
    if (!c)
        return SHMKEY_ESYSTEM;
    c->transport = SHMKEY_TRANSPORT_SHM;
    c->owner_pid = getpid();
    c->ctl_fd = -1;
    c->req_sem = c->free_sem = SEM_FAILED;

    snprintf(path, sizeof(path), "/%s", name);
    int fd = shm_open(path, O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) {
        rc = shmkey_status_from_errno(errno);
        goto fail;
    }
    if (fstat(fd, &st) != 0 || (size_t)st.st_size < sizeof(h)) {
        close(fd);
        rc = SHMKEY_EPROTO;
        goto fail;
    }
    c->map_len = (size_t)st.st_size;
    c->base = mmap(NULL, c->map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (c->base == MAP_FAILED) {
        c->base = NULL;
        goto fail;
    }
    /* The oracle publishes magic last: zero means it is still setting up. */
    if (__atomic_load_n(&hdr_of(c->base)->magic, __ATOMIC_ACQUIRE) == 0) {
        rc = SHMKEY_EUNAVAIL;
        goto fail;
    }
    memcpy(&h, c->base, sizeof(h));
    COMPILER_BARRIER();
    if (h.magic != SHMKEY_MAGIC || h.version != SHMKEY_VERSION ||
        h.nslots == 0 || h.nslots > SHMKEY_MAX_SLOTS ||
        h.slot_size < SHMKEY_MIN_SLOT_SIZE || h.slot_size > SHMKEY_MAX_SLOT_SIZE ||
        h.slots_offset != SHMKEY_ALIGN ||
        shmkey_ring_size(h.nslots, h.slot_size) > c->map_len ||
        h.slot_stride != (shmkey_ring_size(h.nslots, h.slot_size) - SHMKEY_ALIGN) / h.nslots) {
        rc = SHMKEY_EPROTO;
        goto fail;
    }
    if (h.state != SHMKEY_RING_RUNNING || !shmkey_pid_alive((pid_t)h.oracle_pid)) {
        rc = SHMKEY_EUNAVAIL;
        goto fail;
    }
    c->nslots = h.nslots;
    c->slot_size = h.slot_size;
    c->max_payload = h.slot_size;
    c->stride = h.slot_stride;
    c->slots_offset = h.slots_offset;
    c->oracle_pid = (pid_t)h.oracle_pid;
    c->spin_us = h.spin_us;
    c->ncpu = shmkey_ncpu();

    snprintf(path, sizeof(path), "/%s-req", name);
    c->req_sem = sem_open(path, 0);
    if (c->req_sem == SEM_FAILED) {
        rc = shmkey_status_from_errno(errno);
        goto fail;
    }
    snprintf(path, sizeof(path), "/%s-free", name);
    c->free_sem = sem_open(path, 0);
    if (c->free_sem == SEM_FAILED) {
        rc = shmkey_status_from_errno(errno);
        goto fail;
    }
    *out = c;
    return SHMKEY_OK;
fail:
    shmkey_shm_client_close(c);
    return rc;
}

void shmkey_shm_client_close(struct shmkey_client *c)
{
    if (c->base)
        munmap(c->base, c->map_len);
    if (c->req_sem != SEM_FAILED && c->req_sem != NULL)
        sem_close(c->req_sem);
    if (c->free_sem != SEM_FAILED && c->free_sem != NULL)
        sem_close(c->free_sem);
    free(c);
}

int shmkey_client_free_slots(const struct shmkey_client *c)
{
    int n = 0;
    if (c->transport != SHMKEY_TRANSPORT_SHM)
        return SHMKEY_EINVAL;
    for (uint32_t i = 0; i < c->nslots; i++) {
        struct shmkey_slot *s = slot_at(c->base, c->slots_offset, c->stride, i);
        if (CTL_STATE(ctl_load(s)) == SHMKEY_SLOT_FREE)
            n++;
    }
    return n;
}

static int oracle_up(struct shmkey_client *c)
{
    struct shmkey_ring_hdr *h = hdr_of(c->base);
    return __atomic_load_n(&h->state, __ATOMIC_ACQUIRE) == SHMKEY_RING_RUNNING &&
           shmkey_pid_alive(c->oracle_pid);
}

/* Take a free-slot token: backpressure when all slots are in use. */
static int take_token(struct shmkey_client *c, uint64_t deadline_ns)
{
    struct timespec ts;
    if (sem_trywait(c->free_sem) == 0)
        return SHMKEY_OK;
    for (;;) {
        if (!oracle_up(c))
            return SHMKEY_EUNAVAIL;
        uint64_t now = shmkey_now_ns();
        if (now >= deadline_ns)
            return SHMKEY_ETIMEDOUT;
        uint64_t slice = now + SHMKEY_LIVENESS_SLICE_MS * 1000000ull;
        shmkey_deadline(&ts, slice < deadline_ns ? slice : deadline_ns);
        if (sem_timedwait(c->free_sem, &ts) == 0)
            return SHMKEY_OK;
        if (errno != ETIMEDOUT && errno != EINTR)
            return SHMKEY_ESYSTEM;
    }
}

/* Spread threads over the ring so they rarely race for the same slot. */
static uint32_t scan_start(uint32_t nslots)
{
    static __thread uint32_t seed;
    if (!seed)
        seed = (uint32_t)(uintptr_t)&seed ^ (uint32_t)shmkey_self_pid() * 2654435761u;
    seed = seed * 1103515245u + 12345u;
    return (seed >> 8) % nslots;
}

static struct shmkey_slot *claim_slot(struct shmkey_client *c, uint32_t *gen_out,
                                      uint64_t deadline_ns)
{
    uint32_t start = scan_start(c->nslots);
    for (unsigned round = 0;; round++) {
        for (uint32_t i = 0; i < c->nslots; i++) {
            struct shmkey_slot *s = slot_at(c->base, c->slots_offset, c->stride,
                                            (start + i) % c->nslots);
            uint64_t ctl = ctl_load(s);
            if (CTL_STATE(ctl) == SHMKEY_SLOT_FREE &&
                ctl_cas(s, ctl, CTL(CTL_GEN(ctl), SHMKEY_SLOT_CLAIMED))) {
                *gen_out = CTL_GEN(ctl);
                return s;
            }
        }
        /* Only a misbehaving peer leaves us a token without a free slot. */
        if (shmkey_now_ns() >= deadline_ns || ((round & 63) == 63 && !oracle_up(c)))
            return NULL;
        sched_yield();
    }
}

/* Give the slot back and, if it was ours, its token too. */
static void release_slot(struct shmkey_client *c, struct shmkey_slot *s, uint64_t ctl)
{
    if (ctl_cas(s, ctl, CTL(CTL_GEN(ctl) + 1, SHMKEY_SLOT_FREE)))
        sem_post(c->free_sem);
}

/*
 * Withdraw a request after a timeout or a dead oracle. A request not yet
 * picked up is freed; one in progress is marked ABANDONED so the worker frees
 * it and its reply is never seen by anyone.
 */
static void withdraw(struct shmkey_client *c, struct shmkey_slot *s, uint32_t gen)
{
    uint64_t give_up = shmkey_now_ns() + 1000000ull;
    for (;;) {
        uint64_t ctl = ctl_load(s);
        if (CTL_GEN(ctl) != gen)
            return;
        switch (CTL_STATE(ctl)) {
        case SHMKEY_SLOT_SUBMITTED:
        case SHMKEY_SLOT_DONE:
        case SHMKEY_SLOT_CLAIMED:
            if (ctl_cas(s, ctl, CTL(gen + 1, SHMKEY_SLOT_FREE))) {
                sem_post(c->free_sem);
                return;
            }
            break;
        case SHMKEY_SLOT_BUSY:
            if (ctl_cas(s, ctl, CTL(gen, SHMKEY_SLOT_ABANDONED)))
                return;
            break;
        case SHMKEY_SLOT_WRITING:
            /* A worker is copying a reply: a memcpy, unless it died there. */
            if (shmkey_now_ns() > give_up)
                return;
            shmkey_cpu_relax();
            break;
        default:
            return;
        }
    }
}

/*
 * A gap this long between two looks at the clock while spinning means we
 * were preempted: something outside the ring wants this core, so spinning
 * now only delays whoever must produce what we wait for. 64 pause
 * instructions take a few microseconds.
 */
#define SPIN_PREEMPTED_NS 30000u

/*
 * A request still unclaimed this long after we began to spin waits for a
 * worker that was asleep, and a worker woken across cores takes ~8 us here.
 * Longer means it is queued behind someone, quite possibly behind us, when
 * work outside the ring holds the other cores ("active" cannot see that).
 * Spinning on would keep it off this core for the whole spin budget
 * (measured: ECDSA P-256 at 550 us instead of ~40 with one of two vCPUs busy
 * elsewhere); sleeping lets it in, and it wakes us when done.
 */
#ifndef SPIN_UNCLAIMED_NS
#define SPIN_UNCLAIMED_NS 10000u
#endif

/* Stop spinning at end, when the ring wants more cores than exist, or when preempted. */
static int spin_should_stop(uint64_t *last, uint64_t end, uint32_t active, uint32_t ncpu)
{
    uint64_t now = shmkey_now_ns();
    int stop = now >= end || now - *last > SPIN_PREEMPTED_NS || active > ncpu;
    *last = now;
    return stop;
}

/* Spin while it pays: a free core for us, and the reply not yet there. */
static uint64_t spin_for_reply(struct shmkey_client *c, struct shmkey_slot *s)
{
    struct shmkey_ring_hdr *h = hdr_of(c->base);
    uint64_t ctl = ctl_load(s);
    if (c->spin_us == 0 || CTL_STATE(ctl) == SHMKEY_SLOT_DONE)
        return ctl;
    if (__atomic_load_n(&h->active, __ATOMIC_RELAXED) >= c->ncpu)
        return ctl;
    __atomic_add_fetch(&h->active, 1, __ATOMIC_RELAXED);
    uint64_t last = shmkey_now_ns(), end = last + (uint64_t)c->spin_us * 1000u;
    uint64_t unclaimed_until = last + SPIN_UNCLAIMED_NS;
    for (unsigned i = 1;; i++) {
        ctl = ctl_load(s);
        if (CTL_STATE(ctl) == SHMKEY_SLOT_DONE)
            break;
        shmkey_cpu_relax();
        if ((i & 63) == 0 &&
            (spin_should_stop(&last, end, __atomic_load_n(&h->active, __ATOMIC_RELAXED),
                              c->ncpu) ||
             (CTL_STATE(ctl) == SHMKEY_SLOT_SUBMITTED && last >= unclaimed_until)))
            break;
    }
    __atomic_sub_fetch(&h->active, 1, __ATOMIC_RELAXED);
    return ctl;
}

static int wait_reply(struct shmkey_client *c, struct shmkey_slot *s, uint32_t gen,
                      uint64_t deadline_ns)
{
    struct shmkey_ring_hdr *h = hdr_of(c->base);
    uint64_t ctl = spin_for_reply(c, s);
    for (;;) {
        if (CTL_GEN(ctl) != gen)
            return SHMKEY_EPROTO;       /* someone else freed our slot */
        if (CTL_STATE(ctl) == SHMKEY_SLOT_DONE)
            return SHMKEY_OK;
        if (__atomic_load_n(&h->state, __ATOMIC_ACQUIRE) != SHMKEY_RING_RUNNING)
            return SHMKEY_EUNAVAIL;
        uint64_t now = shmkey_now_ns();
        if (now >= deadline_ns)
            return SHMKEY_ETIMEDOUT;
        uint64_t slice = SHMKEY_LIVENESS_SLICE_MS * 1000000ull;
        if (deadline_ns - now < slice)
            slice = deadline_ns - now;
        /* Dekker with the worker: it stores DONE then reads waiters. */
        __atomic_store_n(&s->waiters, 1, __ATOMIC_SEQ_CST);
        uint64_t again = __atomic_load_n(&s->ctl, __ATOMIC_SEQ_CST);
        if (again == ctl)
            futex_wait_ns(ctl_futex(s), CTL_STATE(ctl), slice);
        ctl = ctl_load(s);
        if (CTL_STATE(ctl) != SHMKEY_SLOT_DONE && shmkey_now_ns() >= now + slice &&
            !shmkey_pid_alive(c->oracle_pid))
            return SHMKEY_EUNAVAIL;
    }
}

int shmkey_shm_call(struct shmkey_client *c, const struct shmkey_req *req,
                    const uint8_t *in, uint8_t *out, uint32_t out_cap,
                    struct shmkey_resp *resp, uint64_t deadline_ns)
{
    uint32_t gen;
    if (req->in_len > c->slot_size)
        return SHMKEY_ETOOBIG;
    if (__atomic_load_n(&hdr_of(c->base)->state, __ATOMIC_ACQUIRE) != SHMKEY_RING_RUNNING)
        return SHMKEY_EUNAVAIL;
    int rc = take_token(c, deadline_ns);
    if (rc != SHMKEY_OK)
        return rc;
    struct shmkey_slot *s = claim_slot(c, &gen, deadline_ns);
    if (!s) {
        sem_post(c->free_sem);
        return oracle_up(c) ? SHMKEY_ETIMEDOUT : SHMKEY_EUNAVAIL;
    }
    s->client_pid = (uint32_t)shmkey_self_pid();
    s->waiters = 0;
    memcpy(&s->req, req, sizeof(*req));
    if (req->in_len)
        memcpy(payload_of(s), in, req->in_len);
    /*
     * Dekker with spinning workers: publish the request, then look for a
     * spinner. A worker leaving its spin first stops counting itself, then
     * scans once more; so either it sees this request or we see it gone and
     * post, which wakes a sleeper. Posting while a worker spins would wake a
     * sleeping one for nothing, and it would preempt whoever runs there.
     */
    __atomic_store_n(&s->ctl, CTL(gen, SHMKEY_SLOT_SUBMITTED), __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&hdr_of(c->base)->spinners, __ATOMIC_SEQ_CST) == 0)
        sem_post(c->req_sem);

    rc = wait_reply(c, s, gen, deadline_ns);
    if (rc != SHMKEY_OK) {
        if (rc != SHMKEY_EPROTO)
            withdraw(c, s, gen);
        return rc;
    }
    memcpy(resp, &s->resp, sizeof(*resp));
    COMPILER_BARRIER();
    if (resp->out_len > c->slot_size || resp->out_len > out_cap) {
        rc = SHMKEY_EPROTO;
    } else if (resp->out_len) {
        memcpy(out, payload_of(s), resp->out_len);
    }
    release_slot(c, s, CTL(gen, SHMKEY_SLOT_DONE));
    return rc;
}

/* ===================================================================== */
/* oracle                                                                */
/* ===================================================================== */

/*
 * Lay out a ring in the segment behind shm_fd (created by the caller with
 * O_EXCL, sized with shmkey_ring_size) and open its two semaphores, which the
 * caller also created: req starts at 0, free at nslots.
 */
int shmkey_server_open_shm(int shm_fd, uint32_t nslots, uint32_t slot_size,
                           uint32_t spin_us, const char *req_sem,
                           const char *free_sem, struct shmkey_server **out)
{
    struct stat st;
    *out = NULL;
    if (nslots == 0 || nslots > SHMKEY_MAX_SLOTS || slot_size < SHMKEY_MIN_SLOT_SIZE ||
        slot_size > SHMKEY_MAX_SLOT_SIZE)
        return SHMKEY_EINVAL;
    size_t size = shmkey_ring_size(nslots, slot_size);
    if (fstat(shm_fd, &st) != 0)
        return SHMKEY_ESYSTEM;
    if ((size_t)st.st_size < size)
        return SHMKEY_EINVAL;

    struct shmkey_server *s = calloc(1, sizeof(*s));
    if (!s)
        return SHMKEY_ESYSTEM;
    s->transport = SHMKEY_TRANSPORT_SHM;
    s->epfd = s->ctl_fd = s->listening = -1;
    s->req_sem = s->free_sem = SEM_FAILED;
    s->nslots = nslots;
    s->slot_size = slot_size;
    s->max_payload = slot_size;
    s->slots_offset = SHMKEY_ALIGN;
    s->stride = (uint32_t)((size - SHMKEY_ALIGN) / nslots);
    s->spin_us = spin_us;
    s->ncpu = shmkey_ncpu();
    s->map_len = size;
    s->reap_seen = calloc(nslots, sizeof(uint64_t) * 2);
    /* Anonymous and shared: inherited by forked workers, invisible to clients. */
    s->held = mmap(NULL, nslots * sizeof(uint64_t), PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    s->base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, shm_fd, 0);
    if (s->base == MAP_FAILED || !s->reap_seen || s->held == MAP_FAILED) {
        if (s->base == MAP_FAILED)
            s->base = NULL;
        if (s->held == MAP_FAILED)
            s->held = NULL;
        shmkey_shm_server_close(s);
        return SHMKEY_ESYSTEM;
    }
    s->req_sem = sem_open(req_sem, 0);
    s->free_sem = sem_open(free_sem, 0);
    if (s->req_sem == SEM_FAILED || s->free_sem == SEM_FAILED) {
        int rc = shmkey_status_from_errno(errno);
        shmkey_shm_server_close(s);
        return rc;
    }
    memset(s->base, 0, size);
    for (uint32_t i = 0; i < nslots; i++)
        slot_at(s->base, s->slots_offset, s->stride, i)->ctl = CTL(1, SHMKEY_SLOT_FREE);
    struct shmkey_ring_hdr *h = hdr_of(s->base);
    h->version = SHMKEY_VERSION;
    h->nslots = nslots;
    h->slot_size = slot_size;
    h->slot_stride = s->stride;
    h->slots_offset = s->slots_offset;
    h->oracle_pid = (uint32_t)getpid();
    h->spin_us = spin_us;
    h->ncpu = s->ncpu;
    h->state = SHMKEY_RING_RUNNING;
    __atomic_store_n(&h->magic, SHMKEY_MAGIC, __ATOMIC_RELEASE);
    *out = s;
    return SHMKEY_OK;
}

/* What a worker records while it holds a slot: its pid and the generation. */
static uint64_t held_mark(uint64_t gen)
{
    return ((uint64_t)(uint32_t)shmkey_self_pid() << 32) | (uint32_t)(gen + 1);
}

/* Does a live worker hold this slot at this generation? */
static int held_by_live_worker(struct shmkey_server *s, uint32_t i, uint32_t gen)
{
    uint64_t mark = __atomic_load_n(&s->held[i], __ATOMIC_ACQUIRE);
    return (uint32_t)mark == gen + 1u && shmkey_pid_alive((pid_t)(mark >> 32));
}

static void leave_active(struct shmkey_server *s, struct shmkey_work *w)
{
    if (w->active) {
        __atomic_sub_fetch(&hdr_of(s->base)->active, 1, __ATOMIC_RELAXED);
        w->active = 0;
    }
}

static void enter_active(struct shmkey_server *s, struct shmkey_work *w)
{
    if (!w->active) {
        __atomic_add_fetch(&hdr_of(s->base)->active, 1, __ATOMIC_RELAXED);
        w->active = 1;
    }
}

/* Claim a SUBMITTED slot (-> BUSY) starting at the worker's cursor; NULL if none. */
static struct shmkey_slot *claim_submitted(struct shmkey_server *s, struct shmkey_work *w,
                                           uint64_t *ctl_out, uint32_t *idx_out)
{
    for (uint32_t i = 0; i < s->nslots; i++) {
        uint32_t idx = (w->cursor + i) % s->nslots;
        struct shmkey_slot *cand = slot_at(s->base, s->slots_offset, s->stride, idx);
        uint64_t ctl = ctl_load(cand);
        if (CTL_STATE(ctl) == SHMKEY_SLOT_SUBMITTED &&
            ctl_cas(cand, ctl, CTL(CTL_GEN(ctl), SHMKEY_SLOT_BUSY))) {
            *ctl_out = ctl;
            *idx_out = idx;
            return cand;
        }
    }
    return NULL;
}

/*
 * Spin for a request while a core is to spare, counted in hdr->spinners so
 * that clients do not post "req" (and wake a sleeping worker) meanwhile.
 * Returns the claimed slot, or NULL when the spin ended without one.
 */
static struct shmkey_slot *spin_for_request(struct shmkey_server *s, struct shmkey_work *w,
                                            uint64_t *ctl, uint32_t *idx)
{
    struct shmkey_ring_hdr *h = hdr_of(s->base);
    if (s->spin_us == 0)
        return NULL;
    /* Our own count is in "active" while we were computing. */
    if (__atomic_load_n(&h->active, __ATOMIC_RELAXED) > s->ncpu - (w->active ? 0 : 1))
        return NULL;
    enter_active(s, w);
    __atomic_add_fetch(&h->spinners, 1, __ATOMIC_SEQ_CST);
    struct shmkey_slot *slot = NULL;
    uint64_t last = shmkey_now_ns(), end = last + (uint64_t)s->spin_us * 1000u;
    for (unsigned i = 1;; i++) {
        if ((slot = claim_submitted(s, w, ctl, idx)) != NULL)
            break;
        shmkey_cpu_relax();
        if ((i & 15) == 0 &&
            (s->stopping ||
             spin_should_stop(&last, end, __atomic_load_n(&h->active, __ATOMIC_RELAXED),
                              s->ncpu)))
            break;
    }
    __atomic_sub_fetch(&h->spinners, 1, __ATOMIC_SEQ_CST);
    /* The other half of the Dekker pair in shmkey_shm_call. */
    if (!slot)
        slot = claim_submitted(s, w, ctl, idx);
    /* A token posted before we started spinning is now stale; drop it. */
    if (slot)
        (void)sem_trywait(s->req_sem);
    return slot;
}

static void reply_inline(struct shmkey_server *s, struct shmkey_work *w, int32_t status)
{
    shmkey_shm_server_reply(s, w, status, NULL, 0);
}

/*
 * Wait up to timeout_ms for a request and copy it into w. Pings and
 * malformed requests are answered here; only work for Python comes back.
 * Sleeps on "req" in liveness slices and scans the ring after each, so a
 * request whose post was skipped (a spinner count that lied) still gets
 * served. Returns SHMKEY_OK with w filled, SHMKEY_ETIMEDOUT, or
 * SHMKEY_EUNAVAIL once the server is stopping.
 */
int shmkey_shm_server_next(struct shmkey_server *s, struct shmkey_work *w,
                           uint32_t timeout_ms)
{
    uint64_t deadline = shmkey_now_ns() + (uint64_t)timeout_ms * 1000000u;
    struct timespec ts;
    for (;;) {
        if (s->stopping) {
            leave_active(s, w);
            return SHMKEY_EUNAVAIL;
        }
        uint64_t ctl = 0;
        uint32_t idx = 0;
        struct shmkey_slot *slot = spin_for_request(s, w, &ctl, &idx);
        if (!slot) {
            leave_active(s, w);
            uint64_t now = shmkey_now_ns();
            if (now >= deadline)
                return SHMKEY_ETIMEDOUT;
            uint64_t slice = now + SHMKEY_LIVENESS_SLICE_MS * 1000000ull;
            shmkey_deadline(&ts, slice < deadline ? slice : deadline);
            if (sem_timedwait(s->req_sem, &ts) != 0 && errno != ETIMEDOUT && errno != EINTR)
                return SHMKEY_ESYSTEM;
            enter_active(s, w);
            slot = claim_submitted(s, w, &ctl, &idx);
            if (!slot)
                continue;       /* a stale token or an empty slice */
        }
        w->cursor = idx + 1;
        w->slot = idx;
        w->gen = CTL_GEN(ctl);
        __atomic_store_n(&s->held[idx], held_mark(w->gen), __ATOMIC_RELEASE);

        /* Copy once; from here on only the private copy is read. */
        memcpy(&w->req, &slot->req, sizeof(w->req));
        COMPILER_BARRIER();
        uint32_t n = w->req.in_len;
        if (n > s->slot_size || n > w->cap) {
            reply_inline(s, w, SHMKEY_ETOOBIG);
            continue;
        }
        memcpy(w->payload, payload_of(slot), n);
        COMPILER_BARRIER();
        if (w->req.op == SHMKEY_OP_PING) {
            shmkey_shm_server_reply(s, w, SHMKEY_OK, w->payload, n);
            continue;
        }
        return SHMKEY_OK;
    }
}

/*
 * Publish the reply for w's slot if the request still stands. If the client
 * abandoned it, free the slot instead; the reply is dropped unseen.
 */
int shmkey_shm_server_reply(struct shmkey_server *s, struct shmkey_work *w,
                            int32_t status, const uint8_t *out, uint32_t out_len)
{
    if (w->slot >= s->nslots)
        return SHMKEY_EINVAL;
    struct shmkey_slot *slot = slot_at(s->base, s->slots_offset, s->stride, w->slot);
    uint32_t gen = (uint32_t)w->gen;
    if (out_len > s->slot_size) {
        status = SHMKEY_EINTERNAL;
        out_len = 0;
    }
    if (!ctl_cas(slot, CTL(gen, SHMKEY_SLOT_BUSY), CTL(gen, SHMKEY_SLOT_WRITING))) {
        uint64_t ctl = ctl_load(slot);
        if (ctl == CTL(gen, SHMKEY_SLOT_ABANDONED) &&
            ctl_cas(slot, ctl, CTL(gen + 1, SHMKEY_SLOT_FREE)))
            sem_post(s->free_sem);
        __atomic_store_n(&s->held[w->slot], 0, __ATOMIC_RELEASE);
        return SHMKEY_OK;
    }
    if (out_len)
        memcpy(payload_of(slot), out, out_len);
    slot->resp.status = status;
    slot->resp.out_len = out_len;
    __atomic_store_n(&slot->ctl, CTL(gen, SHMKEY_SLOT_DONE), __ATOMIC_SEQ_CST);
    __atomic_store_n(&s->held[w->slot], 0, __ATOMIC_RELEASE);
    if (__atomic_load_n(&slot->waiters, __ATOMIC_SEQ_CST))
        futex_wake_all(ctl_futex(slot));
    return SHMKEY_OK;
}

/*
 * A request whose worker died (or that a client marked BUSY itself) will
 * never be answered: answer it with an error, so its client learns what
 * happened instead of waiting out its timeout. 1 if answered.
 */
static int answer_orphan(struct shmkey_server *s, struct shmkey_slot *slot, uint64_t ctl)
{
    static const char why[] = "the oracle worker serving this request died";
    uint32_t gen = CTL_GEN(ctl);
    if (!ctl_cas(slot, ctl, CTL(gen, SHMKEY_SLOT_WRITING)))
        return 0;
    memcpy(payload_of(slot), why, sizeof(why) - 1);
    slot->resp.status = SHMKEY_EINTERNAL;
    slot->resp.out_len = sizeof(why) - 1;
    __atomic_store_n(&slot->ctl, CTL(gen, SHMKEY_SLOT_DONE), __ATOMIC_SEQ_CST);
    futex_wake_all(ctl_futex(slot));
    return 1;
}

/*
 * Reclaim slots nobody will free: CLAIMED or DONE with a dead client pid;
 * CLAIMED slots that have not moved for REAP_STALE_ROUNDS calls (the client
 * died before writing its pid); BUSY, WRITING or ABANDONED slots that no
 * worker holds (a client wrote them, which only a misbehaving one does); and
 * states that do not exist. Only slots unchanged since the previous call are
 * touched, and "held" is the oracle's own record (shared by its worker
 * processes, mapped by no client), which no client can forge; a slot held by
 * a worker process that died counts as unheld. A SUBMITTED slot that has not moved gets its request token
 * re-posted, in case its client died between the two. Called every few
 * hundred ms by the oracle. BUSY or WRITING slots that no live worker holds
 * are answered with an error rather than freed (see answer_orphan). Returns
 * the number of slots reclaimed or answered.
 */
int shmkey_server_reap(struct shmkey_server *s)
{
    int n = 0;
    if (s->transport != SHMKEY_TRANSPORT_SHM)
        return 0;
    for (uint32_t i = 0; i < s->nslots; i++) {
        struct shmkey_slot *slot = slot_at(s->base, s->slots_offset, s->stride, i);
        uint64_t ctl = ctl_load(slot);
        uint64_t *seen = &s->reap_seen[2 * i], *rounds = &s->reap_seen[2 * i + 1];
        *rounds = (ctl == *seen) ? *rounds + 1 : 0;
        *seen = ctl;
        if (*rounds == 0)
            continue;
        uint32_t state = CTL_STATE(ctl);
        pid_t pid = (pid_t)__atomic_load_n(&slot->client_pid, __ATOMIC_RELAXED);
        int dead = !shmkey_pid_alive(pid);
        int unheld = !held_by_live_worker(s, i, CTL_GEN(ctl));
        if ((state == SHMKEY_SLOT_BUSY || state == SHMKEY_SLOT_WRITING) && unheld) {
            if (answer_orphan(s, slot, ctl))
                n++;
            continue;
        }
        if ((state == SHMKEY_SLOT_DONE && dead) ||
            (state == SHMKEY_SLOT_CLAIMED && (dead || *rounds >= REAP_STALE_ROUNDS)) ||
            (state == SHMKEY_SLOT_ABANDONED && unheld) ||
            (state > SHMKEY_SLOT_ABANDONED)) {
            if (ctl_cas(slot, ctl, CTL(CTL_GEN(ctl) + 1, SHMKEY_SLOT_FREE))) {
                sem_post(s->free_sem);
                n++;
            }
        } else if (state == SHMKEY_SLOT_SUBMITTED && *rounds == 1) {
            sem_post(s->req_sem);
        }
    }
    return n;
}

void shmkey_shm_server_stop(struct shmkey_server *s)
{
    struct shmkey_ring_hdr *h = hdr_of(s->base);
    s->stopping = 1;
    __atomic_store_n(&h->state, SHMKEY_RING_STOPPING, __ATOMIC_SEQ_CST);
    for (uint32_t i = 0; i < s->nslots; i++)
        futex_wake_all(ctl_futex(slot_at(s->base, s->slots_offset, s->stride, i)));
    /* Wake sleeping workers; the semaphore is unlinked right after. */
    for (int i = 0; i < 64; i++)
        sem_post(s->req_sem);
}

void shmkey_shm_server_close(struct shmkey_server *s)
{
    if (s->base)
        munmap(s->base, s->map_len);
    if (s->req_sem != SEM_FAILED && s->req_sem)
        sem_close(s->req_sem);
    if (s->free_sem != SEM_FAILED && s->free_sem)
        sem_close(s->free_sem);
    free(s->reap_seen);
    if (s->held)
        munmap(s->held, s->nslots * sizeof(uint64_t));
    free(s);
}

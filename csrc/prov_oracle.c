/*
 * prov_oracle.c - the registry of oracles that key references name, their
 * connections (opened on first use, checked to hold the key, reopened when
 * the oracle restarted), and the one function that sends them a request:
 * waiting in place, or, inside an OpenSSL ASYNC job, pausing the job until
 * the reply is there so that the caller's thread goes on with other work.
 */
#include "provider.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <openssl/async.h>

/* A connection to an oracle; closed by whoever drops the last reference. */
struct sk_conn {
    struct shmkey_client *client;
    unsigned refs;              /* guarded by the provider lock */
    pid_t pid;                  /* process that opened it */
};

/* Take a reference on the registry entry for this oracle and key. */
struct sk_oracle *sk_oracle_get(struct sk_provctx *pc, const char *name,
                                int transport, int64_t oracle_uid, const uint8_t key_id[32],
                                const struct sk_pub *pub)
{
    struct sk_oracle *o;
    pthread_mutex_lock(&pc->lock);
    for (o = pc->oracles; o; o = o->next)
        if (strcmp(o->name, name) == 0 && o->transport == transport &&
            o->oracle_uid == oracle_uid &&
            memcmp(o->key_id, key_id, sizeof(o->key_id)) == 0 && sk_pub_equal(&o->pub, pub))
            break;
    if (o) {
        o->users++;
    } else if ((o = calloc(1, sizeof(*o))) != NULL) {
        snprintf(o->name, sizeof(o->name), "%s", name);
        o->transport = transport;
        o->oracle_uid = oracle_uid;
        memcpy(o->key_id, key_id, sizeof(o->key_id));
        o->users = 1;
        if (sk_pub_copy(&o->pub, pub)) {
            o->next = pc->oracles;
            pc->oracles = o;
        } else {
            free(o);
            o = NULL;
        }
    }
    pthread_mutex_unlock(&pc->lock);
    return o;
}

/* Drop one reference; returns the connection to close, if that was its last. */
static struct sk_conn *sk_conn_unref_locked(struct sk_conn *c)
{
    return (c && --c->refs == 0) ? c : NULL;
}

static void sk_conn_close(struct sk_conn *c)
{
    if (!c)
        return;
    /* A connection inherited across fork() stays with the parent. */
    if (c->pid == getpid())
        shmkey_client_close(c->client);
    free(c);
}

void sk_oracle_put(struct sk_provctx *pc, struct sk_oracle *o)
{
    struct sk_conn *dead = NULL;
    if (!o)
        return;
    pthread_mutex_lock(&pc->lock);
    if (--o->users > 0) {
        pthread_mutex_unlock(&pc->lock);
        return;
    }
    for (struct sk_oracle **pp = &pc->oracles; *pp; pp = &(*pp)->next)
        if (*pp == o) {
            *pp = o->next;
            break;
        }
    dead = sk_conn_unref_locked(o->conn);
    pthread_mutex_unlock(&pc->lock);
    sk_conn_close(dead);
    sk_pub_clear(&o->pub);
    free(o);
}

/* At teardown: keys are freed before their provider, so no oracle should be left. */
void sk_oracles_free(struct sk_provctx *pc)
{
    while (pc->oracles) {
        struct sk_oracle *o = pc->oracles;
        pc->oracles = o->next;
        sk_conn_close(sk_conn_unref_locked(o->conn));
        sk_pub_clear(&o->pub);
        free(o);
    }
}

/*
 * Connect to o's oracle. The socket path is resolved now, through the same
 * rule as everywhere (shmkey_find_socket: SHMKEY_RUNTIME_DIR as set in this
 * process, which may have been chrooted since the reference was loaded).
 * A version 2 reference names the oracle's uid: nobody else may serve it.
 */
static int sk_open_client(struct sk_provctx *pc, struct sk_oracle *o,
                          struct shmkey_client **out, char *why, size_t whylen)
{
    char path[4096];
    int rc = shmkey_find_socket(NULL, o->name, path, sizeof(path), why, (uint32_t)whylen);
    if (rc != SHMKEY_OK)
        return rc;
    return shmkey_client_open(path, -1, o->transport, o->oracle_uid,
                              o->oracle_uid >= 0, pc->timeout_ms, why, (uint32_t)whylen, out);
}

/* The oracle must hold the key the reference describes: ask it once per connection. */
static int sk_check_pubkey(struct sk_provctx *pc, struct sk_oracle *o,
                           struct shmkey_client *client, char *why, size_t whylen)
{
    struct shmkey_req req = {.op = SHMKEY_OP_PUBKEY};
    struct shmkey_resp resp;
    uint8_t der[SK_REPLY_MAX];
    struct sk_pub held = {0};
    char what[32];
    memcpy(req.key_id, o->key_id, sizeof(req.key_id));
    int rc = shmkey_call(client, &req, NULL, der, sizeof(der), &resp, pc->timeout_ms);
    if (rc != SHMKEY_OK)
        return rc;
    if (resp.status == SHMKEY_ENOKEY) {
        /* The caller prefixes the oracle's name. */
        snprintf(why, whylen, "it does not hold this key; run 'shmkey keyref' again");
        return -SK_R_KEY_MISMATCH;
    }
    if (resp.status != SHMKEY_OK)
        return resp.status;
    if (!sk_parse_spki(der, resp.out_len, &held))
        return SHMKEY_EPROTO;
    rc = sk_pub_equal(&held, &o->pub) ? SHMKEY_OK : -SK_R_KEY_MISMATCH;
    if (rc != SHMKEY_OK)
        snprintf(why, whylen, "it holds an %s key; run 'shmkey keyref' again",
                 sk_pub_describe(&held, what, sizeof(what)));
    sk_pub_clear(&held);
    return rc;
}

struct sk_open_args {
    struct sk_provctx *pc;
    struct sk_oracle *o;
    struct shmkey_client *client;
    char *why;
    size_t whylen;
    int rc;
};

static void *sk_open_main(void *arg)
{
    struct sk_open_args *a = arg;
    a->rc = sk_open_client(a->pc, a->o, &a->client, a->why, a->whylen);
    if (a->rc == SHMKEY_OK)
        a->rc = sk_check_pubkey(a->pc, a->o, a->client, a->why, a->whylen);
    if (a->rc != SHMKEY_OK) {
        shmkey_client_close(a->client);
        a->client = NULL;
    }
    return NULL;
}

/*
 * A new connection to o whose oracle holds the key. Inside an ASYNC job it
 * is made on a thread of its own: connecting needs several kilobytes of
 * stack for paths and the welcome's descriptors, and a job's stack is small.
 */
static int sk_open_checked(struct sk_provctx *pc, struct sk_oracle *o,
                           struct shmkey_client **out, char *why, size_t whylen)
{
    struct sk_open_args a = {pc, o, NULL, why, whylen, SHMKEY_OK};
    pthread_t t;
    if (ASYNC_get_current_job() == NULL || pthread_create(&t, NULL, sk_open_main, &a) != 0)
        sk_open_main(&a);
    else
        pthread_join(t, NULL);
    *out = a.client;
    return a.rc;
}

/*
 * A referenced connection to o, opened if there is none. *fresh says whether
 * it was opened just now. Opening happens outside the lock, so a slow or
 * missing oracle never blocks calls to other oracles.
 */
static int sk_conn_get(struct sk_provctx *pc, struct sk_oracle *o, struct sk_conn **out,
                       int *fresh, char *why, size_t whylen)
{
    struct sk_conn *c, *stale = NULL;
    struct shmkey_client *client = NULL;
    pid_t me = getpid();

    pthread_mutex_lock(&pc->lock);
    if (o->conn && o->conn->pid != me) {
        /* Forked: the parent's connection is not ours to use (nor to close). */
        stale = o->conn;
        o->conn = NULL;
    }
    if ((c = o->conn) != NULL)
        c->refs++;
    pthread_mutex_unlock(&pc->lock);
    if (stale) {
        /* Our copies of the parent's descriptors: closing them leaves the parent's alone. */
        shmkey_client_close(stale->client);
        free(stale);
    }
    if (c) {
        *out = c;
        *fresh = 0;
        return SHMKEY_OK;
    }

    int rc = sk_open_checked(pc, o, &client, why, whylen);
    if (rc != SHMKEY_OK)
        return rc;
    if ((c = calloc(1, sizeof(*c))) == NULL) {
        shmkey_client_close(client);
        return SHMKEY_ESYSTEM;
    }
    c->client = client;
    c->pid = me;
    c->refs = 2;                /* the oracle entry's and the caller's */
    pthread_mutex_lock(&pc->lock);
    if (o->conn) {
        /* Another thread got there first: use its connection. */
        struct sk_conn *theirs = o->conn;
        theirs->refs++;
        pthread_mutex_unlock(&pc->lock);
        shmkey_client_close(client);
        free(c);
        *out = theirs;
        *fresh = 0;
        return SHMKEY_OK;
    }
    o->conn = c;
    pthread_mutex_unlock(&pc->lock);
    *out = c;
    *fresh = 1;
    return SHMKEY_OK;
}

/* Return a connection; a dead one is also unhooked, so the next call reopens. */
static void sk_conn_put(struct sk_provctx *pc, struct sk_oracle *o, struct sk_conn *c, int dead)
{
    struct sk_conn *last;
    pthread_mutex_lock(&pc->lock);
    if (dead && o->conn == c) {
        o->conn = NULL;
        c->refs--;              /* the entry's; ours keeps it above zero */
    }
    last = sk_conn_unref_locked(c);
    pthread_mutex_unlock(&pc->lock);
    sk_conn_close(last);
}

/* ===================================================================== */
/* waiting inside an OpenSSL ASYNC job                                   */
/* ===================================================================== */

/*
 * What an ASYNC wait context holds for us: one descriptor, registered once
 * and kept until the context is freed (servers such as haproxy watch a
 * job's descriptors for as long as its connection lives, and learn of
 * removals only when a job pauses). It is an epoll set of our own holding
 * the current request's wake-up socket and a timer for its deadline, so
 * that it is readable when the reply is there, when the oracle is gone, or
 * when the deadline passed. A job that is never resumed (its connection
 * closed) leaves its request here; the context's cleanup withdraws it.
 */
struct sk_wait {
    int ep;                     /* what the server polls */
    int timer;                  /* timerfd in ep: the deadline, or a retry for a slot */
    struct shmkey_ticket t;     /* the request in flight; t.ring NULL: none */
    struct sk_provctx *pc;
    struct sk_conn *conn;       /* referenced while a request is in flight */
};

static const char sk_wait_key = 0;      /* its address names our entry in wait contexts */

static void sk_conn_release(struct sk_provctx *pc, struct sk_conn *c);

static void sk_wait_free(struct sk_wait *w)
{
    shmkey_abandon(&w->t);
    if (w->conn)
        sk_conn_release(w->pc, w->conn);
    if (w->ep >= 0)
        close(w->ep);
    if (w->timer >= 0)
        close(w->timer);
    free(w);
}

static void sk_wait_cleanup(ASYNC_WAIT_CTX *ctx, const void *key, OSSL_ASYNC_FD fd, void *data)
{
    sk_wait_free(data);
}

/* Our entry in the job's wait context, made on first use. */
static struct sk_wait *sk_wait_of(ASYNC_JOB *job, struct sk_provctx *pc)
{
    ASYNC_WAIT_CTX *ctx = ASYNC_get_wait_ctx(job);
    OSSL_ASYNC_FD fd;
    void *data = NULL;
    if (!ctx)
        return NULL;
    if (ASYNC_WAIT_CTX_get_fd(ctx, &sk_wait_key, &fd, &data) && data)
        return data;
    struct sk_wait *w = calloc(1, sizeof(*w));
    if (!w)
        return NULL;
    w->pc = pc;
    w->ep = epoll_create1(EPOLL_CLOEXEC);
    w->timer = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = w->timer};
    if (w->ep < 0 || w->timer < 0 || epoll_ctl(w->ep, EPOLL_CTL_ADD, w->timer, &ev) != 0 ||
        !ASYNC_WAIT_CTX_set_wait_fd(ctx, &sk_wait_key, w->ep, w, sk_wait_cleanup)) {
        sk_wait_free(w);
        return NULL;
    }
    return w;
}

static void sk_timer_at(struct sk_wait *w, uint64_t at_ns)
{
    struct itimerspec its = {{0, 0}, {(time_t)(at_ns / 1000000000u), (long)(at_ns % 1000000000u)}};
    uint64_t expirations;
    if (read(w->timer, &expirations, sizeof(expirations)) < 0 && errno != EAGAIN)
        return;
    if (at_ns == 0)
        its.it_value.tv_nsec = 0;       /* disarm */
    (void)timerfd_settime(w->timer, at_ns ? TFD_TIMER_ABSTIME : 0, &its, NULL);
}

/* How long a job without a free slot waits before it looks again. */
#define SK_SLOT_RETRY_NS 1000000ull

/*
 * One request from inside ASYNC job `job`: submit it; if the reply is not
 * there at once, pause until our descriptor is readable, then collect. The
 * descriptor is registered only when the job first pauses: a server learns
 * of it only then (haproxy removes every registered descriptor from its
 * poller when the connection closes, and would trip on one it never saw).
 * SHMKEY_EUNSUPPORTED: no tickets on this transport, the caller waits in place.
 */
static int sk_call_async(struct sk_provctx *pc, ASYNC_JOB *job, struct sk_conn *c,
                         const struct shmkey_req *req, const uint8_t *in, uint8_t *out,
                         uint32_t cap, struct shmkey_resp *resp, uint32_t wait_ms)
{
    struct sk_wait *w = NULL;
    struct shmkey_ticket t;
    uint64_t deadline = shmkey_now_ns() + (uint64_t)wait_ms * 1000000u;
    int rc;
    for (;;) {
        uint64_t now = shmkey_now_ns();
        uint32_t left = now < deadline ? (uint32_t)((deadline - now) / 1000000u) : 0;
        rc = shmkey_submit(c->client, req, in, left, &t);
        if (rc != SHMKEY_EBUSY)
            break;
        if (now >= deadline)
            return SHMKEY_ETIMEDOUT;
        /* Every slot is another job's: look again soon. */
        if (!w && !(w = sk_wait_of(job, pc)))
            return SHMKEY_EUNSUPPORTED;
        sk_timer_at(w, now + SK_SLOT_RETRY_NS < deadline ? now + SK_SLOT_RETRY_NS : deadline);
        if (!ASYNC_pause_job())
            return SHMKEY_EINTERNAL;
    }
    if (rc != SHMKEY_OK)
        return rc;
    rc = shmkey_collect(&t, out, cap, resp);
    if (rc != SHMKEY_EPENDING)
        return rc;
    if (!w && !(w = sk_wait_of(job, pc))) {
        shmkey_abandon(&t);
        return SHMKEY_ESYSTEM;
    }
    w->t = t;
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = w->t.fd};
    int wake = w->t.fd;
    sk_timer_at(w, w->t.deadline_ns);
    /* Held by the request: a job never resumed gives it back in sk_wait_free. */
    pthread_mutex_lock(&pc->lock);
    c->refs++;
    pthread_mutex_unlock(&pc->lock);
    w->conn = c;
    do {
        if (epoll_ctl(w->ep, EPOLL_CTL_ADD, wake, &ev) != 0) {
            shmkey_abandon(&w->t);
            rc = SHMKEY_ESYSTEM;
            break;
        }
        int resumed = ASYNC_pause_job();
        /* Out of the set before the ticket ends: its descriptor may close then. */
        epoll_ctl(w->ep, EPOLL_CTL_DEL, wake, NULL);
        if (!resumed) {
            shmkey_abandon(&w->t);
            rc = SHMKEY_EINTERNAL;
            break;
        }
        rc = shmkey_collect(&w->t, out, cap, resp);
    } while (rc == SHMKEY_EPENDING);
    sk_timer_at(w, 0);
    w->conn = NULL;
    sk_conn_release(pc, c);
    return rc;
}

/* Wait for the reply in place (at most wait_ms), or, inside an ASYNC job,
 * let the job pause. */
static int sk_call(struct sk_provctx *pc, struct sk_conn *c, const struct shmkey_req *req,
                   const uint8_t *in, uint8_t *out, uint32_t cap, struct shmkey_resp *resp,
                   uint32_t wait_ms)
{
    ASYNC_JOB *job = ASYNC_get_current_job();
    if (job) {
        int rc = sk_call_async(pc, job, c, req, in, out, cap, resp, wait_ms);
        if (rc != SHMKEY_EUNSUPPORTED)
            return rc;
    }
    return shmkey_call(c->client, req, in, out, cap, resp, wait_ms);
}

/* Drop a reference that keeps no oracle entry busy (a request's). */
static void sk_conn_release(struct sk_provctx *pc, struct sk_conn *c)
{
    pthread_mutex_lock(&pc->lock);
    struct sk_conn *last = sk_conn_unref_locked(c);
    pthread_mutex_unlock(&pc->lock);
    sk_conn_close(last);
}

/* Keep an oracle's reason printable: it ends up in logs. */
static void sk_reason_copy(char *dst, size_t cap, const uint8_t *src, uint32_t len)
{
    size_t j = 0;
    for (uint32_t i = 0; i < len && j + 1 < cap; i++)
        dst[j++] = (src[i] >= 0x20 && src[i] < 0x7f) ? (char)src[i] : '?';
    dst[j] = '\0';
}

/*
 * One request to k's oracle; out receives the reply (at most cap bytes).
 * A connection that turns out dead is dropped and the request tried once
 * more on a new one: the oracle may have been restarted. Returns 1, or 0
 * with an OpenSSL error queued.
 */
int sk_oracle_call(const struct sk_key *k, uint32_t op, const uint32_t p[4],
                   const uint8_t *in, uint32_t in_len,
                   uint8_t *out, uint32_t cap, uint32_t *out_len)
{
    struct sk_provctx *pc = k->pc;
    struct sk_oracle *o = k->oracle;
    struct shmkey_req req = {.op = op, .in_len = in_len};
    struct shmkey_resp resp = {0, 0};
    char why[256] = "";
    int rc;

    if (!o) {
        SK_RAISE(pc, SK_R_PUBLIC_ONLY, "");
        return 0;
    }
    sk_last_error[0] = '\0';
    memcpy(req.key_id, o->key_id, sizeof(req.key_id));
    memcpy(req.p, p, sizeof(req.p));
    for (int attempt = 0;; attempt++) {
        struct sk_conn *c;
        int fresh;
        uint32_t wait_ms = sk_wait_ms(pc);
        if (wait_ms == 0) {
            rc = SHMKEY_ETIMEDOUT;
            snprintf(why, sizeof(why), "this thread's deadline has passed");
            break;
        }
        rc = sk_conn_get(pc, o, &c, &fresh, why, sizeof(why));
        if (rc != SHMKEY_OK)
            break;
        rc = sk_call(pc, c, &req, in, out, cap, &resp, wait_ms);
        if (rc == SHMKEY_EIDENTITY || rc == SHMKEY_EACCESS)
            shmkey_client_why(c->client, why, sizeof(why));     /* its reconnection failed */
        int dead = (rc == SHMKEY_EUNAVAIL);
        sk_conn_put(pc, o, c, dead);
        if (!(dead && !fresh && attempt == 0))
            break;
    }
    if (rc == SHMKEY_OK && resp.status != SHMKEY_OK) {
        rc = resp.status;
        sk_reason_copy(why, sizeof(why), out, resp.out_len < cap ? resp.out_len : cap);
    }
    if (rc != SHMKEY_OK) {
        int reason = (rc <= SHMKEY_EINVAL && rc >= SHMKEY_ELAST) ? -rc
                     : rc == -SK_R_KEY_MISMATCH ? SK_R_KEY_MISMATCH : -SHMKEY_EPROTO;
        SK_FAIL(pc, reason, "oracle '%s'%s%s", o->name, why[0] ? ": " : "", why);
        return 0;
    }
    *out_len = resp.out_len;
    return 1;
}

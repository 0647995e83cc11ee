/*
 * api.c - the public entry points of shmkey.h, each choosing a transport.
 * Callers (cffi with the GIL released, or an OpenSSL provider) see one API.
 */
#include "internal.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/un.h>
#include <unistd.h>

/* internal to ring.c and sock.c, for the open and close below */
int shmkey_shm_open(struct shmkey_client *c, uint64_t deadline_ns, char *why, uint32_t whylen);
int shmkey_shm_free_slots(struct shmkey_client *c);
void shmkey_shm_client_close(struct shmkey_client *c);
void shmkey_sock_adopt(struct shmkey_client *c, int fd, uint32_t max_payload);

static void free_client(struct shmkey_client *c)
{
    if (c->transport == SHMKEY_TRANSPORT_SHM)
        shmkey_shm_client_close(c);
    else
        shmkey_sock_client_close(c);
    if (c->ctl_fd >= 0)
        close(c->ctl_fd);
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->cond);
    free(c);
}

/*
 * Connect to an oracle, by path (a named oracle's socket) or over ctl_fd (a
 * SOCK_SEQPACKET control socket to an owned one, dup'ed here), within
 * timeout_ms. transport SHMKEY_TRANSPORT_ANY takes what the oracle offers.
 * oracle_uid says whom to trust (SHMKEY_UID_DEFAULT: our own uid or root;
 * a uid: that one too, or with exact_uid only that one; SHMKEY_UID_ANY).
 * On failure why says what happened: SHMKEY_EIDENTITY names the oracle's
 * user and the expected one.
 */
int shmkey_client_open(const char *path, int ctl_fd, int transport, int64_t oracle_uid,
                       int exact_uid, uint32_t timeout_ms, char *why, uint32_t whylen,
                       struct shmkey_client **out)
{
    pthread_condattr_t ca;
    char scratch[8];
    if (!why || whylen == 0) {
        why = scratch;
        whylen = sizeof(scratch);
    }
    why[0] = '\0';
    *out = NULL;
    if ((path == NULL || !path[0]) == (ctl_fd < 0) ||
        (path && strlen(path) >= sizeof(((struct sockaddr_un *)0)->sun_path)) ||
        (transport != SHMKEY_TRANSPORT_ANY && transport != SHMKEY_TRANSPORT_SHM &&
         transport != SHMKEY_TRANSPORT_SOCKET) ||
        oracle_uid < SHMKEY_UID_ANY || (exact_uid && oracle_uid < 0))
        return SHMKEY_EINVAL;
    struct shmkey_client *c = calloc(1, sizeof(*c));
    if (!c)
        return SHMKEY_ESYSTEM;
    c->transport = transport;
    c->owner_pid = shmkey_self_pid();
    c->oracle_uid = oracle_uid;
    c->exact_uid = exact_uid;
    c->ctl_fd = -1;
    c->peer_uid = geteuid();
    pthread_mutex_init(&c->lock, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&c->cond, &ca);
    pthread_condattr_destroy(&ca);
    if (path && path[0])
        strncpy(c->path, path, sizeof(c->path) - 1);
    else if ((c->ctl_fd = fcntl(ctl_fd, F_DUPFD_CLOEXEC, 3)) < 0) {
        free_client(c);
        return SHMKEY_ESYSTEM;
    }
    uint64_t deadline = shmkey_now_ns() + (uint64_t)timeout_ms * 1000000u;
    int rc;
    if (transport == SHMKEY_TRANSPORT_SHM) {
        rc = shmkey_shm_open(c, deadline, why, whylen);
    } else if (transport == SHMKEY_TRANSPORT_SOCKET) {
        rc = shmkey_sock_open(c, deadline, why, whylen);
    } else {
        /* Whatever the oracle offers: adopt the first connection as it comes. */
        struct shmkey_welcome wel;
        int fds[SHMKEY_MAX_SLOTS + 2], sock;
        rc = shmkey_conn_dial(c, SHMKEY_TRANSPORT_ANY, deadline, &wel, fds,
                              SHMKEY_MAX_SLOTS + 2, &sock, why, whylen);
        if (rc == SHMKEY_OK && wel.transport == SHMKEY_TRANSPORT_SHM) {
            c->transport = SHMKEY_TRANSPORT_SHM;
            rc = shmkey_cring_attach(sock, &wel, fds, wel.nfds, &c->ring, why, whylen);
            if (rc == SHMKEY_OK)
                c->max_payload = c->ring->slot_size;
            else
                close(sock);
        } else if (rc == SHMKEY_OK) {
            c->transport = SHMKEY_TRANSPORT_SOCKET;
            shmkey_close_fds(fds, wel.nfds);
            if (wel.slot_size < SHMKEY_MIN_SLOT_SIZE || wel.slot_size > SHMKEY_MAX_SLOT_SIZE) {
                close(sock);
                rc = SHMKEY_EPROTO;
            } else {
                shmkey_sock_adopt(c, sock, wel.slot_size);
            }
        }
        if (rc != SHMKEY_OK)
            c->transport = SHMKEY_TRANSPORT_SOCKET;
    }
    if (rc != SHMKEY_OK) {
        free_client(c);
        return rc;
    }
    *out = c;
    return SHMKEY_OK;
}

/*
 * One request, one reply, within timeout_ms. On SHMKEY_OK, resp holds the
 * oracle's status and out holds resp->out_len bytes. Safe from any number of
 * threads; never calls back into Python.
 */
int shmkey_call(struct shmkey_client *c, const struct shmkey_req *req,
                const uint8_t *in, uint8_t *out, uint32_t out_cap,
                struct shmkey_resp *resp, uint32_t timeout_ms)
{
    if (!c || !req || !resp || (req->in_len && !in) || (out_cap && !out))
        return SHMKEY_EINVAL;
    uint64_t deadline = shmkey_now_ns() + (uint64_t)timeout_ms * 1000000u;
    if (c->transport == SHMKEY_TRANSPORT_SHM)
        return shmkey_shm_call(c, req, in, out, out_cap, resp, deadline);
    return shmkey_sock_call(c, req, in, out, out_cap, resp, deadline);
}

/*
 * Send a request without waiting for its reply (ring transport only; the
 * socket transport is SHMKEY_EUNSUPPORTED). On SHMKEY_OK, t is a ticket:
 * wait until t->fd is readable, then shmkey_collect; or shmkey_abandon it.
 * Never blocks, except to (re)connect when the client has no live ring.
 * SHMKEY_EBUSY: every slot of this process holds a request; try again when
 * one of them is collected.
 */
int shmkey_submit(struct shmkey_client *c, const struct shmkey_req *req, const uint8_t *in,
                  uint32_t timeout_ms, struct shmkey_ticket *t)
{
    if (!c || !req || !t || (req->in_len && !in))
        return SHMKEY_EINVAL;
    t->ring = NULL;
    t->fd = -1;
    if (c->transport != SHMKEY_TRANSPORT_SHM)
        return SHMKEY_EUNSUPPORTED;
    uint64_t deadline = shmkey_now_ns() + (uint64_t)timeout_ms * 1000000u;
    return shmkey_shm_submit(c, req, in, deadline, t);
}

/*
 * The reply to ticket t, if it is there: SHMKEY_OK with resp and out as
 * shmkey_call gives them, SHMKEY_EPENDING if not yet (t stays valid; wait
 * for t->fd again), or the call's failure (SHMKEY_ETIMEDOUT once its
 * deadline passed, SHMKEY_EUNAVAIL when the oracle is gone). Anything but
 * SHMKEY_EPENDING ends the ticket. Never blocks.
 */
int shmkey_collect(struct shmkey_ticket *t, uint8_t *out, uint32_t out_cap,
                   struct shmkey_resp *resp)
{
    if (!t || !t->ring || !resp || (out_cap && !out))
        return SHMKEY_EINVAL;
    return shmkey_shm_collect(t, out, out_cap, resp);
}

/*
 * Give up on ticket t: its request is withdrawn (or its reply, if it came,
 * dropped unseen) and its slot freed, now or by the worker that holds it.
 * A ticket already ended is left alone.
 */
void shmkey_abandon(struct shmkey_ticket *t)
{
    if (t && t->ring)
        shmkey_shm_abandon(t);
}

/* n pings timed one by one in C: the transport's cost without Python's. */
int shmkey_ping_loop(struct shmkey_client *c, uint32_t n, uint64_t *ns_out,
                     uint32_t timeout_ms)
{
    struct shmkey_req req = {.op = SHMKEY_OP_PING};
    struct shmkey_resp resp;
    uint8_t out[64];
    for (uint32_t i = 0; i < n; i++) {
        uint64_t t0 = shmkey_now_ns();
        int rc = shmkey_call(c, &req, NULL, out, sizeof(out), &resp, timeout_ms);
        if (rc == SHMKEY_OK)
            rc = resp.status;
        if (rc != SHMKEY_OK)
            return rc;
        if (ns_out)
            ns_out[i] = shmkey_now_ns() - t0;
    }
    return SHMKEY_OK;
}

void shmkey_client_close(struct shmkey_client *c)
{
    if (c)
        free_client(c);
}

uint32_t shmkey_client_max_payload(const struct shmkey_client *c)
{
    return c->max_payload;
}

int shmkey_client_transport(const struct shmkey_client *c)
{
    return c->transport;
}

/* Slots of a ring connection (0 for the socket transport, or before the first ring). */
int shmkey_client_slots(const struct shmkey_client *c)
{
    struct cring *r = c->transport == SHMKEY_TRANSPORT_SHM ? c->ring : NULL;
    return r ? (int)r->nslots : 0;
}

int shmkey_client_free_slots(struct shmkey_client *c)
{
    if (c->transport != SHMKEY_TRANSPORT_SHM)
        return SHMKEY_EINVAL;
    return shmkey_shm_free_slots(c);
}

/* Why the latest (re)connection failed, for the message of a failed call. */
int shmkey_client_why(struct shmkey_client *c, char *out, uint32_t cap)
{
    if (!c || !out || cap == 0)
        return SHMKEY_EINVAL;
    pthread_mutex_lock(&c->lock);
    snprintf(out, cap, "%s", c->why);
    pthread_mutex_unlock(&c->lock);
    return SHMKEY_OK;
}

/* Who served this client's latest connection, as SO_PEERCRED says. */
int64_t shmkey_client_oracle_uid(const struct shmkey_client *c)
{
    return (int64_t)c->peer_uid;
}

int64_t shmkey_client_oracle_pid(const struct shmkey_client *c)
{
    return (int64_t)c->peer_pid;
}

/* ===================================================================== */
/* oracle                                                                */
/* ===================================================================== */

/* Who sent w's request: read from the oracle's own record of the connection. */
static void work_peer(struct shmkey_work *w)
{
    const struct sconn *k = w->conn;
    w->conn_serial = k->serial;
    w->peer_pid = (int32_t)k->pid;
    w->peer_uid = (uint32_t)k->uid;
}

/*
 * Wait up to timeout_ms for a request and copy it into w: from a ring
 * (scanned, then spun for while a core is free) or from a socket message.
 * Pings and malformed requests are answered here; only work for Python comes
 * back. Returns SHMKEY_OK with w filled, SHMKEY_ETIMEDOUT, or
 * SHMKEY_EUNAVAIL once the server is stopping.
 */
int shmkey_server_next(struct shmkey_server *s, struct shmkey_work *w, uint32_t timeout_ms)
{
    uint64_t deadline = shmkey_now_ns() + (uint64_t)timeout_ms * 1000000u;
    shmkey_server_online(s, w, 1);
    w->conn = NULL;
    for (;;) {
        shmkey_server_quiescent(s, w);
        if (s->stopping)
            break;
        int rc = shmkey_ring_claim(s, w);
        if (rc == 0)
            rc = shmkey_ring_spin(s, w);
        if (rc == 1) {
            shmkey_ring_kick_if_more(s);
            if (shmkey_signer_serve(s, w))
                continue;
            work_peer(w);
            return SHMKEY_OK;
        }
        if (rc < 0)
            continue;
        if (rc == 0) {
            shmkey_ring_leave_active(s, w);
            rc = shmkey_server_wait(s, w, deadline);
        }
        if (rc == 1 || rc == 2) {
            shmkey_ring_enter_active(s, w);
            if (w->req.op != SHMKEY_OP_PING) {
                if (shmkey_signer_serve(s, w))
                    continue;
                work_peer(w);
                return SHMKEY_OK;
            }
            shmkey_frames_reply(s, w, SHMKEY_OK, w->payload, w->req.in_len);
            continue;
        }
        if (rc == 0)
            continue;
        if (rc == SHMKEY_EUNAVAIL)
            break;
        shmkey_server_online(s, w, 0);
        return rc;
    }
    shmkey_ring_look_end(s, w);
    shmkey_ring_leave_active(s, w);
    shmkey_server_online(s, w, 0);
    return SHMKEY_EUNAVAIL;
}

int shmkey_server_reply(struct shmkey_server *s, struct shmkey_work *w,
                        int32_t status, const uint8_t *out, uint32_t out_len)
{
    struct sconn *k = w->conn;
    if ((out_len && !out) || !k)
        return SHMKEY_EINVAL;
    if (k->state == CONN_RING)
        return shmkey_ring_reply(s, w, status, out, out_len);
    return shmkey_frames_reply(s, w, status, out, out_len);
}

struct shmkey_work *shmkey_work_new(uint32_t cap)
{
    struct shmkey_work *w = calloc(1, sizeof(*w));
    if (!w)
        return NULL;
    w->payload = calloc(1, cap ? cap : 1);
    if (!w->payload) {
        free(w);
        return NULL;
    }
    w->cap = cap;
    return w;
}

void shmkey_work_free(struct shmkey_work *w)
{
    if (!w)
        return;
    free(w->payload);
    free(w);
}

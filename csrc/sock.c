/*
 * sock.c - the socket transport, the titus design generalised.
 *
 * After the handshake (conn.c) a connection carries messages: a 32-bit
 * length, then struct shmkey_req (or shmkey_resp), then the payload, one
 * request at a time. A client keeps a pool of connections so that threads do
 * not queue behind each other. The oracle reads a message without ever
 * blocking, whatever piece has arrived, and a message must be complete within
 * SHMKEY_HANDSHAKE_MS of its first byte: a peer that trickles holds only its
 * own connection. A connection that timed out on the client is closed, never
 * reused, so a late reply cannot reach another request.
 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

/* Wait for fd to become ready for events, by deadline. */
static int wait_fd(int fd, short events, uint64_t deadline_ns)
{
    for (;;) {
        uint64_t now = shmkey_now_ns();
        if (now >= deadline_ns)
            return SHMKEY_ETIMEDOUT;
        struct pollfd pfd = {.fd = fd, .events = events};
        int r = poll(&pfd, 1, (int)((deadline_ns - now + 999999u) / 1000000u));
        if (r > 0)
            return SHMKEY_OK;
        if (r < 0 && errno != EINTR)
            return SHMKEY_ESYSTEM;
    }
}

/* Write all of iov by deadline; MSG_NOSIGNAL so a dead peer is an error, not SIGPIPE. */
static int send_all(int fd, struct iovec *iov, int iovcnt, uint64_t deadline_ns)
{
    while (iovcnt > 0) {
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)iovcnt};
        ssize_t n = sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                int rc = wait_fd(fd, POLLOUT, deadline_ns);
                if (rc != SHMKEY_OK)
                    return rc;
                continue;
            }
            return shmkey_status_from_errno(errno);
        }
        while (iovcnt > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            iovcnt--;
        }
        if (iovcnt > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    return SHMKEY_OK;
}

/* Read exactly len bytes by deadline. */
static int recv_all(int fd, void *buf, size_t len, uint64_t deadline_ns)
{
    uint8_t *p = buf;
    while (len > 0) {
        ssize_t n = recv(fd, p, len, MSG_DONTWAIT);
        if (n == 0)
            return SHMKEY_EUNAVAIL;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                int rc = wait_fd(fd, POLLIN, deadline_ns);
                if (rc != SHMKEY_OK)
                    return rc;
                continue;
            }
            return shmkey_status_from_errno(errno);
        }
        p += n;
        len -= (size_t)n;
    }
    return SHMKEY_OK;
}

/* ===================================================================== */
/* client                                                                */
/* ===================================================================== */

static int new_conn(struct shmkey_client *c, uint64_t deadline_ns, int *fd_out, char *why,
                    uint32_t whylen)
{
    struct shmkey_welcome wel;
    int fd;
    int rc = shmkey_conn_dial(c, SHMKEY_TRANSPORT_SOCKET, deadline_ns, &wel, NULL, 0, &fd,
                              why, whylen);
    if (rc != SHMKEY_OK)
        return rc;
    if (wel.transport != SHMKEY_TRANSPORT_SOCKET || wel.slot_size < SHMKEY_MIN_SLOT_SIZE ||
        wel.slot_size > SHMKEY_MAX_SLOT_SIZE) {
        close(fd);
        shmkey_why(why, whylen, "the oracle's welcome describes no socket transport");
        return SHMKEY_EPROTO;
    }
    pthread_mutex_lock(&c->lock);
    c->max_payload = wel.slot_size;
    pthread_mutex_unlock(&c->lock);
    *fd_out = fd;
    return SHMKEY_OK;
}

/* A forked child must not share its parent's connections: replies would cross. */
static void forget_if_forked(struct shmkey_client *c)
{
    pid_t me = shmkey_self_pid();
    if (me == c->owner_pid)
        return;
    for (int i = 0; i < c->nidle; i++)
        close(c->idle[i]);
    c->nidle = 0;
    c->nopen = 0;
    c->owner_pid = me;
}

static int checkout(struct shmkey_client *c, uint64_t deadline_ns, int *fd, char *why,
                    uint32_t whylen)
{
    struct timespec ts;
    pthread_mutex_lock(&c->lock);
    forget_if_forked(c);
    while (c->nidle == 0 && c->nopen >= SHMKEY_MAX_SOCKET_CONNS) {
        if (shmkey_now_ns() >= deadline_ns) {
            pthread_mutex_unlock(&c->lock);
            return SHMKEY_ETIMEDOUT;
        }
        ts.tv_sec = (time_t)(deadline_ns / 1000000000u);
        ts.tv_nsec = (long)(deadline_ns % 1000000000u);
        pthread_cond_timedwait(&c->cond, &c->lock, &ts);
        forget_if_forked(c);
    }
    if (c->nidle > 0) {
        *fd = c->idle[--c->nidle];
        pthread_mutex_unlock(&c->lock);
        return SHMKEY_OK;
    }
    c->nopen++;
    pthread_mutex_unlock(&c->lock);
    char mine[256];
    if (!why) {
        why = mine;
        whylen = sizeof(mine);
    }
    int rc = new_conn(c, deadline_ns, fd, why, whylen);
    if (rc != SHMKEY_OK) {
        pthread_mutex_lock(&c->lock);
        snprintf(c->why, sizeof(c->why), "%s", why);
        c->nopen--;
        pthread_cond_signal(&c->cond);
        pthread_mutex_unlock(&c->lock);
    }
    return rc;
}

static void checkin(struct shmkey_client *c, int fd, int reusable)
{
    pthread_mutex_lock(&c->lock);
    if (reusable && shmkey_self_pid() == c->owner_pid && c->nidle < SHMKEY_MAX_SOCKET_CONNS) {
        c->idle[c->nidle++] = fd;
    } else {
        close(fd);
        if (shmkey_self_pid() == c->owner_pid && c->nopen > 0)
            c->nopen--;
    }
    pthread_cond_signal(&c->cond);
    pthread_mutex_unlock(&c->lock);
}

/* One connection at once, so that a missing or refusing oracle is reported on open. */
int shmkey_sock_open(struct shmkey_client *c, uint64_t deadline_ns, char *why, uint32_t whylen)
{
    int fd;
    int rc = checkout(c, deadline_ns, &fd, why, whylen);
    if (rc == SHMKEY_OK)
        checkin(c, fd, 1);
    return rc;
}

/* Adopt the connection the first handshake made. */
void shmkey_sock_adopt(struct shmkey_client *c, int fd, uint32_t max_payload)
{
    pthread_mutex_lock(&c->lock);
    c->max_payload = max_payload;
    c->idle[c->nidle++] = fd;
    c->nopen++;
    pthread_mutex_unlock(&c->lock);
}

void shmkey_sock_client_close(struct shmkey_client *c)
{
    if (shmkey_self_pid() == c->owner_pid)
        for (int i = 0; i < c->nidle; i++)
            close(c->idle[i]);
    c->nidle = 0;
}

int shmkey_sock_call(struct shmkey_client *c, const struct shmkey_req *req,
                     const uint8_t *in, uint8_t *out, uint32_t out_cap,
                     struct shmkey_resp *resp, uint64_t deadline_ns)
{
    int fd, rc;
    uint32_t len;
    if (req->in_len > c->max_payload)
        return SHMKEY_ETOOBIG;
    /* A pooled connection the oracle hung up on (it restarted) takes no request: try a new one. */
    for (int attempt = 0;; attempt++) {
        rc = checkout(c, deadline_ns, &fd, NULL, 0);
        if (rc != SHMKEY_OK)
            return rc;
        len = (uint32_t)sizeof(*req) + req->in_len;
        struct iovec iov[3] = {
            {.iov_base = &len, .iov_len = sizeof(len)},
            {.iov_base = (void *)req, .iov_len = sizeof(*req)},
            {.iov_base = (void *)in, .iov_len = req->in_len},
        };
        rc = send_all(fd, iov, req->in_len ? 3 : 2, deadline_ns);
        if (rc != SHMKEY_EUNAVAIL || attempt > 0)
            break;
        checkin(c, fd, 0);
    }
    if (rc == SHMKEY_OK)
        rc = recv_all(fd, &len, sizeof(len), deadline_ns);
    if (rc == SHMKEY_OK)
        rc = recv_all(fd, resp, sizeof(*resp), deadline_ns);
    if (rc == SHMKEY_OK &&
        (len != sizeof(*resp) + resp->out_len || resp->out_len > c->max_payload ||
         resp->out_len > out_cap))
        rc = SHMKEY_EPROTO;
    if (rc == SHMKEY_OK && resp->out_len)
        rc = recv_all(fd, out, resp->out_len, deadline_ns);
    checkin(c, fd, rc == SHMKEY_OK);
    return rc;
}

/* ===================================================================== */
/* oracle                                                                */
/* ===================================================================== */

/*
 * Read what has arrived of connection k's next message, without blocking.
 * Returns 1 with the request copied into w (the connection then waits for
 * its reply before it is read again), or 0: incomplete (armed again, with a
 * deadline for the rest), or broken framing or a hang-up (retired).
 */
int shmkey_frames_read(struct shmkey_server *s, struct sconn *k, struct shmkey_work *w)
{
    const uint32_t hlen = (uint32_t)sizeof(k->head);
    struct shmkey_req req;
    uint32_t len = 0;
    for (;;) {
        uint8_t *dst;
        size_t want;
        if (k->have < hlen) {
            dst = k->head + k->have;
            want = hlen - k->have;
        } else {
            memcpy(&req, k->head + 4, sizeof(req));
            if (k->have == hlen + req.in_len)
                break;
            dst = k->buf + (k->have - hlen);
            want = hlen + req.in_len - k->have;
        }
        ssize_t n = shmkey_sconn_recv(s, k, dst, want);
        if (n == 0)
            return 0;
        if (k->have == 0)
            __atomic_store_n(&k->deadline_ns,
                             shmkey_now_ns() + SHMKEY_HANDSHAKE_MS * 1000000ull,
                             __ATOMIC_RELAXED);
        k->have += (uint32_t)n;
        if (k->have == hlen) {
            memcpy(&len, k->head, sizeof(len));
            memcpy(&req, k->head + 4, sizeof(req));
            if (len < sizeof(req) || len - sizeof(req) > s->slot_size ||
                req.in_len != len - sizeof(req) || req.in_len > w->cap) {
                /* Framing is lost: nothing after this can be trusted. */
                shmkey_sconn_retire(s, k);
                return 0;
            }
        }
    }
    memcpy(&w->req, &req, sizeof(req));
    memcpy(w->payload, k->buf, req.in_len);
    k->have = 0;
    __atomic_store_n(&k->deadline_ns, 0, __ATOMIC_RELAXED);
    w->conn = k;
    return 1;
}

/* Answer w's request; a client that does not take it at once loses its connection. */
int shmkey_frames_reply(struct shmkey_server *s, struct shmkey_work *w,
                        int32_t status, const uint8_t *out, uint32_t out_len)
{
    struct sconn *k = w->conn;
    if (!k)
        return SHMKEY_EINVAL;
    w->conn = NULL;
    if (out_len > s->slot_size) {
        status = SHMKEY_EINTERNAL;
        out_len = 0;
    }
    struct shmkey_resp resp = {.status = status, .out_len = out_len};
    uint32_t len = (uint32_t)sizeof(resp) + out_len;
    struct iovec iov[3] = {
        {.iov_base = &len, .iov_len = sizeof(len)},
        {.iov_base = &resp, .iov_len = sizeof(resp)},
        {.iov_base = (void *)out, .iov_len = out_len},
    };
    struct msghdr mh = {.msg_iov = iov, .msg_iovlen = out_len ? 3 : 2};
    ssize_t n;
    do {
        n = sendmsg(k->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n != (ssize_t)(sizeof(len) + len))
        shmkey_sconn_retire(s, k);
    else
        shmkey_sconn_rearm(s, k);
    return SHMKEY_OK;
}

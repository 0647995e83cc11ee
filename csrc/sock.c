/*
 * sock.c - the socket transport, the titus design generalised.
 *
 * A message is a 32-bit length, then struct shmkey_req (or shmkey_resp), then
 * the payload. A client keeps a pool of connections so that threads do not
 * queue behind each other: for a forked oracle each new connection is one end
 * of a fresh socketpair handed over the control socket (SOCK_SEQPACKET, so a
 * handover is one atomic message even from forked children); for an oracle
 * attached by name, a connect() to its socket path. The oracle's workers share
 * one epoll set with EPOLLONESHOT, so each connection is served by one worker
 * at a time. A connection that timed out is closed, never reused, so a late
 * reply cannot reach another request.
 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

/* Bound on how long a peer may stall mid-message before the oracle drops it. */
#define SOCK_IO_TIMEOUT_MS 1000

static int io_status(int err)
{
    if (err == EPIPE || err == ECONNRESET || err == ECONNREFUSED || err == ENOENT ||
        err == ENOTCONN)
        return SHMKEY_EUNAVAIL;
    if (err == EACCES || err == EPERM)
        return SHMKEY_EACCESS;
    return SHMKEY_ESYSTEM;
}

/* Write all of iov; MSG_NOSIGNAL so a dead peer is an error, not SIGPIPE. */
static int send_all(int fd, struct iovec *iov, int iovcnt)
{
    while (iovcnt > 0) {
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)iovcnt};
        ssize_t n = sendmsg(fd, &mh, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return io_status(errno);
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

/* Read exactly len bytes by deadline_ns (0: rely on the socket's own timeout). */
static int recv_all(int fd, void *buf, size_t len, uint64_t deadline_ns)
{
    uint8_t *p = buf;
    while (len > 0) {
        if (deadline_ns) {
            uint64_t now = shmkey_now_ns();
            if (now >= deadline_ns)
                return SHMKEY_ETIMEDOUT;
            struct pollfd pfd = {.fd = fd, .events = POLLIN};
            int ms = (int)((deadline_ns - now + 999999u) / 1000000u);
            int r = poll(&pfd, 1, ms);
            if (r < 0 && errno != EINTR)
                return SHMKEY_ESYSTEM;
            if (r <= 0)
                continue;
        }
        ssize_t n = recv(fd, p, len, 0);
        if (n == 0)
            return SHMKEY_EUNAVAIL;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return deadline_ns ? SHMKEY_EUNAVAIL : SHMKEY_ETIMEDOUT;
            return io_status(errno);
        }
        p += n;
        len -= (size_t)n;
    }
    return SHMKEY_OK;
}

/* ===================================================================== */
/* client                                                                */
/* ===================================================================== */

/* Hand fd to the oracle over a control socket: one atomic SEQPACKET message. */
int shmkey_send_fd(int ctl_fd, int fd)
{
    char byte = 'c';
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } u;
    memset(&u, 0, sizeof(u));
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1,
                        .msg_control = u.buf, .msg_controllen = sizeof(u.buf)};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &fd, sizeof(int));
    ssize_t n;
    do {
        n = sendmsg(ctl_fd, &mh, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    return n == 1 ? SHMKEY_OK : io_status(errno);
}

static int new_conn(struct shmkey_client *c, int *fd_out)
{
    if (c->path[0]) {
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        memcpy(sa.sun_path, c->path, sizeof(sa.sun_path));
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            return SHMKEY_ESYSTEM;
        if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
            int rc = io_status(errno);
            close(fd);
            return rc;
        }
        *fd_out = fd;
        return SHMKEY_OK;
    }
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
        return SHMKEY_ESYSTEM;
    int rc = shmkey_send_fd(c->ctl_fd, sv[1]);
    close(sv[1]);
    if (rc != SHMKEY_OK) {
        close(sv[0]);
        return rc;
    }
    *fd_out = sv[0];
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

static int checkout(struct shmkey_client *c, uint64_t deadline_ns, int *fd)
{
    struct timespec ts;
    pthread_mutex_lock(&c->lock);
    forget_if_forked(c);
    while (c->nidle == 0 && c->nopen >= SHMKEY_MAX_SOCKET_CONNS) {
        if (shmkey_now_ns() >= deadline_ns) {
            pthread_mutex_unlock(&c->lock);
            return SHMKEY_ETIMEDOUT;
        }
        shmkey_deadline(&ts, deadline_ns);
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
    int rc = new_conn(c, fd);
    if (rc != SHMKEY_OK) {
        pthread_mutex_lock(&c->lock);
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

/*
 * Open a socket client: by path (attach by name) or over ctl_fd, a
 * SOCK_SEQPACKET control socket to a forked oracle, which is dup'ed. One
 * connection is made at once so that a missing oracle is reported here.
 */
int shmkey_client_open_socket(const char *path, int ctl_fd, uint32_t max_payload,
                              struct shmkey_client **out)
{
    *out = NULL;
    if ((path == NULL || !path[0]) == (ctl_fd < 0))
        return SHMKEY_EINVAL;
    if (path && strlen(path) >= sizeof(((struct sockaddr_un *)0)->sun_path))
        return SHMKEY_EINVAL;
    if (max_payload < SHMKEY_MIN_SLOT_SIZE || max_payload > SHMKEY_MAX_SLOT_SIZE)
        return SHMKEY_EINVAL;
    struct shmkey_client *c = calloc(1, sizeof(*c));
    if (!c)
        return SHMKEY_ESYSTEM;
    c->transport = SHMKEY_TRANSPORT_SOCKET;
    c->owner_pid = getpid();
    c->max_payload = max_payload;
    c->ctl_fd = -1;
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->cond, NULL);
    if (path && path[0])
        strncpy(c->path, path, sizeof(c->path) - 1);
    else if ((c->ctl_fd = fcntl(ctl_fd, F_DUPFD_CLOEXEC, 3)) < 0) {
        shmkey_sock_client_close(c);
        return SHMKEY_ESYSTEM;
    }
    int fd;
    int rc = checkout(c, shmkey_now_ns() + 1000000000ull, &fd);
    if (rc != SHMKEY_OK) {
        shmkey_sock_client_close(c);
        return rc;
    }
    checkin(c, fd, 1);
    *out = c;
    return SHMKEY_OK;
}

void shmkey_sock_client_close(struct shmkey_client *c)
{
    if (getpid() == c->owner_pid)
        for (int i = 0; i < c->nidle; i++)
            close(c->idle[i]);
    if (c->ctl_fd >= 0)
        close(c->ctl_fd);
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->cond);
    free(c);
}

int shmkey_sock_call(struct shmkey_client *c, const struct shmkey_req *req,
                     const uint8_t *in, uint8_t *out, uint32_t out_cap,
                     struct shmkey_resp *resp, uint64_t deadline_ns)
{
    int fd;
    if (req->in_len > c->max_payload)
        return SHMKEY_ETOOBIG;
    int rc = checkout(c, deadline_ns, &fd);
    if (rc != SHMKEY_OK)
        return rc;
    uint32_t len = (uint32_t)sizeof(*req) + req->in_len;
    struct iovec iov[3] = {
        {.iov_base = &len, .iov_len = sizeof(len)},
        {.iov_base = (void *)req, .iov_len = sizeof(*req)},
        {.iov_base = (void *)in, .iov_len = req->in_len},
    };
    rc = send_all(fd, iov, req->in_len ? 3 : 2);
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

static int arm(struct shmkey_server *s, int fd, int op)
{
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | EPOLLONESHOT};
    ev.data.fd = fd;
    return epoll_ctl(s->epfd, op, fd, &ev);
}

/*
 * Serve connections that arrive on ctl_fd: accepted from a listening socket
 * (listening != 0) or received as SCM_RIGHTS over a control socketpair.
 * ctl_fd is dup'ed; the caller keeps its own.
 */
int shmkey_server_open_socket(int ctl_fd, int listening, uint32_t max_payload,
                              struct shmkey_server **out)
{
    *out = NULL;
    if (max_payload < SHMKEY_MIN_SLOT_SIZE || max_payload > SHMKEY_MAX_SLOT_SIZE)
        return SHMKEY_EINVAL;
    struct shmkey_server *s = calloc(1, sizeof(*s));
    if (!s)
        return SHMKEY_ESYSTEM;
    s->transport = SHMKEY_TRANSPORT_SOCKET;
    s->max_payload = max_payload;
    s->listening = listening;
    s->peer_uid = geteuid();
    s->peer_gid = -1;
    s->ctl_fd = fcntl(ctl_fd, F_DUPFD_CLOEXEC, 3);
    s->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (s->ctl_fd < 0 || s->epfd < 0 ||
        fcntl(s->ctl_fd, F_SETFL, fcntl(s->ctl_fd, F_GETFL) | O_NONBLOCK) != 0 ||
        arm(s, s->ctl_fd, EPOLL_CTL_ADD) != 0) {
        shmkey_sock_server_close(s);
        return SHMKEY_ESYSTEM;
    }
    *out = s;
    return SHMKEY_OK;
}

/*
 * In a forked worker process: a connection received or accepted here exists
 * only in this process's descriptor table, so this process needs an epoll
 * set of its own. The control socket is shared; whoever takes a connection
 * off it serves that connection.
 */
int shmkey_server_after_fork(struct shmkey_server *s)
{
    if (s->transport != SHMKEY_TRANSPORT_SOCKET)
        return SHMKEY_OK;
    close(s->epfd);
    s->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (s->epfd < 0 || arm(s, s->ctl_fd, EPOLL_CTL_ADD) != 0)
        return SHMKEY_ESYSTEM;
    return SHMKEY_OK;
}

static int take_conn(struct shmkey_server *s)
{
    if (s->listening)
        return accept4(s->ctl_fd, NULL, NULL, SOCK_CLOEXEC);
    char byte;
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } u;
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1,
                        .msg_control = u.buf, .msg_controllen = sizeof(u.buf)};
    ssize_t n = recvmsg(s->ctl_fd, &mh, MSG_CMSG_CLOEXEC);
    if (n <= 0)
        return n == 0 ? -2 : -1;    /* -2: the owner closed its control socket */
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
    int fd = -1;
    if (cm && cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS &&
        cm->cmsg_len == CMSG_LEN(sizeof(int)))
        memcpy(&fd, CMSG_DATA(cm), sizeof(int));
    return fd;
}

/* Is gid among the groups of uid (primary or supplementary, per the user database)? */
static int uid_in_group(uid_t uid, gid_t primary, gid_t gid)
{
    struct passwd pw, *res = NULL;
    char buf[4096];
    gid_t groups[256];
    int n = 256;
    if (primary == gid)
        return 1;
    if (getpwuid_r(uid, &pw, buf, sizeof(buf), &res) != 0 || !res)
        return 0;
    if (getgrouplist(pw.pw_name, primary, groups, &n) < 0)
        return 0;
    for (int i = 0; i < n; i++)
        if (groups[i] == gid)
            return 1;
    return 0;
}

/* The same rule as the ring's file modes: our uid, root, or the named group. */
static int peer_allowed(struct shmkey_server *s, int fd)
{
    struct ucred cred;
    socklen_t len = sizeof(cred);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0)
        return 0;
    if (cred.uid == 0 || cred.uid == s->peer_uid)
        return 1;
    return s->peer_gid >= 0 && uid_in_group(cred.uid, cred.gid, (gid_t)s->peer_gid);
}

int shmkey_server_allow_peers(struct shmkey_server *s, uint32_t uid, int64_t gid)
{
    if (s->transport != SHMKEY_TRANSPORT_SOCKET)
        return SHMKEY_OK;       /* the ring's file modes are its access rule */
    s->peer_uid = (uid_t)uid;
    s->peer_gid = gid;
    return SHMKEY_OK;
}

static void add_conn(struct shmkey_server *s, int fd)
{
    struct timeval tv = {SOCK_IO_TIMEOUT_MS / 1000, (SOCK_IO_TIMEOUT_MS % 1000) * 1000};
    int type = 0;
    socklen_t tl = sizeof(type);
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tl) != 0 || type != SOCK_STREAM ||
        !peer_allowed(s, fd) ||
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) != 0 ||
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) != 0 ||
        arm(s, fd, EPOLL_CTL_ADD) != 0)
        close(fd);
}

int shmkey_sock_server_next(struct shmkey_server *s, struct shmkey_work *w,
                            uint32_t timeout_ms)
{
    uint64_t deadline = shmkey_now_ns() + (uint64_t)timeout_ms * 1000000u;
    for (;;) {
        if (s->stopping)
            return SHMKEY_EUNAVAIL;
        /* A zero timeout still looks once: it means "poll", not "give up". */
        uint64_t now = shmkey_now_ns();
        int ms = now >= deadline ? 0 : (int)((deadline - now + 999999u) / 1000000u);
        struct epoll_event ev;
        int n = epoll_wait(s->epfd, &ev, 1, ms);
        if (n < 0 && errno != EINTR)
            return SHMKEY_ESYSTEM;
        if (n <= 0) {
            if (shmkey_now_ns() >= deadline)
                return SHMKEY_ETIMEDOUT;
            continue;
        }
        int fd = ev.data.fd;
        if (fd == s->ctl_fd) {
            int cfd = take_conn(s);     /* -1 with EAGAIN: another process took it */
            if (cfd >= 0)
                add_conn(s, cfd);
            if (cfd != -2)
                arm(s, s->ctl_fd, EPOLL_CTL_MOD);
            continue;
        }
        uint32_t len;
        if (recv_all(fd, &len, sizeof(len), 0) != SHMKEY_OK ||
            len < sizeof(w->req) || len - sizeof(w->req) > s->max_payload ||
            len - sizeof(w->req) > w->cap ||
            recv_all(fd, &w->req, sizeof(w->req), 0) != SHMKEY_OK ||
            w->req.in_len != len - sizeof(w->req) ||
            recv_all(fd, w->payload, w->req.in_len, 0) != SHMKEY_OK) {
            /* Framing is lost: nothing after this can be trusted. */
            close(fd);
            continue;
        }
        w->fd = fd;
        if (w->req.op == SHMKEY_OP_PING) {
            shmkey_sock_server_reply(s, w, SHMKEY_OK, w->payload, w->req.in_len);
            continue;
        }
        return SHMKEY_OK;
    }
}

int shmkey_sock_server_reply(struct shmkey_server *s, struct shmkey_work *w,
                             int32_t status, const uint8_t *out, uint32_t out_len)
{
    if (out_len > s->max_payload) {
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
    int fd = w->fd;
    w->fd = -1;
    if (fd < 0)
        return SHMKEY_EINVAL;
    if (send_all(fd, iov, out_len ? 3 : 2) != SHMKEY_OK || arm(s, fd, EPOLL_CTL_MOD) != 0)
        close(fd);
    return SHMKEY_OK;
}

void shmkey_sock_server_close(struct shmkey_server *s)
{
    if (s->epfd >= 0)
        close(s->epfd);
    if (s->ctl_fd >= 0)
        close(s->ctl_fd);
    free(s);
}

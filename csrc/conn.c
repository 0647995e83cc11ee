/*
 * conn.c - connections between clients and an oracle, for both transports.
 *
 * Every connection is a Unix stream socket: connected to the oracle's
 * listening socket, or one end of a socketpair handed to an owned oracle
 * over its control socket. The oracle checks the peer's SO_PEERCRED before
 * it reads a byte; the client checks the oracle's. Then the client sends a
 * hello (protocol version, transport) and the oracle answers with a welcome:
 * geometry, its pid, and for a ring the sealed memfd, the read-only status
 * page and the wake-up pipes, as SCM_RIGHTS. The socket stays open as the
 * liveness signal both ways: hang-up is how either side learns the other died.
 *
 * The oracle side keeps its connections in a table that its worker threads
 * scan without a lock. A retired connection is freed only after every worker
 * has passed a quiescent point since (a grace period, as in RCU), so a
 * worker never touches freed memory or a reused descriptor number. Every
 * read from a peer is non-blocking and a hello or a socket message must be
 * complete within SHMKEY_HANDSHAKE_MS: a peer that trickles bytes holds only
 * its own connection.
 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

/* epoll data of the oracle's own descriptors; connections carry their pointer. */
#define EV_LISTEN 1u
#define EV_KICK 2u
#define EV_STOP 3u

/* ===================================================================== */
/* client                                                                */
/* ===================================================================== */

void shmkey_close_fds(int *fds, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        if (fds[i] >= 0) {
            close(fds[i]);
            fds[i] = -1;
        }
}

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
    return n == 1 ? SHMKEY_OK : shmkey_status_from_errno(errno);
}

static int ms_until(uint64_t deadline_ns)
{
    uint64_t now = shmkey_now_ns();
    return now >= deadline_ns ? 0 : (int)((deadline_ns - now + 999999u) / 1000000u);
}

/* connect() by deadline: a full backlog (EAGAIN) is retried, never waited out. */
static int dial_path(const char *path, uint64_t deadline_ns, int *fd_out, char *why,
                     uint32_t whylen)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return SHMKEY_ESYSTEM;
    for (;;) {
        if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0)
            break;
        int err = errno;
        if (err == EINTR)
            continue;
        if (err == EAGAIN) {
            if (shmkey_now_ns() >= deadline_ns) {
                close(fd);
                shmkey_why(why, whylen, "the oracle at %s accepts no connections (backlog full)",
                           path);
                return SHMKEY_ETIMEDOUT;
            }
            (void)poll(NULL, 0, 1);
            continue;
        }
        close(fd);
        if (err == EACCES || err == EPERM)
            shmkey_why(why, whylen, "uid %u gid %u may not connect to %s; start the oracle "
                       "with --group naming a group of this process", (unsigned)geteuid(),
                       (unsigned)getegid(), path);
        else
            shmkey_why(why, whylen, "cannot connect to %s: %s", path, strerror(err));
        return shmkey_status_from_errno(err);
    }
    *fd_out = fd;
    return SHMKEY_OK;
}

/* Is uid the oracle this client was told to trust? */
static int oracle_trusted(const struct shmkey_client *c, uid_t uid)
{
    if (c->oracle_uid == SHMKEY_UID_ANY)
        return 1;
    if (c->exact_uid)
        return (int64_t)uid == c->oracle_uid;
    return uid == geteuid() || uid == 0 || (c->oracle_uid >= 0 && (int64_t)uid == c->oracle_uid);
}

static int check_oracle(struct shmkey_client *c, int fd, char *why, uint32_t whylen)
{
    struct ucred cred;
    socklen_t len = sizeof(cred);
    char actual[96], expected[96], me[96];
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0)
        return SHMKEY_ESYSTEM;
    c->peer_uid = cred.uid;
    c->peer_pid = cred.pid;
    if (oracle_trusted(c, cred.uid))
        return SHMKEY_OK;
    shmkey_user_name(cred.uid, actual, sizeof(actual));
    shmkey_user_name((uint32_t)geteuid(), me, sizeof(me));
    if (c->oracle_uid >= 0)
        shmkey_user_name((uint32_t)c->oracle_uid, expected, sizeof(expected));
    if (c->exact_uid)
        shmkey_why(why, whylen, "the oracle at %s runs as %s (pid %d); expected %s", c->path,
                   actual, (int)cred.pid, expected);
    else if (c->oracle_uid >= 0 && (uid_t)c->oracle_uid != geteuid())
        shmkey_why(why, whylen, "the oracle at %s runs as %s (pid %d); expected %s, %s or root",
                   c->path, actual, (int)cred.pid, expected, me);
    else
        shmkey_why(why, whylen, "the oracle at %s runs as %s (pid %d); expected %s or root "
                   "(pass oracle_user to trust another user)", c->path, actual, (int)cred.pid, me);
    return SHMKEY_EIDENTITY;
}

static int read_welcome_into(int fd, uint64_t deadline_ns, struct shmkey_welcome *wel,
                             char *cbuf, size_t cap, int *fds, uint32_t maxfds, uint32_t *nfds,
                             char *why, uint32_t whylen)
{
    uint8_t *p = (uint8_t *)wel;
    size_t have = 0;
    while (have < sizeof(*wel)) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int r = poll(&pfd, 1, ms_until(deadline_ns));
        if (r < 0 && errno == EINTR)
            continue;
        if (r == 0) {
            shmkey_why(why, whylen, "the oracle did not answer the hello in time");
            return SHMKEY_ETIMEDOUT;
        }
        struct iovec iov = {.iov_base = p + have, .iov_len = sizeof(*wel) - have};
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1,
                            .msg_control = cbuf, .msg_controllen = cap};
        ssize_t n = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); n >= 0 && cm; cm = CMSG_NXTHDR(&mh, cm)) {
            if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
                continue;
            uint32_t k = (uint32_t)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            for (uint32_t i = 0; i < k; i++) {
                int got;
                memcpy(&got, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
                if (*nfds < maxfds)
                    fds[(*nfds)++] = got;
                else
                    close(got);     /* more than we take: a malformed welcome */
            }
        }
        if (n <= 0) {
            shmkey_close_fds(fds, *nfds);
            *nfds = 0;
            shmkey_why(why, whylen, "the oracle hung up during the handshake");
            return SHMKEY_EUNAVAIL;
        }
        if (mh.msg_flags & MSG_CTRUNC) {
            shmkey_close_fds(fds, *nfds);
            *nfds = 0;
            shmkey_why(why, whylen, "the oracle sent more descriptors than a ring has");
            return SHMKEY_EPROTO;
        }
        have += (size_t)n;
    }
    return SHMKEY_OK;
}

/* Read the welcome by deadline, and the descriptors that come with it. */
static int read_welcome(int fd, uint64_t deadline_ns, struct shmkey_welcome *wel, int *fds,
                        uint32_t maxfds, uint32_t *nfds, char *why, uint32_t whylen)
{
    /* On the heap: this runs inside OpenSSL ASYNC jobs too, whose stacks are small. */
    const size_t cap = CMSG_SPACE(sizeof(int) * (SHMKEY_MAX_SLOTS + 2));
    union cbuf {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int) * (SHMKEY_MAX_SLOTS + 2))];
    } *u = malloc(sizeof(union cbuf));
    *nfds = 0;
    if (!u)
        return SHMKEY_ESYSTEM;
    int rc = read_welcome_into(fd, deadline_ns, wel, u->buf, cap, fds, maxfds, nfds, why,
                               whylen);
    free(u);
    return rc;
}

/*
 * A new connection for client c, by deadline: connect (or hand a socketpair
 * to an owned oracle), check who the oracle is, say hello for transport, and
 * read the welcome with its descriptors (fds, up to maxfds). The oracle's
 * refusal comes back as its status, with why saying what happened.
 */
int shmkey_conn_dial(struct shmkey_client *c, int transport, uint64_t deadline_ns,
                     struct shmkey_welcome *wel, int *fds, uint32_t maxfds, int *sock_out,
                     char *why, uint32_t whylen)
{
    int fd = -1, rc;
    uint32_t nfds = 0;
    *sock_out = -1;
    if (c->path[0]) {
        rc = dial_path(c->path, deadline_ns, &fd, why, whylen);
        if (rc == SHMKEY_OK)
            rc = check_oracle(c, fd, why, whylen);
    } else {
        /* A socketpair we made: SO_PEERCRED would name us, and the ctl socket
           is the owned oracle's alone, so it needs no check. */
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
            return SHMKEY_ESYSTEM;
        rc = shmkey_send_fd(c->ctl_fd, sv[1]);
        close(sv[1]);
        fd = sv[0];
        if (rc == SHMKEY_OK && fcntl(fd, F_SETFL, O_NONBLOCK) != 0)
            rc = SHMKEY_ESYSTEM;
        if (rc != SHMKEY_OK)
            shmkey_why(why, whylen, "the owned oracle's control socket is closed");
    }
    if (rc == SHMKEY_OK) {
        struct shmkey_hello hello = {SHMKEY_MAGIC, SHMKEY_VERSION, (uint32_t)transport, 0};
        ssize_t n;
        do {
            n = send(fd, &hello, sizeof(hello), MSG_NOSIGNAL | MSG_DONTWAIT);
        } while (n < 0 && errno == EINTR);
        /* Refused, the oracle may have answered and hung up already: read on. */
        int refused = n != (ssize_t)sizeof(hello);
        rc = read_welcome(fd, deadline_ns, wel, fds, maxfds, &nfds, why, whylen);
        if (refused && rc == SHMKEY_OK && wel->status == SHMKEY_OK) {
            shmkey_why(why, whylen, "the oracle hung up before the hello");
            rc = SHMKEY_EPROTO;
        }
    }
    if (rc == SHMKEY_OK && (wel->magic != SHMKEY_MAGIC || wel->version != SHMKEY_VERSION)) {
        shmkey_why(why, whylen, "the oracle speaks protocol version %u; this shmkey speaks %u",
                   wel->version, SHMKEY_VERSION);
        rc = SHMKEY_EPROTO;
    }
    if (rc == SHMKEY_OK && wel->status != SHMKEY_OK) {
        rc = wel->status < 0 && wel->status >= SHMKEY_EIDENTITY ? wel->status : SHMKEY_EPROTO;
        if (rc == SHMKEY_EACCESS)
            shmkey_why(why, whylen, "the oracle refused uid %u gid %u: only its own uid, root "
                       "and members of its --group may connect", (unsigned)geteuid(),
                       (unsigned)getegid());
        else
            shmkey_why(why, whylen, "the oracle refused the connection: %s",
                       shmkey_strerror(rc));
    }
    if (rc == SHMKEY_OK && wel->nfds != nfds) {
        shmkey_why(why, whylen, "the welcome announced %u descriptors and carried %u",
                   wel->nfds, nfds);
        rc = SHMKEY_EPROTO;
    }
    if (rc == SHMKEY_OK && c->path[0] && (pid_t)wel->oracle_pid != c->peer_pid) {
        shmkey_why(why, whylen, "the welcome names pid %u, the socket's owner is pid %d",
                   wel->oracle_pid, (int)c->peer_pid);
        rc = SHMKEY_EPROTO;
    }
    if (rc != SHMKEY_OK) {
        shmkey_close_fds(fds, nfds);
        if (fd >= 0)
            close(fd);
        return rc;
    }
    *sock_out = fd;
    return SHMKEY_OK;
}

/* ===================================================================== */
/* oracle: grace periods                                                 */
/* ===================================================================== */

static uint64_t *qs_of(struct shmkey_server *s, struct shmkey_work *w)
{
    if (w->qs == 0) {
        uint32_t i = __atomic_fetch_add(&s->nqs, 1, __ATOMIC_ACQ_REL);
        if (i >= SHMKEY_MAX_PROCS)
            abort();            /* more workers than the configuration allows */
        w->qs = i + 1;
    }
    return &s->qs[w->qs - 1].v;
}

/* Online (odd): the worker may hold connection pointers. Offline: it holds none. */
void shmkey_server_online(struct shmkey_server *s, struct shmkey_work *w, int online)
{
    uint64_t *v = qs_of(s, w);
    uint64_t cur = __atomic_load_n(v, __ATOMIC_RELAXED);
    if ((int)(cur & 1) != online)
        __atomic_store_n(v, cur + 1, __ATOMIC_SEQ_CST);
}

/* A point where the worker holds no connection pointer it read before. */
void shmkey_server_quiescent(struct shmkey_server *s, struct shmkey_work *w)
{
    uint64_t *v = qs_of(s, w);
    __atomic_store_n(v, __atomic_load_n(v, __ATOMIC_RELAXED) + 2, __ATOMIC_RELEASE);
}

/* Has every worker passed a quiescent point since k was retired? */
static int grace_over(struct shmkey_server *s, const struct sconn *k)
{
    uint32_t n = __atomic_load_n(&s->nqs, __ATOMIC_ACQUIRE);
    for (uint32_t i = 0; i < n && i < SHMKEY_MAX_PROCS; i++)
        if (__atomic_load_n(&s->qs[i].v, __ATOMIC_ACQUIRE) - k->snap[i] < 2)
            return 0;
    return 1;
}

static void sconn_free(struct shmkey_server *s, struct sconn *k)
{
    if (k->fd >= 0)
        close(k->fd);
    shmkey_ring_unmap(s, k);
    free(k->buf);
    free(k);
}

/* ===================================================================== */
/* oracle: the table                                                     */
/* ===================================================================== */

/* Queue a connection's coming or going for the audit (under s->lock). */
static void push_event_locked(struct shmkey_server *s, const struct sconn *k, uint32_t kind)
{
    if (s->ev_count == SHMKEY_MAX_EVENTS) {
        s->ev_dropped++;
        return;
    }
    struct shmkey_conn_event *e = &s->events[(s->ev_head + s->ev_count) % SHMKEY_MAX_EVENTS];
    e->serial = k->serial;
    e->pid = (int32_t)k->pid;
    e->uid = (uint32_t)k->uid;
    e->kind = kind;
    e->transport = k->state == CONN_RING ? SHMKEY_TRANSPORT_SHM : SHMKEY_TRANSPORT_SOCKET;
    memcpy(e->comm, k->comm, sizeof(e->comm));
    s->ev_count++;
}

/*
 * Move up to cap queued connection events to out, oldest first; *dropped
 * gets how many were lost to a full queue since the last call. Returns the
 * number moved.
 */
int shmkey_server_events(struct shmkey_server *s, struct shmkey_conn_event *out, uint32_t cap,
                         uint64_t *dropped)
{
    uint32_t n = 0;
    pthread_mutex_lock(&s->lock);
    while (n < cap && s->ev_count) {
        out[n++] = s->events[s->ev_head];
        s->ev_head = (s->ev_head + 1) % SHMKEY_MAX_EVENTS;
        s->ev_count--;
    }
    if (dropped) {
        *dropped = s->ev_dropped;
        s->ev_dropped = 0;
    }
    pthread_mutex_unlock(&s->lock);
    return (int)n;
}

static void retire_locked(struct shmkey_server *s, struct sconn *k)
{
    if (k->announced)
        push_event_locked(s, k, SHMKEY_CONN_CLOSED);
    for (uint32_t i = 0; i < s->hw; i++)
        if (s->conns[i] == k) {
            __atomic_store_n(&s->conns[i], NULL, __ATOMIC_RELEASE);
            break;
        }
    s->nconns--;
    if (__atomic_load_n(&k->state, __ATOMIC_ACQUIRE) == CONN_RING)
        __atomic_sub_fetch(&s->nrings, 1, __ATOMIC_RELAXED);
    (void)epoll_ctl(s->epfd, EPOLL_CTL_DEL, k->fd, NULL);
    /* The client sees the hang-up now; the descriptor stays ours until the grace period ends. */
    (void)shutdown(k->fd, SHUT_RDWR);
    uint32_t n = __atomic_load_n(&s->nqs, __ATOMIC_ACQUIRE);
    for (uint32_t i = 0; i < n && i < SHMKEY_MAX_PROCS; i++)
        k->snap[i] = __atomic_load_n(&s->qs[i].v, __ATOMIC_ACQUIRE);
    k->next_dead = s->grave;
    s->grave = k;
}

/* Take k out of service: the client's ring and requests are reclaimed once no worker can see them. */
void shmkey_sconn_retire(struct shmkey_server *s, struct sconn *k)
{
    int alive = 0;
    if (!__atomic_compare_exchange_n(&k->dead, &alive, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return;
    pthread_mutex_lock(&s->lock);
    retire_locked(s, k);
    pthread_mutex_unlock(&s->lock);
}

int shmkey_sconn_rearm(struct shmkey_server *s, struct sconn *k)
{
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | EPOLLONESHOT, .data.ptr = k};
    if (__atomic_load_n(&k->dead, __ATOMIC_ACQUIRE))
        return SHMKEY_OK;
    return epoll_ctl(s->epfd, EPOLL_CTL_MOD, k->fd, &ev) == 0 || errno == ENOENT
           ? SHMKEY_OK : SHMKEY_ESYSTEM;
}

/*
 * Retire connections whose hello or message is overdue, and free retired
 * ones whose grace period is over. Called by the oracle's main thread and,
 * every 100 ms at most, by a worker on its way to sleep. Returns the number
 * of connections freed.
 */
int shmkey_server_reap(struct shmkey_server *s)
{
    uint64_t now = shmkey_now_ns();
    int freed = 0;
    struct sconn *done = NULL;
    pthread_mutex_lock(&s->lock);
    s->next_reap_ns = now + 100000000ull;
    for (uint32_t i = 0; i < s->hw; i++) {
        struct sconn *k = s->conns[i];
        int alive = 0;
        if (k && k->deadline_ns && now > __atomic_load_n(&k->deadline_ns, __ATOMIC_RELAXED) &&
            __atomic_compare_exchange_n(&k->dead, &alive, 1, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE))
            retire_locked(s, k);
    }
    for (struct sconn **pp = &s->grave; *pp;) {
        struct sconn *k = *pp;
        if (grace_over(s, k)) {
            *pp = k->next_dead;
            k->next_dead = done;
            done = k;
        } else {
            pp = &k->next_dead;
        }
    }
    pthread_mutex_unlock(&s->lock);
    while (done) {
        struct sconn *k = done;
        done = k->next_dead;
        sconn_free(s, k);
        freed++;
    }
    return freed;
}

int shmkey_server_connections(struct shmkey_server *s)
{
    pthread_mutex_lock(&s->lock);
    int n = (int)s->nconns;
    pthread_mutex_unlock(&s->lock);
    return n;
}

/* ===================================================================== */
/* oracle: accepting                                                     */
/* ===================================================================== */

static int arm_own(struct shmkey_server *s, int fd, uint32_t tag, int op, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.u64 = tag};
    return epoll_ctl(s->epfd, op, fd, &ev);
}

/* Re-arm the listening socket, if it is one-shot (thread workers share one epoll set). */
static void rearm_listener(struct shmkey_server *s)
{
    if (s->nprocs <= 1)
        (void)arm_own(s, s->lfd, EV_LISTEN, EPOLL_CTL_MOD, EPOLLIN | EPOLLONESHOT);
}

/* The next connection: accepted, or received over an owned oracle's control socket. */
static int take_conn(struct shmkey_server *s)
{
    if (s->listening)
        return accept4(s->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    char byte;
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } u;
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1,
                        .msg_control = u.buf, .msg_controllen = sizeof(u.buf)};
    ssize_t n = recvmsg(s->lfd, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (n <= 0)
        return n == 0 ? -2 : -1;    /* -2: the owner closed its control socket */
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
    int fd = -1;
    if (cm && cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS &&
        cm->cmsg_len == CMSG_LEN(sizeof(int)))
        memcpy(&fd, CMSG_DATA(cm), sizeof(int));
    if (fd >= 0 && fcntl(fd, F_SETFL, O_NONBLOCK) != 0) {
        close(fd);
        fd = -1;
    }
    return fd;
}

/* Is gid among the peer's groups (primary, or supplementary as the kernel has them)? */
static int peer_in_group(int fd, gid_t primary, gid_t gid)
{
    gid_t small[64], *groups = small;
    socklen_t len = sizeof(small);
    int found = primary == gid;
    if (found)
        return 1;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &len) != 0) {
        if (errno != ERANGE || !(groups = malloc(len)))
            return 0;
        if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &len) != 0)
            len = 0;
    }
    for (size_t i = 0; i < len / sizeof(gid_t); i++)
        found |= groups[i] == gid;
    if (groups != small)
        free(groups);
    return found;
}

static void refuse(struct shmkey_server *s, int fd, const struct ucred *cred, int status,
                   const char *reason)
{
    struct shmkey_welcome wel = {.magic = SHMKEY_MAGIC, .version = SHMKEY_VERSION,
                                 .status = status, .oracle_pid = (uint32_t)s->oracle_pid};
    char who[96];
    shmkey_user_name(cred->uid, who, sizeof(who));
    /* One line per refusal, in the oracle's log format. */
    dprintf(2, "shmkey[%d] WARNING refused a connection from pid %d, %s, gid %u: %s\n",
            (int)getpid(), (int)cred->pid, who, (unsigned)cred->gid, reason);
    (void)send(fd, &wel, sizeof(wel), MSG_NOSIGNAL | MSG_DONTWAIT);
    close(fd);
}

/* A process's name, for the audit: read now, while the peer surely lives; "?" if unreadable. */
static void read_comm(pid_t pid, char *out, size_t cap)
{
    char path[40];
    snprintf(path, sizeof(path), "/proc/%d/comm", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    ssize_t n = fd >= 0 ? read(fd, out, cap - 1) : -1;
    if (fd >= 0)
        close(fd);
    if (n <= 0) {
        snprintf(out, cap, "?");
        return;
    }
    out[n] = '\0';
    out[strcspn(out, "\n")] = '\0';
}

/* Accept one connection: check the peer first, then wait for its hello. */
static void accept_one(struct shmkey_server *s)
{
    struct ucred cred = {0, 0, 0};
    socklen_t len = sizeof(cred);
    int type = 0;
    socklen_t tl = sizeof(type);
    char why[160];
    int fd = take_conn(s);
    if (fd != -2)
        rearm_listener(s);
    if (fd < 0)
        return;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tl) != 0 || type != SOCK_STREAM ||
        getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
        close(fd);
        return;
    }
    if (!(cred.uid == 0 || cred.uid == s->peer_uid ||
          (s->peer_gid >= 0 && peer_in_group(fd, cred.gid, (gid_t)s->peer_gid)))) {
        if (s->peer_gid >= 0)
            snprintf(why, sizeof(why), "not uid %u, root, or a member of group %lld",
                     (unsigned)s->peer_uid, (long long)s->peer_gid);
        else
            snprintf(why, sizeof(why), "not uid %u or root, and the oracle has no --group",
                     (unsigned)s->peer_uid);
        refuse(s, fd, &cred, SHMKEY_EACCESS, why);
        return;
    }
    struct sconn *k = calloc(1, sizeof(*k));
    if (!k) {
        close(fd);
        return;
    }
    k->fd = fd;
    k->state = CONN_HELLO;
    k->uid = cred.uid;
    k->pid = cred.pid;
    read_comm(cred.pid, k->comm, sizeof(k->comm));
    k->deadline_ns = shmkey_now_ns() + SHMKEY_HANDSHAKE_MS * 1000000ull;
    pthread_mutex_lock(&s->lock);
    k->serial = ((uint64_t)(s->proc + 1) << 40) | ++s->next_serial;
    uint32_t slot = SHMKEY_MAX_CONNS;
    for (uint32_t i = 0; i < SHMKEY_MAX_CONNS; i++)
        if (!s->conns[i]) {
            slot = i;
            break;
        }
    if (slot == SHMKEY_MAX_CONNS || s->stopping) {
        pthread_mutex_unlock(&s->lock);
        free(k);
        snprintf(why, sizeof(why), "the oracle serves %d connections already",
                 SHMKEY_MAX_CONNS);
        refuse(s, fd, &cred, SHMKEY_EUNAVAIL, why);
        return;
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | EPOLLONESHOT, .data.ptr = k};
    __atomic_store_n(&s->conns[slot], k, __ATOMIC_RELEASE);
    if (slot >= s->hw)
        __atomic_store_n(&s->hw, slot + 1, __ATOMIC_RELEASE);
    s->nconns++;
    if (epoll_ctl(s->epfd, EPOLL_CTL_ADD, fd, &ev) != 0) {
        k->dead = 1;
        retire_locked(s, k);
    }
    pthread_mutex_unlock(&s->lock);
}

/* ===================================================================== */
/* oracle: hello and welcome                                             */
/* ===================================================================== */

static void welcome(struct shmkey_server *s, struct sconn *k, struct shmkey_welcome *wel,
                    int32_t status, uint32_t transport)
{
    memset(wel, 0, sizeof(*wel));
    wel->magic = SHMKEY_MAGIC;
    wel->version = SHMKEY_VERSION;
    wel->status = status;
    wel->transport = transport;
    wel->slot_size = s->slot_size;
    wel->oracle_pid = (uint32_t)s->oracle_pid;
    wel->spin_us = s->spin_us;
    wel->ncpu = s->ncpu;
    wel->proc = s->proc;
    wel->nprocs = s->nprocs ? s->nprocs : 1;
}

static int send_welcome(int fd, const struct shmkey_welcome *wel, const int *fds, uint32_t nfds)
{
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int) * (SHMKEY_MAX_SLOTS + 2))];
    } u;
    struct iovec iov = {.iov_base = (void *)wel, .iov_len = sizeof(*wel)};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
    if (nfds) {
        memset(&u, 0, CMSG_SPACE(sizeof(int) * nfds));
        mh.msg_control = u.buf;
        mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(cm), fds, sizeof(int) * nfds);
    }
    ssize_t n;
    do {
        n = sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    return n == (ssize_t)sizeof(*wel) ? SHMKEY_OK : SHMKEY_EUNAVAIL;
}

/* A complete hello: set the connection up as a ring or a message stream, and welcome it. */
static void on_hello(struct shmkey_server *s, struct sconn *k)
{
    struct shmkey_hello h;
    struct shmkey_welcome wel;
    int fds[SHMKEY_MAX_SLOTS + 2];
    uint32_t nfds = 0;
    memcpy(&h, k->hello, sizeof(h));
    uint32_t transport = h.transport == SHMKEY_TRANSPORT_ANY ? (uint32_t)s->transport
                                                             : h.transport;
    if (h.magic != SHMKEY_MAGIC || h.version != SHMKEY_VERSION || h.reserved != 0 ||
        (transport != SHMKEY_TRANSPORT_SHM && transport != SHMKEY_TRANSPORT_SOCKET)) {
        welcome(s, k, &wel, SHMKEY_EPROTO, 0);
        (void)send_welcome(k->fd, &wel, NULL, 0);
        shmkey_sconn_retire(s, k);
        return;
    }
    int rc = SHMKEY_OK;
    if (transport == SHMKEY_TRANSPORT_SHM)
        rc = shmkey_ring_create(s, k, fds, &nfds);
    else if (!(k->buf = malloc(s->slot_size)))
        rc = SHMKEY_ESYSTEM;
    welcome(s, k, &wel, rc, transport);
    if (rc == SHMKEY_OK && transport == SHMKEY_TRANSPORT_SHM) {
        wel.nslots = s->nslots;
        wel.nfds = nfds;
    }
    rc = send_welcome(k->fd, &wel, fds, nfds) == SHMKEY_OK ? rc : SHMKEY_EUNAVAIL;
    /* The client has its copies now; the status page's descriptor is the server's to keep. */
    for (uint32_t i = 0; i < nfds; i++)
        if (fds[i] != s->status_fd)
            close(fds[i]);
    if (rc != SHMKEY_OK) {
        shmkey_sconn_retire(s, k);
        return;
    }
    __atomic_store_n(&k->deadline_ns, 0, __ATOMIC_RELAXED);
    k->have = 0;
    /* Published last, under the lock that retiring takes: workers scan only rings whose
       state says RING, and the count of rings stays right. */
    pthread_mutex_lock(&s->lock);
    if (!__atomic_load_n(&k->dead, __ATOMIC_ACQUIRE)) {
        if (transport == SHMKEY_TRANSPORT_SHM)
            __atomic_add_fetch(&s->nrings, 1, __ATOMIC_RELAXED);
        __atomic_store_n(&k->state, transport == SHMKEY_TRANSPORT_SHM ? CONN_RING : CONN_FRAMES,
                         __ATOMIC_RELEASE);
        push_event_locked(s, k, SHMKEY_CONN_OPENED);
        k->announced = 1;
    }
    pthread_mutex_unlock(&s->lock);
    shmkey_sconn_rearm(s, k);
}

/* Bytes on a ring connection are doorbells; end of file is the client's death. */
static void on_ring_io(struct shmkey_server *s, struct sconn *k)
{
    uint8_t buf[256];
    for (int i = 0; i < 16; i++) {
        ssize_t n = recv(k->fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (n > 0 && (size_t)n < sizeof(buf))
            break;                      /* drained: one system call for the usual one byte */
        if (n > 0)
            continue;
        if (n < 0 && (errno == EINTR))
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        shmkey_sconn_retire(s, k);
        return;
    }
    shmkey_sconn_rearm(s, k);
}

/* Returns 1 with a socket request in w, else 0. */
static int on_conn_io(struct shmkey_server *s, struct sconn *k, struct shmkey_work *w)
{
    if (__atomic_load_n(&k->dead, __ATOMIC_ACQUIRE))
        return 0;
    int state = __atomic_load_n(&k->state, __ATOMIC_ACQUIRE);
    if (state == CONN_RING) {
        on_ring_io(s, k);
        return 0;
    }
    if (state == CONN_FRAMES)
        return shmkey_frames_read(s, k, w);
    for (;;) {
        ssize_t n = shmkey_sconn_recv(s, k, k->hello + k->have, sizeof(k->hello) - k->have);
        if (n == 0)
            return 0;
        k->have += (uint32_t)n;
        if (k->have == sizeof(k->hello)) {
            on_hello(s, k);
            return 0;
        }
    }
}

/*
 * Sleep until something happens, by deadline: a doorbell, a kick from
 * another worker, a new connection, a hello or a socket message. Offline
 * while asleep. Returns 1 with a socket request in w, 0 to look at the
 * rings again, SHMKEY_ETIMEDOUT, or SHMKEY_EUNAVAIL once stopping.
 */
static int on_event(struct shmkey_server *s, struct shmkey_work *w, struct epoll_event *ev);

int shmkey_server_wait(struct shmkey_server *s, struct shmkey_work *w, uint64_t deadline)
{
    struct epoll_event ev;
    if (shmkey_now_ns() >= __atomic_load_n(&s->next_reap_ns, __ATOMIC_RELAXED))
        shmkey_server_reap(s);
    shmkey_server_online(s, w, 0);
    int n = epoll_wait(s->epfd, &ev, 1, ms_until(deadline));
    shmkey_server_online(s, w, 1);
    if (s->stopping)
        return SHMKEY_EUNAVAIL;
    if (n < 0 && errno != EINTR)
        return SHMKEY_ESYSTEM;
    if (n <= 0)
        return shmkey_now_ns() >= deadline ? SHMKEY_ETIMEDOUT : 0;
    return on_event(s, w, &ev);
}

/* While spinning for rings: anything else that arrived (a socket message, a new client)? */
int shmkey_server_peek(struct shmkey_server *s, struct shmkey_work *w)
{
    struct epoll_event ev;
    if (epoll_wait(s->epfd, &ev, 1, 0) != 1)
        return 0;
    return on_event(s, w, &ev);
}

static int on_event(struct shmkey_server *s, struct shmkey_work *w, struct epoll_event *e)
{
    struct epoll_event ev = *e;
    if (ev.data.u64 == EV_LISTEN) {
        accept_one(s);
        return 0;
    }
    if (ev.data.u64 == EV_KICK) {
        uint64_t v;
        (void)read(s->kick, &v, sizeof(v));
        (void)arm_own(s, s->kick, EV_KICK, EPOLL_CTL_MOD, EPOLLIN | EPOLLONESHOT);
        return 0;
    }
    if (ev.data.u64 == EV_STOP)
        return SHMKEY_EUNAVAIL;
    return on_conn_io(s, (struct sconn *)ev.data.ptr, w);
}

/* ===================================================================== */
/* oracle: life cycle                                                    */
/* ===================================================================== */

static int setup_events(struct shmkey_server *s)
{
    s->epfd = epoll_create1(EPOLL_CLOEXEC);
    s->kick = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    s->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (s->epfd < 0 || s->kick < 0 || s->stop_fd < 0)
        return SHMKEY_ESYSTEM;
    /* Worker processes each have their own epoll set: one of them takes each connection. */
    uint32_t lev = s->nprocs > 1 ? EPOLLIN | EPOLLEXCLUSIVE : EPOLLIN | EPOLLONESHOT;
    if (arm_own(s, s->lfd, EV_LISTEN, EPOLL_CTL_ADD, lev) != 0 ||
        arm_own(s, s->kick, EV_KICK, EPOLL_CTL_ADD, EPOLLIN | EPOLLONESHOT) != 0 ||
        arm_own(s, s->stop_fd, EV_STOP, EPOLL_CTL_ADD, EPOLLIN) != 0)
        return SHMKEY_ESYSTEM;
    return SHMKEY_OK;
}

static void close_events(struct shmkey_server *s)
{
    int *fds[] = {&s->epfd, &s->kick, &s->stop_fd};
    for (size_t i = 0; i < sizeof(fds) / sizeof(fds[0]); i++)
        if (*fds[i] >= 0) {
            close(*fds[i]);
            *fds[i] = -1;
        }
}

#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010
#endif

/* The status page: written by the oracle's workers, sealed so clients can only read it. */
static int make_status_page(struct shmkey_server *s)
{
    s->status_fd = memfd_create("shmkey-status", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (s->status_fd < 0 || ftruncate(s->status_fd, SHMKEY_STATUS_SIZE) != 0)
        return SHMKEY_ESYSTEM;
    void *p = mmap(NULL, SHMKEY_STATUS_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, s->status_fd, 0);
    if (p == MAP_FAILED)
        return SHMKEY_ESYSTEM;
    s->status = p;
    if (fcntl(s->status_fd, F_ADD_SEALS, SHMKEY_RING_SEALS | F_SEAL_FUTURE_WRITE) != 0)
        return SHMKEY_ESYSTEM;
    return SHMKEY_OK;
}

/*
 * An oracle serving the connections that arrive on fd: accepted from a
 * listening socket (listening != 0) or received as SCM_RIGHTS over an owned
 * oracle's control socketpair. fd is dup'ed; the caller keeps its own.
 * transport is what a hello for SHMKEY_TRANSPORT_ANY gets; nprocs is how
 * many worker processes will serve (1: worker threads of this process).
 */
int shmkey_server_open(int fd, int listening, int transport, uint32_t nslots,
                       uint32_t slot_size, uint32_t spin_us, uint32_t nprocs,
                       struct shmkey_server **out)
{
    *out = NULL;
    if (nslots == 0 || nslots > SHMKEY_MAX_SLOTS || slot_size < SHMKEY_MIN_SLOT_SIZE ||
        slot_size > SHMKEY_MAX_SLOT_SIZE || nprocs == 0 || nprocs > SHMKEY_MAX_PROCS ||
        (transport != SHMKEY_TRANSPORT_SHM && transport != SHMKEY_TRANSPORT_SOCKET))
        return SHMKEY_EINVAL;
    struct shmkey_server *s = calloc(1, sizeof(*s));
    if (!s)
        return SHMKEY_ESYSTEM;
    s->epfd = s->kick = s->stop_fd = s->status_fd = -1;
    s->listening = listening;
    s->transport = transport;
    s->nslots = nslots;
    s->slot_size = slot_size;
    s->stride = shmkey_slot_stride(slot_size);
    s->spin_us = spin_us;
    s->ncpu = shmkey_ncpu();
    (void)shmkey_runnable();    /* its descriptor opened now, not by the first spin */
    s->nprocs = nprocs;
    s->oracle_pid = getpid();
    s->peer_uid = geteuid();
    s->peer_gid = -1;
    pthread_mutex_init(&s->lock, NULL);
    pthread_mutex_init(&s->signer_lock, NULL);
    s->lfd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    int rc = s->lfd < 0 || fcntl(s->lfd, F_SETFL, fcntl(s->lfd, F_GETFL) | O_NONBLOCK) != 0
             ? SHMKEY_ESYSTEM : make_status_page(s);
    if (rc == SHMKEY_OK)
        rc = setup_events(s);
    if (rc != SHMKEY_OK) {
        shmkey_server_close(s);
        return rc;
    }
    *out = s;
    return SHMKEY_OK;
}

/*
 * In a forked worker process number proc: a connection it takes exists only
 * in its descriptor table, so it gets an epoll set and a table of its own;
 * the listening socket and the status page are shared. Its hints in the
 * status page start from zero (a worker killed while spinning left its own).
 */
int shmkey_server_after_fork(struct shmkey_server *s, uint32_t proc)
{
    if (proc >= SHMKEY_MAX_PROCS || proc >= s->nprocs)
        return SHMKEY_EINVAL;
    close_events(s);
    pthread_mutex_init(&s->lock, NULL);
    pthread_mutex_init(&s->signer_lock, NULL);
    memset(s->conns, 0, sizeof(s->conns));
    s->hw = s->nconns = s->nqs = s->nrings = 0;
    s->grave = NULL;
    memset(s->qs, 0, sizeof(s->qs));
    s->ev_head = s->ev_count = 0;
    s->ev_dropped = 0;
    s->next_serial = 0;
    s->proc = proc;
    __atomic_store_n(&s->status->active[proc], 0, __ATOMIC_RELAXED);
    __atomic_store_n(&s->status->spinners[proc], 0, __ATOMIC_SEQ_CST);
    return setup_events(s);
}

/* Wake every worker so it sees the oracle stopping, and hang up on every client. */
void shmkey_server_stop(struct shmkey_server *s)
{
    uint64_t one = 1;
    s->stopping = 1;
    if (s->stop_fd >= 0)
        (void)write(s->stop_fd, &one, sizeof(one));
    pthread_mutex_lock(&s->lock);
    for (uint32_t i = 0; i < s->hw; i++)
        if (s->conns[i])
            (void)shutdown(s->conns[i]->fd, SHUT_RDWR);
    pthread_mutex_unlock(&s->lock);
}

/* After the workers are gone: every connection and the oracle's own descriptors. */
void shmkey_server_close(struct shmkey_server *s)
{
    if (!s)
        return;
    for (uint32_t i = 0; i < s->hw; i++)
        if (s->conns[i])
            sconn_free(s, s->conns[i]);
    while (s->grave) {
        struct sconn *k = s->grave;
        s->grave = k->next_dead;
        sconn_free(s, k);
    }
    close_events(s);
    if (s->lfd >= 0)
        close(s->lfd);
    if (s->status)
        munmap(s->status, SHMKEY_STATUS_SIZE);
    if (s->status_fd >= 0)
        close(s->status_fd);
    shmkey_signer_release(s);
    pthread_mutex_destroy(&s->lock);
    pthread_mutex_destroy(&s->signer_lock);
    free(s);
}

int shmkey_server_allow_peers(struct shmkey_server *s, uint32_t uid, int64_t gid)
{
    s->peer_uid = (uid_t)uid;
    s->peer_gid = gid;
    return SHMKEY_OK;
}

ssize_t shmkey_sconn_recv(struct shmkey_server *s, struct sconn *k, void *dst, size_t want)
{
    for (;;) {
        /* MSG_DONTWAIT: per call, so a peer that clears O_NONBLOCK on its end changes nothing. */
        ssize_t n = recv(k->fd, dst, want, MSG_DONTWAIT);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            shmkey_sconn_rearm(s, k);
            return 0;
        }
        if (n <= 0) {
            shmkey_sconn_retire(s, k);
            return 0;
        }
        return n;
    }
}

/*
 * sandbox.c - confine a network-facing process once it holds everything it
 * needs: an empty root, another user, no capabilities, no privilege gain,
 * no fork, no core, Landlock limits on TCP ports, abstract sockets and
 * signals, and a seccomp allow-list. Built into the Python extension only
 * (never into the OpenSSL module, which must not need libseccomp).
 *
 * The steps run in titus's order (chroot, then groups, gid, uid) and the
 * filter comes last, so that the steps themselves need no allowance in it.
 * In two halves, so that a process may start its threads in between: they
 * inherit what the first half set, and the second covers them too.
 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <dirent.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/landlock.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <termios.h>
#include <ucontext.h>
#include <unistd.h>

#include <seccomp.h>

/* Landlock's network rules (ABI 4) and scopes (ABI 6) are newer than some
 * distributions' kernel headers; the kernel ABI itself is stable. */
#ifndef LANDLOCK_ACCESS_NET_BIND_TCP
#define LANDLOCK_ACCESS_NET_BIND_TCP (1ULL << 0)
#define LANDLOCK_ACCESS_NET_CONNECT_TCP (1ULL << 1)
#define LANDLOCK_RULE_NET_PORT 2
#endif
#ifndef LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET
#define LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET (1ULL << 0)
#define LANDLOCK_SCOPE_SIGNAL (1ULL << 1)
#endif
#ifndef LANDLOCK_CREATE_RULESET_VERSION
#define LANDLOCK_CREATE_RULESET_VERSION (1U << 0)
#endif

struct sk_landlock_ruleset {            /* landlock_ruleset_attr as of ABI 6 */
    uint64_t handled_access_fs;
    uint64_t handled_access_net;
    uint64_t scoped;
};

struct sk_landlock_port {               /* landlock_net_port_attr */
    uint64_t allowed_access;
    uint64_t port;
};

#define SK_WHY(...) snprintf(why, whylen, __VA_ARGS__)

/* ---- logging a denied call, once per system call, from the SIGSYS handler ---- */

#define SK_NR_MAX 1024
static char *nr_names[SK_NR_MAX];       /* resolved before the filter: the handler may not allocate */
static unsigned char nr_logged[SK_NR_MAX];
static char log_prefix[128];

static size_t sk_put(char *dst, size_t at, size_t cap, const char *s)
{
    while (*s && at + 1 < cap)
        dst[at++] = *s++;
    return at;
}

static size_t sk_put_num(char *dst, size_t at, size_t cap, unsigned long v)
{
    char digits[24];
    int n = 0;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v && n < (int)sizeof(digits));
    while (n > 0 && at + 1 < cap)
        dst[at++] = digits[--n];
    return at;
}

/*
 * A call the filter traps: make it return -EPERM, as SCMP_ACT_ERRNO would,
 * and say so once on stderr. Async-signal-safe: write(2) and no allocation.
 */
static void sk_on_sigsys(int sig, siginfo_t *si, void *ctx)
{
    int saved = errno;
    ucontext_t *uc = ctx;
    unsigned nr = (unsigned)si->si_syscall;
    (void)sig;
#if defined(__x86_64__)
    uc->uc_mcontext.gregs[REG_RAX] = -EPERM;
#elif defined(__aarch64__)
    uc->uc_mcontext.regs[0] = (unsigned long long)(long long)-EPERM;
#endif
    if (nr >= SK_NR_MAX || !__atomic_exchange_n(&nr_logged[nr], 1, __ATOMIC_RELAXED)) {
        char line[256];
        size_t n = sk_put(line, 0, sizeof(line), log_prefix);
        n = sk_put(line, n, sizeof(line), "sandbox: denied system call ");
        n = sk_put(line, n, sizeof(line), nr < SK_NR_MAX && nr_names[nr] ? nr_names[nr] : "?");
        n = sk_put(line, n, sizeof(line), " (");
        n = sk_put_num(line, n, sizeof(line), nr);
        n = sk_put(line, n, sizeof(line), "); it returned EPERM\n");
        ssize_t ignored = write(2, line, n);
        (void)ignored;
    }
    errno = saved;
}

#if defined(__x86_64__) || defined(__aarch64__)
#define SK_CAN_TRAP 1
#else
#define SK_CAN_TRAP 0
#endif

static int sk_install_trap(char *why, uint32_t whylen)
{
    for (int nr = 0; nr < SK_NR_MAX; nr++)
        if (!nr_names[nr])
            nr_names[nr] = seccomp_syscall_resolve_num_arch(SCMP_ARCH_NATIVE, nr);
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = sk_on_sigsys;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSYS, &sa, NULL) != 0) {
        SK_WHY("sigaction(SIGSYS): %s", strerror(errno));
        return SHMKEY_ESYSTEM;
    }
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGSYS);
    (void)sigprocmask(SIG_UNBLOCK, &set, NULL);
    return SHMKEY_OK;
}

/* ---- the seccomp allow-list ---- */

/* Everything a Python asyncio TLS worker and shmkey's client do once running. */
static const char *const allowed_calls[] = {
    /* descriptors and files (only the empty root is visible) */
    "read", "write", "readv", "writev", "pread64", "pwrite64", "close", "close_range",
    "fstat", "newfstatat", "stat", "lstat", "statx", "lseek", "openat", "open", "getdents64",
    "fcntl", "dup", "dup2", "dup3", "access", "faccessat", "faccessat2", "readlink",
    "readlinkat", "getcwd",
    /* waiting */
    "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll",
    "select", "pselect6", "nanosleep", "clock_nanosleep", "sched_yield", "futex", "futex_waitv",
    /* sockets already made, and new ones as filtered below */
    "connect", "accept", "accept4", "sendto", "recvfrom", "sendmsg", "recvmsg", "sendmmsg",
    "recvmmsg", "shutdown", "getsockname", "getpeername", "getsockopt", "setsockopt",
    /* memory (mmap and mprotect: filtered below) */
    "munmap", "mremap", "brk", "madvise",
    /* time, identity, randomness */
    "clock_gettime", "clock_getres", "gettimeofday", "time", "getpid", "getppid", "gettid",
    "getuid", "geteuid", "getgid", "getegid", "getgroups", "getresuid", "getresgid",
    "getrandom", "uname", "getrusage", "times", "sysinfo", "sched_getaffinity",
    /* signals to this process only (kill, tgkill: filtered below) */
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "rt_sigpending",
    "rt_sigtimedwait", "rt_sigsuspend",
    /* threads and the end */
    "rseq", "set_robust_list", "set_tid_address", "restart_syscall", "exit", "exit_group",
};

/* ioctls a worker makes: non-blocking mode, close-on-exec, isatty. Not TIOCSTI. */
static const unsigned long allowed_ioctls[] = {FIONBIO, FIONREAD, FIOCLEX, FIONCLEX,
                                               TCGETS, TIOCGWINSZ};

static int sk_rule_act(scmp_filter_ctx f, uint32_t action, const char *name, unsigned n,
                       const struct scmp_arg_cmp *a, char *why, uint32_t whylen)
{
    int nr = seccomp_syscall_resolve_name(name);
    if (nr == __NR_SCMP_ERROR)
        return SHMKEY_OK;               /* not a call of this architecture */
    int rc = seccomp_rule_add_array(f, action, nr, n, a);
    if (rc != 0) {
        SK_WHY("seccomp rule for %s: %s", name, strerror(-rc));
        return SHMKEY_ESYSTEM;
    }
    return SHMKEY_OK;
}

static int sk_rule(scmp_filter_ctx f, const char *name, unsigned n, const struct scmp_arg_cmp *a,
                   char *why, uint32_t whylen)
{
    return sk_rule_act(f, SCMP_ACT_ALLOW, name, n, a, why, whylen);
}

/*
 * No new threads, refused without a signal: pthread_create blocks every
 * signal around clone, and a trapped call with SIGSYS blocked kills the
 * process. clone3 hides its flags from the filter, so it is "not
 * implemented" and libc falls back to clone, whose CLONE_THREAD is visible.
 * fork (clone without it) stays trapped: denied, and logged.
 */
static int sk_thread_rules(scmp_filter_ctx f, char *why, uint32_t whylen)
{
    struct scmp_arg_cmp thread = SCMP_A0(SCMP_CMP_MASKED_EQ, CLONE_THREAD, CLONE_THREAD);
    int rc = sk_rule_act(f, SCMP_ACT_ERRNO(ENOSYS), "clone3", 0, NULL, why, whylen);
    if (rc == SHMKEY_OK)
        rc = sk_rule_act(f, SCMP_ACT_ERRNO(EAGAIN), "clone", 1, &thread, why, whylen);
    return rc;
}

static int sk_socket_rules(scmp_filter_ctx f, uint32_t families, char *why, uint32_t whylen)
{
    static const struct {
        uint32_t flag;
        int family;
    } fams[] = {{SHMKEY_SANDBOX_UNIX, AF_UNIX}, {SHMKEY_SANDBOX_INET, AF_INET},
                {SHMKEY_SANDBOX_INET6, AF_INET6}};
    /* The low bits of the type; SOCK_NONBLOCK and SOCK_CLOEXEC may be set. */
    const scmp_datum_t type_mask = 0xf;
    int rc = SHMKEY_OK;
    for (size_t i = 0; i < sizeof(fams) / sizeof(fams[0]) && rc == SHMKEY_OK; i++) {
        if (!(families & fams[i].flag))
            continue;
        struct scmp_arg_cmp stream[3] = {
            SCMP_A0(SCMP_CMP_EQ, (scmp_datum_t)fams[i].family),
            SCMP_A1(SCMP_CMP_MASKED_EQ, type_mask, SOCK_STREAM),
            SCMP_A2(SCMP_CMP_EQ, 0),
        };
        rc = sk_rule(f, "socket", 3, stream, why, whylen);
        if (rc == SHMKEY_OK && fams[i].family != AF_UNIX) {
            stream[2] = SCMP_A2(SCMP_CMP_EQ, IPPROTO_TCP);
            rc = sk_rule(f, "socket", 3, stream, why, whylen);
        }
    }
    return rc;
}

static int sk_load_filter(uint32_t families, char *why, uint32_t whylen)
{
    /* Another ABI (int 0x80, x32) would dodge the rules: killing is the only safe answer. */
    scmp_filter_ctx f = seccomp_init(SK_CAN_TRAP ? SCMP_ACT_TRAP : SCMP_ACT_ERRNO(EPERM));
    if (!f) {
        SK_WHY("seccomp_init failed");
        return SHMKEY_ESYSTEM;
    }
    int rc = seccomp_attr_set(f, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS);
    if (rc == 0)
        rc = seccomp_attr_set(f, SCMP_FLTATR_CTL_TSYNC, 1);
    if (rc == 0)
        (void)seccomp_attr_set(f, SCMP_FLTATR_CTL_OPTIMIZE, 2);   /* a binary tree, if supported */
    if (rc != 0) {
        SK_WHY("seccomp attributes: %s", strerror(-rc));
        seccomp_release(f);
        return SHMKEY_ESYSTEM;
    }
    int status = SHMKEY_OK;
    for (size_t i = 0; i < sizeof(allowed_calls) / sizeof(allowed_calls[0]) && !status; i++)
        status = sk_rule(f, allowed_calls[i], 0, NULL, why, whylen);
    /* No executable mappings: nothing is loaded after the sandbox. */
    struct scmp_arg_cmp no_exec = SCMP_A2(SCMP_CMP_MASKED_EQ, PROT_EXEC, 0);
    if (!status)
        status = sk_rule(f, "mmap", 1, &no_exec, why, whylen);
    if (!status)
        status = sk_rule(f, "mprotect", 1, &no_exec, why, whylen);
    for (size_t i = 0; i < sizeof(allowed_ioctls) / sizeof(allowed_ioctls[0]) && !status; i++) {
        struct scmp_arg_cmp cmd = SCMP_A1(SCMP_CMP_EQ, allowed_ioctls[i]);
        status = sk_rule(f, "ioctl", 1, &cmd, why, whylen);
    }
    /* Signals to itself; signal 0 (is it alive?) to anyone: the ring's liveness check. */
    struct scmp_arg_cmp self = SCMP_A0(SCMP_CMP_EQ, (scmp_datum_t)getpid());
    struct scmp_arg_cmp probe = SCMP_A1(SCMP_CMP_EQ, 0);
    if (!status)
        status = sk_rule(f, "kill", 1, &self, why, whylen);
    if (!status)
        status = sk_rule(f, "kill", 1, &probe, why, whylen);
    if (!status)
        status = sk_rule(f, "tgkill", 1, &self, why, whylen);
    /* Reading limits, never setting them. */
    struct scmp_arg_cmp read_only = SCMP_A2(SCMP_CMP_EQ, 0);
    if (!status)
        status = sk_rule(f, "prlimit64", 1, &read_only, why, whylen);
    if (!status)
        status = sk_rule(f, "getrlimit", 0, NULL, why, whylen);
    if (!status)
        status = sk_socket_rules(f, families, why, whylen);
    if (!status)
        status = sk_thread_rules(f, why, whylen);
    if (!status && (rc = seccomp_load(f)) != 0) {
        SK_WHY("seccomp_load: %s", strerror(-rc));
        status = SHMKEY_ESYSTEM;
    }
    seccomp_release(f);
    return status;
}

/* ---- Landlock: TCP ports, abstract sockets, signals ---- */

static long sk_landlock_abi(void)
{
    long abi = syscall(SYS_landlock_create_ruleset, NULL, 0, LANDLOCK_CREATE_RULESET_VERSION);
    return abi < 0 ? 0 : abi;
}

/*
 * Connect only to tcp_port (-1: any), bind no TCP port, reach no abstract
 * Unix socket and signal no process outside this one's Landlock domain.
 * What the kernel cannot do is left out and reported in *applied.
 */
static int sk_landlock(int32_t tcp_port, uint32_t *applied, char *why, uint32_t whylen)
{
    long abi = sk_landlock_abi();
    struct sk_landlock_ruleset attr = {0};
    size_t size = abi >= 6 ? sizeof(attr) : 2 * sizeof(uint64_t);
    if (abi >= 4) {
        attr.handled_access_net = LANDLOCK_ACCESS_NET_BIND_TCP |
                                  (tcp_port >= 0 ? LANDLOCK_ACCESS_NET_CONNECT_TCP : 0);
    }
    if (abi >= 6)
        attr.scoped = LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | LANDLOCK_SCOPE_SIGNAL;
    if (!attr.handled_access_net && !attr.scoped)
        return SHMKEY_OK;
    int fd = (int)syscall(SYS_landlock_create_ruleset, &attr, size, 0);
    if (fd < 0) {
        SK_WHY("landlock_create_ruleset: %s", strerror(errno));
        return SHMKEY_ESYSTEM;
    }
    int status = SHMKEY_OK;
    if (tcp_port >= 0 && abi >= 4) {
        struct sk_landlock_port port = {.allowed_access = LANDLOCK_ACCESS_NET_CONNECT_TCP,
                                        .port = (uint64_t)tcp_port};
        if (syscall(SYS_landlock_add_rule, fd, LANDLOCK_RULE_NET_PORT, &port, 0) != 0) {
            SK_WHY("landlock_add_rule(port %d): %s", tcp_port, strerror(errno));
            status = SHMKEY_ESYSTEM;
        }
    }
    if (!status && syscall(SYS_landlock_restrict_self, fd, 0) != 0) {
        SK_WHY("landlock_restrict_self: %s", strerror(errno));
        status = SHMKEY_ESYSTEM;
    }
    close(fd);
    if (!status) {
        if (attr.handled_access_net)
            *applied |= SHMKEY_SANDBOX_PORTS;
        if (attr.scoped)
            *applied |= SHMKEY_SANDBOX_SCOPED;
    }
    return status;
}

/* ---- users and capabilities ---- */

static int sk_threads(void)
{
    DIR *d = opendir("/proc/self/task");
    int n = 0;
    if (!d)
        return 1;                       /* no procfs: nothing to check with */
    for (struct dirent *e; (e = readdir(d)) != NULL;)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

static int sk_capset_zero(void)
{
    struct __user_cap_header_struct hdr = {.version = _LINUX_CAPABILITY_VERSION_3, .pid = 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof(data));
    return (int)syscall(SYS_capset, &hdr, data);
}

static int sk_become(int64_t uid, int64_t gid, char *why, uint32_t whylen)
{
    /* A change of credentials clears the parent-death signal: keep it. */
    int pdeath = 0;
    pid_t parent = getppid();
    (void)prctl(PR_GET_PDEATHSIG, &pdeath, 0, 0, 0);
    /* The bounding set needs CAP_SETPCAP, which goes with root: drop it first. */
    for (int cap = 0; cap <= 63; cap++)
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && errno == EINVAL)
            break;
    (void)prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    if (gid >= 0) {
        gid_t g = (gid_t)gid;
        if (setgroups(1, &g) != 0 || setresgid(g, g, g) != 0) {
            SK_WHY("cannot change to group %lld: %s", (long long)gid, strerror(errno));
            return SHMKEY_ESYSTEM;
        }
    }
    if (uid >= 0) {
        uid_t u = (uid_t)uid;
        uid_t r, e, s;
        if (setresuid(u, u, u) != 0) {
            SK_WHY("cannot change to user %lld: %s", (long long)uid, strerror(errno));
            return SHMKEY_ESYSTEM;
        }
        if (getresuid(&r, &e, &s) != 0 || r != u || e != u || s != u ||
            (u != 0 && setuid(0) == 0)) {
            SK_WHY("the change to user %lld did not hold", (long long)uid);
            return SHMKEY_ESYSTEM;
        }
    }
    /* Permitted, effective and inheritable: all empty, whoever we are now. */
    if (sk_capset_zero() != 0) {
        SK_WHY("capset: %s", strerror(errno));
        return SHMKEY_ESYSTEM;
    }
    if (pdeath > 0) {
        if (prctl(PR_SET_PDEATHSIG, pdeath, 0, 0, 0) != 0) {
            SK_WHY("prctl(PR_SET_PDEATHSIG): %s", strerror(errno));
            return SHMKEY_ESYSTEM;
        }
        if (getppid() != parent)
            raise(pdeath);              /* the parent died meanwhile */
    }
    return SHMKEY_OK;
}

/* Set by shmkey_sandbox_confine, for shmkey_sandbox_seal. */
static int sk_confined;
static uint32_t sk_families;

/*
 * The first half of the sandbox; see shmkey.h. Everything here is either
 * process-wide (root, rlimits, dumpable) or per thread and inherited by the
 * threads created afterwards (credentials, capabilities, NO_NEW_PRIVS,
 * Landlock), which is why the process must still have one thread. On
 * failure the process is half-confined: the caller must exit rather than go
 * on serving.
 */
int shmkey_sandbox_confine(const char *root, int64_t uid, int64_t gid, uint32_t families,
                           int32_t tcp_port, const char *prefix, uint32_t *applied,
                           char *why, uint32_t whylen)
{
    struct rlimit zero = {0, 0};
    uint32_t done = 0;
    int rc;

    if (!why || whylen == 0 || !applied)
        return SHMKEY_EINVAL;
    why[0] = '\0';
    *applied = 0;
    if (families & ~(uint32_t)(SHMKEY_SANDBOX_UNIX | SHMKEY_SANDBOX_INET | SHMKEY_SANDBOX_INET6) ||
        tcp_port < -1 || tcp_port > 65535 || uid < -1 || gid < -1) {
        SK_WHY("invalid sandbox parameters");
        return SHMKEY_EINVAL;
    }
    if (sk_confined) {
        SK_WHY("this process is already confined");
        return SHMKEY_EINVAL;
    }
    if (sk_threads() > 1) {
        /* Landlock and the capabilities would hold for this thread only. */
        SK_WHY("enter the sandbox before starting threads (this process has %d)", sk_threads());
        return SHMKEY_EINVAL;
    }
    snprintf(log_prefix, sizeof(log_prefix), "%s", prefix ? prefix : "");
    if (SK_CAN_TRAP && (rc = sk_install_trap(why, whylen)) != SHMKEY_OK)
        return rc;
    if (root && root[0]) {
        if (chroot(root) != 0 || chdir("/") != 0) {
            SK_WHY("cannot change root to %s: %s", root, strerror(errno));
            return SHMKEY_ESYSTEM;
        }
        done |= SHMKEY_SANDBOX_CHROOT;
    }
    if ((rc = sk_become(uid, gid, why, whylen)) != SHMKEY_OK)
        return rc;
    if (uid >= 0)
        done |= SHMKEY_SANDBOX_USER;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 ||
        setrlimit(RLIMIT_CORE, &zero) != 0) {
        SK_WHY("prctl or setrlimit: %s", strerror(errno));
        return SHMKEY_ESYSTEM;
    }
    if ((rc = sk_landlock(tcp_port, &done, why, whylen)) != SHMKEY_OK)
        return rc;
    sk_confined = 1;
    sk_families = families;
    *applied = done;
    return SHMKEY_OK;
}

/*
 * The second half; see shmkey.h. RLIMIT_NPROC 0 (it counts threads too:
 * none can be created from now on, nor a process) and the filter, which
 * TSYNC installs in every thread at once.
 */
int shmkey_sandbox_seal(uint32_t *applied, char *why, uint32_t whylen)
{
    struct rlimit zero = {0, 0};
    int rc;

    if (!why || whylen == 0 || !applied)
        return SHMKEY_EINVAL;
    why[0] = '\0';
    if (!sk_confined) {
        SK_WHY("seal a sandbox only after confining the process");
        return SHMKEY_EINVAL;
    }
    if (setrlimit(RLIMIT_NPROC, &zero) != 0) {
        SK_WHY("setrlimit(RLIMIT_NPROC): %s", strerror(errno));
        return SHMKEY_ESYSTEM;
    }
    if ((rc = sk_load_filter(sk_families, why, whylen)) != SHMKEY_OK)
        return rc;
    *applied |= SHMKEY_SANDBOX_SECCOMP | (SK_CAN_TRAP ? SHMKEY_SANDBOX_LOGGED : 0);
    return SHMKEY_OK;
}

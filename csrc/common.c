/*
 * common.c - the version, status messages, the rules for oracle names,
 * runtime directories and socket paths, clocks, spinning and process
 * hardening, shared by both transports, the provider and (through cffi) Python.
 */
#include "internal.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef SHMKEY_PACKAGE_VERSION
#error "build with csrc/build_native.py's VERSION_CFLAGS (the version in shmkey/_version.py)"
#endif

/* The package version this code was built from; Python refuses a stale build. */
const char *shmkey_version(void)
{
    return SHMKEY_PACKAGE_VERSION;
}

/* The only place a status becomes words; Python's exception map reuses it. */
const char *shmkey_strerror(int status)
{
    switch (status) {
    case SHMKEY_OK: return "success";
    case SHMKEY_EINVAL: return "invalid argument";
    case SHMKEY_ETIMEDOUT: return "timed out waiting for the key oracle";
    case SHMKEY_EUNAVAIL: return "the key oracle is not running";
    case SHMKEY_EPOLICY: return "refused by the key oracle's policy";
    case SHMKEY_EPROTO: return "malformed request, reply or handshake";
    case SHMKEY_ETOOBIG: return "input too large for a ring slot or message";
    case SHMKEY_EDECRYPT: return "decryption failed";
    case SHMKEY_EUNSUPPORTED: return "unsupported operation, padding or hash";
    case SHMKEY_ESYSTEM: return "system call failed";
    case SHMKEY_ENOKEY: return "no such key in the oracle";
    case SHMKEY_EINTERNAL: return "the key oracle's crypto library failed";
    case SHMKEY_EACCESS: return "permission denied";
    case SHMKEY_ETOKEN: return "the key's token is unavailable";
    case SHMKEY_EIDENTITY: return "the key oracle runs as an unexpected user";
    case SHMKEY_ERATELIMIT: return "rate limit exceeded";
    case SHMKEY_EPENDING: return "no reply yet";
    case SHMKEY_EBUSY: return "every ring slot of this process is in use";
    default: return "unknown shmkey status";
    }
}

/* An OS error as the status it means to a caller. */
int shmkey_status_from_errno(int err)
{
    if (err == ENOENT || err == ECONNREFUSED || err == ECONNRESET || err == EPIPE ||
        err == ENOTCONN)
        return SHMKEY_EUNAVAIL;
    if (err == EACCES || err == EPERM)
        return SHMKEY_EACCESS;
    return SHMKEY_ESYSTEM;
}

/* ===================================================================== */
/* oracle names and paths: every side (Python, ring, provider) uses these */
/* ===================================================================== */

/* What an oracle's socket is called: "shmkey-NAME.sock" in its runtime directory. */
static const char ring_prefix[] = "shmkey-";
/* Where oracles started as root listen; only root may create entries there. */
static const char system_dir[] = "/run/shmkey";

/*
 * SHMKEY_OK if name is a valid oracle name: 1 to SHMKEY_NAME_MAX letters,
 * digits, '_', '.' or '-', not starting with '.'. It becomes part of a
 * socket file name, so nothing else may get through.
 */
int shmkey_check_name(const char *name)
{
    static const char allowed[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                  "0123456789-_.";
    if (!name)
        return SHMKEY_EINVAL;
    size_t n = strnlen(name, SHMKEY_NAME_MAX + 1);
    return n > 0 && n <= SHMKEY_NAME_MAX && name[0] != '.' && strspn(name, allowed) == n
           ? SHMKEY_OK : SHMKEY_EINVAL;
}

/* The base name of oracle name's objects ("shmkey-NAME"), into out. */
int shmkey_ring_id(const char *name, char *out, uint32_t cap)
{
    if (shmkey_check_name(name) != SHMKEY_OK || !out ||
        (size_t)snprintf(out, cap, "%s%s", ring_prefix, name) >= cap)
        return SHMKEY_EINVAL;
    return SHMKEY_OK;
}

void shmkey_why(char *why, uint32_t whylen, const char *fmt, ...)
{
    va_list ap;
    if (!why || whylen == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(why, whylen, fmt, ap);
    va_end(ap);
}

/* "uid 33 (www-data)", or "uid 33" where the user database has no name (a chroot). */
void shmkey_user_name(uint32_t uid, char *out, size_t cap)
{
    struct passwd pw, *res = NULL;
    char buf[2048];
    if (getpwuid_r((uid_t)uid, &pw, buf, sizeof(buf), &res) == 0 && res)
        snprintf(out, cap, "uid %u (%s)", uid, res->pw_name);
    else
        snprintf(out, cap, "uid %u", uid);
}

/*
 * May a socket directory be trusted: a real directory that no group or other
 * user may write to (so nobody else can plant, replace or remove a socket in
 * it), owned by root or, if owner is not -1, by owner.
 */
static int safe_dir(const struct stat *st, int64_t owner)
{
    return S_ISDIR(st->st_mode) && !(st->st_mode & 022) &&
           (owner < 0 || st->st_uid == 0 || (int64_t)st->st_uid == owner);
}

/* Make dir (mode) if create and it is missing; then it must be safe_dir for owner. */
static int use_dir(const char *dir, mode_t mode, int create, int64_t owner, int follow,
                   char *why, uint32_t whylen)
{
    struct stat st;
    int err;
    if (create && mkdir(dir, mode) == 0) {
        /* The oracle's umask (077) must not make /run/shmkey unreachable for
           the users it serves: the mode is the rule's, not the umask's. */
        (void)chmod(dir, mode);
    } else if (create && errno != EEXIST) {
        err = errno;
        shmkey_why(why, whylen, "cannot create socket directory %s: %s", dir, strerror(err));
        return shmkey_status_from_errno(err);
    }
    if ((follow ? stat(dir, &st) : lstat(dir, &st)) != 0) {
        err = errno;
        shmkey_why(why, whylen, "socket directory %s: %s", dir, strerror(err));
        return shmkey_status_from_errno(err);
    }
    if (!safe_dir(&st, owner)) {
        if (owner >= 0)
            shmkey_why(why, whylen, "socket directory %s must be a directory owned by root or "
                       "uid %lld that no group or other user can write to; refusing to use it",
                       dir, (long long)owner);
        else
            shmkey_why(why, whylen, "socket directory %s must be a directory that no group or "
                       "other user can write to; refusing to use it", dir);
        return SHMKEY_EACCESS;
    }
    return SHMKEY_OK;
}

static int put_path(char *out, uint32_t cap, char *why, uint32_t whylen, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

static int put_path(char *out, uint32_t cap, char *why, uint32_t whylen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int len = vsnprintf(out, cap, fmt, ap);
    va_end(ap);
    if (len < 0 || (size_t)len >= cap) {
        out[0] = '\0';
        shmkey_why(why, whylen, "socket directory path is longer than %u bytes", cap - 1);
        return SHMKEY_EINVAL;
    }
    return SHMKEY_OK;
}

/*
 * The per-user directory when there is no XDG_RUNTIME_DIR: /tmp/shmkey-UID
 * if it is ours (0700, owned by us), else ~/.shmkey (HOME from the user
 * database, not the environment). Anyone may create /tmp/shmkey-UID first,
 * but that only sends both the oracle and its clients (who apply this same
 * rule) to ~/.shmkey, which nobody else can create: no denial of service.
 */
static int per_user_dir(uid_t me, int create, char *out, uint32_t cap, char *why, uint32_t whylen)
{
    struct passwd pw, *res = NULL;
    char buf[2048], first[128];
    struct stat st;
    int rc = put_path(out, cap, why, whylen, "/tmp/shmkey-%u", (unsigned)me);
    if (rc != SHMKEY_OK)
        return rc;
    if (create)
        (void)mkdir(out, 0700);
    if (lstat(out, &st) == 0 && S_ISDIR(st.st_mode) && st.st_uid == me && !(st.st_mode & 077))
        return SHMKEY_OK;
    snprintf(first, sizeof(first), "%s", out);
    if (getpwuid_r(me, &pw, buf, sizeof(buf), &res) != 0 || !res || res->pw_dir[0] != '/' ||
        lstat(res->pw_dir, &st) != 0 || !safe_dir(&st, (int64_t)me)) {
        shmkey_why(why, whylen, "socket directory %s is missing or not ours, and uid %u has no "
                   "home directory of its own; set SHMKEY_RUNTIME_DIR or XDG_RUNTIME_DIR",
                   first, (unsigned)me);
        return create ? SHMKEY_EACCESS : SHMKEY_EUNAVAIL;
    }
    rc = put_path(out, cap, why, whylen, "%s/.shmkey", res->pw_dir);
    if (rc == SHMKEY_OK)
        rc = use_dir(out, 0700, create, (int64_t)me, 0, why, whylen);
    return rc;
}

/*
 * The directory of oracle sockets, into out: where an oracle listens
 * (create nonzero: made if missing) or where a client looks first.
 * configured is the operator's SHMKEY_RUNTIME_DIR (NULL: read it from the
 * environment; empty: not set). The rule, the same for every caller:
 *   1. SHMKEY_RUNTIME_DIR, which must exist and which no group or other may
 *      write to (its owner can replace sockets in it: the operator's choice);
 *   2. /run/shmkey when running as root (made 0755, must be root's);
 *   3. $XDG_RUNTIME_DIR/shmkey (made 0700, owned by us or root);
 *   4. /tmp/shmkey-UID, or ~/.shmkey if someone else took that name.
 * Nobody but root and the directory's owner can then plant, replace or remove
 * a socket in it. On failure why says what and why, the OS error included:
 * ENOENT gives SHMKEY_EUNAVAIL (no oracle can be listening there), a bad
 * directory SHMKEY_EACCESS, a bad setting SHMKEY_EINVAL.
 */
int shmkey_runtime_dir(const char *configured, int create, char *out, uint32_t cap,
                       char *why, uint32_t whylen)
{
    uid_t me = geteuid();
    const char *base;
    size_t n = 0;
    int rc;

    if (!out || cap == 0 || !why || whylen == 0)
        return SHMKEY_EINVAL;
    out[0] = why[0] = '\0';
    if (!configured)
        configured = secure_getenv("SHMKEY_RUNTIME_DIR");
    if (configured) {
        /* Blank is unset and spaces around it do not count, as in shmkey.config. */
        while (isspace((unsigned char)*configured))
            configured++;
        n = strlen(configured);
        while (n > 0 && isspace((unsigned char)configured[n - 1]))
            n--;
    }
    if (n > 0) {
        if (configured[0] != '/') {
            shmkey_why(why, whylen, "SHMKEY_RUNTIME_DIR=%.*s is not an absolute path",
                       (int)n, configured);
            return SHMKEY_EINVAL;
        }
        if (n >= cap) {
            shmkey_why(why, whylen, "SHMKEY_RUNTIME_DIR is longer than %u bytes", cap - 1);
            return SHMKEY_EINVAL;
        }
        memcpy(out, configured, n);
        out[n] = '\0';
        /* Its owner is the operator's choice (say, the user the oracle drops to). */
        rc = use_dir(out, 0700, 0, -1, 1, why, whylen);
        if (rc != SHMKEY_OK && rc != SHMKEY_EINVAL) {
            char detail[512];
            snprintf(detail, sizeof(detail), "%s", why);
            shmkey_why(why, whylen, "SHMKEY_RUNTIME_DIR=%s: %s", out, detail);
        }
        return rc;
    }
    if (me == 0) {
        rc = put_path(out, cap, why, whylen, "%s", system_dir);
        return rc == SHMKEY_OK ? use_dir(out, 0755, create, 0, 0, why, whylen) : rc;
    }
    base = secure_getenv("XDG_RUNTIME_DIR");
    if (base && base[0]) {
        rc = put_path(out, cap, why, whylen, "%s/shmkey", base);
        return rc == SHMKEY_OK ? use_dir(out, 0700, create, (int64_t)me, 0, why, whylen) : rc;
    }
    return per_user_dir(me, create, out, cap, why, whylen);
}

/* Where oracle name listens in the runtime directory dir, into out. */
int shmkey_socket_path(const char *dir, const char *name, char *out, uint32_t cap)
{
    if (!dir || shmkey_check_name(name) != SHMKEY_OK || !out ||
        (size_t)snprintf(out, cap, "%s/%s%s.sock", dir, ring_prefix, name) >= cap)
        return SHMKEY_EINVAL;
    return SHMKEY_OK;
}

/*
 * Where a client finds oracle name, into out: in SHMKEY_RUNTIME_DIR if it
 * is set; otherwise in the caller's own runtime directory, else in
 * /run/shmkey, where oracles started as root listen (root's alone, so a
 * server's workers of any user find a system oracle there). Which user
 * serves the socket is checked when connecting. SHMKEY_EUNAVAIL, with why
 * naming the places looked at, when there is no such socket.
 */
int shmkey_find_socket(const char *configured, const char *name, char *out, uint32_t cap,
                       char *why, uint32_t whylen)
{
    char dir[4096], own[4096 + 128] = "";
    struct stat st;
    int explicit_dir;
    if (!out || cap == 0 || !why || whylen == 0 || shmkey_check_name(name) != SHMKEY_OK)
        return SHMKEY_EINVAL;
    if (!configured)
        configured = secure_getenv("SHMKEY_RUNTIME_DIR");
    explicit_dir = configured && configured[strspn(configured, " \t\r\n")];
    int rc = shmkey_runtime_dir(configured, 0, dir, sizeof(dir), why, whylen);
    if (rc == SHMKEY_OK) {
        if (shmkey_socket_path(dir, name, out, cap) != SHMKEY_OK) {
            shmkey_why(why, whylen, "the socket path of oracle '%s' in %s is too long", name, dir);
            return SHMKEY_EINVAL;
        }
        if (explicit_dir || lstat(out, &st) == 0)
            return SHMKEY_OK;
        snprintf(own, sizeof(own), "%s", out);
    } else if (explicit_dir || rc == SHMKEY_EINVAL) {
        return rc;
    }
    if (geteuid() != 0 && lstat(system_dir, &st) == 0 && safe_dir(&st, 0) && st.st_uid == 0 &&
        shmkey_socket_path(system_dir, name, out, cap) == SHMKEY_OK && lstat(out, &st) == 0)
        return SHMKEY_OK;
    out[0] = '\0';
    char sys_path[256];
    snprintf(sys_path, sizeof(sys_path), "%s/%s%s.sock", system_dir, ring_prefix, name);
    if (strcmp(own, sys_path) == 0 || geteuid() == 0)
        own[0] = '\0';
    shmkey_why(why, whylen, "no oracle named '%s' is running (no socket %s%s%s)", name,
               own[0] ? own : "", own[0] ? " or " : "", sys_path);
    return SHMKEY_EUNAVAIL;
}

/*
 * getpid() is a real syscall (glibc stopped caching it); the request path
 * must not pay one per request. A forked child resets the cache.
 */
static pid_t cached_pid;
static pthread_once_t pid_once = PTHREAD_ONCE_INIT;

static void forget_pid(void)
{
    __atomic_store_n(&cached_pid, 0, __ATOMIC_RELAXED);
}

static void watch_forks(void)
{
    pthread_atfork(NULL, NULL, forget_pid);
}

pid_t shmkey_self_pid(void)
{
    pid_t pid = __atomic_load_n(&cached_pid, __ATOMIC_RELAXED);
    if (pid == 0) {
        pthread_once(&pid_once, watch_forks);
        pid = getpid();
        __atomic_store_n(&cached_pid, pid, __ATOMIC_RELAXED);
    }
    return pid;
}

uint64_t shmkey_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* sem_timedwait wants CLOCK_REALTIME; convert a monotonic deadline to it. */
void shmkey_deadline(struct timespec *ts, uint64_t deadline_ns)
{
    uint64_t now = shmkey_now_ns();
    uint64_t left = deadline_ns > now ? deadline_ns - now : 0;
    clock_gettime(CLOCK_REALTIME, ts);
    uint64_t ns = (uint64_t)ts->tv_nsec + left % 1000000000u;
    ts->tv_sec += (time_t)(left / 1000000000u + ns / 1000000000u);
    ts->tv_nsec = (long)(ns % 1000000000u);
}

uint32_t shmkey_ncpu(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (uint32_t)n : 1u;
}

/* Bytes from one slot to the next: its header and payload, 64-byte aligned. */
uint32_t shmkey_slot_stride(uint32_t slot_size)
{
    return (uint32_t)((sizeof(struct shmkey_slot) + slot_size + SHMKEY_ALIGN - 1)
                      & ~(size_t)(SHMKEY_ALIGN - 1));
}

/* Size of a client's ring: its slots, nothing else (geometry travels on the socket). */
size_t shmkey_ring_size(uint32_t nslots, uint32_t slot_size)
{
    return (size_t)nslots * shmkey_slot_stride(slot_size);
}

/*
 * A gap this long between two looks at the clock while spinning means we
 * were preempted: something outside the ring wants this core, so spinning
 * now only delays whoever must produce what we wait for.
 */
#define SPIN_PREEMPTED_NS 30000u
/* How often a spinner asks the kernel whether anyone waits for a core (~1.5 us a look). */
#define SPIN_LOOK_NS 20000u

/*
 * Tasks running or waiting for a core, machine-wide, this one included: the
 * kernel's count in /proc/loadavg, which no peer can forge. 0 when it cannot
 * be read (a chroot without /proc): then only our own hints decide.
 */
uint32_t shmkey_runnable(void)
{
    /* (pid << 32) | (fd + 1): opened anew in each process, since a forked
       child may close what it inherited and reuse the number. */
    static uint64_t state;
    pid_t me = shmkey_self_pid();
    uint64_t st = __atomic_load_n(&state, __ATOMIC_ACQUIRE);
    if ((pid_t)(st >> 32) != me) {
        int mine = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
        uint64_t want = (uint64_t)(uint32_t)me << 32 | (uint32_t)(mine + 1);
        if (__atomic_compare_exchange_n(&state, &st, want, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            st = want;
        } else if (mine >= 0) {
            close(mine);        /* another thread of ours opened it first (st is its) */
        }
        if ((pid_t)(st >> 32) != me)
            return 0;
    }
    int f = (int)(uint32_t)st - 1;
    char buf[96];
    ssize_t n = f >= 0 ? pread(f, buf, sizeof(buf) - 1, 0) : -1;
    if (n <= 0)
        return 0;
    buf[n] = 0;
    /* "0.37 0.28 0.13 2/99 4659": the fourth field's numerator */
    const char *p = buf;
    for (int field = 0; field < 3 && p; field++)
        if ((p = strchr(p, ' ')))
            p++;
    return p ? (uint32_t)strtoul(p, NULL, 10) : 0;
}

void shmkey_spin_begin(struct shmkey_spin *sp, uint32_t budget_us, int yield)
{
    sp->yield = yield;
    sp->last = shmkey_now_ns();
    sp->end = sp->last + (uint64_t)budget_us * 1000u;
    sp->look = sp->last + SPIN_LOOK_NS;
    sp->crowded = 0;
}

int shmkey_spin_should_stop(struct shmkey_spin *sp, uint32_t busy, uint32_t ncpu)
{
    uint64_t now = shmkey_now_ns();
    int stop = now >= sp->end || now - sp->last > SPIN_PREEMPTED_NS || busy > ncpu;
    sp->last = now;
    if (!stop && now >= sp->look) {
        /*
         * A client we woke may have been placed on this very core (the
         * kernel puts a wakee near its waker) and waits behind us: let it
         * run. And a machine with more tasks than cores, twice in a row (a
         * kernel thread passing by is no reason), wants this core back.
         */
        if (sp->yield)
            sched_yield();
        sp->look = now + SPIN_LOOK_NS;
        sp->crowded = shmkey_runnable() > ncpu ? sp->crowded + 1 : 0;
        sp->last = shmkey_now_ns();
        /* A yield that took long let somebody run who wanted this core. */
        stop = sp->crowded >= 2 || sp->last - now > SPIN_PREEMPTED_NS;
    }
    return stop;
}

/* Oracle threads spinning or computing, over its worker processes (a hint). */
uint32_t shmkey_status_active(const struct shmkey_status *st, uint32_t nprocs)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < nprocs && i < SHMKEY_MAX_PROCS; i++)
        n += __atomic_load_n(&st->active[i], __ATOMIC_RELAXED);
    return n;
}

/*
 * Make the key process hard to read from outside before it touches the key:
 * no core dumps, no ptrace by same-uid processes, no privilege gain through
 * exec, and no timer slack (it rounds every timed wait up by 50 us).
 * Returns 0, or a negative status if a step that must not fail did.
 */
int shmkey_harden_process(void)
{
    struct rlimit zero = {0, 0};
    if (setrlimit(RLIMIT_CORE, &zero) != 0)
        return SHMKEY_ESYSTEM;
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0)
        return SHMKEY_ESYSTEM;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        return SHMKEY_ESYSTEM;
    (void)prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0);
    return SHMKEY_OK;
}

/*
 * Keep the key's pages out of swap: call once the key is loaded. Current
 * pages only: MCL_FUTURE would make every later thread stack count against
 * RLIMIT_MEMLOCK, which after dropping privileges is too small to start a
 * worker. Best effort; the caller logs a refusal.
 *
 * resident_only: lock the pages present now and the rest of those mappings as
 * they are touched (MCL_ONFAULT), without faulting anything in. For keys
 * loaded again later, when the mappings include worker thread stacks, and for
 * a forked worker process, in which faulting in a writable page would copy
 * the whole of the parent's.
 */
int shmkey_lock_memory(int resident_only)
{
    int flags = MCL_CURRENT | (resident_only ? MCL_ONFAULT : 0);
    return mlockall(flags) == 0 ? SHMKEY_OK : SHMKEY_ESYSTEM;
}

/*
 * Get sig when the parent dies. Closes the race of a parent that died
 * before the prctl: then getppid() is no longer expected_parent.
 */
int shmkey_die_with_parent(int sig, int expected_parent)
{
    if (prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0)
        return SHMKEY_ESYSTEM;
    if (getppid() != (pid_t)expected_parent)
        raise(sig);
    return SHMKEY_OK;
}

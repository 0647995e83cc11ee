/*
 * common.c - the version, status messages, the rules for oracle names and
 * their paths, clocks, liveness and process hardening, shared by both
 * transports, the provider and (through cffi) Python.
 */
#include "internal.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
    case SHMKEY_EPROTO: return "malformed request or reply";
    case SHMKEY_ETOOBIG: return "input too large for a ring slot or message";
    case SHMKEY_EDECRYPT: return "decryption failed";
    case SHMKEY_EUNSUPPORTED: return "unsupported operation, padding or hash";
    case SHMKEY_ESYSTEM: return "system call failed";
    case SHMKEY_ENOKEY: return "no such key in the oracle";
    case SHMKEY_EINTERNAL: return "the key oracle's crypto library failed";
    case SHMKEY_EACCESS: return "permission denied";
    case SHMKEY_ETOKEN: return "the key's token is unavailable";
    default: return "unknown shmkey status";
    }
}

/* An OS error as the status it means to a caller. */
int shmkey_status_from_errno(int err)
{
    if (err == ENOENT)
        return SHMKEY_EUNAVAIL;
    if (err == EACCES || err == EPERM)
        return SHMKEY_EACCESS;
    return SHMKEY_ESYSTEM;
}

/* ===================================================================== */
/* oracle names and paths: every side (Python, ring, provider) uses these */
/* ===================================================================== */

/* What an oracle's objects are called: the ring segment "/shmkey-NAME", its
 * semaphores "/shmkey-NAME-req" and "-free", the socket "shmkey-NAME.sock". */
static const char ring_prefix[] = "shmkey-";

/*
 * SHMKEY_OK if name is a valid oracle name: 1 to SHMKEY_NAME_MAX letters,
 * digits, '_', '.' or '-', not starting with '.'. It becomes part of
 * /dev/shm and socket file names, so nothing else may get through.
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

/* The IPC base name of oracle name (no leading slash), into out. */
int shmkey_ring_id(const char *name, char *out, uint32_t cap)
{
    if (shmkey_check_name(name) != SHMKEY_OK || !out ||
        (size_t)snprintf(out, cap, "%s%s", ring_prefix, name) >= cap)
        return SHMKEY_EINVAL;
    return SHMKEY_OK;
}

/* SHMKEY_OK if id is what shmkey_ring_id makes of a valid name. */
int shmkey_check_ring_id(const char *id)
{
    size_t n = sizeof(ring_prefix) - 1;
    return id && strncmp(id, ring_prefix, n) == 0 ? shmkey_check_name(id + n) : SHMKEY_EINVAL;
}

/*
 * The directory of named socket oracles, into out. configured is the
 * operator's SHMKEY_RUNTIME_DIR (NULL: read it from the environment; empty:
 * not set). If set, it is trusted when no group or other may write to it.
 * Otherwise $XDG_RUNTIME_DIR/shmkey or /tmp/shmkey-EUID, created 0700 if
 * create is nonzero, which must be a directory ours alone: whoever owns it
 * could plant a fake oracle's socket there. On failure why says what and
 * why, the OS error included: ENOENT gives SHMKEY_EUNAVAIL (no oracle can be
 * listening there), permission SHMKEY_EACCESS, a bad setting SHMKEY_EINVAL.
 */
int shmkey_runtime_dir(const char *configured, int create, char *out, uint32_t cap,
                       char *why, uint32_t whylen)
{
    struct stat st;
    uid_t me = geteuid();
    const char *base;
    size_t n = 0;
    int len, err;

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
            snprintf(why, whylen, "SHMKEY_RUNTIME_DIR=%.*s is not an absolute path",
                     (int)n, configured);
            return SHMKEY_EINVAL;
        }
        if (n >= cap) {
            snprintf(why, whylen, "SHMKEY_RUNTIME_DIR is longer than %u bytes", cap - 1);
            return SHMKEY_EINVAL;
        }
        memcpy(out, configured, n);
        out[n] = '\0';
        if (stat(out, &st) != 0) {
            err = errno;
            snprintf(why, whylen, "SHMKEY_RUNTIME_DIR=%s: %s", out, strerror(err));
            return shmkey_status_from_errno(err);
        }
        if (!S_ISDIR(st.st_mode) || (st.st_mode & 022)) {
            snprintf(why, whylen, "SHMKEY_RUNTIME_DIR=%s must be a directory that no group "
                     "or other user can write to", out);
            return SHMKEY_EACCESS;
        }
        return SHMKEY_OK;
    }
    base = secure_getenv("XDG_RUNTIME_DIR");
    if (base && base[0])
        len = snprintf(out, cap, "%s/shmkey", base);
    else
        len = snprintf(out, cap, "/tmp/shmkey-%u", (unsigned)me);
    if (len < 0 || (size_t)len >= cap) {
        out[0] = '\0';
        snprintf(why, whylen, "socket directory path is longer than %u bytes", cap - 1);
        return SHMKEY_EINVAL;
    }
    if (create && mkdir(out, 0700) != 0 && errno != EEXIST) {
        err = errno;
        snprintf(why, whylen, "cannot create socket directory %s: %s", out, strerror(err));
        return shmkey_status_from_errno(err);
    }
    if (lstat(out, &st) != 0) {
        err = errno;
        snprintf(why, whylen, "socket directory %s: %s", out, strerror(err));
        return shmkey_status_from_errno(err);
    }
    if (!S_ISDIR(st.st_mode) || st.st_uid != me || (st.st_mode & 077)) {
        snprintf(why, whylen, "socket directory %s must be a directory owned by uid %u with "
                 "mode 0700; refusing to use it", out, (unsigned)me);
        return SHMKEY_EACCESS;
    }
    return SHMKEY_OK;
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

/*
 * EPERM means alive under another uid: only ESRCH proves death. A zombie
 * also counts as dead: an owned oracle killed hard stays one until its
 * parent (often our own process) reaps it. Only called on slow paths.
 */
int shmkey_pid_alive(pid_t pid)
{
    char path[64], buf[256];
    if (pid <= 0)
        return 0;
    if (kill(pid, 0) != 0 && errno == ESRCH)
        return 0;
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 1;                   /* no procfs: trust kill() */
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return 1;
    buf[n] = 0;
    const char *paren = strrchr(buf, ')');
    return !(paren && paren[1] == ' ' && (paren[2] == 'Z' || paren[2] == 'X'));
}

uint32_t shmkey_ncpu(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (uint32_t)n : 1u;
}

size_t shmkey_ring_size(uint32_t nslots, uint32_t slot_size)
{
    size_t stride = (sizeof(struct shmkey_slot) + slot_size + SHMKEY_ALIGN - 1)
                    & ~(size_t)(SHMKEY_ALIGN - 1);
    return SHMKEY_ALIGN + (size_t)nslots * stride;
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
 */
int shmkey_lock_memory(void)
{
    return mlockall(MCL_CURRENT) == 0 ? SHMKEY_OK : SHMKEY_ESYSTEM;
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

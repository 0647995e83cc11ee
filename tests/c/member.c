/*
 * member.c - what a process in the oracle's --group (a compromised server
 * worker, say) can try against everything it can open: its own connection's
 * ring and descriptors, the oracle's socket file, other processes' rings and
 * descriptors through /proc, and /dev/shm. It prints one line per attempt,
 * "refused NAME" or "ALLOWED NAME", then scribbles and forges replies in its
 * own ring for SECONDS. Usage: member SOCKET_PATH SECONDS PID...
 */
#include "internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int allowed;

static void outcome(const char *what, int ok)
{
    printf("%s %s\n", ok ? "ALLOWED" : "refused", what);
    allowed += ok;
}

/* Every descriptor and mapping of process pid, through /proc. */
static void try_proc(int pid)
{
    char path[128], what[160];
    const char *dirs[] = {"fd", "map_files"};
    for (size_t d = 0; d < 2; d++) {
        snprintf(path, sizeof(path), "/proc/%d/%s", pid, dirs[d]);
        DIR *dir = opendir(path);
        int opened = 0;
        if (dir) {
            struct dirent *e;
            while ((e = readdir(dir)) != NULL) {
                if (e->d_name[0] == '.')
                    continue;
                char entry[400];
                snprintf(entry, sizeof(entry), "%s/%s", path, e->d_name);
                int fd = open(entry, O_RDWR);
                if (fd < 0)
                    fd = open(entry, O_RDONLY);
                if (fd >= 0) {
                    opened++;
                    close(fd);
                }
            }
            closedir(dir);
        }
        snprintf(what, sizeof(what), "open /proc/%d/%s/* (%s)", pid, dirs[d],
                 dir ? "listed" : "not listed");
        outcome(what, opened > 0);
    }
    snprintf(path, sizeof(path), "/proc/%d/mem", pid);
    int fd = open(path, O_RDONLY);
    snprintf(what, sizeof(what), "open /proc/%d/mem", pid);
    outcome(what, fd >= 0);
    if (fd >= 0)
        close(fd);
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    struct shmkey_client c = {.owner_pid = getpid(), .oracle_uid = SHMKEY_UID_DEFAULT,
                              .ctl_fd = -1};
    snprintf(c.path, sizeof(c.path), "%s", argv[1]);
    struct shmkey_welcome wel;
    int fds[SHMKEY_MAX_SLOTS + 2], sock;
    char why[512];
    int rc = shmkey_conn_dial(&c, SHMKEY_TRANSPORT_SHM, shmkey_now_ns() + 5000000000ull, &wel,
                              fds, SHMKEY_MAX_SLOTS + 2, &sock, why, sizeof(why));
    if (rc != SHMKEY_OK) {
        printf("connect failed: %s\n", why);
        return 3;
    }
    size_t size = shmkey_ring_size(wel.nslots, wel.slot_size);
    int ring = fds[0], status = fds[1];
    uint8_t *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, ring, 0);
    if (base == MAP_FAILED)
        return 3;

    /* The ring: sealed against every change of size, and against new seals. */
    outcome("ftruncate ring to 0", ftruncate(ring, 0) == 0);
    outcome("ftruncate ring larger", ftruncate(ring, (off_t)size * 2) == 0);
    outcome("fallocate ring larger", fallocate(ring, 0, 0, (off_t)size * 2) == 0);
    outcome("add F_SEAL_WRITE to ring", fcntl(ring, F_ADD_SEALS, F_SEAL_WRITE) == 0);
    /* The status page: the oracle's, read-only to us. */
    outcome("ftruncate status page", ftruncate(status, 0) == 0);
    outcome("write status page", pwrite(status, "x", 1, 0) == 1);
    void *w = mmap(NULL, SHMKEY_STATUS_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, status, 0);
    outcome("map status page writable", w != MAP_FAILED);
    const void *ro = mmap(NULL, SHMKEY_STATUS_SIZE, PROT_READ, MAP_SHARED, status, 0);
    outcome("make status page writable (mprotect)",
            ro != MAP_FAILED && mprotect((void *)ro, SHMKEY_STATUS_SIZE, PROT_READ | PROT_WRITE) == 0);
    /* The socket file and its directory. */
    outcome("unlink the oracle's socket", unlink(argv[1]) == 0);
    char moved[4200];
    snprintf(moved, sizeof(moved), "%s.moved", argv[1]);
    outcome("rename the oracle's socket", rename(argv[1], moved) == 0);
    outcome("truncate the oracle's socket", truncate(argv[1], 0) == 0);
    /* Other processes: the oracle and the honest clients. */
    for (int i = 3; i < argc; i++)
        try_proc(atoi(argv[i]));
    /* Nothing of the oracle's in /dev/shm to open. */
    DIR *shm = opendir("/dev/shm");
    int found = 0;
    struct dirent *e;
    while (shm && (e = readdir(shm)) != NULL)
        found += strstr(e->d_name, "shmkey-") != NULL;
    if (shm)
        closedir(shm);
    printf("dev-shm entries %d\n", found);
    fflush(stdout);

    /* Our own ring: garbage everywhere, replies forged in every slot, doorbells. */
    uint32_t stride = shmkey_slot_stride(wel.slot_size);
    uint64_t end = shmkey_now_ns() + (uint64_t)(atof(argv[2]) * 1e9), rng = 88172645463325252ull;
    unsigned long rounds = 0;
    while (shmkey_now_ns() < end) {
        for (uint32_t i = 0; i < wel.nslots; i++) {
            struct shmkey_slot *s = (struct shmkey_slot *)(base + (size_t)i * stride);
            uint8_t *payload = (uint8_t *)(s + 1);
            rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
            if (rng & 1) {
                memcpy(payload, "FORGED PLAINTEXT", 16);
                s->resp.status = 0;
                s->resp.out_len = 16;
                __atomic_store_n(&s->ctl, (rng & 0xffffffff00000000ull) | SHMKEY_SLOT_DONE,
                                 __ATOMIC_RELEASE);
            } else {
                memset(s, (int)(rng >> 8), stride);
                __atomic_store_n(&s->ctl, (rng & 0xffffffff00000000ull) | SHMKEY_SLOT_SUBMITTED,
                                 __ATOMIC_RELEASE);
            }
        }
        (void)send(sock, "r", 1, MSG_DONTWAIT | MSG_NOSIGNAL);
        for (uint32_t i = 2; i < wel.nfds; i++)         /* and its wake-up sockets, closed */
            if (fds[i] >= 0 && rounds == 10) {
                close(fds[i]);
                fds[i] = -1;
            }
        rounds++;
    }
    printf("scribble rounds %lu\nallowed %d\n", rounds, allowed);
    return 0;
}

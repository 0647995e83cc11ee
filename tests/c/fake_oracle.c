/*
 * fake_oracle.c - an impostor: it listens on an oracle's socket path with
 * shmkey's own server code, under whatever uid it was started as, answers
 * PUBKEY and KEYS with the public key it was given (so a public-key check
 * alone would pass) and every signature or decryption with bytes of its
 * choosing. Clients must refuse it by its uid. Usage: fake_oracle PATH SPKI_DER
 */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    uint8_t spki[4096], keys[4098];
    if (argc != 3)
        return 2;
    FILE *f = fopen(argv[2], "rb");
    size_t n = f ? fread(spki, 1, sizeof(spki), f) : 0;
    if (!n)
        return 3;
    keys[0] = (uint8_t)n;
    keys[1] = (uint8_t)(n >> 8);
    memcpy(keys + 2, spki, n);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", argv[1]);
    unlink(argv[1]);
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 || listen(fd, 16) != 0) {
        perror("bind");
        return 4;
    }
    chmod(argv[1], 0666);
    struct shmkey_server *s;
    if (shmkey_server_open(fd, 1, SHMKEY_TRANSPORT_SHM, 16, 2048, 0, 1, &s) != SHMKEY_OK)
        return 5;
    shmkey_server_allow_peers(s, 0, -1);
    struct shmkey_work *w = shmkey_work_new(2048);
    printf("listening\n");
    fflush(stdout);
    static uint8_t forged[512];
    memset(forged, 0x41, sizeof(forged));
    for (;;) {
        if (shmkey_server_next(s, w, 1000) != SHMKEY_OK)
            continue;
        if (w->req.op == SHMKEY_OP_PUBKEY)
            shmkey_server_reply(s, w, SHMKEY_OK, spki, (uint32_t)n);
        else if (w->req.op == SHMKEY_OP_KEYS)
            shmkey_server_reply(s, w, SHMKEY_OK, keys, (uint32_t)n + 2);
        else
            shmkey_server_reply(s, w, SHMKEY_OK, forged, 256);
    }
}

/*
 * signer_probe.c - the oracle's C workers with its Python layer taken away:
 * shmkey's server code and C signer on a socket path, with the keys given
 * (PKCS#8 DER, the first is the default). Whatever the C signer does not
 * answer reaches this program's stand-in for Python, which answers
 * SHMKEY_EUNSUPPORTED "python" (after giving the connection its counters,
 * as oracle/dispatch.py does), so a test sees which side served each
 * request. A STATUS request answers "signs=N in_c=C ops=M": the C counters.
 * Usage: signer_probe PATH KEY.der...
 */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define ROW_WORDS (SHMKEY_STAT_HIST + SHMKEY_STAT_BOUNDS + 1)

int main(int argc, char **argv)
{
    static uint64_t key_rows[8][ROW_WORDS], client_row[16];
    if (argc < 3 || argc > 10)
        return 2;
    struct shmkey_signer *g = shmkey_signer_new();
    for (int i = 2; i < argc; i++) {
        static uint8_t der[8192];
        uint8_t id[32] = {0};
        FILE *f = fopen(argv[i], "rb");
        size_t n = f ? fread(der, 1, sizeof(der), f) : 0;
        if (!n)
            return 3;
        fclose(f);
        id[0] = (uint8_t)(i - 1);           /* key ids 01.., 02.., ... */
        if (shmkey_signer_add(g, id, der, (uint32_t)n, i == 2, key_rows[i - 2]) != SHMKEY_OK)
            return 4;
        for (size_t j = 0; j < n; j++)
            if (der[j])
                return 5;                   /* the DER was not wiped */
    }
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", argv[1]);
    unlink(argv[1]);
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 || listen(fd, 16) != 0)
        return 6;
    struct shmkey_server *s;
    if (shmkey_server_open(fd, 1, SHMKEY_TRANSPORT_SHM, 16, 2048, 0, 1, &s) != SHMKEY_OK)
        return 7;
    shmkey_server_use_signer(s, g);
    struct shmkey_work *w = shmkey_work_new(2048);
    printf("listening\n");
    fflush(stdout);
    for (;;) {
        if (shmkey_server_next(s, w, 1000) != SHMKEY_OK)
            continue;
        if (w->req.op == SHMKEY_OP_STATUS) {
            char text[128];
            uint64_t signs = 0, in_c = 0;
            for (int i = 0; i < argc - 2; i++) {
                signs += key_rows[i][SHMKEY_STAT_SIGNS];
                in_c += key_rows[i][SHMKEY_STAT_SIGNS_IN_C];
            }
            int len = snprintf(text, sizeof(text), "signs=%llu in_c=%llu ops=%llu",
                               (unsigned long long)signs, (unsigned long long)in_c,
                               (unsigned long long)client_row[SHMKEY_CSTAT_OPS]);
            shmkey_server_reply(s, w, SHMKEY_OK, (const uint8_t *)text, (uint32_t)len);
            continue;
        }
        shmkey_server_count_client(s, w, client_row);
        shmkey_server_reply(s, w, SHMKEY_EUNSUPPORTED, (const uint8_t *)"python", 6);
    }
}

/*
 * attach_probe.c - connect to an oracle from C, as any process of another
 * uid would, and echo one request. Prints the status and exits 0 if the
 * echo came back intact. Usage: attach_probe SOCKET_PATH [shm|socket]
 */
#include "internal.h"

#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
    struct shmkey_client *c;
    char why[512];
    if (argc < 2 || argc > 3)
        return 2;
    int transport = argc == 3 && strcmp(argv[2], "socket") == 0 ? SHMKEY_TRANSPORT_SOCKET
                                                                 : SHMKEY_TRANSPORT_SHM;
    int rc = shmkey_client_open(argv[1], -1, transport, SHMKEY_UID_DEFAULT, 0, 5000, why,
                                sizeof(why), &c);
    if (rc != SHMKEY_OK) {
        printf("open: %s: %s\n", shmkey_strerror(rc), why);
        return 1;
    }
    struct shmkey_req req = {.op = SHMKEY_OP_PING, .in_len = 5};
    struct shmkey_resp resp;
    uint8_t out[16];
    rc = shmkey_call(c, &req, (const uint8_t *)"hello", out, sizeof(out), &resp, 5000);
    int ok = rc == SHMKEY_OK && resp.status == SHMKEY_OK && resp.out_len == 5 &&
             memcmp(out, "hello", 5) == 0;
    printf("call: %s\n", ok ? "echoed" : shmkey_strerror(rc ? rc : resp.status));
    shmkey_client_close(c);
    return ok ? 0 : 1;
}

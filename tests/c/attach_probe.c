/*
 * attach_probe.c - attach to an oracle from C, as any process of another
 * uid would, and echo one request. Prints the status and exits 0 if the
 * echo came back intact. Usage: attach_probe RING_ID | /SOCKET/PATH
 */
#include "internal.h"

#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
    struct shmkey_client *c;
    if (argc != 2)
        return 2;
    int rc = argv[1][0] == '/' ? shmkey_client_open_socket(argv[1], -1, 2048, &c)
                               : shmkey_client_open_shm(argv[1], &c);
    if (rc != SHMKEY_OK) {
        printf("open: %s\n", shmkey_strerror(rc));
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

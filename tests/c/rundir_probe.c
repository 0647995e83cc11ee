/*
 * rundir_probe.c - print the runtime directory the one rule (common.c) gives
 * this process, as a user other than the test's would see it, or the error.
 * Usage: rundir_probe create|look
 */
#include "internal.h"

#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
    char out[4096], why[4096];
    if (argc != 2)
        return 2;
    int rc = shmkey_runtime_dir(NULL, strcmp(argv[1], "create") == 0, out, sizeof(out), why,
                                sizeof(why));
    if (rc == SHMKEY_OK)
        printf("%s\n", out);
    else
        printf("error: %s\n", why);
    return 0;
}

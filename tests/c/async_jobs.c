/*
 * async_jobs.c - many OpenSSL ASYNC jobs of one thread signing with one
 * shmkey key at once, as an event-driven server runs them (haproxy's
 * ssl-mode-async, s_server -async): start each job, poll the descriptors
 * the paused jobs registered, resume the ready ones. Run by
 * tests/test_provider_async.py with shmkey's module loaded from OPENSSL_CONF.
 *
 * PUBKEY is the key's public half (PEM), to check every signature with.
 *
 *   async_jobs KEYREF PUBKEY N DROP
 *       N jobs; every DROP-th one (0: none) is dropped after its first pause,
 *       as a closed connection is: its wait context freed, the job never
 *       resumed. Then another 2N, none dropped.
 *   async_jobs KEYREF PUBKEY N wait
 *       One signature outside any job (connecting), "ready" printed; on a
 *       line of stdin N jobs start and "paused M" is printed; on the next
 *       line they run to their end; on the next N more run.
 *
 * Every signature is checked with the public key: each job signs a message
 * of its own, so a reply delivered to the wrong job fails. Prints
 * "signed S failed F dropped D max_in_flight M", one line per round.
 */
#include <openssl/async.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_JOBS 1024

struct job {
    ASYNC_JOB *job;
    ASYNC_WAIT_CTX *ctx;
    unsigned char msg[32];
    unsigned char sig[1024];
    size_t siglen;
    int state;          /* 0 idle, 1 paused, 2 done ok, 3 failed, 4 dropped */
    int paused_once;
};

static EVP_PKEY *key, *pub;

static int sign_job(void *arg)
{
    struct job *j = *(struct job **)arg;
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    EVP_PKEY_CTX *pctx = NULL;
    int ok = md && EVP_DigestSignInit(md, &pctx, EVP_sha256(), NULL, key) > 0 &&
             EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) > 0 &&
             (j->siglen = sizeof(j->sig),
              EVP_DigestSign(md, j->sig, &j->siglen, j->msg, sizeof(j->msg)) > 0);
    EVP_MD_CTX_free(md);
    return ok;
}

static int verify(struct job *j)
{
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    EVP_PKEY_CTX *pctx = NULL;
    int ok = md && EVP_DigestVerifyInit(md, &pctx, EVP_sha256(), NULL, pub) > 0 &&
             EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) > 0 &&
             EVP_DigestVerify(md, j->sig, j->siglen, j->msg, sizeof(j->msg)) == 1;
    EVP_MD_CTX_free(md);
    ERR_clear_error();
    return ok;
}

/* Start or resume job j; on its end record the outcome. */
static void step(struct job *j)
{
    int ret = 0;
    struct job *arg = j;
    switch (ASYNC_start_job(&j->job, j->ctx, &ret, sign_job, &arg, sizeof(arg))) {
    case ASYNC_PAUSE:
        j->state = 1;
        return;
    case ASYNC_FINISH:
        j->state = ret && verify(j) ? 2 : 3;
        if (j->state == 3) {
            fprintf(stderr, "job failed: ");
            ERR_print_errors_fp(stderr);
        }
        break;
    default:
        fprintf(stderr, "ASYNC_start_job failed\n");
        j->state = 3;
    }
    ERR_clear_error();
    ASYNC_WAIT_CTX_free(j->ctx);
    j->ctx = NULL;
}

/* Poll the paused jobs' descriptors and resume the ready ones; 0 when none is left. */
static int run_ready(struct job *jobs, int n, int drop, int *dropped)
{
    struct pollfd pfd[MAX_JOBS];
    int owner[MAX_JOBS], np = 0;
    for (int i = 0; i < n; i++) {
        OSSL_ASYNC_FD fds[4];
        size_t nf = 0;
        if (jobs[i].state != 1)
            continue;
        if (!ASYNC_WAIT_CTX_get_all_fds(jobs[i].ctx, NULL, &nf) || nf < 1 || nf > 4 ||
            !ASYNC_WAIT_CTX_get_all_fds(jobs[i].ctx, fds, &nf)) {
            fprintf(stderr, "a paused job registered %zu descriptors\n", nf);
            exit(2);
        }
        for (size_t k = 0; k < nf; k++) {
            pfd[np] = (struct pollfd){.fd = fds[k], .events = POLLIN};
            owner[np++] = i;
        }
    }
    if (np == 0)
        return 0;
    if (poll(pfd, (nfds_t)np, 20000) <= 0) {
        fprintf(stderr, "no paused job became ready in 20 s\n");
        exit(2);
    }
    for (int k = 0; k < np; k++) {
        struct job *j = &jobs[owner[k]];
        if (!pfd[k].revents || j->state != 1)
            continue;
        if (drop && owner[k] % drop == 0 && !j->paused_once) {
            /* A connection closed mid-handshake: its job is never resumed. */
            ASYNC_WAIT_CTX_free(j->ctx);
            j->ctx = NULL;
            j->state = 4;
            (*dropped)++;
            continue;
        }
        j->paused_once = 1;
        step(j);
    }
    return 1;
}

static void start_all(struct job *jobs, int n, int *max_in_flight)
{
    int paused = 0;
    for (int i = 0; i < n; i++) {
        memset(&jobs[i], 0, sizeof(jobs[i]));
        for (size_t b = 0; b < sizeof(jobs[i].msg); b++)
            jobs[i].msg[b] = (unsigned char)rand();
        jobs[i].ctx = ASYNC_WAIT_CTX_new();
        step(&jobs[i]);
        paused += jobs[i].state == 1;
    }
    *max_in_flight = paused;
}

static void report(struct job *jobs, int n, int dropped, int max_in_flight)
{
    int ok = 0, failed = 0;
    for (int i = 0; i < n; i++) {
        ok += jobs[i].state == 2;
        failed += jobs[i].state == 3;
    }
    printf("signed %d failed %d dropped %d max_in_flight %d\n", ok, failed, dropped,
           max_in_flight);
    fflush(stdout);
}

static void round_of(struct job *jobs, int n, int drop)
{
    int dropped = 0, max_in_flight;
    start_all(jobs, n, &max_in_flight);
    while (run_ready(jobs, n, drop, &dropped))
        ;
    report(jobs, n, dropped, max_in_flight);
}

int main(int argc, char **argv)
{
    static struct job jobs[MAX_JOBS];
    char line[16];
    if (argc != 5)
        return 2;
    int n = atoi(argv[3]);
    if (n < 1 || 2 * n > MAX_JOBS)
        return 2;
    FILE *f = fopen(argv[1], "r");
    if (!f || !(key = PEM_read_PrivateKey(f, NULL, NULL, NULL))) {
        ERR_print_errors_fp(stderr);
        return 2;
    }
    fclose(f);
    if (!(f = fopen(argv[2], "r")) || !(pub = PEM_read_PUBKEY(f, NULL, NULL, NULL))) {
        ERR_print_errors_fp(stderr);
        return 2;
    }
    fclose(f);
    if (strcmp(argv[4], "wait") == 0) {
        int max_in_flight, dropped = 0;
        memset(&jobs[0], 0, sizeof(jobs[0]));
        struct job *first = &jobs[0];
        if (!sign_job(&first) || !verify(first)) {
            ERR_print_errors_fp(stderr);
            return 2;
        }
        printf("ready\n");
        fflush(stdout);
        if (!fgets(line, sizeof(line), stdin))
            return 2;
        start_all(jobs, n, &max_in_flight);
        printf("paused %d\n", max_in_flight);
        fflush(stdout);
        if (!fgets(line, sizeof(line), stdin))
            return 2;
        while (run_ready(jobs, n, 0, &dropped))
            ;
        report(jobs, n, 0, max_in_flight);
        if (!fgets(line, sizeof(line), stdin))
            return 2;
        round_of(jobs, n, 0);
    } else {
        round_of(jobs, n, atoi(argv[4]));
        round_of(jobs, 2 * n, 0);
    }
    EVP_PKEY_free(key);
    EVP_PKEY_free(pub);
    return 0;
}

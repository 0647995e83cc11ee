/*
 * provider_sign.c - signatures per second and per-signature latency through
 * OpenSSL's EVP API, for whatever key file it is given: a private key
 * (in-process) or a shmkey key reference (the provider, with OPENSSL_CONF
 * from `shmkey openssl-conf`). RSA keys sign as TLS 1.3 does (PSS, SHA-256),
 * EC keys ECDSA with SHA-256, Ed25519 keys the message. C on the caller's
 * side, so the difference is the oracle round trip and the oracle's work.
 * Built and run by provider_handshakes.py and test_ec_sign.py; by hand:
 *   cc -O2 bench/provider_sign.c -o /tmp/provider_sign -lcrypto -lpthread
 *   OPENSSL_CONF=shmkey.cnf /tmp/provider_sign key.ref.pem 2000 2 [MESSAGE_HEX]
 * signs MESSAGE_HEX (default "handshake") and prints: signs/s, mean us/sign,
 * p50 us, p99 us (over all threads' signatures), the last signature in hex.
 */
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static EVP_PKEY *pkey;
static int iters;
static int is_rsa, is_ed25519;
static uint64_t *lat_ns;         /* per signature, thread after thread */
static unsigned char *message = (unsigned char *)"handshake";
static long message_len = 9;
static unsigned char last_sig[1024];
static size_t last_siglen;

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* What a TLS 1.3 server does per handshake: RSA-PSS with SHA-256 and a
 * digest-long salt, ECDSA with SHA-256, or Ed25519 over the message. */
static int sign_once(unsigned char *sig, size_t *siglen)
{
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    EVP_PKEY_CTX *pctx = NULL;
    int ok = md && EVP_DigestSignInit_ex(md, &pctx, is_ed25519 ? NULL : "SHA256", NULL, NULL,
                                         pkey, NULL) > 0 &&
             (!is_rsa || (EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) > 0 &&
                          EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, RSA_PSS_SALTLEN_DIGEST) > 0)) &&
             EVP_DigestSign(md, sig, siglen, message, (size_t)message_len) > 0;
    EVP_MD_CTX_free(md);
    return ok;
}

static void *run(void *arg)
{
    uint64_t *mine = arg;
    unsigned char sig[sizeof(last_sig)];
    size_t siglen = sizeof(sig);
    for (int i = 0; i < iters; i++) {
        uint64_t t0 = now_ns();
        siglen = sizeof(sig);
        if (!sign_once(sig, &siglen)) {
            ERR_print_errors_fp(stderr);
            exit(1);
        }
        mine[i] = now_ns() - t0;
    }
    if (mine == lat_ns) {       /* the first thread's last signature, for checking */
        memcpy(last_sig, sig, siglen);
        last_siglen = siglen;
    }
    return NULL;
}

static int by_value(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* The nearest-rank percentile p (0 to 100) of n > 0 sorted values, as
 * shmkey.tools.stats.percentile has it: the smallest value that at least p
 * percent of them are at or below. */
static uint64_t percentile(const uint64_t *sorted, size_t n, unsigned p)
{
    size_t rank = (n * p + 99) / 100;
    return sorted[(rank ? rank : 1) - 1];
}

int main(int argc, char **argv)
{
    pthread_t threads[64];
    if (argc != 4 && argc != 5) {
        fprintf(stderr, "usage: %s KEYFILE SIGNS_PER_THREAD THREADS [MESSAGE_HEX]\n", argv[0]);
        return 2;
    }
    if (argc == 5 && (message = OPENSSL_hexstr2buf(argv[4], &message_len)) == NULL) {
        fprintf(stderr, "MESSAGE_HEX is not hex\n");
        return 2;
    }
    BIO *in = BIO_new_file(argv[1], "r");
    pkey = in ? PEM_read_bio_PrivateKey(in, NULL, NULL, NULL) : NULL;
    BIO_free(in);
    if (!pkey) {
        ERR_print_errors_fp(stderr);
        return 1;
    }
    iters = atoi(argv[2]);
    int nthreads = atoi(argv[3]);
    if (iters < 1 || nthreads < 1 || nthreads > 64)
        return 2;
    is_rsa = EVP_PKEY_is_a(pkey, "RSA");
    is_ed25519 = EVP_PKEY_is_a(pkey, "ED25519");
    size_t total = (size_t)iters * (size_t)nthreads;
    if ((lat_ns = calloc(total, sizeof(*lat_ns))) == NULL)
        return 1;
    for (int i = 0; i < 20; i++) {      /* connect, warm caches */
        last_siglen = sizeof(last_sig);
        if (!sign_once(last_sig, &last_siglen)) {
            ERR_print_errors_fp(stderr);
            return 1;
        }
    }
    double t0 = now();
    for (int i = 0; i < nthreads; i++)
        pthread_create(&threads[i], NULL, run, lat_ns + (size_t)i * (size_t)iters);
    for (int i = 0; i < nthreads; i++)
        pthread_join(threads[i], NULL);
    double dt = now() - t0;
    qsort(lat_ns, total, sizeof(*lat_ns), by_value);
    /* signs/s, mean us/sign, p50 us, p99 us, the last signature */
    printf("%.0f %.1f %.2f %.2f ", (double)total / dt, dt / iters * 1e6,
           (double)percentile(lat_ns, total, 50) / 1e3,
           (double)percentile(lat_ns, total, 99) / 1e3);
    for (size_t i = 0; i < last_siglen; i++)
        printf("%02x", last_sig[i]);
    printf("\n");
    free(lat_ns);
    EVP_PKEY_free(pkey);
    return 0;
}

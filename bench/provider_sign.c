/*
 * provider_sign.c - RSA signatures per second through OpenSSL's EVP API, for
 * whatever key file it is given: a private key (in-process) or a shmkey key
 * reference (the provider, with OPENSSL_CONF from `shmkey openssl-conf`).
 * C on both sides, so the difference is the oracle round trip alone.
 * Built and run by provider_handshakes.py; by hand:
 *   cc -O2 bench/provider_sign.c -o /tmp/provider_sign -lcrypto -lpthread
 *   OPENSSL_CONF=shmkey.cnf /tmp/provider_sign key.ref.pem 2000 2
 */
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static EVP_PKEY *pkey;
static int iters;

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* What a TLS 1.3 server does per handshake: RSA-PSS, SHA-256, digest-long salt. */
static int sign_once(void)
{
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    EVP_PKEY_CTX *pctx = NULL;
    unsigned char sig[1024];
    size_t siglen = sizeof(sig);
    int ok = md && EVP_DigestSignInit_ex(md, &pctx, "SHA256", NULL, NULL, pkey, NULL) > 0 &&
             EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) > 0 &&
             EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, RSA_PSS_SALTLEN_DIGEST) > 0 &&
             EVP_DigestSign(md, sig, &siglen, (const unsigned char *)"handshake", 9) > 0;
    EVP_MD_CTX_free(md);
    return ok;
}

static void *run(void *arg)
{
    for (int i = 0; i < iters; i++)
        if (!sign_once()) {
            ERR_print_errors_fp(stderr);
            exit(1);
        }
    return NULL;
}

int main(int argc, char **argv)
{
    pthread_t threads[64];
    if (argc != 4) {
        fprintf(stderr, "usage: %s KEYFILE SIGNS_PER_THREAD THREADS\n", argv[0]);
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
    for (int i = 0; i < 20; i++)        /* connect, warm caches */
        sign_once();
    double t0 = now();
    for (int i = 0; i < nthreads; i++)
        pthread_create(&threads[i], NULL, run, NULL);
    for (int i = 0; i < nthreads; i++)
        pthread_join(threads[i], NULL);
    double dt = now() - t0;
    printf("%.0f %.1f\n", nthreads * iters / dt, dt / iters * 1e6);   /* signs/s, us/sign */
    EVP_PKEY_free(pkey);
    return 0;
}

/*
 * signer.c - in the oracle: the common signatures of file keys and token
 * keys, made by the worker that took the request, without going up to Python.
 *
 * A TLS handshake's signature is one of a handful of shapes; for those the
 * worker calls OpenSSL here (or, for a token key, its PKCS#11 module:
 * signer_token.c), with the GIL free, so several workers of one process
 * sign at once and no request waits for the interpreter. Any other
 * request, and any request this code is unsure of, goes to Python
 * (oracle/handler.py), which stays the one judge of what is valid, refused
 * or an error: nothing is refused here.
 */
#include "internal.h"

#include <stdlib.h>
#include <string.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#define MAX_SIGNER_KEYS 32
#define MAX_SIGNATURE SHMKEY_SIGNER_MAX_SIG     /* RSA-8192 */
#define NHASH SHMKEY_SIGNER_NHASH

/* Prepared contexts of a file key, one per hash and padding (indexed by
   shape): OpenSSL 3 fetches its algorithms on every fresh context, which a
   copy of a prepared one skips. */
#define NPREP (SHMKEY_SHAPE_ECDSA + 1)

struct signer_key {
    uint8_t id[32];
    EVP_PKEY *pkey;             /* a file key; NULL for a token's */
    struct signer_token *tok;   /* a token key; NULL for a file's */
    int type;                   /* EVP_PKEY_RSA, _EC or _ED25519 */
    uint64_t *row;              /* its counters in this worker process */
    EVP_PKEY_CTX *prep[NPREP][NHASH];
};

struct shmkey_signer {
    uint32_t refs;              /* atomic: the server's, and each request in progress */
    uint32_t n;
    int dflt;                   /* the first key of the oracle (key id all zero); -1: not here */
    struct signer_key keys[MAX_SIGNER_KEYS];
};

/* The hashes a TLS signature uses, as an index; -1 for anything else (Python decides). */
static int tls_hash(uint32_t code)
{
    switch (code) {
    case SHMKEY_HASH_SHA256: return 0;
    case SHMKEY_HASH_SHA384: return 1;
    case SHMKEY_HASH_SHA512: return 2;
    default: return -1;
    }
}

static const uint32_t digest_len[NHASH] = {32, 48, 64};

/* A signing context of pkey for one padding and hash, ready to copy; NULL if none. */
static EVP_PKEY_CTX *prepare(EVP_PKEY *pkey, int prep, int h)
{
    const EVP_MD *md = h == 0 ? EVP_sha256() : h == 1 ? EVP_sha384() : EVP_sha512();
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(pkey, NULL);
    int ok = ctx && EVP_PKEY_sign_init(ctx) == 1 && EVP_PKEY_CTX_set_signature_md(ctx, md) == 1;
    if (ok && prep == SHMKEY_SHAPE_PKCS1)
        ok = EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PADDING) == 1;
    if (ok && prep == SHMKEY_SHAPE_PSS)
        ok = EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PSS_PADDING) == 1 &&
             EVP_PKEY_CTX_set_rsa_mgf1_md(ctx, md) == 1 &&
             EVP_PKEY_CTX_set_rsa_pss_saltlen(ctx, (int)digest_len[h]) == 1;
    if (!ok) {
        EVP_PKEY_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

struct shmkey_signer *shmkey_signer_new(void)
{
    struct shmkey_signer *g = calloc(1, sizeof(*g));
    if (g) {
        g->refs = 1;
        g->dflt = -1;
    }
    return g;
}

/* Make g->keys[g->n], whose key (pkey or tok) the caller set, an entry of g. */
static void commit(struct shmkey_signer *g, const uint8_t *key_id, int type, uint64_t *key_row,
                   int is_default)
{
    struct signer_key *k = &g->keys[g->n];
    memcpy(k->id, key_id, sizeof(k->id));
    k->type = type;
    k->row = key_row;
    if (is_default)
        g->dflt = (int)g->n;
    g->n++;
}

int shmkey_signer_add(struct shmkey_signer *g, const uint8_t *key_id, uint8_t *der,
                      uint32_t der_len, int is_default, uint64_t *key_row)
{
    const unsigned char *p = der;
    EVP_PKEY *pkey = g->n < MAX_SIGNER_KEYS ? d2i_AutoPrivateKey(NULL, &p, (long)der_len) : NULL;
    OPENSSL_cleanse(der, der_len);
    if (!pkey)
        return g->n < MAX_SIGNER_KEYS ? SHMKEY_EINTERNAL : SHMKEY_EINVAL;
    int type = EVP_PKEY_get_base_id(pkey);
    if (type != EVP_PKEY_RSA && type != EVP_PKEY_EC && type != EVP_PKEY_ED25519) {
        EVP_PKEY_free(pkey);
        return SHMKEY_EUNSUPPORTED;
    }
    struct signer_key *k = &g->keys[g->n];
    k->pkey = pkey;
    for (int h = 0; h < NHASH; h++) {
        if (type == EVP_PKEY_RSA) {
            k->prep[SHMKEY_SHAPE_PKCS1][h] = prepare(pkey, SHMKEY_SHAPE_PKCS1, h);
            k->prep[SHMKEY_SHAPE_PSS][h] = prepare(pkey, SHMKEY_SHAPE_PSS, h);
        } else if (type == EVP_PKEY_EC) {
            k->prep[SHMKEY_SHAPE_ECDSA][h] = prepare(pkey, SHMKEY_SHAPE_ECDSA, h);
        }
    }
    commit(g, key_id, type, key_row, is_default);
    return SHMKEY_OK;
}

int shmkey_signer_add_token(struct shmkey_signer *g, const uint8_t *key_id,
                            const char *module_path, uint32_t type, uint32_t sig_len,
                            int is_default, uint64_t *key_row)
{
    static const int evp_type[] = {[SHMKEY_KEY_RSA] = EVP_PKEY_RSA, [SHMKEY_KEY_EC] = EVP_PKEY_EC,
                                   [SHMKEY_KEY_ED25519] = EVP_PKEY_ED25519};
    if (g->n >= MAX_SIGNER_KEYS || type < SHMKEY_KEY_RSA || type > SHMKEY_KEY_ED25519 ||
        !sig_len || sig_len > MAX_SIGNATURE || !module_path)
        return SHMKEY_EINVAL;
    struct signer_token *t = calloc(1, sizeof(*t));
    if (!t)
        return SHMKEY_ESYSTEM;
    int rc = shmkey_token_open(t, module_path, sig_len);
    if (rc != SHMKEY_OK) {
        free(t);
        return rc;
    }
    g->keys[g->n].tok = t;
    commit(g, key_id, evp_type[type], key_row, is_default);
    return SHMKEY_OK;
}

void shmkey_signer_free(struct shmkey_signer *g)
{
    if (!g)
        return;
    for (uint32_t i = 0; i < g->n; i++) {
        for (int p = 0; p < NPREP; p++)
            for (int h = 0; h < NHASH; h++)
                EVP_PKEY_CTX_free(g->keys[i].prep[p][h]);
        EVP_PKEY_free(g->keys[i].pkey);
        if (g->keys[i].tok) {
            shmkey_token_close(g->keys[i].tok);
            free(g->keys[i].tok);
        }
    }
    free(g);
}

static void signer_put(struct shmkey_signer *g)
{
    if (g && __atomic_sub_fetch(&g->refs, 1, __ATOMIC_ACQ_REL) == 0)
        shmkey_signer_free(g);
}

void shmkey_server_use_signer(struct shmkey_server *s, struct shmkey_signer *g)
{
    pthread_mutex_lock(&s->signer_lock);
    struct shmkey_signer *old = s->signer;
    s->signer = g;
    pthread_mutex_unlock(&s->signer_lock);
    signer_put(old);            /* freed once the requests signing with it are done */
}

void shmkey_signer_release(struct shmkey_server *s)
{
    shmkey_server_use_signer(s, NULL);
}

int shmkey_server_count_client(struct shmkey_server *s, struct shmkey_work *w,
                               uint64_t *client_row)
{
    (void)s;
    struct sconn *k = w->conn;
    if (!k)
        return SHMKEY_EINVAL;
    __atomic_store_n(&k->stats_row, client_row, __ATOMIC_RELEASE);
    return SHMKEY_OK;
}

static struct shmkey_signer *signer_get(struct shmkey_server *s)
{
    pthread_mutex_lock(&s->signer_lock);
    struct shmkey_signer *g = s->signer;
    if (g)
        __atomic_add_fetch(&g->refs, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&s->signer_lock);
    return g;
}

static const struct signer_key *find_key(const struct shmkey_signer *g, const uint8_t *id)
{
    static const uint8_t zero[32];
    if (memcmp(id, zero, sizeof(zero)) == 0)
        return g->dflt >= 0 ? &g->keys[g->dflt] : NULL;
    for (uint32_t i = 0; i < g->n; i++)
        if (memcmp(g->keys[i].id, id, sizeof(zero)) == 0)
            return &g->keys[i];
    return NULL;
}

int shmkey_server_token_session(struct shmkey_server *s, const uint8_t *key_id,
                                uint64_t session, uint64_t object)
{
    if (session != (unsigned long)session || object != (unsigned long)object)
        return SHMKEY_EINVAL;
    int rc = SHMKEY_ENOKEY;
    pthread_mutex_lock(&s->signer_lock);
    const struct signer_key *k = s->signer ? find_key(s->signer, key_id) : NULL;
    if (k && k->tok) {
        k->tok->session = (unsigned long)session;
        k->tok->object = (unsigned long)object;
        rc = SHMKEY_OK;
    }
    pthread_mutex_unlock(&s->signer_lock);
    return rc;
}

/* The shape (SHMKEY_SHAPE_*) of w's request to a key of type, and its hash
   index in *h; -1 for any shape not made here. */
static int shape_of(int type, const struct shmkey_work *w, int *h)
{
    const uint32_t *p = w->req.p;
    if (type == EVP_PKEY_ED25519)
        return p[0] == SHMKEY_SIG_ED25519 && !p[1] && !p[2] && !p[3] ? SHMKEY_SHAPE_ED25519 : -1;
    *h = tls_hash(p[1]);
    if (*h < 0 || w->req.in_len != digest_len[*h])
        return -1;
    if (type == EVP_PKEY_RSA && p[0] == SHMKEY_PAD_PKCS1V15 && p[2] == 0 && p[3] == 0)
        return SHMKEY_SHAPE_PKCS1;
    if (type == EVP_PKEY_RSA && p[0] == SHMKEY_PAD_PSS && p[2] == p[1] && p[3] == w->req.in_len)
        return SHMKEY_SHAPE_PSS;
    if (type == EVP_PKEY_EC && p[0] == SHMKEY_SIG_ECDSA && p[2] == 0 && p[3] == 0)
        return SHMKEY_SHAPE_ECDSA;
    return -1;
}

/* Sign a digest with an RSA or EC file key; 1 on success, 0 if Python should try. */
static int sign_digest(const struct signer_key *k, int shape, int h, const struct shmkey_work *w,
                       uint8_t *out, size_t *out_len)
{
    if (!k->prep[shape][h])
        return 0;
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_dup(k->prep[shape][h]);
    int ok = ctx && EVP_PKEY_sign(ctx, out, out_len, w->payload, w->req.in_len) == 1;
    EVP_PKEY_CTX_free(ctx);
    return ok;
}

static int sign_ed25519(const struct signer_key *k, const struct shmkey_work *w,
                        uint8_t *out, size_t *out_len)
{
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int ok = ctx && EVP_DigestSignInit(ctx, NULL, NULL, NULL, k->pkey) == 1 &&
             EVP_DigestSign(ctx, out, out_len, w->payload, w->req.in_len) == 1;
    EVP_MD_CTX_free(ctx);
    return ok;
}

/* Sign with a token key on the session Python last gave it (none: Python's). */
static int sign_token(struct shmkey_server *s, const struct signer_key *k, int shape, int h,
                      const struct shmkey_work *w, uint8_t *out, size_t *out_len)
{
    pthread_mutex_lock(&s->signer_lock);
    unsigned long session = k->tok->session, object = k->tok->object;
    pthread_mutex_unlock(&s->signer_lock);
    return session && shmkey_token_sign(k->tok, session, object, shape, h, w, out, out_len);
}

int shmkey_signer_serve(struct shmkey_server *s, struct shmkey_work *w)
{
    struct sconn *conn = w->conn;
    if (w->req.op != SHMKEY_OP_SIGN || !conn)
        return 0;
    uint64_t *client_row = __atomic_load_n(&conn->stats_row, __ATOMIC_ACQUIRE);
    if (!client_row)
        return 0;               /* Python counts this connection's first request */
    struct shmkey_signer *g = signer_get(s);
    const struct signer_key *k = g ? find_key(g, w->req.key_id) : NULL;
    uint8_t out[MAX_SIGNATURE];
    size_t out_len = sizeof(out);
    int done = 0;
    int h = 0, shape = k ? shape_of(k->type, w, &h) : -1;
    if (shape >= 0) {
        uint64_t t0 = shmkey_now_ns();
        if (k->tok)
            done = sign_token(s, k, shape, h, w, out, &out_len);
        else if (shape == SHMKEY_SHAPE_ED25519)
            done = sign_ed25519(k, w, out, &out_len);
        else
            done = sign_digest(k, shape, h, w, out, &out_len);
        if (done) {
            shmkey_stats_signed_in_c(k->row, client_row, shmkey_now_ns() - t0);
            /* The caller looks for the next request at once. */
            shmkey_ring_look_begin(s, w);
            shmkey_server_reply(s, w, SHMKEY_OK, out, (uint32_t)out_len);
        }
    }
    OPENSSL_cleanse(out, sizeof(out));
    signer_put(g);
    return done;
}

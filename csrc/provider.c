/*
 * provider.c - an OpenSSL 3 provider whose RSA private-key operations run in
 * a shmkey key oracle.
 *
 * A key reference file (PEM "SHMKEY KEY REFERENCE") names the oracle and
 * carries the public key. Decoding it gives a key that holds n, e and the
 * oracle's name: nothing secret. Signing hashes here and sends the digest;
 * decrypting sends the ciphertext. Both go through shmkey_call() (C only, no
 * Python, no GIL, any thread), on a connection opened on first use and
 * reopened when the oracle has restarted.
 *
 * The pieces, in the order OpenSSL meets them:
 *   decoder "DER" (input=pem)   finds our PEM block among others and hands its
 *                               DER on. Named "DER" like the default provider's
 *                               PEM decoder, so that both PEM_read_bio_PrivateKey
 *                               (nginx, Python's ssl) and OSSL_STORE (the openssl
 *                               commands) chain it in.
 *   decoder "RSA" (input=der)   parses that DER into a key object.
 *   keymgmt "RSA"               n, e, the oracle; imports and exports public
 *                               parts only, refuses anything private.
 *   signature "SHMKEY-RSA-SIG"  digest-sign and sign, PKCS#1 v1.5 and PSS with
 *                               SHA-256/384/512. A name of its own, so OpenSSL
 *                               never pairs our key with another provider's RSA.
 *   asym cipher "SHMKEY-RSA-ENC" decrypt: OAEP, PKCS#1 v1.5, and TLS 1.2's
 *                               RSA key exchange with its implicit rejection.
 */
#include "internal.h"

#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/asn1t.h>
#include <openssl/bn.h>
#include <openssl/core.h>
#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/core_object.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/params.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <openssl/provider.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#define SK_PROVIDER_NAME "shmkey"
#define SK_PEM_LABEL "SHMKEY KEY REFERENCE"
#define SK_PEM_BEGIN "-----BEGIN " SK_PEM_LABEL "-----"
#define SK_SIG_NAME "SHMKEY-RSA-SIG"
#define SK_ENC_NAME "SHMKEY-RSA-ENC"
#define SK_RSA_NAMES "RSA:rsaEncryption:1.2.840.113549.1.1.1"
#define SK_NAME_MAX 64
#define SK_DEFAULT_TIMEOUT_MS 5000u
#define SK_PEM_READ_MAX (4u << 20)    /* a cert chain and a reference fit easily */
#define SK_DER_READ_MAX (64u << 10)
#define SK_REPLY_MAX 4096u            /* an RSA-16384 signature and a reason */
#define SK_TLS_PMS_LEN 48             /* TLS 1.2 premaster secret */

/* Reasons of our own, above the ones that mirror SHMKEY_E* (1..12). */
#define SK_R_BAD_REFERENCE 100
#define SK_R_KEY_MISMATCH 101
#define SK_R_PUBLIC_ONLY 102
#define SK_R_UNSUPPORTED_PARAM 103
#define SK_R_BUFFER_TOO_SMALL 104
#define SK_R_LIBCRYPTO 105

/* ===================================================================== */
/* the key reference format                                              */
/* ===================================================================== */

/*
 * ShmkeyKeyReference ::= SEQUENCE {
 *     version    INTEGER,               -- SHMKEY_KEYREF_VERSION
 *     oracle     UTF8String,            -- name given to `shmkey serve --name`
 *     transport  INTEGER,               -- SHMKEY_TRANSPORT_ANY, _SHM or _SOCKET
 *     keyIndex   INTEGER,               -- key number inside the oracle
 *     publicKey  SubjectPublicKeyInfo }
 * Parsed with plain templates (no X509_PUBKEY), so that decoding it never
 * re-enters the decoders from inside one.
 */
typedef struct {
    X509_ALGOR *algorithm;
    ASN1_BIT_STRING *public_key;
} SK_SPKI;

ASN1_SEQUENCE(SK_SPKI) = {
    ASN1_SIMPLE(SK_SPKI, algorithm, X509_ALGOR),
    ASN1_SIMPLE(SK_SPKI, public_key, ASN1_BIT_STRING),
} static_ASN1_SEQUENCE_END(SK_SPKI)

typedef struct {
    ASN1_INTEGER *version;
    ASN1_UTF8STRING *oracle;
    ASN1_INTEGER *transport;
    ASN1_OCTET_STRING *key_id;  /* SHA-256 of the SPKI: the key's name at the oracle */
    SK_SPKI *spki;
} SK_REF;

ASN1_SEQUENCE(SK_REF) = {
    ASN1_SIMPLE(SK_REF, version, ASN1_INTEGER),
    ASN1_SIMPLE(SK_REF, oracle, ASN1_UTF8STRING),
    ASN1_SIMPLE(SK_REF, transport, ASN1_INTEGER),
    ASN1_SIMPLE(SK_REF, key_id, ASN1_OCTET_STRING),
    ASN1_SIMPLE(SK_REF, spki, SK_SPKI),
} static_ASN1_SEQUENCE_END(SK_REF)

typedef struct {
    BIGNUM *n;
    BIGNUM *e;
} SK_RSAPUB;

ASN1_SEQUENCE(SK_RSAPUB) = {
    ASN1_SIMPLE(SK_RSAPUB, n, BIGNUM),
    ASN1_SIMPLE(SK_RSAPUB, e, BIGNUM),
} static_ASN1_SEQUENCE_END(SK_RSAPUB)

/* ===================================================================== */
/* provider context, errors                                              */
/* ===================================================================== */

/* A connection to an oracle; closed by whoever drops the last reference. */
struct sk_conn {
    struct shmkey_client *client;
    unsigned refs;              /* guarded by the provider lock */
    pid_t pid;                  /* process that opened it */
};

/* One oracle as named by key references; shared by every key naming it. */
struct sk_oracle {
    struct sk_oracle *next;
    unsigned users;             /* keys pointing here; guarded by the lock */
    char name[SK_NAME_MAX + 1];
    int transport;
    uint8_t key_id[32];         /* how requests name the key */
    BIGNUM *n, *e;              /* the public key the oracle must hold */
    struct sk_conn *conn;       /* current connection, or NULL */
};

struct sk_provctx {
    const OSSL_CORE_HANDLE *handle;
    OSSL_LIB_CTX *libctx;       /* child of the caller's: digests and RNG */
    OSSL_FUNC_core_new_error_fn *new_error;
    OSSL_FUNC_core_set_error_debug_fn *set_error_debug;
    OSSL_FUNC_core_vset_error_fn *vset_error;
    OSSL_FUNC_BIO_read_ex_fn *bio_read_ex;
    uint32_t timeout_ms;
    pthread_mutex_t lock;       /* the oracle list, their connections, refs */
    struct sk_oracle *oracles;
};

struct sk_key {
    struct sk_provctx *pc;
    int refs;                   /* atomic: keymgmt, signature and cipher ctxs */
    BIGNUM *n, *e;
    int bits;
    uint32_t bytes;
    struct sk_oracle *oracle;   /* NULL: a public key only, e.g. a cert's */
};

/* Why this thread's last provider operation (loading a key reference, or a
 * call to the oracle) failed, "" if it did not. For Python, whose ssl module
 * reports only the last OpenSSL error: libssl's own, not ours. */
static __thread char sk_last_error[448];

static OSSL_ITEM sk_reasons[32];
static pthread_once_t sk_reasons_once = PTHREAD_ONCE_INIT;

static void sk_reasons_init(void)
{
    static const struct { int code; const char *text; } own[] = {
        {SK_R_BAD_REFERENCE, "malformed shmkey key reference"},
        {SK_R_KEY_MISMATCH, "the key oracle holds a different key than the key reference"},
        {SK_R_PUBLIC_ONLY, "this key has no oracle: it is a public key"},
        {SK_R_UNSUPPORTED_PARAM, "unsupported padding, digest or parameter"},
        {SK_R_BUFFER_TOO_SMALL, "output buffer too small"},
        {SK_R_LIBCRYPTO, "a libcrypto call failed"},
    };
    size_t n = 0;
    for (int status = SHMKEY_EINVAL; status >= SHMKEY_EACCESS; status--)
        sk_reasons[n++] = (OSSL_ITEM){(unsigned)-status, (char *)shmkey_strerror(status)};
    for (size_t i = 0; i < sizeof(own) / sizeof(own[0]); i++)
        sk_reasons[n++] = (OSSL_ITEM){(unsigned)own[i].code, (char *)own[i].text};
    sk_reasons[n] = (OSSL_ITEM){0, NULL};
}

static const char *sk_reason_text(int reason)
{
    pthread_once(&sk_reasons_once, sk_reasons_init);
    for (const OSSL_ITEM *it = sk_reasons; it->ptr; it++)
        if (it->id == (unsigned)reason)
            return it->ptr;
    return "error";
}

/*
 * Queue an OpenSSL error from this provider: its reason strings name the
 * cause, fmt adds which oracle and why.
 */
static void sk_raise_at(struct sk_provctx *pc, const char *file, int line,
                        const char *func, int reason, const char *fmt, ...)
{
    va_list ap;
    if (pc && pc->new_error && pc->set_error_debug && pc->vset_error) {
        pc->new_error(pc->handle);
        pc->set_error_debug(pc->handle, file, line, func);
        va_start(ap, fmt);
        pc->vset_error(pc->handle, reason, fmt, ap);
        va_end(ap);
    }
}

#define SK_RAISE(pc, reason, ...) \
    sk_raise_at((pc), OPENSSL_FILE, OPENSSL_LINE, OPENSSL_FUNC, (reason), __VA_ARGS__)

/* Raise, and keep the words for shmkey_openssl_last_error() as well. */
#define SK_FAIL(pc, reason, ...)                                                  \
    do {                                                                          \
        char sk_detail_[352];                                                     \
        snprintf(sk_detail_, sizeof(sk_detail_), __VA_ARGS__);                    \
        SK_RAISE((pc), (reason), "%s", sk_detail_);                               \
        snprintf(sk_last_error, sizeof(sk_last_error), "%s%s%s",                  \
                 sk_reason_text(reason), sk_detail_[0] ? ": " : "", sk_detail_);  \
    } while (0)

/* ===================================================================== */
/* oracles and connections                                               */
/* ===================================================================== */

/* The rule of shmkey/ring.py check_name: the name becomes part of paths. */
static int sk_valid_name(const char *name)
{
    static const char allowed[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                  "0123456789-_.";
    size_t n = strlen(name);
    return n > 0 && n <= SK_NAME_MAX && name[0] != '.' && strspn(name, allowed) == n;
}

/* Take a reference on the registry entry for this oracle and key. */
static struct sk_oracle *sk_oracle_get(struct sk_provctx *pc, const char *name,
                                       int transport, const uint8_t key_id[32],
                                       const BIGNUM *n, const BIGNUM *e)
{
    struct sk_oracle *o;
    pthread_mutex_lock(&pc->lock);
    for (o = pc->oracles; o; o = o->next)
        if (strcmp(o->name, name) == 0 && o->transport == transport &&
            memcmp(o->key_id, key_id, sizeof(o->key_id)) == 0 &&
            BN_cmp(o->n, n) == 0 && BN_cmp(o->e, e) == 0)
            break;
    if (o) {
        o->users++;
    } else if ((o = calloc(1, sizeof(*o))) != NULL) {
        snprintf(o->name, sizeof(o->name), "%s", name);
        o->transport = transport;
        memcpy(o->key_id, key_id, sizeof(o->key_id));
        o->n = BN_dup(n);
        o->e = BN_dup(e);
        o->users = 1;
        if (o->n && o->e) {
            o->next = pc->oracles;
            pc->oracles = o;
        } else {
            BN_free(o->n);
            BN_free(o->e);
            free(o);
            o = NULL;
        }
    }
    pthread_mutex_unlock(&pc->lock);
    return o;
}

/* Drop one reference; returns the connection to close, if that was its last. */
static struct sk_conn *sk_conn_unref_locked(struct sk_conn *c)
{
    return (c && --c->refs == 0) ? c : NULL;
}

static void sk_conn_close(struct sk_conn *c)
{
    if (!c)
        return;
    /* A connection inherited across fork() stays with the parent. */
    if (c->pid == getpid())
        shmkey_client_close(c->client);
    free(c);
}

static void sk_oracle_put(struct sk_provctx *pc, struct sk_oracle *o)
{
    struct sk_conn *dead = NULL;
    if (!o)
        return;
    pthread_mutex_lock(&pc->lock);
    if (--o->users > 0) {
        pthread_mutex_unlock(&pc->lock);
        return;
    }
    for (struct sk_oracle **pp = &pc->oracles; *pp; pp = &(*pp)->next)
        if (*pp == o) {
            *pp = o->next;
            break;
        }
    dead = sk_conn_unref_locked(o->conn);
    pthread_mutex_unlock(&pc->lock);
    sk_conn_close(dead);
    BN_free(o->n);
    BN_free(o->e);
    free(o);
}

/*
 * Where a socket-transport oracle named name listens: the same rule as
 * shmkey/ring.py (runtime_dir): SHMKEY_RUNTIME_DIR if the operator set it,
 * trusted if no group or other may write to it; else a directory that must
 * be ours alone, since whoever owns it could put a fake oracle there.
 */
static int sk_socket_path(const char *name, char *out, size_t cap, char *why, size_t whylen)
{
    char dir[200];
    struct stat st;
    const char *configured = secure_getenv("SHMKEY_RUNTIME_DIR");
    const char *base = secure_getenv("XDG_RUNTIME_DIR");
    if (configured && configured[0] == '/') {
        snprintf(dir, sizeof(dir), "%s", configured);
        if (stat(dir, &st) != 0)
            return SHMKEY_EUNAVAIL;
        if (!S_ISDIR(st.st_mode) || (st.st_mode & 022)) {
            snprintf(why, whylen, "SHMKEY_RUNTIME_DIR=%.100s must be a directory that no "
                     "group or other user can write to", dir);
            return SHMKEY_EACCESS;
        }
        goto found;
    }
    if (base && base[0])
        snprintf(dir, sizeof(dir), "%s/shmkey", base);
    else
        snprintf(dir, sizeof(dir), "/tmp/shmkey-%u", (unsigned)geteuid());
    if (lstat(dir, &st) != 0)
        return SHMKEY_EUNAVAIL;
    if (!S_ISDIR(st.st_mode) || st.st_uid != geteuid() || (st.st_mode & 077)) {
        snprintf(why, whylen, "socket directory %.100s must be owned by uid %u with mode 0700",
                 dir, (unsigned)geteuid());
        return SHMKEY_EACCESS;
    }
found:
    if ((size_t)snprintf(out, cap, "%s/shmkey-%s.sock", dir, name) >= cap)
        return SHMKEY_EINVAL;
    return SHMKEY_OK;
}

static int sk_open_client(struct sk_oracle *o, struct shmkey_client **out,
                          char *why, size_t whylen)
{
    char id[SK_NAME_MAX + 16], path[256];
    int rc = SHMKEY_EUNAVAIL;
    snprintf(id, sizeof(id), "shmkey-%s", o->name);
    if (o->transport != SHMKEY_TRANSPORT_SOCKET) {
        rc = shmkey_client_open_shm(id, out);
        if (rc == SHMKEY_EACCESS)
            snprintf(why, whylen, "uid %u gid %u may not open /dev/shm/%s; start the "
                     "oracle with --group naming a group of this process",
                     (unsigned)getuid(), (unsigned)getgid(), id);
        /* "any" falls back to the socket only when there is no ring at all. */
        if (rc != SHMKEY_EUNAVAIL || o->transport == SHMKEY_TRANSPORT_SHM)
            return rc;
    }
    rc = sk_socket_path(o->name, path, sizeof(path), why, whylen);
    if (rc != SHMKEY_OK)
        return rc;
    return shmkey_client_open_socket(path, -1, SHMKEY_MAX_SLOT_SIZE, out);
}

static int sk_parse_rsa_spki(const unsigned char *der, long len, BIGNUM **n, BIGNUM **e);

/* The oracle must hold the key the reference describes: ask it once per connection. */
static int sk_check_pubkey(struct sk_provctx *pc, struct sk_oracle *o,
                           struct shmkey_client *client, char *why, size_t whylen)
{
    struct shmkey_req req = {.op = SHMKEY_OP_PUBKEY};
    struct shmkey_resp resp;
    uint8_t der[SK_REPLY_MAX];
    BIGNUM *n = NULL, *e = NULL;
    memcpy(req.key_id, o->key_id, sizeof(req.key_id));
    int rc = shmkey_call(client, &req, NULL, der, sizeof(der), &resp, pc->timeout_ms);
    if (rc != SHMKEY_OK)
        return rc;
    if (resp.status == SHMKEY_ENOKEY) {
        snprintf(why, whylen, "oracle '%s' does not hold this key; run 'shmkey keyref' again",
                 o->name);
        return -SK_R_KEY_MISMATCH;
    }
    if (resp.status != SHMKEY_OK)
        return resp.status;
    if (!sk_parse_rsa_spki(der, resp.out_len, &n, &e))
        return SHMKEY_EPROTO;
    rc = (BN_cmp(n, o->n) == 0 && BN_cmp(e, o->e) == 0) ? SHMKEY_OK : -SK_R_KEY_MISMATCH;
    if (rc != SHMKEY_OK)
        snprintf(why, whylen, "oracle '%s' holds an RSA-%d key; run 'shmkey keyref' again",
                 o->name, BN_num_bits(n));
    BN_free(n);
    BN_free(e);
    return rc;
}

/*
 * A referenced connection to o, opened if there is none. *fresh says whether
 * it was opened just now. Opening happens outside the lock, so a slow or
 * missing oracle never blocks calls to other oracles.
 */
static int sk_conn_get(struct sk_provctx *pc, struct sk_oracle *o, struct sk_conn **out,
                       int *fresh, char *why, size_t whylen)
{
    struct sk_conn *c, *stale = NULL;
    struct shmkey_client *client = NULL;
    pid_t me = getpid();

    pthread_mutex_lock(&pc->lock);
    if (o->conn && o->conn->pid != me) {
        /* Forked: the parent's connection is not ours to use (nor to close). */
        stale = o->conn;
        o->conn = NULL;
    }
    if ((c = o->conn) != NULL)
        c->refs++;
    pthread_mutex_unlock(&pc->lock);
    if (stale)
        free(stale);
    if (c) {
        *out = c;
        *fresh = 0;
        return SHMKEY_OK;
    }

    int rc = sk_open_client(o, &client, why, whylen);
    if (rc == SHMKEY_OK)
        rc = sk_check_pubkey(pc, o, client, why, whylen);
    if (rc != SHMKEY_OK) {
        shmkey_client_close(client);
        return rc;
    }
    if ((c = calloc(1, sizeof(*c))) == NULL) {
        shmkey_client_close(client);
        return SHMKEY_ESYSTEM;
    }
    c->client = client;
    c->pid = me;
    c->refs = 2;                /* the oracle entry's and the caller's */
    pthread_mutex_lock(&pc->lock);
    if (o->conn) {
        /* Another thread got there first: use its connection. */
        struct sk_conn *theirs = o->conn;
        theirs->refs++;
        pthread_mutex_unlock(&pc->lock);
        shmkey_client_close(client);
        free(c);
        *out = theirs;
        *fresh = 0;
        return SHMKEY_OK;
    }
    o->conn = c;
    pthread_mutex_unlock(&pc->lock);
    *out = c;
    *fresh = 1;
    return SHMKEY_OK;
}

/* Return a connection; a dead one is also unhooked, so the next call reopens. */
static void sk_conn_put(struct sk_provctx *pc, struct sk_oracle *o, struct sk_conn *c, int dead)
{
    struct sk_conn *last;
    pthread_mutex_lock(&pc->lock);
    if (dead && o->conn == c) {
        o->conn = NULL;
        c->refs--;              /* the entry's; ours keeps it above zero */
    }
    last = sk_conn_unref_locked(c);
    pthread_mutex_unlock(&pc->lock);
    sk_conn_close(last);
}

/* Keep an oracle's reason printable: it ends up in logs. */
static void sk_reason_copy(char *dst, size_t cap, const uint8_t *src, uint32_t len)
{
    size_t j = 0;
    for (uint32_t i = 0; i < len && j + 1 < cap; i++)
        dst[j++] = (src[i] >= 0x20 && src[i] < 0x7f) ? (char)src[i] : '?';
    dst[j] = '\0';
}

/*
 * One request to k's oracle; out receives the reply (at most cap bytes).
 * A connection that turns out dead is dropped and the request tried once
 * more on a new one: the oracle may have been restarted. Returns 1, or 0
 * with an OpenSSL error queued.
 */
static int sk_oracle_call(const struct sk_key *k, uint32_t op, const uint32_t p[4],
                          const uint8_t *in, uint32_t in_len,
                          uint8_t *out, uint32_t cap, uint32_t *out_len)
{
    struct sk_provctx *pc = k->pc;
    struct sk_oracle *o = k->oracle;
    struct shmkey_req req = {.op = op, .in_len = in_len};
    struct shmkey_resp resp = {0, 0};
    char why[256] = "";
    int rc;

    if (!o) {
        SK_RAISE(pc, SK_R_PUBLIC_ONLY, "");
        return 0;
    }
    sk_last_error[0] = '\0';
    memcpy(req.key_id, o->key_id, sizeof(req.key_id));
    memcpy(req.p, p, sizeof(req.p));
    for (int attempt = 0;; attempt++) {
        struct sk_conn *c;
        int fresh;
        rc = sk_conn_get(pc, o, &c, &fresh, why, sizeof(why));
        if (rc != SHMKEY_OK)
            break;
        rc = shmkey_call(c->client, &req, in, out, cap, &resp, pc->timeout_ms);
        int dead = (rc == SHMKEY_EUNAVAIL);
        sk_conn_put(pc, o, c, dead);
        if (!(dead && !fresh && attempt == 0))
            break;
    }
    if (rc == SHMKEY_OK && resp.status != SHMKEY_OK) {
        rc = resp.status;
        sk_reason_copy(why, sizeof(why), out, resp.out_len < cap ? resp.out_len : cap);
    }
    if (rc != SHMKEY_OK) {
        int reason = (rc <= SHMKEY_EINVAL && rc >= SHMKEY_EACCESS) ? -rc
                     : rc == -SK_R_KEY_MISMATCH ? SK_R_KEY_MISMATCH : -SHMKEY_EPROTO;
        SK_FAIL(pc, reason, "oracle '%s'%s%s", o->name, why[0] ? ": " : "", why);
        return 0;
    }
    *out_len = resp.out_len;
    return 1;
}

/* ===================================================================== */
/* keys                                                                  */
/* ===================================================================== */

static struct sk_key *sk_key_new(struct sk_provctx *pc)
{
    struct sk_key *k = calloc(1, sizeof(*k));
    if (k) {
        k->pc = pc;
        k->refs = 1;
    }
    return k;
}

static void sk_key_ref(struct sk_key *k)
{
    __atomic_add_fetch(&k->refs, 1, __ATOMIC_RELAXED);
}

static void sk_key_free(struct sk_key *k)
{
    if (!k || __atomic_sub_fetch(&k->refs, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    sk_oracle_put(k->pc, k->oracle);
    BN_free(k->n);
    BN_free(k->e);
    free(k);
}

/* Take ownership of n and e; checks what a public RSA key must satisfy. */
static int sk_key_set_public(struct sk_key *k, BIGNUM *n, BIGNUM *e)
{
    int bits = BN_num_bits(n);
    if (BN_is_negative(n) || BN_is_negative(e) || !BN_is_odd(n) || !BN_is_odd(e) ||
        bits < 1024 || bits > 16384 || BN_num_bits(e) < 2 || BN_cmp(e, n) >= 0) {
        BN_free(n);
        BN_free(e);
        return 0;
    }
    BN_free(k->n);
    BN_free(k->e);
    k->n = n;
    k->e = e;
    k->bits = bits;
    k->bytes = (uint32_t)BN_num_bytes(n);
    return 1;
}

/* An RSA SubjectPublicKeyInfo -> n, e (caller frees). */
static int sk_rsa_from_spki(const SK_SPKI *spki, BIGNUM **n, BIGNUM **e)
{
    const X509_ALGOR *alg = spki->algorithm;
    const unsigned char *q = spki->public_key->data;
    long qlen = spki->public_key->length;
    SK_RSAPUB *pub;
    if (OBJ_obj2nid(alg->algorithm) != NID_rsaEncryption ||
        (alg->parameter != NULL && ASN1_TYPE_get(alg->parameter) != V_ASN1_NULL))
        return 0;
    pub = (SK_RSAPUB *)ASN1_item_d2i(NULL, &q, qlen, ASN1_ITEM_rptr(SK_RSAPUB));
    if (!pub || q != spki->public_key->data + qlen) {
        ASN1_item_free((ASN1_VALUE *)pub, ASN1_ITEM_rptr(SK_RSAPUB));
        return 0;
    }
    *n = pub->n;
    *e = pub->e;
    pub->n = pub->e = NULL;
    ASN1_item_free((ASN1_VALUE *)pub, ASN1_ITEM_rptr(SK_RSAPUB));
    return 1;
}

/* SubjectPublicKeyInfo DER of an RSA key -> n, e. */
static int sk_parse_rsa_spki(const unsigned char *der, long len, BIGNUM **n, BIGNUM **e)
{
    const unsigned char *p = der;
    SK_SPKI *spki;
    int ok;
    ERR_set_mark();
    spki = (SK_SPKI *)ASN1_item_d2i(NULL, &p, len, ASN1_ITEM_rptr(SK_SPKI));
    ok = spki && p == der + len && sk_rsa_from_spki(spki, n, e);
    ERR_pop_to_mark();
    ASN1_item_free((ASN1_VALUE *)spki, ASN1_ITEM_rptr(SK_SPKI));
    return ok;
}

/*
 * A key from a parsed reference. Returns NULL with an error queued when the
 * reference is ours but unusable (newer version, bad name, not RSA).
 */
static struct sk_key *sk_key_from_ref(struct sk_provctx *pc, const SK_REF *ref)
{
    long version = ASN1_INTEGER_get(ref->version);
    long transport = ASN1_INTEGER_get(ref->transport);

    char name[SK_NAME_MAX + 1];
    BIGNUM *n = NULL, *e = NULL;
    struct sk_key *k;

    if (version != SHMKEY_KEYREF_VERSION) {
        SK_FAIL(pc, SK_R_BAD_REFERENCE, "version %ld; this shmkey reads version %d",
                 version, SHMKEY_KEYREF_VERSION);
        return NULL;
    }
    int len = ASN1_STRING_length(ref->oracle);
    if (len <= 0 || len > SK_NAME_MAX) {
        SK_FAIL(pc, SK_R_BAD_REFERENCE, "bad oracle name");
        return NULL;
    }
    memcpy(name, ASN1_STRING_get0_data(ref->oracle), (size_t)len);
    name[len] = '\0';
    if (strlen(name) != (size_t)len || !sk_valid_name(name)) {
        SK_FAIL(pc, SK_R_BAD_REFERENCE, "bad oracle name");
        return NULL;
    }
    if (transport != SHMKEY_TRANSPORT_ANY && transport != SHMKEY_TRANSPORT_SHM &&
        transport != SHMKEY_TRANSPORT_SOCKET) {
        SK_FAIL(pc, SK_R_BAD_REFERENCE, "unknown transport %ld", transport);
        return NULL;
    }
    if (ASN1_STRING_length(ref->key_id) != 32) {
        SK_FAIL(pc, SK_R_BAD_REFERENCE, "bad key id");
        return NULL;
    }
    if (!sk_rsa_from_spki(ref->spki, &n, &e)) {
        SK_FAIL(pc, SK_R_BAD_REFERENCE, "the public key is not an RSA key");
        return NULL;
    }
    if ((k = sk_key_new(pc)) == NULL) {
        BN_free(n);
        BN_free(e);
        return NULL;
    }
    if (!sk_key_set_public(k, n, e)) {
        SK_FAIL(pc, SK_R_BAD_REFERENCE, "implausible RSA public key");
        sk_key_free(k);
        return NULL;
    }
    k->oracle = sk_oracle_get(pc, name, (int)transport, ASN1_STRING_get0_data(ref->key_id),
                              k->n, k->e);
    if (!k->oracle) {
        sk_key_free(k);
        return NULL;
    }
    return k;
}

/* ===================================================================== */
/* keymgmt                                                               */
/* ===================================================================== */

static OSSL_FUNC_keymgmt_new_fn km_new;
static OSSL_FUNC_keymgmt_free_fn km_free;
static OSSL_FUNC_keymgmt_load_fn km_load;
static OSSL_FUNC_keymgmt_dup_fn km_dup;
static OSSL_FUNC_keymgmt_has_fn km_has;
static OSSL_FUNC_keymgmt_match_fn km_match;
static OSSL_FUNC_keymgmt_import_fn km_import;
static OSSL_FUNC_keymgmt_import_types_fn km_import_types;
static OSSL_FUNC_keymgmt_export_fn km_export;
static OSSL_FUNC_keymgmt_export_types_fn km_export_types;
static OSSL_FUNC_keymgmt_get_params_fn km_get_params;
static OSSL_FUNC_keymgmt_gettable_params_fn km_gettable_params;
static OSSL_FUNC_keymgmt_query_operation_name_fn km_query_operation_name;

/* An empty key, filled by import: OpenSSL's way to compare a cert with us. */
static void *km_new(void *provctx)
{
    return sk_key_new(provctx);
}

static void km_free(void *keydata)
{
    sk_key_free(keydata);
}

/* The decoder hands over its key by reference; take it. */
static void *km_load(const void *reference, size_t reference_sz)
{
    struct sk_key *k;
    if (reference == NULL || reference_sz != sizeof(k))
        return NULL;
    k = *(struct sk_key **)reference;
    *(struct sk_key **)reference = NULL;
    return k;
}

static void *km_dup(const void *keydata_from, int selection)
{
    const struct sk_key *src = keydata_from;
    struct sk_key *k = sk_key_new(src->pc);
    if (!k)
        return NULL;
    if (src->n && !sk_key_set_public(k, BN_dup(src->n), BN_dup(src->e))) {
        sk_key_free(k);
        return NULL;
    }
    if (src->oracle && (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY)) {
        pthread_mutex_lock(&src->pc->lock);
        src->oracle->users++;
        pthread_mutex_unlock(&src->pc->lock);
        k->oracle = src->oracle;
    }
    return k;
}

/* "Private" means: an oracle does it for us. */
static int km_has(const void *keydata, int selection)
{
    const struct sk_key *k = keydata;
    int ok = 1;
    if (!k)
        return 0;
    if (selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY)
        ok = ok && k->n != NULL;
    if (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY)
        ok = ok && k->oracle != NULL;
    return ok;
}

/* The public key identifies the private one; that is all there is to compare. */
static int km_match(const void *keydata1, const void *keydata2, int selection)
{
    const struct sk_key *a = keydata1, *b = keydata2;
    if (!(selection & OSSL_KEYMGMT_SELECT_KEYPAIR))
        return 1;
    return a->n && b->n && BN_cmp(a->n, b->n) == 0 && BN_cmp(a->e, b->e) == 0;
}

static const char *const sk_private_params[] = {
    OSSL_PKEY_PARAM_RSA_D, OSSL_PKEY_PARAM_RSA_FACTOR1, OSSL_PKEY_PARAM_RSA_FACTOR2,
    OSSL_PKEY_PARAM_RSA_EXPONENT1, OSSL_PKEY_PARAM_RSA_EXPONENT2,
    OSSL_PKEY_PARAM_RSA_COEFFICIENT1, NULL,
};

/*
 * Public parts only. A private key must never land in this process through
 * us, so an import that carries any is refused outright.
 */
static int km_import(void *keydata, int selection, const OSSL_PARAM params[])
{
    struct sk_key *k = keydata;
    BIGNUM *n = NULL, *e = NULL;
    const OSSL_PARAM *pn, *pe;
    if (!k || k->n)
        return 0;
    for (const char *const *name = sk_private_params; *name; name++)
        if (OSSL_PARAM_locate_const(params, *name))
            return 0;
    if (!(selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY))
        return 0;
    pn = OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_RSA_N);
    pe = OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_RSA_E);
    if (!pn || !pe || !OSSL_PARAM_get_BN(pn, &n) || !OSSL_PARAM_get_BN(pe, &e)) {
        BN_free(n);
        BN_free(e);
        return 0;
    }
    return sk_key_set_public(k, n, e);
}

static const OSSL_PARAM sk_public_types[] = {
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_N, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_E, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *km_import_types(int selection)
{
    return (selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY) ? sk_public_types : NULL;
}

/*
 * Only the public half, and only when that is all that is asked for. When
 * OpenSSL asks for the private half, it is about to try another provider's
 * RSA with our key; refusing sends it back to our own signature.
 */
static int km_export(void *keydata, int selection, OSSL_CALLBACK *cb, void *cbarg)
{
    struct sk_key *k = keydata;
    OSSL_PARAM_BLD *bld;
    OSSL_PARAM *params;
    int ok;
    if (!k || !k->n || (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) ||
        !(selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY))
        return 0;
    if ((bld = OSSL_PARAM_BLD_new()) == NULL)
        return 0;
    ok = OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, k->n) &&
         OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, k->e) &&
         (params = OSSL_PARAM_BLD_to_param(bld)) != NULL;
    OSSL_PARAM_BLD_free(bld);
    if (!ok)
        return 0;
    ok = cb(params, cbarg);
    OSSL_PARAM_free(params);
    return ok;
}

static const OSSL_PARAM *km_export_types(int selection)
{
    return km_import_types(selection);
}

static int km_get_params(void *keydata, OSSL_PARAM params[])
{
    struct sk_key *k = keydata;
    OSSL_PARAM *p;
    if (!k || !k->n)
        return 0;
    if ((p = OSSL_PARAM_locate(params, OSSL_PKEY_PARAM_BITS)) && !OSSL_PARAM_set_int(p, k->bits))
        return 0;
    if ((p = OSSL_PARAM_locate(params, OSSL_PKEY_PARAM_SECURITY_BITS)) &&
        !OSSL_PARAM_set_int(p, BN_security_bits(k->bits, -1)))
        return 0;
    if ((p = OSSL_PARAM_locate(params, OSSL_PKEY_PARAM_MAX_SIZE)) &&
        !OSSL_PARAM_set_int(p, (int)k->bytes))
        return 0;
    if ((p = OSSL_PARAM_locate(params, OSSL_PKEY_PARAM_DEFAULT_DIGEST)) &&
        !OSSL_PARAM_set_utf8_string(p, "SHA256"))
        return 0;
    if ((p = OSSL_PARAM_locate(params, OSSL_PKEY_PARAM_RSA_N)) && !OSSL_PARAM_set_BN(p, k->n))
        return 0;
    if ((p = OSSL_PARAM_locate(params, OSSL_PKEY_PARAM_RSA_E)) && !OSSL_PARAM_set_BN(p, k->e))
        return 0;
    return 1;
}

static const OSSL_PARAM *km_gettable_params(void *provctx)
{
    static const OSSL_PARAM gettable[] = {
        OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, NULL),
        OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, NULL),
        OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, NULL),
        OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_DEFAULT_DIGEST, NULL, 0),
        OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_N, NULL, 0),
        OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_E, NULL, 0),
        OSSL_PARAM_END,
    };
    return gettable;
}

static const char *km_query_operation_name(int operation_id)
{
    switch (operation_id) {
    case OSSL_OP_SIGNATURE: return SK_SIG_NAME;
    case OSSL_OP_ASYM_CIPHER: return SK_ENC_NAME;
    default: return NULL;
    }
}

static const OSSL_DISPATCH sk_keymgmt_functions[] = {
    {OSSL_FUNC_KEYMGMT_NEW, (void (*)(void))km_new},
    {OSSL_FUNC_KEYMGMT_FREE, (void (*)(void))km_free},
    {OSSL_FUNC_KEYMGMT_LOAD, (void (*)(void))km_load},
    {OSSL_FUNC_KEYMGMT_DUP, (void (*)(void))km_dup},
    {OSSL_FUNC_KEYMGMT_HAS, (void (*)(void))km_has},
    {OSSL_FUNC_KEYMGMT_MATCH, (void (*)(void))km_match},
    {OSSL_FUNC_KEYMGMT_IMPORT, (void (*)(void))km_import},
    {OSSL_FUNC_KEYMGMT_IMPORT_TYPES, (void (*)(void))km_import_types},
    {OSSL_FUNC_KEYMGMT_EXPORT, (void (*)(void))km_export},
    {OSSL_FUNC_KEYMGMT_EXPORT_TYPES, (void (*)(void))km_export_types},
    {OSSL_FUNC_KEYMGMT_GET_PARAMS, (void (*)(void))km_get_params},
    {OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, (void (*)(void))km_gettable_params},
    {OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME, (void (*)(void))km_query_operation_name},
    {0, NULL},
};

/* ===================================================================== */
/* digests and parameters shared by signing and decryption                */
/* ===================================================================== */

/* The wire code of a digest (shmkey.h SHMKEY_HASH_*), 0 if the oracle has none. */
static uint32_t sk_md_code(const EVP_MD *md)
{
    if (EVP_MD_is_a(md, "SHA2-256"))
        return SHMKEY_HASH_SHA256;
    if (EVP_MD_is_a(md, "SHA2-384"))
        return SHMKEY_HASH_SHA384;
    if (EVP_MD_is_a(md, "SHA2-512"))
        return SHMKEY_HASH_SHA512;
    if (EVP_MD_is_a(md, "SHA1"))
        return SHMKEY_HASH_SHA1;
    return 0;
}

static uint32_t sk_md_code_by_name(struct sk_provctx *pc, const char *name, const char *propq)
{
    EVP_MD *md = EVP_MD_fetch(pc->libctx, name, propq);
    uint32_t code = md ? sk_md_code(md) : 0;
    EVP_MD_free(md);
    return code;
}

static int sk_get_utf8(const OSSL_PARAM *p, char *buf, size_t cap)
{
    return OSSL_PARAM_get_utf8_string(p, &buf, cap);
}

/* A digest parameter (OAEP, MGF1) -> its wire code; what names it in errors. */
static int sk_get_md_param(struct sk_provctx *pc, const OSSL_PARAM *p, const char *propq,
                           const char *what, uint32_t *code)
{
    char name[64];
    if (!sk_get_utf8(p, name, sizeof(name)) ||
        (*code = sk_md_code_by_name(pc, name, propq)) == 0) {
        SK_RAISE(pc, SK_R_UNSUPPORTED_PARAM, "%s digest", what);
        return 0;
    }
    return 1;
}

/* A padding mode given as OpenSSL's number or as its name. */
static int sk_get_pad_mode(const OSSL_PARAM *p, int *pad)
{
    static const struct { const char *name; int mode; } names[] = {
        {OSSL_PKEY_RSA_PAD_MODE_PKCSV15, RSA_PKCS1_PADDING},
        {OSSL_PKEY_RSA_PAD_MODE_OAEP, RSA_PKCS1_OAEP_PADDING},
        {OSSL_PKEY_RSA_PAD_MODE_PSS, RSA_PKCS1_PSS_PADDING},
    };
    char name[32];
    if (p->data_type == OSSL_PARAM_INTEGER || p->data_type == OSSL_PARAM_UNSIGNED_INTEGER)
        return OSSL_PARAM_get_int(p, pad);
    if (!sk_get_utf8(p, name, sizeof(name)))
        return 0;
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (strcmp(name, names[i].name) == 0) {
            *pad = names[i].mode;
            return 1;
        }
    return 0;
}

/* ===================================================================== */
/* signature                                                             */
/* ===================================================================== */

struct sk_sig {
    struct sk_provctx *pc;
    char *propq;
    struct sk_key *key;
    int pad;                    /* RSA_PKCS1_PADDING or RSA_PKCS1_PSS_PADDING */
    EVP_MD *md;                 /* NULL until set; sign() may infer it */
    uint32_t md_code;
    uint32_t mgf1_code;         /* 0: same as md */
    int saltlen;                /* >= 0 or RSA_PSS_SALTLEN_DIGEST/_MAX/_AUTO */
    EVP_MD_CTX *mdctx;          /* digest-sign: the running hash */
};

static OSSL_FUNC_signature_newctx_fn sig_newctx;
static OSSL_FUNC_signature_freectx_fn sig_freectx;
static OSSL_FUNC_signature_dupctx_fn sig_dupctx;
static OSSL_FUNC_signature_sign_init_fn sig_sign_init;
static OSSL_FUNC_signature_sign_fn sig_sign;
static OSSL_FUNC_signature_digest_sign_init_fn sig_digest_sign_init;
static OSSL_FUNC_signature_digest_sign_update_fn sig_digest_sign_update;
static OSSL_FUNC_signature_digest_sign_final_fn sig_digest_sign_final;
static OSSL_FUNC_signature_digest_sign_fn sig_digest_sign;
static OSSL_FUNC_signature_get_ctx_params_fn sig_get_ctx_params;
static OSSL_FUNC_signature_gettable_ctx_params_fn sig_gettable_ctx_params;
static OSSL_FUNC_signature_set_ctx_params_fn sig_set_ctx_params;
static OSSL_FUNC_signature_settable_ctx_params_fn sig_settable_ctx_params;

static void *sig_newctx(void *provctx, const char *propq)
{
    struct sk_sig *ctx = calloc(1, sizeof(*ctx));
    if (!ctx)
        return NULL;
    ctx->pc = provctx;
    ctx->pad = RSA_PKCS1_PADDING;
    ctx->saltlen = RSA_PSS_SALTLEN_AUTO;
    if (propq && (ctx->propq = strdup(propq)) == NULL) {
        free(ctx);
        return NULL;
    }
    return ctx;
}

static void sig_freectx(void *vctx)
{
    struct sk_sig *ctx = vctx;
    if (!ctx)
        return;
    EVP_MD_CTX_free(ctx->mdctx);
    EVP_MD_free(ctx->md);
    sk_key_free(ctx->key);
    free(ctx->propq);
    free(ctx);
}

/* libssl duplicates the context before the final step: the hash state too. */
static void *sig_dupctx(void *vctx)
{
    const struct sk_sig *src = vctx;
    struct sk_sig *ctx = calloc(1, sizeof(*ctx));
    if (!ctx)
        return NULL;
    *ctx = *src;
    ctx->propq = NULL;
    ctx->mdctx = NULL;
    if (ctx->key)
        sk_key_ref(ctx->key);
    if (ctx->md && !EVP_MD_up_ref(ctx->md))
        ctx->md = NULL;
    if ((src->propq && (ctx->propq = strdup(src->propq)) == NULL) || (src->md && !ctx->md) ||
        (src->mdctx && ((ctx->mdctx = EVP_MD_CTX_new()) == NULL ||
                        !EVP_MD_CTX_copy_ex(ctx->mdctx, src->mdctx)))) {
        sig_freectx(ctx);
        return NULL;
    }
    return ctx;
}

/* Only digests the oracle signs with: the trial inits libssl makes per sigalg
 * thereby rule out the rest before any handshake depends on them. */
static int sig_set_md(struct sk_sig *ctx, const char *name, const char *props)
{
    EVP_MD *md = EVP_MD_fetch(ctx->pc->libctx, name, props ? props : ctx->propq);
    uint32_t code = md ? sk_md_code(md) : 0;
    if (code != SHMKEY_HASH_SHA256 && code != SHMKEY_HASH_SHA384 && code != SHMKEY_HASH_SHA512) {
        EVP_MD_free(md);
        SK_RAISE(ctx->pc, SK_R_UNSUPPORTED_PARAM, "digest %s; the oracle signs with "
                 "SHA-256, SHA-384 or SHA-512", name);
        return 0;
    }
    EVP_MD_free(ctx->md);
    ctx->md = md;
    ctx->md_code = code;
    if (ctx->mdctx && !EVP_DigestInit_ex2(ctx->mdctx, md, NULL))
        return 0;
    return 1;
}

static int sig_init(struct sk_sig *ctx, void *provkey, const OSSL_PARAM params[])
{
    struct sk_key *k = provkey;
    if (k) {
        if (!k->oracle) {
            SK_RAISE(ctx->pc, SK_R_PUBLIC_ONLY, "");
            return 0;
        }
        sk_key_ref(k);
        sk_key_free(ctx->key);
        ctx->key = k;
    }
    if (!ctx->key)
        return 0;
    ctx->pad = RSA_PKCS1_PADDING;
    ctx->saltlen = RSA_PSS_SALTLEN_AUTO;
    ctx->mgf1_code = 0;
    return sig_set_ctx_params(ctx, params);
}

static int sig_sign_init(void *vctx, void *provkey, const OSSL_PARAM params[])
{
    struct sk_sig *ctx = vctx;
    EVP_MD_CTX_free(ctx->mdctx);
    ctx->mdctx = NULL;
    return sig_init(ctx, provkey, params);
}

/* No oracle contact here: libssl calls this as a trial for every sigalg. */
static int sig_digest_sign_init(void *vctx, const char *mdname, void *provkey,
                                const OSSL_PARAM params[])
{
    struct sk_sig *ctx = vctx;
    if (!ctx->mdctx && (ctx->mdctx = EVP_MD_CTX_new()) == NULL)
        return 0;
    if (!sig_set_md(ctx, mdname ? mdname : "SHA256", NULL))
        return 0;
    return sig_init(ctx, provkey, params);
}

static int sig_digest_sign_update(void *vctx, const unsigned char *data, size_t datalen)
{
    struct sk_sig *ctx = vctx;
    return ctx->mdctx && EVP_DigestUpdate(ctx->mdctx, data, datalen);
}

/* PSS salt length for this key and digest, or -1 if it cannot fit. */
static int sig_salt(const struct sk_sig *ctx, size_t md_size)
{
    int max = (ctx->key->bits - 1 + 7) / 8 - (int)md_size - 2;
    int salt = ctx->saltlen;
    if (salt == RSA_PSS_SALTLEN_DIGEST)
        salt = (int)md_size;
    else if (salt == RSA_PSS_SALTLEN_MAX || salt == RSA_PSS_SALTLEN_AUTO)
        salt = max;         /* what OpenSSL's own RSA does when signing */
    return (salt >= 0 && salt <= max) ? salt : -1;
}

/* Sign a digest in the oracle; the signature is exactly the modulus size. */
static int sig_sign_digest(struct sk_sig *ctx, const unsigned char *dgst, size_t dlen,
                           unsigned char *sig, size_t *siglen, size_t sigsize)
{
    struct sk_key *k = ctx->key;
    uint8_t reply[SK_REPLY_MAX];
    uint32_t p[4] = {SHMKEY_PAD_PKCS1V15, ctx->md_code, 0, 0};
    uint32_t got;
    if ((size_t)EVP_MD_get_size(ctx->md) != dlen) {
        SK_RAISE(ctx->pc, SK_R_UNSUPPORTED_PARAM, "digest is %zu bytes; %s needs %d",
                 dlen, EVP_MD_get0_name(ctx->md), EVP_MD_get_size(ctx->md));
        return 0;
    }
    if (sigsize < k->bytes) {
        SK_RAISE(ctx->pc, SK_R_BUFFER_TOO_SMALL, "%zu bytes for a %u-byte signature",
                 sigsize, k->bytes);
        return 0;
    }
    if (ctx->pad == RSA_PKCS1_PSS_PADDING) {
        int salt = sig_salt(ctx, dlen);
        if (salt < 0) {
            SK_RAISE(ctx->pc, SK_R_UNSUPPORTED_PARAM, "PSS salt length %d", ctx->saltlen);
            return 0;
        }
        p[0] = SHMKEY_PAD_PSS;
        p[2] = ctx->mgf1_code ? ctx->mgf1_code : ctx->md_code;
        p[3] = (uint32_t)salt;
    }
    if (!sk_oracle_call(k, SHMKEY_OP_SIGN, p, dgst, (uint32_t)dlen, reply, sizeof(reply), &got))
        return 0;
    if (got != k->bytes) {
        SK_RAISE(ctx->pc, -SHMKEY_EPROTO, "oracle '%s' sent a %u-byte signature",
                 k->oracle->name, got);
        return 0;
    }
    memcpy(sig, reply, got);
    *siglen = got;
    return 1;
}

static int sig_digest_sign_final(void *vctx, unsigned char *sig, size_t *siglen, size_t sigsize)
{
    struct sk_sig *ctx = vctx;
    unsigned char dgst[EVP_MAX_MD_SIZE];
    unsigned int dlen = 0;
    if (!ctx->key || !ctx->mdctx)
        return 0;
    if (sig == NULL) {
        *siglen = ctx->key->bytes;
        return 1;
    }
    if (!EVP_DigestFinal_ex(ctx->mdctx, dgst, &dlen))
        return 0;
    return sig_sign_digest(ctx, dgst, dlen, sig, siglen, sigsize);
}

static int sig_digest_sign(void *vctx, unsigned char *sig, size_t *siglen, size_t sigsize,
                           const unsigned char *tbs, size_t tbslen)
{
    struct sk_sig *ctx = vctx;
    unsigned char dgst[EVP_MAX_MD_SIZE];
    unsigned int dlen = 0;
    if (!ctx->key || !ctx->md)
        return 0;
    if (sig == NULL) {
        *siglen = ctx->key->bytes;
        return 1;
    }
    if (!EVP_Digest(tbs, tbslen, dgst, &dlen, ctx->md, NULL))
        return 0;
    return sig_sign_digest(ctx, dgst, dlen, sig, siglen, sigsize);
}

/* EVP_PKEY_sign: tbs is already a digest; its length names the hash if unset. */
static int sig_sign(void *vctx, unsigned char *sig, size_t *siglen, size_t sigsize,
                    const unsigned char *tbs, size_t tbslen)
{
    struct sk_sig *ctx = vctx;
    if (!ctx->key)
        return 0;
    if (sig == NULL) {
        *siglen = ctx->key->bytes;
        return 1;
    }
    if (!ctx->md) {
        const char *name = tbslen == 32 ? "SHA256" : tbslen == 48 ? "SHA384"
                         : tbslen == 64 ? "SHA512" : "(none)";
        if (!sig_set_md(ctx, name, NULL))
            return 0;
    }
    return sig_sign_digest(ctx, tbs, tbslen, sig, siglen, sigsize);
}

static int sig_set_ctx_params(void *vctx, const OSSL_PARAM params[])
{
    struct sk_sig *ctx = vctx;
    const OSSL_PARAM *p;
    char name[64], props[256];
    if (params == NULL)
        return 1;
    if ((p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_DIGEST)) != NULL) {
        const OSSL_PARAM *pp = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_PROPERTIES);
        if (!sk_get_utf8(p, name, sizeof(name)) ||
            (pp && !sk_get_utf8(pp, props, sizeof(props))) ||
            !sig_set_md(ctx, name, pp ? props : NULL))
            return 0;
    }
    if ((p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_PAD_MODE)) != NULL) {
        int pad;
        if (!sk_get_pad_mode(p, &pad) || (pad != RSA_PKCS1_PADDING && pad != RSA_PKCS1_PSS_PADDING)) {
            SK_RAISE(ctx->pc, SK_R_UNSUPPORTED_PARAM, "signature padding; use PKCS#1 v1.5 or PSS");
            return 0;
        }
        ctx->pad = pad;
    }
    if ((p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_PSS_SALTLEN)) != NULL) {
        int salt;
        if (p->data_type == OSSL_PARAM_UTF8_STRING) {
            if (!sk_get_utf8(p, name, sizeof(name)))
                return 0;
            if (strcmp(name, OSSL_PKEY_RSA_PSS_SALT_LEN_DIGEST) == 0)
                salt = RSA_PSS_SALTLEN_DIGEST;
            else if (strcmp(name, OSSL_PKEY_RSA_PSS_SALT_LEN_MAX) == 0)
                salt = RSA_PSS_SALTLEN_MAX;
            else if (strcmp(name, OSSL_PKEY_RSA_PSS_SALT_LEN_AUTO) == 0)
                salt = RSA_PSS_SALTLEN_AUTO;
            else
                salt = atoi(name);
        } else if (!OSSL_PARAM_get_int(p, &salt)) {
            return 0;
        }
        if (salt < RSA_PSS_SALTLEN_MAX)
            return 0;
        ctx->saltlen = salt;
    }
    if ((p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_MGF1_DIGEST)) != NULL &&
        !sk_get_md_param(ctx->pc, p, ctx->propq, "MGF1", &ctx->mgf1_code))
        return 0;
    return 1;
}

static const OSSL_PARAM *sig_settable_ctx_params(void *vctx, void *provctx)
{
    static const OSSL_PARAM settable[] = {
        OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, NULL, 0),
        OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PROPERTIES, NULL, 0),
        OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PAD_MODE, NULL, 0),
        OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PSS_SALTLEN, NULL, 0),
        OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_MGF1_DIGEST, NULL, 0),
        OSSL_PARAM_END,
    };
    return settable;
}

static int sig_get_ctx_params(void *vctx, OSSL_PARAM params[])
{
    struct sk_sig *ctx = vctx;
    OSSL_PARAM *p;
    if ((p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_DIGEST)) != NULL &&
        !OSSL_PARAM_set_utf8_string(p, ctx->md ? EVP_MD_get0_name(ctx->md) : ""))
        return 0;
    if ((p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_PAD_MODE)) != NULL) {
        int ok = p->data_type == OSSL_PARAM_INTEGER
                 ? OSSL_PARAM_set_int(p, ctx->pad)
                 : OSSL_PARAM_set_utf8_string(p, ctx->pad == RSA_PKCS1_PSS_PADDING
                                                 ? OSSL_PKEY_RSA_PAD_MODE_PSS
                                                 : OSSL_PKEY_RSA_PAD_MODE_PKCSV15);
        if (!ok)
            return 0;
    }
    if ((p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_PSS_SALTLEN)) != NULL &&
        p->data_type == OSSL_PARAM_INTEGER && !OSSL_PARAM_set_int(p, ctx->saltlen))
        return 0;
    return 1;
}

static const OSSL_PARAM *sig_gettable_ctx_params(void *vctx, void *provctx)
{
    static const OSSL_PARAM gettable[] = {
        OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, NULL, 0),
        OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PAD_MODE, NULL, 0),
        OSSL_PARAM_int(OSSL_SIGNATURE_PARAM_PSS_SALTLEN, NULL),
        OSSL_PARAM_END,
    };
    return gettable;
}

static const OSSL_DISPATCH sk_signature_functions[] = {
    {OSSL_FUNC_SIGNATURE_NEWCTX, (void (*)(void))sig_newctx},
    {OSSL_FUNC_SIGNATURE_FREECTX, (void (*)(void))sig_freectx},
    {OSSL_FUNC_SIGNATURE_DUPCTX, (void (*)(void))sig_dupctx},
    {OSSL_FUNC_SIGNATURE_SIGN_INIT, (void (*)(void))sig_sign_init},
    {OSSL_FUNC_SIGNATURE_SIGN, (void (*)(void))sig_sign},
    {OSSL_FUNC_SIGNATURE_DIGEST_SIGN_INIT, (void (*)(void))sig_digest_sign_init},
    {OSSL_FUNC_SIGNATURE_DIGEST_SIGN_UPDATE, (void (*)(void))sig_digest_sign_update},
    {OSSL_FUNC_SIGNATURE_DIGEST_SIGN_FINAL, (void (*)(void))sig_digest_sign_final},
    {OSSL_FUNC_SIGNATURE_DIGEST_SIGN, (void (*)(void))sig_digest_sign},
    {OSSL_FUNC_SIGNATURE_GET_CTX_PARAMS, (void (*)(void))sig_get_ctx_params},
    {OSSL_FUNC_SIGNATURE_GETTABLE_CTX_PARAMS, (void (*)(void))sig_gettable_ctx_params},
    {OSSL_FUNC_SIGNATURE_SET_CTX_PARAMS, (void (*)(void))sig_set_ctx_params},
    {OSSL_FUNC_SIGNATURE_SETTABLE_CTX_PARAMS, (void (*)(void))sig_settable_ctx_params},
    {0, NULL},
};

/* ===================================================================== */
/* asymmetric cipher: decryption                                         */
/* ===================================================================== */

struct sk_enc {
    struct sk_provctx *pc;
    char *propq;
    struct sk_key *key;
    int pad;                    /* RSA_PKCS1_PADDING, _OAEP_ or _WITH_TLS_PADDING */
    uint32_t oaep_code;         /* SHA-1 unless set, as in OpenSSL */
    uint32_t mgf1_code;         /* 0: same as oaep_code */
    unsigned char *label;
    size_t label_len;
    unsigned client_version;    /* TLS: what the ClientHello offered */
    unsigned alt_version;       /* TLS: the negotiated version, also accepted */
};

static OSSL_FUNC_asym_cipher_newctx_fn enc_newctx;
static OSSL_FUNC_asym_cipher_freectx_fn enc_freectx;
static OSSL_FUNC_asym_cipher_dupctx_fn enc_dupctx;
static OSSL_FUNC_asym_cipher_decrypt_init_fn enc_decrypt_init;
static OSSL_FUNC_asym_cipher_decrypt_fn enc_decrypt;
static OSSL_FUNC_asym_cipher_set_ctx_params_fn enc_set_ctx_params;
static OSSL_FUNC_asym_cipher_settable_ctx_params_fn enc_settable_ctx_params;
static OSSL_FUNC_asym_cipher_get_ctx_params_fn enc_get_ctx_params;
static OSSL_FUNC_asym_cipher_gettable_ctx_params_fn enc_gettable_ctx_params;

static void *enc_newctx(void *provctx)
{
    struct sk_enc *ctx = calloc(1, sizeof(*ctx));
    if (ctx) {
        ctx->pc = provctx;
        ctx->pad = RSA_PKCS1_PADDING;
        ctx->oaep_code = SHMKEY_HASH_SHA1;
    }
    return ctx;
}

static void enc_freectx(void *vctx)
{
    struct sk_enc *ctx = vctx;
    if (!ctx)
        return;
    sk_key_free(ctx->key);
    OPENSSL_clear_free(ctx->label, ctx->label_len);
    free(ctx);
}

static void *enc_dupctx(void *vctx)
{
    const struct sk_enc *src = vctx;
    struct sk_enc *ctx = calloc(1, sizeof(*ctx));
    if (!ctx)
        return NULL;
    *ctx = *src;
    ctx->label = NULL;
    if (ctx->key)
        sk_key_ref(ctx->key);
    if (src->label && (ctx->label = OPENSSL_memdup(src->label, src->label_len)) == NULL) {
        ctx->label_len = 0;
        enc_freectx(ctx);
        return NULL;
    }
    return ctx;
}

static int enc_decrypt_init(void *vctx, void *provkey, const OSSL_PARAM params[])
{
    struct sk_enc *ctx = vctx;
    struct sk_key *k = provkey;
    if (!k || !k->oracle) {
        SK_RAISE(ctx->pc, SK_R_PUBLIC_ONLY, "");
        return 0;
    }
    sk_key_ref(k);
    sk_key_free(ctx->key);
    ctx->key = k;
    ctx->pad = RSA_PKCS1_PADDING;
    return enc_set_ctx_params(ctx, params);
}

/* All-ones if a == b, else zero, without a branch on either. */
static unsigned sk_ct_eq(unsigned a, unsigned b)
{
    unsigned x = a ^ b;
    return 0u - (((x | (0u - x)) >> (sizeof(unsigned) * 8 - 1)) ^ 1u);
}

/*
 * TLS 1.2 RSA key exchange (RFC 5246 7.4.7.1): whatever the ciphertext, the
 * result is 48 bytes, the premaster secret if it decrypted to 48 bytes that
 * start with the client's version, else random bytes, chosen without a
 * branch. The oracle's own PKCS#1 v1.5 decryption rejects implicitly, so a
 * bad ciphertext gives no distinct status either.
 */
static int enc_decrypt_tls(struct sk_enc *ctx, unsigned char *out, size_t *outlen,
                           const unsigned char *in, size_t inlen)
{
    struct sk_key *k = ctx->key;
    uint32_t p[4] = {SHMKEY_PAD_PKCS1V15, 0, 0, 0};
    unsigned char fake[SK_TLS_PMS_LEN];
    uint8_t reply[SK_REPLY_MAX];
    uint32_t got = 0;
    if (ctx->client_version == 0) {
        SK_RAISE(ctx->pc, SK_R_UNSUPPORTED_PARAM, "TLS client version not set");
        return 0;
    }
    if (RAND_priv_bytes_ex(ctx->pc->libctx, fake, sizeof(fake), 0) <= 0) {
        SK_RAISE(ctx->pc, SK_R_LIBCRYPTO, "random bytes");
        return 0;
    }
    memset(reply, 0, sizeof(reply));
    if (!sk_oracle_call(k, SHMKEY_OP_DECRYPT, p, in, (uint32_t)inlen, reply, sizeof(reply), &got)) {
        /* No reply at all (oracle down, policy): not a padding verdict. */
        OPENSSL_cleanse(fake, sizeof(fake));
        return 0;
    }
    unsigned good = sk_ct_eq(got, SK_TLS_PMS_LEN);
    unsigned version = sk_ct_eq(reply[0], ctx->client_version >> 8) &
                       sk_ct_eq(reply[1], ctx->client_version & 0xff);
    if (ctx->alt_version)
        version |= sk_ct_eq(reply[0], ctx->alt_version >> 8) &
                   sk_ct_eq(reply[1], ctx->alt_version & 0xff);
    good &= version;
    for (size_t i = 0; i < SK_TLS_PMS_LEN; i++)
        out[i] = (unsigned char)((reply[i] & good) | (fake[i] & ~good));
    OPENSSL_cleanse(reply, sizeof(reply));
    OPENSSL_cleanse(fake, sizeof(fake));
    *outlen = SK_TLS_PMS_LEN;
    return 1;
}

static int enc_decrypt(void *vctx, unsigned char *out, size_t *outlen, size_t outsize,
                       const unsigned char *in, size_t inlen)
{
    struct sk_enc *ctx = vctx;
    struct sk_key *k = ctx->key;
    uint32_t p[4] = {SHMKEY_PAD_PKCS1V15, 0, 0, 0};
    uint8_t reply[SK_REPLY_MAX];
    uint8_t *payload = NULL;
    uint32_t got = 0;
    int ok;
    if (!k)
        return 0;
    size_t need = ctx->pad == RSA_PKCS1_WITH_TLS_PADDING ? SK_TLS_PMS_LEN : k->bytes;
    if (out == NULL) {
        *outlen = need;
        return 1;
    }
    if (inlen != k->bytes) {
        SK_RAISE(ctx->pc, -SHMKEY_EINVAL, "ciphertext is %zu bytes; the key needs %u",
                 inlen, k->bytes);
        return 0;
    }
    if (ctx->pad == RSA_PKCS1_WITH_TLS_PADDING) {
        if (outsize < SK_TLS_PMS_LEN) {
            SK_RAISE(ctx->pc, SK_R_BUFFER_TOO_SMALL, "%zu bytes", outsize);
            return 0;
        }
        return enc_decrypt_tls(ctx, out, outlen, in, inlen);
    }
    if (ctx->pad == RSA_PKCS1_OAEP_PADDING) {
        p[0] = SHMKEY_PAD_OAEP;
        p[1] = ctx->oaep_code;
        p[2] = ctx->mgf1_code ? ctx->mgf1_code : ctx->oaep_code;
        p[3] = (uint32_t)ctx->label_len;
    }
    if ((payload = malloc(inlen + ctx->label_len + 1)) == NULL)
        return 0;
    memcpy(payload, in, inlen);
    if (ctx->label_len)
        memcpy(payload + inlen, ctx->label, ctx->label_len);
    ok = sk_oracle_call(k, SHMKEY_OP_DECRYPT, p, payload, (uint32_t)(inlen + ctx->label_len),
                        reply, sizeof(reply), &got);
    free(payload);
    if (ok && got > outsize) {
        SK_RAISE(ctx->pc, SK_R_BUFFER_TOO_SMALL, "%zu bytes for %u", outsize, got);
        ok = 0;
    }
    if (ok) {
        memcpy(out, reply, got);
        *outlen = got;
    }
    OPENSSL_cleanse(reply, sizeof(reply));
    return ok;
}

static int enc_set_ctx_params(void *vctx, const OSSL_PARAM params[])
{
    struct sk_enc *ctx = vctx;
    const OSSL_PARAM *p;
    if (params == NULL)
        return 1;
    if ((p = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_PAD_MODE)) != NULL) {
        int pad;
        if (!sk_get_pad_mode(p, &pad) ||
            (pad != RSA_PKCS1_PADDING && pad != RSA_PKCS1_OAEP_PADDING &&
             pad != RSA_PKCS1_WITH_TLS_PADDING)) {
            SK_RAISE(ctx->pc, SK_R_UNSUPPORTED_PARAM, "decryption padding; use OAEP or PKCS#1 v1.5");
            return 0;
        }
        ctx->pad = pad;
    }
    if ((p = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST)) != NULL &&
        !sk_get_md_param(ctx->pc, p, ctx->propq, "OAEP", &ctx->oaep_code))
        return 0;
    if ((p = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST)) != NULL &&
        !sk_get_md_param(ctx->pc, p, ctx->propq, "MGF1", &ctx->mgf1_code))
        return 0;
    if ((p = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_OAEP_LABEL)) != NULL) {
        void *label = NULL;
        size_t len = 0;
        if (!OSSL_PARAM_get_octet_string(p, &label, 0, &len))
            return 0;
        OPENSSL_clear_free(ctx->label, ctx->label_len);
        ctx->label = label;
        ctx->label_len = label ? len : 0;
    }
    if ((p = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_TLS_CLIENT_VERSION)) != NULL &&
        !OSSL_PARAM_get_uint(p, &ctx->client_version))
        return 0;
    if ((p = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_TLS_NEGOTIATED_VERSION)) != NULL &&
        !OSSL_PARAM_get_uint(p, &ctx->alt_version))
        return 0;
    return 1;
}

static const OSSL_PARAM *enc_settable_ctx_params(void *vctx, void *provctx)
{
    static const OSSL_PARAM settable[] = {
        OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_PAD_MODE, NULL, 0),
        OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST, NULL, 0),
        OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST, NULL, 0),
        OSSL_PARAM_octet_string(OSSL_ASYM_CIPHER_PARAM_OAEP_LABEL, NULL, 0),
        OSSL_PARAM_uint(OSSL_ASYM_CIPHER_PARAM_TLS_CLIENT_VERSION, NULL),
        OSSL_PARAM_uint(OSSL_ASYM_CIPHER_PARAM_TLS_NEGOTIATED_VERSION, NULL),
        OSSL_PARAM_END,
    };
    return settable;
}

static int enc_get_ctx_params(void *vctx, OSSL_PARAM params[])
{
    struct sk_enc *ctx = vctx;
    OSSL_PARAM *p = OSSL_PARAM_locate(params, OSSL_ASYM_CIPHER_PARAM_PAD_MODE);
    if (p && p->data_type == OSSL_PARAM_INTEGER && !OSSL_PARAM_set_int(p, ctx->pad))
        return 0;
    return 1;
}

static const OSSL_PARAM *enc_gettable_ctx_params(void *vctx, void *provctx)
{
    static const OSSL_PARAM gettable[] = {
        OSSL_PARAM_int(OSSL_ASYM_CIPHER_PARAM_PAD_MODE, NULL),
        OSSL_PARAM_END,
    };
    return gettable;
}

static const OSSL_DISPATCH sk_asym_cipher_functions[] = {
    {OSSL_FUNC_ASYM_CIPHER_NEWCTX, (void (*)(void))enc_newctx},
    {OSSL_FUNC_ASYM_CIPHER_FREECTX, (void (*)(void))enc_freectx},
    {OSSL_FUNC_ASYM_CIPHER_DUPCTX, (void (*)(void))enc_dupctx},
    {OSSL_FUNC_ASYM_CIPHER_DECRYPT_INIT, (void (*)(void))enc_decrypt_init},
    {OSSL_FUNC_ASYM_CIPHER_DECRYPT, (void (*)(void))enc_decrypt},
    {OSSL_FUNC_ASYM_CIPHER_SET_CTX_PARAMS, (void (*)(void))enc_set_ctx_params},
    {OSSL_FUNC_ASYM_CIPHER_SETTABLE_CTX_PARAMS, (void (*)(void))enc_settable_ctx_params},
    {OSSL_FUNC_ASYM_CIPHER_GET_CTX_PARAMS, (void (*)(void))enc_get_ctx_params},
    {OSSL_FUNC_ASYM_CIPHER_GETTABLE_CTX_PARAMS, (void (*)(void))enc_gettable_ctx_params},
    {0, NULL},
};

/* ===================================================================== */
/* decoders                                                              */
/* ===================================================================== */

/* Read what the core BIO holds, up to max bytes; NULL if more or on error. */
static unsigned char *sk_read_all(struct sk_provctx *pc, OSSL_CORE_BIO *cin, size_t max,
                                  size_t *len)
{
    size_t cap = 4096, n = 0, got;
    unsigned char *buf = malloc(cap), *grown;
    while (buf) {
        if (n == cap) {
            if (cap >= max || (grown = realloc(buf, cap * 2)) == NULL)
                break;
            buf = grown;
            cap *= 2;
        }
        got = 0;
        if (!pc->bio_read_ex(cin, buf + n, cap - n, &got) || got == 0) {
            *len = n;
            return buf;
        }
        n += got;
    }
    free(buf);
    return NULL;
}

/* DER -> SK_REF if it is exactly one key reference, else NULL (no error left). */
static SK_REF *sk_ref_parse(const unsigned char *der, size_t len)
{
    const unsigned char *p = der;
    SK_REF *ref;
    ERR_set_mark();
    ref = (SK_REF *)ASN1_item_d2i(NULL, &p, (long)len, ASN1_ITEM_rptr(SK_REF));
    ERR_pop_to_mark();
    if (ref && p != der + len) {
        ASN1_item_free((ASN1_VALUE *)ref, ASN1_ITEM_rptr(SK_REF));
        ref = NULL;
    }
    return ref;
}

static void *dec_newctx(void *provctx)
{
    return provctx;     /* stateless: the provider context is all it needs */
}

static void dec_freectx(void *vctx)
{
}

static int dec_does_selection(void *provctx, int selection)
{
    return selection == 0 || (selection & OSSL_KEYMGMT_SELECT_KEYPAIR) != 0;
}

/*
 * PEM -> DER for our label only, wherever the block sits in the file (after
 * a certificate chain, say). Anything else is left to other decoders by
 * returning 1 empty-handed.
 */
static int pem_decode(void *vctx, OSSL_CORE_BIO *cin, int selection, OSSL_CALLBACK *data_cb,
                      void *data_cbarg, OSSL_PASSPHRASE_CALLBACK *pw_cb, void *pw_cbarg)
{
    struct sk_provctx *pc = vctx;
    size_t len = 0;
    unsigned char *buf = sk_read_all(pc, cin, SK_PEM_READ_MAX, &len), *start;
    char *name = NULL, *header = NULL;
    unsigned char *der = NULL;
    long der_len = 0;
    int ok = 1;
    if (!buf)
        return 1;
    start = memmem(buf, len, SK_PEM_BEGIN, sizeof(SK_PEM_BEGIN) - 1);
    if (start) {
        sk_last_error[0] = '\0';
        BIO *mem = BIO_new_mem_buf(start, (int)(len - (size_t)(start - buf)));
        ERR_set_mark();
        int read = mem && PEM_read_bio(mem, &name, &header, &der, &der_len) > 0;
        ERR_pop_to_mark();
        BIO_free(mem);
        SK_REF *ref = read ? sk_ref_parse(der, (size_t)der_len) : NULL;
        if (!read || strcmp(name, SK_PEM_LABEL) != 0 || !ref) {
            SK_FAIL(pc, SK_R_BAD_REFERENCE, !read ? "unreadable PEM block"
                    : "its DER is not a ShmkeyKeyReference");
            ok = 0;
        } else {
            int objtype = OSSL_OBJECT_PKEY;
            OSSL_PARAM params[3];
            params[0] = OSSL_PARAM_construct_int(OSSL_OBJECT_PARAM_TYPE, &objtype);
            params[1] = OSSL_PARAM_construct_octet_string(OSSL_OBJECT_PARAM_DATA, der,
                                                          (size_t)der_len);
            params[2] = OSSL_PARAM_construct_end();
            ok = data_cb(params, data_cbarg);
        }
        ASN1_item_free((ASN1_VALUE *)ref, ASN1_ITEM_rptr(SK_REF));
    }
    OPENSSL_free(name);
    OPENSSL_free(header);
    OPENSSL_free(der);
    free(buf);
    return ok;
}

static int pem_export_object(void *vctx, const void *objref, size_t objref_sz,
                             OSSL_CALLBACK *export_cb, void *export_cbarg)
{
    return 0;
}

/*
 * DER -> key. DER that is not a key reference is someone else's (return 1
 * empty-handed); a reference we cannot use is an error (return 0).
 */
static int ref_decode(void *vctx, OSSL_CORE_BIO *cin, int selection, OSSL_CALLBACK *data_cb,
                      void *data_cbarg, OSSL_PASSPHRASE_CALLBACK *pw_cb, void *pw_cbarg)
{
    struct sk_provctx *pc = vctx;
    size_t len = 0;
    unsigned char *buf = sk_read_all(pc, cin, SK_DER_READ_MAX, &len);
    SK_REF *ref = NULL;
    struct sk_key *k = NULL;
    int ok = 1;
    if (!buf)
        return 1;
    if ((ref = sk_ref_parse(buf, len)) != NULL) {
        if ((k = sk_key_from_ref(pc, ref)) == NULL) {
            ok = 0;
        } else {
            int objtype = OSSL_OBJECT_PKEY;
            OSSL_PARAM params[4];
            params[0] = OSSL_PARAM_construct_int(OSSL_OBJECT_PARAM_TYPE, &objtype);
            params[1] = OSSL_PARAM_construct_utf8_string(OSSL_OBJECT_PARAM_DATA_TYPE,
                                                         (char *)"RSA", 0);
            params[2] = OSSL_PARAM_construct_octet_string(OSSL_OBJECT_PARAM_REFERENCE,
                                                          &k, sizeof(k));
            params[3] = OSSL_PARAM_construct_end();
            ok = data_cb(params, data_cbarg);
            sk_key_free(k);     /* NULL if km_load took it */
        }
    }
    ASN1_item_free((ASN1_VALUE *)ref, ASN1_ITEM_rptr(SK_REF));
    free(buf);
    return ok;
}

/* A reference carries no key another provider could use: never export it. */
static int ref_export_object(void *vctx, const void *objref, size_t objref_sz,
                             OSSL_CALLBACK *export_cb, void *export_cbarg)
{
    return 0;
}

static const OSSL_DISPATCH sk_pem_decoder_functions[] = {
    {OSSL_FUNC_DECODER_NEWCTX, (void (*)(void))dec_newctx},
    {OSSL_FUNC_DECODER_FREECTX, (void (*)(void))dec_freectx},
    {OSSL_FUNC_DECODER_DOES_SELECTION, (void (*)(void))dec_does_selection},
    {OSSL_FUNC_DECODER_DECODE, (void (*)(void))pem_decode},
    {OSSL_FUNC_DECODER_EXPORT_OBJECT, (void (*)(void))pem_export_object},
    {0, NULL},
};

static const OSSL_DISPATCH sk_ref_decoder_functions[] = {
    {OSSL_FUNC_DECODER_NEWCTX, (void (*)(void))dec_newctx},
    {OSSL_FUNC_DECODER_FREECTX, (void (*)(void))dec_freectx},
    {OSSL_FUNC_DECODER_DOES_SELECTION, (void (*)(void))dec_does_selection},
    {OSSL_FUNC_DECODER_DECODE, (void (*)(void))ref_decode},
    {OSSL_FUNC_DECODER_EXPORT_OBJECT, (void (*)(void))ref_export_object},
    {0, NULL},
};

/* ===================================================================== */
/* the provider                                                          */
/* ===================================================================== */

#define SK_PROPS "provider=" SK_PROVIDER_NAME

static const OSSL_ALGORITHM sk_keymgmts[] = {
    {SK_RSA_NAMES, SK_PROPS, sk_keymgmt_functions, "RSA key held by a shmkey oracle"},
    {NULL, NULL, NULL, NULL},
};

static const OSSL_ALGORITHM sk_signatures[] = {
    {SK_SIG_NAME, SK_PROPS, sk_signature_functions, "RSA signing in a shmkey oracle"},
    {NULL, NULL, NULL, NULL},
};

static const OSSL_ALGORITHM sk_asym_ciphers[] = {
    {SK_ENC_NAME, SK_PROPS, sk_asym_cipher_functions, "RSA decryption in a shmkey oracle"},
    {NULL, NULL, NULL, NULL},
};

static const OSSL_ALGORITHM sk_decoders[] = {
    {"DER", SK_PROPS ",input=pem", sk_pem_decoder_functions, "PEM " SK_PEM_LABEL " to DER"},
    {SK_RSA_NAMES, SK_PROPS ",input=der,structure=shmkey-key-reference",
     sk_ref_decoder_functions, "shmkey key reference to key"},
    {NULL, NULL, NULL, NULL},
};

static const OSSL_ALGORITHM *sk_query_operation(void *provctx, int operation_id, int *no_cache)
{
    *no_cache = 0;
    switch (operation_id) {
    case OSSL_OP_KEYMGMT: return sk_keymgmts;
    case OSSL_OP_SIGNATURE: return sk_signatures;
    case OSSL_OP_ASYM_CIPHER: return sk_asym_ciphers;
    case OSSL_OP_DECODER: return sk_decoders;
    default: return NULL;
    }
}

static const OSSL_ITEM *sk_get_reason_strings(void *provctx)
{
    pthread_once(&sk_reasons_once, sk_reasons_init);
    return sk_reasons;
}

static const OSSL_PARAM *sk_gettable_params(void *provctx)
{
    static const OSSL_PARAM gettable[] = {
        OSSL_PARAM_utf8_ptr(OSSL_PROV_PARAM_NAME, NULL, 0),
        OSSL_PARAM_utf8_ptr(OSSL_PROV_PARAM_VERSION, NULL, 0),
        OSSL_PARAM_utf8_ptr(OSSL_PROV_PARAM_BUILDINFO, NULL, 0),
        OSSL_PARAM_int(OSSL_PROV_PARAM_STATUS, NULL),
        OSSL_PARAM_END,
    };
    return gettable;
}

static int sk_get_params(void *provctx, OSSL_PARAM params[])
{
    OSSL_PARAM *p;
    if ((p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_NAME)) &&
        !OSSL_PARAM_set_utf8_ptr(p, "shmkey key oracle provider"))
        return 0;
    if ((p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_VERSION)) &&
        !OSSL_PARAM_set_utf8_ptr(p, "1"))
        return 0;
    if ((p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_BUILDINFO)) &&
        !OSSL_PARAM_set_utf8_ptr(p, OPENSSL_VERSION_TEXT))
        return 0;
    if ((p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_STATUS)) && !OSSL_PARAM_set_int(p, 1))
        return 0;
    return 1;
}

static void sk_teardown(void *provctx)
{
    struct sk_provctx *pc = provctx;
    /* Keys are freed before their provider, so no oracle should be left. */
    while (pc->oracles) {
        struct sk_oracle *o = pc->oracles;
        pc->oracles = o->next;
        sk_conn_close(sk_conn_unref_locked(o->conn));
        BN_free(o->n);
        BN_free(o->e);
        free(o);
    }
    OSSL_LIB_CTX_free(pc->libctx);
    pthread_mutex_destroy(&pc->lock);
    free(pc);
}

static const OSSL_DISPATCH sk_provider_functions[] = {
    {OSSL_FUNC_PROVIDER_TEARDOWN, (void (*)(void))sk_teardown},
    {OSSL_FUNC_PROVIDER_QUERY_OPERATION, (void (*)(void))sk_query_operation},
    {OSSL_FUNC_PROVIDER_GET_REASON_STRINGS, (void (*)(void))sk_get_reason_strings},
    {OSSL_FUNC_PROVIDER_GETTABLE_PARAMS, (void (*)(void))sk_gettable_params},
    {OSSL_FUNC_PROVIDER_GET_PARAMS, (void (*)(void))sk_get_params},
    {0, NULL},
};

/*
 * The provider's entry point: OSSL_provider_init of the loadable module
 * (provider_module.c) and the builtin that shmkey_openssl_enable registers.
 * Reads "timeout_ms" from its openssl.cnf section, if any.
 */
int shmkey_provider_init(const OSSL_CORE_HANDLE *handle, const OSSL_DISPATCH *in,
                         const OSSL_DISPATCH **out, void **provctx)
{
    OSSL_FUNC_core_get_params_fn *get_params = NULL;
    struct sk_provctx *pc = calloc(1, sizeof(*pc));
    if (!pc)
        return 0;
    pc->handle = handle;
    pc->timeout_ms = SK_DEFAULT_TIMEOUT_MS;
    pthread_mutex_init(&pc->lock, NULL);
    for (const OSSL_DISPATCH *f = in; f->function_id != 0; f++) {
        switch (f->function_id) {
        case OSSL_FUNC_CORE_GET_PARAMS:
            get_params = OSSL_FUNC_core_get_params(f);
            break;
        case OSSL_FUNC_CORE_NEW_ERROR:
            pc->new_error = OSSL_FUNC_core_new_error(f);
            break;
        case OSSL_FUNC_CORE_SET_ERROR_DEBUG:
            pc->set_error_debug = OSSL_FUNC_core_set_error_debug(f);
            break;
        case OSSL_FUNC_CORE_VSET_ERROR:
            pc->vset_error = OSSL_FUNC_core_vset_error(f);
            break;
        case OSSL_FUNC_BIO_READ_EX:
            pc->bio_read_ex = OSSL_FUNC_BIO_read_ex(f);
            break;
        default:
            break;
        }
    }
    if (get_params) {
        const char *timeout = NULL;
        OSSL_PARAM params[] = {
            OSSL_PARAM_utf8_ptr("timeout_ms", (char **)&timeout, 0),
            OSSL_PARAM_END,
        };
        if (get_params(handle, params) && timeout) {
            long ms = strtol(timeout, NULL, 10);
            if (ms >= 1 && ms <= 600000)
                pc->timeout_ms = (uint32_t)ms;
        }
    }
    pc->libctx = OSSL_LIB_CTX_new_child(handle, in);
    if (!pc->bio_read_ex || !pc->libctx) {
        sk_teardown(pc);
        return 0;
    }
    *out = sk_provider_functions;
    *provctx = pc;
    return 1;
}

/* ===================================================================== */
/* for Python: shmkey.openssl                                            */
/* ===================================================================== */

/*
 * Whether the libcrypto that the shared object at module_path (Python's _ssl;
 * NULL: the main program) resolves to is the one linked into this code.
 * Registering a provider into another copy would silently do nothing.
 */
int shmkey_openssl_same_libcrypto(const char *module_path, char *detail, uint32_t cap)
{
    Dl_info ours_info, theirs_info;
    void *ours = (void *)&OSSL_PROVIDER_add_builtin;
    void *handle = dlopen(module_path, RTLD_LAZY | RTLD_NOLOAD);
    const char *ours_file = dladdr(ours, &ours_info) && ours_info.dli_fname
                            ? ours_info.dli_fname : "?";
    if (!handle) {
        snprintf(detail, cap, "%s is not loaded", module_path ? module_path : "the program");
        return SHMKEY_EINVAL;
    }
    void *theirs = dlsym(handle, "OSSL_PROVIDER_add_builtin");
    int rc = SHMKEY_OK;
    if (!theirs) {
        snprintf(detail, cap, "%s does not use a shared OpenSSL 3 libcrypto (linked "
                 "statically, or OpenSSL < 3); shmkey's provider is built for %s",
                 module_path ? module_path : "the program", ours_file);
        rc = SHMKEY_EUNSUPPORTED;
    } else if (theirs != ours) {
        snprintf(detail, cap, "%s uses %s but shmkey's provider is built for %s; "
                 "rebuild shmkey against the libcrypto that Python's ssl uses",
                 module_path ? module_path : "the program",
                 dladdr(theirs, &theirs_info) && theirs_info.dli_fname
                 ? theirs_info.dli_fname : "another libcrypto", ours_file);
        rc = SHMKEY_EUNSUPPORTED;
    }
    dlclose(handle);
    return rc;
}

/*
 * Register the provider as a builtin of the default library context and load
 * it, with "default" loaded explicitly: once any provider is loaded, OpenSSL
 * no longer falls back to "default" by itself. Our keymgmt answers to "RSA",
 * so "default" is made the preferred provider (unless a FIPS policy is in
 * force) to keep RSA key generation and import with it. Idempotent.
 */
int shmkey_openssl_enable(char *detail, uint32_t cap)
{
    static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
    static OSSL_PROVIDER *deflt, *ours;
    int rc = SHMKEY_OK;
    pthread_mutex_lock(&lock);
    if (ours || OSSL_PROVIDER_available(NULL, SK_PROVIDER_NAME))
        goto done;
    if (!OSSL_PROVIDER_add_builtin(NULL, SK_PROVIDER_NAME, shmkey_provider_init) ||
        (deflt = OSSL_PROVIDER_load(NULL, "default")) == NULL ||
        (ours = OSSL_PROVIDER_load(NULL, SK_PROVIDER_NAME)) == NULL ||
        (!EVP_default_properties_is_fips_enabled(NULL) &&
         !EVP_set_default_properties(NULL, "?provider=default"))) {
        unsigned long err = ERR_peek_last_error();
        snprintf(detail, cap, "registering the OpenSSL provider failed: %s",
                 err ? ERR_reason_error_string(err) : "unknown error");
        ERR_clear_error();
        rc = SHMKEY_EINTERNAL;
    }
done:
    pthread_mutex_unlock(&lock);
    return rc;
}

/* Why this thread's last oracle operation failed; "" if it succeeded. */
int shmkey_openssl_last_error(char *buf, uint32_t cap)
{
    if (cap == 0)
        return SHMKEY_EINVAL;
    snprintf(buf, cap, "%s", sk_last_error);
    return SHMKEY_OK;
}

/*
 * provider.c - an OpenSSL 3 provider whose private-key operations run in a
 * shmkey key oracle: RSA (sign, decrypt), ECDSA on P-256 and P-384 (sign),
 * and Ed25519 (sign).
 *
 * A key reference file (PEM "SHMKEY KEY REFERENCE") names the oracle and
 * carries the public key. Decoding it gives a key that holds the public key
 * and the oracle's name: nothing secret. Signing hashes here and sends the
 * digest (Ed25519: the message, which is what it signs); decrypting sends the
 * ciphertext. Everything goes through shmkey_call() (C only, no Python, no
 * GIL, any thread), on a connection opened on first use and reopened when
 * the oracle has restarted.
 *
 * The pieces, in the order OpenSSL meets them:
 *   decoder "DER" (input=pem)   finds our PEM block among others and hands its
 *                               DER on. Named "DER" like the default provider's
 *                               PEM decoder, so that both PEM_read_bio_PrivateKey
 *                               (nginx, Python's ssl) and OSSL_STORE (the openssl
 *                               commands) chain it in.
 *   decoders "RSA", "EC", "ED25519" (input=der)  parse that DER into a key
 *                               object, each taking the references to its kind.
 *   keymgmt "RSA", "EC", "ED25519"  the public key and the oracle; import and
 *                               export public parts only, refuse anything
 *                               private. has/match make cert-key checks work.
 *   signature "SHMKEY-RSA-SIG"  digest-sign and sign, PKCS#1 v1.5 and PSS with
 *                               SHA-256/384/512. Names of our own, so OpenSSL
 *                               never pairs our key with another provider's
 *                               signature code.
 *   signature "SHMKEY-ECDSA-SIG"    digest-sign and sign, SHA-256/384/512, DER.
 *   signature "SHMKEY-ED25519-SIG"  one-shot digest-sign of the message (no
 *                               digest), as TLS 1.3 uses it.
 *   asym cipher "SHMKEY-RSA-ENC" decrypt: OAEP, PKCS#1 v1.5, and TLS 1.2's
 *                               RSA key exchange with its implicit rejection.
 */
#include "internal.h"

#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/asn1t.h>
#include <openssl/bn.h>
#include <openssl/core.h>
#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/core_object.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
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
#define SK_RSA_SIG_NAME "SHMKEY-RSA-SIG"
#define SK_EC_SIG_NAME "SHMKEY-ECDSA-SIG"
#define SK_ED25519_SIG_NAME "SHMKEY-ED25519-SIG"
#define SK_ENC_NAME "SHMKEY-RSA-ENC"
/* The default provider's names: libssl finds a key's certificate slot by them. */
#define SK_RSA_NAMES "RSA:rsaEncryption:1.2.840.113549.1.1.1"
#define SK_EC_NAMES "EC:id-ecPublicKey:1.2.840.10045.2.1"
#define SK_ED25519_NAMES "ED25519:1.3.101.112"
#define SK_DEFAULT_TIMEOUT_MS 5000u
#define SK_PEM_READ_MAX (4u << 20)    /* a cert chain and a reference fit easily */
#define SK_DER_READ_MAX (64u << 10)
#define SK_REPLY_MAX 4096u            /* an RSA-16384 signature and a reason */
#define SK_EC_POINT_MAX 97            /* an uncompressed P-384 point */
#define SK_ED25519_KEY_LEN 32
#define SK_ED25519_SIG_LEN 64
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
 *     keyId      OCTET STRING,          -- SHA-256 of publicKey's DER
 *     publicKey  SubjectPublicKeyInfo }  -- RSA, EC P-256/P-384 or Ed25519
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
/* public keys                                                           */
/* ===================================================================== */

enum sk_type { SK_RSA = 1, SK_EC = 2, SK_ED25519 = 3 };

/* The curves the oracle signs with, and what OpenSSL asks about them. */
static const struct sk_curve {
    int nid;
    const char *group;          /* OSSL_PKEY_PARAM_GROUP_NAME, as the default provider says it */
    const char *label;          /* for people */
    int bits, security_bits;
    uint32_t sig_max;           /* DER ECDSA-Sig-Value with both integers at full length */
} sk_curves[] = {
    {NID_X9_62_prime256v1, "prime256v1", "P-256", 256, 128, 72},
    {NID_secp384r1, "secp384r1", "P-384", 384, 192, 104},
};

/* The curve with this NID if the oracle signs with it, else NULL. */
static const struct sk_curve *sk_curve_by_nid(int nid)
{
    for (size_t i = 0; i < sizeof(sk_curves) / sizeof(sk_curves[0]); i++)
        if (sk_curves[i].nid == nid)
            return &sk_curves[i];
    return NULL;
}

/* A group name in any of OpenSSL's spellings ("prime256v1", "P-256", an OID). */
static const struct sk_curve *sk_curve_by_name(const char *name)
{
    int nid;
    ERR_set_mark();     /* an unknown name is an answer, not an error */
    if ((nid = OBJ_txt2nid(name)) == NID_undef)
        nid = EC_curve_nist2nid(name);
    ERR_pop_to_mark();
    return sk_curve_by_nid(nid);
}

/*
 * A public key of one of the kinds the provider handles: everything a key
 * object holds besides its oracle. Two keys are the same key exactly when
 * these compare equal, since EC points are kept in one (uncompressed) form.
 */
struct sk_pub {
    enum sk_type type;
    BIGNUM *n, *e;                      /* RSA */
    const struct sk_curve *curve;       /* EC; NULL until known */
    unsigned char pt[SK_EC_POINT_MAX];  /* EC: uncompressed point; Ed25519: the key */
    size_t ptlen;                       /* 0: no EC or Ed25519 public key yet */
    int bits, security_bits;
    uint32_t size;                      /* EVP_PKEY_get_size: the longest signature */
};

/* Whether p holds a public key yet (an EC key may know only its curve). */
static int sk_pub_has(const struct sk_pub *p)
{
    return p->type == SK_RSA ? p->n != NULL : p->ptlen != 0;
}

/* Forget the key but not its kind. */
static void sk_pub_clear(struct sk_pub *p)
{
    enum sk_type type = p->type;
    BN_free(p->n);
    BN_free(p->e);
    memset(p, 0, sizeof(*p));
    p->type = type;
}

/* Take ownership of n and e; checks what a public RSA key must satisfy. */
static int sk_pub_set_rsa(struct sk_pub *p, BIGNUM *n, BIGNUM *e)
{
    int bits = n ? BN_num_bits(n) : 0;
    if (!n || !e || BN_is_negative(n) || BN_is_negative(e) || !BN_is_odd(n) || !BN_is_odd(e) ||
        bits < 1024 || bits > 16384 || BN_num_bits(e) < 2 || BN_cmp(e, n) >= 0) {
        BN_free(n);
        BN_free(e);
        return 0;
    }
    sk_pub_clear(p);
    p->type = SK_RSA;
    p->n = n;
    p->e = e;
    p->bits = bits;
    p->security_bits = BN_security_bits(bits, -1);
    p->size = (uint32_t)BN_num_bytes(n);
    return 1;
}

/* Only the curve: what EVP_PKEY_copy_parameters and domain-only imports give. */
static void sk_pub_set_curve(struct sk_pub *p, const struct sk_curve *curve)
{
    p->curve = curve;
    p->bits = curve->bits;
    p->security_bits = curve->security_bits;
    p->size = curve->sig_max;
}

/* A point on the curve, in any encoding; kept uncompressed. The point is
 * checked to lie on the curve, so a bogus one never reaches a comparison. */
static int sk_pub_set_ec(struct sk_pub *p, const struct sk_curve *curve,
                         const unsigned char *octets, size_t len)
{
    EC_GROUP *group = NULL;
    EC_POINT *point = NULL;
    unsigned char out[SK_EC_POINT_MAX];
    size_t outlen = 0;
    if (!curve || len == 0 || len > SK_EC_POINT_MAX)
        return 0;
    ERR_set_mark();
    if ((group = EC_GROUP_new_by_curve_name_ex(NULL, NULL, curve->nid)) != NULL &&
        (point = EC_POINT_new(group)) != NULL &&
        EC_POINT_oct2point(group, point, octets, len, NULL) &&
        !EC_POINT_is_at_infinity(group, point) && EC_POINT_is_on_curve(group, point, NULL) > 0)
        outlen = EC_POINT_point2oct(group, point, POINT_CONVERSION_UNCOMPRESSED, out,
                                    sizeof(out), NULL);
    ERR_pop_to_mark();
    EC_POINT_free(point);
    EC_GROUP_free(group);
    if (outlen == 0)
        return 0;
    sk_pub_clear(p);
    p->type = SK_EC;
    sk_pub_set_curve(p, curve);
    memcpy(p->pt, out, outlen);
    p->ptlen = outlen;
    return 1;
}

/* A raw 32-byte Ed25519 public key (RFC 8032); 0, p unchanged, if not 32 bytes. */
static int sk_pub_set_ed25519(struct sk_pub *p, const unsigned char *key, size_t len)
{
    if (len != SK_ED25519_KEY_LEN)
        return 0;
    sk_pub_clear(p);
    p->type = SK_ED25519;
    memcpy(p->pt, key, len);
    p->ptlen = len;
    p->bits = 256;
    p->security_bits = 128;
    p->size = SK_ED25519_SIG_LEN;
    return 1;
}

/* dst becomes a deep copy of src; 0, dst unchanged, if memory runs out. */
static int sk_pub_copy(struct sk_pub *dst, const struct sk_pub *src)
{
    BIGNUM *n = NULL, *e = NULL;
    if (src->n && ((n = BN_dup(src->n)) == NULL || (e = BN_dup(src->e)) == NULL)) {
        BN_free(n);
        return 0;
    }
    sk_pub_clear(dst);
    *dst = *src;
    dst->n = n;
    dst->e = e;
    return 1;
}

/* 1 if both hold a public key and it is the same key; never for two empty ones. */
static int sk_pub_equal(const struct sk_pub *a, const struct sk_pub *b)
{
    if (a->type != b->type || !sk_pub_has(a) || !sk_pub_has(b))
        return 0;
    if (a->type == SK_RSA)
        return BN_cmp(a->n, b->n) == 0 && BN_cmp(a->e, b->e) == 0;
    return a->curve == b->curve && a->ptlen == b->ptlen && memcmp(a->pt, b->pt, a->ptlen) == 0;
}

/* "RSA-2048", "EC P-256", "Ed25519": how errors name a key. */
static const char *sk_pub_describe(const struct sk_pub *p, char *buf, size_t cap)
{
    if (p->type == SK_RSA)
        snprintf(buf, cap, "RSA-%d", p->bits);
    else if (p->type == SK_EC)
        snprintf(buf, cap, "EC %s", p->curve ? p->curve->label : "?");
    else
        snprintf(buf, cap, "Ed25519");
    return buf;
}

/* The kind of key a SubjectPublicKeyInfo holds; 0 if none we handle. */
static enum sk_type sk_spki_type(const SK_SPKI *spki)
{
    switch (OBJ_obj2nid(spki->algorithm->algorithm)) {
    case NID_rsaEncryption: return SK_RSA;
    case NID_X9_62_id_ecPublicKey: return SK_EC;
    case NID_ED25519: return SK_ED25519;
    default: return 0;
    }
}

/*
 * A SubjectPublicKeyInfo -> p. RSA needs NULL parameters, EC a named curve
 * we sign with, Ed25519 none (RFC 8410). 0 if it is none of those.
 */
static int sk_pub_from_spki(const SK_SPKI *spki, struct sk_pub *p)
{
    const X509_ALGOR *alg = spki->algorithm;
    const unsigned char *q = spki->public_key->data;
    long qlen = spki->public_key->length;
    int ptype = alg->parameter ? ASN1_TYPE_get(alg->parameter) : V_ASN1_UNDEF;
    SK_RSAPUB *rsa;
    int ok;

    switch (sk_spki_type(spki)) {
    case SK_RSA:
        if (ptype != V_ASN1_NULL && ptype != V_ASN1_UNDEF)
            return 0;
        rsa = (SK_RSAPUB *)ASN1_item_d2i(NULL, &q, qlen, ASN1_ITEM_rptr(SK_RSAPUB));
        ok = rsa && q == spki->public_key->data + qlen;
        if (ok) {
            BIGNUM *n = rsa->n, *e = rsa->e;
            rsa->n = rsa->e = NULL;     /* sk_pub_set_rsa owns them, even when it fails */
            ok = sk_pub_set_rsa(p, n, e);
        }
        ASN1_item_free((ASN1_VALUE *)rsa, ASN1_ITEM_rptr(SK_RSAPUB));
        return ok;
    case SK_EC:
        if (ptype != V_ASN1_OBJECT)
            return 0;
        return sk_pub_set_ec(p, sk_curve_by_nid(OBJ_obj2nid(alg->parameter->value.object)),
                             q, (size_t)qlen);
    case SK_ED25519:
        return ptype == V_ASN1_UNDEF && sk_pub_set_ed25519(p, q, (size_t)qlen);
    default:
        return 0;
    }
}

static int sk_get_utf8(const OSSL_PARAM *p, char *buf, size_t cap)
{
    return OSSL_PARAM_get_utf8_string(p, &buf, cap);
}

/* SubjectPublicKeyInfo DER -> p. */
static int sk_parse_spki(const unsigned char *der, long len, struct sk_pub *p)
{
    const unsigned char *q = der;
    SK_SPKI *spki;
    int ok;
    ERR_set_mark();
    spki = (SK_SPKI *)ASN1_item_d2i(NULL, &q, len, ASN1_ITEM_rptr(SK_SPKI));
    ok = spki && q == der + len && sk_pub_from_spki(spki, p);
    ERR_pop_to_mark();
    ASN1_item_free((ASN1_VALUE *)spki, ASN1_ITEM_rptr(SK_SPKI));
    return ok;
}

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
    char name[SHMKEY_NAME_MAX + 1];
    int transport;
    uint8_t key_id[32];         /* how requests name the key */
    struct sk_pub pub;          /* the public key the oracle must hold */
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
    struct sk_pub pub;          /* its type is fixed at creation */
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

/* Take a reference on the registry entry for this oracle and key. */
static struct sk_oracle *sk_oracle_get(struct sk_provctx *pc, const char *name,
                                       int transport, const uint8_t key_id[32],
                                       const struct sk_pub *pub)
{
    struct sk_oracle *o;
    pthread_mutex_lock(&pc->lock);
    for (o = pc->oracles; o; o = o->next)
        if (strcmp(o->name, name) == 0 && o->transport == transport &&
            memcmp(o->key_id, key_id, sizeof(o->key_id)) == 0 && sk_pub_equal(&o->pub, pub))
            break;
    if (o) {
        o->users++;
    } else if ((o = calloc(1, sizeof(*o))) != NULL) {
        snprintf(o->name, sizeof(o->name), "%s", name);
        o->transport = transport;
        memcpy(o->key_id, key_id, sizeof(o->key_id));
        o->users = 1;
        if (sk_pub_copy(&o->pub, pub)) {
            o->next = pc->oracles;
            pc->oracles = o;
        } else {
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
    sk_pub_clear(&o->pub);
    free(o);
}

static int sk_open_client(struct sk_oracle *o, struct shmkey_client **out,
                          char *why, size_t whylen)
{
    char id[SHMKEY_NAME_MAX + 16], dir[256], path[256];
    int rc = shmkey_ring_id(o->name, id, sizeof(id));
    if (rc != SHMKEY_OK)
        return rc;
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
    /* A missing directory is an oracle that is not running: nothing to create. */
    rc = shmkey_runtime_dir(NULL, 0, dir, sizeof(dir), why, (uint32_t)whylen);
    if (rc == SHMKEY_OK)
        rc = shmkey_socket_path(dir, o->name, path, sizeof(path));
    if (rc != SHMKEY_OK)
        return rc;
    return shmkey_client_open_socket(path, -1, SHMKEY_MAX_SLOT_SIZE, out);
}

/* The oracle must hold the key the reference describes: ask it once per connection. */
static int sk_check_pubkey(struct sk_provctx *pc, struct sk_oracle *o,
                           struct shmkey_client *client, char *why, size_t whylen)
{
    struct shmkey_req req = {.op = SHMKEY_OP_PUBKEY};
    struct shmkey_resp resp;
    uint8_t der[SK_REPLY_MAX];
    struct sk_pub held = {0};
    char what[32];
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
    if (!sk_parse_spki(der, resp.out_len, &held))
        return SHMKEY_EPROTO;
    rc = sk_pub_equal(&held, &o->pub) ? SHMKEY_OK : -SK_R_KEY_MISMATCH;
    if (rc != SHMKEY_OK)
        snprintf(why, whylen, "oracle '%s' holds an %s key; run 'shmkey keyref' again",
                 o->name, sk_pub_describe(&held, what, sizeof(what)));
    sk_pub_clear(&held);
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

static struct sk_key *sk_key_new(struct sk_provctx *pc, enum sk_type type)
{
    struct sk_key *k = calloc(1, sizeof(*k));
    if (k) {
        k->pc = pc;
        k->refs = 1;
        k->pub.type = type;
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
    sk_pub_clear(&k->pub);
    free(k);
}

/*
 * A key from a parsed reference. Returns NULL with an error queued when the
 * reference is ours but unusable (newer version, bad name, a key of a kind
 * or curve the provider does not handle).
 */
static struct sk_key *sk_key_from_ref(struct sk_provctx *pc, const SK_REF *ref)
{
    long version = ASN1_INTEGER_get(ref->version);
    long transport = ASN1_INTEGER_get(ref->transport);
    char name[SHMKEY_NAME_MAX + 1];
    struct sk_key *k;

    if (version != SHMKEY_KEYREF_VERSION) {
        SK_FAIL(pc, SK_R_BAD_REFERENCE, "version %ld; this shmkey reads version %d",
                 version, SHMKEY_KEYREF_VERSION);
        return NULL;
    }
    int len = ASN1_STRING_length(ref->oracle);
    if (len <= 0 || len > SHMKEY_NAME_MAX) {
        SK_FAIL(pc, SK_R_BAD_REFERENCE, "bad oracle name");
        return NULL;
    }
    memcpy(name, ASN1_STRING_get0_data(ref->oracle), (size_t)len);
    name[len] = '\0';
    if (strlen(name) != (size_t)len || shmkey_check_name(name) != SHMKEY_OK) {
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
    if ((k = sk_key_new(pc, sk_spki_type(ref->spki))) == NULL)
        return NULL;
    if (!sk_pub_from_spki(ref->spki, &k->pub)) {
        SK_FAIL(pc, SK_R_BAD_REFERENCE, "the public key is not an RSA key of 1024 to 16384 "
                "bits, an EC key on P-256 or P-384, or an Ed25519 key");
        sk_key_free(k);
        return NULL;
    }
    k->oracle = sk_oracle_get(pc, name, (int)transport, ASN1_STRING_get0_data(ref->key_id),
                              &k->pub);
    if (!k->oracle) {
        sk_key_free(k);
        return NULL;
    }
    return k;
}

/* ===================================================================== */
/* keymgmt                                                               */
/* ===================================================================== */

/*
 * One keymgmt per kind of key (OpenSSL finds a key's signature code and
 * libssl its certificate slot by the keymgmt's names). They share every
 * function that gets a key object, which knows its kind; the few that get
 * none (new, load, *_types, gettable, query_operation_name) come per kind
 * from SK_KEYMGMT below.
 */
static OSSL_FUNC_keymgmt_free_fn km_free;
static OSSL_FUNC_keymgmt_dup_fn km_dup;
static OSSL_FUNC_keymgmt_has_fn km_has;
static OSSL_FUNC_keymgmt_match_fn km_match;
static OSSL_FUNC_keymgmt_import_fn km_import;
static OSSL_FUNC_keymgmt_export_fn km_export;
static OSSL_FUNC_keymgmt_get_params_fn km_get_params;

/* Drops one reference; the key (and its oracle entry) goes with the last. */
static void km_free(void *keydata)
{
    sk_key_free(keydata);
}

/* The decoder hands over its key by reference; take it if it is of this kind. */
static void *km_load_of(enum sk_type type, const void *reference, size_t reference_sz)
{
    struct sk_key *k;
    if (reference == NULL || reference_sz != sizeof(k))
        return NULL;
    k = *(struct sk_key **)reference;
    if (!k || k->pub.type != type)
        return NULL;
    *(struct sk_key **)reference = NULL;
    return k;
}

/* A copy of the public key; it keeps the oracle only if the private half is asked for. */
static void *km_dup(const void *keydata_from, int selection)
{
    const struct sk_key *src = keydata_from;
    struct sk_key *k = sk_key_new(src->pc, src->pub.type);
    if (!k)
        return NULL;
    if (!sk_pub_copy(&k->pub, &src->pub)) {
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

/* "Private" means: an oracle does it for us. An EC key's domain parameters
 * are its curve; the others have none, so asking for them is always met. */
static int km_has(const void *keydata, int selection)
{
    const struct sk_key *k = keydata;
    int ok = 1;
    if (!k)
        return 0;
    if (selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY)
        ok = ok && sk_pub_has(&k->pub);
    if (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY)
        ok = ok && k->oracle != NULL;
    if ((selection & OSSL_KEYMGMT_SELECT_DOMAIN_PARAMETERS) && k->pub.type == SK_EC)
        ok = ok && k->pub.curve != NULL;
    return ok;
}

/* The public key identifies the private one; that is all there is to compare. */
static int km_match(const void *keydata1, const void *keydata2, int selection)
{
    const struct sk_key *a = keydata1, *b = keydata2;
    if (a->pub.type != b->pub.type)
        return 0;
    if (selection & OSSL_KEYMGMT_SELECT_KEYPAIR)
        return sk_pub_equal(&a->pub, &b->pub);
    if ((selection & OSSL_KEYMGMT_SELECT_DOMAIN_PARAMETERS) && a->pub.type == SK_EC)
        return a->pub.curve != NULL && a->pub.curve == b->pub.curve;
    return 1;
}

static const char *const sk_private_params[] = {
    OSSL_PKEY_PARAM_PRIV_KEY, OSSL_PKEY_PARAM_RSA_D, OSSL_PKEY_PARAM_RSA_FACTOR1,
    OSSL_PKEY_PARAM_RSA_FACTOR2, OSSL_PKEY_PARAM_RSA_EXPONENT1, OSSL_PKEY_PARAM_RSA_EXPONENT2,
    OSSL_PKEY_PARAM_RSA_COEFFICIENT1, NULL,
};

/* An EC import: a named curve (explicit curve parameters are refused) and,
 * if the selection asks for it, the point. */
static int km_import_ec(struct sk_key *k, int selection, const OSSL_PARAM params[])
{
    const OSSL_PARAM *pg = OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_GROUP_NAME);
    const OSSL_PARAM *pp = OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_PUB_KEY);
    const struct sk_curve *curve;
    const void *octets;
    size_t len;
    char group[64];
    if (!(selection & (OSSL_KEYMGMT_SELECT_PUBLIC_KEY | OSSL_KEYMGMT_SELECT_DOMAIN_PARAMETERS)) ||
        !pg || !sk_get_utf8(pg, group, sizeof(group)) || (curve = sk_curve_by_name(group)) == NULL)
        return 0;
    if (!(selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY)) {
        sk_pub_set_curve(&k->pub, curve);
        return 1;
    }
    return pp && OSSL_PARAM_get_octet_string_ptr(pp, &octets, &len) &&
           sk_pub_set_ec(&k->pub, curve, octets, len);
}

/*
 * Public parts only. A private key must never land in this process through
 * us, so an import that carries any is refused outright.
 */
static int km_import(void *keydata, int selection, const OSSL_PARAM params[])
{
    struct sk_key *k = keydata;
    const OSSL_PARAM *p1, *p2;
    BIGNUM *n = NULL, *e = NULL;
    const void *octets;
    size_t len;
    if (!k || sk_pub_has(&k->pub))
        return 0;
    for (const char *const *name = sk_private_params; *name; name++)
        if (OSSL_PARAM_locate_const(params, *name))
            return 0;
    if (k->pub.type == SK_EC)
        return km_import_ec(k, selection, params);
    if (!(selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY))
        return 0;
    switch (k->pub.type) {
    case SK_RSA:
        p1 = OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_RSA_N);
        p2 = OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_RSA_E);
        if (!p1 || !p2 || !OSSL_PARAM_get_BN(p1, &n) || !OSSL_PARAM_get_BN(p2, &e)) {
            BN_free(n);
            BN_free(e);
            return 0;
        }
        return sk_pub_set_rsa(&k->pub, n, e);
    case SK_ED25519:
        p1 = OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_PUB_KEY);
        return p1 && OSSL_PARAM_get_octet_string_ptr(p1, &octets, &len) &&
               sk_pub_set_ed25519(&k->pub, octets, len);
    default:
        return 0;
    }
}

/*
 * Only the public half (and an EC key's curve), and only when no private
 * half is asked for. When OpenSSL asks for that, it is about to try another
 * provider's code with our key; refusing sends it back to our own signature.
 */
static int km_export(void *keydata, int selection, OSSL_CALLBACK *cb, void *cbarg)
{
    struct sk_key *k = keydata;
    OSSL_PARAM_BLD *bld;
    OSSL_PARAM *params = NULL;
    int pub = selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY;
    int curve = (selection & OSSL_KEYMGMT_SELECT_DOMAIN_PARAMETERS) && k && k->pub.type == SK_EC;
    int ok;
    if (!k || (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) || !(pub || curve) ||
        (pub && !sk_pub_has(&k->pub)) || (curve && !k->pub.curve))
        return 0;
    if ((bld = OSSL_PARAM_BLD_new()) == NULL)
        return 0;
    if (k->pub.type == SK_RSA)
        ok = OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, k->pub.n) &&
             OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, k->pub.e);
    else
        ok = (!curve || OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME,
                                                        k->pub.curve->group, 0)) &&
             (!pub || OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY,
                                                       k->pub.pt, k->pub.ptlen));
    ok = ok && (params = OSSL_PARAM_BLD_to_param(bld)) != NULL;
    OSSL_PARAM_BLD_free(bld);
    if (!ok)
        return 0;
    ok = cb(params, cbarg);
    OSSL_PARAM_free(params);
    return ok;
}

static const OSSL_PARAM sk_rsa_public_types[] = {
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_N, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_E, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM sk_ec_public_types[] = {
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, NULL, 0),
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM sk_ed25519_public_types[] = {
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, NULL, 0),
    OSSL_PARAM_END,
};

/*
 * What a key tells OpenSSL about itself. libssl asks an EC key its group
 * (to pick ecdsa_secp256r1_sha256 or _secp384r1_sha384) and point format;
 * an Ed25519 key says it takes no digest (MANDATORY_DIGEST ""), so that
 * EVP_DigestSignInit passes none.
 */
static int km_get_params(void *keydata, OSSL_PARAM params[])
{
    struct sk_key *k = keydata;
    const struct sk_pub *pub = k ? &k->pub : NULL;
    OSSL_PARAM *p;
    if (!pub || !sk_pub_has(pub))
        return 0;
    if ((p = OSSL_PARAM_locate(params, OSSL_PKEY_PARAM_BITS)) && !OSSL_PARAM_set_int(p, pub->bits))
        return 0;
    if ((p = OSSL_PARAM_locate(params, OSSL_PKEY_PARAM_SECURITY_BITS)) &&
        !OSSL_PARAM_set_int(p, pub->security_bits))
        return 0;
    if ((p = OSSL_PARAM_locate(params, OSSL_PKEY_PARAM_MAX_SIZE)) &&
        !OSSL_PARAM_set_int(p, (int)pub->size))
        return 0;
    if (pub->type == SK_ED25519) {
        if ((p = OSSL_PARAM_locate(params, OSSL_PKEY_PARAM_MANDATORY_DIGEST)) &&
            !OSSL_PARAM_set_utf8_string(p, ""))
            return 0;
    } else if ((p = OSSL_PARAM_locate(params, OSSL_PKEY_PARAM_DEFAULT_DIGEST)) &&
               !OSSL_PARAM_set_utf8_string(p, "SHA256")) {
        return 0;
    }
    if (pub->type == SK_RSA) {
        if ((p = OSSL_PARAM_locate(params, OSSL_PKEY_PARAM_RSA_N)) && !OSSL_PARAM_set_BN(p, pub->n))
            return 0;
        if ((p = OSSL_PARAM_locate(params, OSSL_PKEY_PARAM_RSA_E)) && !OSSL_PARAM_set_BN(p, pub->e))
            return 0;
        return 1;
    }
    if ((p = OSSL_PARAM_locate(params, OSSL_PKEY_PARAM_PUB_KEY)) &&
        !OSSL_PARAM_set_octet_string(p, pub->pt, pub->ptlen))
        return 0;
    if ((p = OSSL_PARAM_locate(params, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY)) &&
        !OSSL_PARAM_set_octet_string(p, pub->pt, pub->ptlen))
        return 0;
    if (pub->type == SK_EC) {
        if ((p = OSSL_PARAM_locate(params, OSSL_PKEY_PARAM_GROUP_NAME)) &&
            !OSSL_PARAM_set_utf8_string(p, pub->curve->group))
            return 0;
        if ((p = OSSL_PARAM_locate(params, OSSL_PKEY_PARAM_EC_POINT_CONVERSION_FORMAT)) &&
            !OSSL_PARAM_set_utf8_string(p, OSSL_PKEY_EC_POINT_CONVERSION_FORMAT_UNCOMPRESSED))
            return 0;
        if ((p = OSSL_PARAM_locate(params, OSSL_PKEY_PARAM_EC_ENCODING)) &&
            !OSSL_PARAM_set_utf8_string(p, OSSL_PKEY_EC_ENCODING_GROUP))
            return 0;
    }
    return 1;
}

/* What every kind of key answers, and what EC and Ed25519 keys both do. */
#define SK_GETTABLE_SIZES                                                              \
    OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, NULL),                                        \
    OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, NULL),                               \
    OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, NULL)
#define SK_GETTABLE_POINT                                                              \
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, NULL, 0),                         \
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, NULL, 0)

static const OSSL_PARAM sk_rsa_gettable[] = {
    SK_GETTABLE_SIZES,
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_DEFAULT_DIGEST, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_N, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_E, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM sk_ec_gettable[] = {
    SK_GETTABLE_SIZES,
    SK_GETTABLE_POINT,
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_DEFAULT_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_EC_POINT_CONVERSION_FORMAT, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_EC_ENCODING, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM sk_ed25519_gettable[] = {
    SK_GETTABLE_SIZES,
    SK_GETTABLE_POINT,
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_MANDATORY_DIGEST, NULL, 0),
    OSSL_PARAM_END,
};

/*
 * The per-kind functions and dispatch table of keymgmt t: an empty key of
 * that kind (filled by import: OpenSSL's way to compare a certificate with
 * us), loading only keys of that kind, and its parameter lists and
 * signature (and cipher) names.
 */
#define SK_KEYMGMT(t, TYPE, SIGNATURE, CIPHER)                                        \
    static void *km_new_##t(void *provctx) { return sk_key_new(provctx, TYPE); }     \
    static void *km_load_##t(const void *ref, size_t ref_sz)                           \
    {                                                                                   \
        return km_load_of(TYPE, ref, ref_sz);                                          \
    }                                                                                   \
    static const OSSL_PARAM *km_types_##t(int selection)                               \
    {                                                                                   \
        return (selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY) ? sk_##t##_public_types : NULL; \
    }                                                                                   \
    static const OSSL_PARAM *km_gettable_##t(void *provctx) { return sk_##t##_gettable; } \
    static const char *km_operation_##t(int operation_id)                              \
    {                                                                                   \
        return operation_id == OSSL_OP_SIGNATURE ? SIGNATURE                           \
               : operation_id == OSSL_OP_ASYM_CIPHER ? CIPHER : NULL;                  \
    }                                                                                   \
    static const OSSL_DISPATCH sk_##t##_keymgmt_functions[] = {                        \
        {OSSL_FUNC_KEYMGMT_NEW, (void (*)(void))km_new_##t},                           \
        {OSSL_FUNC_KEYMGMT_FREE, (void (*)(void))km_free},                             \
        {OSSL_FUNC_KEYMGMT_LOAD, (void (*)(void))km_load_##t},                         \
        {OSSL_FUNC_KEYMGMT_DUP, (void (*)(void))km_dup},                               \
        {OSSL_FUNC_KEYMGMT_HAS, (void (*)(void))km_has},                               \
        {OSSL_FUNC_KEYMGMT_MATCH, (void (*)(void))km_match},                           \
        {OSSL_FUNC_KEYMGMT_IMPORT, (void (*)(void))km_import},                         \
        {OSSL_FUNC_KEYMGMT_IMPORT_TYPES, (void (*)(void))km_types_##t},                \
        {OSSL_FUNC_KEYMGMT_EXPORT, (void (*)(void))km_export},                         \
        {OSSL_FUNC_KEYMGMT_EXPORT_TYPES, (void (*)(void))km_types_##t},                \
        {OSSL_FUNC_KEYMGMT_GET_PARAMS, (void (*)(void))km_get_params},                 \
        {OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, (void (*)(void))km_gettable_##t},          \
        {OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME, (void (*)(void))km_operation_##t},    \
        {0, NULL},                                                                      \
    };

SK_KEYMGMT(rsa, SK_RSA, SK_RSA_SIG_NAME, SK_ENC_NAME)
SK_KEYMGMT(ec, SK_EC, SK_EC_SIG_NAME, NULL)
SK_KEYMGMT(ed25519, SK_ED25519, SK_ED25519_SIG_NAME, NULL)

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
    enum sk_type type;          /* the kind of key this context signs with */
    struct sk_key *key;
    int pad;                    /* RSA_PKCS1_PADDING or RSA_PKCS1_PSS_PADDING */
    EVP_MD *md;                 /* NULL until set; sign() may infer it */
    uint32_t md_code;
    uint32_t mgf1_code;         /* 0: same as md */
    int saltlen;                /* >= 0 or RSA_PSS_SALTLEN_DIGEST/_MAX/_AUTO */
    EVP_MD_CTX *mdctx;          /* digest-sign: the running hash */
};

static OSSL_FUNC_signature_freectx_fn sig_freectx;
static OSSL_FUNC_signature_dupctx_fn sig_dupctx;
static OSSL_FUNC_signature_sign_init_fn sig_sign_init;
static OSSL_FUNC_signature_sign_fn sig_sign;
static OSSL_FUNC_signature_digest_sign_init_fn sig_digest_sign_init;
static OSSL_FUNC_signature_digest_sign_update_fn sig_digest_sign_update;
static OSSL_FUNC_signature_digest_sign_final_fn sig_digest_sign_final;
static OSSL_FUNC_signature_digest_sign_fn sig_digest_sign;
static OSSL_FUNC_signature_get_ctx_params_fn sig_get_ctx_params;
static OSSL_FUNC_signature_set_ctx_params_fn sig_set_ctx_params;

/* A signature context that will only accept keys of this kind at init. */
static void *sig_newctx_of(enum sk_type type, void *provctx, const char *propq)
{
    struct sk_sig *ctx = calloc(1, sizeof(*ctx));
    if (!ctx)
        return NULL;
    ctx->pc = provctx;
    ctx->type = type;
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
        if (k->pub.type != ctx->type)
            return 0;
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

/*
 * No oracle contact here: libssl calls this as a trial for every sigalg.
 * Ed25519 signs the message itself, so it takes no digest and keeps no
 * running hash (OpenSSL passes NULL, having read MANDATORY_DIGEST "").
 */
static int sig_digest_sign_init(void *vctx, const char *mdname, void *provkey,
                                const OSSL_PARAM params[])
{
    struct sk_sig *ctx = vctx;
    if (ctx->type == SK_ED25519) {
        if (mdname && mdname[0]) {
            SK_RAISE(ctx->pc, SK_R_UNSUPPORTED_PARAM, "digest %s; Ed25519 signs the message "
                     "itself", mdname);
            return 0;
        }
        return sig_init(ctx, provkey, params);
    }
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
    int max = (ctx->key->pub.bits - 1 + 7) / 8 - (int)md_size - 2;
    int salt = ctx->saltlen;
    if (salt == RSA_PSS_SALTLEN_DIGEST)
        salt = (int)md_size;
    else if (salt == RSA_PSS_SALTLEN_MAX || salt == RSA_PSS_SALTLEN_AUTO)
        salt = max;         /* what OpenSSL's own RSA does when signing */
    return (salt >= 0 && salt <= max) ? salt : -1;
}

/* The request parameters for signing in with ctx: 0 if they cannot be met. */
static int sig_request(struct sk_sig *ctx, size_t inlen, uint32_t p[4])
{
    if (ctx->type != SK_ED25519 && (size_t)EVP_MD_get_size(ctx->md) != inlen) {
        SK_RAISE(ctx->pc, SK_R_UNSUPPORTED_PARAM, "digest is %zu bytes; %s needs %d",
                 inlen, EVP_MD_get0_name(ctx->md), EVP_MD_get_size(ctx->md));
        return 0;
    }
    p[1] = p[2] = p[3] = 0;
    switch (ctx->type) {
    case SK_RSA:
        p[0] = SHMKEY_PAD_PKCS1V15;
        p[1] = ctx->md_code;
        if (ctx->pad == RSA_PKCS1_PSS_PADDING) {
            int salt = sig_salt(ctx, inlen);
            if (salt < 0) {
                SK_RAISE(ctx->pc, SK_R_UNSUPPORTED_PARAM, "PSS salt length %d", ctx->saltlen);
                return 0;
            }
            p[0] = SHMKEY_PAD_PSS;
            p[2] = ctx->mgf1_code ? ctx->mgf1_code : ctx->md_code;
            p[3] = (uint32_t)salt;
        }
        return 1;
    case SK_EC:
        p[0] = SHMKEY_SIG_ECDSA;
        p[1] = ctx->md_code;
        return 1;
    case SK_ED25519:
        p[0] = SHMKEY_SIG_ED25519;
        return 1;
    }
    return 0;
}

/*
 * Sign in the oracle: a digest (RSA, ECDSA) or the message (Ed25519). The
 * reply must have the length its kind allows: an RSA signature is exactly
 * the modulus size, an Ed25519 one 64 bytes, a DER ECDSA one at most size.
 */
static int sig_oracle_sign(struct sk_sig *ctx, const unsigned char *in, size_t inlen,
                           unsigned char *sig, size_t *siglen, size_t sigsize)
{
    struct sk_key *k = ctx->key;
    uint8_t reply[SK_REPLY_MAX];
    uint32_t p[4], got;
    if (!sig_request(ctx, inlen, p))
        return 0;
    if (sigsize < k->pub.size) {
        SK_RAISE(ctx->pc, SK_R_BUFFER_TOO_SMALL, "%zu bytes for a signature of up to %u",
                 sigsize, k->pub.size);
        return 0;
    }
    if (inlen > UINT32_MAX) {
        SK_RAISE(ctx->pc, -SHMKEY_ETOOBIG, "%zu bytes to sign", inlen);
        return 0;
    }
    if (!sk_oracle_call(k, SHMKEY_OP_SIGN, p, in, (uint32_t)inlen, reply, sizeof(reply), &got))
        return 0;
    if (k->pub.type == SK_EC ? got < 8 || got > k->pub.size : got != k->pub.size) {
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
        *siglen = ctx->key->pub.size;
        return 1;
    }
    if (!EVP_DigestFinal_ex(ctx->mdctx, dgst, &dlen))
        return 0;
    return sig_oracle_sign(ctx, dgst, dlen, sig, siglen, sigsize);
}

/* One-shot digest-sign; for Ed25519 the only way to sign. */
static int sig_digest_sign(void *vctx, unsigned char *sig, size_t *siglen, size_t sigsize,
                           const unsigned char *tbs, size_t tbslen)
{
    struct sk_sig *ctx = vctx;
    unsigned char dgst[EVP_MAX_MD_SIZE];
    unsigned int dlen = 0;
    if (!ctx->key || (ctx->type != SK_ED25519 && !ctx->md))
        return 0;
    if (sig == NULL) {
        *siglen = ctx->key->pub.size;
        return 1;
    }
    if (ctx->type == SK_ED25519)
        return sig_oracle_sign(ctx, tbs, tbslen, sig, siglen, sigsize);
    if (!EVP_Digest(tbs, tbslen, dgst, &dlen, ctx->md, NULL))
        return 0;
    return sig_oracle_sign(ctx, dgst, dlen, sig, siglen, sigsize);
}

/* EVP_PKEY_sign: tbs is already a digest; its length names the hash if unset. */
static int sig_sign(void *vctx, unsigned char *sig, size_t *siglen, size_t sigsize,
                    const unsigned char *tbs, size_t tbslen)
{
    struct sk_sig *ctx = vctx;
    if (!ctx->key)
        return 0;
    if (sig == NULL) {
        *siglen = ctx->key->pub.size;
        return 1;
    }
    if (!ctx->md) {
        const char *name = tbslen == 32 ? "SHA256" : tbslen == 48 ? "SHA384"
                         : tbslen == 64 ? "SHA512" : "(none)";
        if (!sig_set_md(ctx, name, NULL))
            return 0;
    }
    return sig_oracle_sign(ctx, tbs, tbslen, sig, siglen, sigsize);
}

/* RSA padding parameters only for RSA; Ed25519 takes no digest either. */
static int sig_set_ctx_params(void *vctx, const OSSL_PARAM params[])
{
    struct sk_sig *ctx = vctx;
    const OSSL_PARAM *p;
    char name[64], props[256];
    if (params == NULL)
        return 1;
    if (ctx->type != SK_RSA &&
        (OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_PAD_MODE) ||
         OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_PSS_SALTLEN) ||
         OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_MGF1_DIGEST) ||
         (ctx->type == SK_ED25519 && OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_DIGEST)))) {
        SK_RAISE(ctx->pc, SK_R_UNSUPPORTED_PARAM, "parameter for another kind of key");
        return 0;
    }
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

static int sig_get_ctx_params(void *vctx, OSSL_PARAM params[])
{
    struct sk_sig *ctx = vctx;
    OSSL_PARAM *p;
    if (ctx->type == SK_ED25519)
        return 1;
    if ((p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_DIGEST)) != NULL &&
        !OSSL_PARAM_set_utf8_string(p, ctx->md ? EVP_MD_get0_name(ctx->md) : ""))
        return 0;
    if (ctx->type != SK_RSA)
        return 1;
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

static const OSSL_PARAM sk_rsa_sig_settable[] = {
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PROPERTIES, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PAD_MODE, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PSS_SALTLEN, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_MGF1_DIGEST, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM sk_rsa_sig_gettable[] = {
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PAD_MODE, NULL, 0),
    OSSL_PARAM_int(OSSL_SIGNATURE_PARAM_PSS_SALTLEN, NULL),
    OSSL_PARAM_END,
};

static const OSSL_PARAM sk_ec_sig_settable[] = {
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PROPERTIES, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM sk_ec_sig_gettable[] = {
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM sk_ed25519_sig_settable[] = {OSSL_PARAM_END};
static const OSSL_PARAM *const sk_ed25519_sig_gettable = sk_ed25519_sig_settable;

/*
 * The per-kind functions of signature t, and the dispatch entries every
 * kind has. RSA and ECDSA add streaming digest-sign and EVP_PKEY_sign of a
 * digest; Ed25519 signs in one shot only, as OpenSSL's own does.
 */
#define SK_SIGNATURE(t, TYPE)                                                          \
    static void *sig_newctx_##t(void *provctx, const char *propq)                     \
    {                                                                                   \
        return sig_newctx_of(TYPE, provctx, propq);                                    \
    }                                                                                   \
    static const OSSL_PARAM *sig_settable_##t(void *vctx, void *provctx)              \
    {                                                                                   \
        return sk_##t##_sig_settable;                                                  \
    }                                                                                   \
    static const OSSL_PARAM *sig_gettable_##t(void *vctx, void *provctx)              \
    {                                                                                   \
        return sk_##t##_sig_gettable;                                                  \
    }
#define SK_SIGNATURE_ENTRIES(t)                                                        \
    {OSSL_FUNC_SIGNATURE_NEWCTX, (void (*)(void))sig_newctx_##t},                      \
    {OSSL_FUNC_SIGNATURE_FREECTX, (void (*)(void))sig_freectx},                        \
    {OSSL_FUNC_SIGNATURE_DUPCTX, (void (*)(void))sig_dupctx},                          \
    {OSSL_FUNC_SIGNATURE_DIGEST_SIGN_INIT, (void (*)(void))sig_digest_sign_init},      \
    {OSSL_FUNC_SIGNATURE_DIGEST_SIGN, (void (*)(void))sig_digest_sign},                \
    {OSSL_FUNC_SIGNATURE_GET_CTX_PARAMS, (void (*)(void))sig_get_ctx_params},          \
    {OSSL_FUNC_SIGNATURE_GETTABLE_CTX_PARAMS, (void (*)(void))sig_gettable_##t},       \
    {OSSL_FUNC_SIGNATURE_SET_CTX_PARAMS, (void (*)(void))sig_set_ctx_params},          \
    {OSSL_FUNC_SIGNATURE_SETTABLE_CTX_PARAMS, (void (*)(void))sig_settable_##t}
#define SK_SIGNATURE_DIGEST_ENTRIES                                                    \
    {OSSL_FUNC_SIGNATURE_SIGN_INIT, (void (*)(void))sig_sign_init},                    \
    {OSSL_FUNC_SIGNATURE_SIGN, (void (*)(void))sig_sign},                              \
    {OSSL_FUNC_SIGNATURE_DIGEST_SIGN_UPDATE, (void (*)(void))sig_digest_sign_update},  \
    {OSSL_FUNC_SIGNATURE_DIGEST_SIGN_FINAL, (void (*)(void))sig_digest_sign_final}

SK_SIGNATURE(rsa, SK_RSA)
SK_SIGNATURE(ec, SK_EC)
SK_SIGNATURE(ed25519, SK_ED25519)

static const OSSL_DISPATCH sk_rsa_signature_functions[] = {
    SK_SIGNATURE_ENTRIES(rsa), SK_SIGNATURE_DIGEST_ENTRIES, {0, NULL},
};

static const OSSL_DISPATCH sk_ec_signature_functions[] = {
    SK_SIGNATURE_ENTRIES(ec), SK_SIGNATURE_DIGEST_ENTRIES, {0, NULL},
};

static const OSSL_DISPATCH sk_ed25519_signature_functions[] = {
    SK_SIGNATURE_ENTRIES(ed25519), {0, NULL},
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
    if (k->pub.type != SK_RSA)
        return 0;
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
    size_t need = ctx->pad == RSA_PKCS1_WITH_TLS_PADDING ? SK_TLS_PMS_LEN : k->pub.size;
    if (out == NULL) {
        *outlen = need;
        return 1;
    }
    if (inlen != k->pub.size) {
        SK_RAISE(ctx->pc, -SHMKEY_EINVAL, "ciphertext is %zu bytes; the key needs %u",
                 inlen, k->pub.size);
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
 * DER -> key, for the decoder of one kind of key. DER that is not a key
 * reference, or one for another kind, is someone else's (return 1
 * empty-handed); a reference of this kind that we cannot use is an error
 * (return 0). A key of a kind none of them takes is the RSA decoder's error,
 * so that it is reported once.
 */
static int ref_decode_of(enum sk_type type, const char *data_type, void *vctx,
                         OSSL_CORE_BIO *cin, OSSL_CALLBACK *data_cb, void *data_cbarg)
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
        enum sk_type found = sk_spki_type(ref->spki);
        if (found != type && !(found == 0 && type == SK_RSA)) {
            /* another decoder's */
        } else if ((k = sk_key_from_ref(pc, ref)) == NULL) {
            ok = 0;
        } else {
            int objtype = OSSL_OBJECT_PKEY;
            OSSL_PARAM params[4];
            params[0] = OSSL_PARAM_construct_int(OSSL_OBJECT_PARAM_TYPE, &objtype);
            params[1] = OSSL_PARAM_construct_utf8_string(OSSL_OBJECT_PARAM_DATA_TYPE,
                                                         (char *)data_type, 0);
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

/* The reference decoder of kind t, which hands OpenSSL keys of DATA_TYPE. */
#define SK_REF_DECODER_FUNCTIONS(t, TYPE, DATA_TYPE)                                   \
    static int ref_decode_##t(void *vctx, OSSL_CORE_BIO *cin, int selection,          \
                              OSSL_CALLBACK *data_cb, void *data_cbarg,                \
                              OSSL_PASSPHRASE_CALLBACK *pw_cb, void *pw_cbarg)         \
    {                                                                                   \
        return ref_decode_of(TYPE, DATA_TYPE, vctx, cin, data_cb, data_cbarg);         \
    }                                                                                   \
    static const OSSL_DISPATCH sk_##t##_ref_decoder_functions[] = {                    \
        {OSSL_FUNC_DECODER_NEWCTX, (void (*)(void))dec_newctx},                        \
        {OSSL_FUNC_DECODER_FREECTX, (void (*)(void))dec_freectx},                      \
        {OSSL_FUNC_DECODER_DOES_SELECTION, (void (*)(void))dec_does_selection},        \
        {OSSL_FUNC_DECODER_DECODE, (void (*)(void))ref_decode_##t},                    \
        {OSSL_FUNC_DECODER_EXPORT_OBJECT, (void (*)(void))ref_export_object},          \
        {0, NULL},                                                                      \
    };

SK_REF_DECODER_FUNCTIONS(rsa, SK_RSA, "RSA")
SK_REF_DECODER_FUNCTIONS(ec, SK_EC, "EC")
SK_REF_DECODER_FUNCTIONS(ed25519, SK_ED25519, "ED25519")

/* ===================================================================== */
/* the provider                                                          */
/* ===================================================================== */

#define SK_PROPS "provider=" SK_PROVIDER_NAME

static const OSSL_ALGORITHM sk_keymgmts[] = {
    {SK_RSA_NAMES, SK_PROPS, sk_rsa_keymgmt_functions, "RSA key held by a shmkey oracle"},
    {SK_EC_NAMES, SK_PROPS, sk_ec_keymgmt_functions, "EC key held by a shmkey oracle"},
    {SK_ED25519_NAMES, SK_PROPS, sk_ed25519_keymgmt_functions,
     "Ed25519 key held by a shmkey oracle"},
    {NULL, NULL, NULL, NULL},
};

static const OSSL_ALGORITHM sk_signatures[] = {
    {SK_RSA_SIG_NAME, SK_PROPS, sk_rsa_signature_functions, "RSA signing in a shmkey oracle"},
    {SK_EC_SIG_NAME, SK_PROPS, sk_ec_signature_functions, "ECDSA signing in a shmkey oracle"},
    {SK_ED25519_SIG_NAME, SK_PROPS, sk_ed25519_signature_functions,
     "Ed25519 signing in a shmkey oracle"},
    {NULL, NULL, NULL, NULL},
};

static const OSSL_ALGORITHM sk_asym_ciphers[] = {
    {SK_ENC_NAME, SK_PROPS, sk_asym_cipher_functions, "RSA decryption in a shmkey oracle"},
    {NULL, NULL, NULL, NULL},
};

static const OSSL_ALGORITHM sk_decoders[] = {
    {"DER", SK_PROPS ",input=pem", sk_pem_decoder_functions, "PEM " SK_PEM_LABEL " to DER"},
#define SK_REF_DECODER(NAMES, t)                                                       \
    {NAMES, SK_PROPS ",input=der,structure=shmkey-key-reference",                       \
     sk_##t##_ref_decoder_functions, "shmkey key reference to key"}
    SK_REF_DECODER(SK_RSA_NAMES, rsa),
    SK_REF_DECODER(SK_EC_NAMES, ec),
    SK_REF_DECODER(SK_ED25519_NAMES, ed25519),
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
        !OSSL_PARAM_set_utf8_ptr(p, shmkey_version()))
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
        sk_pub_clear(&o->pub);
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
 * no longer falls back to "default" by itself. Our keymgmts answer to "RSA",
 * "EC" and "ED25519", so "default" is made the preferred provider (unless a
 * FIPS policy is in force) to keep key generation (libssl's ECDHE keys among
 * them) and import with it. Idempotent.
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

/* The OpenSSL this provider was compiled against, for `shmkey --version`. */
const char *shmkey_openssl_version(void)
{
    return OPENSSL_VERSION_TEXT;
}

/*
 * The version (OSSL_PROV_PARAM_VERSION) of the loadable module at path, into
 * out; on failure out says why. The module is loaded the way OpenSSL loads
 * it for nginx, into a library context of its own that is freed at once, so
 * what is checked is what OpenSSL will see, and the module needs to export
 * nothing but OSSL_provider_init.
 */
int shmkey_openssl_module_version(const char *path, char *out, uint32_t cap)
{
    OSSL_LIB_CTX *libctx;
    OSSL_PROVIDER *prov = NULL;
    const char *version = NULL;
    OSSL_PARAM params[] = {
        OSSL_PARAM_utf8_ptr(OSSL_PROV_PARAM_VERSION, (char **)&version, 0),
        OSSL_PARAM_END,
    };
    int rc = SHMKEY_OK;
    if (!path || !out || cap == 0)
        return SHMKEY_EINVAL;
    ERR_set_mark();
    if ((libctx = OSSL_LIB_CTX_new()) == NULL ||
        (prov = OSSL_PROVIDER_load(libctx, path)) == NULL) {
        unsigned long err = ERR_peek_last_error();
        const char *reason = err ? ERR_reason_error_string(err) : NULL;
        snprintf(out, cap, "OpenSSL cannot load it as a provider (%s)",
                 reason ? reason : "missing or unreadable");
        rc = SHMKEY_EUNAVAIL;
    } else if (!OSSL_PROVIDER_get_params(prov, params) || !version) {
        snprintf(out, cap, "it reports no version");
        rc = SHMKEY_EPROTO;
    } else {
        snprintf(out, cap, "%s", version);
    }
    if (prov)
        OSSL_PROVIDER_unload(prov);
    OSSL_LIB_CTX_free(libctx);
    ERR_pop_to_mark();
    return rc;
}

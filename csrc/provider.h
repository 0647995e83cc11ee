/*
 * provider.h - what the files of shmkey's OpenSSL provider share: the
 * provider context, key objects, reason codes, the few functions one file
 * gives another, and the dispatch tables provider.c lists. Everything else
 * in them is static; the build hides these names too (-fvisibility=hidden),
 * so the module exports nothing but OSSL_provider_init.
 *
 *   provider.c        entry point, algorithm tables, errors, shared parameters,
 *                     and the functions Python calls (shmkey.openssl)
 *   prov_decoder.c    PEM and DER decoders: a key reference file to a key
 *   prov_keyref.c     the key reference's ASN.1, and keys made from one
 *   prov_keymgmt.c    public keys, key objects, and key management
 *   prov_signature.c  signing in the oracle
 *   prov_cipher.c     decryption in the oracle, TLS 1.2's implicit rejection
 *   prov_oracle.c     the oracles named by references, and their connections
 */
#ifndef SHMKEY_PROVIDER_H
#define SHMKEY_PROVIDER_H

#include "internal.h"

#include <stdio.h>

#include <openssl/bn.h>
#include <openssl/core.h>
#include <openssl/core_dispatch.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#define SK_PEM_LABEL "SHMKEY KEY REFERENCE"
#define SK_RSA_SIG_NAME "SHMKEY-RSA-SIG"
#define SK_EC_SIG_NAME "SHMKEY-ECDSA-SIG"
#define SK_ED25519_SIG_NAME "SHMKEY-ED25519-SIG"
#define SK_ENC_NAME "SHMKEY-RSA-ENC"
#define SK_REPLY_MAX 4096u            /* an RSA-16384 signature and a reason */
#define SK_EC_POINT_MAX 97            /* an uncompressed P-384 point */

/*
 * Reasons of our own, above the ones that mirror SHMKEY_E* (1 to -SHMKEY_ELAST).
 * Servers read bare reason numbers, whatever the library: nginx logs a failed
 * handshake at "info" (below its default level) when the reason is one of
 * libssl's that a client causes (101 to 443, and the alerts from 1000), and at
 * "crit" otherwise. So ours stay clear of both ranges; at 101 "holds a different
 * key" was taken for libssl's "no suitable key share" and hidden.
 */
#define SK_R_BAD_REFERENCE 2000
#define SK_R_KEY_MISMATCH 2001
#define SK_R_PUBLIC_ONLY 2002
#define SK_R_UNSUPPORTED_PARAM 2003
#define SK_R_BUFFER_TOO_SMALL 2004
#define SK_R_LIBCRYPTO 2005

/* ===================================================================== */
/* keys and the provider context                                         */
/* ===================================================================== */

enum sk_type { SK_RSA = 1, SK_EC = 2, SK_ED25519 = 3 };

struct sk_curve;        /* a curve the oracle signs with (prov_keymgmt.c) */
struct sk_conn;         /* a connection to an oracle (prov_oracle.c) */

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

/* One oracle as named by key references; shared by every key naming it. */
struct sk_oracle {
    struct sk_oracle *next;
    unsigned users;             /* keys pointing here; guarded by the lock */
    char name[SHMKEY_NAME_MAX + 1];
    int transport;
    int64_t oracle_uid;         /* the uid that must serve it, or SHMKEY_UID_ANY (version 1) */
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

/* ===================================================================== */
/* errors (provider.c)                                                   */
/* ===================================================================== */

#define SK_LAST_ERROR_MAX 448
extern __thread char sk_last_error[SK_LAST_ERROR_MAX];
const char *sk_reason_text(int reason);
void sk_raise_at(struct sk_provctx *pc, const char *file, int line,
                 const char *func, int reason, const char *fmt, ...);

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
/* functions one file gives another                                      */
/* ===================================================================== */

/* provider.c: how long this thread's call may wait for its oracle (0: not at all) */
uint32_t sk_wait_ms(const struct sk_provctx *pc);

/* provider.c: parameters shared by the operations */
int sk_get_utf8(const OSSL_PARAM *p, char *buf, size_t cap);
uint32_t sk_md_code(const EVP_MD *md);
int sk_get_md_param(struct sk_provctx *pc, const OSSL_PARAM *p, const char *propq,
                    const char *what, uint32_t *code);
int sk_get_pad_mode(const OSSL_PARAM *p, int *pad);
int shmkey_provider_init(const OSSL_CORE_HANDLE *handle, const OSSL_DISPATCH *in,
                         const OSSL_DISPATCH **out, void **provctx);

/* prov_keymgmt.c: curves, public keys, key objects */
const struct sk_curve *sk_curve_by_nid(int nid);
void sk_pub_clear(struct sk_pub *p);
int sk_pub_set_rsa(struct sk_pub *p, BIGNUM *n, BIGNUM *e);
int sk_pub_set_ec(struct sk_pub *p, const struct sk_curve *curve,
                  const unsigned char *octets, size_t len);
int sk_pub_set_ed25519(struct sk_pub *p, const unsigned char *key, size_t len);
int sk_pub_copy(struct sk_pub *dst, const struct sk_pub *src);
int sk_pub_equal(const struct sk_pub *a, const struct sk_pub *b);
const char *sk_pub_describe(const struct sk_pub *p, char *buf, size_t cap);
struct sk_key *sk_key_new(struct sk_provctx *pc, enum sk_type type);
void sk_key_ref(struct sk_key *k);
void sk_key_free(struct sk_key *k);

/* prov_keyref.c: key references */
typedef struct sk_ref_st SK_REF;
SK_REF *sk_ref_parse(const unsigned char *der, size_t len);
enum sk_type sk_ref_type(const SK_REF *ref);
void sk_ref_free(SK_REF *ref);
struct sk_key *sk_key_from_ref(struct sk_provctx *pc, const SK_REF *ref);
int sk_parse_spki(const unsigned char *der, long len, struct sk_pub *p);

/* prov_oracle.c: oracles and the calls to them */
struct sk_oracle *sk_oracle_get(struct sk_provctx *pc, const char *name, int transport,
                                int64_t oracle_uid, const uint8_t key_id[32],
                                const struct sk_pub *pub);
void sk_oracle_put(struct sk_provctx *pc, struct sk_oracle *o);
void sk_oracles_free(struct sk_provctx *pc);
int sk_oracle_call(const struct sk_key *k, uint32_t op, const uint32_t p[4],
                   const uint8_t *in, uint32_t in_len,
                   uint8_t *out, uint32_t cap, uint32_t *out_len);

/* ===================================================================== */
/* dispatch tables, listed by provider.c                                 */
/* ===================================================================== */

extern const OSSL_DISPATCH sk_pem_decoder_functions[];
extern const OSSL_DISPATCH sk_rsa_ref_decoder_functions[];
extern const OSSL_DISPATCH sk_ec_ref_decoder_functions[];
extern const OSSL_DISPATCH sk_ed25519_ref_decoder_functions[];
extern const OSSL_DISPATCH sk_rsa_keymgmt_functions[];
extern const OSSL_DISPATCH sk_ec_keymgmt_functions[];
extern const OSSL_DISPATCH sk_ed25519_keymgmt_functions[];
extern const OSSL_DISPATCH sk_rsa_signature_functions[];
extern const OSSL_DISPATCH sk_ec_signature_functions[];
extern const OSSL_DISPATCH sk_ed25519_signature_functions[];
extern const OSSL_DISPATCH sk_asym_cipher_functions[];

#endif

/*
 * prov_keymgmt.c - public keys (RSA, EC P-256/P-384, Ed25519), the key
 * objects that pair one with its oracle, and the keymgmt of each kind:
 * public parts in and out, nothing private ever.
 */
#include "provider.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/objects.h>
#include <openssl/params.h>
#include <openssl/param_build.h>

#define SK_ED25519_KEY_LEN 32
#define SK_ED25519_SIG_LEN 64

/* ===================================================================== */
/* public keys                                                           */
/* ===================================================================== */

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
const struct sk_curve *sk_curve_by_nid(int nid)
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

/* Whether p holds a public key yet (an EC key may know only its curve). */
static int sk_pub_has(const struct sk_pub *p)
{
    return p->type == SK_RSA ? p->n != NULL : p->ptlen != 0;
}

/* Forget the key but not its kind. */
void sk_pub_clear(struct sk_pub *p)
{
    enum sk_type type = p->type;
    BN_free(p->n);
    BN_free(p->e);
    memset(p, 0, sizeof(*p));
    p->type = type;
}

/* Take ownership of n and e; checks what a public RSA key must satisfy. */
int sk_pub_set_rsa(struct sk_pub *p, BIGNUM *n, BIGNUM *e)
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
int sk_pub_set_ec(struct sk_pub *p, const struct sk_curve *curve,
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
int sk_pub_set_ed25519(struct sk_pub *p, const unsigned char *key, size_t len)
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
int sk_pub_copy(struct sk_pub *dst, const struct sk_pub *src)
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
int sk_pub_equal(const struct sk_pub *a, const struct sk_pub *b)
{
    if (a->type != b->type || !sk_pub_has(a) || !sk_pub_has(b))
        return 0;
    if (a->type == SK_RSA)
        return BN_cmp(a->n, b->n) == 0 && BN_cmp(a->e, b->e) == 0;
    return a->curve == b->curve && a->ptlen == b->ptlen && memcmp(a->pt, b->pt, a->ptlen) == 0;
}

/* "RSA-2048", "EC P-256", "Ed25519": how errors name a key. */
const char *sk_pub_describe(const struct sk_pub *p, char *buf, size_t cap)
{
    if (p->type == SK_RSA)
        snprintf(buf, cap, "RSA-%d", p->bits);
    else if (p->type == SK_EC)
        snprintf(buf, cap, "EC %s", p->curve ? p->curve->label : "?");
    else
        snprintf(buf, cap, "Ed25519");
    return buf;
}

/* ===================================================================== */
/* keys                                                                  */
/* ===================================================================== */

struct sk_key *sk_key_new(struct sk_provctx *pc, enum sk_type type)
{
    struct sk_key *k = calloc(1, sizeof(*k));
    if (k) {
        k->pc = pc;
        k->refs = 1;
        k->pub.type = type;
    }
    return k;
}

void sk_key_ref(struct sk_key *k)
{
    __atomic_add_fetch(&k->refs, 1, __ATOMIC_RELAXED);
}

void sk_key_free(struct sk_key *k)
{
    if (!k || __atomic_sub_fetch(&k->refs, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    sk_oracle_put(k->pc, k->oracle);
    sk_pub_clear(&k->pub);
    free(k);
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
    const OSSL_DISPATCH sk_##t##_keymgmt_functions[] = {                               \
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

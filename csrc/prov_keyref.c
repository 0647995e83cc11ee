/*
 * prov_keyref.c - the key reference's ASN.1 (ShmkeyKeyReference and the
 * SubjectPublicKeyInfo it carries), and the key made from a parsed one.
 */
#include "provider.h"

#include <string.h>

#include <openssl/asn1t.h>
#include <openssl/err.h>
#include <openssl/objects.h>
#include <openssl/x509.h>

/*
 * ShmkeyKeyReference ::= SEQUENCE {
 *     version    INTEGER,               -- 2 (SHMKEY_KEYREF_VERSION), or 1
 *     oracle     UTF8String,            -- name given to `shmkey serve --name`
 *     transport  INTEGER,               -- SHMKEY_TRANSPORT_ANY, _SHM or _SOCKET
 *     keyId      OCTET STRING,          -- SHA-256 of publicKey's DER
 *     publicKey  SubjectPublicKeyInfo,  -- RSA, EC P-256/P-384 or Ed25519
 *     oracleUid  INTEGER OPTIONAL }     -- version 2 only: the uid the oracle runs as
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

struct sk_ref_st {
    ASN1_INTEGER *version;
    ASN1_UTF8STRING *oracle;
    ASN1_INTEGER *transport;
    ASN1_OCTET_STRING *key_id;  /* SHA-256 of the SPKI: the key's name at the oracle */
    SK_SPKI *spki;
    ASN1_INTEGER *oracle_uid;   /* version 2: who must serve it */
};

ASN1_SEQUENCE(SK_REF) = {
    ASN1_SIMPLE(SK_REF, version, ASN1_INTEGER),
    ASN1_SIMPLE(SK_REF, oracle, ASN1_UTF8STRING),
    ASN1_SIMPLE(SK_REF, transport, ASN1_INTEGER),
    ASN1_SIMPLE(SK_REF, key_id, ASN1_OCTET_STRING),
    ASN1_SIMPLE(SK_REF, spki, SK_SPKI),
    ASN1_OPT(SK_REF, oracle_uid, ASN1_INTEGER),
} static_ASN1_SEQUENCE_END(SK_REF)

typedef struct {
    BIGNUM *n;
    BIGNUM *e;
} SK_RSAPUB;

ASN1_SEQUENCE(SK_RSAPUB) = {
    ASN1_SIMPLE(SK_RSAPUB, n, BIGNUM),
    ASN1_SIMPLE(SK_RSAPUB, e, BIGNUM),
} static_ASN1_SEQUENCE_END(SK_RSAPUB)

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

/* SubjectPublicKeyInfo DER -> p. */
int sk_parse_spki(const unsigned char *der, long len, struct sk_pub *p)
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

/* DER -> SK_REF if it is exactly one key reference, else NULL (no error left). */
SK_REF *sk_ref_parse(const unsigned char *der, size_t len)
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

void sk_ref_free(SK_REF *ref)
{
    ASN1_item_free((ASN1_VALUE *)ref, ASN1_ITEM_rptr(SK_REF));
}

/* The kind of key a reference is for; 0 if none we handle. */
enum sk_type sk_ref_type(const SK_REF *ref)
{
    return sk_spki_type(ref->spki);
}

/*
 * A key from a parsed reference. Returns NULL with an error queued when the
 * reference is ours but unusable (newer version, bad name, a key of a kind
 * or curve the provider does not handle).
 */
struct sk_key *sk_key_from_ref(struct sk_provctx *pc, const SK_REF *ref)
{
    long version = ASN1_INTEGER_get(ref->version);
    long transport = ASN1_INTEGER_get(ref->transport);
    char name[SHMKEY_NAME_MAX + 1];
    int64_t uid = SHMKEY_UID_ANY;
    struct sk_key *k;

    if (version != 1 && version != SHMKEY_KEYREF_VERSION) {
        SK_FAIL(pc, SK_R_BAD_REFERENCE, "version %ld; this shmkey reads versions 1 to %d",
                 version, SHMKEY_KEYREF_VERSION);
        return NULL;
    }
    /* Version 1 names no oracle user: such a reference keeps the old rule, any. */
    if ((version == 1) != (ref->oracle_uid == NULL)) {
        SK_FAIL(pc, SK_R_BAD_REFERENCE, "version %ld %s an oracle uid", version,
                version == 1 ? "with" : "without");
        return NULL;
    }
    if (ref->oracle_uid) {
        uint64_t v;
        if (!ASN1_INTEGER_get_uint64(&v, ref->oracle_uid) || v > UINT32_MAX - 1) {
            SK_FAIL(pc, SK_R_BAD_REFERENCE, "bad oracle uid");
            return NULL;
        }
        uid = (int64_t)v;
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
    k->oracle = sk_oracle_get(pc, name, (int)transport, uid, ASN1_STRING_get0_data(ref->key_id),
                              &k->pub);
    if (!k->oracle) {
        sk_key_free(k);
        return NULL;
    }
    return k;
}

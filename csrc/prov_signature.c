/*
 * prov_signature.c - signing in the oracle: "SHMKEY-RSA-SIG" (PKCS#1 v1.5
 * and PSS), "SHMKEY-ECDSA-SIG" and "SHMKEY-ED25519-SIG", each digest-sign
 * (the digest is made here) and, but for Ed25519, sign of a digest.
 */
#include "provider.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/params.h>
#include <openssl/rsa.h>

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

const OSSL_DISPATCH sk_rsa_signature_functions[] = {
    SK_SIGNATURE_ENTRIES(rsa), SK_SIGNATURE_DIGEST_ENTRIES, {0, NULL},
};

const OSSL_DISPATCH sk_ec_signature_functions[] = {
    SK_SIGNATURE_ENTRIES(ec), SK_SIGNATURE_DIGEST_ENTRIES, {0, NULL},
};

const OSSL_DISPATCH sk_ed25519_signature_functions[] = {
    SK_SIGNATURE_ENTRIES(ed25519), {0, NULL},
};

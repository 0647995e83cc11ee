/*
 * prov_cipher.c - decryption in the oracle ("SHMKEY-RSA-ENC"): OAEP,
 * PKCS#1 v1.5, and TLS 1.2's RSA key exchange, whose implicit rejection is
 * done here in constant time.
 */
#include "provider.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/params.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>

#define SK_TLS_PMS_LEN 48             /* TLS 1.2 premaster secret */

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

const OSSL_DISPATCH sk_asym_cipher_functions[] = {
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

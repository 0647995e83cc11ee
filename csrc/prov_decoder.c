/*
 * prov_decoder.c - the provider's decoders: "DER" (input=pem) finds our PEM
 * block among others in a file and hands its DER on; "RSA", "EC" and
 * "ED25519" (input=der) each turn a key reference of their kind into a key.
 */
#include "provider.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/core_object.h>
#include <openssl/err.h>
#include <openssl/params.h>
#include <openssl/pem.h>

#define SK_PEM_BEGIN "-----BEGIN " SK_PEM_LABEL "-----"
#define SK_PEM_READ_MAX (4u << 20)    /* a cert chain and a reference fit easily */
#define SK_DER_READ_MAX (64u << 10)

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
        sk_ref_free(ref);
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
        enum sk_type found = sk_ref_type(ref);
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
    sk_ref_free(ref);
    free(buf);
    return ok;
}

/* A reference carries no key another provider could use: never export it. */
static int ref_export_object(void *vctx, const void *objref, size_t objref_sz,
                             OSSL_CALLBACK *export_cb, void *export_cbarg)
{
    return 0;
}

const OSSL_DISPATCH sk_pem_decoder_functions[] = {
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
    const OSSL_DISPATCH sk_##t##_ref_decoder_functions[] = {                           \
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

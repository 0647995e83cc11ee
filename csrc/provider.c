/*
 * provider.c - the entry point of an OpenSSL 3 provider whose private-key
 * operations run in a shmkey key oracle: RSA (sign, decrypt), ECDSA on
 * P-256 and P-384 (sign), and Ed25519 (sign). Here: its algorithm tables,
 * reason strings, parameters and teardown, the errors and parameter
 * helpers its operations share, and the functions Python calls
 * (shmkey.openssl). Each operation has a file of its own (see provider.h).
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
#include "provider.h"

#include <dlfcn.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/params.h>
#include <openssl/provider.h>
#include <openssl/rsa.h>

#define SK_PROVIDER_NAME "shmkey"
/* The default provider's names: libssl finds a key's certificate slot by them. */
#define SK_RSA_NAMES "RSA:rsaEncryption:1.2.840.113549.1.1.1"
#define SK_EC_NAMES "EC:id-ecPublicKey:1.2.840.10045.2.1"
#define SK_ED25519_NAMES "ED25519:1.3.101.112"
#define SK_DEFAULT_TIMEOUT_MS 5000u

/* ===================================================================== */
/* errors                                                                */
/* ===================================================================== */

/* Why this thread's last provider operation (loading a key reference, or a
 * call to the oracle) failed, "" if it did not. For Python, whose ssl module
 * reports only the last OpenSSL error: libssl's own, not ours. */
__thread char sk_last_error[SK_LAST_ERROR_MAX];

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
    for (int status = SHMKEY_EINVAL; status >= SHMKEY_ERATELIMIT; status--)
        sk_reasons[n++] = (OSSL_ITEM){(unsigned)-status, (char *)shmkey_strerror(status)};
    for (size_t i = 0; i < sizeof(own) / sizeof(own[0]); i++)
        sk_reasons[n++] = (OSSL_ITEM){(unsigned)own[i].code, (char *)own[i].text};
    sk_reasons[n] = (OSSL_ITEM){0, NULL};
}

const char *sk_reason_text(int reason)
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
void sk_raise_at(struct sk_provctx *pc, const char *file, int line,
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

/* ===================================================================== */
/* parameters shared by the operations                                   */
/* ===================================================================== */

int sk_get_utf8(const OSSL_PARAM *p, char *buf, size_t cap)
{
    return OSSL_PARAM_get_utf8_string(p, &buf, cap);
}

/* The wire code of a digest (shmkey.h SHMKEY_HASH_*), 0 if the oracle has none. */
uint32_t sk_md_code(const EVP_MD *md)
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
int sk_get_md_param(struct sk_provctx *pc, const OSSL_PARAM *p, const char *propq,
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
int sk_get_pad_mode(const OSSL_PARAM *p, int *pad)
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
    sk_oracles_free(pc);
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

/*
 * signer_token.c - the PKCS#11 part of the oracle's C signer: a token key's
 * common signatures, one C_SignInit and one C_Sign on the session Python
 * opened, mirroring oracle/pkcs11.py and nothing more.
 *
 * Python owns the module and its sessions: it loaded and initialized the
 * module in this process (dlopen here returns that same library, and
 * C_GetFunctionList the same instance), opens, re-opens and closes sessions,
 * and tells C the handles to use. This file never initializes, finalizes,
 * logs in or opens anything. Any CK_RV but CKR_OK, and anything unexpected,
 * is "not signed here": Python redoes the request and deals with the token
 * (reports the error, re-opens the session), and then gives C new handles.
 * A stale handle so costs one failed call, never a crash: the module stays
 * mapped (our dlopen reference) even if Python lets go of it.
 */
#include "internal.h"

#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/bn.h>
#include <openssl/ec.h>
#include <p11-kit/pkcs11.h>

/* DigestInfo prefixes (RFC 8017 9.2 note 1), by hash index: CKM_RSA_PKCS
   signs DigestInfo || digest. Python reads them from here (shmkey_digest_info). */
#define DIGEST_INFO_LEN 19
static const uint8_t digest_info[SHMKEY_SIGNER_NHASH][DIGEST_INFO_LEN] = {
    {0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01,
     0x05, 0x00, 0x04, 0x20},
    {0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02,
     0x05, 0x00, 0x04, 0x30},
    {0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03,
     0x05, 0x00, 0x04, 0x40},
};
/* The hash and MGF1 of PSS, by hash index. */
static const CK_MECHANISM_TYPE pss_hash[SHMKEY_SIGNER_NHASH] = {CKM_SHA256, CKM_SHA384,
                                                                 CKM_SHA512};
static const CK_RSA_PKCS_MGF_TYPE pss_mgf[SHMKEY_SIGNER_NHASH] = {CKG_MGF1_SHA256,
                                                                   CKG_MGF1_SHA384,
                                                                   CKG_MGF1_SHA512};

int shmkey_digest_info(uint32_t hash, const uint8_t **prefix, uint32_t *len)
{
    int h = hash == SHMKEY_HASH_SHA256 ? 0 : hash == SHMKEY_HASH_SHA384 ? 1
          : hash == SHMKEY_HASH_SHA512 ? 2 : -1;
    if (h < 0 || !prefix || !len)
        return SHMKEY_EINVAL;
    *prefix = digest_info[h];
    *len = DIGEST_INFO_LEN;
    return SHMKEY_OK;
}

int shmkey_token_open(struct signer_token *t, const char *module_path, uint32_t sig_len)
{
    /* The library is already loaded (python-pkcs11): this takes one more reference. */
    void *dl = dlopen(module_path, RTLD_NOW);
    if (!dl)
        return SHMKEY_ESYSTEM;
    CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(dl, "C_GetFunctionList");
    CK_FUNCTION_LIST *fl = NULL;
    if (!get || get(&fl) != CKR_OK || !fl || !fl->C_SignInit || !fl->C_Sign) {
        dlclose(dl);
        return SHMKEY_EUNSUPPORTED;
    }
    t->dl = dl;
    t->fl = fl;
    t->sig_len = sig_len;
    t->session = t->object = CK_INVALID_HANDLE;
    return SHMKEY_OK;
}

void shmkey_token_close(struct signer_token *t)
{
    if (t->dl)
        dlclose(t->dl);
    t->dl = t->fl = NULL;
}

/* r || s (each half big-endian, as CKM_ECDSA returns it) as a DER ECDSA-Sig-Value. */
static int ecdsa_der(const uint8_t *raw, size_t raw_len, uint8_t *out, size_t *out_len)
{
    size_t half = raw_len / 2;
    ECDSA_SIG *sig = ECDSA_SIG_new();
    BIGNUM *r = BN_bin2bn(raw, (int)half, NULL), *s = BN_bin2bn(raw + half, (int)half, NULL);
    int ok = sig && r && s && ECDSA_SIG_set0(sig, r, s) == 1;
    if (!ok) {
        BN_free(r);
        BN_free(s);
    }
    int len = ok ? i2d_ECDSA_SIG(sig, NULL) : -1;
    ok = len > 0 && (size_t)len <= *out_len;
    if (ok) {
        unsigned char *p = out;
        ok = i2d_ECDSA_SIG(sig, &p) == len;
        *out_len = (size_t)len;
    }
    ECDSA_SIG_free(sig);
    return ok;
}

/* C_Sign's CKR_BUFFER_TOO_SMALL leaves the operation active, and the session
   would then refuse Python's C_SignInit: end it with the room the token asked
   for (sig_len fits our buffer, so only a token that misreports lengths gets here). */
static void end_sign(CK_FUNCTION_LIST *fl, unsigned long session, const uint8_t *data,
                     CK_ULONG data_len, CK_ULONG need)
{
    uint8_t *buf = need <= 65536 ? malloc(need ? need : 1) : NULL;
    if (buf)
        fl->C_Sign(session, (CK_BYTE *)data, data_len, buf, &need);
    free(buf);
}

int shmkey_token_sign(const struct signer_token *t, unsigned long session, unsigned long object,
                      int shape, int h, const struct shmkey_work *w, uint8_t *out,
                      size_t *out_len)
{
    CK_FUNCTION_LIST *fl = t->fl;
    CK_RSA_PKCS_PSS_PARAMS pss;
    CK_MECHANISM mech = {0, NULL, 0};
    uint8_t msg[DIGEST_INFO_LEN + 64];
    const uint8_t *data = w->payload;
    CK_ULONG data_len = w->req.in_len;
    switch (shape) {
    case SHMKEY_SHAPE_PKCS1:
        if (data_len > sizeof(msg) - DIGEST_INFO_LEN)
            return 0;
        memcpy(msg, digest_info[h], DIGEST_INFO_LEN);
        memcpy(msg + DIGEST_INFO_LEN, data, data_len);
        mech.mechanism = CKM_RSA_PKCS;
        data = msg;
        data_len += DIGEST_INFO_LEN;
        break;
    case SHMKEY_SHAPE_PSS:
        pss.hashAlg = pss_hash[h];
        pss.mgf = pss_mgf[h];
        pss.sLen = data_len;                /* a digest-long salt: the only PSS made here */
        mech = (CK_MECHANISM){CKM_RSA_PKCS_PSS, &pss, sizeof(pss)};
        break;
    case SHMKEY_SHAPE_ECDSA:
        mech.mechanism = CKM_ECDSA;
        break;
    case SHMKEY_SHAPE_ED25519:
        mech.mechanism = CKM_EDDSA;         /* no parameters: pure Ed25519 */
        break;
    default:
        return 0;
    }
    uint8_t raw[SHMKEY_SIGNER_MAX_SIG];
    CK_ULONG raw_len = sizeof(raw);
    CK_RV rv = fl->C_SignInit(session, &mech, object);
    if (rv == CKR_OK) {
        rv = fl->C_Sign(session, (CK_BYTE *)data, data_len, raw, &raw_len);
        if (rv == CKR_BUFFER_TOO_SMALL)
            end_sign(fl, session, data, data_len, raw_len);
    }
    if (rv != CKR_OK || raw_len != t->sig_len)
        return 0;
    if (shape == SHMKEY_SHAPE_ECDSA)
        return raw_len % 2 == 0 && ecdsa_der(raw, raw_len, out, out_len);
    if (raw_len > *out_len)
        return 0;
    memcpy(out, raw, raw_len);
    *out_len = raw_len;
    return 1;
}

/*
 * provider_keymgmt.c - checks of the provider's EC and Ed25519 key management
 * through OpenSSL's public API, with shmkey's module loaded from OPENSSL_CONF
 * (what `shmkey openssl-conf` prints). Run by tests/test_provider_ec.py.
 *
 * For each key it makes a throwaway key with the default provider (this is a
 * test program: the key is not worth protecting), then imports parts of it
 * into shmkey's keymgmt ("provider=shmkey") and prints one line per check:
 *   "ok <what>" or "FAIL <what>", then "done".
 */
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/provider.h>
#include <stdio.h>
#include <string.h>

static int failures;

static void check(int ok, const char *kind, const char *what)
{
    printf("%s %s: %s\n", ok ? "ok" : "FAIL", kind, what);
    if (!ok) {
        failures++;
        ERR_print_errors_fp(stdout);
    }
    ERR_clear_error();
}

/* A key in shmkey's keymgmt built from params; NULL if it refuses them. */
static EVP_PKEY *import_into_shmkey(const char *type, int selection, OSSL_PARAM *params)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(NULL, type, "provider=shmkey");
    EVP_PKEY *pkey = NULL;
    if (ctx && EVP_PKEY_fromdata_init(ctx) > 0)
        EVP_PKEY_fromdata(ctx, &pkey, selection, params);
    EVP_PKEY_CTX_free(ctx);
    return pkey;
}

static int from_shmkey(const EVP_PKEY *pkey)
{
    const OSSL_PROVIDER *prov = EVP_PKEY_get0_provider(pkey);
    return prov && strcmp(OSSL_PROVIDER_get0_name(prov), "shmkey") == 0;
}

/* The import, comparison and parameter checks every kind of key gets. */
static void check_kind(const char *kind, const char *type, EVP_PKEY *real, int bits, int size)
{
    OSSL_PARAM *all = NULL, *pub = NULL;
    EVP_PKEY *ours;
    char group[64] = "";

    check(EVP_PKEY_todata(real, EVP_PKEY_KEYPAIR, &all) > 0, kind, "export the real key");
    ours = import_into_shmkey(type, EVP_PKEY_KEYPAIR, all);
    check(ours == NULL, kind, "an import that carries the private key is refused");
    EVP_PKEY_free(ours);

    check(EVP_PKEY_todata(real, EVP_PKEY_PUBLIC_KEY, &pub) > 0, kind, "export the public key");
    ours = import_into_shmkey(type, EVP_PKEY_PUBLIC_KEY, pub);
    check(ours != NULL && from_shmkey(ours), kind, "a public import is shmkey's key");
    if (ours) {
        check(EVP_PKEY_eq(ours, real) == 1 && EVP_PKEY_eq(real, ours) == 1, kind,
              "it matches the real key both ways");
        check(EVP_PKEY_get_bits(ours) == bits && EVP_PKEY_get_size(ours) == size, kind,
              "bits and signature size");
        check(EVP_PKEY_is_a(ours, type), kind, "its type");
        if (strcmp(type, "EC") == 0) {
            EVP_PKEY_get_group_name(real, group, sizeof(group), NULL);
            char mine[64] = "";
            check(EVP_PKEY_get_group_name(ours, mine, sizeof(mine), NULL) > 0 &&
                  strcmp(mine, group) == 0, kind, "its group name");
        }
        /* Without an oracle it cannot sign: no private half to find. */
        EVP_MD_CTX *md = EVP_MD_CTX_new();
        int init = EVP_DigestSignInit_ex(md, NULL, strcmp(type, "EC") == 0 ? "SHA256" : NULL,
                                         NULL, NULL, ours, NULL);
        check(init <= 0, kind, "a public key alone does not sign");
        EVP_MD_CTX_free(md);
    }
    EVP_PKEY_free(ours);
    OSSL_PARAM_free(all);
    OSSL_PARAM_free(pub);
}

/* EC points arrive in any encoding; off-curve ones are refused. */
static void check_points(const char *kind, EVP_PKEY *real, const char *group)
{
    unsigned char point[133], compressed[67];
    size_t len = 0;
    EVP_PKEY *ours;
    if (!EVP_PKEY_get_octet_string_param(real, OSSL_PKEY_PARAM_PUB_KEY, point, sizeof(point),
                                         &len) || len < 3 || point[0] != 0x04) {
        check(0, kind, "read the uncompressed point");
        return;
    }
    size_t half = (len - 1) / 2;
    compressed[0] = (unsigned char)(0x02 | (point[len - 1] & 1));
    memcpy(compressed + 1, point + 1, half);
    OSSL_PARAM params[3];
    params[0] = OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, (char *)group, 0);
    params[1] = OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY, compressed, half + 1);
    params[2] = OSSL_PARAM_construct_end();
    ours = import_into_shmkey("EC", EVP_PKEY_PUBLIC_KEY, params);
    check(ours != NULL && EVP_PKEY_eq(ours, real) == 1, kind,
          "a compressed point is the same key");
    EVP_PKEY_free(ours);

    point[len - 1] ^= 1;    /* (x, y ^ 1) is not on the curve */
    params[1] = OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY, point, len);
    ours = import_into_shmkey("EC", EVP_PKEY_PUBLIC_KEY, params);
    check(ours == NULL, kind, "a point off the curve is refused");
    EVP_PKEY_free(ours);

    params[0] = OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME,
                                                 (char *)"secp521r1", 0);
    point[len - 1] ^= 1;
    ours = import_into_shmkey("EC", EVP_PKEY_PUBLIC_KEY, params);
    check(ours == NULL, kind, "a curve the oracle does not sign with is refused");
    EVP_PKEY_free(ours);
}

int main(void)
{
    EVP_PKEY *p256 = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    EVP_PKEY *p384 = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-384");
    EVP_PKEY *ed = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
    if (!p256 || !p384 || !ed) {
        ERR_print_errors_fp(stdout);
        return 2;
    }
    check_kind("P-256", "EC", p256, 256, 72);
    check_kind("P-384", "EC", p384, 384, 104);
    check_kind("Ed25519", "ED25519", ed, 256, 64);
    check_points("P-256", p256, "prime256v1");
    check_points("P-384", p384, "secp384r1");
    EVP_PKEY_free(p256);
    EVP_PKEY_free(p384);
    EVP_PKEY_free(ed);
    printf("done\n");
    return failures ? 1 : 0;
}

/*
 * provider_module.c - OSSL_provider_init, the one symbol the loadable module
 * (shmkey/ossl-modules/shmkey.so) exports, for programs that load shmkey's
 * provider from openssl.cnf or with -provider. It is the provider of
 * provider.c; Python registers the same code as a builtin instead.
 */
#include "provider.h"

__attribute__((visibility("default")))
int OSSL_provider_init(const OSSL_CORE_HANDLE *handle, const OSSL_DISPATCH *in,
                       const OSSL_DISPATCH **out, void **provctx)
{
    return shmkey_provider_init(handle, in, out, provctx);
}

"""OpenSSL 3 integration, on the network side: shmkey's provider (registered
into Python's ``ssl`` or loaded as a module by nginx, haproxy and ``openssl``)
and the key reference files it loads in place of a private key.
"""
from .provider import (PROVIDER_NAME, check_libcrypto, check_module, enable, last_error,
                       module_dir, module_path, openssl_conf, set_deadline)

__all__ = ["PROVIDER_NAME", "check_libcrypto", "check_module", "enable", "last_error",
           "module_dir", "module_path", "openssl_conf", "set_deadline"]

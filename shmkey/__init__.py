"""shmkey: keep a TLS server's private key in a separate key oracle process,
reached over a shared-memory ring (or a socket, to compare).

    with shmkey.KeyOracle("server.key") as oracle:
        key = oracle.private_key()          # duck-types RSAPrivateKey
        sig = key.sign(data, padding.PSS(...), hashes.SHA256())
"""
from ._version import __version__ as __version__
from ._wire import key_id
from .client import OracleClient, OracleECKey, OracleEd25519Key, OracleKey, connect
from .config import Config
from .errors import (ConfigError, DecryptionError, InvalidArgumentError, KeyIsolatedError,
                     KeyLoadError, KeyMismatchError, KeyReferenceError, LibcryptoMismatchError,
                     OracleAccessError, OracleIdentityError, OracleInternalError,
                     OracleTimeoutError, OracleUnavailableError, PolicyError, ProtocolError,
                     RateLimitError, ShmkeyError, StaleBuildError, SystemCallError,
                     TokenUnavailableError, UnsupportedOperationError)
from .launcher import KeyOracle

__all__ = [
    "Config", "ConfigError", "DecryptionError", "InvalidArgumentError", "KeyIsolatedError",
    "KeyLoadError", "KeyMismatchError", "KeyOracle", "KeyReferenceError", "LibcryptoMismatchError",
    "OracleAccessError", "OracleClient", "OracleECKey", "OracleEd25519Key", "OracleIdentityError",
    "OracleInternalError", "OracleKey", "OracleTimeoutError", "OracleUnavailableError", "PolicyError",
    "ProtocolError", "RateLimitError", "ShmkeyError", "StaleBuildError", "SystemCallError",
    "TokenUnavailableError", "UnsupportedOperationError", "connect",
    "key_id",
]

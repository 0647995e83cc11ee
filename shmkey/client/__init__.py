"""The network side: the library a TLS server (or any program) uses to reach a
running key oracle. Nothing here ever holds a private key.
"""
from .connection import OracleClient, connect
from .keys import AnyOracleKey, OracleECKey, OracleEd25519Key, OracleKey

__all__ = ["AnyOracleKey", "OracleClient", "OracleECKey", "OracleEd25519Key", "OracleKey", "connect"]

"""The one version string of shmkey: pyproject.toml reads it, and the C build
compiles it into the extension and the OpenSSL module, which are checked
against it at import (``_binding``) and when Python hands the module out
(``shmkey.openssl``).
"""
__version__ = "0.1.0"

"""Use an oracle-held key from OpenSSL 3. :func:`enable` registers shmkey's
provider in the libcrypto that Python's ``ssl`` module uses, after which
``SSLContext.load_cert_chain(cert, "key.ref.pem")`` loads a key reference
(see ``shmkey.openssl.keyref``). For other programs (``openssl``, nginx), the same
provider is a loadable module: :func:`module_path` and :func:`openssl_conf`.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Optional

from .._binding import REBUILD, check_build, ensure, ffi, lib
from .._version import __version__
from ..errors import LibcryptoMismatchError, StaleBuildError

PROVIDER_NAME = "shmkey"

_lock = threading.Lock()
_enabled = False
_checked: set[tuple[Path, str]] = set()   # (module, version) found good
_DETAIL = 512


def enable() -> None:
    """Register shmkey's OpenSSL provider for Python's ``ssl`` module.

    Loads OpenSSL's ``default`` provider explicitly too (loading any provider
    turns off OpenSSL's automatic fallback to it) and makes it the preferred
    one (``?provider=default``), unless a FIPS policy is in force, so that
    only key references reach shmkey's RSA, EC and Ed25519 key management. Safe to call more than once; a
    no-op if an openssl.cnf already loaded the module.

    Raises:
        LibcryptoMismatchError: ``ssl`` uses another libcrypto than shmkey's
            extension, so registering would silently change nothing.
        OracleInternalError: OpenSSL refused to load the provider.
    """
    global _enabled
    with _lock:
        if _enabled:
            return
        check_libcrypto()
        detail = ffi.new("char[]", _DETAIL)
        rc = lib.shmkey_openssl_enable(detail, _DETAIL)
        ensure(rc, ffi.string(detail).decode("utf-8", "replace"))
        _enabled = True


def check_libcrypto(module_file: Optional[str] = None) -> None:
    """Check that a loaded extension uses the libcrypto shmkey's provider is built for.

    Args:
        module_file: path of a loaded shared object; Python's ``_ssl`` by default.

    Raises:
        LibcryptoMismatchError: it resolves OpenSSL 3's libcrypto elsewhere, or not at all.
    """
    if module_file is None:
        import _ssl  # the extension whose libcrypto matters

        module_file = getattr(_ssl, "__file__", None)
    detail = ffi.new("char[]", _DETAIL)
    rc = lib.shmkey_openssl_same_libcrypto(
        os.fsencode(module_file) if module_file else ffi.NULL, detail, _DETAIL)
    if rc != lib.SHMKEY_OK:
        raise LibcryptoMismatchError(ffi.string(detail).decode("utf-8", "replace"))


def last_error() -> Optional[str]:
    """Why the provider's last operation in this thread failed; None if it succeeded.

    The operations are: loading a key reference, and each sign or decrypt in
    the oracle. Python's ``ssl`` reports only OpenSSL's last error, libssl's
    generic one ("PEM lib", "EVP lib"); this names the cause, e.g. "the key
    oracle is not running: oracle 'web'". Call it in the thread that saw the
    ``SSLError``, before that thread's next handshake.
    """
    buf = ffi.new("char[]", 256)
    ensure(lib.shmkey_openssl_last_error(buf, 256))
    text = ffi.string(buf).decode("utf-8", "replace")
    return text or None


def set_deadline(deadline: Optional[float]) -> None:
    """Bound this thread's waits for oracles by ``deadline``, a ``time.monotonic()``
    time; None removes the bound.

    A private-key operation in this thread then waits for its oracle until
    the deadline at most (less if the provider's own timeout comes first),
    and one called after it fails at once, as a timed-out one does. A
    handshake with a total time limit sets it before each step.
    """
    ns = 0 if deadline is None else max(1, int(deadline * 1e9))
    ensure(lib.shmkey_openssl_set_deadline(ns))


def module_dir() -> Path:
    """Directory of the loadable module, for ``openssl ... -provider-path``."""
    return Path(__file__).resolve().parent.parent / "ossl-modules"


def module_path() -> Path:
    """The loadable module (``OSSL_provider_init``), for openssl.cnf's ``module =``.

    Raises:
        StaleBuildError: the module is missing, or was built from another
            version of shmkey than this code.
    """
    path = module_dir() / f"{PROVIDER_NAME}.so"
    check_module(path)
    return path


def check_module(path: Path, expected: str = __version__) -> None:
    """Check, once per path and process, that the module at ``path`` is this shmkey's build.

    The module exports nothing but ``OSSL_provider_init``, so its version is
    asked the way OpenSSL asks it (``OSSL_PROV_PARAM_VERSION``), in a library
    context of its own that is freed at once: what nginx would load is what
    is checked, without loading it into the context that ``ssl`` uses.

    Raises:
        StaleBuildError: it is missing, not loadable, or of another version.
    """
    if (path, expected) in _checked:
        return
    out = ffi.new("char[]", _DETAIL)
    rc = lib.shmkey_openssl_module_version(os.fsencode(path), out, _DETAIL)
    text = ffi.string(out).decode("utf-8", "replace")
    what = f"shmkey's OpenSSL module {path}"
    if rc != lib.SHMKEY_OK:
        raise StaleBuildError(f"{what} is unusable: {text}; {REBUILD}")
    check_build(what, text, expected)
    _checked.add((path, expected))


def openssl_conf(timeout_ms: Optional[int] = None) -> str:
    """A complete openssl.cnf that loads the default provider and shmkey's.

    Point ``OPENSSL_CONF`` at it for ``openssl``, nginx or any program built
    on the system OpenSSL 3. To merge it into an existing openssl.cnf, add
    the ``shmkey`` line and section to its provider list instead.

    Args:
        timeout_ms: how long a private-key operation waits for the oracle
            (the provider's default is 5000).
    """
    timeout = "" if timeout_ms is None else f"timeout_ms = {int(timeout_ms)}\n"
    return f"""\
# openssl.cnf for shmkey: private keys named by key reference files
# ("shmkey keyref") are used through the key oracle that holds them.
openssl_conf = openssl_init

[openssl_init]
providers = provider_sect
alg_section = algorithm_sect

[provider_sect]
default = default_sect
{PROVIDER_NAME} = {PROVIDER_NAME}_sect

[default_sect]
activate = 1

[{PROVIDER_NAME}_sect]
module = {module_path()}
activate = 1
{timeout}
[algorithm_sect]
# shmkey's key management answers to "RSA", "EC" and "ED25519" too: keep
# OpenSSL's own preferred.
default_properties = ?provider=default
"""

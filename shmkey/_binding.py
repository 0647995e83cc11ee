"""The compiled C layer (``ffi``, ``lib``) and the one place its statuses become
typed exceptions. Private: the public API wraps it in ``client``, ``oracle``
and ``openssl``.
"""
from __future__ import annotations

import os
from typing import NoReturn, Optional

from . import _native
from ._native import ffi, lib
from ._version import __version__
from .errors import (DecryptionError, InvalidArgumentError, OracleAccessError, OracleIdentityError,
                     OracleInternalError, OracleTimeoutError, OracleUnavailableError, PolicyError,
                     ProtocolError, RateLimitError, ShmkeyError, StaleBuildError, SystemCallError,
                     TokenUnavailableError, UnsupportedOperationError)

__all__ = ["check_build", "ensure", "ffi", "lib", "raise_for_status"]

REBUILD = ("rebuild it: 'python3 setup.py build_ext --inplace' in a source checkout, "
           "or reinstall shmkey")


def check_build(what: str, built: Optional[str], expected: str = __version__) -> None:
    """Refuse a compiled part of shmkey built from another version than this code.

    Args:
        what: which part, and where, for the message.
        built: the version compiled into it; None if it records none.
        expected: this package's version.

    Raises:
        StaleBuildError: the versions differ.
    """
    if built != expected:
        found = "records no version" if built is None else f"is version {built}"
        raise StaleBuildError(f"stale build: {what} {found}, but the shmkey package is "
                              f"version {expected}; {REBUILD}")


def _extension_version() -> Optional[str]:
    try:
        version: str = ffi.string(lib.shmkey_version()).decode()
        return version
    except AttributeError:      # built before the extension recorded its version
        return None


check_build(f"shmkey's extension {_native.__file__}", _extension_version())

_STATUS_ERRORS: dict[int, type[ShmkeyError]] = {
    lib.SHMKEY_EINVAL: InvalidArgumentError,
    lib.SHMKEY_ETOOBIG: InvalidArgumentError,
    lib.SHMKEY_ETIMEDOUT: OracleTimeoutError,
    lib.SHMKEY_EUNAVAIL: OracleUnavailableError,
    lib.SHMKEY_EPOLICY: PolicyError,
    lib.SHMKEY_EPROTO: ProtocolError,
    lib.SHMKEY_EDECRYPT: DecryptionError,
    lib.SHMKEY_EUNSUPPORTED: UnsupportedOperationError,
    lib.SHMKEY_ESYSTEM: SystemCallError,
    lib.SHMKEY_ENOKEY: InvalidArgumentError,
    lib.SHMKEY_EINTERNAL: OracleInternalError,
    lib.SHMKEY_EACCESS: OracleAccessError,
    lib.SHMKEY_ETOKEN: TokenUnavailableError,
    lib.SHMKEY_EIDENTITY: OracleIdentityError,
    lib.SHMKEY_ERATELIMIT: RateLimitError,
}


def raise_for_status(status: int, detail: str = "") -> NoReturn:
    """Raise the exception for a negative C status.

    Args:
        status: a ``SHMKEY_E*`` code from ``shmkey.h``.
        detail: the oracle's reason, if it sent one.

    Raises:
        ShmkeyError: always, as the subclass that ``status`` maps to.
    """
    message = ffi.string(lib.shmkey_strerror(status)).decode()
    if detail:
        message = f"{message}: {detail}"
    cls = _STATUS_ERRORS.get(status, ShmkeyError)
    if cls is SystemCallError:
        err = ffi.errno
        raise SystemCallError(err, f"{message}: {os.strerror(err)}")
    raise cls(message)


def ensure(status: int, detail: str = "") -> None:
    """Return if ``status`` is ``SHMKEY_OK``, else raise its typed exception."""
    if status != lib.SHMKEY_OK:
        raise_for_status(status, detail)

"""Exceptions raised by shmkey. This module imports nothing of shmkey; the
binding (``_binding``) maps C statuses to these classes in one place.

Every exception derives from :class:`ShmkeyError`; the ones that mean what a
builtin means also derive from it (``TimeoutError``, ``ValueError``,
``PermissionError``), so callers may catch either.
"""
from __future__ import annotations

import builtins


class ShmkeyError(Exception):
    """Base class of every shmkey error."""


class ConfigError(ShmkeyError, builtins.ValueError):
    """A setting (environment variable or argument) is invalid."""


class InvalidArgumentError(ShmkeyError, builtins.ValueError):
    """An argument is malformed: wrong length, oversized, unknown option."""


class UnsupportedOperationError(InvalidArgumentError):
    """The oracle does not implement this operation, padding or hash."""


class DecryptionError(ShmkeyError, builtins.ValueError):
    """Decryption failed. One error for every cause, by design."""


class OracleUnavailableError(ShmkeyError):
    """The oracle is not running, stopped, or died."""


class OracleTimeoutError(OracleUnavailableError, builtins.TimeoutError):
    """The oracle did not answer before the deadline; the request was withdrawn.
    For that request the oracle was unavailable (overloaded, or stopped with
    SIGSTOP, which no hang-up reveals), hence the base class."""


class PolicyError(ShmkeyError, builtins.PermissionError):
    """The oracle's policy refuses this operation."""


class OracleAccessError(ShmkeyError, builtins.PermissionError):
    """Permission denied on the oracle's socket, or the oracle refused this process."""


class OracleIdentityError(ShmkeyError):
    """The process serving an oracle's socket runs as a user this client does
    not trust (a squatter or a fake oracle); the message names both users."""


class TokenUnavailableError(ShmkeyError):
    """The oracle runs, but the PKCS#11 token holding the key failed or is
    absent. The oracle re-opens its session on the next request, so a later
    one may succeed."""


class RateLimitError(ShmkeyError):
    """The oracle's ``--rate-limit`` refused this request: this connection asked
    for more private-key operations per second than it allows."""


class ProtocolError(ShmkeyError):
    """A malformed request or reply crossed the transport."""


class KeyLoadError(ShmkeyError):
    """The oracle could not load its key (missing file, wrong password, bad key)."""


class KeyIsolatedError(ShmkeyError, builtins.TypeError):
    """The private key lives in the oracle; it cannot be exported from here."""


class OracleInternalError(ShmkeyError):
    """The oracle's crypto library failed on a request that looked valid."""


class SystemCallError(ShmkeyError, builtins.OSError):
    """An operating-system call failed inside shmkey's C layer."""


class KeyReferenceError(ShmkeyError, builtins.ValueError):
    """A key reference file is missing, malformed, or of a newer version."""


class KeyMismatchError(ShmkeyError, builtins.ValueError):
    """A certificate is not for the key the oracle holds."""


class LibcryptoMismatchError(ShmkeyError):
    """Python's ssl module uses another libcrypto than shmkey's provider was built for."""


class StaleBuildError(ShmkeyError, builtins.ImportError):
    """A compiled part of shmkey (the extension or the OpenSSL module) was built
    from another version than the Python code: rebuild it."""

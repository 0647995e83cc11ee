"""The key process's request handler: loads private keys (PEM files, or
PKCS#11 URIs through :mod:`.pkcs11`), then turns each request (already copied
out of shared memory and checked by C) into a signature or plaintext under
the policy. The math is ``cryptography``'s, or the token's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Union

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .. import _p11uri, _wire
from .._binding import lib
from ..errors import (InvalidArgumentError, KeyLoadError, ShmkeyError, TokenUnavailableError,
                      UnsupportedOperationError)
from . import pkcs11

log = logging.getLogger("shmkey.oracle")

_MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class Policy:
    """What the oracle agrees to do. Signing is always allowed.

    PKCS#1 v1.5 decryption is off by default: a server that answers it is a
    Bleichenbacher/Marvin padding oracle unless every caller is trusted.
    """

    allow_oaep_decrypt: bool = True
    allow_pkcs1v15_decrypt: bool = False


PrivateKey = Union[rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey]
_CURVES = (ec.SECP256R1, ec.SECP384R1)


def load_key(path: str, password: Optional[bytes], pkcs11_module: str = "") -> PrivateKey:
    """Read and parse one PEM key (the raw bytes are wiped after parsing), or
    open the token key a PKCS#11 URI names.

    Args:
        path: a PEM file, or a ``pkcs11:`` URI (RFC 7512).
        password: for an encrypted PEM file.
        pkcs11_module: the PKCS#11 module for URIs without ``module-path``.

    Raises:
        KeyLoadError: unreadable file, wrong password, unsupported type or
            size; for a URI, the module, token, PIN or key failed.
        ConfigError: a malformed URI or PIN file.
    """
    if _p11uri.is_uri(path):
        token_key: PrivateKey = pkcs11.load(path, pkcs11_module)
        return _checked(token_key, _p11uri.parse(path).redacted())
    try:
        with open(path, "rb") as f:
            raw = bytearray(f.read())
    except OSError as exc:
        raise KeyLoadError(f"cannot read key file {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(bytes(raw), password=password)
    except (ValueError, TypeError) as exc:
        if f"-----BEGIN {_wire.KEYREF_LABEL}-----".encode() in raw:
            raise KeyLoadError(f"{path}: that is a key reference, not a private key; use --oracle "
                               "NAME with the oracle it names") from None
        raise KeyLoadError(f"cannot load key from {path}: {exc}") from None
    finally:
        raw[:] = bytes(len(raw))
    return _checked(key, path)  # type: ignore[arg-type]


def _checked(key: PrivateKey, path: str) -> PrivateKey:
    """The key, if shmkey serves its type and size."""
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < _MIN_RSA_BITS:
            raise KeyLoadError(f"{path} is RSA-{key.key_size}; at least {_MIN_RSA_BITS} bits needed")
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, _CURVES):
            raise KeyLoadError(f"{path} is on curve {key.curve.name}; P-256 and P-384 are supported")
    elif not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyLoadError(f"{path} holds a {type(key).__name__}; RSA, EC (P-256, P-384) "
                           "and Ed25519 keys are supported")
    return key


def needs_worker_process(key: PrivateKey) -> bool:
    """Whether a key wants worker processes rather than threads: an Ed25519
    file key (its signing holds the GIL) or any token key (a PKCS#11 module is
    entered by one thread at a time, so processes give the parallelism)."""
    return isinstance(key, (ed25519.Ed25519PrivateKey, pkcs11.TokenRSAKey, pkcs11.TokenECKey))


_ERROR_STATUS: tuple[tuple[type[ShmkeyError], str], ...] = (
    (TokenUnavailableError, "SHMKEY_ETOKEN"),
    (UnsupportedOperationError, "SHMKEY_EUNSUPPORTED"),
    (InvalidArgumentError, "SHMKEY_EINVAL"),
)


def _status_of(exc: ShmkeyError) -> int:
    """The reply status of an error a key raised (a token key's, mostly)."""
    for cls, name in _ERROR_STATUS:
        if isinstance(exc, cls):
            return int(getattr(lib, name))
    return int(lib.SHMKEY_EINTERNAL)


class Handler:
    """Turns one copied request into (status, reply bytes)."""

    def __init__(self, keys: list[PrivateKey], policy: Policy) -> None:
        self._policy = policy
        self._spki = [k.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
                      for k in keys]
        self._by_id: dict[bytes, tuple[PrivateKey, bytes]] = {}
        for key, der in zip(keys, self._spki):
            kid = _wire.key_id(key.public_key())
            if kid in self._by_id:
                raise KeyLoadError("the same key was given twice")
            self._by_id[kid] = (key, der)
        self._by_id[_wire.DEFAULT_KEY] = (keys[0], self._spki[0])
        self._key_list = b"".join(len(d).to_bytes(2, "little") + d for d in self._spki)
        self._sign_cache: dict[tuple[int, ...], Optional[_wire.SignSpec]] = {}
        self._ecdsa = _wire.ecdsa_algorithms()     # now, while the oracle may still import

    def file_keys(self) -> list[tuple[bytes, PrivateKey]]:
        """(key id, key) of every key held in this process's memory (not a token's)."""
        return [(kid, key) for kid, (key, _) in self._by_id.items()
                if kid != _wire.DEFAULT_KEY and
                isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey,
                                 ed25519.Ed25519PrivateKey)) and
                not isinstance(key, pkcs11.TokenHeld)]

    def token_keys(self) -> list[tuple[bytes, pkcs11.TokenHeld]]:
        """(key id, key) of every key held in a PKCS#11 token: those file_keys leaves out."""
        return [(kid, key) for kid, (key, _) in self._by_id.items()
                if kid != _wire.DEFAULT_KEY and isinstance(key, pkcs11.TokenHeld)]

    def public_der(self) -> list[bytes]:
        """SubjectPublicKeyInfo of every key, first key first."""
        return list(self._spki)

    def key_list(self) -> bytes:
        """The KEYS reply: each SPKI behind a 16-bit little-endian length."""
        return self._key_list

    def handle(self, op: int, key_id: bytes, p: _wire.Params, payload: bytes) -> tuple[int, bytes]:
        """Serve one request; never raises."""
        if op == lib.SHMKEY_OP_KEYS:
            return lib.SHMKEY_OK, self._key_list
        entry = self._by_id.get(key_id)
        if entry is None:
            return lib.SHMKEY_ENOKEY, b"no key with that id in this oracle"
        key, der = entry
        try:
            if op == lib.SHMKEY_OP_SIGN:
                if isinstance(key, rsa.RSAPrivateKey):
                    return self._sign_rsa(key, p, payload)
                if isinstance(key, ec.EllipticCurvePrivateKey):
                    algorithm = self._ecdsa.get(p)
                    if algorithm is None or len(payload) != algorithm.algorithm.digest_size:
                        return lib.SHMKEY_EUNSUPPORTED, b"bad scheme, hash or digest for ECDSA"
                    return lib.SHMKEY_OK, key.sign(payload, algorithm)
                if p != (lib.SHMKEY_SIG_ED25519, 0, 0, 0):
                    return lib.SHMKEY_EUNSUPPORTED, b"an Ed25519 key signs with scheme ED25519 only"
                return lib.SHMKEY_OK, key.sign(payload)
            if op == lib.SHMKEY_OP_DECRYPT:
                if not isinstance(key, rsa.RSAPrivateKey):
                    return lib.SHMKEY_EUNSUPPORTED, b"only RSA keys decrypt"
                return self._decrypt(key, p, payload)
            if op == lib.SHMKEY_OP_PUBKEY:
                return lib.SHMKEY_OK, der
            return lib.SHMKEY_EUNSUPPORTED, f"unknown operation {op}".encode()
        except ShmkeyError as exc:      # a token key's typed refusal or failure
            return _status_of(exc), str(exc).encode()
        except Exception as exc:  # the oracle must outlive any single request
            log.warning("request op=%d failed: %s", op, type(exc).__name__)
            return lib.SHMKEY_EINTERNAL, type(exc).__name__.encode()

    def _sign_rsa(self, key: rsa.RSAPrivateKey, p: _wire.Params, digest: bytes) -> tuple[int, bytes]:
        cache_key = (key.key_size, *p)
        spec = self._sign_cache.get(cache_key)
        if spec is None and cache_key not in self._sign_cache:
            spec = self._sign_cache.setdefault(cache_key, _wire.decode_sign(p, key.key_size))
        if spec is None:
            return lib.SHMKEY_EUNSUPPORTED, b"bad padding, hash or salt length for signing"
        if len(digest) != spec.digest_size:
            return lib.SHMKEY_EINVAL, (f"digest is {len(digest)} bytes; "
                                       f"expected {spec.digest_size}").encode()
        return lib.SHMKEY_OK, key.sign(digest, spec.padding, spec.algorithm)

    def _decrypt(self, key: rsa.RSAPrivateKey, p: _wire.Params, payload: bytes) -> tuple[int, bytes]:
        decoded = _wire.decode_decrypt(p)
        if decoded is None:
            return lib.SHMKEY_EUNSUPPORTED, b"bad padding or hash for decryption"
        pad_code, padding, label_len = decoded
        nbytes = (key.key_size + 7) // 8
        if len(payload) != nbytes + label_len:
            return lib.SHMKEY_EINVAL, b"ciphertext length does not match the key"
        if pad_code == lib.SHMKEY_PAD_OAEP and not self._policy.allow_oaep_decrypt:
            return lib.SHMKEY_EPOLICY, b"OAEP decryption is disabled"
        if pad_code == lib.SHMKEY_PAD_PKCS1V15 and not self._policy.allow_pkcs1v15_decrypt:
            return lib.SHMKEY_EPOLICY, (b"PKCS#1 v1.5 decryption is disabled "
                                        b"(enable with allow_pkcs1v15_decrypt)")
        if padding is None:
            padding = _wire.oaep(p, payload[nbytes:])
        try:
            return lib.SHMKEY_OK, key.decrypt(payload[:nbytes], padding)
        except InvalidArgumentError:
            raise           # a token refused the parameters: not a padding failure
        except ValueError:
            # Same status, same (empty) reason for every failure: no padding oracle.
            return lib.SHMKEY_EDECRYPT, b""

"""Translation between ``cryptography``'s padding and hash objects and the
operation codes of ``shmkey.h``, for both sides: the client encodes, the
oracle decodes. Requests are semantic (sign this digest with PSS/SHA-256),
never raw RSA.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any, Optional, Union

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import padding as apad
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from ._binding import ffi, lib
from .errors import InvalidArgumentError, UnsupportedOperationError

# The PEM label of a key reference file (shmkey.openssl.keyref); the oracle
# names it when one is given as a key.
KEYREF_LABEL = "SHMKEY KEY REFERENCE"

HASHES: dict[int, type[hashes.HashAlgorithm]] = {
    lib.SHMKEY_HASH_SHA1: hashes.SHA1,
    lib.SHMKEY_HASH_SHA256: hashes.SHA256,
    lib.SHMKEY_HASH_SHA384: hashes.SHA384,
    lib.SHMKEY_HASH_SHA512: hashes.SHA512,
}
_HASH_CODES = {cls.name: code for code, cls in HASHES.items()}
_EXACT = frozenset(HASHES.values())     # not a subclass that could hash otherwise
# SHA-1 only where it is still sound: OAEP and MGF1. Signatures need SHA-2.
SIGN_HASHES = frozenset({lib.SHMKEY_HASH_SHA256, lib.SHMKEY_HASH_SHA384, lib.SHMKEY_HASH_SHA512})

Params = tuple[int, int, int, int]
DEFAULT_KEY = bytes(32)     # "the oracle's first key"

# struct shmkey_req as bytes: filling it with one pack is several times
# quicker than cffi's field by field. Checked against the header's layout.
_REQ = struct.Struct("=6I32s")
if (_REQ.size, ffi.offsetof("struct shmkey_req", "p"), ffi.offsetof("struct shmkey_req", "in_len"),
        ffi.offsetof("struct shmkey_req", "key_id")) != (ffi.sizeof("struct shmkey_req"), 4, 20, 24):
    raise ImportError("struct shmkey_req in shmkey.h no longer matches _wire's packing")


def pack_request(buf: Any, op: int, params: Params, in_len: int, kid: bytes) -> None:
    """Write a request header (struct shmkey_req) into ``buf``."""
    _REQ.pack_into(buf, 0, op, params[0], params[1], params[2], params[3], in_len, kid)

# The digests the client makes for its requests, by hashlib (OpenSSL's, and
# quicker to call than cryptography's Hash for one short message).
_HASHLIB = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha384": hashlib.sha384,
            "sha512": hashlib.sha512}


def key_id(public_key: object) -> bytes:
    """SHA-256 of a public key's SubjectPublicKeyInfo DER: how requests name keys."""
    der = public_key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    h = hashes.Hash(hashes.SHA256())
    h.update(der)
    return h.finalize()


def digest_for(algorithm: Union[hashes.HashAlgorithm, Prehashed], data: bytes) -> tuple[hashes.HashAlgorithm, bytes]:
    """(hash, digest): hash the data here, or check a prehashed digest's length."""
    if isinstance(algorithm, Prehashed):
        hash_alg = algorithm._algorithm
        digest = bytes(data)
        if len(digest) != hash_alg.digest_size:
            raise InvalidArgumentError(
                f"prehashed digest is {len(digest)} bytes; {hash_alg.name} needs "
                f"{hash_alg.digest_size}")
        return hash_alg, digest
    quick = _HASHLIB.get(algorithm.name) if type(algorithm) in _EXACT else None
    if quick is not None:
        return algorithm, quick(data).digest()
    h = hashes.Hash(algorithm)
    h.update(data)
    return algorithm, h.finalize()


def hash_code(algorithm: hashes.HashAlgorithm, what: str) -> int:
    """The wire code of a hash, or UnsupportedOperationError."""
    code = _HASH_CODES.get(getattr(algorithm, "name", None))  # type: ignore[arg-type]
    if code is None:
        raise UnsupportedOperationError(
            f"{what} hash {getattr(algorithm, 'name', algorithm)!r} is not supported; "
            "use SHA-256, SHA-384 or SHA-512")
    return code


def pss_max_salt(key_bits: int, digest_size: int) -> int:
    """Largest PSS salt for a key (RFC 8017 9.1.1: emLen - hLen - 2)."""
    return (key_bits - 1 + 7) // 8 - digest_size - 2


def encode_sign(padding: apad.AsymmetricPadding,
                algorithm: Union[hashes.HashAlgorithm, Prehashed],
                data: bytes, key_bits: int) -> tuple[Params, bytes]:
    """Parameters and digest for a sign request.

    Hashing happens here, in the caller's process: the message is public,
    only the private-key step needs the oracle.

    Raises:
        InvalidArgumentError: wrong digest length, impossible salt length.
        UnsupportedOperationError: padding or hash the oracle does not offer.
    """
    hash_alg, digest = digest_for(algorithm, data)
    code = hash_code(hash_alg, "signature")
    if code not in SIGN_HASHES:
        raise UnsupportedOperationError(f"signing with {hash_alg.name} is not supported")
    if isinstance(padding, apad.PKCS1v15):
        return (lib.SHMKEY_PAD_PKCS1V15, code, 0, 0), digest
    if isinstance(padding, apad.PSS):
        mgf = padding._mgf
        if not isinstance(mgf, apad.MGF1):
            raise UnsupportedOperationError("PSS needs MGF1")
        mgf_code = hash_code(mgf._algorithm, "MGF1")
        salt = padding._salt_length
        limit = pss_max_salt(key_bits, hash_alg.digest_size)
        if salt is apad.PSS.MAX_LENGTH:
            salt = limit
        elif salt is apad.PSS.DIGEST_LENGTH:
            salt = hash_alg.digest_size
        elif not isinstance(salt, int):
            raise InvalidArgumentError("PSS salt length AUTO is for verifying only")
        if not 0 <= salt <= limit:
            raise InvalidArgumentError(
                f"PSS salt length {salt} does not fit a {key_bits}-bit key with "
                f"{hash_alg.name} (0 to {limit})")
        return (lib.SHMKEY_PAD_PSS, code, mgf_code, salt), digest
    raise UnsupportedOperationError(
        f"padding {getattr(padding, 'name', padding)!r} is not supported for signing")


def encode_ecdsa(signature_algorithm: ec.EllipticCurveSignatureAlgorithm,
                 data: bytes) -> tuple[Params, bytes]:
    """Parameters and digest for an ECDSA sign request (hashed here)."""
    if not isinstance(signature_algorithm, ec.ECDSA):
        raise UnsupportedOperationError("only ECDSA signatures are offered for EC keys")
    if getattr(signature_algorithm, "deterministic_signing", False):
        raise UnsupportedOperationError("deterministic ECDSA (RFC 6979) is not offered")
    hash_alg, digest = digest_for(signature_algorithm.algorithm, data)
    code = hash_code(hash_alg, "signature")
    if code not in SIGN_HASHES:
        raise UnsupportedOperationError(f"signing with {hash_alg.name} is not supported")
    return (lib.SHMKEY_SIG_ECDSA, code, 0, 0), digest


def encode_decrypt(padding: apad.AsymmetricPadding, ciphertext: bytes,
                   key_bytes: int) -> tuple[Params, bytes]:
    """Parameters and payload (ciphertext, then OAEP label) for a decrypt request.

    Raises:
        InvalidArgumentError: the ciphertext is not exactly the key's size.
        UnsupportedOperationError: padding other than OAEP/MGF1 or PKCS#1 v1.5.
    """
    ciphertext = bytes(ciphertext)
    if len(ciphertext) != key_bytes:
        raise InvalidArgumentError(
            f"ciphertext is {len(ciphertext)} bytes; the key needs exactly {key_bytes}")
    if isinstance(padding, apad.OAEP):
        if not isinstance(padding._mgf, apad.MGF1):
            raise UnsupportedOperationError("OAEP needs MGF1")
        label = padding._label or b""
        return (lib.SHMKEY_PAD_OAEP, hash_code(padding._algorithm, "OAEP"),
                hash_code(padding._mgf._algorithm, "MGF1"), len(label)), ciphertext + label
    if isinstance(padding, apad.PKCS1v15):
        return (lib.SHMKEY_PAD_PKCS1V15, 0, 0, 0), ciphertext
    raise UnsupportedOperationError(
        f"padding {getattr(padding, 'name', padding)!r} is not supported for decryption")


@dataclass(frozen=True)
class SignSpec:
    """A decoded, validated sign request (oracle side)."""

    padding: apad.AsymmetricPadding
    algorithm: Prehashed
    digest_size: int


def decode_sign(p: Params, key_bits: int) -> Optional[SignSpec]:
    """Rebuild padding and hash from request parameters; None if invalid."""
    pad, h, mgf, salt = p
    if h not in SIGN_HASHES:
        return None
    alg = HASHES[h]()
    if pad == lib.SHMKEY_PAD_PKCS1V15 and mgf == 0 and salt == 0:
        return SignSpec(apad.PKCS1v15(), Prehashed(alg), alg.digest_size)
    if pad == lib.SHMKEY_PAD_PSS and mgf in HASHES and \
            0 <= salt <= pss_max_salt(key_bits, alg.digest_size):
        return SignSpec(apad.PSS(mgf=apad.MGF1(HASHES[mgf]()), salt_length=salt),
                        Prehashed(alg), alg.digest_size)
    return None


def ecdsa_algorithms() -> dict[Params, ec.ECDSA]:
    """The ECDSA algorithm for each valid sign request's parameters (oracle side).

    Built in one go when the oracle starts: constructing an ``ec.ECDSA``
    imports a module of cryptography's on first use, which an oracle that has
    dropped root (``--user``) may no longer be allowed to read.
    """
    return {(lib.SHMKEY_SIG_ECDSA, code, 0, 0): ec.ECDSA(Prehashed(HASHES[code]()))
            for code in sorted(SIGN_HASHES)}


def decode_decrypt(p: Params) -> Optional[tuple[int, Optional[apad.AsymmetricPadding], int]]:
    """(padding code, padding or None for OAEP-with-label, label length); None if invalid.

    OAEP's label travels in the payload, so its padding object is built per
    request by the caller; only the hash codes are checked here.
    """
    pad, h, mgf, label_len = p
    if pad == lib.SHMKEY_PAD_PKCS1V15 and h == 0 and mgf == 0 and label_len == 0:
        return pad, apad.PKCS1v15(), 0
    if pad == lib.SHMKEY_PAD_OAEP and h in HASHES and mgf in HASHES:
        return pad, None, label_len
    return None


def oaep(p: Params, label: bytes) -> apad.OAEP:
    """The OAEP padding of a decoded decrypt request."""
    return apad.OAEP(mgf=apad.MGF1(HASHES[p[2]]()), algorithm=HASHES[p[1]](),
                     label=label or None)

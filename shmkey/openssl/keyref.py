"""Key reference files: a PEM block labelled ``SHMKEY KEY REFERENCE`` that names
the oracle holding a key and carries the key's public half. It holds no secret;
OpenSSL loads it as the private key through shmkey's provider (``shmkey.openssl``).

The body is DER (``SHMKEY_KEYREF_VERSION`` 2; version 1 is still read)::

    ShmkeyKeyReference ::= SEQUENCE {
        version    INTEGER,              -- 2 (1: no oracleUid)
        oracle     UTF8String,           -- the name given to `shmkey serve --name`
        transport  INTEGER,              -- 0 the oracle's choice; 1 ring; 2 socket
        keyId      OCTET STRING,         -- SHA-256 of publicKey's DER: the key's
                                         -- name in requests to the oracle
        publicKey  SubjectPublicKeyInfo, -- RSA, EC P-256/P-384 or Ed25519
        oracleUid  INTEGER OPTIONAL }    -- version 2: the uid the oracle runs as;
                                         -- the provider refuses any other
"""
from __future__ import annotations

import base64
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .. import _wire, names
from ..client import connect
from .._binding import lib
from ..errors import KeyMismatchError, KeyReferenceError

PathLike = Union[str, "os.PathLike[str]"]
#: The public keys a reference may carry: what the provider can sign for.
PublicKey = Union[rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey]
_CURVES = (ec.SECP256R1, ec.SECP384R1)

LABEL = _wire.KEYREF_LABEL
VERSION: int = lib.SHMKEY_KEYREF_VERSION
_TRANSPORTS = {None: lib.SHMKEY_TRANSPORT_ANY, "shm": lib.SHMKEY_TRANSPORT_SHM,
               "socketpair": lib.SHMKEY_TRANSPORT_SOCKET}
_TRANSPORT_NAMES = {code: name for name, code in _TRANSPORTS.items()}
_PEM_RE = re.compile(rf"-----BEGIN {LABEL}-----\r?\n(.*?)-----END {LABEL}-----", re.S)

# DER tags used by the format.
_SEQUENCE, _INTEGER, _OCTETSTRING, _UTF8STRING = 0x30, 0x02, 0x04, 0x0C


@dataclass(frozen=True)
class KeyReference:
    """What a key reference file says.

    Attributes:
        oracle: name of the ``shmkey serve`` that holds the key.
        public_key: the key's public half.
        transport: ``"shm"``, ``"socketpair"``, or None for what the oracle offers.
        oracle_uid: the uid the oracle runs as (version 2); None for a
            version 1 reference, which names none.
    """

    oracle: str
    public_key: PublicKey
    transport: Optional[str] = None
    oracle_uid: Optional[int] = None

    def __post_init__(self) -> None:
        names.check_name(self.oracle)
        if self.transport not in _TRANSPORTS:
            raise KeyReferenceError(f"transport {self.transport!r} is not 'shm' or 'socketpair'")
        if self.oracle_uid is not None and not 0 <= self.oracle_uid < 2**32 - 1:
            raise KeyReferenceError(f"oracle uid {self.oracle_uid} is out of range")
        check_supported(self.public_key)

    @property
    def key_id(self) -> bytes:
        """SHA-256 of the public key's SPKI: how requests name the key in the oracle."""
        return _wire.key_id(self.public_key)

    def to_der(self) -> bytes:
        """The DER body."""
        spki = self.public_key.public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        version, uid = (1, b"") if self.oracle_uid is None else (VERSION, _der_int(self.oracle_uid))
        return _tlv(_SEQUENCE, _der_int(version) + _tlv(_UTF8STRING, self.oracle.encode())
                    + _der_int(_TRANSPORTS[self.transport]) + _tlv(_OCTETSTRING, self.key_id)
                    + spki + uid)

    def to_pem(self) -> bytes:
        """The PEM block, as written to a key reference file."""
        b64 = base64.b64encode(self.to_der()).decode()
        lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
        return (f"-----BEGIN {LABEL}-----\n" + "\n".join(lines) +
                f"\n-----END {LABEL}-----\n").encode()

    @classmethod
    def from_der(cls, der: bytes) -> KeyReference:
        """Parse a DER body.

        Raises:
            KeyReferenceError: malformed, or a version this shmkey cannot read.
        """
        try:
            body, rest = _read(der, 0, _SEQUENCE)
            if rest != len(der):
                raise KeyReferenceError("trailing bytes after the key reference")
            fields = []
            pos = 0
            for tag in (_INTEGER, _UTF8STRING, _INTEGER, _OCTETSTRING):
                value, pos = _read(body, pos, tag)
                fields.append(value)
            version, name, transport, kid = fields
            number = _int_value(version)
            if number not in (1, VERSION):
                raise KeyReferenceError(f"key reference version {number}; "
                                        f"this shmkey reads versions 1 to {VERSION}")
            code = _int_value(transport)
            if code not in _TRANSPORT_NAMES:
                raise KeyReferenceError(f"unknown transport code {code}")
            _, end = _read(body, pos, _SEQUENCE)
            spki, uid = body[pos:end], None
            if number == VERSION:
                if end == len(body):
                    raise KeyReferenceError(f"a version {VERSION} key reference without an "
                                            "oracle uid")
                value, end = _read(body, end, _INTEGER)
                uid = _int_value(value)
            if end != len(body):
                raise KeyReferenceError("trailing bytes after the " +
                                        ("oracle uid" if uid is not None else "public key"))
            public_key = serialization.load_der_public_key(spki)
            ref = cls(oracle=name.decode("utf-8"), public_key=public_key,  # type: ignore[arg-type]
                      transport=_TRANSPORT_NAMES[code], oracle_uid=uid)
            if kid != ref.key_id:
                raise KeyReferenceError("the key id is not the SHA-256 of the public key")
            return ref
        except KeyReferenceError:
            raise
        except (ValueError, UnicodeDecodeError) as exc:
            raise KeyReferenceError(f"malformed key reference: {exc}") from None

    @classmethod
    def from_pem(cls, data: bytes) -> KeyReference:
        """Find and parse the key reference block in PEM text (other blocks may surround it).

        Raises:
            KeyReferenceError: no such block, or a malformed one.
        """
        match = _PEM_RE.search(data.decode("ascii", "replace"))
        if not match:
            raise KeyReferenceError(f"no '{LABEL}' PEM block found")
        try:
            der = base64.b64decode("".join(match.group(1).split()), validate=True)
        except ValueError:
            raise KeyReferenceError("the key reference's base64 is malformed") from None
        return cls.from_der(der)


def create(oracle: str, *, cert: Optional[PathLike] = None, transport: Optional[str] = None,
           key: Union[int, bytes, None] = None, timeout_ms: Optional[int] = None,
           oracle_user: Union[str, int, None] = None) -> KeyReference:
    """Ask a running oracle for a public key and describe it as a reference
    that names the uid the oracle runs as (and so trusts no other).

    Args:
        oracle: name of a running ``shmkey serve``.
        cert: a PEM certificate (its first one counts). The reference is for
            the oracle's key that matches it; an oracle may hold several.
        transport: ``"shm"``, ``"socketpair"`` or None; also how OpenSSL will
            reach the oracle.
        key: without ``cert``: which key (index or key id); the first by default.
        timeout_ms: how long to wait for the oracle.
        oracle_user: the user the oracle runs as, if not ours or root.

    Raises:
        OracleUnavailableError: no oracle of that name is running.
        OracleIdentityError: it runs as another user than ours, root or ``oracle_user``.
        KeyMismatchError: no key in the oracle matches the certificate.
    """
    client = connect(oracle, transport=transport, timeout_ms=timeout_ms, oracle_user=oracle_user)
    uid = client.oracle_uid
    try:
        public_key: object
        if cert is None:
            public_key = client.private_key(key).public_key()
        else:
            cert_key = _certificate_key(cert)
            held = [serialization.load_der_public_key(d) for d in client.public_keys()]
            matching = [k for k in held if _wire.key_id(k) == _wire.key_id(cert_key)]
            if not matching:
                names = ", ".join(describe(k) for k in held)
                raise KeyMismatchError(f"certificate {cert} is not for any key that oracle "
                                       f"{oracle!r} holds ({names})")
            public_key = matching[0]
    finally:
        client.close()
    # The constructor checks that the oracle's key is a kind references carry.
    return KeyReference(oracle=oracle, public_key=cast(PublicKey, public_key), transport=transport,
                        oracle_uid=uid)


def check_supported(public_key: object) -> None:
    """Raise KeyReferenceError unless the OpenSSL provider can use this kind of key.

    It handles RSA (1024 to 16384 bits), EC on P-256 and P-384, and Ed25519:
    the keys ``shmkey serve`` holds, less RSA below 2048 bits, which the
    oracle refuses anyway.
    """
    if isinstance(public_key, rsa.RSAPublicKey):
        if not 1024 <= public_key.key_size <= 16384:
            raise KeyReferenceError(f"RSA-{public_key.key_size} is outside the provider's "
                                    "1024 to 16384 bits")
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, _CURVES):
            raise KeyReferenceError(f"curve {public_key.curve.name}: the provider signs with "
                                    "P-256 and P-384")
    elif not isinstance(public_key, ed25519.Ed25519PublicKey):
        raise KeyReferenceError(f"a {type(public_key).__name__.lstrip('_')}: the provider "
                                "handles RSA, EC (P-256, P-384) and Ed25519 keys")


def _certificate_key(cert: PathLike) -> object:
    try:
        return x509.load_pem_x509_certificate(Path(cert).read_bytes()).public_key()
    except (OSError, ValueError) as exc:
        raise KeyReferenceError(f"cannot read certificate {cert}: {exc}") from None


def describe(key: object) -> str:
    """A public key for people: its kind and the start of its key id,
    e.g. ``RSA-2048 SHA256:1f2e...``, ``EC P-256 SHA256:...``, ``Ed25519 SHA256:...``."""
    if isinstance(key, rsa.RSAPublicKey):
        kind = f"RSA-{key.key_size}"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        kind = {"secp256r1": "EC P-256", "secp384r1": "EC P-384"}.get(key.curve.name,
                                                                      f"EC {key.curve.name}")
    elif isinstance(key, ed25519.Ed25519PublicKey):
        kind = "Ed25519"
    else:
        kind = type(key).__name__.lstrip("_").replace("PublicKey", "")
    return f"{kind} {_fingerprint(key)}"



def check_certificate(ref: KeyReference, cert: PathLike) -> None:
    """Raise KeyMismatchError unless the first certificate in ``cert`` is for ``ref``'s key."""
    if _wire.key_id(_certificate_key(cert)) != ref.key_id:
        raise KeyMismatchError(
            f"certificate {cert} is not for the key that oracle {ref.oracle!r} holds "
            f"({describe(ref.public_key)})")


def write(oracle: str, output: PathLike, *, cert: Optional[PathLike] = None,
          transport: Optional[str] = None, key: Union[int, bytes, None] = None,
          timeout_ms: Optional[int] = None,
          oracle_user: Union[str, int, None] = None) -> KeyReference:
    """Write a key reference file for a running oracle (see :func:`create`).

    The file is replaced atomically and readable by all (0644): it holds no secret.

    Raises:
        OracleUnavailableError, OracleIdentityError, KeyMismatchError: as :func:`create`.
        KeyReferenceError: the file cannot be written there.
    """
    ref = create(oracle, cert=cert, transport=transport, key=key, timeout_ms=timeout_ms,
                 oracle_user=oracle_user)
    out = Path(output)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent or ".")
    except OSError as exc:
        raise KeyReferenceError(f"cannot write {output}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(ref.to_pem())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException as exc:
        os.unlink(tmp)
        if isinstance(exc, OSError):
            raise KeyReferenceError(f"cannot write {output}: {exc.strerror}") from None
        raise
    return ref


def load(path: PathLike) -> KeyReference:
    """Read the key reference in a file.

    Raises:
        KeyReferenceError: unreadable file, no reference in it, or a malformed one.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyReferenceError(f"cannot read {path}: {exc.strerror}") from None
    return KeyReference.from_pem(data)


def _fingerprint(key: object) -> str:
    # The key id is the SHA-256 of the SPKI: one fingerprint for every kind of key.
    return "SHA256:" + _wire.key_id(key).hex()[:16]


# ---- the few DER rules the format needs (definite lengths, minimal integers) ----

def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def _der_int(value: int) -> bytes:
    # Non-negative only; one extra byte keeps the sign bit clear.
    return _tlv(_INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _read(buf: bytes, pos: int, tag: int) -> tuple[bytes, int]:
    """The value of the TLV at pos (which must carry tag) and where the next starts."""
    if pos + 2 > len(buf) or buf[pos] != tag:
        raise KeyReferenceError("malformed key reference: unexpected DER element")
    n, pos = buf[pos + 1], pos + 2
    if n & 0x80:
        count = n & 0x7F
        if count == 0 or count > 4 or pos + count > len(buf) or buf[pos] == 0:
            raise KeyReferenceError("malformed key reference: bad DER length")
        n, pos = int.from_bytes(buf[pos:pos + count], "big"), pos + count
        if n < 0x80:
            raise KeyReferenceError("malformed key reference: bad DER length")
    if pos + n > len(buf):
        raise KeyReferenceError("malformed key reference: truncated")
    return buf[pos:pos + n], pos + n


def _int_value(body: bytes) -> int:
    if not body or (len(body) > 1 and body[0] == 0 and body[1] < 0x80) or body[0] & 0x80:
        raise KeyReferenceError("malformed key reference: bad INTEGER")
    return int.from_bytes(body, "big")

"""Private keys whose private half stays in the oracle: RSA, ECDSA (P-256,
P-384) and Ed25519, each a stand-in for (and a subclass of) the matching
``cryptography`` private key class. Exporting private material raises
:class:`~shmkey.errors.KeyIsolatedError`: there is none here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn, Union

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric import padding as apad
from cryptography.hazmat.primitives.asymmetric.utils import NoDigestInfo, Prehashed

from .. import _wire
from .._held import HeldElsewhere
from .._binding import lib
from ..errors import ProtocolError, UnsupportedOperationError

if TYPE_CHECKING:
    from .connection import OracleClient

Buffer = Union[bytes, bytearray, memoryview]


class _OracleHeld(HeldElsewhere):
    """What every oracle-held key shares: its client, id and public half."""

    _HELD_IN = "the key oracle"

    _client: OracleClient
    _id: bytes

    def _bind(self, client: OracleClient, key_id: bytes) -> None:
        self._client = client
        self._id = key_id

    @property
    def key_id(self) -> bytes:
        """SHA-256 of the public key's SubjectPublicKeyInfo: the key's name in requests."""
        return self._id

    def _sign(self, params: _wire.Params, payload: bytes) -> bytes:
        return self._client.call(lib.SHMKEY_OP_SIGN, params, payload, key_id=self._id)

    async def _asign(self, params: _wire.Params, payload: bytes) -> bytes:
        return await self._client.acall(lib.SHMKEY_OP_SIGN, params, payload, key_id=self._id)

    def ping(self) -> None:
        """A no-op round trip over the same path as ``sign``."""
        self._client.ping()

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self._id[:6].hex()} via "
                f"{self._client.transport} oracle>")


class OracleKey(_OracleHeld, rsa.RSAPrivateKey):
    """An RSA private key held by the oracle: ``sign``, ``decrypt``, ``public_key``."""

    def __init__(self, client: OracleClient, public: rsa.RSAPublicKey, key_id: bytes) -> None:
        self._bind(client, key_id)
        self._public = public
        self._bits = public.key_size
        self._bytes = (public.key_size + 7) // 8

    @property
    def key_size(self) -> int:
        """Modulus size in bits."""
        return self._bits

    def public_key(self) -> rsa.RSAPublicKey:
        """The public half, held locally."""
        return self._public

    def sign(self, data: Buffer, padding: apad.AsymmetricPadding,
             algorithm: Union[hashes.HashAlgorithm, Prehashed, NoDigestInfo]) -> bytes:
        """Sign ``data`` (hashed here; or a digest with ``Prehashed``) in the oracle.

        Raises:
            InvalidArgumentError, UnsupportedOperationError: bad arguments, caught
                before anything is sent.
        """
        if isinstance(algorithm, NoDigestInfo):
            raise UnsupportedOperationError("raw PKCS#1 v1.5 without DigestInfo is not offered")
        params, digest = _wire.encode_sign(padding, algorithm, bytes(data), self._bits)
        return self._sign(params, digest)

    async def asign(self, data: Buffer, padding: apad.AsymmetricPadding,
                    algorithm: Union[hashes.HashAlgorithm, Prehashed]) -> bytes:
        """:meth:`sign` for asyncio: the event loop runs on while the oracle signs;
        cancelling withdraws the request."""
        params, digest = _wire.encode_sign(padding, algorithm, bytes(data), self._bits)
        return await self._asign(params, digest)

    async def adecrypt(self, ciphertext: Buffer, padding: apad.AsymmetricPadding) -> bytes:
        """:meth:`decrypt` for asyncio: the event loop runs on while the oracle
        decrypts; cancelling withdraws the request."""
        params, payload = _wire.encode_decrypt(padding, bytes(ciphertext), self._bytes)
        return await self._client.acall(lib.SHMKEY_OP_DECRYPT, params, payload, key_id=self._id)

    def decrypt(self, ciphertext: Buffer, padding: apad.AsymmetricPadding) -> bytes:
        """Decrypt in the oracle (OAEP by default; PKCS#1 v1.5 only if its policy allows).

        Raises:
            DecryptionError: the ciphertext did not decrypt (one error for every cause).
            PolicyError: the oracle does not allow this padding.
        """
        params, payload = _wire.encode_decrypt(padding, bytes(ciphertext), self._bytes)
        return self._client.call(lib.SHMKEY_OP_DECRYPT, params, payload, key_id=self._id)


class OracleECKey(_OracleHeld, ec.EllipticCurvePrivateKey):
    """An EC private key held by the oracle: ECDSA ``sign`` with DER output."""

    def __init__(self, client: OracleClient, public: ec.EllipticCurvePublicKey,
                 key_id: bytes) -> None:
        self._bind(client, key_id)
        self._public = public

    @property
    def curve(self) -> ec.EllipticCurve:
        """The key's curve."""
        return self._public.curve

    @property
    def key_size(self) -> int:
        """Curve size in bits."""
        return self._public.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The public half, held locally."""
        return self._public

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        """ECDSA over ``data`` (hashed here; or a digest with ``Prehashed``), DER-encoded."""
        params, digest = _wire.encode_ecdsa(signature_algorithm, bytes(data))
        return self._sign(params, digest)

    async def asign(self, data: Buffer,
                    signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        """:meth:`sign` for asyncio; cancelling withdraws the request."""
        params, digest = _wire.encode_ecdsa(signature_algorithm, bytes(data))
        return await self._asign(params, digest)

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> NoReturn:
        """Not offered: TLS key exchange uses ephemeral keys, never the certificate's."""
        raise UnsupportedOperationError("ECDH with an oracle-held key is not offered")


class OracleEd25519Key(_OracleHeld, ed25519.Ed25519PrivateKey):
    """An Ed25519 private key held by the oracle: pure Ed25519 ``sign``."""

    def __init__(self, client: OracleClient, public: ed25519.Ed25519PublicKey,
                 key_id: bytes) -> None:
        self._bind(client, key_id)
        self._public = public

    def public_key(self) -> ed25519.Ed25519PublicKey:
        """The public half, held locally."""
        return self._public

    def sign(self, data: Buffer) -> bytes:
        """Ed25519 over ``data`` itself, which must fit in a slot (SHMKEY_SLOT_SIZE)."""
        return self._sign((lib.SHMKEY_SIG_ED25519, 0, 0, 0), bytes(data))

    async def asign(self, data: Buffer) -> bytes:
        """:meth:`sign` for asyncio; cancelling withdraws the request."""
        return await self._asign((lib.SHMKEY_SIG_ED25519, 0, 0, 0), bytes(data))

    def private_bytes_raw(self) -> NoReturn:
        """Always raises: the private key never leaves the oracle."""
        self.private_bytes()


AnyOracleKey = Union[OracleKey, OracleECKey, OracleEd25519Key]


def from_spki(client: OracleClient, der: bytes) -> AnyOracleKey:
    """The oracle-held key whose public half is ``der`` (SubjectPublicKeyInfo)."""
    try:
        public = serialization.load_der_public_key(der)
    except ValueError as exc:
        raise ProtocolError(f"oracle sent an unreadable public key: {exc}") from exc
    kid = _wire.key_id(public)
    if isinstance(public, rsa.RSAPublicKey):
        return OracleKey(client, public, kid)
    if isinstance(public, ec.EllipticCurvePublicKey):
        return OracleECKey(client, public, kid)
    if isinstance(public, ed25519.Ed25519PublicKey):
        return OracleEd25519Key(client, public, kid)
    raise ProtocolError(f"oracle holds a key of unknown type {type(public).__name__}")

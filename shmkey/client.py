"""The network side: a handle on a running oracle (:class:`OracleClient`) and
:class:`OracleKey`, which stands in for a ``cryptography`` RSA private key
while the key itself stays in the oracle.
"""
from __future__ import annotations

import threading
from typing import Any, Optional, Union

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding as apad
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.utils import NoDigestInfo, Prehashed

from . import _wire, ring
from ._binding import ensure, ffi, lib
from .config import Config
from .errors import (InvalidArgumentError, KeyIsolatedError, OracleUnavailableError,
                     ProtocolError, UnsupportedOperationError, raise_for_status)

_NO_PARAMS = (0, 0, 0, 0)


class OracleClient:
    """A connection to one oracle, usable from many threads at once.

    Each call runs in C with the GIL released; Python only packs arguments
    and unpacks the reply.
    """

    def __init__(self, handle: Any, timeout_ms: int, name: Optional[str] = None) -> None:
        self._handle = ffi.gc(handle, lib.shmkey_client_close)
        self._timeout_ms = timeout_ms
        self._max = lib.shmkey_client_max_payload(handle)
        self._local = threading.local()
        self._ping_req = ffi.new("struct shmkey_req *", {"op": lib.SHMKEY_OP_PING})
        self.name = name

    @classmethod
    def open_shm(cls, name: str, timeout_ms: int) -> "OracleClient":
        """Attach to the shared-memory ring of oracle ``name``."""
        out = ffi.new("struct shmkey_client **")
        ensure(lib.shmkey_client_open_shm(ring.ring_id(name).encode(), out),
               f"ring {ring.ring_id(name)!r}")
        return cls(out[0], timeout_ms, name)

    @classmethod
    def open_socket(cls, *, path: Optional[str] = None, ctl_fd: int = -1,
                    max_payload: int, timeout_ms: int,
                    name: Optional[str] = None) -> "OracleClient":
        """Attach over a socket: a named oracle's path, or a forked one's control fd."""
        out = ffi.new("struct shmkey_client **")
        ensure(lib.shmkey_client_open_socket(path.encode() if path else ffi.NULL, ctl_fd,
                                             max_payload, out),
               f"socket {path}" if path else "control socket")
        return cls(out[0], timeout_ms, name)

    @property
    def transport(self) -> str:
        """``"shm"`` or ``"socketpair"``."""
        return "shm" if lib.shmkey_client_transport(self._handle) == lib.SHMKEY_TRANSPORT_SHM \
            else "socketpair"

    @property
    def max_payload(self) -> int:
        """Largest request or reply payload, in bytes."""
        return self._max

    def _buffers(self) -> tuple[Any, Any]:
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = (ffi.new("struct shmkey_resp *"), ffi.new("uint8_t[]", self._max))
            self._local.bufs = bufs
        return bufs

    def call(self, op: int, params: _wire.Params = _NO_PARAMS, payload: bytes = b"",
             key: int = 0, timeout_ms: Optional[int] = None) -> bytes:
        """Send one request and return the reply payload.

        Raises:
            InvalidArgumentError: payload larger than a slot (nothing is sent).
            OracleTimeoutError, OracleUnavailableError, PolicyError, ...: as the
                oracle or transport reports.
        """
        if len(payload) > self._max:
            raise InvalidArgumentError(
                f"request payload is {len(payload)} bytes; the oracle accepts at most "
                f"{self._max} (SHMKEY_SLOT_SIZE)")
        req = ffi.new("struct shmkey_req *", {"op": op, "key": key, "p": params,
                                              "in_len": len(payload)})
        resp, out = self._buffers()
        rc = lib.shmkey_call(self._handle, req, payload, out, self._max, resp,
                             self._timeout_ms if timeout_ms is None else timeout_ms)
        return self._result(rc, resp, out)

    def _result(self, rc: int, resp: Any, out: Any) -> bytes:
        ensure(rc)
        data = ffi.buffer(out, resp.out_len)[:]
        if resp.status != lib.SHMKEY_OK:
            raise_for_status(resp.status, data.decode("utf-8", "replace")[:500])
        return data

    def ping(self, timeout_ms: Optional[int] = None) -> None:
        """A no-op round trip through the oracle: health check, transport cost."""
        resp, out = self._buffers()
        rc = lib.shmkey_call(self._handle, self._ping_req, ffi.NULL, out, self._max, resp,
                             self._timeout_ms if timeout_ms is None else timeout_ms)
        self._result(rc, resp, out)

    def echo(self, data: bytes, timeout_ms: Optional[int] = None) -> bytes:
        """A ping that carries ``data`` and gets it back: a checkable round trip."""
        return self.call(lib.SHMKEY_OP_PING, payload=data, timeout_ms=timeout_ms)

    def ping_loop(self, n: int) -> list[int]:
        """Time ``n`` pings one by one in C; nanoseconds each."""
        ns = ffi.new("uint64_t[]", n)
        ensure(lib.shmkey_ping_loop(self._handle, n, ns, self._timeout_ms))
        return list(ns)

    def free_slots(self) -> int:
        """Ring slots free right now (shared-memory transport only)."""
        n = lib.shmkey_client_free_slots(self._handle)
        ensure(min(n, 0))
        return n

    def private_key(self, index: int = 0) -> "OracleKey":
        """The oracle's key ``index`` as an :class:`OracleKey`."""
        return OracleKey(self, index)

    def close(self) -> None:
        """Detach; the oracle keeps running."""
        handle, self._handle = self._handle, None
        if handle is not None:
            ffi.release(handle)


def connect(name: str, *, transport: Optional[str] = None,
            timeout_ms: Optional[int] = None) -> OracleClient:
    """Attach to a running ``shmkey serve --name NAME`` of the same user.

    Args:
        name: the oracle's name.
        transport: ``"shm"`` or ``"socketpair"``; by default whichever the
            oracle offers (its ring first).
        timeout_ms: per-request timeout; ``SHMKEY_TIMEOUT_MS`` by default.

    Raises:
        OracleUnavailableError: no oracle of that name is running.
    """
    cfg = Config.load(timeout_ms=timeout_ms)
    if transport in (None, "shm") and (transport == "shm" or ring.exists(name)):
        return OracleClient.open_shm(name, cfg.timeout_ms)
    if transport in (None, "socketpair"):
        path = ring.socket_path(name)
        if transport == "socketpair" or path.exists():
            return OracleClient.open_socket(path=str(path), max_payload=cfg.slot_size,
                                            timeout_ms=cfg.timeout_ms, name=name)
        raise OracleUnavailableError(f"no oracle named {name!r} is running")
    raise InvalidArgumentError(f"transport {transport!r} is not 'shm' or 'socketpair'")


class OracleKey(rsa.RSAPrivateKey):
    """An RSA private key whose private operations run in the oracle.

    Duck-types (and is registered as) ``cryptography``'s ``RSAPrivateKey``:
    ``sign``, ``decrypt``, ``public_key``, ``key_size``. Export of private
    material raises :class:`KeyIsolatedError`: there is none here.
    """

    def __init__(self, client: OracleClient, index: int = 0) -> None:
        self._client = client
        self._index = index
        der = client.call(lib.SHMKEY_OP_PUBKEY, key=index)
        try:
            pub = serialization.load_der_public_key(der)
        except ValueError as exc:
            raise ProtocolError(f"oracle sent an unreadable public key: {exc}") from exc
        if not isinstance(pub, rsa.RSAPublicKey):
            raise ProtocolError("oracle key is not RSA")
        self._public = pub
        self._bits = pub.key_size
        self._bytes = (pub.key_size + 7) // 8

    @property
    def key_size(self) -> int:
        """Modulus size in bits."""
        return self._bits

    def public_key(self) -> rsa.RSAPublicKey:
        """The public half, held locally."""
        return self._public

    def sign(self, data: bytes, padding: apad.AsymmetricPadding,
             algorithm: Union[hashes.HashAlgorithm, Prehashed, NoDigestInfo]) -> bytes:
        """Sign ``data`` (hashed here; or a digest with ``Prehashed``) in the oracle.

        Raises:
            InvalidArgumentError, UnsupportedOperationError: bad arguments, caught
                before anything is sent.
        """
        if isinstance(algorithm, NoDigestInfo):
            raise UnsupportedOperationError("raw PKCS#1 v1.5 without DigestInfo is not offered")
        params, digest = _wire.encode_sign(padding, algorithm, data, self._bits)
        return self._client.call(lib.SHMKEY_OP_SIGN, params, digest, key=self._index)

    def decrypt(self, ciphertext: bytes, padding: apad.AsymmetricPadding) -> bytes:
        """Decrypt in the oracle (OAEP by default; PKCS#1 v1.5 only if its policy allows).

        Raises:
            DecryptionError: the ciphertext did not decrypt (one error for every cause).
            PolicyError: the oracle does not allow this padding.
        """
        params, payload = _wire.encode_decrypt(padding, ciphertext, self._bytes)
        return self._client.call(lib.SHMKEY_OP_DECRYPT, params, payload, key=self._index)

    def ping(self) -> None:
        """A no-op round trip over the same path as ``sign``."""
        self._client.ping()

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        """Always raises: the private numbers never leave the oracle."""
        raise KeyIsolatedError("the private key lives in the key oracle; it cannot be exported")

    def private_bytes(self, encoding: serialization.Encoding,
                      format: serialization.PrivateFormat,
                      encryption_algorithm: serialization.KeySerializationEncryption) -> bytes:
        """Always raises: the private key never leaves the oracle."""
        raise KeyIsolatedError("the private key lives in the key oracle; it cannot be serialized")

    def __copy__(self) -> "OracleKey":
        return self

    def __deepcopy__(self, memo: dict) -> "OracleKey":
        return self

    def __repr__(self) -> str:
        return f"<OracleKey RSA-{self._bits} via {self._client.transport} oracle>"

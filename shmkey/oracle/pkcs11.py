"""Private keys in a PKCS#11 token (an HSM, a cloud KMS's PKCS#11 library,
SoftHSM2) as the oracle's key sources: found by an RFC 7512 URI, the public
half read from the token, each request one ``C_Sign`` or ``C_Decrypt`` on a
session of the calling worker's own, re-opened when the token loses it.

The keys are stand-ins for (and subclasses of) ``cryptography``'s private
keys, so the handler serves them like key files. The binding is
python-pkcs11 (the optional extra ``shmkey[pkcs11]``).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, NoReturn, Optional, TypeVar, Union

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric import padding as apad
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from .. import _p11uri, _wire
from .._binding import ffi, lib
from .._held import HeldElsewhere
from ..errors import (ConfigError, DecryptionError, InvalidArgumentError, KeyLoadError,
                      TokenUnavailableError, UnsupportedOperationError)

try:
    import pkcs11
except ImportError:     # the optional extra; load() says how to get it
    pkcs11 = None  # type: ignore[assignment]

log = logging.getLogger("shmkey.oracle")

T = TypeVar("T")
Buffer = Union[bytes, bytearray, memoryview]

#: After a failed re-open, requests fail at once for this long instead of each
#: waiting on the token again.
RETRY_INTERVAL = 0.2


def _digest_info(code: int) -> bytes:
    """The DigestInfo prefix CKM_RSA_PKCS signs before a digest: C's (the C signer's) copy."""
    prefix, length = ffi.new("const uint8_t **"), ffi.new("uint32_t *")
    if lib.shmkey_digest_info(code, prefix, length) != lib.SHMKEY_OK:
        raise AssertionError(f"no DigestInfo for hash {code}")
    return bytes(ffi.buffer(prefix[0], length[0]))


# RFC 8017 9.2 note 1, by hash name: CKM_RSA_PKCS signs DigestInfo || digest.
_DIGEST_INFO = {_wire.HASHES[code]().name: _digest_info(code) for code in sorted(_wire.SIGN_HASHES)}
_CURVE_OIDS = {bytes.fromhex("06082a8648ce3d030107"): ec.SECP256R1(),
               bytes.fromhex("06052b81040022"): ec.SECP384R1()}
# CKA_EC_PARAMS of an Ed25519 key: the OID 1.3.101.112, or the curve's name (PKCS#11 3.0).
_ED25519_PARAMS = (bytes.fromhex("06032b6570"), b"\x13\x0cedwards25519")


def _hash_mechanisms(name: str) -> tuple[Any, Any]:
    """(hash mechanism, MGF1 generator) for a ``cryptography`` hash name."""
    table = {"sha1": (pkcs11.Mechanism.SHA_1, pkcs11.MGF.SHA1),
             "sha256": (pkcs11.Mechanism.SHA256, pkcs11.MGF.SHA256),
             "sha384": (pkcs11.Mechanism.SHA384, pkcs11.MGF.SHA384),
             "sha512": (pkcs11.Mechanism.SHA512, pkcs11.MGF.SHA512)}
    if name not in table:
        raise UnsupportedOperationError(f"hash {name!r} is not offered for token keys")
    return table[name]


def _request_errors() -> tuple[type[Exception], ...]:
    """Token errors that condemn the request, not the session."""
    return (pkcs11.MechanismInvalid, pkcs11.MechanismParamInvalid, pkcs11.ArgumentsBad,
            pkcs11.DataInvalid, pkcs11.DataLenRange, pkcs11.KeyTypeInconsistent,
            pkcs11.KeySizeRange, pkcs11.FunctionNotSupported)


class _Module:
    """One PKCS#11 library in this process. python-pkcs11 initializes it
    without ``CKF_OS_LOCKING_OK``, so every call into it holds :attr:`lock`;
    the oracle gets parallelism from worker processes, each its own module."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.generation = 0         # bumped whenever every session became invalid
        self._lib: Any = None
        self._forked = False

    def lib(self) -> Any:
        """The initialized library (loaded once; initialized again after a
        finalize or a fork).

        Raises:
            KeyLoadError: the library cannot be loaded or initialized.
        """
        try:
            if self._lib is None:
                self._lib = pkcs11.lib(self.path)
            elif self._forked and self._lib.initialized:
                self._lib.reinitialize()    # PKCS#11 wants C_Initialize again after fork()
            elif not self._lib.initialized:
                self._lib.initialize()
        except pkcs11.PKCS11Error as exc:
            raise KeyLoadError(f"cannot load the PKCS#11 module {self.path}: {_why(exc)}") from None
        self._forked = False
        return self._lib

    def finalize(self) -> None:
        """``C_Finalize``: every session of every token of this module ends."""
        self.generation += 1
        if self._lib is not None and self._lib.initialized:
            try:
                self._lib.finalize()
            except pkcs11.PKCS11Error as exc:
                log.info("PKCS#11 module %s: C_Finalize failed: %s", self.path, _why(exc))

    def after_fork(self) -> None:
        """In a forked child: the parent's sessions and locks are not ours."""
        self.lock = threading.RLock()
        self.generation += 1
        self._forked = True


_MODULES: dict[str, _Module] = {}


def _after_fork() -> None:
    for module in _MODULES.values():
        module.after_fork()


os.register_at_fork(after_in_child=_after_fork)


def _module(path: str) -> _Module:
    if path not in _MODULES:
        _MODULES[path] = _Module(path)
    return _MODULES[path]


def _why(exc: BaseException) -> str:
    """A token error for messages: its class (the CKR_ name) and any text."""
    text = str(exc)
    return type(exc).__name__ + (f" ({text})" if text and text != type(exc).__name__ else "")


class _Session:
    """A worker's session and the key object found in it."""

    def __init__(self, session: Any, key: Any, epoch: tuple[int, int]) -> None:
        self.session, self.key, self.epoch = session, key, epoch


class TokenKeySource:
    """One key in a token: the login, a session per worker thread, re-opened
    after a failure (with a log line; the failed request gets a
    :class:`TokenUnavailableError`), and the public key it must keep holding."""

    def __init__(self, uri: _p11uri.Pkcs11Uri, module_path: str, pin: Optional[bytes]) -> None:
        self.uri, self.shown = uri, uri.redacted()
        self._module = _module(module_path)
        self._pin = pin
        self._epoch = 0
        self._login: Any = None
        self._login_epoch: Optional[tuple[int, int]] = None
        self._token: Any = None
        self._local = threading.local()
        self._retry_at = 0.0
        self._down = ""
        self.spki: Optional[bytes] = None       # set by load(); later keys must match it

    # -- finding things ----------------------------------------------------
    def _find_token(self, lib: Any) -> Any:
        p, found = self.uri.path, []
        for slot in lib.get_slots(token_present=True):
            if self.uri.slot_id is not None and slot.slot_id != self.uri.slot_id:
                continue
            if not _matches(p, "slot-description", slot.slot_description) or \
                    not _matches(p, "slot-manufacturer", slot.manufacturer_id):
                continue
            token = slot.get_token()
            serial = token.serial.decode(errors="replace") if isinstance(token.serial, bytes) \
                else str(token.serial)
            if all(_matches(p, attr, value) for attr, value in (
                    ("token", token.label), ("manufacturer", token.manufacturer_id),
                    ("serial", serial), ("model", token.model))):
                found.append(token)
        if not found:
            raise KeyLoadError(f"{self.shown}: no token matches in {self._module.path}")
        if len(found) > 1:
            raise KeyLoadError(f"{self.shown}: {len(found)} tokens match; add serial= or slot-id=")
        return found[0]

    def _find_key(self, session: Any) -> Any:
        attrs: dict[Any, Any] = {pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY}
        if "object" in self.uri.path:
            attrs[pkcs11.Attribute.LABEL] = self.uri.path["object"]
        if self.uri.key_id is not None:
            attrs[pkcs11.Attribute.ID] = self.uri.key_id
        found = list(session.get_objects(attrs))
        if not found:
            both = " with both that object= and that id=" if len(attrs) == 3 else ""
            raise KeyLoadError(f"{self.shown}: no private key{both} in token "
                               f"{self._token.label!r}")
        if len(found) > 1:
            raise KeyLoadError(f"{self.shown}: {len(found)} private keys match; add id=")
        return found[0]

    # -- sessions ----------------------------------------------------------
    @property
    def module_path(self) -> str:
        """The PKCS#11 module's file."""
        return self._module.path

    def _current(self) -> tuple[int, int]:
        return (self._module.generation, self._epoch)

    def handles(self) -> Optional[tuple[int, int]]:
        """(session, key object) handles of this thread's session while it is
        current, for the oracle's C signer; None when it has none (not opened
        yet, lost, or the module finalized since)."""
        st: Optional[_Session] = getattr(self._local, "s", None)
        if st is None or st.epoch != self._current():
            return None
        return int(st.session.handle), int(st.key.handle)

    def _session(self, announce: bool = True) -> _Session:
        """This thread's session, opened (and logged in) if it has none; call
        with the module's lock held. A failure is logged if ``announce``."""
        st: Optional[_Session] = getattr(self._local, "s", None)
        epoch = self._current()
        if st is not None and st.epoch == epoch:
            return st
        if st is not None and st.epoch[0] == epoch[0]:
            self._local.s = None
            try:
                st.session.close()      # same library instance: the handle is ours to close
            except pkcs11.PKCS11Error:
                pass
        if time.monotonic() < self._retry_at:
            raise TokenUnavailableError(self._down)
        try:
            lib = self._module.lib()
            epoch = self._current()
            if self._login is None or self._login_epoch != epoch:
                self._token = self._find_token(lib)
                self._login = self._log_in(self._token)
                self._login_epoch = epoch
            session = self._token.open()
            key = self._find_key(session)
            if self.spki is not None and _spki(public_of(session, key, self.shown)) != self.spki:
                raise KeyLoadError(f"{self.shown}: the token now holds another key under this "
                                   "URI; restart the oracle to serve it")
        except (KeyLoadError, pkcs11.PKCS11Error) as exc:
            self._retry_at = time.monotonic() + RETRY_INTERVAL
            if isinstance(exc, pkcs11.PKCS11Error):
                # The library may hold a stale view of the token (SoftHSM2 reads its
                # store at C_Initialize): the next attempt starts it afresh.
                self._login = None
                self._module.finalize()
            why = str(exc) if isinstance(exc, KeyLoadError) else _why(exc)
            self._down = f"token of {self.shown} is unavailable: {why}"
            if announce:
                log.warning("%s", self._down)
            raise TokenUnavailableError(self._down) from None
        st = _Session(session, key, epoch)
        self._local.s = st
        return st

    def _log_in(self, token: Any) -> Any:
        pin = None if self._pin is None else self._pin.decode()
        try:
            return token.open(user_pin=pin)
        except pkcs11.UserAlreadyLoggedIn:
            return token.open()         # the login of this process still holds
        except (pkcs11.PinIncorrect, pkcs11.PinInvalid, pkcs11.PinLenRange) as exc:
            raise KeyLoadError(f"{self.shown}: the token refused the PIN ({type(exc).__name__})") \
                from None
        except pkcs11.PinLocked:
            raise KeyLoadError(f"{self.shown}: the token's PIN is locked") from None

    def _lost(self, st: _Session, exc: BaseException, what: str) -> NoReturn:
        """A session failed: log it once, drop the login and every session of
        this key, and fail this request."""
        if st.epoch == self._current():
            self._epoch += 1
            log.warning("%s: %s during %s; the token's session will be re-opened",
                        self.shown, _why(exc), what)
            login, self._login = self._login, None
            if login is not None:
                try:
                    login.close()
                except pkcs11.PKCS11Error:
                    pass            # gone with the session it belonged to
            if isinstance(exc, pkcs11.PKCS11Error) and type(exc) is pkcs11.PKCS11Error:
                self._module.finalize()      # e.g. CKR_CRYPTOKI_NOT_INITIALIZED
        raise TokenUnavailableError(f"token of {self.shown} failed during {what}: {_why(exc)}")

    def call(self, what: str, fn: Callable[[Any], T],
             refused: Callable[[Exception], Exception]) -> T:
        """Run ``fn(key)`` on this thread's session.

        Args:
            what: the operation, for messages.
            fn: one PKCS#11 operation on the key object.
            refused: turns an error that condemns only this request into the
                exception to raise (the session stays).

        Raises:
            TokenUnavailableError: the token failed; the session will be re-opened.
        """
        with self._module.lock:
            st = self._session()
            try:
                return fn(st.key)
            except _request_errors() as exc:
                raise refused(exc) from None
            except pkcs11.PKCS11Error as exc:
                self._lost(st, exc, what)

    def release(self) -> None:
        """End this process's use of the module (``C_Finalize``), so that worker
        processes forked from it start with a clean library."""
        with self._module.lock:
            self._login = None
            self._module.finalize()


def _matches(path: dict[str, str], attr: str, value: Any) -> bool:
    return attr not in path or str(value).strip() == path[attr]


def _spki(public: Any) -> bytes:
    der: bytes = public.public_bytes(serialization.Encoding.DER,
                                     serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def _octets(raw: bytes) -> bytes:
    """CKA_EC_POINT: a DER OCTET STRING (the standard), or the bare point some tokens store."""
    if len(raw) >= 2 and raw[0] == 0x04:
        if raw[1] < 0x80 and raw[1] == len(raw) - 2:
            return raw[2:]
        if raw[1] == 0x81 and len(raw) >= 3 and raw[2] == len(raw) - 3:
            return raw[3:]
    return raw


def _companion(session: Any, key: Any, cls: Any) -> Any:
    """The public-key or certificate object sharing the private key's id (or label)."""
    attrs: dict[Any, Any] = {pkcs11.Attribute.CLASS: cls}
    try:
        attrs[pkcs11.Attribute.ID] = key[pkcs11.Attribute.ID]
    except pkcs11.PKCS11Error:
        attrs[pkcs11.Attribute.LABEL] = key[pkcs11.Attribute.LABEL]
    if not attrs.get(pkcs11.Attribute.ID):
        attrs.pop(pkcs11.Attribute.ID, None)
        attrs[pkcs11.Attribute.LABEL] = key[pkcs11.Attribute.LABEL]
    found = list(session.get_objects(attrs))
    return found[0] if len(found) == 1 else None


def public_of(session: Any, key: Any, shown: str) -> Any:
    """The private key's public half: from its own attributes (RSA), its
    public-key object, or its certificate.

    Raises:
        KeyLoadError: an unsupported key type or curve, or no public half found.
    """
    kind = key[pkcs11.Attribute.KEY_TYPE]
    if kind == pkcs11.KeyType.RSA:
        try:
            n = int.from_bytes(key[pkcs11.Attribute.MODULUS], "big")
            e = int.from_bytes(key[pkcs11.Attribute.PUBLIC_EXPONENT], "big")
            return rsa.RSAPublicNumbers(e, n).public_key()
        except pkcs11.PKCS11Error:
            pass            # some tokens keep only the modulus: try the other objects
    elif kind not in (pkcs11.KeyType.EC, pkcs11.KeyType.EC_EDWARDS):
        raise KeyLoadError(f"{shown}: a {kind.name if hasattr(kind, 'name') else kind} key; RSA, "
                           "EC (P-256, P-384) and Ed25519 token keys are supported")
    pub = _companion(session, key, pkcs11.ObjectClass.PUBLIC_KEY)
    if pub is not None and kind != pkcs11.KeyType.RSA:
        params = bytes(key[pkcs11.Attribute.EC_PARAMS])
        point = _octets(bytes(pub[pkcs11.Attribute.EC_POINT]))
        if kind == pkcs11.KeyType.EC_EDWARDS:
            if params not in _ED25519_PARAMS:
                raise KeyLoadError(f"{shown}: an Edwards curve other than Ed25519")
            return ed25519.Ed25519PublicKey.from_public_bytes(point)
        curve = _CURVE_OIDS.get(params)
        if curve is None:
            raise KeyLoadError(f"{shown}: an EC key on a curve other than P-256 and P-384")
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
    if pub is not None:
        n = int.from_bytes(pub[pkcs11.Attribute.MODULUS], "big")
        e = int.from_bytes(pub[pkcs11.Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    cert = _companion(session, key, pkcs11.ObjectClass.CERTIFICATE)
    if cert is None:
        raise KeyLoadError(f"{shown}: the token has no public key or certificate for this key")
    return x509.load_der_x509_certificate(bytes(cert[pkcs11.Attribute.VALUE])).public_key()


# -- the keys ----------------------------------------------------------------
class TokenHeld(HeldElsewhere):
    """What every token key shares: its source and public half."""

    _HELD_IN = "a PKCS#11 token"

    source: TokenKeySource

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.source.shown}>"

    def c_signer(self) -> tuple[int, int]:
        """What the oracle's C signer needs to know of the key besides its module
        and handles: its type (``SHMKEY_KEY_*``) and the length of the raw
        signatures the token returns."""
        raise NotImplementedError


def _unsupported(what: str) -> Callable[[Exception], Exception]:
    return lambda exc: UnsupportedOperationError(f"the token refused {what} ({_why(exc)})")


class TokenRSAKey(TokenHeld, rsa.RSAPrivateKey):
    """An RSA key in a token: PKCS#1 v1.5 and PSS signatures over a digest, OAEP
    (and, if the policy allows, PKCS#1 v1.5) decryption."""

    def __init__(self, source: TokenKeySource, public: rsa.RSAPublicKey) -> None:
        self.source, self._public = source, public

    @property
    def key_size(self) -> int:
        """Modulus size in bits."""
        return self._public.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        """The public half, read from the token at start."""
        return self._public

    def c_signer(self) -> tuple[int, int]:
        """RSA; a signature is as long as the modulus."""
        return int(lib.SHMKEY_KEY_RSA), (self.key_size + 7) // 8

    def sign(self, data: Buffer, padding: apad.AsymmetricPadding, algorithm: Any) -> bytes:
        """``CKM_RSA_PKCS`` over DigestInfo || digest, or ``CKM_RSA_PKCS_PSS``
        with the hash, MGF1 hash and salt length of ``padding``.

        Raises:
            UnsupportedOperationError: a padding or hash not offered, or refused by the token.
            TokenUnavailableError: the token failed.
        """
        alg, digest = _wire.digest_for(algorithm, bytes(data))
        if isinstance(padding, apad.PKCS1v15):
            prefix = _DIGEST_INFO.get(alg.name)
            if prefix is None:
                raise UnsupportedOperationError(f"PKCS#1 v1.5 with {alg.name} is not offered")
            message, mech, param = prefix + digest, pkcs11.Mechanism.RSA_PKCS, None
            what = "PKCS#1 v1.5 signing"
        elif isinstance(padding, apad.PSS) and isinstance(padding._mgf, apad.MGF1):
            salt = padding._salt_length
            if salt is apad.PSS.DIGEST_LENGTH:
                salt = alg.digest_size
            elif salt is apad.PSS.MAX_LENGTH:
                salt = _wire.pss_max_salt(self.key_size, alg.digest_size)
            elif not isinstance(salt, int):
                raise InvalidArgumentError("PSS salt length AUTO is for verifying only")
            hash_mech, _ = _hash_mechanisms(alg.name)
            _, mgf = _hash_mechanisms(padding._mgf._algorithm.name)
            message, mech, param = digest, pkcs11.Mechanism.RSA_PKCS_PSS, (hash_mech, mgf, salt)
            what = f"PSS signing with {alg.name}"
        else:
            raise UnsupportedOperationError(f"padding {padding.name!r} is not offered")
        out: bytes = self.source.call(
            "sign", lambda key: key.sign(message, mechanism=mech, mechanism_param=param),
            _unsupported(what))
        return out

    def decrypt(self, ciphertext: Buffer, padding: apad.AsymmetricPadding) -> bytes:
        """``CKM_RSA_PKCS_OAEP`` (no label) or ``CKM_RSA_PKCS``.

        Raises:
            DecryptionError: the ciphertext did not decrypt (one error for every cause).
            UnsupportedOperationError: a label, or parameters the token refuses.
            TokenUnavailableError: the token failed.
        """
        if isinstance(padding, apad.OAEP) and isinstance(padding._mgf, apad.MGF1):
            if padding._label:
                # SoftHSM2 2.6 ignores the label, which would accept any: refuse them all.
                raise UnsupportedOperationError("OAEP labels are not offered for token keys")
            hash_mech, _ = _hash_mechanisms(padding._algorithm.name)
            _, mgf = _hash_mechanisms(padding._mgf._algorithm.name)
            mech, param = pkcs11.Mechanism.RSA_PKCS_OAEP, (hash_mech, mgf, None)
            what = f"OAEP with {padding._algorithm.name} and MGF1-{padding._mgf._algorithm.name}"
        elif isinstance(padding, apad.PKCS1v15):
            mech, param, what = pkcs11.Mechanism.RSA_PKCS, None, "PKCS#1 v1.5 decryption"
        else:
            raise UnsupportedOperationError(f"padding {padding.name!r} is not offered")

        def refused(exc: Exception) -> Exception:
            # Parameters are the caller's choice, so saying which were refused tells
            # nothing about the ciphertext; every other failure is one DecryptionError.
            if isinstance(exc, (pkcs11.MechanismInvalid, pkcs11.MechanismParamInvalid,
                                pkcs11.ArgumentsBad, pkcs11.FunctionNotSupported)):
                return UnsupportedOperationError(f"the token refused {what} ({_why(exc)})")
            return DecryptionError("decryption failed")

        def run(key: Any) -> bytes:
            try:
                out: bytes = key.decrypt(bytes(ciphertext), mechanism=mech, mechanism_param=param)
                return out
            except (pkcs11.EncryptedDataInvalid, pkcs11.EncryptedDataLenRange,
                    pkcs11.GeneralError, pkcs11.FunctionFailed):
                # SoftHSM2 answers a bad OAEP padding with CKR_GENERAL_ERROR.
                raise DecryptionError("decryption failed") from None

        return self.source.call("decrypt", run, refused)


class TokenECKey(TokenHeld, ec.EllipticCurvePrivateKey):
    """An EC key in a token: ECDSA (``CKM_ECDSA``) with DER output."""

    def __init__(self, source: TokenKeySource, public: ec.EllipticCurvePublicKey) -> None:
        self.source, self._public = source, public

    @property
    def curve(self) -> ec.EllipticCurve:
        """The key's curve."""
        return self._public.curve

    @property
    def key_size(self) -> int:
        """Curve size in bits."""
        return self._public.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The public half, read from the token at start."""
        return self._public

    def c_signer(self) -> tuple[int, int]:
        """EC; r || s, each as long as the field."""
        return int(lib.SHMKEY_KEY_EC), 2 * ((self.key_size + 7) // 8)

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        """``CKM_ECDSA`` over the digest; the token's r || s becomes DER.

        Raises:
            UnsupportedOperationError: not ECDSA.
            TokenUnavailableError: the token failed.
        """
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise UnsupportedOperationError("only ECDSA signatures are offered for EC keys")
        _, digest = _wire.digest_for(signature_algorithm.algorithm, bytes(data))
        raw: bytes = self.source.call(
            "sign", lambda key: key.sign(digest, mechanism=pkcs11.Mechanism.ECDSA),
            _unsupported("ECDSA signing"))
        half = len(raw) // 2
        if len(raw) != 2 * half or half != (self.key_size + 7) // 8:
            raise TokenUnavailableError(f"token of {self.source.shown} returned a "
                                        f"{len(raw)}-byte ECDSA signature")
        return encode_dss_signature(int.from_bytes(raw[:half], "big"),
                                    int.from_bytes(raw[half:], "big"))

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> NoReturn:
        """Not offered: TLS key exchange uses ephemeral keys, never the certificate's."""
        raise UnsupportedOperationError("ECDH with a token key is not offered")


class TokenEd25519Key(TokenHeld, ed25519.Ed25519PrivateKey):
    """An Ed25519 key in a token: pure Ed25519 through ``CKM_EDDSA``."""

    def __init__(self, source: TokenKeySource, public: ed25519.Ed25519PublicKey) -> None:
        self.source, self._public = source, public

    def public_key(self) -> ed25519.Ed25519PublicKey:
        """The public half, read from the token at start."""
        return self._public

    def c_signer(self) -> tuple[int, int]:
        """Ed25519; 64-byte signatures."""
        return int(lib.SHMKEY_KEY_ED25519), 64

    def sign(self, data: Buffer) -> bytes:
        """``CKM_EDDSA`` over the message itself.

        Raises:
            UnsupportedOperationError: the token has no CKM_EDDSA.
            TokenUnavailableError: the token failed.
        """
        message = bytes(data)
        out: bytes = self.source.call(
            "sign", lambda key: key.sign(message, mechanism=pkcs11.Mechanism.EDDSA),
            _unsupported("Ed25519 signing (CKM_EDDSA)"))
        return out

    def private_bytes_raw(self) -> NoReturn:
        """Always raises: the private key never leaves the token."""
        self.private_bytes()


TokenKey = Union[TokenRSAKey, TokenECKey, TokenEd25519Key]


def load(source: str, default_module: str = "") -> TokenKey:
    """Open the key a PKCS#11 URI names: load the module, find the token, log in,
    find the private key and read its public half; then finalize the module,
    so that worker processes forked afterwards initialize it afresh.

    Args:
        source: the URI (RFC 7512), e.g. ``pkcs11:token=web;object=tls?pin-source=file:/etc/pin``.
        default_module: the module when the URI has no ``module-path``
            (``--pkcs11-module``, ``SHMKEY_PKCS11_MODULE``).

    Raises:
        ConfigError: a malformed URI, no module, a bad PIN file.
        KeyLoadError: the module, token, PIN or key failed; the message names
            the URI without its PIN.
    """
    uri = _p11uri.parse(source)
    shown = uri.redacted()
    if pkcs11 is None:
        raise KeyLoadError(f"{shown}: PKCS#11 needs python-pkcs11: pip install 'shmkey[pkcs11]'")
    module_path = uri.query.get("module-path") or default_module
    if not module_path:
        raise ConfigError(f"{shown}: no PKCS#11 module; add module-path= to the URI, or "
                          "pass --pkcs11-module (SHMKEY_PKCS11_MODULE)")
    if not os.path.isabs(module_path):
        raise ConfigError(f"{shown}: the PKCS#11 module path {module_path!r} is not absolute")
    if not os.path.exists(module_path):
        raise KeyLoadError(f"{shown}: the PKCS#11 module {module_path} does not exist")
    src = TokenKeySource(uri, module_path, _p11uri.read_pin(uri))
    try:
        with src._module.lock:
            try:
                st = src._session(announce=False)
            except TokenUnavailableError as exc:
                raise KeyLoadError(str(exc)) from None
            public = public_of(st.session, st.key, shown)
        src.spki = _spki(public)
    finally:
        src.release()
    src._retry_at = 0.0
    if isinstance(public, rsa.RSAPublicKey):
        return TokenRSAKey(src, public)
    if isinstance(public, ec.EllipticCurvePublicKey):
        return TokenECKey(src, public)
    if isinstance(public, ed25519.Ed25519PublicKey):
        return TokenEd25519Key(src, public)
    raise KeyLoadError(f"{shown}: its certificate holds a {type(public).__name__}")

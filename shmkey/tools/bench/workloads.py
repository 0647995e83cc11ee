"""What ``shmkey bench`` measures: the targets (an in-process key, an oracle
over a socketpair, an oracle over the shm ring), the operations on them, each
result checked, and the throwaway keys they use.
"""
from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding as apad
from cryptography.hazmat.primitives.asymmetric import rsa

from ...client.keys import OracleKey
from ...errors import ShmkeyError
from ...launcher import KeyOracle

MODES = ("in-process", "socketpair", "shm")
TRANSPORTS = ("socketpair", "shm")
OPERATIONS = ("ping", "ping-c", "sign-pss", "sign-pkcs1", "decrypt-oaep")

MESSAGE = b"shmkey bench: the bytes a TLS server signs" * 2
PLAINTEXT = b"a 48-byte TLS premaster secret, give or take...."
PSS = apad.PSS(mgf=apad.MGF1(hashes.SHA256()), salt_length=apad.PSS.DIGEST_LENGTH)
OAEP = apad.OAEP(mgf=apad.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def write_key(path: Path, bits: int) -> Path:
    """Generate a throwaway RSA key and write it as PEM, mode 0600.

    Args:
        path: file to create (must not exist).
        bits: modulus size.

    Returns:
        ``path``.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return path


@dataclass
class Target:
    """One mode ready to serve: a key object, and the oracle behind it if any."""

    mode: str
    bits: int
    key: rsa.RSAPrivateKey
    oracle: Optional[KeyOracle] = None

    def close(self) -> None:
        """Stop the oracle, if this target has one."""
        if self.oracle is not None:
            self.oracle.stop()
            self.oracle = None


def open_target(mode: str, key_path: Path, **settings: Optional[int]) -> Target:
    """Make ``mode`` ready: load the key here, or start an oracle on it.

    Args:
        mode: one of :data:`MODES`.
        key_path: the PEM key.
        settings: ``workers``, ``slots``, ``spin_us``... for an oracle (None: default).

    Raises:
        ValueError: unknown mode.
        ShmkeyError: the oracle did not start.
    """
    if mode == "in-process":
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        return Target(mode, key.key_size, key)
    if mode not in TRANSPORTS:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    oracle = KeyOracle(key_path, transport=mode, **settings).start()  # type: ignore[arg-type]
    try:
        okey = oracle.private_key()
        if not isinstance(okey, OracleKey):
            raise ValueError("shmkey bench measures RSA keys")
    except BaseException:
        oracle.stop()
        raise
    return Target(mode, okey.key_size, okey, oracle)


def _noop() -> None:
    """The in-process "round trip": a Python call that does nothing."""


@dataclass
class Workload:
    """One operation on one target: ``run()`` does it once, ``check(result)``
    raises AssertionError unless the result is right, ``per_call`` is how many
    operations one ``run()`` performs.
    """

    op: str
    mode: str
    run: Callable[[], Any]
    check: Callable[[Any], None]
    per_call: int = 1


def _check_none(result: Any) -> None:
    assert result is None, f"ping returned {result!r}"


def workload(target: Target, op: str, batch: int = 200) -> Workload:
    """Bind ``op`` (one of :data:`OPERATIONS`) to ``target``.

    Args:
        target: the mode and key.
        op: operation name; ``ping-c`` times ``batch`` pings in one C loop and
            exists only for oracle modes.
        batch: pings per ``run()`` for ``ping-c``.

    Raises:
        ValueError: unknown operation, or ``ping-c`` in-process.
    """
    key, pub = target.key, target.key.public_key()
    if op == "ping":
        return Workload(op, target.mode, target.key.ping if target.oracle else _noop,  # type: ignore[attr-defined]
                        _check_none)
    if op == "ping-c":
        if target.oracle is None:
            raise ValueError("ping-c needs an oracle; in-process has no transport")
        client = target.oracle.client

        def check_loop(ns: Any) -> None:
            assert len(ns) == batch and all(t > 0 for t in ns), "ping_loop returned bad timings"
        return Workload(op, target.mode, lambda: client.ping_loop(batch), check_loop, batch)
    if op in ("sign-pss", "sign-pkcs1"):
        pad: apad.AsymmetricPadding = PSS if op == "sign-pss" else apad.PKCS1v15()

        def check_sig(sig: Any) -> None:
            pub.verify(sig, MESSAGE, pad, hashes.SHA256())   # raises InvalidSignature
        return Workload(op, target.mode, lambda: key.sign(MESSAGE, pad, hashes.SHA256()),
                        check_sig)
    if op == "decrypt-oaep":
        ciphertext = pub.encrypt(PLAINTEXT, OAEP)

        def check_plain(plain: Any) -> None:
            assert plain == PLAINTEXT, "OAEP decrypt returned the wrong plaintext"
        return Workload(op, target.mode, lambda: key.decrypt(ciphertext, OAEP), check_plain)
    raise ValueError(f"operation {op!r} is not one of {', '.join(OPERATIONS)}")


class Lab:
    """Keys and targets for a run, made on first use and reused; a context
    manager that stops every oracle and deletes every key at the end.

    Keys are throwaway, generated in a private temporary directory.
    """

    def __init__(self, key_path: Optional[Path] = None) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="shmkey-bench-")
        self._keys: dict[int, Path] = {}
        self._given = Path(key_path) if key_path else None
        self._targets: dict[tuple[Any, ...], Target] = {}
        self._names: list[str] = []

    def key_path(self, bits: int) -> Path:
        """A PEM key of ``bits`` (the given key, if one was given and fits)."""
        if bits not in self._keys:
            if self._given is not None:
                self._keys[bits] = self._given
            else:
                self._keys[bits] = write_key(Path(self._dir.name) / f"rsa{bits}.pem", bits)
        return self._keys[bits]

    @staticmethod
    def _ident(mode: str, bits: int, settings: dict[str, Any]) -> tuple[Any, ...]:
        given = {k: v for k, v in settings.items() if v is not None}
        return (mode, bits) + (tuple(sorted(given.items())) if mode != "in-process" else ())

    def target(self, mode: str, bits: int = 2048, **settings: Optional[int]) -> Target:
        """The target for ``mode`` with these oracle settings (ignored in-process)."""
        ident = self._ident(mode, bits, settings)
        if ident not in self._targets:
            target = open_target(mode, self.key_path(bits), **dict(ident[2:]))
            if target.oracle is not None:
                self._names.append(target.oracle.name)
            self._targets[ident] = target
        return self._targets[ident]

    def oracle_pids(self) -> list[int]:
        """Process ids of the oracles running now."""
        return [t.oracle.pid for t in self._targets.values()
                if t.oracle is not None and t.oracle.pid is not None]

    def oracle_names(self) -> list[str]:
        """Names of every oracle this lab started, stopped or not."""
        return list(self._names)

    def workload(self, mode: str, op: str, bits: int = 2048,
                 **settings: Optional[int]) -> Workload:
        """Shortcut: ``workload(self.target(mode, bits, **settings), op)``."""
        return workload(self.target(mode, bits, **settings), op)

    def release(self, mode: str, bits: int = 2048, **settings: Optional[int]) -> None:
        """Stop one target's oracle now (frees its processes for the next test)."""
        target = self._targets.pop(self._ident(mode, bits, settings), None)
        if target is not None:
            target.close()

    def close(self) -> None:
        """Stop every oracle and delete the keys."""
        errors: list[BaseException] = []

        def stop(target: Target) -> None:
            try:
                target.close()
            except ShmkeyError as exc:   # keep stopping the others
                errors.append(exc)
        # In parallel: a socket oracle takes a few hundred ms to wind down.
        stoppers = [threading.Thread(target=stop, args=(t,)) for t in self._targets.values()]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        self._targets.clear()
        self._dir.cleanup()
        if errors:
            raise errors[0]

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

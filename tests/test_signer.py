"""The oracle's C signer on its own: shmkey's server code with the Python
layer replaced by a program that answers "python" (tests/c/signer_probe.c),
so each request shows which side served it. The common TLS signatures of
every key type come back from C and verify; every other shape reaches
Python; the C counters count exactly the C signatures."""
from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from shmkey._binding import lib
from shmkey.client.connection import OracleClient
from shmkey.errors import UnsupportedOperationError

from .ctools import build_tool

HASHES = {lib.SHMKEY_HASH_SHA256: hashes.SHA256(), lib.SHMKEY_HASH_SHA384: hashes.SHA384(),
          lib.SHMKEY_HASH_SHA512: hashes.SHA512(), lib.SHMKEY_HASH_SHA1: hashes.SHA1()}
PSS, PKCS1, ECDSA, ED = (lib.SHMKEY_PAD_PSS, lib.SHMKEY_PAD_PKCS1V15, lib.SHMKEY_SIG_ECDSA,
                         lib.SHMKEY_SIG_ED25519)
S256, S384, S512, S1 = (lib.SHMKEY_HASH_SHA256, lib.SHMKEY_HASH_SHA384, lib.SHMKEY_HASH_SHA512,
                        lib.SHMKEY_HASH_SHA1)


def key_id(n: int) -> bytes:
    return bytes([n]) + bytes(31)


@pytest.fixture(scope="module")
def probe() -> Iterator[tuple[OracleClient, dict[int, Any]]]:
    d = Path(tempfile.mkdtemp(prefix="shmkey-signer-"))
    keys = {1: rsa.generate_private_key(65537, 2048), 2: ec.generate_private_key(ec.SECP256R1()),
            3: ec.generate_private_key(ec.SECP384R1()), 4: ed25519.Ed25519PrivateKey.generate()}
    paths = []
    for n, key in keys.items():
        p = d / f"{n}.der"
        p.write_bytes(key.private_bytes(serialization.Encoding.DER,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
        paths.append(str(p))
    sock = str(d / "probe.sock")
    proc = subprocess.Popen([str(build_tool("signer_probe", d)), sock, *paths],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "listening\n"
        client = OracleClient.open(path=sock, transport="shm", timeout_ms=5000)
        with pytest.raises(UnsupportedOperationError, match="python"):
            # A connection's first request goes to Python, which gives it its counters.
            client.call(lib.SHMKEY_OP_SIGN, (PSS, S256, S256, 32), bytes(32), key_id(1))
        yield client, keys
        client.close()
    finally:
        proc.kill()
        proc.wait()
        subprocess.run(["rm", "-rf", str(d)], check=False)


def verify(key: Any, params: tuple[int, int, int, int], data: bytes, sig: bytes) -> None:
    pub = key.public_key()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        pub.verify(sig, data)
        return
    pre = utils.Prehashed(HASHES[params[1]])
    if isinstance(key, ec.EllipticCurvePrivateKey):
        pub.verify(sig, data, ec.ECDSA(pre))
    elif params[0] == PSS:
        pub.verify(sig, data, padding.PSS(padding.MGF1(HASHES[params[2]]), params[3]), pre)
    else:
        pub.verify(sig, data, padding.PKCS1v15(), pre)


C_SHAPES = [(1, (PKCS1, h, 0, 0), HASHES[h].digest_size) for h in (S256, S384, S512)] + \
    [(1, (PSS, h, h, HASHES[h].digest_size), HASHES[h].digest_size) for h in (S256, S384, S512)] + \
    [(k, (ECDSA, h, 0, 0), HASHES[h].digest_size) for k in (2, 3) for h in (S256, S384, S512)] + \
    [(4, (ED, 0, 0, 0), 100), (4, (ED, 0, 0, 0), 0)]
# Valid or not, these are Python's to judge: other salts, MGF1 hashes, SHA-1, a
# digest of the wrong length, a scheme that is not the key's, a key not here.
PYTHON_SHAPES = [(1, (PSS, S256, S256, 0), 32), (1, (PSS, S256, S384, 32), 32),
                 (1, (PKCS1, S1, 0, 0), 20), (1, (PKCS1, S256, 0, 0), 31),
                 (1, (PSS, S256, S256, 32), 48), (2, (PSS, S256, S256, 32), 32),
                 (2, (ECDSA, S256, 0, 1), 32), (4, (ED, 1, 0, 0), 32), (1, (ED, 0, 0, 0), 32),
                 (9, (PKCS1, S256, 0, 0), 32), (1, (99, S256, 0, 0), 32)]


def test_common_signatures_are_made_in_c_and_verify(probe: Any) -> None:
    client, keys = probe
    before = client.call(lib.SHMKEY_OP_STATUS, (0, 0, 0, 0))
    for n, params, size in C_SHAPES:
        data = bytes(range(size))
        sig = client.call(lib.SHMKEY_OP_SIGN, params, data, key_id(n))
        verify(keys[n], params, data, sig)
    # The default key (id all zero) is the first one given.
    sig = client.call(lib.SHMKEY_OP_SIGN, (PSS, S256, S256, 32), bytes(32))
    verify(keys[1], (PSS, S256, S256, 32), bytes(32), sig)
    with pytest.raises(InvalidSignature):
        verify(keys[1], (PSS, S256, S256, 32), bytes(31) + b"\1", sig)
    after = client.call(lib.SHMKEY_OP_STATUS, (0, 0, 0, 0))
    n = len(C_SHAPES) + 1
    signs0, in_c0, ops0 = (int(x.split(b"=")[1]) for x in before.split())
    assert after == f"signs={signs0 + n} in_c={in_c0 + n} ops={ops0 + n}".encode()


@pytest.mark.parametrize("n,params,size", PYTHON_SHAPES)
def test_every_other_shape_goes_to_python(probe: Any, n: int, params: tuple[int, int, int, int],
                                          size: int) -> None:
    client, _ = probe
    with pytest.raises(UnsupportedOperationError, match="python"):
        client.call(lib.SHMKEY_OP_SIGN, params, bytes(size), key_id(n))


def test_decryption_stays_with_python(probe: Any) -> None:
    client, _ = probe
    with pytest.raises(UnsupportedOperationError, match="python"):
        client.call(lib.SHMKEY_OP_DECRYPT, (lib.SHMKEY_PAD_OAEP, S256, S256, 0), bytes(256),
                    key_id(1))

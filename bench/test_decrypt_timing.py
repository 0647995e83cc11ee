"""Decryption timing through the whole path: valid and invalid ciphertexts
side by side, for PKCS#1 v1.5 (implicit rejection in the oracle) and OAEP
(one DecryptionError for every failure). A padding oracle would show as a
gap between the two rows of a group; this measures it, it asserts nothing
about time (the machine is shared and noisy).
"""
from __future__ import annotations

from typing import Callable, Iterator

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

import shmkey
from shmkey.tools import bench

OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
PKCS1 = padding.PKCS1v15()
SECRET = b"pre-master secret, 48 bytes of it, as in TLS 1.2"


@pytest.fixture(scope="module", params=bench.TRANSPORTS)
def key(request: pytest.FixtureRequest, lab: bench.Lab) -> Iterator[shmkey.OracleKey]:
    with shmkey.KeyOracle(lab.key_path(2048), transport=request.param, workers=1,
                          allow_pkcs1v15_decrypt=True) as oracle:
        k = oracle.private_key()
        assert isinstance(k, shmkey.OracleKey)
        yield k


def ciphertexts(key: shmkey.OracleKey, pad: padding.AsymmetricPadding) -> dict[str, bytes]:
    good = key.public_key().encrypt(SECRET, pad)
    # Flip a bit of the integer's low end: decrypts to garbage padding.
    return {"valid": good, "invalid": good[:-1] + bytes([good[-1] ^ 1])}


def attempt(key: shmkey.OracleKey, ct: bytes, pad: padding.AsymmetricPadding) -> Callable[[], bytes]:
    def run() -> bytes:
        try:
            return key.decrypt(ct, pad)
        except shmkey.DecryptionError:
            return b""
    return run


@pytest.mark.parametrize("case", ["valid", "invalid"])
def test_pkcs1v15(benchmark, key: shmkey.OracleKey, case: str) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"decrypt timing, PKCS#1 v1.5, {key._client.transport}"
    out = benchmark(attempt(key, ciphertexts(key, PKCS1)[case], PKCS1))
    # Valid: the secret. Invalid: implicit rejection's synthetic plaintext, no error.
    assert (out == SECRET) == (case == "valid") and out


@pytest.mark.parametrize("case", ["valid", "invalid"])
def test_oaep(benchmark, key: shmkey.OracleKey, case: str) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"decrypt timing, OAEP SHA-256, {key._client.transport}"
    out = benchmark(attempt(key, ciphertexts(key, OAEP)[case], OAEP))
    assert out == (SECRET if case == "valid" else b"")

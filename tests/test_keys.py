"""Beyond RSA: ECDSA (P-256, P-384) and Ed25519 keys in the oracle, several
keys in one oracle named by the SHA-256 of their public key, and worker
processes (Ed25519 signing holds the GIL)."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

import shmkey
from shmkey._binding import lib

from .conftest import TRANSPORTS
from .test_faults import wait_until


def genpkey(path: Path, *args: str) -> Path:
    subprocess.run(["openssl", "genpkey", *args, "-out", str(path)], check=True,
                   capture_output=True)
    return path


@pytest.fixture(scope="module")
def p256(keydir: Path) -> Path:
    return genpkey(keydir / "p256.pem", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")


@pytest.fixture(scope="module")
def p384(keydir: Path) -> Path:
    return genpkey(keydir / "p384.pem", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384")


@pytest.fixture(scope="module")
def ed(keydir: Path) -> Path:
    return genpkey(keydir / "ed25519.pem", "-algorithm", "ED25519")


def child_pids(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_ecdsa_sign_and_verify(p256: Path, p384: Path, transport: str) -> None:
    with shmkey.KeyOracle([p256, p384], transport=transport, workers=2) as oracle:
        keys = oracle.client.private_keys()
        assert [k.curve.name for k in keys] == ["secp256r1", "secp384r1"]  # type: ignore[union-attr]
        for key in keys:
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            pub = key.public_key()
            for h in (hashes.SHA256(), hashes.SHA384(), hashes.SHA512()):
                msg = os.urandom(50)
                pub.verify(key.sign(msg, ec.ECDSA(h)), msg, ec.ECDSA(h))
                digest = hashes.Hash(h)
                digest.update(msg)
                sig = key.sign(digest.finalize(), ec.ECDSA(Prehashed(h)))
                pub.verify(sig, msg, ec.ECDSA(h))
            with pytest.raises(shmkey.UnsupportedOperationError):
                key.exchange(ec.ECDH(), pub)
            with pytest.raises(shmkey.UnsupportedOperationError):
                key.sign(b"x", ec.ECDSA(hashes.SHA1()))
            with pytest.raises(shmkey.KeyIsolatedError):
                key.private_numbers()
        # An EC key neither decrypts nor signs with an RSA scheme.
        kid = keys[0].key_id
        with pytest.raises(shmkey.UnsupportedOperationError, match="only RSA keys decrypt"):
            oracle.client.call(lib.SHMKEY_OP_DECRYPT, (lib.SHMKEY_PAD_OAEP, lib.SHMKEY_HASH_SHA256,
                                                        lib.SHMKEY_HASH_SHA256, 0), bytes(64),
                               key_id=kid)
        with pytest.raises(shmkey.UnsupportedOperationError, match="ECDSA"):
            oracle.client.call(lib.SHMKEY_OP_SIGN, (lib.SHMKEY_PAD_PSS, lib.SHMKEY_HASH_SHA256,
                                                     lib.SHMKEY_HASH_SHA256, 32), bytes(32),
                               key_id=kid)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_ed25519_in_worker_processes(ed: Path, transport: str) -> None:
    with shmkey.KeyOracle(ed, transport=transport, workers=2) as oracle:
        assert oracle.pid is not None
        assert len(child_pids(oracle.pid)) == 2      # auto: processes for Ed25519
        key = oracle.private_key()
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        pub = key.public_key()
        for size in (0, 1, 200, oracle.config.slot_size):
            msg = os.urandom(size)
            pub.verify(key.sign(msg), msg)
        with pytest.raises(shmkey.InvalidArgumentError, match="at most"):
            key.sign(bytes(oracle.config.slot_size + 1))
        with pytest.raises(shmkey.KeyIsolatedError):
            key.private_bytes_raw()
        with pytest.raises(shmkey.UnsupportedOperationError, match="ED25519"):
            oracle.client.call(lib.SHMKEY_OP_SIGN, (lib.SHMKEY_SIG_ECDSA, lib.SHMKEY_HASH_SHA256, 0, 0), bytes(32))


def test_several_keys_named_by_public_key_hash(rsa2048: Path, p256: Path, ed: Path) -> None:
    with shmkey.KeyOracle([rsa2048, p256, ed], workers=2, worker_kind="process") as oracle:
        keys = oracle.client.private_keys()
        assert [type(k) for k in keys] == [shmkey.OracleKey, shmkey.OracleECKey,
                                           shmkey.OracleEd25519Key]
        for key in keys:
            der = key.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
            h = hashes.Hash(hashes.SHA256())
            h.update(der)
            assert key.key_id == h.finalize() == shmkey.key_id(key.public_key())
            same = oracle.private_key(key.key_id)
            assert same.key_id == key.key_id
        rsa_key, ec_key, ed_key = keys
        assert isinstance(rsa_key, rsa.RSAPrivateKey) and oracle.private_key().key_id == rsa_key.key_id
        assert oracle.private_key(2).key_id == ed_key.key_id
        msg = b"dual certificate"
        rsa_key.public_key().verify(rsa_key.sign(msg, padding.PKCS1v15(), hashes.SHA256()), msg,
                                    padding.PKCS1v15(), hashes.SHA256())
        ec_key.public_key().verify(ec_key.sign(msg, ec.ECDSA(hashes.SHA256())), msg,  # type: ignore
                                   ec.ECDSA(hashes.SHA256()))
        ed_key.public_key().verify(ed_key.sign(msg), msg)  # type: ignore[call-arg]
        with pytest.raises(shmkey.InvalidArgumentError, match="no key with that id"):
            oracle.private_key(os.urandom(32))
        with pytest.raises(shmkey.InvalidArgumentError, match="no index 3"):
            oracle.private_key(3)


def test_same_key_twice_is_refused(p256: Path) -> None:
    with pytest.raises(shmkey.KeyLoadError, match="the same key was given twice"):
        shmkey.KeyOracle([p256, p256], workers=1).start()


def test_dead_worker_process_is_replaced(rsa2048: Path) -> None:
    """SIGKILL a worker process mid-load: a new one starts, its slot comes back."""
    with shmkey.KeyOracle(rsa2048, workers=2, worker_kind="process", slots=4) as oracle:
        assert oracle.pid is not None
        key = oracle.private_key()
        errors: list[BaseException] = []
        orphans: list[BaseException] = []
        done = threading.Event()

        def load() -> None:
            while not done.is_set():
                msg = os.urandom(16)
                try:
                    key.public_key().verify(key.sign(msg, padding.PKCS1v15(), hashes.SHA256()),
                                            msg, padding.PKCS1v15(), hashes.SHA256())
                except shmkey.OracleInternalError as exc:
                    # The request the dead worker held: answered, not lost.
                    assert "worker serving this request died" in str(exc)
                    orphans.append(exc)
                except BaseException as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=load) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        before = child_pids(oracle.pid)
        os.kill(before[0], signal.SIGKILL)
        assert wait_until(lambda: len(set(child_pids(oracle.pid)) - set(before)) == 1)
        time.sleep(0.5)
        done.set()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        assert wait_until(lambda: oracle.client.free_slots() == 4, timeout=10)
        msg = b"after"
        key.public_key().verify(key.sign(msg, padding.PKCS1v15(), hashes.SHA256()), msg,
                                padding.PKCS1v15(), hashes.SHA256())

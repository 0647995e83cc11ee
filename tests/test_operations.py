"""Every operation and padding through the oracle, over both transports and
all key sizes, checked with the public key; and every kind of bad input
rejected with a typed error while the oracle keeps answering correctly.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

import shmkey
from shmkey._binding import lib

from .conftest import TRANSPORTS

SIGN_HASHES = [hashes.SHA256(), hashes.SHA384(), hashes.SHA512()]


def pss(h: hashes.HashAlgorithm, salt: object = padding.PSS.MAX_LENGTH) -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(h), salt_length=salt)  # type: ignore[arg-type]


def sign_and_verify(key: shmkey.OracleKey, pad: padding.AsymmetricPadding,
                    alg: hashes.HashAlgorithm) -> None:
    msg = os.urandom(100)
    sig = key.sign(msg, pad, alg)
    assert len(sig) == key.key_size // 8
    key.public_key().verify(sig, msg, pad, alg)


@pytest.fixture(scope="module", params=[(t, b) for t in TRANSPORTS for b in (2048, 3072, 4096)],
                ids=lambda p: f"{p[0]}-rsa{p[1]}")
def sized_key(request: pytest.FixtureRequest, key_paths: dict[int, Path]):
    transport, bits = request.param
    with shmkey.KeyOracle(key_paths[bits], transport=transport, workers=2,
                          allow_pkcs1v15_decrypt=True) as o:
        yield o.private_key()


@pytest.mark.parametrize("alg", SIGN_HASHES, ids=lambda h: h.name)
def test_sign_every_padding_and_size(sized_key: shmkey.OracleKey, alg: hashes.HashAlgorithm) -> None:
    sign_and_verify(sized_key, padding.PKCS1v15(), alg)
    sign_and_verify(sized_key, pss(alg), alg)
    sign_and_verify(sized_key, pss(alg, padding.PSS.DIGEST_LENGTH), alg)
    sign_and_verify(sized_key, pss(alg, 0), alg)


def test_decrypt_every_padding_and_size(sized_key: shmkey.OracleKey) -> None:
    pub = sized_key.public_key()
    for h in (hashes.SHA1(), hashes.SHA256(), hashes.SHA512()):
        for label in (None, b"context label"):
            pad = padding.OAEP(mgf=padding.MGF1(h), algorithm=h, label=label)
            secret = os.urandom(32)
            assert sized_key.decrypt(pub.encrypt(secret, pad), pad) == secret
    secret = os.urandom(48)
    assert sized_key.decrypt(pub.encrypt(secret, padding.PKCS1v15()), padding.PKCS1v15()) == secret


def test_prehashed_and_mixed_mgf(oracle: shmkey.KeyOracle) -> None:
    key = oracle.private_key()
    msg = b"prehashed message"
    h = hashes.Hash(hashes.SHA384())
    h.update(msg)
    digest = h.finalize()
    pad = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=20)
    sig = key.sign(digest, pad, Prehashed(hashes.SHA384()))
    key.public_key().verify(sig, msg, pad, hashes.SHA384())


def test_known_answer_pkcs1v15(oracle: shmkey.KeyOracle, rsa2048: Path) -> None:
    """PKCS#1 v1.5 is deterministic: the oracle's bytes equal the reference's."""
    from cryptography.hazmat.primitives import serialization

    reference = serialization.load_pem_private_key(rsa2048.read_bytes(), None)
    assert isinstance(reference, rsa.RSAPrivateKey)
    msg = b"known answer"
    expected = reference.sign(msg, padding.PKCS1v15(), hashes.SHA256())
    assert oracle.private_key().sign(msg, padding.PKCS1v15(), hashes.SHA256()) == expected


def test_duck_types_rsa_private_key(oracle: shmkey.KeyOracle) -> None:
    key = oracle.private_key()
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 2048
    with pytest.raises(shmkey.KeyIsolatedError):
        key.private_numbers()
    with pytest.raises(shmkey.KeyIsolatedError):
        from cryptography.hazmat.primitives import serialization
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    key.ping()


def test_pkcs1v15_decrypt_refused_by_default(oracle: shmkey.KeyOracle) -> None:
    key = oracle.private_key()
    ct = key.public_key().encrypt(b"x", padding.PKCS1v15())
    with pytest.raises(shmkey.PolicyError, match="PKCS#1 v1.5"):
        key.decrypt(ct, padding.PKCS1v15())
    sign_and_verify(key, padding.PKCS1v15(), hashes.SHA256())


def test_oaep_can_be_disabled(rsa2048: Path) -> None:
    with shmkey.KeyOracle(rsa2048, allow_oaep_decrypt=False, workers=1) as o:
        key = o.private_key()
        pad = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
        with pytest.raises(shmkey.PolicyError):
            key.decrypt(key.public_key().encrypt(b"x", pad), pad)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bad_ciphertexts_all_get_one_error(rsa2048: Path, transport: str) -> None:
    with shmkey.KeyOracle(rsa2048, transport=transport, workers=1,
                          allow_pkcs1v15_decrypt=True) as o:
        key = o.private_key()
        oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
        good = key.public_key().encrypt(b"secret", oaep)
        n = key.public_key().public_numbers().n
        m0, m1, m_minus1 = (bytes(256), (1).to_bytes(256, "big"), (n - 1).to_bytes(256, "big"))
        out_of_range = [(n + 1).to_bytes(256, "big"), b"\xff" * 256]
        messages = set()
        bad_oaep = [m0, m1, m_minus1, *out_of_range, os.urandom(256),
                    good[:-1] + bytes([good[-1] ^ 1]),
                    key.public_key().encrypt(b"secret", padding.PKCS1v15())]
        for pad, bad in ((oaep, bad_oaep), (padding.PKCS1v15(), out_of_range)):
            for ct in bad:
                with pytest.raises(shmkey.DecryptionError) as info:
                    key.decrypt(ct, pad)
                messages.add(str(info.value))
        # PKCS#1 v1.5 with bad padding: implicit rejection (cryptography's OpenSSL
        # answers a synthetic plaintext derived from the key and ciphertext), so
        # there is no error, and no timing of an error path, to learn from.
        for ct in (m0, m1, m_minus1):
            first = key.decrypt(ct, padding.PKCS1v15())
            assert first == key.decrypt(ct, padding.PKCS1v15())
        wrong_label = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(),
                                   label=b"other")
        with pytest.raises(shmkey.DecryptionError) as info:
            key.decrypt(good, wrong_label)
        messages.add(str(info.value))
        assert messages == {"decryption failed"}
        assert key.decrypt(good, oaep) == b"secret"


def test_bad_arguments_raise_before_sending(oracle: shmkey.KeyOracle) -> None:
    key = oracle.private_key()
    with pytest.raises(shmkey.InvalidArgumentError, match="prehashed digest is 31 bytes"):
        key.sign(bytes(31), padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    with pytest.raises(shmkey.UnsupportedOperationError):
        key.sign(b"x", padding.PKCS1v15(), hashes.MD5())
    with pytest.raises(shmkey.UnsupportedOperationError):
        key.sign(b"x", padding.PKCS1v15(), hashes.SHA1())
    with pytest.raises(shmkey.InvalidArgumentError, match="salt length"):
        key.sign(b"x", pss(hashes.SHA256(), 300), hashes.SHA256())
    with pytest.raises(shmkey.InvalidArgumentError, match="AUTO"):
        key.sign(b"x", pss(hashes.SHA256(), padding.PSS.AUTO), hashes.SHA256())
    with pytest.raises(shmkey.InvalidArgumentError, match="ciphertext is 255 bytes"):
        key.decrypt(bytes(255), padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
    with pytest.raises(ValueError):      # InvalidArgumentError is a ValueError too
        key.decrypt(bytes(300), padding.PKCS1v15())
    with pytest.raises(shmkey.InvalidArgumentError, match="at most"):
        oracle.client.call(lib.SHMKEY_OP_SIGN, payload=bytes(oracle.config.slot_size + 1))
    sign_and_verify(key, padding.PKCS1v15(), hashes.SHA256())


def test_malformed_requests_get_typed_errors(oracle: shmkey.KeyOracle) -> None:
    """Requests a well-behaved client never sends, straight through the C path."""
    c = oracle.client
    with pytest.raises(shmkey.UnsupportedOperationError, match="unknown operation 99"):
        c.call(99)
    with pytest.raises(shmkey.UnsupportedOperationError):
        c.call(lib.SHMKEY_OP_SIGN, (77, lib.SHMKEY_HASH_SHA256, 0, 0), bytes(32))
    with pytest.raises(shmkey.UnsupportedOperationError):   # salt longer than the key allows
        c.call(lib.SHMKEY_OP_SIGN, (lib.SHMKEY_PAD_PSS, lib.SHMKEY_HASH_SHA256,
                                    lib.SHMKEY_HASH_SHA256, 1000), bytes(32))
    with pytest.raises(shmkey.InvalidArgumentError, match="digest is 20 bytes"):
        c.call(lib.SHMKEY_OP_SIGN, (lib.SHMKEY_PAD_PKCS1V15, lib.SHMKEY_HASH_SHA256, 0, 0), bytes(20))
    with pytest.raises(shmkey.InvalidArgumentError, match="no key with that id"):
        c.call(lib.SHMKEY_OP_SIGN, (lib.SHMKEY_PAD_PKCS1V15, lib.SHMKEY_HASH_SHA256, 0, 0),
               bytes(32), key_id=b"\x05" * 32)
    with pytest.raises(shmkey.InvalidArgumentError):       # label length beyond the payload
        c.call(lib.SHMKEY_OP_DECRYPT, (lib.SHMKEY_PAD_OAEP, lib.SHMKEY_HASH_SHA256,
                                       lib.SHMKEY_HASH_SHA256, 4000), bytes(256))
    blob = os.urandom(c.max_payload)
    assert c.echo(blob) == blob and c.echo(b"") == b""
    sign_and_verify(oracle.private_key(), pss(hashes.SHA256()), hashes.SHA256())


def test_encrypted_key_with_password(keydir: Path) -> None:
    from .conftest import make_key

    path = make_key(keydir, 2048, password="correct horse")
    with shmkey.KeyOracle(path, password=b"correct horse", workers=1) as o:
        sign_and_verify(o.private_key(), padding.PKCS1v15(), hashes.SHA256())
    with pytest.raises(shmkey.KeyLoadError, match="cannot load key"):
        shmkey.KeyOracle(path, password=b"wrong", workers=1).start()
    with pytest.raises(shmkey.KeyLoadError):
        shmkey.KeyOracle(path, workers=1).start()


def test_key_load_errors(tmp_path: Path) -> None:
    with pytest.raises(shmkey.KeyLoadError, match="cannot read key file"):
        shmkey.KeyOracle(tmp_path / "missing.pem").start()
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key\n")
    with pytest.raises(shmkey.KeyLoadError, match="cannot load key"):
        shmkey.KeyOracle(junk).start()
    small = tmp_path / "small.pem"
    import subprocess
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024",
                    "-out", str(small)], check=True, capture_output=True)
    with pytest.raises(shmkey.KeyLoadError, match="at least 2048"):
        shmkey.KeyOracle(small).start()
    p521 = tmp_path / "p521.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-521",
                    "-out", str(p521)], check=True, capture_output=True)
    with pytest.raises(shmkey.KeyLoadError, match="P-256 and P-384 are supported"):
        shmkey.KeyOracle(p521).start()
    ed448 = tmp_path / "ed448.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ED448", "-out", str(ed448)], check=True,
                   capture_output=True)
    with pytest.raises(shmkey.KeyLoadError, match="RSA, EC .* and Ed25519 keys are supported"):
        shmkey.KeyOracle(ed448).start()

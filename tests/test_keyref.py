"""Key reference files: the format (known answer, round trips, malformed input),
writing one for a running oracle, the certificate check, and the CLI."""
from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from hypothesis import given, settings
from hypothesis import strategies as st

from shmkey.openssl import keyref
from shmkey.errors import (ConfigError, KeyMismatchError, KeyReferenceError,
                           OracleUnavailableError)

from ._tls import Serve, write_key_and_cert

# A fixed public key, so that the encoding can be checked byte for byte.
N = (1 << 2047) + 0x1F3
PUBLIC = rsa.RSAPublicNumbers(65537, N).public_key()
SPKI = PUBLIC.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
# Fixed EC and Ed25519 public keys (from fixed scalars: nothing secret here).
P256 = ec.derive_private_key(7, ec.SECP256R1()).public_key()
P384 = ec.derive_private_key(7, ec.SECP384R1()).public_key()
ED25519 = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32))).public_key()


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    directory = tmp_path_factory.mktemp("keyref")
    key, cert = write_key_and_cert(directory, "server")
    _, other_cert = write_key_and_cert(directory, "other")
    serve = Serve(key).start()
    yield SimpleNamespace(dir=directory, key=key, cert=cert, other_cert=other_cert, serve=serve)
    serve.stop()


def test_known_answer():
    der = keyref.KeyReference(oracle="web", public_key=PUBLIC, transport="shm").to_der()
    body = (bytes.fromhex("020101" "0c03776562" "020101" "0420")
            + hashlib.sha256(SPKI).digest() + SPKI)
    assert der == bytes.fromhex("3082") + len(body).to_bytes(2, "big") + body
    pem = keyref.KeyReference(oracle="web", public_key=PUBLIC, transport="shm").to_pem()
    lines = pem.decode().splitlines()
    assert lines[0] == "-----BEGIN SHMKEY KEY REFERENCE-----"
    assert lines[-1] == "-----END SHMKEY KEY REFERENCE-----"
    assert all(len(line) <= 64 for line in lines[1:-1])
    assert base64.b64decode("".join(lines[1:-1])) == der


def test_known_answer_version_2():
    """Version 2 adds the oracle's uid after the public key; version 1 has none."""
    der = keyref.KeyReference(oracle="web", public_key=PUBLIC, transport="shm",
                              oracle_uid=998).to_der()
    body = (bytes.fromhex("020102" "0c03776562" "020101" "0420")
            + hashlib.sha256(SPKI).digest() + SPKI + bytes.fromhex("020203e6"))
    assert der == bytes.fromhex("3082") + len(body).to_bytes(2, "big") + body
    assert keyref.KeyReference.from_der(der).oracle_uid == 998


@settings(max_examples=60, deadline=None)
@given(name=st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}", fullmatch=True),
       transport=st.sampled_from([None, "shm", "socketpair"]),
       uid=st.one_of(st.none(), st.integers(0, 2**32 - 2)))
def test_round_trip(name, transport, uid):
    ref = keyref.KeyReference(oracle=name, public_key=PUBLIC, transport=transport, oracle_uid=uid)
    again = keyref.KeyReference.from_pem(b"junk before\n" + ref.to_pem() + b"junk after\n")
    assert (again.oracle, again.transport, again.oracle_uid) == (name, transport, uid)
    assert again.key_id == hashlib.sha256(SPKI).digest()
    assert again.public_key.public_numbers() == PUBLIC.public_numbers()
    assert again.to_der() == ref.to_der()


@pytest.mark.parametrize("mangle, message", [
    (lambda der: der[:-1], "truncated"),
    (lambda der: der + b"\x00", "trailing"),
    (lambda der: der[:4] + b"\x02\x01\x02" + der[7:], "version 2 key reference without an oracle uid"),
    (lambda der: der[:4] + b"\x02\x01\x03" + der[7:], "version 3; this shmkey reads versions 1 to 2"),
    (lambda der: der[:12] + b"\x02\x01\x07" + der[15:], "transport code 7"),
    (lambda der: b"\x31" + der[1:], "unexpected DER element"),
    (lambda der: der[:17] + bytes([der[17] ^ 1]) + der[18:], "key id is not the SHA-256"),
])
def test_malformed_der_is_refused(mangle, message):
    der = keyref.KeyReference(oracle="web", public_key=PUBLIC).to_der()
    with pytest.raises(KeyReferenceError, match=message):
        keyref.KeyReference.from_der(mangle(der))


def test_malformed_pem_is_refused():
    with pytest.raises(KeyReferenceError, match="no 'SHMKEY KEY REFERENCE' PEM block"):
        keyref.KeyReference.from_pem(b"-----BEGIN PRIVATE KEY-----\nAAAA\n"
                                     b"-----END PRIVATE KEY-----\n")
    with pytest.raises(KeyReferenceError, match="base64"):
        keyref.KeyReference.from_pem(b"-----BEGIN SHMKEY KEY REFERENCE-----\n!!!!\n"
                                     b"-----END SHMKEY KEY REFERENCE-----\n")


@pytest.mark.parametrize("public, described", [
    (P256, "EC P-256"), (P384, "EC P-384"), (ED25519, "Ed25519")], ids=["p256", "p384", "ed25519"])
def test_ec_and_ed25519_round_trip(public, described):
    spki = public.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)
    ref = keyref.KeyReference(oracle="web", public_key=public, transport="socketpair")
    der = ref.to_der()
    assert der.endswith(hashlib.sha256(spki).digest() + spki)
    again = keyref.KeyReference.from_pem(ref.to_pem())
    assert again.public_key == public and again.key_id == hashlib.sha256(spki).digest()
    assert again.transport == "socketpair" and again.to_der() == der
    assert keyref.describe(public) == f"{described} SHA256:{hashlib.sha256(spki).hexdigest()[:16]}"


@pytest.mark.parametrize("public, message", [
    (ec.derive_private_key(7, ec.SECP521R1()).public_key(), "P-256 and P-384"),
    (ec.derive_private_key(7, ec.SECP256K1()).public_key(), "P-256 and P-384"),
    (x25519.X25519PrivateKey.from_private_bytes(bytes(32)).public_key(),
     r"RSA, EC \(P-256, P-384\) and Ed25519"),
    (rsa.RSAPublicNumbers(65537, (1 << 511) + 1).public_key(), "RSA-512"),
], ids=["p521", "secp256k1", "x25519", "rsa512"])
def test_keys_the_provider_cannot_use_are_refused(public, message):
    with pytest.raises(KeyReferenceError, match=message):
        keyref.KeyReference(oracle="web", public_key=public)
    spki = public.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)
    # The same, as a reference made by another tool.
    der = keyref._tlv(0x30, bytes.fromhex("020101" "0c03776562" "020100")
                      + keyref._tlv(0x04, hashlib.sha256(spki).digest()) + spki)
    with pytest.raises(KeyReferenceError, match=message):
        keyref.KeyReference.from_der(der)


def test_bad_fields_are_refused():
    with pytest.raises(ConfigError):
        keyref.KeyReference(oracle="../etc", public_key=PUBLIC)
    with pytest.raises(KeyReferenceError, match="transport"):
        keyref.KeyReference(oracle="web", public_key=PUBLIC, transport="udp")


def test_write_for_running_oracle(material):
    out = material.dir / "key.ref.pem"
    ref = keyref.write(material.serve.name, out, cert=material.cert,
                       oracle_user=material.serve.user)
    assert out.stat().st_mode & 0o777 == 0o644
    loaded = keyref.load(out)
    assert loaded == ref or loaded.to_der() == ref.to_der()
    private = serialization.load_pem_private_key(material.key.read_bytes(), None)
    assert loaded.public_key.public_numbers() == private.public_key().public_numbers()
    assert loaded.oracle == material.serve.name and loaded.transport is None
    assert b"PRIVATE" not in out.read_bytes()


def test_certificate_for_another_key_is_refused(material):
    out = material.dir / "mismatch.ref.pem"
    with pytest.raises(KeyMismatchError, match=material.serve.name):
        keyref.write(material.serve.name, out, cert=material.other_cert,
                     oracle_user=material.serve.user)
    assert not out.exists()


def test_oracle_not_running():
    with pytest.raises(OracleUnavailableError):
        keyref.create("no-such-oracle-" + "7" * 20)


def test_cli(material):
    out = material.dir / "cli.ref.pem"
    run = subprocess.run([sys.executable, "-m", "shmkey", "keyref", "--oracle",
                          material.serve.name, *material.serve.trust_args(), "--cert",
                          str(material.cert), "-o", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert f"oracle '{material.serve.name}'" in run.stdout
    assert keyref.load(out).oracle == material.serve.name

    run = subprocess.run([sys.executable, "-m", "shmkey", "keyref", "--oracle",
                          material.serve.name, *material.serve.trust_args(),
                          "--cert", str(material.other_cert),
                          "-o", str(material.dir / "bad.ref.pem")], capture_output=True, text=True)
    assert run.returncode == 2
    assert "is not for any key that oracle" in run.stderr


def test_several_keys_the_certificate_picks(tmp_path):
    rsa_key, rsa_cert = write_key_and_cert(tmp_path, "rsa")
    ec_key, ec_cert = write_key_and_cert(tmp_path, "p256", "p256")
    ed_key, ed_cert = write_key_and_cert(tmp_path, "ed", "ed25519")
    serve = Serve([rsa_key, ec_key]).start()
    try:
        for cert, kind in ((ec_cert, ec.EllipticCurvePublicKey), (rsa_cert, rsa.RSAPublicKey)):
            ref = keyref.write(serve.name, tmp_path / "k.ref.pem", cert=cert, oracle_user=serve.user)
            assert isinstance(ref.public_key, kind)
            keyref.check_certificate(keyref.load(tmp_path / "k.ref.pem"), cert)
        with pytest.raises(KeyMismatchError, match=r"\(RSA-2048 SHA256:\w+, EC P-256 SHA256:\w+\)"):
            keyref.create(serve.name, cert=ed_cert, oracle_user=serve.user)
        with pytest.raises(KeyMismatchError, match="EC P-256"):
            keyref.check_certificate(keyref.create(serve.name, cert=ec_cert, oracle_user=serve.user),
                                     rsa_cert)
        run = subprocess.run([sys.executable, "-m", "shmkey", "keyref", "--oracle", serve.name, *serve.trust_args(),
                              "--cert", str(ec_cert), "-o", str(tmp_path / "cli.ref.pem")],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith(f"wrote {tmp_path / 'cli.ref.pem'}: EC P-256 SHA256:")
    finally:
        serve.stop()


def test_cli_openssl_conf():
    run = subprocess.run([sys.executable, "-m", "shmkey", "openssl-conf", "--timeout-ms", "900"],
                         capture_output=True, text=True, check=True)
    module = [line.split("=", 1)[1].strip() for line in run.stdout.splitlines()
              if line.startswith("module")]
    assert len(module) == 1 and module[0].endswith("ossl-modules/shmkey.so")
    from pathlib import Path
    assert Path(module[0]).is_file()
    assert "timeout_ms = 900" in run.stdout and "activate = 1" in run.stdout

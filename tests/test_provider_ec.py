"""The OpenSSL provider with ECDSA (P-256, P-384) and Ed25519 keys: TLS 1.3 and
TLS 1.2 ECDHE-ECDSA handshakes whose signatures are made in a ``shmkey serve``
oracle over the ring and the socket, from Python's ssl and openssl s_client;
a dual-certificate server whose RSA and ECDSA keys share one oracle; the
loadable module in openssl s_server and the openssl commands; and the key
management's refusals, checked through OpenSSL's API by a small C program.
"""
from __future__ import annotations

import base64
import os
import ssl
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

import shmkey.openssl
from shmkey.openssl import keyref

from ._tls import (RUN_AS_ROOT, Serve, TLSServer, client_context, free_port, handshake,
                   run_openssl, running, s_client, server_context, wait_for_errors,
                   write_key_and_cert)
from .conftest import TRANSPORTS

TLS12, TLS13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
ROOT = Path(__file__).resolve().parents[1]
# Which oracle holds which key: ECDSA beside RSA (thread workers), Ed25519 in
# an oracle of its own (its signing holds the GIL, so that one runs processes).
ORACLE_OF = {"rsa": "ecdsa", "p256": "ecdsa", "p384": "ecdsa", "ed25519": "ed25519"}


@pytest.fixture(scope="module", autouse=True)
def enabled() -> None:
    shmkey.openssl.enable()


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    directory = tmp_path_factory.mktemp("provider-ec")
    keys, certs = {}, {}
    for kind in ("rsa", "p256", "p384", "ed25519", "other-p256"):
        keys[kind], certs[kind] = write_key_and_cert(directory, kind, kind.replace("other-", ""))
    return SimpleNamespace(dir=directory, keys=keys, certs=certs)


@pytest.fixture(scope="module")
def oracles(material: SimpleNamespace):
    """Per transport: two oracles and a key reference for each key they hold."""
    started: list[Serve] = []
    out: dict[str, SimpleNamespace] = {}
    try:
        for transport in TRANSPORTS:
            serves = {"ecdsa": Serve([material.keys[k] for k in ("rsa", "p256", "p384")],
                                     transport),
                      "ed25519": Serve(material.keys["ed25519"], transport)}
            refs = {}
            for serve in serves.values():
                started.append(serve.start())
            for kind, which in ORACLE_OF.items():
                refs[kind] = material.dir / f"{transport}-{kind}.ref.pem"
                keyref.write(serves[which].name, refs[kind], cert=material.certs[kind],
                             transport=transport, oracle_user=serves[which].user)
            out[transport] = SimpleNamespace(transport=transport, refs=refs,
                                             names={w: s.name for w, s in serves.items()})
        yield out
    finally:
        for serve in started:
            serve.stop()


@pytest.fixture(params=TRANSPORTS)
def oracle(request: pytest.FixtureRequest, oracles: dict) -> SimpleNamespace:
    return oracles[request.param]


@pytest.fixture(scope="module")
def openssl_cnf(material: SimpleNamespace) -> Path:
    path = material.dir / "shmkey.cnf"
    path.write_text(shmkey.openssl.openssl_conf())
    return path


def _serve_kind(material: SimpleNamespace, oracle: SimpleNamespace, kind: str) -> TLSServer:
    return TLSServer(server_context(material.certs[kind], oracle.refs[kind]))


def _peer(out: str) -> tuple[str, str]:
    """(signature type, signing digest) from s_client's report."""
    lines = dict(line.split(": ", 1) for line in out.splitlines()
                 if line.startswith(("Peer signature type", "Peer signing digest")))
    return lines.get("Peer signature type", ""), lines.get("Peer signing digest", "")


# ---- Python's ssl and openssl s_client against Python's ssl ----

@pytest.mark.parametrize("kind", ["p256", "p384", "ed25519"])
@pytest.mark.parametrize("version", [TLS13, TLS12], ids=["tls1.3", "tls1.2"])
def test_python_handshake(oracle, material, kind, version):
    with _serve_kind(material, oracle, kind) as server:
        greeting, cipher = handshake(server.port, client_context(material.certs[kind], version))
    assert greeting == f"hello {'TLSv1.3' if version is TLS13 else 'TLSv1.2'}"
    if version is TLS12:
        assert cipher.startswith("ECDHE-ECDSA-"), cipher
    assert server.errors == [] and server.served == 1


@pytest.mark.parametrize("kind, args, signature, digest", [
    # Ephemeral P-256/P-384 keys too: our keymgmt answers to "EC", libssl's
    # key generation must still get OpenSSL's own.
    ("p256", ["-tls1_3", "-sigalgs", "ecdsa_secp256r1_sha256", "-groups", "P-256"], "ECDSA",
     "SHA256"),
    ("p384", ["-tls1_3", "-sigalgs", "ecdsa_secp384r1_sha384", "-groups", "P-384"], "ECDSA",
     "SHA384"),
    ("p256", ["-tls1_2", "-sigalgs", "ECDSA+SHA256", "-groups", "P-256"], "ECDSA", "SHA256"),
    ("p256", ["-tls1_2", "-sigalgs", "ECDSA+SHA512"], "ECDSA", "SHA512"),
    ("p384", ["-tls1_2", "-sigalgs", "ECDSA+SHA384"], "ECDSA", "SHA384"),
    ("ed25519", ["-tls1_3", "-sigalgs", "ed25519"], "ed25519", ""),
], ids=["1.3-p256", "1.3-p384", "1.2-p256-sha256", "1.2-p256-sha512", "1.2-p384-sha384",
        "1.3-ed25519"])
def test_s_client_sigalgs(oracle, material, kind, args, signature, digest):
    with _serve_kind(material, oracle, kind) as server:
        out = s_client(server.port, material.certs[kind], *args)
    assert "Verify return code: 0 (ok)" in out, out
    assert _peer(out) == (signature, digest), out
    if "-tls1_2" in args:
        assert "Cipher is ECDHE-ECDSA-" in out, out
    assert server.errors == []


def test_digest_the_oracle_lacks_is_never_chosen(oracles, material):
    # The trial init libssl makes per signature algorithm refuses SHA-224 for
    # ECDSA as for RSA: a clean handshake failure, no oracle call. (A client
    # offering only SHA-1 gives up by itself at its default security level;
    # test_openssl_commands_... shows the provider refusing SHA-1.)
    with _serve_kind(material, oracles["shm"], "p256") as server:
        out = s_client(server.port, material.certs["p256"], "-tls1_2", "-sigalgs", "ECDSA+SHA224")
        wait_for_errors(server, 1)
    assert "handshake failure" in out, out
    exc, reason = server.errors[0]
    assert "NO_SUITABLE_SIGNATURE_ALGORITHM" in str(exc)
    assert reason is None


# ---- one server, an RSA and an ECDSA certificate, both keys in one oracle ----

def test_dual_certificate_server_picks_the_key_per_client(oracle, material):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for kind in ("rsa", "p256"):
        ctx.load_cert_chain(str(material.certs[kind]), str(oracle.refs[kind]))
    assert keyref.load(oracle.refs["rsa"]).oracle == keyref.load(oracle.refs["p256"]).oracle
    with TLSServer(ctx) as server:
        # Each client trusts only the certificate it should get.
        out = s_client(server.port, material.certs["p256"], "-tls1_3",
                       "-sigalgs", "ecdsa_secp256r1_sha256")
        assert "Verify return code: 0 (ok)" in out and _peer(out) == ("ECDSA", "SHA256"), out
        out = s_client(server.port, material.certs["rsa"], "-tls1_3",
                       "-sigalgs", "rsa_pss_rsae_sha256")
        assert "Verify return code: 0 (ok)" in out and _peer(out) == ("RSA-PSS", "SHA256"), out
        for kind, cipher in (("p256", "ECDHE-ECDSA-AES128-GCM-SHA256"),
                             ("rsa", "ECDHE-RSA-AES128-GCM-SHA256")):
            ctx12 = client_context(material.certs[kind], TLS12, cipher)
            assert handshake(server.port, ctx12) == ("hello TLSv1.2", cipher)
    assert server.errors == [] and server.served == 4


def test_nginx_dual_certificate(oracles, material, openssl_cnf, tmp_path):
    # nginx with an RSA and an ECDSA certificate, both keys in one oracle,
    # reached over the ring by workers that run as another user.
    from .test_provider import NGINX_CONF

    refs = oracles["shm"].refs
    port = free_port()
    conf = NGINX_CONF.format(user="user nobody nogroup;" if RUN_AS_ROOT else "", dir=tmp_path,
                             port=port, cert=material.certs["rsa"], keyref=refs["rsa"])
    rsa_key_line = f"ssl_certificate_key {refs['rsa']};"
    conf = conf.replace(rsa_key_line, f"{rsa_key_line}\n        ssl_certificate "
                        f"{material.certs['p256']};\n        ssl_certificate_key {refs['p256']};")
    (tmp_path / "nginx.conf").write_text(conf)
    with running(["nginx", "-c", str(tmp_path / "nginx.conf"), "-e", str(tmp_path / "error.log")],
                 openssl_cnf, port):
        for kind, args, peer in (
                ("p256", ["-tls1_3", "-sigalgs", "ecdsa_secp256r1_sha256"], ("ECDSA", "SHA256")),
                ("p256", ["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"],
                 ("ECDSA", "SHA256")),
                ("rsa", ["-tls1_3", "-sigalgs", "rsa_pss_rsae_sha384"], ("RSA-PSS", "SHA384"))):
            out = s_client(port, material.certs[kind], *args)
            assert "Verify return code: 0 (ok)" in out and _peer(out) == peer, out
    log = (tmp_path / "error.log").read_text()
    assert "[emerg]" not in log and "[crit]" not in log, log


# ---- errors ----

def test_certificate_for_another_ec_key_is_openssls_key_mismatch(oracles, material):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(ssl.SSLError, match="KEY_VALUES_MISMATCH"):
        ctx.load_cert_chain(str(material.certs["other-p256"]), str(oracles["shm"].refs["p256"]))


def test_reference_to_a_curve_the_provider_lacks_is_named(material):
    # keyref refuses to write one; the C decoder must refuse one made by hand.
    p521 = ec.generate_private_key(ec.SECP521R1()).public_key()
    spki = p521.public_bytes(serialization.Encoding.DER,
                             serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(shmkey.errors.KeyReferenceError, match="P-256 and P-384"):
        keyref.KeyReference(oracle="web", public_key=p521)
    der = keyref._tlv(0x30, keyref._der_int(1) + keyref._tlv(0x0C, b"web") + keyref._der_int(0)
                      + keyref._tlv(0x04, bytes(32)) + spki)
    bad = material.dir / "p521.ref.pem"
    bad.write_bytes(b"-----BEGIN SHMKEY KEY REFERENCE-----\n" + base64.encodebytes(der) +
                    b"-----END SHMKEY KEY REFERENCE-----\n")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(ssl.SSLError):
        ctx.load_cert_chain(str(material.certs["p256"]), str(bad))
    assert shmkey.openssl.last_error() == (
        "malformed shmkey key reference: the public key is not an RSA key of 1024 to 16384 "
        "bits, an EC key on P-256 or P-384, or an Ed25519 key")


def test_oracle_without_the_key_is_named(oracles, material):
    # A reference naming the Ed25519 oracle for the P-256 key: the oracle
    # has no key with that id, and the handshake fails saying so.
    p256 = keyref.load(oracles["shm"].refs["p256"]).public_key
    ref = material.dir / "elsewhere.ref.pem"
    ref.write_bytes(keyref.KeyReference(oracle=oracles["shm"].names["ed25519"],
                                        public_key=p256).to_pem())
    with TLSServer(server_context(material.certs["p256"], ref)) as server:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            handshake(server.port, client_context(material.certs["p256"]))
        wait_for_errors(server, 1)
    assert "does not hold this key" in server.errors[0][1]


def test_keymgmt_refuses_private_parts_and_matches_public_keys(material, openssl_cnf, tmp_path):
    binary = tmp_path / "provider_keymgmt"
    subprocess.run(["gcc", "-O1", "-g", "-Wall", "-o", str(binary),
                    str(ROOT / "tests" / "c" / "provider_keymgmt.c"), "-lcrypto"],
                   check=True, capture_output=True)
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=30,
                         env=dict(os.environ, OPENSSL_CONF=str(openssl_cnf)))
    assert run.returncode == 0 and run.stdout.endswith("done\n"), run.stdout + run.stderr
    assert "refused" in run.stdout and "FAIL" not in run.stdout


# ---- the loadable module: openssl s_server and the openssl commands ----

@pytest.mark.parametrize("kind, runs", [
    ("p256", [(["-tls1_3"], ("ECDSA", "SHA256")),
              (["-tls1_2", "-sigalgs", "ECDSA+SHA384"], ("ECDSA", "SHA384"))]),
    ("ed25519", [(["-tls1_3", "-sigalgs", "ed25519"], ("ed25519", ""))]),
])
def test_openssl_s_server(oracle, material, openssl_cnf, kind, runs):
    port = free_port()
    with running(["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert",
                  str(material.certs[kind]), "-key", str(oracle.refs[kind]), "-www"],
                 openssl_cnf, port):
        for args, peer in runs:
            out = s_client(port, material.certs[kind], *args)
            assert "Verify return code: 0 (ok)" in out and _peer(out) == peer, out


def test_openssl_commands_use_ec_and_ed25519_references(oracles, material, openssl_cnf):
    refs = oracles["shm"].refs
    message = material.dir / "message"
    message.write_bytes(b"signed through the oracle")
    for kind in ("p256", "ed25519"):
        pem = run_openssl(openssl_cnf, "pkey", "-in", str(refs[kind]), "-pubout")
        cert_key = x509.load_pem_x509_certificate(material.certs[kind].read_bytes()).public_key()
        assert serialization.load_pem_public_key(pem) == cert_key

    p256 = keyref.load(refs["p256"]).public_key
    sig = run_openssl(openssl_cnf, "dgst", "-sha384", "-sign", str(refs["p256"]), str(message))
    p256.verify(sig, message.read_bytes(), ec.ECDSA(hashes.SHA384()))
    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"a digest")
    digest_bytes = digest.finalize()
    sig = run_openssl(openssl_cnf, "pkeyutl", "-sign", "-inkey", str(refs["p256"]),
                   data=digest_bytes)         # EVP_PKEY_sign: SHA-256 by its length
    p256.verify(sig, digest_bytes, ec.ECDSA(Prehashed(hashes.SHA256())))

    ed = keyref.load(refs["ed25519"]).public_key
    sig = run_openssl(openssl_cnf, "pkeyutl", "-sign", "-rawin", "-inkey", str(refs["ed25519"]),
                   "-in", str(message))
    ed.verify(sig, message.read_bytes())

    with pytest.raises(subprocess.CalledProcessError) as err:
        run_openssl(openssl_cnf, "dgst", "-sha1", "-sign", str(refs["p256"]), str(message))
    assert b"the oracle signs with SHA-256, SHA-384 or SHA-512" in err.value.stderr
    # Ed25519 sends the message itself: it must fit in a slot (2048 bytes here).
    big = material.dir / "big"
    big.write_bytes(b"m" * 5000)
    with pytest.raises(subprocess.CalledProcessError) as err:
        run_openssl(openssl_cnf, "pkeyutl", "-sign", "-rawin", "-inkey", str(refs["ed25519"]),
                    "-in", str(big))
    assert b"input too large for a ring slot or message" in err.value.stderr

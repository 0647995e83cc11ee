"""The OpenSSL 3 provider: real TLS handshakes whose RSA private-key operations
run in a ``shmkey serve`` oracle, over the ring and the socket, from Python's
ssl (builtin provider) and from openssl s_server, nginx and haproxy (loadable
module).
"""
from __future__ import annotations

import asyncio
import base64
import math
import os
import ssl
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

import shmkey.openssl
from shmkey import names
from shmkey.openssl import keyref
from shmkey.errors import LibcryptoMismatchError

from ._tls import (HOST, RUN_AS_ROOT, Serve, TLSServer, client_context, curl, free_port,
                   handshake, key_material, run_openssl, running, s_client, server_context,
                   wait_for_errors)
from .conftest import TRANSPORTS
TLS12, TLS13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return key_material(tmp_path_factory.mktemp("provider"))


@pytest.fixture(scope="module", autouse=True)
def enabled() -> None:
    shmkey.openssl.enable()


def _start(material: SimpleNamespace, transport: str, *extra: str) -> SimpleNamespace:
    serve = Serve(material.key, transport, extra=extra).start()
    ref = material.dir / f"{serve.name}.ref.pem"
    keyref.write(serve.name, ref, cert=material.cert, transport=transport,
                 oracle_user=serve.user)
    return SimpleNamespace(serve=serve, keyref=ref, transport=transport, name=serve.name)


@pytest.fixture(scope="module")
def oracles(material: SimpleNamespace):
    started: dict[str, SimpleNamespace] = {}
    try:
        for transport in TRANSPORTS:
            started[transport] = _start(material, transport)
        yield started
    finally:
        for o in started.values():
            o.serve.stop()


@pytest.fixture(params=TRANSPORTS)
def oracle(request: pytest.FixtureRequest, oracles: dict) -> SimpleNamespace:
    return oracles[request.param]


@pytest.fixture(scope="module")
def openssl_cnf(material: SimpleNamespace) -> Path:
    """What `shmkey openssl-conf` prints, as a file."""
    out = subprocess.run([sys.executable, "-m", "shmkey", "openssl-conf"], check=True,
                         capture_output=True)
    path = material.dir / "shmkey.cnf"
    path.write_bytes(out.stdout)
    return path


# ---- Python's ssl, with the provider registered by shmkey.openssl.enable() ----

@pytest.mark.parametrize("version", [TLS13, TLS12], ids=["tls1.3", "tls1.2"])
def test_python_handshake(oracle, material, version):
    with TLSServer(server_context(material.cert, oracle.keyref)) as server:
        greeting, cipher = handshake(server.port, client_context(material.cert, version))
    assert greeting == f"hello {'TLSv1.3' if version is TLS13 else 'TLSv1.2'}"
    if version is TLS12:
        assert "ECDHE-RSA" in cipher
    assert server.errors == []


@pytest.mark.parametrize("args, signature, digest", [
    (["-tls1_3", "-sigalgs", "rsa_pss_rsae_sha256"], "RSA-PSS", "SHA256"),
    (["-tls1_3", "-sigalgs", "rsa_pss_rsae_sha512"], "RSA-PSS", "SHA512"),
    (["-tls1_2", "-sigalgs", "RSA+SHA256"], "RSA", "SHA256"),
    (["-tls1_2", "-sigalgs", "RSA+SHA384"], "RSA", "SHA384"),
    (["-tls1_2", "-sigalgs", "rsa_pss_rsae_sha384"], "RSA-PSS", "SHA384"),
], ids=["1.3-pss-sha256", "1.3-pss-sha512", "1.2-pkcs1-sha256", "1.2-pkcs1-sha384",
        "1.2-pss-sha384"])
def test_s_client_sigalgs(oracle, material, args, signature, digest):
    with TLSServer(server_context(material.cert, oracle.keyref)) as server:
        out = s_client(server.port, material.cert, *args)
    assert "Verify return code: 0 (ok)" in out, out
    assert f"Peer signature type: {signature}\n" in out, out
    assert f"Peer signing digest: {digest}\n" in out, out
    assert server.errors == []


def test_digest_the_oracle_lacks_is_never_chosen(oracles, material):
    # The trial init libssl makes per signature algorithm refuses SHA-224, so
    # the handshake fails cleanly before any signature is attempted.
    with TLSServer(server_context(material.cert, oracles["shm"].keyref)) as server:
        out = s_client(server.port, material.cert, "-tls1_2", "-sigalgs", "RSA+SHA224")
        wait_for_errors(server, 1)
    assert "handshake failure" in out, out
    exc, reason = server.errors[0]
    assert "NO_SUITABLE_SIGNATURE_ALGORITHM" in str(exc) or "no suitable" in str(exc).lower()
    assert reason is None


def test_concurrent_handshakes_from_threads(oracle, material):
    clients = [client_context(material.cert, v) for v in (TLS13, TLS12)]
    with TLSServer(server_context(material.cert, oracle.keyref)) as server:
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda i: handshake(server.port, clients[i % 2])[0],
                                    range(48)))
    assert results.count("hello TLSv1.3") == 24 and results.count("hello TLSv1.2") == 24
    assert server.errors == [] and server.served == 48


def test_asyncio_server(oracle, material):
    async def main() -> list[bytes]:
        async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"hello asyncio\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(greet, "127.0.0.1", 0,
                                            ssl=server_context(material.cert, oracle.keyref))
        port = server.sockets[0].getsockname()[1]
        ctx = client_context(material.cert)

        async def one() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                           server_hostname=HOST)
            line = await reader.readline()
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, ssl.SSLError):
                pass
            return line

        try:
            return await asyncio.gather(*(one() for _ in range(16)))
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(main()) == [b"hello asyncio\n"] * 16


def test_certificate_and_reference_in_one_file(oracles, material):
    combined = material.dir / "combined.pem"
    combined.write_bytes(material.cert.read_bytes() + oracles["shm"].keyref.read_bytes())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(combined))
    with TLSServer(ctx) as server:
        assert handshake(server.port, client_context(material.cert))[0] == "hello TLSv1.3"


def test_mismatched_certificate_is_openssls_key_mismatch(oracles, material):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(ssl.SSLError, match="KEY_VALUES_MISMATCH"):
        ctx.load_cert_chain(str(material.other_cert), str(oracles["shm"].keyref))


def test_malformed_reference_is_named(oracles, material):
    der = keyref.load(oracles["shm"].keyref).to_der()
    future = der[:4] + b"\x02\x01\x03" + der[7:]          # version 3
    bad = material.dir / "future.ref.pem"
    bad.write_bytes(b"-----BEGIN SHMKEY KEY REFERENCE-----\n" + base64.encodebytes(future) +
                    b"-----END SHMKEY KEY REFERENCE-----\n")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(ssl.SSLError):
        ctx.load_cert_chain(str(material.cert), str(bad))
    assert shmkey.openssl.last_error() == \
        "malformed shmkey key reference: version 3; this shmkey reads versions 1 to 2"


def test_oracle_holding_another_key_is_named(oracles, material):
    # A reference that matches its certificate but not what the oracle holds
    # (the oracle's key was replaced): refused when connecting, with the reason.
    other_public = serialization.load_pem_private_key(material.other_key.read_bytes(),
                                                      None).public_key()
    stale = keyref.KeyReference(oracle=oracles["shm"].name, public_key=other_public)
    ref = material.dir / "stale.ref.pem"
    ref.write_bytes(stale.to_pem())
    with TLSServer(server_context(material.other_cert, ref)) as server:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            handshake(server.port, client_context(material.other_cert))
        wait_for_errors(server, 1)
    assert "holds a different key" in server.errors[0][1]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_oracle_down_then_back(material, transport):
    oracle = _start(material, transport)
    try:
        with TLSServer(server_context(material.cert, oracle.keyref)) as server:
            ctx = client_context(material.cert)
            assert handshake(server.port, ctx)[0] == "hello TLSv1.3"

            oracle.serve.stop()
            with pytest.raises((ssl.SSLError, ConnectionError)):
                handshake(server.port, ctx)
            wait_for_errors(server, 1)
            exc, reason = server.errors[0]
            assert isinstance(exc, ssl.SSLError)
            assert reason == f"the key oracle is not running: oracle '{oracle.name}': no oracle " \
                f"named '{oracle.name}' is running (no socket {names.socket_path(oracle.name)})"

            oracle.serve.start()        # same name, new process, same SSLContext
            assert handshake(server.port, ctx)[0] == "hello TLSv1.3"
            assert handshake(server.port, client_context(material.cert, TLS12))[0] == \
                "hello TLSv1.2"
            assert len(server.errors) == 1
    finally:
        oracle.serve.stop()


def test_tls12_rsa_key_exchange_decrypts_in_oracle(material):
    rsa_kx = "AES128-GCM-SHA256"        # TLS 1.2, RSA key transport, no ECDHE
    oracle = _start(material, "shm", "--allow-pkcs1v15-decrypt")
    try:
        with TLSServer(server_context(material.cert, oracle.keyref, rsa_kx)) as server:
            greeting, cipher = handshake(server.port,
                                         client_context(material.cert, TLS12, rsa_kx))
        assert (greeting, cipher) == ("hello TLSv1.2", rsa_kx)
        assert server.errors == []
    finally:
        oracle.serve.stop()


def test_tls12_rsa_key_exchange_refused_by_default_policy(oracles, material):
    rsa_kx = "AES128-GCM-SHA256"
    with TLSServer(server_context(material.cert, oracles["shm"].keyref, rsa_kx)) as server:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            handshake(server.port, client_context(material.cert, TLS12, rsa_kx))
        wait_for_errors(server, 1)
    assert server.errors[0][1].startswith("refused by the key oracle's policy: oracle ")


def test_enable_is_idempotent_and_checks_libcrypto():
    shmkey.openssl.enable()
    shmkey.openssl.check_libcrypto()
    with pytest.raises(LibcryptoMismatchError, match="does not use a shared OpenSSL 3 libcrypto"):
        shmkey.openssl.check_libcrypto(math.__file__)


# ---- the loadable module, for programs that are not Python ----

def test_openssl_commands_use_the_reference(oracles, material, openssl_cnf):
    ref = str(oracles["shm"].keyref)
    private = serialization.load_pem_private_key(material.key.read_bytes(), None)
    public = private.public_key()
    pem = run_openssl(openssl_cnf, "pkey", "-in", ref, "-pubout")
    assert serialization.load_pem_public_key(pem).public_numbers() == public.public_numbers()

    message = material.dir / "message"
    message.write_bytes(b"signed through the oracle")
    sig = run_openssl(openssl_cnf, "dgst", "-sha384", "-sigopt", "rsa_padding_mode:pss",
                   "-sigopt", "rsa_pss_saltlen:digest", "-sign", ref, str(message))
    public.verify(sig, message.read_bytes(),
                  padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48),
                  hashes.SHA384())

    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(),
                        label=None)
    secret = run_openssl(openssl_cnf, "pkeyutl", "-decrypt", "-inkey", ref,
                      "-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256",
                      "-pkeyopt", "rsa_mgf1_md:sha256",
                      data=public.encrypt(b"a session key", oaep))
    assert secret == b"a session key"


def _curl_tls13_and_tls12(port: int, cafile: Path, expected: bytes) -> None:
    for args in ((), ("--tlsv1.2", "--tls-max", "1.2")):
        result = curl(port, cafile, *args)
        assert result.returncode == 0, result.stderr
        assert expected in result.stdout


def test_openssl_s_server(oracle, material, openssl_cnf):
    port = free_port()
    with running(["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert",
                   str(material.cert), "-key", str(oracle.keyref), "-www"], openssl_cnf, port):
        out = s_client(port, material.cert, "-tls1_3")
        assert "Verify return code: 0 (ok)" in out and "Peer signature type: RSA-PSS" in out
        out = s_client(port, material.cert, "-tls1_2", "-sigalgs", "RSA+SHA256")
        assert "Verify return code: 0 (ok)" in out and "Peer signature type: RSA\n" in out
        _curl_tls13_and_tls12(port, material.cert, b"s_server")


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 2;
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {cert};
        ssl_certificate_key {keyref};
        location / {{ return 200 "hello from nginx\\n"; }}
    }}
}}
"""


def test_nginx(oracles, material, openssl_cnf, tmp_path):
    # The ring, not the socket: nginx's workers run as another user, and a
    # socket oracle is reachable by its own user only.
    ref = tmp_path / "nginx.ref.pem"
    keyref.write(oracles["shm"].name, ref, cert=material.cert,     # transport: any
                 oracle_user=oracles["shm"].serve.user)
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONF.format(
        user="user nobody nogroup;" if RUN_AS_ROOT else "", dir=tmp_path, port=port,
        cert=material.cert, keyref=ref))
    with running(["nginx", "-c", str(conf), "-e", str(tmp_path / "error.log")], openssl_cnf,
                  port):
        _curl_tls13_and_tls12(port, material.cert, b"hello from nginx\n")
        out = s_client(port, material.cert, "-tls1_3")
        assert "Verify return code: 0 (ok)" in out and "Peer signature type: RSA-PSS" in out
    log = (tmp_path / "error.log").read_text()
    assert "[emerg]" not in log and "[crit]" not in log, log


def test_nginx_logs_an_oracle_holding_another_key_at_its_default_level(oracles, material,
                                                                      openssl_cnf, tmp_path):
    """A reference (and certificate) for another key than the oracle holds:
    nginx's error log at its default level, ``error``, says why handshakes fail.
    nginx reads a bare reason number and logs libssl's client-caused ones at
    ``info``; the provider's reasons must not look like them."""
    serve = oracles["shm"].serve
    other_public = serialization.load_pem_private_key(material.other_key.read_bytes(),
                                                      None).public_key()
    ref = tmp_path / "stale.ref.pem"
    ref.write_bytes(keyref.KeyReference(
        oracle=serve.name, public_key=other_public,
        oracle_uid=names.user_id(serve.user) if serve.user else os.geteuid()).to_pem())
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONF.replace("error.log info;", "error.log;").format(
        user="user nobody nogroup;" if RUN_AS_ROOT else "", dir=tmp_path, port=port,
        cert=material.other_cert, keyref=ref))
    with running(["nginx", "-c", str(conf), "-e", str(tmp_path / "error.log")], openssl_cnf,
                  port):
        assert curl(port, material.other_cert).returncode != 0
    said = [line for line in (tmp_path / "error.log").read_text().splitlines()
            if "holds a different key" in line]
    assert said, (tmp_path / "error.log").read_text()
    assert "[crit]" in said[0]
    assert ("SSL_do_handshake() failed (SSL: error:408007D1:shmkey::the key oracle holds a "
            f"different key than the key reference:oracle '{serve.name}': it does not hold "
            "this key; run 'shmkey keyref' again") in said[0], said[0]


HAPROXY_CFG = """\
global
    log stderr format raw local0 info
defaults
    mode http
    timeout connect 2s
    timeout client 5s
    timeout server 5s
frontend tls
    bind 127.0.0.1:{port} ssl crt {combined}
    http-request return status 200 content-type text/plain string "hello from haproxy"
"""


def test_haproxy(oracles, material, openssl_cnf, tmp_path):
    # haproxy wants certificate and key in one file: the reference goes after the cert.
    combined = tmp_path / "combined.pem"
    combined.write_bytes(material.cert.read_bytes() + oracles["shm"].keyref.read_bytes())
    port = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(port=port, combined=combined))
    with running(["haproxy", "-db", "-f", str(cfg)], openssl_cnf, port):
        _curl_tls13_and_tls12(port, material.cert, b"hello from haproxy")

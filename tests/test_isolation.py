"""The design's first rule: after real work, the network side's memory holds
no part of the key, while the oracle's does (so the scanner is shown to work)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from shmkey import _process
from shmkey.tools.memscan import key_secrets, scan_process

from .conftest import TRANSPORTS

NETWORK_SIDE = r'''
import os, sys
import shmkey
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
with shmkey.KeyOracle(sys.argv[1], transport=sys.argv[2], workers=2) as oracle:
    key = oracle.private_key()
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    for i in range(300):
        key.sign(os.urandom(32), padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                 salt_length=32), hashes.SHA256())
        key.decrypt(key.public_key().encrypt(b"s" * 16, oaep), oaep)
    print(oracle.pid, flush=True)
    sys.stdin.readline()       # hold still while the test scans us
'''


def test_network_side_memory_holds_no_key(rsa2048: Path) -> None:
    key = serialization.load_pem_private_key(rsa2048.read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    secrets = key_secrets(key)
    for transport in TRANSPORTS:
        proc = subprocess.Popen([sys.executable, "-c", NETWORK_SIDE, str(rsa2048), transport],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            oracle_pid = int(proc.stdout.readline())
            network = scan_process(proc.pid, secrets)
            oracle = scan_process(oracle_pid, secrets)
        finally:
            if proc.stdin:
                proc.stdin.write("\n")
                proc.stdin.close()
            _process.stop(proc, 30, sig=None)
        assert network.bytes_scanned > 10_000_000
        assert network.found == 0, {k: v for k, v in network.hits.items() if v}
        # The oracle holds the primes where OpenSSL keeps them (little-endian limbs).
        assert oracle.hits["p (little-endian)"] >= 1 and oracle.hits["q (little-endian)"] >= 1
        assert oracle.hits["d (little-endian)"] >= 1


TLS_SERVER = r'''
import socket, ssl, sys
import shmkey.openssl
shmkey.openssl.enable()
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
sock = socket.create_server(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
for _ in range(int(sys.argv[3])):
    conn, _ = sock.accept()
    with ctx.wrap_socket(conn, server_side=True) as tls:
        tls.sendall(b"ok")
print("done", flush=True)
sys.stdin.readline()
'''


def test_tls_server_memory_holds_no_key_after_handshakes(tmp_path: Path) -> None:
    """A real TLS server with its key in the oracle: after 200 full handshakes
    (TLS 1.3 and 1.2), its memory holds no part of the key."""
    import socket
    import ssl

    from shmkey.openssl import keyref

    from ._tls import Serve, client_context, write_key_and_cert

    key_path, cert = write_key_and_cert(tmp_path, "server")
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    oracle = Serve(key_path).start()
    try:
        ref = tmp_path / "server.ref.pem"
        keyref.write(oracle.name, ref, cert=cert, oracle_user=oracle.user)
        n = 200
        server = subprocess.Popen([sys.executable, "-c", TLS_SERVER, str(cert), str(ref), str(n)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None and server.stdin is not None
        port = int(server.stdout.readline())
        for i in range(n):
            version = ssl.TLSVersion.TLSv1_3 if i % 2 else ssl.TLSVersion.TLSv1_2
            ctx = client_context(cert, version)
            with socket.create_connection(("127.0.0.1", port)) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                    assert tls.version() == ("TLSv1.3" if i % 2 else "TLSv1.2")
                    assert tls.recv(2) == b"ok"
        assert server.stdout.readline().strip() == "done"
        secrets = key_secrets(key)
        network = scan_process(server.pid, secrets)
        assert oracle.proc is not None
        held = scan_process(oracle.proc.pid, secrets)
        server.stdin.write("\n")
        server.stdin.close()
        _process.stop(server, 30, sig=None)
    finally:
        oracle.stop()
    assert network.found == 0, {k: v for k, v in network.hits.items() if v}
    assert held.hits["p (little-endian)"] >= 1 and held.hits["d (little-endian)"] >= 1

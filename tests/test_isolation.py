"""The design's first rule: after real work, the network side's memory holds
no part of the key, while the oracle's does (so the scanner is shown to work)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from shmkey.memscan import key_secrets, scan_process

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
            proc.wait(timeout=30)
        assert network.bytes_scanned > 10_000_000
        assert network.found == 0, {k: v for k, v in network.hits.items() if v}
        # The oracle holds the primes where OpenSSL keeps them (little-endian limbs).
        assert oracle.hits["p (little-endian)"] >= 1 and oracle.hits["q (little-endian)"] >= 1
        assert oracle.hits["d (little-endian)"] >= 1

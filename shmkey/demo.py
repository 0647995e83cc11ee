"""``shmkey demo``: the oracle at work on a throwaway key.

A child process plays the network side: it starts an oracle per transport,
signs and decrypts through it, and reports latencies. The parent then scans
the child's memory and the oracle's for the key's secrets. The parent loads
the key only to know what to search for, which is why the network side is a
separate process.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .memscan import key_secrets, scan_process

_NETWORK_SIDE = r'''
import json, os, sys, time
import shmkey
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

key_path, n = sys.argv[1], int(sys.argv[2])
pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
oracles = []
for transport in ("socketpair", "shm"):
    o = shmkey.KeyOracle(key_path, transport=transport).start()
    oracles.append(o)
    key = o.private_key()
    pub = key.public_key()
    sign_us, step = [], max(1, n // 10)
    for i in range(n):
        msg = os.urandom(32)
        t0 = time.perf_counter()
        sig = key.sign(msg, pss, hashes.SHA256())
        sign_us.append((time.perf_counter() - t0) * 1e6)
        pub.verify(sig, msg, pss, hashes.SHA256())
        if i % step == 0:
            print(json.dumps({"progress": transport, "done": i, "of": n}), flush=True)
    secret = os.urandom(32)
    assert key.decrypt(pub.encrypt(secret, oaep), oaep) == secret
    ping_us = [ns / 1000 for ns in o.client.ping_loop(20000)]
    print(json.dumps({"transport": transport, "oracle_pid": o.pid, "sign_us": sign_us,
                      "ping_us": ping_us}), flush=True)
print(json.dumps({"ready": True}), flush=True)
sys.stdin.readline()
for o in oracles:
    o.stop()
'''


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(requests: int = 2000) -> int:
    """Run the demo; 0 when the memory check came out as designed."""
    with tempfile.TemporaryDirectory(prefix="shmkey-demo-") as tmp:
        key_path = Path(tmp) / "demo.key"
        print("shmkey demo: making a throwaway RSA-2048 key with openssl ...")
        subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt",
                        "rsa_keygen_bits:2048", "-out", str(key_path)], check=True,
                       capture_output=True)
        child = subprocess.Popen([sys.executable, "-c", _NETWORK_SIDE, str(key_path),
                                  str(requests)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
        assert child.stdout is not None and child.stdin is not None
        results = []
        try:
            for line in child.stdout:
                msg = json.loads(line)
                if "progress" in msg:
                    print(f"  {msg['progress']:>10}: {msg['done']:>5}/{msg['of']} signatures",
                          end="\r", flush=True)
                elif "transport" in msg:
                    results.append(msg)
                elif msg.get("ready"):
                    break
            print(" " * 60, end="\r")
            key = serialization.load_pem_private_key(key_path.read_bytes(), None)
            assert isinstance(key, rsa.RSAPrivateKey)
            secrets = key_secrets(key)
            network = scan_process(child.pid, secrets)
            oracle_scans = [scan_process(r["oracle_pid"], secrets) for r in results]
        finally:
            child.stdin.write("\n")
            child.stdin.close()
            child.wait(timeout=30)

    print("\nRSA-2048 PSS/SHA-256 signatures through the key oracle "
          f"({requests} per transport), microseconds:")
    print(f"  {'transport':<12}{'sign p50':>10}{'sign p99':>10}{'ping p50':>10}{'ping p99':>10}")
    for r in results:
        print(f"  {r['transport']:<12}{_pct(r['sign_us'], .5):>10.1f}{_pct(r['sign_us'], .99):>10.1f}"
              f"{_pct(r['ping_us'], .5):>10.2f}{_pct(r['ping_us'], .99):>10.2f}")
    if len(results) == 2:
        ratio = statistics.median(results[1]["ping_us"]) / statistics.median(results[0]["ping_us"])
        print(f"  shm ring round trip = {ratio:.3f} x socketpair")
    print("\nMemory check (primes, private exponent, CRT values, DER and PEM of the key):")
    print(f"  network-side process {network.pid}: {network.found} hits in "
          f"{network.bytes_scanned / 1e6:.0f} MB")
    for r, scan in zip(results, oracle_scans):
        print(f"  {r['transport']:>10} oracle {scan.pid}: {scan.found} hits in "
              f"{scan.bytes_scanned / 1e6:.0f} MB (the scanner works)")
    ok = network.found == 0 and all(s.found > 0 for s in oracle_scans)
    print("\n" + ("OK: the key is only in the oracle." if ok else "UNEXPECTED: see above."))
    return 0 if ok else 1

"""SIGHUP to `shmkey serve`: the keys are read again without dropping a
client or losing a request; a key that fails to load keeps the old one."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

import shmkey

from .test_status import Oracle

LOAD = """
import json, sys, threading, time
import shmkey
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
client = shmkey.connect(sys.argv[1])
key = client.private_key()
pub = key.public_key()
ok, failed, stop = [0], [], time.monotonic() + float(sys.argv[2])
def run():
    while time.monotonic() < stop:
        try:
            sig = key.sign(b"m", padding.PKCS1v15(), hashes.SHA256())
            pub.verify(sig, b"m", padding.PKCS1v15(), hashes.SHA256())
            ok[0] += 1
        except Exception as exc:
            failed.append(repr(exc))
threads = [threading.Thread(target=run) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"ok": ok[0], "failed": failed[:5], "nfailed": len(failed)}))
"""


@pytest.fixture
def oracles() -> list[Oracle]:
    running: list[Oracle] = []
    yield running
    for o in running:
        o.stop()


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_sighup_under_load_loses_no_request(tmp_path: Path, rsa2048: Path, oracles: list,
                                            kind: str) -> None:
    key = tmp_path / "key.pem"
    shutil.copy(rsa2048, key)
    o = Oracle(tmp_path, [key], "--worker-kind", kind, "--workers", "2")
    oracles.append(o)
    load = subprocess.Popen([sys.executable, "-c", LOAD, o.name, "2.5"], stdout=subprocess.PIPE,
                            text=True)
    time.sleep(0.5)
    for _ in range(6):
        o.proc.send_signal(signal.SIGHUP)
        time.sleep(0.25)
    out, _ = load.communicate(timeout=60)
    result = json.loads(out)
    assert result["nfailed"] == 0, result
    assert result["ok"] > 50
    assert o.proc.poll() is None
    doc = shmkey.connect(o.name).status()
    assert doc["keys"][0]["signs"] == result["ok"]
    log = o.stop()
    assert log.count("reloaded: serving RSA-2048") == 6


def test_a_new_key_is_served_and_a_bad_one_keeps_the_old(tmp_path: Path, rsa2048: Path,
                                                        oracles: list) -> None:
    key = tmp_path / "key.pem"
    shutil.copy(rsa2048, key)
    o = Oracle(tmp_path, [key])
    oracles.append(o)
    client = shmkey.connect(o.name)
    old_pub = client.private_key().public_key()

    key.write_text("not a key\n")
    o.proc.send_signal(signal.SIGHUP)
    time.sleep(0.6)
    sig = client.private_key().sign(b"m", padding.PKCS1v15(), hashes.SHA256())
    old_pub.verify(sig, b"m", padding.PKCS1v15(), hashes.SHA256())

    fresh = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key.write_bytes(fresh.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    os.chmod(key, 0o600)
    o.proc.send_signal(signal.SIGHUP)
    time.sleep(0.6)
    # The same connection, still open: it now gets the new key.
    served = client.private_key()
    assert shmkey.key_id(served.public_key()) == shmkey.key_id(fresh.public_key())
    sig = served.sign(b"m", padding.PKCS1v15(), hashes.SHA256())
    fresh.public_key().verify(sig, b"m", padding.PKCS1v15(), hashes.SHA256())
    ids = [k["key_id"] for k in client.status()["keys"]]
    assert ids == [shmkey.key_id(fresh.public_key()).hex()]
    client.close()
    log = o.stop()
    assert "reload: cannot load key from" in log and "keeping the key loaded before" in log

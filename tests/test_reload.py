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
from shmkey import _process, names
from shmkey.tools.procfs import children

from .conftest import make_key, unique
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


def _unlocked_private_mappings(pid: int) -> list[str]:
    """Private anonymous writable mappings of ``pid`` not locked in memory
    (no ``lo`` in their VmFlags): heap arenas, thread stacks."""
    out, head = [], [""]
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                head = fields
            elif fields[0] == "VmFlags:" and head[1:2] == ["rw-p"] and len(head) < 6 \
                    and "lo" not in fields[1:]:
                out.append(head[0])
    return out


def _locked_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmLck:"))


def _sign_once(name: str) -> None:
    client = shmkey.connect(name)
    client.private_key().sign(b"m", padding.PKCS1v15(), hashes.SHA256())
    client.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mlockall needs root (RLIMIT_MEMLOCK)")
def test_reloaded_keys_are_locked_in_memory(tmp_path: Path, rsa2048: Path, rsa3072: Path,
                                            oracles: list) -> None:
    """What start-up's mlockall locked is what was mapped then; the worker
    threads' stacks and malloc arenas came later. After a reload, every
    private mapping, the new key's pages among them, is locked."""
    key = tmp_path / "key.pem"
    shutil.copy(rsa2048, key)
    o = Oracle(tmp_path, [key])
    oracles.append(o)
    _sign_once(o.name)
    assert _locked_kb(o.proc.pid) > 0
    assert _unlocked_private_mappings(o.proc.pid)      # the control: what came after start
    shutil.copy(rsa3072, key)
    o.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reloaded: serving RSA-3072" not in o.log.read_text():
        assert time.monotonic() < deadline, o.log.read_text()
        time.sleep(0.05)
    assert _unlocked_private_mappings(o.proc.pid) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mlockall needs root (RLIMIT_MEMLOCK)")
def test_worker_processes_lock_their_memory(tmp_path: Path, rsa2048: Path,
                                            oracles: list) -> None:
    """Locks are not inherited across fork: each worker process takes its own."""
    o = Oracle(tmp_path, [rsa2048], "--worker-kind", "process", "--workers", "2")
    oracles.append(o)
    _sign_once(o.name)
    workers = children(o.proc.pid)
    assert len(workers) == 2
    assert all(_locked_kb(pid) > 0 for pid in workers)


def test_an_encrypted_key_keeps_its_old_self(tmp_path: Path) -> None:
    """Its password is not kept after start, so a reload cannot read it again:
    the key in memory goes on serving, and the log says why."""
    key = make_key(tmp_path, 2048, password="s3cret")
    name = unique("enc")
    log_path = tmp_path / "serve.log"
    r, w = os.pipe()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "shmkey", "serve", "--key", str(key),
                                 "--name", name, "--password-stdin", "--status-fd", str(w),
                                 "--allow-root"], pass_fds=[w], stdin=subprocess.PIPE,
                                stderr=log)
    os.close(w)
    try:
        assert proc.stdin is not None
        proc.stdin.write(b"s3cret\n")
        proc.stdin.close()
        assert json.loads(os.read(r, 4096)).get("ok"), log_path.read_text()
        client = shmkey.connect(name)
        before = client.private_key().public_key()
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload:" not in log_path.read_text():
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        served = client.private_key()
        assert shmkey.key_id(served.public_key()) == shmkey.key_id(before)
        before.verify(served.sign(b"m", padding.PKCS1v15(), hashes.SHA256()), b"m",
                      padding.PKCS1v15(), hashes.SHA256())
        client.close()
    finally:
        os.close(r)
        _process.stop(proc, 10)
        names.clean(name)
    line = next(x for x in log_path.read_text().splitlines() if "reload:" in x)
    assert line.endswith(f"WARNING reload: cannot load key from {key}: Password was not given but "
                         "private key is encrypted; keeping the key loaded before"), line

"""`shmkey status` and `shmkey list` against real oracles: counts after N
operations are N, over thread and process workers alike; refusals are
counted and logged; rate limits let about N a second through and refuse the
rest with RateLimitError; the audit's connection lines carry totals."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

import shmkey
from shmkey import _process, names

from .conftest import unique

PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


class Oracle:
    """``shmkey serve`` in a child, ready once its status pipe says so; its log in a file."""

    def __init__(self, tmp: Path, keys: list[Path], *extra: str, name: Optional[str] = None) -> None:
        self.name = name or unique("status")
        self.log = tmp / f"{self.name}.log"
        r, w = os.pipe()
        args = [sys.executable, "-m", "shmkey", "serve", "--name", self.name, "--allow-root",
                "--status-fd", str(w), *[a for k in keys for a in ("--key", str(k))], *extra]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(args, pass_fds=[w], stderr=log)
        os.close(w)
        ready, _, _ = select.select([r], [], [], 30)
        info = json.loads(os.read(r, 4096) if ready else b"{}")
        os.close(r)
        if not info.get("ok"):
            self.stop()
            raise RuntimeError(f"shmkey serve did not start: {info} {self.log.read_text()}")

    def stop(self) -> str:
        _process.stop(self.proc, 10)
        names.clean(self.name)
        return self.log.read_text()


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[Oracle]]:
    running: list[Oracle] = []
    yield running
    for o in running:
        o.stop()


def _start(started: list[Oracle], tmp: Path, keys: list[Path], *extra: str) -> Oracle:
    o = Oracle(tmp, keys, *extra)
    started.append(o)
    return o


@pytest.fixture(scope="module")
def ec_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("eckey") / "ec.pem"
    path.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shmkey", *args], capture_output=True,
                          text=True, timeout=30)


def _key_doc(doc: dict, key_id: bytes) -> dict:
    (k,) = [k for k in doc["keys"] if k["key_id"] == key_id.hex()]
    return k


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_counts_after_n_signatures_are_n_over_every_worker(started, tmp_path, rsa2048,
                                                           kind) -> None:
    o = _start(started, tmp_path, [rsa2048], "--worker-kind", kind, "--workers", "2")
    clients = [shmkey.connect(o.name)]
    keys = [clients[0].private_key()]
    # Keep the worker serving the first connection busy while more connect, so
    # that the other worker process accepts some of them.
    busy, hammered = threading.Event(), [0]

    def hammer() -> None:
        while not busy.is_set():
            keys[0].sign(b"busy", PSS, hashes.SHA256())
            hammered[0] += 1

    t = threading.Thread(target=hammer)
    t.start()
    try:
        while len(clients) < 8 or (kind == "process" and len(clients) < 40 and len(
                {int(c["connection"], 16) >> 40 for c in clients[0].status()["clients"]}) < 2):
            clients.append(shmkey.connect(o.name))
            keys.append(clients[-1].private_key())
            keys[-1].sign(b"first", PSS, hashes.SHA256())
    finally:
        busy.set()
        t.join()
    n = len(clients) - 1 + hammered[0]          # signatures so far
    for i in range(40):
        keys[i % len(keys)].sign(b"m%d" % i, PSS, hashes.SHA256())
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    ct = keys[0].public_key().encrypt(b"secret", oaep)
    for _ in range(3):
        assert keys[1].decrypt(ct, oaep) == b"secret"
    with pytest.raises(shmkey.PolicyError):
        keys[2].decrypt(ct, padding.PKCS1v15())
    doc = clients[0].status()
    k = _key_doc(doc, shmkey.key_id(keys[0].public_key()))
    assert (k["signs"], k["decrypts"], k["refused_policy"], k["refused"]) == (n + 40, 3, 1, 1)
    assert k["errors"] == 0 and k["latency_us"]["count"] == n + 44
    assert 10 < k["latency_us"]["p50"] < 100000
    assert doc["settings"]["worker_kind"] == kind and doc["pid"] == o.proc.pid
    mine = [c for c in doc["clients"] if c["pid"] == os.getpid()]
    assert sum(c["operations"] for c in mine) == n + 43
    assert sum(c["refused"] for c in mine) == 1
    if kind == "process":
        serving = {int(c["connection"], 16) >> 40 for c in mine}
        assert len(serving) == 2, "every connection went to one worker process"
    for c in clients:
        c.close()
    log = o.stop()
    assert f"refused by policy: pid {os.getpid()}" in log
    assert "PKCS#1 v1.5 decryption is disabled" in log
    assert log.count(f"client connected: pid {os.getpid()}") == len(clients)
    assert log.count(f"client disconnected: pid {os.getpid()}") == len(clients)


def test_status_and_list_commands(started, tmp_path, rsa2048, ec_key) -> None:
    o = _start(started, tmp_path, [rsa2048, ec_key])
    client = shmkey.connect(o.name)
    ec_private = client.private_key(1)
    for _ in range(5):
        ec_private.sign(b"m", ec.ECDSA(hashes.SHA256()))
    text = _cli("status", o.name)
    assert text.returncode == 0, text.stderr
    assert f"oracle {o.name}: pid {o.proc.pid}, user root (uid 0), shm" in text.stdout
    assert "EC secp256r1" in text.stdout and "signs 5" in text.stdout
    doc = json.loads(_cli("status", o.name, "--json").stdout)
    assert [k["type"] for k in doc["keys"]] == ["RSA-2048", "EC secp256r1"]
    assert doc["keys"][1]["signs"] == 5 and doc["keys"][0]["signs"] == 0
    for field in ("name", "pid", "uid", "user", "transport", "uptime_s", "settings", "version",
                  "worker_restarts", "format"):
        assert field in doc
    listing = _cli("list")
    assert listing.returncode == 0
    (line,) = [ln for ln in listing.stdout.splitlines() if ln.startswith(o.name + " ")]
    assert str(o.proc.pid) in line and "RSA-2048,EC secp256r1" in line
    listed = {d["name"]: d for d in json.loads(_cli("list", "--json").stdout)}
    assert listed[o.name]["pid"] == o.proc.pid
    missing = _cli("status", unique("absent"))
    assert missing.returncode == 1 and "is running" in missing.stderr
    assert "Traceback" not in missing.stderr
    client.close()


def _burst(key: shmkey.OracleKey, n: int) -> tuple[int, int]:
    ok = limited = 0
    for i in range(n):
        try:
            key.sign(b"%d" % i, PSS, hashes.SHA256())
            ok += 1
        except shmkey.RateLimitError as exc:
            assert isinstance(exc, shmkey.ShmkeyError)
            assert "rate limit exceeded" in str(exc)
            limited += 1
    return ok, limited


def test_rate_limit_lets_about_n_per_second_through(started, tmp_path, rsa2048) -> None:
    o = _start(started, tmp_path, [rsa2048], "--rate-limit", "20")
    client = shmkey.connect(o.name)
    key = client.private_key()
    ok, limited = _burst(key, 100)
    assert 20 <= ok <= 25 and ok + limited == 100
    time.sleep(0.5)                    # the bucket refills: 10 more
    ok2, _ = _burst(key, 30)
    assert 9 <= ok2 <= 14
    other = shmkey.connect(o.name)    # a bucket per connection
    assert _burst(other.private_key(), 5) == (5, 0)
    k = client.status()["keys"][0]
    assert k["refused_rate_limit"] == 130 - ok - ok2 and k["signs"] == ok + ok2 + 5
    client.close()
    other.close()
    log = o.stop()
    assert log.count(f"rate limit: pid {os.getpid()}") == 1     # once a minute at most


def test_rate_limit_for_one_key_only(started, tmp_path, rsa2048, ec_key) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    ec_id = shmkey.key_id(load_pem_private_key(ec_key.read_bytes(), None).public_key())
    o = _start(started, tmp_path, [rsa2048, ec_key], "--rate-limit", f"{ec_id.hex()[:12]}=5")
    client = shmkey.connect(o.name)
    rsa_key, ec_private = client.private_keys()
    assert _burst(rsa_key, 30) == (30, 0)
    ok = 0
    for _ in range(30):
        try:
            ec_private.sign(b"m", ec.ECDSA(hashes.SHA256()))
            ok += 1
        except shmkey.RateLimitError:
            pass
    assert 5 <= ok <= 7
    doc = client.status()
    assert doc["settings"]["rate_limits"] == {ec_id.hex()[:12]: 5.0}
    assert _key_doc(doc, ec_id)["refused_rate_limit"] == 30 - ok
    client.close()


@pytest.mark.parametrize("value, words", [
    ("0", "above 0"), ("x=3", "KEYID is a key id in hex"), ("abc", "above 0"),
    ("deadbeefdeadbeef=4", "no key of this oracle has that id")])
def test_rate_limit_option_errors(rsa2048, value: str, words: str) -> None:
    run = subprocess.run([sys.executable, "-m", "shmkey", "serve", "--key", str(rsa2048),
                          "--name", unique("badlimit"), "--allow-root", "--rate-limit", value],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and words in run.stderr and "Traceback" not in run.stderr


def _stopped_log(o: Oracle, sig: Optional[int] = None) -> str:
    if sig is not None:
        o.proc.send_signal(sig)
    return o.stop()


def test_disconnection_line_carries_the_totals(started, tmp_path, rsa2048) -> None:
    o = _start(started, tmp_path, [rsa2048])
    code = (f"import shmkey\nfrom cryptography.hazmat.primitives import hashes\n"
            f"from cryptography.hazmat.primitives.asymmetric import padding\n"
            f"k = shmkey.connect({o.name!r}).private_key()\n"
            f"for _ in range(7): k.sign(b'm', padding.PKCS1v15(), hashes.SHA256())\n")
    child = subprocess.run([sys.executable, "-c", code], timeout=30)
    assert child.returncode == 0
    time.sleep(0.6)                    # the audit looks every 250 ms
    log = _stopped_log(o, signal.SIGTERM)
    (line,) = [ln for ln in log.splitlines() if "client disconnected" in ln and "7 oper" in ln]
    assert "process python3" in line and "uid 0 (root)" in line


def test_minute_summary_only_while_there_is_traffic(caplog: pytest.LogCaptureFixture) -> None:
    from shmkey.oracle.audit import Summary
    from shmkey.oracle.stats import ERRORS, SIGNS, Meter, Region

    region = Region(2)
    kid = bytes(range(32))
    region.add_keys([kid])
    # Two worker processes' rows, added up in one line.
    for proc, n in ((0, 3), (1, 2)):
        meter = Meter(region, proc)
        for _ in range(n):
            meter.record(0, -1, SIGNS, 300_000)
    Meter(region, 1).record(0, -1, ERRORS, 1000)
    summary = Summary(region, lambda: [(kid.hex(), "RSA-2048", 0)])
    now = time.monotonic()
    with caplog.at_level("INFO", logger="shmkey.oracle"):
        summary.tick(now + 1)            # not a minute yet
        summary.tick(now + 61)
        summary.tick(now + 122)          # no traffic since: no line
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"key {kid.hex()[:16]} (RSA-2048) in the last minute: 5 signs, 0 decrypts, "
                     "0 refused by policy, 0 rate-limited, 1 errors"]

"""Real processes killed with real signals: a dead oracle is a clear error
within the timeout, a dead client's slot comes back, a late reply is never
delivered to the next request, and an owned oracle dies with its owner."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

import shmkey
from shmkey import ring

from .conftest import TRANSPORTS

PKCS1 = padding.PKCS1v15()


def wait_until(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_kill_oracle_mid_load(rsa4096: Path, transport: str) -> None:
    """Every caller gets OracleUnavailableError, long before its 60 s timeout."""
    with shmkey.KeyOracle(rsa4096, transport=transport, workers=2, timeout_ms=60000) as oracle:
        _kill_oracle_mid_load(oracle)
    assert not ring.exists(oracle.name)


def _kill_oracle_mid_load(oracle: shmkey.KeyOracle) -> None:
    key = oracle.private_key()
    outcomes: list[object] = []
    started = threading.Barrier(7)

    def caller() -> None:
        started.wait()
        try:
            while True:
                key.sign(os.urandom(16), PKCS1, hashes.SHA256())
        except BaseException as exc:  # the outcome is what we test
            outcomes.append(exc)

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(0.3)
    os.kill(oracle.pid, signal.SIGKILL)
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads), "a caller hung on a dead oracle"
    assert len(outcomes) == 6
    assert all(isinstance(e, shmkey.OracleUnavailableError) for e in outcomes), outcomes
    with pytest.raises(shmkey.OracleUnavailableError):
        key.ping()


def test_kill_clients_mid_request_slots_come_back(rsa4096: Path, tmp_path: Path) -> None:
    """Clients killed at random points; the ring ends with every slot free."""
    slots = 4
    with shmkey.KeyOracle(rsa4096, name=f"killc-{tmp_path.name[-6:]}", slots=slots,
                          workers=2) as oracle:
        code = f"""
import os, shmkey
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
key = shmkey.connect({oracle.name!r}).private_key()
print("ready", flush=True)
while True:
    key.sign(os.urandom(8), padding.PKCS1v15(), hashes.SHA256())
"""
        rng = random.Random(1234)
        for _ in range(20):
            child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
            assert child.stdout is not None and child.stdout.readline() == b"ready\n"
            time.sleep(rng.uniform(0.0, 0.03))
            child.kill()
            child.wait()
        assert wait_until(lambda: oracle.client.free_slots() == slots), \
            f"free slots stuck at {oracle.client.free_slots()} of {slots}"
        key = oracle.private_key()
        for _ in range(slots * 3):
            msg = os.urandom(8)
            key.public_key().verify(key.sign(msg, PKCS1, hashes.SHA256()), msg, PKCS1,
                                    hashes.SHA256())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_late_reply_never_reaches_the_next_request(rsa4096: Path, transport: str) -> None:
    with shmkey.KeyOracle(rsa4096, transport=transport, slots=1, workers=1) as oracle:
        key = oracle.private_key()
        client = oracle.client
        timeouts = 0
        for i in range(15):
            # A 1 ms deadline on a ~2 ms signature: it times out, unless this
            # thread was descheduled long enough for the reply to land first.
            try:
                client.call(3, (1, 2, 0, 0), os.urandom(32), timeout_ms=1)
            except TimeoutError as exc:      # OracleTimeoutError is a TimeoutError
                assert isinstance(exc, shmkey.OracleTimeoutError)
                timeouts += 1
            msg = f"request {i}".encode()
            sig = key.sign(msg, PKCS1, hashes.SHA256())
            key.public_key().verify(sig, msg, PKCS1, hashes.SHA256())
        assert timeouts >= 5
        if transport == "shm":
            assert wait_until(lambda: client.free_slots() == 1)


def test_owned_oracle_exits_with_its_owner(rsa2048: Path) -> None:
    code = f"""
import shmkey, sys, time
o = shmkey.KeyOracle({str(rsa2048)!r}).start()
print(o.pid, o.name, flush=True)
time.sleep(60)
"""
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    pid_s, name = owner.stdout.readline().split()
    pid = int(pid_s)
    assert ring.exists(name)
    owner.kill()
    owner.wait()

    def gone() -> bool:
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            return True

    assert wait_until(gone), "the oracle outlived its owner"
    assert not ring.exists(name), "an orphaned oracle left its ring behind"


def test_stopped_oracle_is_unavailable_to_attached_clients(rsa2048: Path, tmp_path: Path) -> None:
    oracle = shmkey.KeyOracle(rsa2048, name=f"stop-{tmp_path.name[-6:]}", workers=1).start()
    other = shmkey.connect(oracle.name)
    other.ping()
    oracle.stop()
    with pytest.raises(shmkey.OracleUnavailableError):
        other.ping()
    other.close()

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
from shmkey import _process, names
from shmkey._binding import lib
from shmkey.tools.procfs import stat_fields

from .conftest import TRANSPORTS, unique

PKCS1 = padding.PKCS1v15()


def listening(name: str) -> bool:
    """Whether oracle ``name``'s socket is there (a dead oracle's counts too)."""
    return names.socket_path(name).exists()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sigstop(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until every thread of it has stopped."""
    os.kill(pid, signal.SIGSTOP)
    threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    assert wait_until(lambda: all((stat_fields(t) or ["T"])[0] == "T" for t in threads))


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
    assert not listening(oracle.name)


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


# Imports once, then forks a child per "go": each child hammers the ring with
# echoes, so a SIGKILL at a random moment lands in every slot state.
ZYGOTE = r"""
import os, signal, sys
import shmkey
client = shmkey.connect(sys.argv[1])
signal.signal(signal.SIGCHLD, signal.SIG_IGN)      # children reap themselves
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        payload = os.urandom(256)
        while True:
            assert client.echo(payload) == payload
    print(pid, flush=True)
"""


def test_kill_clients_mid_request_slots_come_back(rsa2048: Path, tmp_path: Path) -> None:
    """100 clients SIGKILLed at random points; the oracle sees each hang up and
    frees its ring (its descriptors come back), and service goes on."""
    slots = 4
    with shmkey.KeyOracle(rsa2048, name=unique("killc"), slots=slots,
                          workers=2) as oracle:
        assert oracle.pid is not None
        oracle.client.ping()
        baseline = open_fds(oracle.pid)
        zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE, oracle.name], text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert zygote.stdin is not None and zygote.stdout is not None
        rng = random.Random(1234)
        key = oracle.private_key()
        try:
            for i in range(100):
                zygote.stdin.write("go\n")
                zygote.stdin.flush()
                pid = int(zygote.stdout.readline())
                time.sleep(rng.uniform(0.0005, 0.01))
                os.kill(pid, signal.SIGKILL)
                if i % 10 == 0:       # others carry on meanwhile
                    msg = os.urandom(8)
                    key.public_key().verify(key.sign(msg, PKCS1, hashes.SHA256()), msg, PKCS1,
                                            hashes.SHA256())
        finally:
            zygote.stdin.close()
            _process.stop(zygote, 10, sig=None)
        assert wait_until(lambda: oracle.client.free_slots() == slots, timeout=15), \
            f"free slots stuck at {oracle.client.free_slots()} of {slots}"
        assert wait_until(lambda: open_fds(oracle.pid) == baseline, timeout=15), \
            f"the oracle holds {open_fds(oracle.pid)} descriptors, {baseline} before"
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
                client.call(lib.SHMKEY_OP_SIGN,
                            (lib.SHMKEY_PAD_PKCS1V15, lib.SHMKEY_HASH_SHA256, 0, 0),
                            os.urandom(32), timeout_ms=1)
            except TimeoutError as exc:      # OracleTimeoutError is a TimeoutError
                assert isinstance(exc, shmkey.OracleTimeoutError)
                timeouts += 1
            msg = f"request {i}".encode()
            sig = key.sign(msg, PKCS1, hashes.SHA256())
            key.public_key().verify(sig, msg, PKCS1, hashes.SHA256())
        assert timeouts >= 5
        if transport == "shm":
            assert wait_until(lambda: client.free_slots() == 1)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_stopped_oracle_is_unavailable_within_the_timeout(rsa2048: Path, transport: str) -> None:
    """SIGSTOP keeps the oracle's socket open, so no hang-up tells the client:
    the request times out, OracleTimeoutError (an OracleUnavailableError), not
    a hang and not a wait beyond the deadline."""
    with shmkey.KeyOracle(rsa2048, transport=transport, workers=2, timeout_ms=1500) as oracle:
        key = oracle.private_key()
        key.sign(b"before", PKCS1, hashes.SHA256())
        assert oracle.pid is not None
        sigstop(oracle.pid)
        try:
            started = time.monotonic()
            with pytest.raises(shmkey.OracleUnavailableError):
                key.sign(b"during", PKCS1, hashes.SHA256())
            took = time.monotonic() - started
        finally:
            os.kill(oracle.pid, signal.SIGCONT)
        assert took < 1.5 + 1.0, took
        msg = b"after SIGCONT"
        key.public_key().verify(key.sign(msg, PKCS1, hashes.SHA256()), msg, PKCS1, hashes.SHA256())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_killed_oracle_is_unavailable_at_once(rsa2048: Path, transport: str) -> None:
    """SIGKILL: the hang-up reaches a sleeping client at once, not at its timeout."""
    with shmkey.KeyOracle(rsa2048, transport=transport, workers=1, timeout_ms=30000,
                          spin_us=0) as oracle:
        key = oracle.private_key()
        key.sign(b"before", PKCS1, hashes.SHA256())
        assert oracle.pid is not None
        os.kill(oracle.pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(shmkey.OracleUnavailableError):
            key.sign(b"after", PKCS1, hashes.SHA256())
        assert time.monotonic() - started < 2.0


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
    assert listening(name)
    owner.kill()
    owner.wait()

    def gone() -> bool:
        # Reparented on its owner's death, it may linger as a zombie until
        # its new parent reaps it: that counts as gone.
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except FileNotFoundError:
            return True

    assert wait_until(gone, timeout=15), "the oracle outlived its owner"
    assert not listening(name), "an orphaned oracle left its socket behind"


def test_stopped_oracle_is_unavailable_to_attached_clients(rsa2048: Path, tmp_path: Path) -> None:
    oracle = shmkey.KeyOracle(rsa2048, name=unique("stop"), workers=1).start()
    other = shmkey.connect(oracle.name)
    other.ping()
    oracle.stop()
    with pytest.raises(shmkey.OracleUnavailableError):
        other.ping()
    other.close()


def test_signals_during_shutdown_never_hang_the_oracle(rsa2048: Path) -> None:
    """SIGTERM upon SIGTERM while the oracle stops (as when its owner dies:
    lifeline EOF plus the parent-death signal) must not deadlock it; a stop
    flag set from a signal handler must take no lock."""
    code = f"""
import shmkey, time
o = shmkey.KeyOracle({str(rsa2048)!r}, workers=2).start()
print(o.pid, o.name, flush=True)
time.sleep(60)
"""
    for _ in range(5):
        owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert owner.stdout is not None
        pid_s, name = owner.stdout.readline().split()
        pid = int(pid_s)
        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                break
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    break
            time.sleep(0.001)
        else:
            os.kill(pid, signal.SIGKILL)
            names.clean(name)
            raise AssertionError("the oracle hung while stopping")
        assert wait_until(lambda name=name: not listening(name)), "it died without removing its socket"


def test_stop_request_takes_no_lock() -> None:
    """The SIGTERM handler runs on the main thread, which may be inside
    Event.set() holding its lock: so the handler must never take a lock.
    (It did once, and an oracle hung on its owner's death.)"""
    from shmkey.config import Config
    from shmkey.oracle.handler import Policy
    from shmkey.oracle.server import Oracle, ServeOptions

    oracle = Oracle(ServeOptions(key_paths=[], name=None, config=Config.load(env={}),
                                 policy=Policy()))
    with oracle._stopping._cond:          # what the main thread holds inside Event.set()
        handler = threading.Thread(target=oracle.request_stop, daemon=True)
        handler.start()
        handler.join(timeout=2)
        assert not handler.is_alive(), "request_stop blocked on the Event's lock"
    assert oracle._stop_requested.is_set()

"""Many threads in several processes at once: every answer verified, none crossed,
and backpressure when there are fewer slots than callers."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

import shmkey
from shmkey import _process

from .conftest import TRANSPORTS, unique

# Each thread decrypts secrets only it knows and signs messages only it signs:
# a reply delivered to the wrong caller fails the comparison or the verify.
WORKLOAD = r'''
import json, os, sys, threading
import shmkey
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

def run(key, tag, n, out):
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    pub = key.public_key()
    ok = 0
    for i in range(n):
        secret = f"{tag}:{i}:".encode() + os.urandom(8)
        if key.decrypt(pub.encrypt(secret, oaep), oaep) != secret:
            out.append(f"crossed decrypt in {tag}")
            return
        msg = secret + b"/sign"
        pub.verify(key.sign(msg, padding.PKCS1v15(), hashes.SHA256()), msg,
                   padding.PKCS1v15(), hashes.SHA256())
        key.ping()
        ok += 3
    out.append(ok)

def main(key, threads, n, tag):
    out = []
    ts = [threading.Thread(target=run, args=(key, f"{tag}-{t}", n, out)) for t in range(threads)]
    for t in ts: t.start()
    for t in ts: t.join()
    return out
'''


def run_workload(key: shmkey.OracleKey, threads: int, n: int, tag: str) -> list:
    scope: dict = {}
    exec(WORKLOAD, scope)
    return scope["main"](key, threads, n, tag)


def test_threads_in_two_processes_on_the_ring(rsa2048: Path, tmp_path: Path) -> None:
    threads, n = 8, 60
    with shmkey.KeyOracle(rsa2048, name=unique("conc"), workers=2, slots=16) as oracle:
        other = subprocess.Popen([sys.executable, "-c", WORKLOAD + f"""
key = shmkey.connect({oracle.name!r}).private_key()
print(json.dumps(main(key, {threads}, {n}, "child")))
"""], stdout=subprocess.PIPE, text=True)
        mine = run_workload(oracle.private_key(), threads, n, "parent")
        theirs = json.loads(other.communicate(timeout=120)[0])
    assert mine + theirs == [3 * n] * (2 * threads)


def test_two_processes_on_a_named_socket_oracle(rsa2048: Path, tmp_path: Path) -> None:
    name = unique("conc-sock")
    serve = subprocess.Popen([sys.executable, "-m", "shmkey", "serve", "--key", str(rsa2048),
                              "--name", name, "--transport", "socketpair", "--workers", "2",
                              "--allow-root"],
                             stderr=subprocess.PIPE, text=True)
    try:
        from .test_serve import wait_for_oracle
        client = wait_for_oracle(name, "socketpair")
        child = subprocess.Popen([sys.executable, "-c", WORKLOAD + f"""
key = shmkey.connect({name!r}, transport="socketpair").private_key()
print(json.dumps(main(key, 8, 40, "child")))
"""], stdout=subprocess.PIPE, text=True)
        mine = run_workload(client.private_key(), 8, 40, "parent")
        theirs = json.loads(child.communicate(timeout=120)[0])
        assert mine + theirs == [120] * 16
        client.close()
    finally:
        _process.stop(serve, 10)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_backpressure_with_one_slot(rsa2048: Path, transport: str) -> None:
    """Sixteen callers, one slot (or one socket worker): all wait their turn."""
    with shmkey.KeyOracle(rsa2048, transport=transport, slots=1, workers=1) as oracle:
        results = run_workload(oracle.private_key(), 16, 15, "bp")
        assert results == [45] * 16
        if transport == "shm":
            assert oracle.client.free_slots() == 1


def test_many_pings_from_many_threads(oracle: shmkey.KeyOracle) -> None:
    errors: list[BaseException] = []

    def pinger() -> None:
        try:
            for _ in range(3000):
                oracle.client.ping()
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    ts = [threading.Thread(target=pinger) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors


def test_threads_of_one_client_take_turns(rsa2048: Path) -> None:
    """More of a client's threads than workers: each is served in turn. Its
    threads reuse its lowest free slots, so a worker that always scanned its
    ring from the first slot served two threads while the others waited
    until those stopped."""
    threads, enough = 4, 40
    counts = [0] * threads
    stop = threading.Event()
    errors: list[BaseException] = []
    with shmkey.KeyOracle(rsa2048, workers=1, slots=16, timeout_ms=30000) as oracle:
        key = oracle.private_key()

        def signer(i: int) -> None:
            try:
                while not stop.is_set():
                    key.sign(b"turn %d" % i, padding.PKCS1v15(), hashes.SHA256())
                    counts[i] += 1
                    if counts[i] >= enough:
                        stop.set()
            except BaseException as exc:  # collected and asserted below
                errors.append(exc)
                stop.set()

        ts = [threading.Thread(target=signer, args=(i,)) for i in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert not errors
    assert min(counts) >= enough // 2, counts


SEQUENTIAL = r'''
import sys, time
import shmkey
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
key = shmkey.connect(sys.argv[1]).private_key()
pub, worst = key.public_key(), 0.0
for i in range(int(sys.argv[2])):
    msg = b"%s %d" % (sys.argv[3].encode(), i)
    t0 = time.monotonic()
    sig = key.sign(msg, padding.PKCS1v15(), hashes.SHA256())
    worst = max(worst, time.monotonic() - t0)
    pub.verify(sig, msg, padding.PKCS1v15(), hashes.SHA256())
print(worst)
'''


@pytest.mark.parametrize("workers", [1, 2])
def test_no_wakeup_is_lost_without_spinning(rsa2048: Path, workers: int) -> None:
    """With spinning off, a request reaches a worker either by its doorbell
    or because a worker that has just answered looks again before it sleeps
    (clients do not ring for it). Three processes sign back to back: a
    request that fell between the two would wait for its deadline."""
    n, procs = 150, 3
    with shmkey.KeyOracle(rsa2048, workers=workers, spin_us=0, timeout_ms=4000) as oracle:
        kids = [subprocess.Popen([sys.executable, "-c", SEQUENTIAL, oracle.name, str(n), f"p{i}"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for i in range(procs)]
        outs = [k.communicate(timeout=120) for k in kids]
        in_c = oracle.client.status()["keys"][0]
    assert all(k.returncode == 0 for k in kids), [err[-500:] for _, err in outs]
    # The slowest call waited for a few signatures at most, never for a deadline.
    assert max(float(out) for out, _ in outs) < 0.5, outs
    assert in_c["signs_in_c"] >= procs * (n - 1), in_c

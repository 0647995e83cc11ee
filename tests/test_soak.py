"""Soak: a million requests from several client processes, every reply checked
against its request, with the oracle's memory and descriptors watched for
growth, and nothing in /dev/shm. SHMKEY_SOAK_REQUESTS changes the total."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import shmkey

from .conftest import leaked, ours_in_shm, unique
from .test_faults import wait_until

TOTAL = int(os.environ.get("SHMKEY_SOAK_REQUESTS", "1000000"))
PROCS, THREADS = 2, 2

# Each request carries its own tag and counter; a crossed reply cannot match.
CLIENT = r"""
import json, struct, sys, threading
import shmkey
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
client = shmkey.connect(sys.argv[1])
key = client.private_key()
n, threads, tag = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
stats = {"ok": 0, "wrong": 0, "signed": 0}
lock = threading.Lock()

def run(t):
    ok = wrong = signed = 0
    pad = bytes(40)
    for i in range(n):
        payload = struct.pack("<IIQ", tag, t, i) + pad
        if client.echo(payload) == payload:
            ok += 1
        else:
            wrong += 1
        if i % 20000 == 0:
            msg = payload + b"sign"
            key.public_key().verify(key.sign(msg, padding.PKCS1v15(), hashes.SHA256()), msg,
                                    padding.PKCS1v15(), hashes.SHA256())
            signed += 1
        if i == n // 5 and t == 0:
            print(json.dumps({"checkpoint": True}), flush=True)
            sys.stdin.readline()
    with lock:
        stats["ok"] += ok; stats["wrong"] += wrong; stats["signed"] += signed

ts = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
print(json.dumps(stats), flush=True)
"""


def usage(pid: int) -> tuple[int, int]:
    """(resident kB, open descriptors) of a process."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def test_million_requests_no_crossed_replies_flat_resources(rsa2048: Path, tmp_path: Path) -> None:
    per_thread = TOTAL // (PROCS * THREADS)
    before = ours_in_shm()
    with shmkey.KeyOracle(rsa2048, name=unique("soak"), workers=2, slots=16) as oracle:
        assert oracle.pid is not None
        oracle.client.ping()
        idle_fds = usage(oracle.pid)[1]
        procs = [subprocess.Popen([sys.executable, "-c", CLIENT, oracle.name, str(per_thread),
                                   str(THREADS), str(tag)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True) for tag in range(PROCS)]
        for p in procs:         # everyone is past the warm-up fifth
            assert p.stdout is not None and json.loads(p.stdout.readline())["checkpoint"]
        early = usage(oracle.pid)
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("\n")
            p.stdin.flush()
        results = [json.loads(p.communicate(timeout=600)[0].splitlines()[-1]) for p in procs]
        # Each client's connection (and its descriptors) goes when the client does.
        assert wait_until(lambda: usage(oracle.pid)[1] == idle_fds, timeout=15), \
            f"oracle descriptors: {idle_fds} before the clients, {usage(oracle.pid)[1]} after"
        late = usage(oracle.pid)
        assert oracle.client.free_slots() == 16
    assert sum(r["wrong"] for r in results) == 0
    assert sum(r["ok"] for r in results) == per_thread * PROCS * THREADS >= TOTAL - 3
    assert all(r["signed"] > 0 for r in results)
    assert late[0] - early[0] < 4096, f"oracle memory grew: {early[0]} kB -> {late[0]} kB"
    assert not leaked(before)

"""RSA-2048 PSS signatures per second: 64 concurrent ``asign`` from one
asyncio loop, against 2 client processes each signing synchronously, both
through the ring to the same oracle (2 workers). Interleaved round by round;
the median is reported, with voluntary context switches per signature of
the client side (the loop's process, or the two processes together).

    PYTHONPATH=. python3 bench/aio_throughput.py --seconds 3 --rounds 3
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

import shmkey

PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


def switches(pid: int) -> int:
    """Voluntary context switches of every thread of ``pid`` so far."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


def aio_run(name: str, user: str, concurrency: int, seconds: float,
            q: multiprocessing.Queue) -> None:
    key = shmkey.connect(name, transport="shm", oracle_user=user).private_key()
    assert isinstance(key, shmkey.OracleKey)

    async def main() -> int:
        done = 0
        end = time.monotonic() + seconds

        async def one() -> None:
            nonlocal done
            while time.monotonic() < end:
                await key.asign(b"m", PSS, hashes.SHA256())
                done += 1

        await asyncio.gather(*(one() for _ in range(concurrency)))
        return done

    asyncio.run(main())     # warm-up: connect, fill the caches
    s0, t0 = switches(os.getpid()), time.monotonic()
    n = asyncio.run(main())
    q.put((n / (time.monotonic() - t0), (switches(os.getpid()) - s0) / max(n, 1)))


def sync_run(name: str, user: str, seconds: float, q: multiprocessing.Queue) -> None:
    key = shmkey.connect(name, transport="shm", oracle_user=user).private_key()
    assert isinstance(key, shmkey.OracleKey)
    key.sign(b"m", PSS, hashes.SHA256())
    s0, t0, n = switches(os.getpid()), time.monotonic(), 0
    end = t0 + seconds
    while time.monotonic() < end:
        key.sign(b"m", PSS, hashes.SHA256())
        n += 1
    q.put((n / (time.monotonic() - t0), (switches(os.getpid()) - s0) / max(n, 1)))


def measure(name: str, user: str, mode: str, seconds: float) -> tuple[float, float]:
    q: multiprocessing.Queue = multiprocessing.Queue()
    if mode == "asyncio x64":
        procs = [multiprocessing.Process(target=aio_run, args=(name, user, 64, seconds, q))]
    else:
        procs = [multiprocessing.Process(target=sync_run, args=(name, user, seconds, q))
                 for _ in range(2)]
    for p in procs:
        p.start()
    parts = [q.get(timeout=seconds * 4 + 60) for _ in procs]
    for p in procs:
        p.join()
    rate = sum(r for r, _ in parts)
    per_op = sum(r * s for r, s in parts) / rate
    return rate, per_op


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from _tls import Serve, write_key_and_cert
    with tempfile.TemporaryDirectory() as d:
        key, _ = write_key_and_cert(Path(d), "server")
        serve = Serve(key, "shm").start()
        try:
            results: dict[str, list[tuple[float, float]]] = {}
            for _ in range(args.rounds):
                for mode in ("2 processes, sync", "asyncio x64"):
                    results.setdefault(mode, []).append(measure(serve.name, serve.user, mode, args.seconds))
        finally:
            serve.stop()
    base = statistics.median(r for r, _ in results["2 processes, sync"])
    for mode, runs in results.items():
        rate = statistics.median(r for r, _ in runs)
        sw = statistics.median(s for _, s in runs)
        print(f"{mode:>20}: {rate:7.0f} signs/s  {rate / base:5.2f}x  "
              f"client voluntary switches/sign {sw:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

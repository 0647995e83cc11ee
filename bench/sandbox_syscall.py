"""What the workers' seccomp filter costs per system call: ``os.getppid()``
in a loop, in a forked child with the sandbox's filter (``shmkey.sandbox``,
no chroot or user change, so any user can run it) and in one without,
interleaved round by round; the difference of the medians is the filter's.

    PYTHONPATH=. python3 bench/sandbox_syscall.py --calls 1000000 --rounds 7
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shmkey import sandbox


def ns_per_call(filtered: bool, calls: int) -> float:
    """Nanoseconds per ``getppid`` in a fresh child, with the filter or not."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        if filtered:
            sandbox.enter(families=("unix", "inet"))
        getppid, clock = os.getppid, time.perf_counter_ns
        began = clock()
        for _ in range(calls):
            getppid()
        os.write(w, str((clock() - began) / calls).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        value = float(f.read())
    os.waitpid(pid, 0)
    return value


def measure(calls: int, rounds: int) -> dict[str, list[float]]:
    """Interleaved rounds: ns per call, ``plain`` and ``filtered``."""
    out: dict[str, list[float]] = {"plain": [], "filtered": []}
    for r in range(rounds):
        order = ("plain", "filtered") if r % 2 == 0 else ("filtered", "plain")
        for mode in order:
            out[mode].append(ns_per_call(mode == "filtered", calls))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    out = measure(args.calls, args.rounds)
    plain, filtered = statistics.median(out["plain"]), statistics.median(out["filtered"])
    print(f"os.getppid() from Python, {args.calls} calls, median of {args.rounds} interleaved "
          f"rounds: {plain:.1f} ns without the filter, {filtered:.1f} ns with it "
          f"(+{filtered - plain:.1f} ns per system call)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

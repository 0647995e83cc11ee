"""Where a signature's time goes between threads: one client signs RSA-2048 PSS
through the shm ring, one call at a time, and the kernel's per-thread
scheduler counters (/proc/PID/task/TID/sched) of the client and of every
oracle thread are read before and after, per operation. Oracles with
SHMKEY_WORKERS=1 and 2 alternate, so the two are compared under the same
machine noise.

    PYTHONPATH=. python3 bench/sched_counters.py [signs] [rounds]

Linux only; run it on a quiet machine (other load shows up as involuntary
switches).
"""
from __future__ import annotations

import os
import sys
import time

from shmkey.tools import bench
from shmkey.tools.stats import percentile

_FIELDS = {"nr_voluntary_switches": "vol", "nr_involuntary_switches": "invol",
           "se.sum_exec_runtime": "cpu_ms"}


def sched(pid: int, tid: int) -> dict[str, float]:
    """The counters of one thread: voluntary and involuntary switches, CPU ms."""
    out = {}
    with open(f"/proc/{pid}/task/{tid}/sched") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name.strip() in _FIELDS:
                out[_FIELDS[name.strip()]] = float(value)
    return out


def _per_op(before: dict[str, float], after: dict[str, float], n: int) -> str:
    d = {k: (after[k] - before[k]) / n for k in before}
    return f"vol {d['vol']:.2f} invol {d['invol']:.2f} cpu {d['cpu_ms'] * 1000:.0f} us"


def main(signs: int = 1000, rounds: int = 3) -> None:
    """Print, per oracle configuration and round: p50 latency, then per
    operation the switches and CPU time of the client and of each worker.
    """
    me = os.getpid()
    with bench.Lab() as lab:
        for _ in range(rounds):
            for workers in (1, 2):
                target = lab.target("shm", workers=workers)
                w = bench.workload(target, "sign-pss")
                assert target.oracle is not None and target.oracle.pid is not None
                pid = target.oracle.pid
                # The oracle's first thread is its main loop; the rest are workers.
                tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))[1:]
                w.check(w.run())
                before = {t: sched(pid, t) for t in tids}
                mine = sched(me, me)
                lat = []
                for _ in range(signs):
                    t0 = time.perf_counter_ns()
                    w.run()
                    lat.append(time.perf_counter_ns() - t0)
                after = {t: sched(pid, t) for t in tids}
                workers_text = " | ".join(_per_op(before[t], after[t], signs) for t in tids)
                print(f"workers={workers}: p50 {percentile(lat, 50) / 1e3:.1f} us; per sign: "
                      f"client {_per_op(mine, sched(me, me), signs)}; "
                      f"oracle workers {workers_text}", flush=True)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))

"""Ctrl-C of ``shmkey bench`` and ``shmkey demo`` as a terminal sends it, a
SIGINT to the whole foreground process group: one "interrupted" line, exit
status 130, no traceback, and nothing they started left running or in /dev/shm.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest

from shmkey import _process
from shmkey.tools.procfs import alive, children

from .conftest import leaked, ours_in_shm
from .test_faults import wait_until


@dataclass
class Interrupted:
    status: int
    out: str
    err: str
    started: list[int]      # every process below the command when Ctrl-C came


def _descendants(pid: int) -> list[int]:
    return [p for child in children(pid) for p in (child, *_descendants(child))]


def interrupt(args: list[str], when: str, delay: float) -> Interrupted:
    """Run ``shmkey ARGS`` in a session of its own; ``delay`` seconds after a
    line of its output holds ``when``, SIGINT its process group."""
    proc = subprocess.Popen([sys.executable, "-m", "shmkey", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    out: list[str] = []
    err: list[str] = []
    readers = [threading.Thread(target=lambda f=f, acc=acc: acc.extend(f), daemon=True)
               for f, acc in ((proc.stdout, out), (proc.stderr, err))]
    for r in readers:
        r.start()
    try:
        assert wait_until(lambda: any(when in line for line in out + err) or
                          proc.poll() is not None, timeout=120), "".join(out + err)
        assert proc.poll() is None, "".join(out + err)
        time.sleep(delay)
        started = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        status = _process.stop(proc, 60, sig=None)
    finally:
        _process.stop(proc, 0, signal.SIGKILL)
    for r in readers:
        r.join(10)
    return Interrupted(status, "".join(out), "".join(err), started)


def check(run: Interrupted, command: str) -> None:
    assert run.status == 130, run.err
    said = [line for line in run.err.splitlines() if "interrupted" in line]
    assert said == [f"shmkey {command}: interrupted"], run.err
    assert "Traceback" not in run.out + run.err, run.err
    assert run.started, "interrupted before it started anything"
    assert wait_until(lambda: not any(alive(p) for p in run.started), timeout=10), \
        [p for p in run.started if alive(p)]


def test_bench_during_latency() -> None:
    before = ours_in_shm()
    run = interrupt(["bench", "--duration", "30", "--rounds", "1", "--ops", "sign-pss",
                     "--no-throughput", "--busy", "1"], "latency sign-pss: round", 0.5)
    check(run, "bench")
    assert len(run.started) == 3        # two oracles and the busy loop
    assert not leaked(before)


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_bench_during_throughput(kind: str) -> None:
    """Timed to land in the shm slice, when clients are inside oracle calls."""
    before = ours_in_shm()
    run = interrupt(["bench", "--duration", "2", "--rounds", "1", "--ops", "ping",
                     "--transports", "shm", "--clients", "2", "--kinds", kind],
                    "throughput sign-pss", 3.0)
    check(run, "bench")
    assert not leaked(before)


def test_demo_under_load() -> None:
    before = ours_in_shm()
    run = interrupt(["demo", "--seconds", "30"], "Full TLS 1.3 handshakes", 1.0)
    check(run, "demo")
    assert len(run.started) > 6         # proxies, their workers and oracles, load clients
    rig = next(w for line in run.out.splitlines() for w in line.split() if "shmkey-rig-" in w)
    assert not os.path.exists(rig), "the demo left its directory"
    assert not leaked(before)

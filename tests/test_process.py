"""shmkey._process.stop: a signal, a bounded wait, SIGKILL; for Popen objects
and forked pids, alive, already exited, or reaped elsewhere."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from shmkey._process import stop, stop_all

STUBBORN = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(flush=True)
time.sleep(60)
"""


def _stubborn() -> subprocess.Popen:
    """A child that ignores SIGTERM (once it has said it does)."""
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"\n"
    return proc


def _fork(body: str = "sleep") -> int:
    """A forked child that sleeps, ignores SIGTERM and sleeps, or exits 3;
    returned once it has begun."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            if body == "ignore-term":
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os.write(w, b"!")
            if body == "exit-3":
                os._exit(3)
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"!"
    os.close(r)
    return pid


def _exited_unreaped(pid: int) -> None:
    """Wait until child ``pid`` has exited, leaving it to be reaped."""
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)


def test_sigterm_ends_a_popen() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    t0 = time.monotonic()
    assert stop(proc, 10) == -signal.SIGTERM
    assert time.monotonic() - t0 < 5 and proc.returncode == -signal.SIGTERM


def test_a_stopped_child_gets_its_signal_not_the_timeouts_sigkill() -> None:
    """A SIGSTOPped child is let run, so SIGTERM ends it (without SIGCONT it
    would sit until the timeout and die of SIGKILL)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    os.kill(proc.pid, signal.SIGSTOP)
    os.waitid(os.P_PID, proc.pid, os.WSTOPPED | os.WNOWAIT)
    assert stop(proc, 30) == -signal.SIGTERM


def test_sigkill_after_the_timeout() -> None:
    proc = _stubborn()
    t0 = time.monotonic()
    assert stop(proc, 0.3) == -signal.SIGKILL
    assert 0.3 <= time.monotonic() - t0 < 5


def test_already_exited_and_already_reaped() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(4)"])
    _exited_unreaped(proc.pid)
    assert stop(proc, 1) == 4
    assert stop(proc, 1) == 4       # reaped: its status again, nothing signalled


def test_no_signal_only_the_wait() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.close()
    assert stop(proc, 10, sig=None) == 0


def test_forked_pids() -> None:
    assert stop(_fork(), 10) == -signal.SIGTERM
    assert stop(_fork("ignore-term"), 0.2) == -signal.SIGKILL
    pid = _fork("exit-3")
    _exited_unreaped(pid)
    assert stop(pid, 1) == 3
    assert stop(pid, 1) is None         # reaped above: no child of ours any more


def test_all_share_one_deadline_and_give_up_cuts_it_short() -> None:
    procs = [_stubborn() for _ in range(3)]
    t0 = time.monotonic()
    assert stop_all(procs, 1.0) == [-signal.SIGKILL] * 3
    assert time.monotonic() - t0 < 2.5         # one deadline: 3 s if each waited its own
    procs = [_stubborn(), _fork("ignore-term")]
    t0 = time.monotonic()
    assert stop_all(procs, 30, give_up=lambda: time.monotonic() - t0 > 0.2) == \
        [-signal.SIGKILL] * 2
    assert time.monotonic() - t0 < 5

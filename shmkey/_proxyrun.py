"""Run ``shmkey proxy`` as a child process and watch it: its log lines as they
come, its readiness, its workers and oracle. For ``shmkey demo``, the proxy
tests and the benchmark.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence

READY = re.compile(r"proxy ready: (\S+):(\d+) .* key (?:in oracle '([^']+)'(?: \(pid (\d+))?"
                   r"|IN-PROCESS)")


def children(pid: int) -> list[int]:
    """Live child processes of ``pid``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return out


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _is_oracle(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"\0serve\0" in f.read()
    except OSError:
        return False


class ProxyProcess:
    """``python -m shmkey proxy ARGS``, started and ready when constructed.

    Attributes:
        port: where it listens.
        oracle_name, oracle_pid: its oracle's, if the key is in one.
        lines: its log so far.

    Raises:
        RuntimeError: it exited or did not get ready in time (with its log).
    """

    def __init__(self, args: Sequence[str], timeout: float = 30.0,
                 env: Optional[dict] = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "shmkey", "proxy", *args],
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            match = self.wait_for(READY, timeout)
        except RuntimeError:
            self.kill()
            raise
        self.port = int(match.group(2))
        self.oracle_name: Optional[str] = match.group(3)
        self.oracle_pid = int(match.group(4)) if match.group(4) else None

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: "re.Pattern[str]", timeout: float = 20.0,
                 start: int = 0) -> "re.Match[str]":
        """The first log line from ``start`` on that matches ``pattern``.

        Raises:
            RuntimeError: none within ``timeout``, or the proxy exited first.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[start:]:
                match = pattern.search(line)
                if match:
                    return match
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise RuntimeError(f"no log line matching {pattern.pattern!r}; log:\n" +
                           "\n".join(self.lines))

    def workers(self) -> list[int]:
        """Pids of the worker processes."""
        return [p for p in children(self.pid) if not _is_oracle(p)]

    def oracles(self) -> list[int]:
        """Pids of the oracles the proxy owns (one, or two during a reload)."""
        return [p for p in children(self.pid) if _is_oracle(p)]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal it and wait until it and every process it started have exited."""
        pids = [self.pid, *children(self.pid)]
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._reader.join(5)
        deadline = time.monotonic() + 5
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        return code

    def kill(self) -> None:
        """SIGKILL it (its workers and oracle follow it: they die with their parent)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

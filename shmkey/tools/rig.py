"""Run ``shmkey proxy`` as a watched child (:class:`ProxyProcess`: its log,
readiness, workers and oracle), and one proxy per key mode before one backend,
with load clients (:class:`ProxyRig`), for the demo and the benchmarks.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from cryptography.hazmat.primitives.asymmetric import rsa

from .. import _process
from .backend import Backend
from .certs import write_key_and_cert
from .procfs import alive, children, cpu_seconds
from .loadgen import LoadClients, LoadResult

READY = re.compile(r"proxy ready: (\S+):(\d+) .* key (?:in oracle '([^']+)'(?: \(pid (\d+))?"
                   r"|IN-PROCESS)")


SANDBOX_ROOT = re.compile(r"INFO workers: .*, sandboxed in (\S+)$")


def privilege_args(own_oracle: bool = True) -> list[str]:
    """How an operator starts ``shmkey proxy`` as root: workers as nobody, an
    oracle of its own as daemon. Nothing when not root (it runs as is)."""
    if os.geteuid() != 0:
        return []
    return ["--user", "nobody"] + (["--oracle-user", "daemon"] if own_oracle else [])


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

    def __init__(self, args: Sequence[str], wait: bool = True,
                 wrapper: Sequence[str] = ()) -> None:
        self.proc = subprocess.Popen([*wrapper, sys.executable, "-m", "shmkey", "proxy", *args],
                                     stderr=subprocess.PIPE, text=True)
        self.pid = self.proc.pid        # the proxy's, once ready, if a wrapper (strace) runs it
        self._wrapped = bool(wrapper)
        self.lines: list[str] = []
        self.port = 0
        self.oracle_name: Optional[str] = None
        self.oracle_pid: Optional[int] = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for its "proxy ready" line; learn its port and oracle.

        Raises:
            RuntimeError: it exited or did not get ready in time (it is killed).
        """
        try:
            match = self.wait_for(READY, timeout)
        except RuntimeError:
            self.kill()
            raise
        if self._wrapped:
            self.pid = min(children(self.proc.pid))
        self.port = int(match.group(2))
        self.oracle_name = match.group(3)
        self.oracle_pid = int(match.group(4)) if match.group(4) else None

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: re.Pattern[str], timeout: float = 20.0,
                 start: int = 0) -> re.Match[str]:
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

    def root_dir(self) -> Optional[Path]:
        """The workers' root directory (their chroot), as the log names it."""
        for line in self.lines:
            match = SANDBOX_ROOT.search(line)
            if match:
                return Path(match.group(1))
        return None

    def oracles(self) -> list[int]:
        """Pids of the oracles the proxy owns (one, or two during a reload)."""
        return [p for p in children(self.pid) if _is_oracle(p)]

    def cpu_seconds(self) -> float:
        """CPU time used so far by the proxy's processes and its oracle."""
        return sum(cpu_seconds(p) for p in [self.pid, *children(self.pid)])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal it, SIGKILL it if it has not exited within ``timeout``, and wait
        until it and every process it started have exited; its exit status."""
        pids = [self.pid, *children(self.pid)]
        code = self._end(sig, timeout)
        self._reader.join(5)
        deadline = time.monotonic() + 5
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        return code

    def kill(self) -> None:
        """SIGTERM it, then SIGKILL if it has not exited within 10 s (its workers
        and oracle die with it; only SIGTERM lets it remove its temporary files)."""
        self._end(signal.SIGTERM, 10.0)

    def _end(self, sig: int, timeout: float) -> int:
        if self.pid == self.proc.pid:
            code = _process.stop(self.proc, timeout, sig)
        else:
            # Under a wrapper (strace), our child: the signals are for the
            # proxy, its child, and the wrapper exits with it.
            if alive(self.pid):
                os.kill(self.pid, sig)
            code = _process.stop(self.proc, timeout, sig=None)
            if alive(self.pid):
                os.kill(self.pid, signal.SIGKILL)
        return code


# Each key mode of the proxy: its label and its extra arguments.
MODES: dict[str, list[str]] = {
    "in-process": ["--key-mode", "inprocess"],
    "oracle socketpair": ["--transport", "socketpair"],
    "oracle shm": ["--transport", "shm"],
}
# What the workers' sandbox costs: the same oracle over the ring, workers
# confined (as root, the default) or not.
SANDBOX_MODES: dict[str, list[str]] = {
    "shm, sandboxed": ["--transport", "shm"],
    "shm, --no-sandbox": ["--transport", "shm", "--no-sandbox"],
}
# What running handshake steps in threads gives: the ring with them (the
# default) and with the steps on each worker's loop, beside the key in-process.
THREAD_MODES: dict[str, list[str]] = {
    "in-process": MODES["in-process"],
    "shm, steps on the loop": ["--transport", "shm", "--handshake-threads", "0"],
    "oracle shm": MODES["oracle shm"],
}
_ALL_MODES = {**MODES, **SANDBOX_MODES, **THREAD_MODES}


class ProxyRig:
    """A throwaway key and certificate, a backend, one proxy per key mode in
    front of it (same worker count), and a pool of load clients; a context manager.

    Attributes:
        key: the throwaway private key (to know what a memory scan looks for).
        cert_path: its certificate, which clients trust.
        proxies: label (see :data:`MODES`, :data:`SANDBOX_MODES`) to running proxy.
    """

    def __init__(self, workers: int, loaders: int = 2, modes: Sequence[str] = tuple(MODES),
                 extra: Sequence[str] = ()) -> None:

        self._tmp = tempfile.TemporaryDirectory(prefix="shmkey-rig-")
        self.dir = Path(self._tmp.name)
        self.key: rsa.RSAPrivateKey
        self.key, self.key_path, self.cert_path = write_key_and_cert(self.dir)
        self.workers, self.loaders, self.modes = workers, loaders, list(modes)
        self.extra = list(extra)        # more options for every proxy
        self.backend = Backend()
        self.proxies: dict[str, ProxyProcess] = {}
        self.clients: Optional[LoadClients] = None

    def start(self) -> ProxyRig:
        """Start the backend, the proxies (side by side) and the load clients."""
        try:
            self.backend.start()
            for label in self.modes:
                self.proxies[label] = ProxyProcess(
                    ["--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{self.backend.port}",
                     "--cert", str(self.cert_path), "--key", str(self.key_path),
                     "--workers", str(self.workers), *privilege_args(), *_ALL_MODES[label],
                     *self.extra], wait=False)
            for proxy in self.proxies.values():
                proxy.wait_ready()
            self.clients = LoadClients(self.loaders)
        except BaseException:
            self.stop()
            raise
        return self

    def measure(self, label: str, *, concurrency: int = 16, seconds: Optional[float] = None,
                count: Optional[int] = None, tls_version: Optional[str] = "1.3") -> LoadResult:
        """Full handshakes, each with a checked request, through one proxy,
        and the CPU time its processes (workers, supervisor, oracle) used meanwhile."""
        assert self.clients is not None
        proxy = self.proxies[label]
        before = proxy.cpu_seconds()
        result = self.clients.run(proxy.port, str(self.cert_path), concurrency=concurrency,
                                  seconds=seconds, count=count, tls_version=tls_version)
        result.server_cpu = proxy.cpu_seconds() - before
        return result

    def stop(self) -> None:
        """Stop everything the rig started and remove its files."""
        if self.clients is not None:
            self.clients.close()
            self.clients = None
        for proxy in self.proxies.values():
            proxy.stop()
        self.proxies = {}
        self.backend.stop()
        self._tmp.cleanup()

    def __enter__(self) -> ProxyRig:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""A TLS load generator: each request a new connection with a full handshake,
one HTTP request and a checked response; :class:`LoadClients` runs it in
several processes, so that no one interpreter's GIL limits the load.
"""
from __future__ import annotations

import asyncio
import json
import signal
import ssl
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

from .. import _process
from .backend import body_for
from .stats import percentile


@dataclass
class Outcome:
    """One request: when it ended (``time.monotonic()``) and its error, if any."""

    end: float
    error: Optional[str] = None


@dataclass
class LoadResult:
    """What a run of the load generator saw."""

    ok: int = 0
    failed: int = 0
    elapsed: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)
    outcomes: list[Outcome] = field(default_factory=list)
    server_cpu: float = 0.0     # CPU seconds the server used meanwhile, where measured
    handshakes: list[float] = field(default_factory=list)   # seconds each successful one took
    requests: list[float] = field(default_factory=list)     # the same, connect to response

    def handshake_ms(self, p: float) -> float:
        """The ``p``-th percentile of the handshake times, in milliseconds (NaN: none)."""
        return percentile(self.handshakes, p) * 1e3

    def request_ms(self, p: float) -> float:
        """The ``p``-th percentile of whole requests (connect to checked response), in ms."""
        return percentile(self.requests, p) * 1e3

    @property
    def rate(self) -> float:
        """Successful handshakes (and responses) per second."""
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def cpu_per_request(self) -> float:
        """Server CPU seconds per successful request (0 if not measured)."""
        return self.server_cpu / self.ok if self.ok else 0.0


def client_context(cafile: str, tls_version: Optional[str] = None) -> ssl.SSLContext:
    """A verifying client context trusting ``cafile``; ``tls_version`` "1.2" or "1.3" pins it."""
    ctx = ssl.create_default_context(cafile=cafile)
    if tls_version:
        version = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}[tls_version]
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"SSLError: {exc.reason or exc}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def request(host: str, port: int, ctx: ssl.SSLContext, server_hostname: str,
                  path: str, timeout: float = 10.0) -> tuple[float, float]:
    """One connection, handshake, ``GET path``, and a check of the response.

    Returns:
        The seconds from connecting to the end of the handshake, and to the
        end of the response.

    Raises:
        ssl.SSLError, OSError, asyncio.TimeoutError: the connection failed.
        ValueError: the response was not the backend's answer to ``path``.
    """
    took = 0.0
    began = time.monotonic()

    async def exchange() -> bytes:
        nonlocal took
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx,
                                                       server_hostname=server_hostname)
        took = time.monotonic() - began
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {server_hostname}\r\n"
                         "Connection: close\r\n\r\n".encode())
            return await reader.read()
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass

    data = await asyncio.wait_for(exchange(), timeout)
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200 ") or body != body_for(path):
        raise ValueError(f"unexpected response {data[:80]!r}")
    return took, time.monotonic() - began


async def run(host: str, port: int, ctx: ssl.SSLContext, *, concurrency: int,
              count: Optional[int] = None, seconds: Optional[float] = None,
              server_hostname: str = "localhost", tag: str = "r",
              progress: Optional[Callable[[LoadResult], None]] = None) -> LoadResult:
    """Run ``count`` requests, or as many as fit in ``seconds``, ``concurrency`` at a time."""
    result = LoadResult()
    issued = 0
    deadline = None if seconds is None else time.monotonic() + seconds

    def more() -> bool:
        nonlocal issued
        if (count is not None and issued >= count) or \
                (deadline is not None and time.monotonic() >= deadline):
            return False
        issued += 1
        return True

    async def client(cid: int) -> None:
        n = 0
        while more():
            n += 1
            path = f"/{tag}/{cid}/{n}"
            try:
                took, whole = await request(host, port, ctx, server_hostname, path)
            except (OSError, ssl.SSLError, asyncio.TimeoutError, ValueError,
                    EOFError) as exc:
                result.failed += 1
                err = _describe(exc)
                result.errors[err] += 1
                result.outcomes.append(Outcome(time.monotonic(), err))
            else:
                result.ok += 1
                result.handshakes.append(took)
                result.requests.append(whole)
                result.outcomes.append(Outcome(time.monotonic()))
            if progress is not None:
                progress(result)

    start = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    result.elapsed = time.monotonic() - start
    return result


class LoadClients:
    """A pool of load generator processes, started once and driven together.

    Each process runs :func:`run` with its share of the concurrency when told
    to, so a measurement does not include interpreter start-up. A context manager.
    """

    def __init__(self, processes: int) -> None:
        # Sessions of their own: a Ctrl-C at the terminal is for the caller,
        # which ends them (:meth:`close`); were it killed, stdin's EOF does.
        self.procs = [subprocess.Popen([sys.executable, "-m", "shmkey.tools.loadgen"],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                       start_new_session=True)
                      for _ in range(processes)]
        self._loading = False       # a run's commands are out, its results not all in

    def run(self, port: int, cafile: str, *, concurrency: int, seconds: Optional[float] = None,
            count: Optional[int] = None, tls_version: Optional[str] = "1.3",
            host: str = "127.0.0.1", server_hostname: str = "localhost") -> LoadResult:
        """Load ``host:port`` from every process at once; the sum of what they saw.

        For a time-bound run the rate is the sum of each process's own rate;
        for a count-bound one, all successes over the longest process's time.
        """
        n = len(self.procs)
        self._loading = True
        for i, proc in enumerate(self.procs):
            share = None if count is None else count // n + (i < count % n)
            command = {"host": host, "port": port, "cafile": cafile, "tls": tls_version,
                       "sni": server_hostname, "concurrency": max(1, concurrency // n),
                       "seconds": seconds, "count": share, "tag": f"p{i}"}
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(command) + "\n")
            proc.stdin.flush()
        total, rate = LoadResult(), 0.0
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"load generator exited with {proc.wait()}")
            part = json.loads(line)
            total.ok += part["ok"]
            total.failed += part["failed"]
            total.errors.update(part["errors"])
            total.handshakes += part["handshakes"]
            total.requests += part["requests"]
            total.elapsed = max(total.elapsed, part["elapsed"])
            rate += part["ok"] / part["elapsed"] if part["elapsed"] else 0.0
        self._loading = False
        if seconds is not None and rate:
            total.elapsed = total.ok / rate     # so that .rate is the summed rate
        return total

    def close(self) -> None:
        """End the processes: idle, they exit when their stdin closes; in the
        middle of a run (an error or Ctrl-C cut it short), SIGTERM ends them.
        SIGKILL after 10 s."""
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
        _process.stop_all(self.procs, 10.0, signal.SIGTERM if self._loading else None)
        for proc in self.procs:
            if proc.stdout is not None:
                proc.stdout.close()

    def __enter__(self) -> LoadClients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> None:
    """One process of :class:`LoadClients`: a JSON command per line in, a JSON result out."""
    contexts: dict[tuple[str, Optional[str]], ssl.SSLContext] = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        key = (cmd["cafile"], cmd["tls"])
        if key not in contexts:
            contexts[key] = client_context(cmd["cafile"], cmd["tls"])
        result = asyncio.run(run(cmd["host"], cmd["port"], contexts[key],
                                 concurrency=cmd["concurrency"], count=cmd["count"],
                                 seconds=cmd["seconds"], server_hostname=cmd["sni"],
                                 tag=cmd["tag"]))
        sys.stdout.write(json.dumps({"ok": result.ok, "failed": result.failed,
                                     "elapsed": result.elapsed,
                                     "errors": dict(result.errors),
                                     "handshakes": result.handshakes,
                                     "requests": result.requests}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()

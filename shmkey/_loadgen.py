"""A TLS load generator for ``shmkey demo``, the proxy tests and the benchmark:
every request is a new connection with a full handshake (no session reuse),
one HTTP request and a checked response. Several processes of it
(:func:`run_processes`) keep the load off any one interpreter's GIL.
"""
from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

from ._backend import body_for


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
    errors: Counter = field(default_factory=Counter)
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Successful handshakes (and responses) per second."""
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0


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
                  path: str, timeout: float = 10.0) -> None:
    """One connection, handshake, ``GET path``, and a check of the response.

    Raises:
        ssl.SSLError, OSError, asyncio.TimeoutError: the connection failed.
        ValueError: the response was not the backend's answer to ``path``.
    """
    async def exchange() -> bytes:
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx,
                                                       server_hostname=server_hostname)
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
                await request(host, port, ctx, server_hostname, path)
            except (OSError, ssl.SSLError, asyncio.TimeoutError, ValueError,
                    EOFError) as exc:
                result.failed += 1
                err = _describe(exc)
                result.errors[err] += 1
                result.outcomes.append(Outcome(time.monotonic(), err))
            else:
                result.ok += 1
                result.outcomes.append(Outcome(time.monotonic()))
            if progress is not None:
                progress(result)

    start = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    result.elapsed = time.monotonic() - start
    return result


def run_processes(host: str, port: int, cafile: str, *, processes: int, concurrency: int,
                  seconds: float, tls_version: Optional[str] = "1.3",
                  server_hostname: str = "localhost") -> LoadResult:
    """Several load generator processes for ``seconds``, started together.

    The rate is the sum of each process's own (successes over its own time),
    so interpreter start-up is not counted.
    """
    start_at = time.time() + 0.5 + 0.1 * processes
    per = max(1, concurrency // processes)
    args = [sys.executable, "-m", "shmkey._loadgen", host, str(port), cafile, str(per),
            str(seconds), str(start_at), tls_version or "", server_hostname]
    procs = [subprocess.Popen(args + [f"p{i}"], stdout=subprocess.PIPE, text=True)
             for i in range(processes)]
    total = LoadResult()
    rate = 0.0
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"load generator exited with {proc.returncode}")
        part = json.loads(out)
        total.ok += part["ok"]
        total.failed += part["failed"]
        total.errors.update(part["errors"])
        total.elapsed = max(total.elapsed, part["elapsed"])
        rate += part["ok"] / part["elapsed"] if part["elapsed"] else 0.0
    # Report the summed rate through elapsed, so that ok / elapsed == rate.
    if rate:
        total.elapsed = total.ok / rate
    return total


def main() -> None:
    """One process of :func:`run_processes`; prints its result as JSON."""
    host, port, cafile, per, seconds, start_at, tls, sni, tag = sys.argv[1:10]
    ctx = client_context(cafile, tls or None)
    delay = float(start_at) - time.time()
    if delay > 0:
        time.sleep(delay)
    result = asyncio.run(run(host, int(port), ctx, concurrency=int(per),
                             seconds=float(seconds), server_hostname=sni, tag=tag))
    json.dump({"ok": result.ok, "failed": result.failed, "elapsed": result.elapsed,
               "errors": dict(result.errors)}, sys.stdout)
    sys.stdout.flush()
    os._exit(0)     # skip interpreter teardown: it is not part of the run


if __name__ == "__main__":
    main()

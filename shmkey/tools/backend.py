"""A small plain-HTTP backend for ``shmkey demo``, the proxy tests and the
benchmark: every response names the request's path, so a client can check it
got its own answer. ``POST`` echoes its body; keep-alive as HTTP/1.1 says.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Optional

_MAX_HEAD = 16384


def body_for(path: str) -> bytes:
    """What the backend answers to ``GET path``."""
    return f"hello from the backend: {path}\n".encode()


async def _serve_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3 or len(head) > _MAX_HEAD:
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
                return
            method, path, version = parts
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip().lower()
            length = int(headers.get("content-length", "0") or 0)
            data = await reader.readexactly(length) if length else b""
            body = data if method == "POST" else body_for(path)
            close = headers.get("connection") == "close" or version == "HTTP/1.0"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: %d\r\n%s\r\n" %
                         (len(body), b"Connection: close\r\n" if close else b"") + body)
            await writer.drain()
            if close:
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


class Backend:
    """The backend on 127.0.0.1 in a thread of its own; a context manager.

    Attributes:
        port: where it listens (an ephemeral port unless one was given).
    """

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._ready = threading.Event()
        self._stop: Optional[asyncio.Event] = None
        self._thread = threading.Thread(target=self._run, name="shmkey-backend", daemon=True)

    def start(self) -> Backend:
        """Start listening; returns once it accepts connections."""
        self._thread.start()
        self._ready.wait(10)
        return self

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(_serve_client, "127.0.0.1", self.port, backlog=1024)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()

    def stop(self) -> None:
        """Stop listening and end the thread."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread.ident is not None:
            self._thread.join(10)

    def __enter__(self) -> Backend:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    """``python -m shmkey.tools.backend [PORT]``: print the port, serve until killed."""
    import sys

    async def run() -> None:
        server = await asyncio.start_server(_serve_client, "127.0.0.1",
                                            int(sys.argv[1]) if len(sys.argv) > 1 else 0,
                                            backlog=1024)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

"""TLS handshake steps for a proxy worker, and a few threads to run them in:
a step that waits for the key oracle then stops none of the worker's other
connections. Python's ``ssl`` releases the GIL inside OpenSSL, and has no
``SSL_MODE_ASYNC`` to pause a handshake instead.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from .. import openssl as shmkey_openssl

log = logging.getLogger("shmkey.proxy")

# What libssl says when the private-key operation failed: then the provider knows why.
_KEY_FAILURES = (None, "EVP_LIB")
# RFC 8446, 4.1.3: a HelloRetryRequest is a ServerHello with this random.
_HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
_RANDOM = slice(11, 43)     # after the record header (5), handshake header (4), version (2)


@dataclass(frozen=True)
class Step:
    """What one ``do_handshake`` did.

    Attributes:
        done: the handshake is complete.
        error: why it failed, if it did.
        key_error: the provider's reason, when the failure was the key's.
        output: bytes for the client: the server's flight, or its alert.
        keyless: ``output`` is the server's first flight (its ServerHello,
            not a HelloRetryRequest): whatever it signed is signed, and the
            steps left need no key.
    """

    done: bool
    error: Optional[ssl.SSLError]
    key_error: Optional[str]
    output: bytes
    keyless: bool = False


def run_step(tls: ssl.SSLObject, outgoing: ssl.MemoryBIO, deadline: Optional[float]) -> Step:
    """Advance a handshake over memory BIOs as far as the bytes received allow.

    Waits for the key oracle until ``deadline`` (``time.monotonic()``) at
    most; past it, the key operation fails and so does the handshake, with
    its alert in ``output``. Call it in one thread at a time per connection,
    with nobody else touching ``tls`` or its BIOs meanwhile.
    """
    shmkey_openssl.set_deadline(deadline)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        output = outgoing.read()
        return Step(False, None, None, output, _first_flight(output))
    except ssl.SSLError as exc:
        # The provider's reason is this thread's: ask here, before its next step.
        why = shmkey_openssl.last_error() if exc.reason in _KEY_FAILURES else None
        return Step(False, exc, why, outgoing.read())
    return Step(True, None, None, outgoing.read(), True)


def _first_flight(output: bytes) -> bool:
    """Whether a server's output opens with a ServerHello record that is not a
    HelloRetryRequest (after which the client sends a new ClientHello, and
    the server signs in its next step). OpenSSL writes the whole flight at
    once: the ServerHello in a record of its own, and, in the same call,
    the signed part (TLS 1.3: CertificateVerify; 1.2: ServerKeyExchange)."""
    return len(output) >= _RANDOM.stop and output[0] == 0x16 and output[5] == 0x02 \
        and output[_RANDOM] != _HRR_RANDOM


_Job = tuple[ssl.SSLObject, ssl.MemoryBIO, Optional[float], Callable[[Step], None]]


class HandshakePool:
    """Threads that run :func:`run_step` for one event loop's connections,
    and hand each result back to that loop.

    Args:
        size: threads, started by :meth:`start` (before a sandbox forbids new ones).
        loop: where each step's callback runs.
    """

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop) -> None:
        if size < 1:
            raise ValueError(f"a handshake pool needs at least one thread, not {size}")
        self.size = size
        self._loop = loop
        self._jobs: queue.SimpleQueue[Optional[_Job]] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start the threads; the process may be unable to start more afterwards."""
        for i in range(self.size - len(self._threads)):
            thread = threading.Thread(target=self._serve, name=f"handshake-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def submit(self, tls: ssl.SSLObject, outgoing: ssl.MemoryBIO, deadline: Optional[float],
               done: Callable[[Step], None]) -> None:
        """Run a step in a thread; ``done(step)`` is called on the loop. Until
        then the connection's ``tls`` and BIOs belong to that thread."""
        self._jobs.put((tls, outgoing, deadline, done))

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            tls, outgoing, deadline, done = job
            step = run_step(tls, outgoing, deadline)
            try:
                self._loop.call_soon_threadsafe(done, step)
            except RuntimeError:
                return          # the loop is closed: the worker is stopping

    def stop(self, timeout: float = 1.0) -> None:
        """Tell the threads to end once their current step is done, and wait
        ``timeout`` seconds at most (a step ends by its deadline)."""
        for _ in self._threads:
            self._jobs.put(None)
        end = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))
        self._threads = []

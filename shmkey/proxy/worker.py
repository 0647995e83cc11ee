"""One proxy worker process: an asyncio loop that accepts on its own
SO_REUSEPORT socket, terminates TLS with Python's ``ssl`` over memory BIOs,
and relays plaintext to the backend.

TLS is done here rather than by asyncio's ``ssl=`` so that a failed
handshake still sends its alert, is logged once with the provider's reason,
and so that slow, idle and surplus connections are under our control. With
the key in an oracle, handshake steps run in a few threads
(``proxy.handshakes``), so that one waiting for the key stops nothing else.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import ssl
from dataclasses import dataclass
from typing import Optional

from .handshakes import HandshakePool, Step, run_step

log = logging.getLogger("shmkey.proxy")

_HANDSHAKE, _CONNECTING, _RELAY, _CLOSED = range(4)
_READ_SIZE = 65536
_ACCEPT_BATCH = 32
_DRAIN_IDLE = 1.0           # while draining, a connection this idle is done
# A step in a thread fails by itself at the handshake's deadline, with its
# alert; the sweep closes it without one only if it is this late.
_STEP_GRACE = 1.0
# Warm-up handshakes before the sandbox: one per kind of certificate (TLS 1.2
# suites pick RSA or ECDSA), and TLS 1.3.
_WARM_UPS = ((ssl.TLSVersion.TLSv1_3, None), (ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-GCM-SHA256"),
             (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-GCM-SHA256"))


@dataclass(frozen=True)
class Limits:
    """Per-worker bounds and timeouts, in connections and seconds.

    ``max_per_source`` caps the connections open from one client address;
    ``full_idle_timeout`` replaces ``idle_timeout`` while ``max_connections``
    are open, so that idle connections make room for new ones.
    ``handshake_timeout`` counts from the accept and includes waiting for the
    key; ``handshake_threads`` run the handshake steps when the key is in an
    oracle (0: on the loop, which then waits with each step).
    """

    max_connections: int = 1000
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    connect_timeout: float = 5.0
    drain_timeout: float = 10.0
    max_per_source: int = 100
    full_idle_timeout: float = 10.0
    handshake_threads: int = 4


def warm_up(ctx: ssl.SSLContext) -> int:
    """Handshakes with itself in memory, before a sandbox: whatever a
    handshake loads is then loaded, and the provider is connected to each
    oracle it will sign with. A kind of certificate the context lacks, or an
    oracle that is down, just fails its handshake; the number that succeeded."""
    done = 0
    for version, ciphers in _WARM_UPS:
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_ctx.check_hostname = False
        client_ctx.verify_mode = ssl.CERT_NONE
        client_ctx.minimum_version = client_ctx.maximum_version = version
        if ciphers:
            client_ctx.set_ciphers(ciphers)
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        client = client_ctx.wrap_bio(c_in, c_out)
        server = ctx.wrap_bio(s_in, s_out, server_side=True)
        try:
            for _ in range(10):
                for end, outgoing, peer_in in ((client, c_out, s_in), (server, s_out, c_in)):
                    try:
                        end.do_handshake()
                    except ssl.SSLWantReadError:
                        pass
                    peer_in.write(outgoing.read())
                if client.version() and server.version():
                    done += 1
                    break
        except ssl.SSLError as exc:
            log.debug("warm-up handshake (%s, %s): %s", version.name, ciphers, exc.reason or exc)
    return done


class _Client(asyncio.Protocol):
    """A client's TCP connection: TLS through memory BIOs, plaintext to the backend."""

    def __init__(self, worker: Worker) -> None:
        self.w = worker
        self.state = _HANDSHAKE
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = worker.ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.transport: Optional[asyncio.Transport] = None
        self.backend: Optional[asyncio.Transport] = None
        self.connect_task: Optional[asyncio.Task[None]] = None
        self.pending: list[bytes] = []      # plaintext that came before the backend was there
        self.client_eof = False
        self.started = self.last = worker.loop.time()
        self.peer = "?"
        self.source = ""        # the client's address, counted against max_per_source
        self.got_data = False
        self.stepping = False   # a handshake step in a thread owns tls and the BIOs
        self.held: list[bytes] = []     # what came meanwhile
        self.keyless = False    # the server's first flight is out: no step left needs the key

    # ---- the client side ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = f"{peer[0]}:{peer[1]}"

    def data_received(self, data: bytes) -> None:
        self.last = self.w.loop.time()
        self.got_data = True
        if self.stepping:
            self.held.append(data)
            return
        self.incoming.write(data)
        if self.state == _HANDSHAKE:
            self._handshake()
        elif self.state in (_CONNECTING, _RELAY) and not self.client_eof:
            self._read_plaintext()

    def eof_received(self) -> bool:
        if self.state == _HANDSHAKE:
            if self.got_data:
                log.info("%s: client closed the connection during the handshake", self.peer)
            return False
        # A FIN without close_notify is treated as one: the backend decides
        # whether what it got is complete.
        self._client_done()
        return True

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if exc is not None and self.state == _RELAY:
            log.debug("%s: connection lost: %s", self.peer, exc)
        self.state = _CLOSED
        if self.connect_task is not None:
            self.connect_task.cancel()
        if self.backend is not None:
            if exc is None:
                self.backend.close()
            else:
                self.backend.abort()
        self.w.forget(self)

    def pause_writing(self) -> None:
        if self.backend is not None:
            self.backend.pause_reading()

    def resume_writing(self) -> None:
        if self.backend is not None:
            self.backend.resume_reading()

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data and self.transport is not None:
            self.transport.write(data)

    def _handshake(self) -> None:
        """The next step: in a thread of the pool if there is one and the step may need the key."""
        deadline = self.started + self.w.limits.handshake_timeout
        if self.w.pool is None or self.keyless:
            self._step_done(run_step(self.tls, self.outgoing, deadline))
            return
        self.stepping = True
        self.w.pool.submit(self.tls, self.outgoing, deadline, self._step_done)

    def _step_done(self, step: Step) -> None:
        self.stepping = False
        if self.state == _CLOSED or self.transport is None or self.transport.is_closing():
            return              # gone meanwhile: the step's result is for nobody
        self.keyless = self.keyless or step.keyless
        if step.output:
            self.transport.write(step.output)   # the flight, or the alert: the client learns why
        if step.error is not None:
            self.w.handshake_failed(self, step.error, step.key_error)
            self.close()
            return
        held, self.held = b"".join(self.held), []
        if held:
            self.incoming.write(held)
        if not step.done:
            if held:
                self._handshake()
            return
        self.state = _CONNECTING
        self.started = self.w.loop.time()
        self.transport.pause_reading()          # until the backend is connected
        self.connect_task = self.w.loop.create_task(self._connect())
        if not self.client_eof:
            self._read_plaintext()              # what came with the client's Finished

    async def _connect(self) -> None:
        host, port = self.w.backend_addr
        try:
            transport, _ = await self.w.loop.create_connection(lambda: _Backend(self), host, port)
        except OSError as exc:
            log.warning("%s: backend %s:%d: %s", self.peer, host, port,
                        os.strerror(exc.errno) if exc.errno else exc)
            self.close()
            return
        finally:
            self.connect_task = None
        if self.state == _CLOSED:
            transport.abort()
            return
        assert isinstance(transport, asyncio.Transport)
        self.backend = transport
        self.state = _RELAY
        if self.pending:
            transport.write(b"".join(self.pending))
            self.pending = []
        if self.client_eof:
            self._backend_write_eof()
        elif self.transport is not None:
            self.transport.resume_reading()

    def _read_plaintext(self) -> None:
        while True:
            try:
                data = self.tls.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                data = b""
            except ssl.SSLError as exc:
                log.info("%s: TLS error: %s", self.peer, exc.reason or exc)
                self._flush()
                self.abort()
                return
            if not data:
                self._client_done()
                break
            if self.backend is not None:
                self.backend.write(data)
            else:
                self.pending.append(data)
        self._flush()

    def _client_done(self) -> None:
        """The client will send no more: pass the EOF on, keep the reply coming."""
        if self.client_eof:
            return
        self.client_eof = True
        if self.backend is not None:
            self._backend_write_eof()

    def _backend_write_eof(self) -> None:
        assert self.backend is not None
        if self.backend.can_write_eof():
            self.backend.write_eof()

    # ---- what the backend side calls ----

    def send(self, data: bytes) -> None:
        """Plaintext from the backend, encrypted to the client."""
        if self.state == _CLOSED:
            return
        self.last = self.w.loop.time()
        view = memoryview(data)
        try:
            while view:
                view = view[self.tls.write(view):]
        except ssl.SSLError as exc:
            log.info("%s: TLS error while sending: %s", self.peer, exc.reason or exc)
            self.abort()
            return
        self._flush()

    def backend_done(self, exc: Optional[Exception]) -> None:
        """The backend closed (or failed): close_notify, then close."""
        if exc is not None:
            log.warning("%s: backend connection failed: %s", self.peer, exc)
        self.close()

    # ---- closing ----

    def close(self) -> None:
        """Send close_notify if the handshake is done, flush, and close."""
        if self.transport is None or self.transport.is_closing():
            return
        if self.state in (_CONNECTING, _RELAY):
            try:
                self.tls.unwrap()
            except ssl.SSLError:
                pass            # SSLWantReadError: we do not wait for the client's reply
            self._flush()
        self.transport.close()

    def abort(self) -> None:
        """Close at once, dropping what is unsent."""
        if self.transport is not None:
            self.transport.abort()


class _Backend(asyncio.Protocol):
    """The plaintext connection to the backend for one client."""

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.done = False

    def data_received(self, data: bytes) -> None:
        self.client.send(data)

    def eof_received(self) -> bool:
        self.done = True
        self.client.backend_done(None)
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if not self.done:
            self.client.backend_done(exc)

    def pause_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client.transport is not None and self.client.state == _RELAY:
            self.client.transport.resume_reading()


class Worker:
    """The event loop of one worker process.

    Args:
        sock: this worker's listening socket (SO_REUSEPORT, non-blocking).
        ctx: the server context, with the certificate and key (or key reference).
        backend_addr: resolved (host, port) of the backend.
        limits: bounds and timeouts.
        key_in_oracle: whether failed signatures should be explained by
            :func:`shmkey.openssl.last_error`.
    """

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, backend_addr: tuple[str, int],
                 limits: Limits, key_in_oracle: bool) -> None:
        self.sock = sock
        self.ctx = ctx
        self.backend_addr = backend_addr
        self.limits = limits
        self.key_in_oracle = key_in_oracle
        self.conns: set[_Client] = set()
        self.per_source: dict[str, int] = {}
        self.loop = asyncio.new_event_loop()
        # With the key in this process a step has nothing to wait for: it stays on the loop.
        self.pool = HandshakePool(limits.handshake_threads, self.loop) \
            if key_in_oracle and limits.handshake_threads > 0 else None
        self.accepting = False
        self.draining = False
        self.stopped = False
        self.drain_deadline = 0.0

    def start_threads(self) -> None:
        """Start the handshake threads, if any: before a sandbox is sealed."""
        if self.pool is not None:
            self.pool.start()

    def serve(self) -> None:
        """Run until SIGTERM has drained the connections (:meth:`start_threads` first)."""
        self.loop.add_signal_handler(signal.SIGTERM, self.drain)
        self._accepting(True)
        self.loop.call_later(1.0, self._sweep)
        try:
            self.loop.run_forever()
        finally:
            self.stopped = True
            for conn in list(self.conns):
                conn.abort()
            self.loop.run_until_complete(asyncio.sleep(0))     # their connection_lost
            self.loop.close()
            if self.pool is not None:
                self.pool.stop()

    def _accepting(self, on: bool) -> None:
        if on and not self.accepting and not self.draining:
            self.loop.add_reader(self.sock.fileno(), self._accept)
        elif not on and self.accepting:
            self.loop.remove_reader(self.sock.fileno())
        self.accepting = on and not self.draining

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            if len(self.conns) >= self.limits.max_connections:
                # The rest wait in the kernel's queue until a connection ends.
                self._accepting(False)
                return
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:
                    continue
                log.error("accept: %s; pausing for 0.1 s", exc.strerror or exc)
                self._accepting(False)
                self.loop.call_later(0.1, self._accepting, True)
                return
            source = str(addr[0]) if isinstance(addr, tuple) else ""
            if self.per_source.get(source, 0) >= self.limits.max_per_source:
                log.info("%s:%s: %d connections already open from this address; closing",
                         source, addr[1], self.limits.max_per_source)
                conn.close()
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client = _Client(self)
            client.source = source
            self.per_source[source] = self.per_source.get(source, 0) + 1
            self.conns.add(client)
            self.loop.create_task(self._attach(client, conn))

    async def _attach(self, client: _Client, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: client, conn)
        except OSError:
            conn.close()
            self.forget(client)

    def forget(self, client: _Client) -> None:
        """A connection ended: make room for another."""
        if client in self.conns:
            left = self.per_source.pop(client.source, 1) - 1
            if left:
                self.per_source[client.source] = left
        self.conns.discard(client)
        if self.stopped:
            return
        if self.draining:
            if not self.conns:
                self.loop.stop()
        elif not self.accepting:
            self._accepting(True)

    def handshake_failed(self, client: _Client, exc: ssl.SSLError, why: Optional[str]) -> None:
        """One log line: the provider's reason (``why``) when the key operation failed."""
        if why and self.key_in_oracle:
            log.warning("%s: handshake failed: the key oracle could not sign: %s",
                        client.peer, why)
        else:
            log.info("%s: handshake failed: %s", client.peer, exc.reason or exc)

    def _sweep(self) -> None:
        """Close connections that stalled: slow handshakes, idle ones, stuck connects."""
        now, lim = self.loop.time(), self.limits
        idle = lim.idle_timeout
        if self.draining:
            idle = min(idle, _DRAIN_IDLE)
        elif len(self.conns) >= lim.max_connections:
            idle = min(idle, lim.full_idle_timeout)     # full: idle ones make room
        for c in list(self.conns):
            late = lim.handshake_timeout + (_STEP_GRACE if c.stepping else 0.0)
            if c.state == _HANDSHAKE and now - c.started > late:
                if c.got_data:
                    log.info("%s: handshake not done after %g s; closing", c.peer,
                             lim.handshake_timeout)
                c.abort()
            elif c.state == _CONNECTING and now - c.started > lim.connect_timeout:
                log.warning("%s: backend %s:%d: no connection after %g s", c.peer,
                            *self.backend_addr, lim.connect_timeout)
                if c.connect_task is not None:
                    c.connect_task.cancel()
                c.close()
            elif now - c.last > idle:
                if not self.draining:
                    full = " while the worker is full" if idle < lim.idle_timeout else ""
                    log.info("%s: idle for %g s%s; closing", c.peer, idle, full)
                c.close()
        if self.draining and now > self.drain_deadline:
            if self.conns:
                log.warning("drain timeout: closing %d connection(s)", len(self.conns))
            self.loop.stop()
            return
        self.loop.call_later(0.25 if self.draining else 1.0, self._sweep)

    def drain(self) -> None:
        """Stop accepting; finish the open connections (up to the drain timeout), then stop."""
        if self.draining:
            return
        self._accepting(False)
        self.draining = True
        self.drain_deadline = self.loop.time() + self.limits.drain_timeout
        self.sock.close()
        if not self.conns:
            self.loop.stop()

"""The network side: a handle on a running oracle (:class:`OracleClient`),
usable from many threads, and :func:`connect` to reach one by name, checking
who serves it.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import json
import select
import struct
import threading
from typing import Any, Optional, Union

from .. import _wire, names
from .._binding import ensure, ffi, lib, raise_for_status
from ..config import Config
from ..errors import InvalidArgumentError, ProtocolError
from .keys import AnyOracleKey, from_spki

_NO_PARAMS = (0, 0, 0, 0)
# Statuses of a failed reconnection, whose reason the client keeps.
_CONNECT_ERRORS = frozenset({lib.SHMKEY_EIDENTITY, lib.SHMKEY_EACCESS})
_TRANSPORTS = {None: lib.SHMKEY_TRANSPORT_ANY, "shm": lib.SHMKEY_TRANSPORT_SHM,
               "socketpair": lib.SHMKEY_TRANSPORT_SOCKET}


class OracleClient:
    """A connection to one oracle, usable from many threads at once.

    Each call runs in C with the GIL released; Python only packs arguments
    and unpacks the reply.
    """

    def __init__(self, handle: Any, timeout_ms: int, name: Optional[str] = None) -> None:
        self._handle = ffi.gc(handle, lib.shmkey_client_close)
        self._timeout_ms = timeout_ms
        self._max: int = lib.shmkey_client_max_payload(handle)
        self._local = threading.local()
        self._ping_req = ffi.new("struct shmkey_req *", {"op": lib.SHMKEY_OP_PING})
        # Coroutines of each event loop waiting for one of this process's slots.
        self._slot_queues: dict[asyncio.AbstractEventLoop, _SlotQueue] = {}
        self._replies: dict[asyncio.AbstractEventLoop, _Replies] = {}
        self.name = name

    @classmethod
    def open(cls, *, path: Optional[str] = None, ctl_fd: int = -1,
             transport: Optional[str] = None, oracle_uid: Optional[int] = None,
             exact_uid: bool = False, timeout_ms: int,
             name: Optional[str] = None) -> OracleClient:
        """Connect to an oracle: a named one's socket ``path``, or an owned
        one's control socket ``ctl_fd``.

        Args:
            transport: ``"shm"``, ``"socketpair"``, or None for the oracle's choice.
            oracle_uid: a uid to trust besides our own and root's; with
                ``exact_uid``, the only one.
            timeout_ms: for connecting and every request.

        Raises:
            OracleUnavailableError: nothing listens there.
            OracleIdentityError: the oracle runs as a user not trusted here.
            OracleAccessError: the socket or the oracle refuses this process.
        """
        if transport not in _TRANSPORTS:
            raise InvalidArgumentError(f"transport {transport!r} is not 'shm' or 'socketpair'")
        out = ffi.new("struct shmkey_client **")
        why = ffi.new("char[]", 1024)
        uid = lib.SHMKEY_UID_DEFAULT if oracle_uid is None else oracle_uid
        rc = lib.shmkey_client_open(path.encode() if path else ffi.NULL, ctl_fd,
                                    _TRANSPORTS[transport], uid, int(exact_uid), timeout_ms, why,
                                    len(why), out)
        ensure(rc, ffi.string(why).decode("utf-8", "replace") or
               (f"socket {path}" if path else "control socket"))
        return cls(out[0], timeout_ms, name)

    @property
    def transport(self) -> str:
        """``"shm"`` or ``"socketpair"``."""
        return "shm" if lib.shmkey_client_transport(self._handle) == lib.SHMKEY_TRANSPORT_SHM \
            else "socketpair"

    @property
    def oracle_uid(self) -> int:
        """The uid of the oracle serving this client (its SO_PEERCRED)."""
        uid: int = lib.shmkey_client_oracle_uid(self._handle)
        return uid

    @property
    def oracle_pid(self) -> int:
        """The pid of the oracle serving this client (its SO_PEERCRED; 0 over a control socket)."""
        pid: int = lib.shmkey_client_oracle_pid(self._handle)
        return pid

    @property
    def max_payload(self) -> int:
        """Largest request or reply payload, in bytes."""
        return self._max

    def _buffers(self) -> tuple[Any, Any, Any, Any]:
        """This thread's request, its bytes, the reply header and payload: made
        once, since C copies a request into the ring before a call returns."""
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            req = ffi.new("struct shmkey_req *")
            bufs = (req, ffi.buffer(req), ffi.new("struct shmkey_resp *"),
                    ffi.new("uint8_t[]", self._max))
            self._local.bufs = bufs
        return bufs

    def call(self, op: int, params: _wire.Params = _NO_PARAMS, payload: bytes = b"",
             key_id: bytes = _wire.DEFAULT_KEY, timeout_ms: Optional[int] = None) -> bytes:
        """Send one request and return the reply payload.

        Raises:
            InvalidArgumentError: payload larger than a slot (nothing is sent).
            OracleTimeoutError, OracleUnavailableError, PolicyError, ...: as the
                oracle or transport reports.
        """
        req, raw, resp, out = self._buffers()
        self._request(raw, op, params, payload, key_id)
        rc = lib.shmkey_call(self._handle, req, payload, out, len(out), resp,
                             self._timeout_ms if timeout_ms is None else timeout_ms)
        return self._result(rc, resp, out)

    def _request(self, raw: Any, op: int, params: _wire.Params, payload: bytes,
                 key_id: bytes) -> None:
        """Fill the request struct behind ``raw``, once the payload is known to fit a slot."""
        if len(payload) > self._max:
            raise InvalidArgumentError(
                f"request payload is {len(payload)} bytes; the oracle accepts at most "
                f"{self._max} (SHMKEY_SLOT_SIZE)")
        _wire.pack_request(raw, op, params, len(payload), key_id)

    def _result(self, rc: int, resp: Any, out: Any) -> bytes:
        if rc in _CONNECT_ERRORS:
            why = ffi.new("char[]", 256)
            lib.shmkey_client_why(self._handle, why, len(why))
            ensure(rc, ffi.string(why).decode("utf-8", "replace"))
        ensure(rc)
        data: bytes = ffi.buffer(out, resp.out_len)[:]
        if resp.status != lib.SHMKEY_OK:
            raise_for_status(resp.status, data.decode("utf-8", "replace")[:500])
        return data

    def submit(self, op: int, params: _wire.Params = _NO_PARAMS, payload: bytes = b"",
               key_id: bytes = _wire.DEFAULT_KEY,
               timeout_ms: Optional[int] = None) -> Optional[Pending]:
        """Send one request without waiting for its reply (ring transport only).

        Returns:
            A :class:`Pending` to collect when its ``fd`` is readable, or None
            when every slot of this process holds a request (try again once
            one is collected).

        Raises:
            UnsupportedOperationError: the socket transport, which has no tickets.
            InvalidArgumentError: payload larger than a slot (nothing is sent).
            OracleUnavailableError, OracleIdentityError, ...: (re)connecting failed.
        """
        req, raw, _, _ = self._buffers()
        self._request(raw, op, params, payload, key_id)
        ticket = ffi.new("struct shmkey_ticket *")
        rc = lib.shmkey_submit(self._handle, req, payload,
                               self._timeout_ms if timeout_ms is None else timeout_ms, ticket)
        if rc == lib.SHMKEY_EBUSY:
            return None
        if rc != lib.SHMKEY_OK:
            self._result(rc, None, None)
        return Pending(self, ticket)

    async def acall(self, op: int, params: _wire.Params = _NO_PARAMS, payload: bytes = b"",
                    key_id: bytes = _wire.DEFAULT_KEY, timeout_ms: Optional[int] = None) -> bytes:
        """:meth:`call` for asyncio: the loop goes on while the oracle works.

        The loop watches the replies of its requests as one descriptor; any
        number may be in flight (beyond the ring's slots they queue here, in
        turn). Cancelling withdraws the request. Over the socket transport
        the call runs in the loop's default executor.

        Raises:
            as :meth:`call`.
        """
        loop = asyncio.get_running_loop()
        if lib.shmkey_client_transport(self._handle) != lib.SHMKEY_TRANSPORT_SHM:
            return await loop.run_in_executor(
                None, functools.partial(self.call, op, params, payload, key_id, timeout_ms))
        queue = self._slot_queues.get(loop)
        # Behind those already waiting: a freed slot is theirs, in turn.
        pending = None if queue else self.submit(op, params, payload, key_id, timeout_ms)
        again = False
        while pending is None:
            await self._slot_freed(loop, again)
            pending = self.submit(op, params, payload, key_id, timeout_ms)
            again = True
        try:
            while True:
                # Not looked for at once: no reply comes within a few microseconds
                # of the request, and its descriptor is readable if one did.
                await self._readable(loop, pending)
                data = pending.collect()
                if data is not None:
                    return data
        finally:
            pending.abandon()
            self._wake_slot_waiter(loop)

    async def _slot_freed(self, loop: asyncio.AbstractEventLoop, first: bool) -> None:
        # Woken when a coroutine of this loop ends its request, the slot then
        # promised to us; other threads' requests end unseen, so look again
        # after a while anyway. A waiter that lost its slot to another thread
        # waits ``first`` in line.
        queue = self._slot_queues.setdefault(loop, _SlotQueue(loop))
        fut: asyncio.Future[bool] = loop.create_future()
        (queue.waiting.appendleft if first else queue.waiting.append)(fut)
        queue.arm()
        try:
            promised = await fut
        except BaseException:
            # Cancelled: pass on a promise made meanwhile, or leave the line.
            if fut.done() and not fut.cancelled() and fut.result():
                queue.promised -= 1
                self._wake_slot_waiter(loop)
            elif fut in queue.waiting:
                queue.waiting.remove(fut)
            self._drop_if_idle(loop, queue)
            raise
        if promised:
            queue.promised -= 1
        self._drop_if_idle(loop, queue)

    def _drop_if_idle(self, loop: asyncio.AbstractEventLoop, queue: _SlotQueue) -> None:
        if not queue:
            queue.disarm()
            if self._slot_queues.get(loop) is queue:
                del self._slot_queues[loop]

    async def _readable(self, loop: asyncio.AbstractEventLoop, pending: Pending) -> None:
        # Until the reply's descriptor is readable, or its deadline (the loop's
        # clock is CLOCK_MONOTONIC, as the ticket's).
        replies = self._replies.get(loop)
        if replies is None or replies.closed:
            replies = self._replies[loop] = _Replies(loop, self._replies)
        fut = replies.wait(pending.fd, pending.deadline)
        try:
            await fut
        finally:
            replies.forget(pending.fd)

    def _wake_slot_waiter(self, loop: asyncio.AbstractEventLoop) -> None:
        queue = self._slot_queues.get(loop)
        while queue is not None and queue.waiting:
            fut = queue.waiting.popleft()
            if not fut.done():
                queue.promised += 1
                fut.set_result(True)
                return

    def slots(self) -> int:
        """Slots of this process's ring: how many requests it may have in flight (0: no ring)."""
        n: int = lib.shmkey_client_slots(self._handle)
        return n

    def ping(self, timeout_ms: Optional[int] = None) -> None:
        """A no-op round trip through the oracle: health check, transport cost."""
        _, _, resp, out = self._buffers()
        rc = lib.shmkey_call(self._handle, self._ping_req, ffi.NULL, out, len(out), resp,
                             self._timeout_ms if timeout_ms is None else timeout_ms)
        self._result(rc, resp, out)

    def echo(self, data: bytes, timeout_ms: Optional[int] = None) -> bytes:
        """A ping that carries ``data`` and gets it back: a checkable round trip."""
        return self.call(lib.SHMKEY_OP_PING, payload=data, timeout_ms=timeout_ms)

    def ping_loop(self, n: int) -> list[int]:
        """Time ``n`` pings one by one in C; nanoseconds each."""
        ns = ffi.new("uint64_t[]", n)
        ensure(lib.shmkey_ping_loop(self._handle, n, ns, self._timeout_ms))
        return list(ns)

    def free_slots(self) -> int:
        """Slots of this process's ring free right now (shared-memory transport only)."""
        n: int = lib.shmkey_client_free_slots(self._handle)
        ensure(min(n, 0))
        return n

    def public_keys(self) -> list[bytes]:
        """SubjectPublicKeyInfo DER of every key the oracle holds, first key first."""
        data = self.call(lib.SHMKEY_OP_KEYS)
        out, pos = [], 0
        while pos < len(data):
            if pos + 2 > len(data):
                raise ProtocolError("truncated key list")
            (n,) = struct.unpack_from("<H", data, pos)
            out.append(data[pos + 2:pos + 2 + n])
            pos += 2 + n
        if pos != len(data) or not out:
            raise ProtocolError("malformed key list")
        return out

    def status(self) -> dict[str, Any]:
        """The oracle's status document (docs/operations.md), read a slot at a time.

        Its ``pid`` and ``uid`` are replaced by what this connection's
        SO_PEERCRED says, the only word on who serves it.

        Raises:
            ProtocolError: the document is not JSON.
        """
        parts: list[bytes] = []
        offset = 0
        while True:
            part = self.call(lib.SHMKEY_OP_STATUS, (offset, 0, 0, 0))
            parts.append(part)
            offset += len(part)
            if len(part) < self._max or offset > 1 << 26:
                break
        try:
            doc = json.loads(b"".join(parts))
        except ValueError as exc:
            raise ProtocolError(f"the oracle's status is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ProtocolError("the oracle's status is not a JSON object")
        if self.oracle_pid:
            doc["pid"] = self.oracle_pid
        doc["uid"] = self.oracle_uid
        doc["user"] = names.user_name(self.oracle_uid)
        return doc

    def private_keys(self) -> list[AnyOracleKey]:
        """Every key the oracle holds, as oracle-held private keys."""
        return [from_spki(self, der) for der in self.public_keys()]

    def private_key(self, which: Union[int, bytes, None] = None) -> AnyOracleKey:
        """One of the oracle's keys: the first, an index, or a key id (SHA-256 of its SPKI).

        Raises:
            InvalidArgumentError: no such key.
        """
        if which is None or which == 0 or which == _wire.DEFAULT_KEY:
            return from_spki(self, self.call(lib.SHMKEY_OP_PUBKEY))
        if isinstance(which, bytes):
            return from_spki(self, self.call(lib.SHMKEY_OP_PUBKEY, key_id=which))
        keys = self.public_keys()
        if not 0 <= which < len(keys):
            raise InvalidArgumentError(f"the oracle holds {len(keys)} key(s); no index {which}")
        return from_spki(self, keys[which])

    def close(self) -> None:
        """Detach; the oracle keeps running."""
        handle, self._handle = self._handle, None
        if handle is not None:
            ffi.release(handle)


_SLOT_RETRY_S = 0.005


class _SlotQueue:
    """One event loop's coroutines waiting for a slot of this process's ring,
    in arrival order, and how many were woken with a slot promised and have
    not yet taken it. New requests queue behind both, so that a coroutine
    which just ended a request cannot take the slot back from the one it woke."""

    __slots__ = ("waiting", "promised", "_loop", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.waiting: collections.deque[asyncio.Future[bool]] = collections.deque()
        self.promised = 0
        self._loop = loop
        self._timer: Optional[asyncio.TimerHandle] = None

    def __bool__(self) -> bool:
        return bool(self.waiting) or self.promised > 0

    def arm(self) -> None:
        """Look at the ring again after a while, for a slot that another
        thread freed: one timer for the line, not one per waiter."""
        if self._timer is None:
            self._timer = self._loop.call_later(_SLOT_RETRY_S, self._retry_first)

    def disarm(self) -> None:
        """Nobody waits any more."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _retry_first(self) -> None:
        self._timer = None
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_result(False)       # it tries the ring, and waits first in line again
                break
        if self.waiting:
            self.arm()


_REPLIES_LINGER_S = 1.0
_ONESHOT = select.EPOLLIN | select.EPOLLONESHOT


class _Replies:
    """The reply descriptors of one event loop's requests in flight on one
    client, in an epoll set of our own that the loop watches as a single
    descriptor: a request arms its descriptor with one system call (where
    ``add_reader`` and ``remove_reader`` cost two and some bookkeeping), and
    one wake-up of the loop resolves every reply that is ready. The loop
    never sees the ring's descriptors, which close with their ring when the
    oracle restarts: nothing stale is left in its selector. The set is closed
    a while after its last request, so a loop that stops asking keeps nothing.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 registry: dict[asyncio.AbstractEventLoop, _Replies]) -> None:
        self._loop = loop
        self._registry = registry
        self._ep = select.epoll()
        self._waiting: dict[int, tuple[asyncio.Future[None], float]] = {}
        self._armed_once: set[int] = set()
        self._linger: Optional[asyncio.TimerHandle] = None
        # One timer, for the earliest deadline: requests come in deadline order
        # as a rule, so it is rarely moved, where a timer each costs a heap push.
        self._timer: Optional[asyncio.TimerHandle] = None
        self._timer_at = 0.0
        self.closed = False
        loop.add_reader(self._ep.fileno(), self._ready)

    def wait(self, fd: int, deadline: float) -> asyncio.Future[None]:
        """A future that is resolved once ``fd`` is readable, or at
        ``deadline`` (the loop's clock)."""
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._waiting[fd] = (fut, deadline)
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline)
        try:
            if fd in self._armed_once:
                self._ep.modify(fd, _ONESHOT)
            else:
                self._ep.register(fd, _ONESHOT)
        except FileNotFoundError:
            # Closed since (its ring is gone) and the number given to a new one.
            self._ep.register(fd, _ONESHOT)
        except FileExistsError:
            self._ep.modify(fd, _ONESHOT)
        self._armed_once.add(fd)
        return fut

    def forget(self, fd: int) -> None:
        """The request on ``fd`` is over (answered, timed out or cancelled)."""
        self._waiting.pop(fd, None)
        if not self._waiting and self._linger is None and not self.closed:
            self._linger = self._loop.call_later(_REPLIES_LINGER_S, self._close)

    def _ready(self) -> None:
        for fd, _ in self._ep.poll(0):
            entry = self._waiting.get(fd)
            if entry is not None and not entry[0].done():
                entry[0].set_result(None)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._deadlines)
        self._timer_at = when

    def _deadlines(self) -> None:
        self._timer = None
        now, later = self._loop.time(), None
        for fut, deadline in self._waiting.values():
            if deadline <= now:
                if not fut.done():
                    fut.set_result(None)    # collect() then withdraws it: timed out
            elif later is None or deadline < later:
                later = deadline
        if later is not None:
            self._arm(later)

    def _close(self) -> None:
        self._linger = None
        if self._waiting or self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop.remove_reader(self._ep.fileno())
        self._ep.close()
        if self._registry.get(self._loop) is self:
            del self._registry[self._loop]


class Pending:
    """A request sent by :meth:`OracleClient.submit`: its reply is matched to
    it by slot and generation, so it can never receive another's. Collect it
    once ``fd`` is readable, or abandon it; either ends it.
    """

    def __init__(self, client: OracleClient, ticket: Any) -> None:
        self._client = client
        self._ticket = ffi.gc(ticket, lib.shmkey_abandon)
        self._resp = ffi.new("struct shmkey_resp *")
        self.fd: int = ticket.fd
        self.deadline: float = ticket.deadline_ns / 1e9    # time.monotonic()'s clock

    @property
    def done(self) -> bool:
        """True once collected or abandoned."""
        return self._ticket is None

    def collect(self) -> Optional[bytes]:
        """The reply payload, or None if it has not come yet (wait for ``fd`` again).

        Raises:
            OracleTimeoutError: the deadline passed; the request was withdrawn.
            OracleUnavailableError: the oracle went away.
            PolicyError, DecryptionError, ...: as the oracle answered.
        """
        ticket = self._ticket
        if ticket is None:
            raise InvalidArgumentError("this request was collected or abandoned already")
        out = self._client._buffers()[3]
        rc = lib.shmkey_collect(ticket, out, len(out), self._resp)
        if rc == lib.SHMKEY_EPENDING:
            return None
        self._ticket = None
        ffi.release(ticket)
        return self._client._result(rc, self._resp, out)

    def abandon(self) -> None:
        """Withdraw the request; a reply that comes is dropped unseen. Idempotent."""
        ticket, self._ticket = self._ticket, None
        if ticket is not None:
            ffi.release(ticket)     # the gc callback, shmkey_abandon, runs now


def connect(name: str, *, transport: Optional[str] = None, timeout_ms: Optional[int] = None,
            oracle_user: Union[str, int, None] = None) -> OracleClient:
    """Connect to a running ``shmkey serve --name NAME``.

    Args:
        name: the oracle's name.
        transport: ``"shm"`` or ``"socketpair"``; by default what the oracle offers.
        timeout_ms: per-request timeout; ``SHMKEY_TIMEOUT_MS`` by default.
        oracle_user: the user the oracle runs as (name or uid), if not ours
            or root: the only others trusted.

    Raises:
        OracleUnavailableError: no oracle of that name is running.
        OracleIdentityError: the process on its socket runs as another user.
        ConfigError: no such ``oracle_user``.
    """
    cfg = Config.load(timeout_ms=timeout_ms)
    uid = None if oracle_user is None else names.user_id(oracle_user)
    path = names.find_socket(name, cfg.runtime_dir)
    return OracleClient.open(path=str(path), transport=transport, oracle_uid=uid,
                             timeout_ms=cfg.timeout_ms, name=name)

"""The oracle's audit log: a line per client connection and disconnection
(pid, uid, process name, and its totals when it goes), a summary per key
each minute while there is traffic, and refusals (policy, rate limit) at
most once a minute per client and kind. Never a line per operation.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

from .. import names
from .._binding import ffi, lib
from .stats import Meter, Region

log = logging.getLogger("shmkey.oracle")

SUMMARY_INTERVAL = 60.0     # seconds between per-key summary lines
REFUSAL_INTERVAL = 60.0     # seconds between refusal lines of one client and kind
_EVENTS = 256               # drained per call


def _who(pid: int, uid: int, process: str) -> str:
    return f"pid {pid}, uid {uid} ({names.user_name(uid)}), process {process or '?'}"


class Audit:
    """One worker process's audit: connection lines and throttled refusal lines."""

    def __init__(self, srv: Any, meter: Meter,
                 on_close: Callable[[int], None] = lambda serial: None) -> None:
        self._srv = srv
        self._meter = meter
        self._on_close = on_close
        self._events = ffi.new("struct shmkey_conn_event[]", _EVENTS)
        self._dropped = ffi.new("uint64_t *")
        self._refusals: dict[tuple[int, str], list[float]] = {}   # -> [last logged, unlogged]

    def poll(self) -> None:
        """Log the connections that came and went since the last call."""
        while True:
            n = lib.shmkey_server_events(self._srv, self._events, _EVENTS, self._dropped)
            if self._dropped[0]:
                log.warning("audit: %d connection events lost (more than %d queued)",
                            self._dropped[0], lib.SHMKEY_MAX_EVENTS)
            for i in range(n):
                e = self._events[i]
                if e.kind == lib.SHMKEY_CONN_OPENED:
                    self._opened(e)
                else:
                    self._closed(e)
            if n < _EVENTS:
                return

    def _opened(self, e: Any) -> None:
        transport = "shm" if e.transport == lib.SHMKEY_TRANSPORT_SHM else "socketpair"
        with self._meter.lock:
            self._meter.client(e.serial, e.pid, e.uid, e.transport, ffi.string(e.comm))
        log.info("client connected: %s, %s (connection %x)",
                 _who(e.pid, e.uid, self._meter.process_of(e.serial)), transport, e.serial)

    def _closed(self, e: Any) -> None:
        totals = self._meter.close_client(e.serial)
        self._on_close(e.serial)
        for key in [k for k in self._refusals if k[0] == e.serial]:
            del self._refusals[key]
        if totals is None:
            log.info("client disconnected: %s (connection %x)", _who(e.pid, e.uid, "?"), e.serial)
            return
        log.info("client disconnected: %s (connection %x) after %.1f s: %d operations, "
                 "%d refused by policy, %d rate-limited, %d errors",
                 _who(totals.pid, totals.uid, totals.process), e.serial,
                 time.time() - totals.since, totals.operations, totals.refused,
                 totals.rate_limited, totals.errors)

    def refused(self, kind: str, serial: int, pid: int, uid: int, why: str) -> None:
        """Log a refusal, at most once a minute per client connection and kind,
        saying how many went unlogged since."""
        now = time.monotonic()
        state = self._refusals.get((serial, kind))
        if state is not None and now - state[0] < REFUSAL_INTERVAL:
            state[1] += 1
            return
        more = f" ({int(state[1])} more since the last such line)" if state and state[1] else ""
        self._refusals[(serial, kind)] = [now, 0]
        log.warning("%s: %s (connection %x): %s%s", kind,
                    _who(pid, uid, self._meter.process_of(serial)), serial, why, more)


class Summary:
    """The per-key line each minute, from the main process, over every worker's counts."""

    def __init__(self, region: Region, describe: Callable[[], list[tuple[str, str, int]]]) -> None:
        self._region = region
        self._describe = describe         # () -> [(key id hex, type, row)]
        self._last: dict[int, list[int]] = {}
        self._next = time.monotonic() + SUMMARY_INTERVAL

    def tick(self, now: Optional[float] = None) -> None:
        """Log a line per key whose counts moved, once a minute."""
        now = time.monotonic() if now is None else now
        if now < self._next:
            return
        self._next = now + SUMMARY_INTERVAL
        for kid, kind, slot in self._describe():
            row = self._region.key_totals(slot)
            counts = row[:5]
            last = self._last.get(slot, [0] * 5)
            if counts == last:
                continue
            self._last[slot] = counts
            d = [a - b for a, b in zip(counts, last)]
            log.info("key %s (%s) in the last minute: %d signs, %d decrypts, %d refused by "
                     "policy, %d rate-limited, %d errors", kid[:16], kind, *d)


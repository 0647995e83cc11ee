"""The oracle's counters: per key and per client connection, in one anonymous
shared mapping made before any worker process forks, so that whichever
process answers a status request reads every process's numbers.

Each worker process writes only its own rows; readers add the rows up. Counts
are added atomically, in C (csrc/stats.c), since a key's row is written both
by Python and by the workers that sign in C. Latency is a histogram of the
time a request spends in the handler (policy checks and the math), in
buckets an eighth of an octave wide (the rule is C's too).
"""
from __future__ import annotations

import mmap
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from .._binding import ffi, lib

MAX_KEYS = 32           # key ids over the oracle's life, reloads included
MAX_CLIENTS = 1024      # rows per worker process: SHMKEY_MAX_CONNS
KEY_ID_LEN = 32
_COMM_LEN = 16          # a process name as /proc/PID/comm has it

# Histogram bucket i holds latencies up to BOUNDS_NS[i]; the last bucket has no bound.
BOUNDS_NS: tuple[int, ...] = tuple(int(lib.shmkey_stats_bound_ns(i))
                                   for i in range(lib.SHMKEY_STAT_BOUNDS))
_NBUCKETS = len(BOUNDS_NS) + 1

# Key row (shmkey.h's SHMKEY_STAT_*): counters, then the latency sum and histogram.
SIGNS: int = lib.SHMKEY_STAT_SIGNS
SIGNS_IN_C: int = lib.SHMKEY_STAT_SIGNS_IN_C        # of SIGNS, those csrc/signer.c made
DECRYPTS: int = lib.SHMKEY_STAT_DECRYPTS
REFUSED_POLICY: int = lib.SHMKEY_STAT_REFUSED_POLICY
REFUSED_RATE: int = lib.SHMKEY_STAT_REFUSED_RATE
ERRORS: int = lib.SHMKEY_STAT_ERRORS
LATENCY_SUM_NS: int = lib.SHMKEY_STAT_LATENCY_SUM_NS
_HIST: int = lib.SHMKEY_STAT_HIST
_KEY_WORDS = _HIST + _NBUCKETS
# Client row: who, since when, what it did (SHMKEY_CSTAT_*); the process name in the last two words.
_C_SERIAL, _C_PID, _C_UID, _C_SINCE_MS, _C_TRANSPORT = range(5)
_C_OPS: int = lib.SHMKEY_CSTAT_OPS
_C_REFUSED: int = lib.SHMKEY_CSTAT_REFUSED
_C_ERRORS: int = lib.SHMKEY_CSTAT_ERRORS
_C_LIMITED: int = lib.SHMKEY_CSTAT_LIMITED
_C_COMM = _C_LIMITED + 1
_CLIENT_WORDS = _C_COMM + _COMM_LEN // 8
_HEAD_WORDS = 8         # the oracle's own counters: [0] worker restarts
_PROC_WORDS = MAX_KEYS * _KEY_WORDS + MAX_CLIENTS * _CLIENT_WORDS


@dataclass
class ClientTotals:
    """One client connection's counts, as its disconnection line and status show them."""

    serial: int
    pid: int
    uid: int
    process: str
    transport: str
    since: float
    operations: int = 0
    refused: int = 0
    rate_limited: int = 0
    errors: int = 0


class Region:
    """The shared mapping: a table of key ids, then one block of rows per worker process."""

    def __init__(self, nprocs: int) -> None:
        self.nprocs = nprocs
        self._ids_len = MAX_KEYS * KEY_ID_LEN
        head = self._ids_len + 8 * _HEAD_WORDS
        self._map = mmap.mmap(-1, head + nprocs * _PROC_WORDS * 8)
        self._ids = memoryview(self._map)[:self._ids_len]
        self._head = memoryview(self._map)[self._ids_len:head].cast("Q")
        self.words = memoryview(self._map)[head:].cast("Q")
        self.ptr: Any = ffi.from_buffer("uint64_t[]", self.words)     # the same words, for C

    @property
    def restarts(self) -> int:
        """Worker processes replaced after dying (written by the main process)."""
        return int(self._head[0])

    def count_restart(self) -> None:
        """One more worker process replaced."""
        self._head[0] += 1

    def key_slots(self) -> dict[bytes, int]:
        """Every key id given a row so far, and its row."""
        out = {}
        for i in range(MAX_KEYS):
            kid = bytes(self._ids[i * KEY_ID_LEN:(i + 1) * KEY_ID_LEN])
            if kid == bytes(KEY_ID_LEN):
                break
            out[kid] = i
        return out

    def add_keys(self, key_ids: list[bytes]) -> None:
        """Give rows to key ids that have none; called by the main process only,
        before workers fork and before they reload."""
        known = self.key_slots()
        for kid in key_ids:
            if kid in known:
                continue
            if len(known) == MAX_KEYS:
                raise ValueError(f"an oracle counts at most {MAX_KEYS} distinct keys")
            i = len(known)
            self._ids[i * KEY_ID_LEN:(i + 1) * KEY_ID_LEN] = kid
            known[kid] = i

    def key_row(self, proc: int, slot: int) -> int:
        return proc * _PROC_WORDS + slot * _KEY_WORDS

    def client_row(self, proc: int, index: int) -> int:
        return proc * _PROC_WORDS + MAX_KEYS * _KEY_WORDS + index * _CLIENT_WORDS

    def key_totals(self, slot: int) -> list[int]:
        """A key's row summed over every worker process."""
        total = [0] * _KEY_WORDS
        w = self.words
        for proc in range(self.nprocs):
            base = self.key_row(proc, slot)
            row = w[base:base + _KEY_WORDS]
            for i, v in enumerate(row):
                total[i] += v
        return total

    def clients(self) -> list[ClientTotals]:
        """Every connected client of every worker process."""
        out = []
        for proc in range(self.nprocs):
            for i in range(MAX_CLIENTS):
                totals = self.client_at(self.client_row(proc, i))
                if totals is not None:
                    out.append(totals)
        return out

    def client_at(self, base: int) -> Optional[ClientTotals]:
        w = self.words
        serial = w[base + _C_SERIAL]
        if not serial:
            return None
        comm = w[base + _C_COMM:base + _CLIENT_WORDS].tobytes().rstrip(b"\0")
        return ClientTotals(serial=serial, pid=w[base + _C_PID], uid=w[base + _C_UID],
                            process=comm.decode("utf-8", "replace"),
                            transport={1: "shm", 2: "socketpair"}.get(w[base + _C_TRANSPORT], "?"),
                            since=w[base + _C_SINCE_MS] / 1000, operations=w[base + _C_OPS],
                            refused=w[base + _C_REFUSED], rate_limited=w[base + _C_LIMITED],
                            errors=w[base + _C_ERRORS])


def percentile_us(hist: list[int], q: float) -> Optional[float]:
    """The upper bound of the bucket holding quantile ``q`` of a histogram, in us
    (None when empty); within an eighth of an octave (9%) of the true value."""
    n = sum(hist)
    if not n:
        return None
    rank = max(1, int(q * n + 0.999999))
    seen = 0
    for i, count in enumerate(hist):
        seen += count
        if seen >= rank:
            return round(BOUNDS_NS[min(i, len(BOUNDS_NS) - 1)] / 1000, 1)
    return None


def histogram(row: list[int]) -> list[int]:
    """The latency buckets of a key row."""
    return row[_HIST:_HIST + _NBUCKETS]


def _process_name(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read(_COMM_LEN).rstrip(b"\n")[:_COMM_LEN]
    except OSError:
        return b"?"


class Meter:
    """One worker process's writer of its rows."""

    def __init__(self, region: Region, proc: int) -> None:
        self.region = region
        self.proc = proc
        self.lock = threading.Lock()
        self.slots = region.key_slots()
        self._clients: dict[int, int] = {}      # serial -> row
        self._free = list(range(MAX_CLIENTS - 1, -1, -1))
        self._closed: dict[int, None] = {}      # recently closed serials: not to be revived

    def refresh_keys(self) -> None:
        """Pick up rows the main process gave to new keys (after a reload)."""
        with self.lock:
            self.slots = self.region.key_slots()

    def client(self, serial: int, pid: int, uid: int, transport: int = 0,
               comm: Optional[bytes] = None) -> int:
        """The row of a connection (under ``lock``), made on first sight (its
        opening event or first request, whichever comes first); -1 once it
        closed or with no row left.

        Args:
            transport: SHMKEY_TRANSPORT_SHM or _SOCKET when known (the opening event), else 0.
            comm: the process name read when it connected; else read now.
        """
        row = self._clients.get(serial)
        if row is not None:
            if transport:
                w = self.region.words
                w[row + _C_TRANSPORT] = transport
                if comm:
                    w[row + _C_COMM:row + _CLIENT_WORDS] = \
                        memoryview(comm[:_COMM_LEN].ljust(_COMM_LEN, b"\0")).cast("Q")
            return row
        if serial in self._closed or not self._free:
            return -1
        row = self.region.client_row(self.proc, self._free.pop())
        w = self.region.words
        for i in range(_CLIENT_WORDS):
            w[row + i] = 0
        comm = (_process_name(pid) if comm is None else comm[:_COMM_LEN]).ljust(_COMM_LEN, b"\0")
        w[row + _C_COMM:row + _CLIENT_WORDS] = memoryview(comm).cast("Q")
        w[row + _C_PID], w[row + _C_UID] = pid, uid
        w[row + _C_SINCE_MS] = int(time.time() * 1000)
        w[row + _C_TRANSPORT] = transport
        w[row + _C_SERIAL] = serial         # last: readers skip rows without one
        self._clients[serial] = row
        return row

    def process_of(self, serial: int) -> str:
        """The process name of a connection's client, "?" when it has no row."""
        row = self._clients.get(serial)
        totals = self.region.client_at(row) if row is not None else None
        return totals.process if totals else "?"

    def close_client(self, serial: int) -> Optional[ClientTotals]:
        """Free a closed connection's row; its totals, if it had one."""
        with self.lock:
            self._closed[serial] = None
            if len(self._closed) > 4 * MAX_CLIENTS:
                for old in list(self._closed)[:MAX_CLIENTS]:
                    del self._closed[old]
            row = self._clients.pop(serial, None)
            if row is None:
                return None
            totals = self.region.client_at(row)
            self.region.words[row + _C_SERIAL] = 0
            self._free.append((row - self.region.client_row(self.proc, 0)) // _CLIENT_WORDS)
            return totals

    def record(self, slot: int, client_row: int, outcome: int, elapsed_ns: int) -> None:
        """Count one private-key request of key row ``slot`` (under ``lock``).

        Args:
            outcome: SIGNS, DECRYPTS, REFUSED_POLICY, REFUSED_RATE or ERRORS.
            elapsed_ns: time in the handler; 0 for a request refused before it.
        """
        lib.shmkey_stats_record(self.key_ptr(slot), self.client_ptr(client_row), outcome,
                                elapsed_ns)

    def key_ptr(self, slot: int) -> Any:
        """Key row ``slot`` of this process, for C."""
        return self.region.ptr + self.region.key_row(self.proc, slot)

    def client_ptr(self, client_row: int) -> Any:
        """A client row of :meth:`client`, for C (NULL for -1)."""
        return self.region.ptr + client_row if client_row >= 0 else ffi.NULL


"""Between a worker's copied request and the handler: status requests
answered, rate limits applied, every private-key request counted and timed
(``stats``), refusals reported to the audit. It also hands the keys that no
rate limit applies to to the C workers (csrc/signer.c), which make the
common signatures without coming here once a connection has its counters:
file keys, and token keys with the session Python opened for them.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from cryptography.hazmat.primitives import serialization

from .. import _wire
from .._binding import ffi, lib
from .audit import Audit
from .handler import Handler
from .limits import Bucket
from .pkcs11 import TokenHeld
from .stats import DECRYPTS, ERRORS, REFUSED_POLICY, REFUSED_RATE, SIGNS, Meter

log = logging.getLogger("shmkey.oracle")

_PRIVATE_OPS = (lib.SHMKEY_OP_SIGN, lib.SHMKEY_OP_DECRYPT)


@dataclass(frozen=True)
class KeySet:
    """What the workers serve now; replaced whole on a reload."""

    handler: Handler
    ids: list[bytes]                    # key ids, first key first
    kinds: list[str]                    # "RSA-2048", "EC secp256r1", "Ed25519"
    rates: dict[bytes, float]           # key id -> operations per second per connection

    def slots(self, meter: Meter) -> dict[bytes, int]:
        """Request key id (all zeros too) -> the key's row in the counters."""
        out = {kid: meter.slots[kid] for kid in self.ids if kid in meter.slots}
        if self.ids and self.ids[0] in out:
            out[_wire.DEFAULT_KEY] = out[self.ids[0]]
        return out


class Dispatcher:
    """One worker process's front of the handler."""

    def __init__(self, keys: KeySet, meter: Meter, status: Callable[[], dict[str, Any]],
                 chunk: int, srv: Any = None, tokens_in_c: bool = False) -> None:
        """``tokens_in_c``: C may call the token keys' modules too (see Oracle._front)."""
        self.meter = meter
        self._srv = srv                                 # the C server whose workers sign too
        self._tokens_in_c = tokens_in_c
        self._counted: set[int] = set()                 # connections C counts for itself
        # A reload (another thread) replaces the signer; this thread updates its sessions.
        self._lock = threading.Lock()
        self._tokens: list[tuple[bytes, TokenHeld]] = []   # the token keys of the C signer
        self._given: dict[bytes, Optional[tuple[int, int]]] = {}  # their handles C has
        self.audit: Optional[Audit] = None
        self._status = status
        self._chunk = chunk
        self._snapshots: dict[int, bytes] = {}      # connection -> its status document
        self._buckets: dict[tuple[int, int], Bucket] = {}
        self._state: tuple[KeySet, dict[bytes, int], dict[int, float]] = (keys, {}, {})
        self.use(keys)

    def use(self, keys: KeySet) -> None:
        """Serve ``keys`` from the next request on (a reload)."""
        self.meter.refresh_keys()
        slots = keys.slots(self.meter)
        self._state = (keys, slots, {slots[kid]: r for kid, r in keys.rates.items() if kid in slots})
        if self._srv is not None:
            with self._lock:
                lib.shmkey_server_use_signer(self._srv, self._signer(keys))

    def _signer(self, keys: KeySet) -> Any:
        """The C signer of ``keys``' file keys without a rate limit, and of their
        token keys if C may call them (NULL: none). Its token keys have no
        session yet: C leaves them to Python until :meth:`_give_sessions`."""
        signer = lib.shmkey_signer_new()
        self._tokens, self._given = [], {}
        if signer == ffi.NULL:
            return ffi.NULL
        slots = self.meter.slots

        def unlimited(pairs: list[tuple[bytes, Any]]) -> list[tuple[bytes, Any, int, Any]]:
            return [(kid, key, int(kid == keys.ids[0]), self.meter.key_ptr(slots[kid]))
                    for kid, key in pairs if kid not in keys.rates and kid in slots]

        for kid, key, default, row in unlimited(keys.handler.file_keys()):
            der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            # C wipes these bytes in place once parsed: no copy of the key is left behind.
            lib.shmkey_signer_add(signer, kid, ffi.from_buffer("uint8_t[]", der), len(der),
                                  default, row)
        if self._tokens_in_c:
            for kid, key, default, row in unlimited(keys.handler.token_keys()):
                kind, sig_len = key.c_signer()
                rc = lib.shmkey_signer_add_token(signer, kid, os.fsencode(key.source.module_path),
                                                 kind, sig_len, default, row)
                if rc == lib.SHMKEY_OK:
                    self._tokens.append((kid, key))
                else:       # it still works, through Python: say why it is slower
                    log.info("token key %s signs through Python, not in C (status %d: more "
                             "than 32 keys, a signature over 1024 bytes, or the module would not "
                             "load in C)", kid.hex()[:16], rc)
        return signer

    def _give_sessions(self) -> None:
        """Tell C the session and key object each token key uses in this thread
        now, where they changed since C was told: a session opened, re-opened
        or lost, the module finalized. None (0, 0): C leaves the key to Python,
        which opens one again. Runs after every private request Python served,
        so C never signs with handles Python has let go of."""
        with self._lock:
            for kid, key in self._tokens:
                now = key.source.handles()
                if now != self._given.get(kid):
                    session, obj = now or (0, 0)
                    lib.shmkey_server_token_session(self._srv, kid, session, obj)
                    self._given[kid] = now

    @property
    def keys(self) -> KeySet:
        """The keys served now."""
        return self._state[0]

    def forget(self, serial: int) -> None:
        """A connection closed: drop its status document and buckets."""
        self._snapshots.pop(serial, None)
        self._counted.discard(serial)
        for key in [k for k in self._buckets if k[0] == serial]:
            del self._buckets[key]

    def serve(self, work: Any, key_id: bytes, p: _wire.Params, payload: bytes) -> tuple[int, bytes]:
        """Answer one copied request; never raises."""
        keys, slots, rates = self._state
        op = work.req.op
        slot = slots.get(key_id) if op in _PRIVATE_OPS else None
        if slot is None:
            if op == lib.SHMKEY_OP_STATUS:
                return self._status_part(work.conn_serial, p[0])
            return keys.handler.handle(op, key_id, p, payload)
        meter, serial = self.meter, work.conn_serial
        rate = rates.get(slot)
        if rate is not None:
            now = time.monotonic()
            with meter.lock:
                row = meter.client(serial, work.peer_pid, work.peer_uid)
                bucket = self._buckets.get((serial, slot))
                if bucket is None:
                    bucket = self._buckets[(serial, slot)] = Bucket(rate, now)
                allowed = bucket.take(now)
                if not allowed:
                    meter.record(slot, row, REFUSED_RATE, 0)
            if not allowed:
                kid = keys.ids[0] if key_id == _wire.DEFAULT_KEY else key_id
                self._refused("rate limit", work, f"more than {rate:g} operations per second "
                              f"with key {kid.hex()[:16]}")
                return lib.SHMKEY_ERATELIMIT, (f"more than {rate:g} operations per second "
                                               "on this connection").encode()
        t0 = time.perf_counter_ns()
        status, out = keys.handler.handle(op, key_id, p, payload)
        elapsed = time.perf_counter_ns() - t0
        if self._tokens:
            self._give_sessions()
        if status == lib.SHMKEY_OK:
            outcome = SIGNS if op == lib.SHMKEY_OP_SIGN else DECRYPTS
        else:
            outcome = REFUSED_POLICY if status == lib.SHMKEY_EPOLICY else ERRORS
        with meter.lock:
            row = meter.client(serial, work.peer_pid, work.peer_uid)
            meter.record(slot, row, outcome, elapsed)
        if row >= 0 and self._srv is not None and serial not in self._counted:
            self._counted.add(serial)
            lib.shmkey_server_count_client(self._srv, work, meter.client_ptr(row))
        if outcome == REFUSED_POLICY:
            self._refused("refused by policy", work, out.decode("utf-8", "replace"))
        return status, out

    def _refused(self, kind: str, work: Any, why: str) -> None:
        if self.audit is not None:
            self.audit.refused(kind, work.conn_serial, work.peer_pid, work.peer_uid, why)

    def _status_part(self, serial: int, offset: int) -> tuple[int, bytes]:
        """The status document from ``offset``, a slot at a time; made afresh at offset 0,
        so the parts a client reads in a row are of one document."""
        if offset == 0:
            self._snapshots[serial] = json.dumps(self._status(), separators=(",", ":")).encode()
        doc = self._snapshots.get(serial)
        if doc is None:
            return lib.SHMKEY_EINVAL, b"ask for the status from offset 0 first"
        return lib.SHMKEY_OK, doc[offset:offset + self._chunk]


"""The non-blocking calls: submit a request, wait on its descriptor, collect
or abandon it. Replies match their own request only; abandoned and timed-out
requests give their slot back; a stopped or killed oracle is a clear error."""
from __future__ import annotations

import os
import select
import signal
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

import shmkey
from shmkey._binding import lib
from shmkey.client.connection import Pending

from .test_faults import sigstop, wait_until


def collect(p: Pending, timeout: float = 10.0) -> bytes:
    """Wait on the ticket's descriptor as an event loop would, then collect."""
    deadline = time.monotonic() + timeout
    while True:
        got = p.collect()
        if got is not None:
            return got
        assert time.monotonic() < deadline, "no reply in time"
        select.select([p.fd], [], [], 0.5)


def echo(client: shmkey.OracleClient, data: bytes, timeout_ms: int | None = None) -> Pending:
    p = client.submit(lib.SHMKEY_OP_PING, payload=data, timeout_ms=timeout_ms)
    assert p is not None
    return p


def test_many_in_flight_each_gets_its_own_reply(rsa2048: Path) -> None:
    with shmkey.KeyOracle(rsa2048, transport="shm", workers=2) as oracle:
        client = oracle.client
        client.ping()
        n = client.slots()
        assert n >= 2
        sent = [os.urandom(32) for _ in range(n)]
        pending = [echo(client, d) for d in sent]
        assert client.submit(lib.SHMKEY_OP_PING) is None, "more requests than slots"
        assert len({p.fd for p in pending}) == n, "one descriptor per request"
        for p, d in reversed(list(zip(pending, sent))):
            assert collect(p) == d
        assert client.free_slots() == n
        key = oracle.private_key()
        msg = os.urandom(40)
        digest = hashes.Hash(hashes.SHA256())
        digest.update(msg)
        params = (lib.SHMKEY_PAD_PKCS1V15, lib.SHMKEY_HASH_SHA256, 0, 0)
        p = client.submit(lib.SHMKEY_OP_SIGN, params, digest.finalize(), key_id=key.key_id)
        assert p is not None
        key.public_key().verify(collect(p), msg, padding.PKCS1v15(), hashes.SHA256())
        with pytest.raises(shmkey.InvalidArgumentError):
            p.collect()


def test_abandoned_requests_free_their_slots_and_never_answer_another(rsa4096: Path) -> None:
    """Abandoned while queued, while a worker signs (slow RSA-4096), or after
    the reply came: each slot comes back, and the next use of it gets its own reply."""
    with shmkey.KeyOracle(rsa4096, transport="shm", workers=1) as oracle:
        client = oracle.client
        key = oracle.private_key()
        n = client.slots()
        params = (lib.SHMKEY_PAD_PKCS1V15, lib.SHMKEY_HASH_SHA256, 0, 0)
        for _ in range(3):
            pending = [client.submit(lib.SHMKEY_OP_SIGN, params, os.urandom(32),
                                     key_id=key.key_id) for _ in range(n)]
            assert all(p is not None for p in pending)
            time.sleep(0.005)
            for p in pending:
                assert p is not None
                p.abandon()
                p.abandon()
            assert wait_until(lambda: client.free_slots() == n)
            sent = [os.urandom(16) for _ in range(n)]
            again = [echo(client, d) for d in sent]
            assert [collect(p) for p in again] == sent
        done = echo(client, b"late")
        select.select([done.fd], [], [], 5)
        done.abandon()
        assert client.free_slots() == n
        assert collect(echo(client, b"next")) == b"next"


def test_timeout_withdraws_and_a_late_reply_is_never_seen(rsa2048: Path) -> None:
    with shmkey.KeyOracle(rsa2048, transport="shm", workers=1) as oracle:
        client = oracle.client
        client.ping()
        assert oracle.pid is not None
        sigstop(oracle.pid)
        try:
            p = echo(client, b"stale", timeout_ms=200)
            started = time.monotonic()
            with pytest.raises(shmkey.OracleTimeoutError):
                while p.collect() is None:
                    select.select([p.fd], [], [], 0.05)
            assert time.monotonic() - started < 2
        finally:
            os.kill(oracle.pid, signal.SIGCONT)
        n = client.slots()
        assert wait_until(lambda: client.free_slots() == n)
        for i in range(2 * n):
            data = b"fresh-%d" % i
            assert collect(echo(client, data)) == data


def test_killed_oracle_makes_pending_requests_fail_at_once(rsa2048: Path) -> None:
    with shmkey.KeyOracle(rsa2048, transport="shm", workers=1, timeout_ms=60000) as oracle:
        client = oracle.client
        client.ping()
        assert oracle.pid is not None
        sigstop(oracle.pid)
        pending = [echo(client, b"x") for _ in range(4)]
        os.kill(oracle.pid, signal.SIGKILL)
        started = time.monotonic()
        for p in pending:
            assert select.select([p.fd], [], [], 5)[0] == [p.fd]
            with pytest.raises(shmkey.OracleUnavailableError):
                p.collect()
        assert time.monotonic() - started < 5


def test_socket_transport_has_no_tickets(rsa2048: Path) -> None:
    with shmkey.KeyOracle(rsa2048, transport="socketpair", workers=1) as oracle:
        with pytest.raises(shmkey.UnsupportedOperationError):
            oracle.client.submit(lib.SHMKEY_OP_PING)

"""asyncio on the oracle's keys: asign and adecrypt never block the loop,
many are in flight from one loop, each gets its own answer, cancelling
withdraws the request, and a stopped or killed oracle is a clear error."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

import shmkey

from .conftest import TRANSPORTS
from .test_faults import sigstop, wait_until

PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_many_in_flight_from_one_loop(rsa2048: Path, transport: str) -> None:
    """100 signatures and 100 decryptions at once (more than the ring's
    slots), each of its own message: a crossed reply fails its check."""
    with shmkey.KeyOracle(rsa2048, transport=transport, workers=2) as oracle:
        key = oracle.private_key()
        pub = key.public_key()

        async def one(i: int) -> None:
            msg = os.urandom(16) + i.to_bytes(4, "big")
            pub.verify(await key.asign(msg, PSS, hashes.SHA256()), msg, PSS, hashes.SHA256())
            assert await key.adecrypt(pub.encrypt(msg, OAEP), OAEP) == msg

        async def main() -> None:
            await asyncio.gather(*(one(i) for i in range(100)))

        asyncio.run(main())
        if transport == "shm":
            assert oracle.client.free_slots() == oracle.client.slots()


def test_the_loop_runs_while_the_oracle_is_stopped(rsa2048: Path) -> None:
    """With the oracle SIGSTOPped, a pending asign leaves the loop free
    (ticks keep coming), and completes after SIGCONT."""
    with shmkey.KeyOracle(rsa2048, transport="shm", workers=1, timeout_ms=10000) as oracle:
        key = oracle.private_key()
        key.ping()
        assert oracle.pid is not None

        async def main() -> int:
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            t = asyncio.get_running_loop().create_task(ticker())
            sigstop(oracle.pid)
            task = asyncio.ensure_future(key.asign(b"held", PSS, hashes.SHA256()))
            await asyncio.sleep(0.5)
            assert not task.done()
            os.kill(oracle.pid, signal.SIGCONT)
            sig = await asyncio.wait_for(task, 5)
            key.public_key().verify(sig, b"held", PSS, hashes.SHA256())
            t.cancel()
            return ticks

        assert asyncio.run(main()) >= 20


def test_cancel_withdraws_and_never_crosses(rsa4096: Path) -> None:
    """Cancelled while queued, while a worker signs, or with the oracle
    stopped: every slot comes back and later calls get their own answers."""
    with shmkey.KeyOracle(rsa4096, transport="shm", workers=1, timeout_ms=10000) as oracle:
        key = oracle.private_key()
        pub = key.public_key()
        key.ping()
        n = oracle.client.slots()
        assert oracle.pid is not None

        async def main() -> None:
            tasks = [asyncio.ensure_future(key.asign(b"x%d" % i, PSS, hashes.SHA256()))
                     for i in range(2 * n)]
            await asyncio.sleep(0.01)
            for t in tasks:
                t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert any(isinstance(r, asyncio.CancelledError) for r in results)
            sigstop(oracle.pid)
            stopped = asyncio.ensure_future(key.asign(b"stopped", PSS, hashes.SHA256()))
            await asyncio.sleep(0.1)
            stopped.cancel()
            with pytest.raises(asyncio.CancelledError):
                await stopped
            os.kill(oracle.pid, signal.SIGCONT)
            for i in range(n + 2):
                msg = b"after-%d" % i
                pub.verify(await key.asign(msg, PSS, hashes.SHA256()), msg, PSS, hashes.SHA256())

        asyncio.run(main())
        assert wait_until(lambda: oracle.client.free_slots() == n)


def test_timeout_and_killed_oracle(rsa2048: Path) -> None:
    with shmkey.KeyOracle(rsa2048, transport="shm", workers=1, timeout_ms=300) as oracle:
        key = oracle.private_key()
        key.ping()
        assert oracle.pid is not None

        async def main() -> None:
            sigstop(oracle.pid)
            started = time.monotonic()
            with pytest.raises(shmkey.OracleTimeoutError):
                await key.asign(b"late", PSS, hashes.SHA256())
            assert time.monotonic() - started < 3
            pending = [asyncio.ensure_future(key.asign(b"k", PSS, hashes.SHA256()))
                       for _ in range(4)]
            await asyncio.sleep(0.05)
            os.kill(oracle.pid, signal.SIGKILL)
            for r in await asyncio.gather(*pending, return_exceptions=True):
                assert isinstance(r, shmkey.OracleUnavailableError), r

        asyncio.run(main())


def test_coroutines_beyond_the_slots_take_turns(rsa2048: Path) -> None:
    """Four times as many coroutines as slots, each signing again as soon as
    it has its answer: a freed slot goes to the one waiting longest, not
    back to the coroutine that just freed it (which would keep the same few
    signing while the rest waited for a retry that usually lost too)."""
    with shmkey.KeyOracle(rsa2048, transport="shm", workers=2, timeout_ms=30000) as oracle:
        key = oracle.private_key()
        key.ping()
        n = 4 * oracle.client.slots()
        enough = 12
        counts = [0] * n

        async def one(i: int) -> None:
            while max(counts) < enough:
                await key.asign(b"turn %d" % i, PSS, hashes.SHA256())
                counts[i] += 1

        async def main() -> None:
            await asyncio.gather(*(one(i) for i in range(n)))

        asyncio.run(main())
    assert min(counts) >= enough // 2, counts


def test_one_loop_across_an_oracle_restart(rsa2048: Path) -> None:
    """The loop keeps running while the oracle is killed and started again
    under its name: calls in between fail cleanly, later ones use the new
    ring, whose descriptors may reuse the numbers of the old one's; and the
    loop's own selector never held a ring's descriptor, so sockets that get
    those numbers now register with it as any other."""
    from ._tls import Serve
    serve = Serve(rsa2048, "shm").start()
    try:
        key = shmkey.connect(serve.name, oracle_user=serve.user).private_key()
        pub = key.public_key()

        async def signs(tag: bytes, n: int) -> None:
            msgs = [tag + b"%d" % i for i in range(n)]
            sigs = await asyncio.gather(*(key.asign(m, PSS, hashes.SHA256()) for m in msgs))
            for m, sig in zip(msgs, sigs):
                pub.verify(sig, m, PSS, hashes.SHA256())

        async def main() -> None:
            await signs(b"before", 40)
            # The new ring is made before the old one is let go: the third
            # ring gets the first one's numbers.
            for restart in range(2):
                assert serve.proc is not None
                serve.proc.kill()
                serve.proc.wait()
                with pytest.raises(shmkey.OracleUnavailableError):
                    await key.asign(b"down", PSS, hashes.SHA256())
                loop = asyncio.get_running_loop()
                pairs = [socket.socketpair() for _ in range(24)]
                try:
                    for a, _ in pairs:
                        loop.add_reader(a.fileno(), lambda: None)
                    for a, _ in pairs:
                        loop.remove_reader(a.fileno())
                finally:
                    for a, b in pairs:
                        a.close()
                        b.close()
                serve.start()
                await signs(b"after %d:" % restart, 40)

        asyncio.run(main())
    finally:
        serve.stop()

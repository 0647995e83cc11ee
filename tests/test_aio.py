"""asyncio on the oracle's keys: asign and adecrypt never block the loop,
many are in flight from one loop, each gets its own answer, cancelling
withdraws the request, and a stopped or killed oracle is a clear error."""
from __future__ import annotations

import asyncio
import os
import signal
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

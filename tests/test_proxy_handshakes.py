"""``shmkey.proxy.handshakes`` with real OpenSSL in memory: which step's output
is the server's first flight (after it, no step needs the key), also through
a HelloRetryRequest, for TLS 1.3 and 1.2; and the pool's threads hand each
step back to the loop that submitted it.
"""
from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Optional

import pytest

from shmkey.proxy.handshakes import HandshakePool, Step, run_step
from shmkey.tools import certs


@pytest.fixture(scope="module")
def cert_and_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    _, key, cert = certs.write_key_and_cert(tmp_path_factory.mktemp("handshakes"))
    return cert, key


class _Pair:
    """A client and a server over memory BIOs, the server stepped by run_step."""

    def __init__(self, cert: Path, key: Path, version: ssl.TLSVersion,
                 server_group: Optional[str] = None) -> None:
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(cert, key)
        if server_group:
            server_ctx.set_ecdh_curve(server_group)     # its only group
        client_ctx = ssl.create_default_context(cafile=str(cert))
        client_ctx.minimum_version = client_ctx.maximum_version = version
        self.c_in, self.c_out, self.s_in, self.s_out = (ssl.MemoryBIO() for _ in range(4))
        self.client = client_ctx.wrap_bio(self.c_in, self.c_out, server_hostname=certs.HOST)
        self.server = server_ctx.wrap_bio(self.s_in, self.s_out, server_side=True)

    def client_step(self) -> None:
        try:
            self.client.do_handshake()
        except ssl.SSLWantReadError:
            pass
        self.s_in.write(self.c_out.read())

    def server_step(self) -> Step:
        step = run_step(self.server, self.s_out, None)
        self.c_in.write(step.output)
        return step

    def steps(self) -> list[Step]:
        """The server's steps until both ends are done."""
        out = []
        for _ in range(6):
            self.client_step()
            out.append(self.server_step())
            if out[-1].done:
                self.client_step()
                return out
        raise AssertionError("the handshake did not finish")


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_the_first_flight_is_the_first_step(cert_and_key: tuple[Path, Path],
                                             version: ssl.TLSVersion) -> None:
    steps = _Pair(*cert_and_key, version).steps()
    assert [(s.keyless, s.done, s.error) for s in steps] == [(True, False, None),
                                                             (True, True, None)]


def test_a_hello_retry_request_is_not_the_first_flight(cert_and_key: tuple[Path, Path]) -> None:
    """The server's only group is P-384, the client's key share X25519: the
    server asks again, and signs only after the second ClientHello."""
    pair = _Pair(*cert_and_key, ssl.TLSVersion.TLSv1_3, server_group="secp384r1")
    steps = pair.steps()
    assert [(s.keyless, s.done) for s in steps] == [(False, False), (True, False), (True, True)]
    assert pair.client.version() == "TLSv1.3"


def test_a_failed_step_carries_its_alert(cert_and_key: tuple[Path, Path]) -> None:
    pair = _Pair(*cert_and_key, ssl.TLSVersion.TLSv1_3)
    pair.s_in.write(b"GET / HTTP/1.1\r\n\r\n")
    step = pair.server_step()
    assert step.error is not None and step.error.reason == "HTTP_REQUEST"
    assert step.key_error is None and not step.done and not step.keyless


def test_the_pool_hands_steps_back_to_its_loop(cert_and_key: tuple[Path, Path]) -> None:
    """Eight handshakes at once through two threads, each result on the loop."""
    async def main() -> list[list[Step]]:
        loop = asyncio.get_running_loop()
        pool = HandshakePool(2, loop)
        pool.start()

        async def one() -> list[Step]:
            pair, out = _Pair(*cert_and_key, ssl.TLSVersion.TLSv1_3), []
            while not out or not out[-1].done:
                pair.client_step()
                done: asyncio.Future[Step] = loop.create_future()
                pool.submit(pair.server, pair.s_out, None, done.set_result)
                out.append(await done)
                pair.c_in.write(out[-1].output)
            pair.client_step()
            assert pair.client.version() == "TLSv1.3"
            return out

        try:
            return await asyncio.gather(*(one() for _ in range(8)))
        finally:
            pool.stop()

    results = asyncio.run(asyncio.wait_for(main(), 30))
    assert len(results) == 8 and all(len(steps) == 2 for steps in results)
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError):
            HandshakePool(0, loop)
    finally:
        loop.close()

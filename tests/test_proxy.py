"""``shmkey proxy`` as an operator runs it, with real clients (curl, openssl
s_client, Python's ssl): TLS 1.2 and 1.3 through 4 workers to a backend, a
bounded load test, kill -9 of the oracle under load, SIGHUP, SIGTERM, limits,
bad arguments, and a memory scan of every proxy process. As root (CI), every
proxy runs as an operator would start it there: workers as nobody, sandboxed,
the oracle as daemon; so each test here is also one of the sandbox's.
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, Optional

import pytest
from cryptography.hazmat.primitives import serialization

from shmkey import names
from shmkey.tools import loadgen as _loadgen
from shmkey.tools.backend import Backend, body_for
from shmkey.tools import certs
from shmkey.tools.procfs import alive, children, stat_fields
from shmkey.tools.rig import ProxyProcess, privilege_args
from shmkey.tools.memscan import key_secrets, scan_process

from ._tls import HOST, Serve, curl, free_port, key_material, s_client
from .conftest import ours_in_shm, stale_sockets

@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return key_material(tmp_path_factory.mktemp("proxy"))


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    with Backend() as b:
        yield b


class RunningProxy(ProxyProcess):
    """``shmkey proxy`` to the test backend; :meth:`stop` checks it left nothing."""

    def __init__(self, material: SimpleNamespace, backend: Backend, *args: str,
                 cert: Optional[Path] = None, key: Optional[Path] = None,
                 key_args: Optional[list[str]] = None, wrapper: tuple[str, ...] = (),
                 privs: Optional[list[str]] = None) -> None:
        self.cafile = cert or material.cert
        self.owns_oracle = key_args is None and "inprocess" not in args
        self.owns_root = key_args is None
        if privs is None:
            privs = privilege_args(own_oracle=self.owns_oracle)
        key_args = key_args if key_args is not None else ["--key", str(key or material.key)]
        super().__init__(["--listen", f"127.0.0.1:{free_port()}", "--backend",
                          f"127.0.0.1:{backend.port}", "--cert", str(self.cafile), *key_args,
                          *privs, *args], wrapper=wrapper)
        self.root = self.root_dir()

    def ctx(self, version: Optional[str] = None) -> ssl.SSLContext:
        return _loadgen.client_context(str(self.cafile), version)

    def get(self, path: str = "/", version: Optional[str] = None) -> None:
        asyncio.run(_loadgen.request("127.0.0.1", self.port, self.ctx(version), HOST, path))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Stop it and check that it left nothing: processes, ring, socket, files."""
        pids = [self.pid, *children(self.pid)]
        assert super().stop(sig, timeout) == 0, "\n".join(self.lines)
        assert not [p for p in pids if alive(p)], "processes left running"
        if self.owns_oracle:
            assert self.oracle_name is not None
            assert not names.socket_path(self.oracle_name).exists()
        if self.owns_root and self.root is not None:
            assert not self.root.exists(), f"{self.root} left behind"
        assert not [line for line in self.lines if "Traceback" in line], "\n".join(self.lines)
        return 0


@pytest.fixture()
def start(material: SimpleNamespace, backend: Backend):
    started: list[RunningProxy] = []

    def run(*args: str, **kw: object) -> RunningProxy:
        proxy = RunningProxy(material, backend, *args, **kw)  # type: ignore[arg-type]
        started.append(proxy)
        return proxy

    yield run
    for proxy in started:
        if proxy.proc.poll() is None:
            proxy.stop()


@pytest.fixture(scope="module")
def proxy4(material: SimpleNamespace, backend: Backend) -> Iterator[RunningProxy]:
    """4 workers sharing the port, key in an owned oracle on the ring."""
    proxy = RunningProxy(material, backend, "--workers", "4")
    yield proxy
    proxy.stop()


def _listeners(port: int) -> int:
    """Listening TCP sockets on 127.0.0.1:port (SO_REUSEPORT lets there be several)."""
    count = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
                count += 1
    return count


# ---- real clients through 4 workers ----

@pytest.mark.parametrize("version", ["1.3", "1.2"])
def test_curl(proxy4: RunningProxy, version: str) -> None:
    args = ("--tlsv1.3",) if version == "1.3" else ("--tlsv1.2", "--tls-max", "1.2")
    result = curl(proxy4.port, proxy4.cafile, "-v", *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout == body_for("/")
    assert f"SSL connection using TLSv{version}" in result.stderr.decode()


@pytest.mark.parametrize("version", ["1.3", "1.2"])
def test_s_client(proxy4: RunningProxy, version: str) -> None:
    request = f"GET /s_client HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{proxy4.port}",
                          "-servername", HOST, "-CAfile", str(proxy4.cafile),
                          "-verify_return_error", "-ign_eof", f"-tls{version.replace('.', '_')}"],
                         input=request.encode(), capture_output=True, timeout=30)
    text = out.stdout.decode(errors="replace")
    assert "Verify return code: 0 (ok)" in text, text
    assert f"Protocol  : TLSv{version}" in text, text
    assert body_for("/s_client").decode() in text


@pytest.mark.parametrize("version", ["1.3", "1.2"])
def test_dual_certificates(start, material: SimpleNamespace, tmp_path: Path,
                           version: str) -> None:
    """RSA and ECDSA certificates, both keys in the proxy's one oracle: each
    client gets the certificate its signature algorithms allow."""


    _, ec_key, ec_cert = certs.write_key_and_cert(tmp_path, "ec", "p256")
    proxy = start("--cert", str(ec_cert), "--key", str(ec_key))
    cafile = tmp_path / "both.pem"
    cafile.write_bytes(material.cert.read_bytes() + ec_cert.read_bytes())
    request = f"GET /dual HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
    for sigalgs, kind, bits in (("ECDSA+SHA256", "ECDSA", 256),
                                ("rsa_pss_rsae_sha256:RSA+SHA256", "RSA", 2048)):
        out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{proxy.port}",
                              "-servername", HOST, "-CAfile", str(cafile), "-sigalgs", sigalgs,
                              "-verify_return_error", "-ign_eof",
                              f"-tls{version.replace('.', '_')}"],
                             input=request.encode(), capture_output=True, timeout=30)
        text = out.stdout.decode(errors="replace")
        assert "Verify return code: 0 (ok)" in text, text
        assert f"Server public key is {bits} bit" in text, text
        assert f"Peer signature type: {kind}" in text, text
        assert body_for("/dual").decode() in text


def test_tls_defaults(proxy4: RunningProxy) -> None:
    # No TLS 1.1, no RSA key exchange (it would need PKCS#1 v1.5 decryption).
    assert "Cipher is (NONE)" in s_client(proxy4.port, proxy4.cafile, "-tls1_1") or \
        "alert" in s_client(proxy4.port, proxy4.cafile, "-tls1_1")
    out = s_client(proxy4.port, proxy4.cafile, "-tls1_2", "-cipher", "AES128-GCM-SHA256")
    assert "handshake failure" in out, out


def test_four_workers_share_the_port(proxy4: RunningProxy) -> None:
    assert len(proxy4.workers()) == 4
    assert len(proxy4.oracles()) == 1
    assert _listeners(proxy4.port) == 4


def test_load_1000_handshakes(proxy4: RunningProxy) -> None:
    """1,000 new connections at concurrency 16, each response checked against its request."""
    result = asyncio.run(_loadgen.run("127.0.0.1", proxy4.port, proxy4.ctx(), concurrency=16,
                                      count=1000))
    assert (result.ok, result.failed) == (1000, 0), result.errors
    assert not [line for line in proxy4.lines if "WARNING" in line or "ERROR" in line]


def test_large_request_and_response(proxy4: RunningProxy) -> None:
    """4 MB each way through one connection: flow control on both sides."""
    body = os.urandom(4 << 20)

    async def post() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy4.port,
                                                       ssl=proxy4.ctx(), server_hostname=HOST)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        data = await reader.read()
        writer.close()
        return data

    head, _, echoed = asyncio.run(asyncio.wait_for(post(), 30)).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and echoed == body


def test_memory_check(proxy4: RunningProxy, material: SimpleNamespace) -> None:
    """After real handshakes, no proxy process holds the key; the oracle does."""
    for _ in range(20):
        proxy4.get("/warm")
    key = serialization.load_pem_private_key(material.key.read_bytes(), None)
    secrets = key_secrets(key)  # type: ignore[arg-type]
    for pid in [proxy4.pid, *proxy4.workers()]:
        scan = scan_process(pid, secrets)
        assert scan.found == 0, (pid, {k: v for k, v in scan.hits.items() if v})
    assert scan_process(proxy4.oracles()[0], secrets).found > 0


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_only_the_oracle_opens_the_key_file(start, material: SimpleNamespace,
                                            tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    proxy = start("--workers", "2", wrapper=("strace", "-ff", "-qq", "-e",
                                             "trace=open,openat,openat2", "-o", str(trace)))
    for version in ("1.2", "1.3", "1.3"):
        proxy.get("/traced", version)
    oracle, workers = proxy.oracle_pid, proxy.workers()
    proxy.stop()
    opened = {int(f.name.rsplit(".", 1)[1]) for f in tmp_path.glob("trace.*")
              if str(material.key) in f.read_text()}
    assert opened == {oracle}, (opened, oracle, workers)
    assert (tmp_path / f"trace.{proxy.pid}").exists() and len(workers) == 2


# ---- the oracle dies ----

def _kill_oracle_under_load(proxy: RunningProxy) -> None:
    # One connection open from before: it must survive the oracle's restart.
    async def keep_alive() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", proxy.port, ssl=proxy.ctx(),
                                             server_hostname=HOST)

    async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> bytes:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        return await reader.readexactly(length)

    async def main() -> tuple[_loadgen.LoadResult, float, bytes, bytes]:
        reader, writer = await keep_alive()
        before = await ask(reader, writer, "/before")
        load = asyncio.ensure_future(_loadgen.run("127.0.0.1", proxy.port, proxy.ctx(),
                                                  concurrency=8, seconds=4.0))
        await asyncio.sleep(1.0)
        killed = time.monotonic()
        assert proxy.oracle_pid is not None
        os.kill(proxy.oracle_pid, signal.SIGKILL)
        result = await load
        after = await ask(reader, writer, "/after")
        writer.close()
        return result, killed, before, after

    workers = sorted(proxy.workers())
    result, killed, before, after = asyncio.run(main())
    assert (before, after) == (body_for("/before"), body_for("/after"))
    failures = [o.end - killed for o in result.outcomes if o.error]
    assert failures, "no handshake failed while the oracle was down"
    # A clean TLS alert each, not a reset or a hang.
    assert set(result.errors) == {"SSLError: TLSV1_ALERT_INTERNAL_ERROR"}, result.errors
    recovered = [o.end - killed for o in result.outcomes if not o.error
                 and o.end - killed > max(failures)]
    assert recovered and recovered[0] < 2.0, (max(failures), recovered[:1])
    assert len(recovered) > 50
    # The proxy itself was not restarted; the oracle was, under its name.
    assert sorted(proxy.workers()) == workers
    assert proxy.oracles() and proxy.oracles()[0] != proxy.oracle_pid
    proxy.wait_for(re.compile(r"key oracle .* died \(killed by SIGKILL\)"))
    proxy.wait_for(re.compile(r"key oracle .* restarted"))
    proxy.wait_for(re.compile(r"handshake failed: the key oracle could not sign: "))


def oracle_socket(proxy: RunningProxy) -> Path:
    """Where the proxy's oracle listens: in the workers' root."""
    assert proxy.oracle_name is not None and proxy.root is not None
    return names.socket_path(proxy.oracle_name, str(proxy.root))


def test_kill_oracle_during_load(start) -> None:
    proxy = start("--workers", "2")
    _kill_oracle_under_load(proxy)


def test_kill_oracle_socketpair(start) -> None:
    proxy = start("--workers", "2", "--transport", "socketpair")
    assert oracle_socket(proxy).exists()
    _kill_oracle_under_load(proxy)


# ---- a stopped oracle: a handshake waits for it, nothing else does ----

def _stop_oracle(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while (stat_fields(pid) or ["?"])[0] != "T" and time.monotonic() < deadline:
        time.sleep(0.01)


class _Keepalive:
    """A TLS connection through the proxy (blocking), kept open for requests."""

    def __init__(self, proxy: RunningProxy, ctx: Optional[ssl.SSLContext] = None,
                 session: Optional[ssl.SSLSession] = None) -> None:
        began = time.monotonic()
        raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        self.sock = (ctx or proxy.ctx()).wrap_socket(raw, server_hostname=HOST, session=session)
        self.took = time.monotonic() - began       # the handshake

    def ask(self, path: str) -> tuple[bytes, float]:
        """``GET path`` on it: the body and how long the answer took."""
        began = time.monotonic()
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        while len(body) < length:
            body += self.sock.recv(65536)
        return body, time.monotonic() - began

    def close(self) -> None:
        self.sock.close()


class _Waiting(threading.Thread):
    """A new connection's handshake and request, in a thread: its outcome and time."""

    def __init__(self, proxy: RunningProxy, path: str) -> None:
        super().__init__(daemon=True)
        self.proxy, self.path = proxy, path
        self.outcome, self.took = "", 0.0
        self.start()

    def run(self) -> None:
        began = time.monotonic()
        try:
            self.proxy.get(self.path)
            self.outcome = "ok"
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ValueError) as exc:
            self.outcome = f"{type(exc).__name__}: {getattr(exc, 'reason', None) or exc}"
        self.took = time.monotonic() - began


def _resources(pid: int) -> tuple[int, int]:
    """A worker's open descriptors and threads."""
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def _quiet(pid: int) -> tuple[int, int]:
    """A worker's resources once the last connection's descriptors are closed
    (the same for a quarter of a second)."""
    seen, deadline = [_resources(pid)], time.monotonic() + 5
    while (len(seen) < 5 or len(set(seen[-5:])) > 1) and time.monotonic() < deadline:
        time.sleep(0.05)
        seen.append(_resources(pid))
    return seen[-1]


def _settled(pid: int, idle: tuple[int, int], timeout: float = 5.0) -> bool:
    """Whether the worker is back to no more descriptors and threads than when idle."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fds, threads = _resources(pid)
        if fds <= idle[0] and threads == idle[1]:
            return True
        time.sleep(0.05)
    return False


def test_stopped_oracle_stops_no_other_connection(start) -> None:
    """One worker; its oracle stopped while a handshake waits for a signature:
    an established connection relays, and a resumed session (no signature)
    completes its handshake at once; after SIGCONT the waiting one completes."""
    proxy = start("--workers", "1", "--oracle-timeout", "60")
    (worker,) = proxy.workers()
    proxy.get("/warm")
    idle = _quiet(worker)
    assert idle[1] == 1 + 4, idle                 # the loop and the default 4 handshake threads
    keep = _Keepalive(proxy)
    assert keep.ask("/before")[0] == body_for("/before")
    ctx = proxy.ctx()
    ticket = _Keepalive(proxy, ctx)
    ticket.ask("/ticket")                         # TLS 1.3 tickets come after the handshake
    session = ticket.sock.session
    ticket.close()
    assert session is not None and session.has_ticket
    assert proxy.oracle_pid is not None
    _stop_oracle(proxy.oracle_pid)
    try:
        waiting = _Waiting(proxy, "/waited")
        time.sleep(0.5)                           # its ClientHello is in, its signature waits
        body, took = keep.ask("/during")
        assert body == body_for("/during") and took < 1.0, took
        resumed = _Keepalive(proxy, ctx, session)
        assert resumed.sock.session_reused and resumed.took < 1.0, resumed.took
        body, took = resumed.ask("/resumed")
        assert body == body_for("/resumed") and took < 1.0, took
        resumed.close()
        assert waiting.is_alive()
    finally:
        os.kill(proxy.oracle_pid, signal.SIGCONT)
    waiting.join(15)
    assert waiting.outcome == "ok", waiting.outcome
    assert keep.ask("/after")[0] == body_for("/after")
    keep.close()
    # Nothing left over: descriptors and threads as when idle, the oracle the same one.
    assert _settled(worker, idle), (_resources(worker), idle)
    assert proxy.oracles() == [proxy.oracle_pid]
    result = asyncio.run(_loadgen.run("127.0.0.1", proxy.port, proxy.ctx(), concurrency=4,
                                      count=40))
    assert result.failed == 0, result.errors
    assert not [line for line in proxy.lines if "WARNING" in line or "ERROR" in line]


def _client_hello() -> bytes:
    """A TLS 1.3 ClientHello, as the first bytes of a client that then goes away."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, outgoing, server_hostname=HOST)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def test_handshake_timeout_includes_the_wait_for_the_key(start) -> None:
    """--handshake-timeout 2 with the oracle stopped: the waiting handshake gets
    its alert at 2 s, not at the provider's 5 s; one whose client left
    meanwhile is dropped quietly when its late step ends."""
    proxy = start("--workers", "1", "--oracle-timeout", "60", "--handshake-timeout", "2")
    (worker,) = proxy.workers()
    proxy.get("/warm")
    idle = _quiet(worker)
    assert proxy.oracle_pid is not None
    _stop_oracle(proxy.oracle_pid)
    try:
        gone = socket.create_connection(("127.0.0.1", proxy.port))
        gone.sendall(_client_hello())
        time.sleep(0.2)
        gone.close()
        waiting = _Waiting(proxy, "/timed-out")
        waiting.join(15)
    finally:
        os.kill(proxy.oracle_pid, signal.SIGCONT)
    assert waiting.outcome == "SSLError: TLSV1_ALERT_INTERNAL_ERROR", waiting.outcome
    assert 1.5 < waiting.took < 3.5, waiting.took
    proxy.wait_for(re.compile(r"handshake failed: the key oracle could not sign: timed out"))
    proxy.get("/after")
    assert _settled(worker, idle), (_resources(worker), idle)
    assert proxy.workers() == [worker]


@pytest.mark.parametrize("transport", ["socketpair", "shm"])
def test_hung_oracle_is_replaced(start, transport: str) -> None:
    """An oracle that stops answering (SIGSTOP) is killed and replaced within
    --oracle-timeout and a restart; established connections never notice."""
    proxy = start("--workers", "2", "--transport", transport, "--oracle-timeout", "2")
    workers = sorted(proxy.workers())
    keep = _Keepalive(proxy)
    assert keep.ask("/before")[0] == body_for("/before")
    hung = proxy.oracle_pid
    assert hung is not None
    _stop_oracle(hung)
    stopped = time.monotonic()
    body, took = keep.ask("/during")
    assert body == body_for("/during") and took < 1.0, took
    served = None
    while served is None and time.monotonic() - stopped < 20:
        try:
            proxy.get("/recovered")
            served = time.monotonic() - stopped
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ValueError):
            time.sleep(0.1)
    assert served is not None and served < 15, served
    proxy.wait_for(re.compile(rf"key oracle .* \(pid {hung}\) answered no ping for .* s: hung; "
                              r"killing it \(SIGKILL\) and starting another"))
    proxy.wait_for(re.compile(r"key oracle .* restarted"))
    assert not alive(hung) and proxy.oracles() and proxy.oracles() != [hung]
    assert keep.ask("/after")[0] == body_for("/after")
    keep.close()
    assert sorted(proxy.workers()) == workers


# ---- signals ----

def test_sigterm_drains_and_leaves_nothing(start) -> None:
    proxy = start("--workers", "2")
    workdirs = set(Path("/tmp").glob("shmkey-proxy-*"))

    async def slow_request() -> tuple[bytes, bytes, float]:
        # A connection in the middle of a request when SIGTERM comes: it finishes.
        # An idle keep-alive one: closed (close_notify) once the drain sees it idle.
        idle_reader, idle_writer = await asyncio.open_connection(
            "127.0.0.1", proxy.port, ssl=proxy.ctx(), server_hostname=HOST)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, ssl=proxy.ctx(),
                                                       server_hostname=HOST)
        writer.write(f"GET /draining HTTP/1.1\r\nHost: {HOST}\r\n".encode())
        await writer.drain()
        await asyncio.sleep(0.3)
        proxy.proc.send_signal(signal.SIGTERM)
        began = time.monotonic()
        await asyncio.sleep(0.3)
        writer.write(b"Connection: close\r\n\r\n")
        data = await reader.read()
        writer.close()
        idle = await asyncio.wait_for(idle_reader.read(), 10)
        idle_writer.close()
        return data, idle, time.monotonic() - began

    data, idle, took = asyncio.run(slow_request())
    assert data.endswith(body_for("/draining")) and idle == b""
    assert took < 5, took
    proxy.stop()
    assert proxy.wait_for(re.compile(r"INFO stopped"))
    assert set(Path("/tmp").glob("shmkey-proxy-*")) <= workdirs
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()


def test_sighup_reloads_certificate_and_key(start, material: SimpleNamespace,
                                            tmp_path: Path) -> None:
    key, cert = tmp_path / "live.key", tmp_path / "live.crt"
    key.write_bytes(material.key.read_bytes())
    cert.write_bytes(material.cert.read_bytes())
    proxy = start("--workers", "2", cert=cert, key=key)
    first = proxy.oracle_name

    async def connect(cafile: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", proxy.port, server_hostname=HOST,
                                             ssl=_loadgen.client_context(str(cafile)))

    async def main() -> bytes:
        reader, writer = await connect(material.cert)     # open across the reload
        key.write_bytes(material.other_key.read_bytes())
        cert.write_bytes(material.other_cert.read_bytes())
        mark = len(proxy.lines)
        proxy.proc.send_signal(signal.SIGHUP)
        proxy.wait_for(re.compile(r"reloaded: 2 new workers"), start=mark)
        await _loadgen.request("127.0.0.1", proxy.port,
                               _loadgen.client_context(str(material.other_cert)), HOST, "/new")
        with pytest.raises(ssl.SSLCertVerificationError):
            await _loadgen.request("127.0.0.1", proxy.port,
                                   _loadgen.client_context(str(material.cert)), HOST, "/old")
        writer.write(f"GET /old HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        data = await reader.read()
        writer.close()
        return data

    assert asyncio.run(main()).endswith(body_for("/old"))
    # The old oracle goes once its workers have drained; one oracle is left.
    deadline = time.monotonic() + 15
    while len(proxy.oracles()) != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(proxy.oracles()) == 1 and len(proxy.workers()) == 2
    assert not names.socket_path(first).exists()


def test_reloads_under_load_fail_nothing(start) -> None:
    proxy = start("--workers", "2")

    async def main() -> _loadgen.LoadResult:
        load = asyncio.ensure_future(_loadgen.run("127.0.0.1", proxy.port, proxy.ctx(),
                                                  concurrency=8, seconds=3.0))
        for _ in range(2):
            await asyncio.sleep(1.0)
            proxy.proc.send_signal(signal.SIGHUP)
        return await load

    result = asyncio.run(main())
    assert result.failed == 0 and result.ok > 100, result.errors
    proxy.wait_for(re.compile(r"reloaded: .* oracle 'proxy-[0-9a-f]+\.3'"))


def test_bad_reload_keeps_serving(start, material: SimpleNamespace, tmp_path: Path) -> None:
    cert = tmp_path / "live.crt"
    cert.write_bytes(material.cert.read_bytes())
    proxy = start("--workers", "1", cert=cert)
    cert.write_bytes(material.other_cert.read_bytes())      # not for the key
    mark = len(proxy.lines)
    proxy.proc.send_signal(signal.SIGHUP)
    proxy.wait_for(re.compile(r"reload failed; still serving .* does not match"), start=mark)
    proxy.cafile = material.cert
    proxy.get("/still")


def test_dead_worker_is_replaced(start) -> None:
    proxy = start("--workers", "2")
    victim = proxy.workers()[0]
    os.kill(victim, signal.SIGKILL)
    proxy.wait_for(re.compile(rf"worker {victim} died \(killed by SIGKILL\); starting another"))
    deadline = time.monotonic() + 10
    while (len(proxy.workers()) != 2 or victim in proxy.workers()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(proxy.workers()) == 2 and victim not in proxy.workers()
    assert _listeners(proxy.port) == 2
    result = asyncio.run(_loadgen.run("127.0.0.1", proxy.port, proxy.ctx(), concurrency=4,
                                      count=40))
    assert result.failed == 0


# ---- other ways to hold the key ----

def test_external_oracle(start, material: SimpleNamespace) -> None:
    serve = Serve(material.key, "shm").start()
    try:
        proxy = start("--workers", "1", key_args=["--oracle", serve.name, *serve.trust_args()])
        assert proxy.oracle_name == serve.name and proxy.oracles() == []
        proxy.get("/external", "1.2")
        proxy.get("/external", "1.3")
        mark = len(proxy.lines)
        proxy.proc.send_signal(signal.SIGHUP)       # a new key reference, new workers
        proxy.wait_for(re.compile(r"reloaded: 1 new workers"), start=mark)
        proxy.get("/reloaded")
        proxy.stop()
        assert names.listening(names.socket_path(serve.name)), \
            "the proxy stopped an oracle it does not own"
    finally:
        serve.stop()


def test_inprocess_mode_says_so(start) -> None:
    proxy = start("--workers", "1", "--key-mode", "inprocess")
    assert any("WARNING" in line and "INTO THE NETWORK-FACING PROXY WORKERS" in line
               for line in proxy.lines)
    assert proxy.oracles() == []
    proxy.get("/inprocess")


# ---- limits and timeouts ----

def test_connection_limit_and_handshake_timeout(start) -> None:
    proxy = start("--workers", "1", "--max-connections", "1", "--handshake-timeout", "1")
    silent = socket.create_connection(("127.0.0.1", proxy.port))     # takes the one place
    try:
        began = time.monotonic()
        proxy.get("/waited")            # accepted only once the silent one is dropped
        waited = time.monotonic() - began
        silent.settimeout(5)
        assert silent.recv(100) == b""
    finally:
        silent.close()
    assert 0.7 < waited < 5, waited


def test_idle_timeout(start) -> None:
    proxy = start("--workers", "1", "--idle-timeout", "1")

    async def idle() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, ssl=proxy.ctx(),
                                                       server_hostname=HOST)
        data = await asyncio.wait_for(reader.read(), 5)       # close_notify after ~1 s
        writer.close()
        return data

    assert asyncio.run(idle()) == b""
    proxy.wait_for(re.compile(r"idle for 1 s; closing"))


def test_plain_http_client_gets_one_log_line(start) -> None:
    proxy = start("--workers", "1")
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        s.recv(100)
    proxy.wait_for(re.compile(r"handshake failed: HTTP_REQUEST"))
    assert not [line for line in proxy.lines if "oracle could not sign" in line]


def test_backend_down_is_one_line(material: SimpleNamespace, start) -> None:
    down = Backend()
    down.port = free_port()         # nothing listens there
    proxy = RunningProxy(material, down, "--workers", "1")
    try:
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError, ValueError)):
            proxy.get("/nobody")
        proxy.wait_for(re.compile(r"backend 127\.0\.0\.1:\d+: Connection refused"))
    finally:
        proxy.stop()


# ---- bad arguments: one clear line, non-zero exit ----

def _proxy_rings() -> set[str]:
    """What proxy-owned oracles may leave: /dev/shm entries (there must be none) and
    sockets nothing serves (other test runs may come and go meanwhile)."""
    return {e for e in ours_in_shm() | stale_sockets() if "shmkey-proxy-" in e}


def _fails(material: SimpleNamespace, *args: str, privs: Optional[list[str]] = None) -> str:
    before = _proxy_rings()
    if privs is None:
        privs = privilege_args(own_oracle="--oracle" not in args)
    out = subprocess.run([sys.executable, "-m", "shmkey", "proxy", "--backend", "127.0.0.1:9",
                          *privs, *args], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert _proxy_rings() <= before
    return lines[0]


def test_missing_certificate(material: SimpleNamespace) -> None:
    line = _fails(material, "--listen", f"127.0.0.1:{free_port()}", "--cert",
                  str(material.dir / "nope.crt"), "--key", str(material.key))
    assert line == f"shmkey: certificate file {material.dir / 'nope.crt'}: no such file"


def test_missing_key(material: SimpleNamespace) -> None:
    line = _fails(material, "--listen", f"127.0.0.1:{free_port()}", "--cert",
                  str(material.cert), "--key", str(material.dir / "nope.key"))
    assert line == f"shmkey: key file {material.dir / 'nope.key'}: no such file"


@pytest.mark.parametrize("mode", ["oracle", "inprocess"])
def test_certificate_not_for_the_key(material: SimpleNamespace, mode: str) -> None:
    line = _fails(material, "--listen", f"127.0.0.1:{free_port()}", "--cert",
                  str(material.other_cert), "--key", str(material.key), "--key-mode", mode)
    assert line == f"shmkey: certificate {material.other_cert} does not match {material.key}"


def test_port_in_use(material: SimpleNamespace) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        line = _fails(material, "--listen", f"127.0.0.1:{port}", "--cert", str(material.cert),
                      "--key", str(material.key))
    assert line == f"shmkey: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_oracle_not_running(material: SimpleNamespace) -> None:
    line = _fails(material, "--listen", f"127.0.0.1:{free_port()}", "--cert", str(material.cert),
                  "--oracle", "no-such-oracle-here")
    assert line.startswith("shmkey: ") and "no-such-oracle-here" in line


def test_malformed_address(material: SimpleNamespace) -> None:
    line = _fails(material, "--listen", "localhost", "--cert", str(material.cert),
                  "--key", str(material.key))
    assert line == "shmkey: --listen 'localhost' is not HOST:PORT"

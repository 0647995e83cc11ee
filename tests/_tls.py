"""Helpers for the OpenSSL provider tests: throwaway keys and certificates, a
named ``shmkey serve`` started and stopped on demand, and a small threaded
TLS server built on Python's ssl. Everything runs for real; nothing is mocked.
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, Optional, Sequence, Union

import shmkey.openssl
from shmkey import _process, names
from shmkey.tools import certs

HOST = certs.HOST
# nginx workers drop to nobody:nogroup when started as root; the ring must let them in.
RUN_AS_ROOT = os.geteuid() == 0
WORKER_GROUP = "nogroup" if RUN_AS_ROOT else None


KEY_KINDS = certs.KEY_KINDS


def write_key_and_cert(directory: Path, stem: str, kind: str = "rsa") -> tuple[Path, Path]:
    """A fresh key (see KEY_KINDS) and a self-signed certificate for localhost."""
    _, key_path, cert_path = certs.write_key_and_cert(directory, stem, kind)
    return key_path, cert_path


def key_material(directory: Path) -> SimpleNamespace:
    """Two keys with their certificates in ``directory``: ``key``/``cert`` and
    ``other_key``/``other_cert`` (a certificate that is not for ``key``)."""
    key, cert = write_key_and_cert(directory, "server")
    other_key, other_cert = write_key_and_cert(directory, "other")
    return SimpleNamespace(dir=directory, key=key, cert=cert, other_key=other_key,
                           other_cert=other_cert)


class Serve:
    """``shmkey serve --name NAME`` in a child process, stoppable and restartable;
    ``key`` may be several key files, served by one oracle."""

    def __init__(self, key: Union[Path, Sequence[Path]], transport: str = "shm",
                 name: Optional[str] = None, extra: tuple[str, ...] = ()) -> None:
        self.keys = [key] if isinstance(key, Path) else list(key)
        self.transport, self.extra = transport, extra
        self.name = name or names.random_name()
        self.proc: Optional[subprocess.Popen] = None
        # Who serves once it dropped root: the uid clients must be told to trust.
        self.user: Optional[str] = "nobody" if RUN_AS_ROOT else None

    def start(self) -> Serve:
        r, w = os.pipe()
        keys = [arg for k in self.keys for arg in ("--key", str(k))]
        args = [sys.executable, "-m", "shmkey", "serve", *keys, "--name", self.name,
                "--transport", self.transport, "--workers", "2",
                "--status-fd", str(w), "--log-level", "warning", *self.extra]
        if RUN_AS_ROOT:
            # As deployed: read the key as root, then serve as another user,
            # with the socket open to the group nginx's workers run in.
            args += ["--user", str(self.user), "--group", WORKER_GROUP]
        try:
            self.proc = subprocess.Popen(args, pass_fds=[w])
        finally:
            os.close(w)
        try:
            ready, _, _ = select.select([r], [], [], 30)
            line = os.read(r, 4096) if ready else b""
        finally:
            os.close(r)
        info = json.loads(line or b"{}")
        if not info.get("ok"):
            self.stop()
            raise RuntimeError(f"shmkey serve did not start: {info}")
        return self

    def trust_args(self) -> list[str]:
        """The command-line option that makes a client trust this oracle's user."""
        return ["--oracle-user", self.user] if self.user else []

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            _process.stop(proc, 10)
        # An oracle that dropped root cannot remove its socket in root's directory.
        names.clean(self.name)


class TLSServer:
    """Python's ssl on 127.0.0.1, a thread per connection. Each client gets
    ``hello <version>``; server-side failures are kept with the provider's reason."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.errors: list[tuple[Exception, Optional[str]]] = []
        self.served = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(f"hello {tls.version()}\n".encode())
                with self._lock:
                    self.served += 1
        except (ssl.SSLError, OSError) as exc:
            with self._lock:
                self.errors.append((exc, shmkey.openssl.last_error()))
        finally:
            conn.close()

    def close(self) -> None:
        # close() alone leaves a thread blocked in accept(); shutdown() wakes it.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(5)

    def __enter__(self) -> TLSServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def server_context(cert: Path, keyref: Path, ciphers: Optional[str] = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(keyref))
    if ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


def client_context(cafile: Path, version: Optional[ssl.TLSVersion] = None,
                   ciphers: Optional[str] = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(cafile))
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


def handshake(port: int, ctx: ssl.SSLContext) -> tuple[str, str]:
    """Connect, verify, read the greeting: (greeting, cipher name)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=HOST) as tls:
            greeting = tls.makefile("rb").readline().decode().strip()
            return greeting, tls.cipher()[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Until something accepts on 127.0.0.1:port, or proc has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def s_client(port: int, cafile: Path, *args: str) -> str:
    """``openssl s_client`` to port, verifying; its stdout and stderr."""
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                          "-servername", HOST, "-CAfile", str(cafile), "-verify_return_error",
                          *args], input=b"", capture_output=True, timeout=30)
    return out.stdout.decode(errors="replace") + out.stderr.decode(errors="replace")


def curl(port: int, cafile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert", str(cafile),
                           "--resolve", f"{HOST}:{port}:127.0.0.1", *args,
                           f"https://{HOST}:{port}/"], capture_output=True, timeout=30)


def wait_for_errors(server: TLSServer, count: int) -> None:
    """Until the server has recorded count failures (at most 10 s)."""
    deadline = time.monotonic() + 10
    while len(server.errors) < count and time.monotonic() < deadline:
        time.sleep(0.02)


@contextlib.contextmanager
def running(args: list, cnf: Path, port: int) -> Iterator[subprocess.Popen]:
    """A server program with the module loaded from cnf, until the block ends."""
    proc = subprocess.Popen(args, env=dict(os.environ, OPENSSL_CONF=str(cnf)),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        wait_for_port(port, proc)
        yield proc
    finally:
        _process.stop(proc, 10)
        assert proc.stderr is not None
        err = proc.stderr.read()
        proc.stderr.close()
    assert b"unable to load" not in err.lower(), err


def run_openssl(cnf: Path, *args: str, data: bytes = b"") -> bytes:
    """``openssl ARGS`` with the module loaded from cnf; its stdout (it must succeed)."""
    env = dict(os.environ, OPENSSL_CONF=str(cnf))
    return subprocess.run(["openssl", *args], input=data, env=env, check=True,
                          capture_output=True, timeout=30).stdout

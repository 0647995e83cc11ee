"""Privilege separation of ``shmkey proxy``, as root: workers as nobody in a
sandbox, the oracle as daemon. Their credentials as /proc shows them, a
whole life (TLS 1.2 and 1.3, SIGHUP, kill -9 of the oracle, SIGTERM), a
forked child in exactly the workers' sandbox attempting what code execution
in a worker would try, what nobody's credentials can read, the refusals and
warnings, and the per-source and full-table limits.
"""
from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Optional

import pytest
from cryptography.hazmat.primitives import serialization

import shmkey.openssl
from shmkey.config import env_name
from shmkey.openssl import keyref
from shmkey.proxy.supervisor import ProxyOptions, privileges, worker_sandbox
from shmkey.proxy.worker import warm_up
from shmkey.tools import loadgen as _loadgen
from shmkey.tools.backend import Backend, body_for
from shmkey.tools.memscan import key_secrets, scan_process
from shmkey.tools.procfs import alive, children
from shmkey.tools.rig import ProxyProcess

from ._tls import HOST, curl, free_port, key_material, s_client
from .conftest import in_child

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")

PRIVSEP = ("--user", "nobody", "--oracle-user", "daemon")
NOBODY = 65534
DAEMON = 1
PTRACE_ATTACH, PTRACE_DETACH = 16, 17


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return key_material(tmp_path_factory.mktemp("privsep"))


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    with Backend() as b:
        yield b


def _start(material: SimpleNamespace, backend: Backend, *args: str) -> ProxyProcess:
    return ProxyProcess(["--listen", f"127.0.0.1:{free_port()}", "--backend",
                         f"127.0.0.1:{backend.port}", "--cert", str(material.cert),
                         "--key", str(material.key), *args])


@pytest.fixture()
def proxies() -> Iterator[list[ProxyProcess]]:
    started: list[ProxyProcess] = []
    yield started
    for proxy in started:
        if proxy.proc.poll() is None:
            proxy.kill()


def _status(pid: int, tid: Optional[int] = None) -> dict[str, str]:
    path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    with open(path) as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _wait_sandboxed(pids: list[int], timeout: float = 10.0) -> None:
    """Workers confine themselves just after they start: wait for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_status(p).get("Seccomp") == "2" for p in pids):
            return
        time.sleep(0.05)


def assert_worker_confined(pid: int, root: Path) -> None:
    """Every thread of it (the loop and the handshake threads) alike."""
    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    assert len(tids) == 1 + 4, tids             # the loop and the default 4 handshake threads
    for tid in tids:
        st = _status(pid, tid)
        assert st["Uid"].split() == [str(NOBODY)] * 4, st["Uid"]
        assert st["Gid"].split() == [str(NOBODY)] * 4, st["Gid"]
        assert st["Groups"].split() == [str(NOBODY)], st["Groups"]
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(st[cap], 16) == 0, (tid, cap, st[cap])
        assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", st
    assert os.readlink(f"/proc/{pid}/root") == str(root) != "/"
    assert os.readlink(f"/proc/{pid}/cwd") == str(root)


def _tls_by_every_client(proxy: ProxyProcess, cafile: Path) -> None:
    for version in ("1.2", "1.3"):
        args = ("--tlsv1.3",) if version == "1.3" else ("--tlsv1.2", "--tls-max", "1.2")
        result = curl(proxy.port, cafile, "-v", *args)
        assert result.returncode == 0 and result.stdout == body_for("/"), result.stderr
        assert f"SSL connection using TLSv{version}" in result.stderr.decode()
        out = s_client(proxy.port, cafile, f"-tls{version.replace('.', '_')}")
        assert f"New, TLSv{version}, Cipher is" in out and "Verify return code: 0 (ok)" in out, out


@pytest.mark.parametrize("transport", ["socketpair", "shm"])
def test_nobody_and_daemon_through_a_whole_life(material: SimpleNamespace, backend: Backend,
                                                proxies: list[ProxyProcess], transport: str) -> None:
    proxy = _start(material, backend, *PRIVSEP, "--workers", "2", "--transport", transport)
    proxies.append(proxy)
    root = proxy.root_dir()
    assert root is not None and root.is_dir()
    workers = proxy.workers()
    assert len(workers) == 2
    _wait_sandboxed(workers)
    for pid in workers:
        assert_worker_confined(pid, root)
    (oracle,) = proxy.oracles()
    assert _status(oracle)["Uid"].split() == [str(DAEMON)] * 4
    # The root: owned by the oracle's user, open to the workers' group, holds only sockets.
    st = root.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (DAEMON, NOBODY, 0o750)
    assert all(e.is_socket() for e in root.iterdir())
    _tls_by_every_client(proxy, material.cert)

    # Nothing of the key in any network-side process after those handshakes; the oracle has it.
    key = serialization.load_pem_private_key(material.key.read_bytes(), None)
    secrets = key_secrets(key)  # type: ignore[arg-type]
    for pid in [proxy.pid, *workers]:
        assert scan_process(pid, secrets).found == 0, pid
    assert scan_process(oracle, secrets).found > 0

    # SIGHUP: new workers, confined the same way, serve with the new oracle.
    mark = len(proxy.lines)
    proxy.proc.send_signal(signal.SIGHUP)
    proxy.wait_for(re.compile(r"reloaded: 2 new workers"), start=mark)
    deadline = time.monotonic() + 15
    while (set(proxy.workers()) & set(workers) or len(proxy.oracles()) != 1) and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    new_workers = proxy.workers()
    assert len(new_workers) == 2 and not set(new_workers) & set(workers)
    _wait_sandboxed(new_workers)
    for pid in new_workers:
        assert_worker_confined(pid, root)
    _tls_by_every_client(proxy, material.cert)

    # kill -9 of the oracle: restarted as daemon; the sandboxed workers reconnect.
    (old_oracle,) = proxy.oracles()
    os.kill(old_oracle, signal.SIGKILL)
    proxy.wait_for(re.compile(r"key oracle .* restarted"), start=mark)
    (oracle,) = proxy.oracles()
    assert oracle != old_oracle and _status(oracle)["Uid"].split()[0] == str(DAEMON)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if curl(proxy.port, material.cert).returncode == 0:
            break
        time.sleep(0.1)
    _tls_by_every_client(proxy, material.cert)
    assert sorted(proxy.workers()) == sorted(new_workers), "a worker was restarted"

    # SIGTERM: drained, and nothing left: processes, root, sockets, /dev/shm.
    pids = [proxy.pid, *children(proxy.pid)]
    assert proxy.stop() == 0, "\n".join(proxy.lines)
    assert not [p for p in pids if alive(p)]
    assert not root.exists()
    assert not list(Path("/dev/shm").glob(f"*{proxy.oracle_name}*"))
    assert not [line for line in proxy.lines if "Traceback" in line or "denied system call" in line]


# ---- code execution in a worker, simulated ----

def _attacks(key_path: Path, oracle: int, sibling: int, other_port: int, sandboxed: bool
             ) -> dict[str, str]:
    """What code running in a worker would try; each entry says how it went."""
    libc = ctypes.CDLL(None, use_errno=True)
    results: dict[str, str] = {}

    def attempt(name: str, action: Callable[[], object]) -> None:
        try:
            action()
            results[name] = "succeeded"
        except OSError as exc:
            results[name] = errno.errorcode.get(exc.errno or 0, str(exc))

    def ptrace(pid: int) -> None:
        if libc.ptrace(PTRACE_ATTACH, pid, None, None) != 0:
            raise OSError(ctypes.get_errno(), "ptrace")
        libc.ptrace(PTRACE_DETACH, pid, None, None)

    def fork() -> None:
        if os.fork() == 0:
            os._exit(0)
        os.wait()

    def connect_elsewhere() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(("127.0.0.1", other_port))

    def write_outside() -> None:
        for path in ("/tmp/shmkey-escaped", "/escaped"):
            with open(path, "w") as f:
                f.write("out")
            os.unlink(path)

    attempt("open the key file", lambda: open(key_path, "rb").read())
    attempt("open the oracle's memory", lambda: open(f"/proc/{oracle}/mem", "rb").close())
    attempt("ptrace the oracle", lambda: ptrace(oracle))
    attempt("ptrace a sibling worker", lambda: ptrace(sibling))
    attempt("fork", fork)
    attempt("connect to another port", connect_elsewhere)
    attempt("a UDP socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close())
    attempt("a netlink socket", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close())
    attempt("write outside the root", write_outside)
    if sandboxed:       # unconfined, it would succeed and replace this process
        attempt("execve /bin/sh", lambda: os.execv("/bin/sh", ["sh", "-c", "exit 0"]))
    return results


@pytest.mark.parametrize("transport", ["socketpair", "shm"])
def test_code_execution_in_the_workers_sandbox(material: SimpleNamespace, backend: Backend,
                                               proxies: list[ProxyProcess], tmp_path: Path,
                                               transport: str) -> None:
    """A child in exactly the workers' sandbox (the same function, the same
    parameters) tries each attack: all fail, and it still does TLS with the key
    reference. Unconfined (as the workers were), the same attacks succeed."""
    proxy = _start(material, backend, *PRIVSEP, "--workers", "2", "--transport", transport)
    proxies.append(proxy)
    root = proxy.root_dir()
    assert root is not None and proxy.oracle_name is not None
    (oracle,), sibling = proxy.oracles(), proxy.workers()[0]
    opts = ProxyOptions(listen=("127.0.0.1", proxy.port), backend=("127.0.0.1", backend.port),
                        certs=(str(material.cert),), keys=(str(material.key),),
                        transport=transport, user="nobody", oracle_user="daemon")
    ref = tmp_path / "key.ref.pem"
    os.environ[env_name("runtime_dir")] = str(root)
    try:
        keyref.write(proxy.oracle_name, str(ref), cert=str(material.cert),
                     transport=transport, oracle_user="daemon")
    finally:
        del os.environ[env_name("runtime_dir")]
    shmkey.openssl.enable()

    def confined() -> dict[str, Any]:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(material.cert), str(ref))
        if transport == "shm":
            warm_up(ctx)        # as a worker does: today's ring is mapped before the chroot
        box = worker_sandbox(opts, privileges(opts), root, opts.backend, os.getpid())
        assert box is not None
        applied = sorted(box.enter())
        attacks = _attacks(material.key, oracle, sibling, proxy.port, sandboxed=True)
        return {"applied": applied, "attacks": attacks, "tls": warm_up(ctx),
                "uid": os.getuid(), "why": shmkey.openssl.last_error()}

    out = in_child(confined)
    assert out["applied"] == ["chroot", "logged", "ports", "scoped", "seccomp", "user"]
    assert out["uid"] == NOBODY
    assert out["attacks"] == {
        "open the key file": "ENOENT",                   # not in its root
        "open the oracle's memory": "ENOENT",            # no /proc there
        "ptrace the oracle": "EPERM",
        "ptrace a sibling worker": "EPERM",
        "fork": "EPERM",
        "connect to another port": "EACCES",             # Landlock: the backend's port only
        "a UDP socket": "EPERM",
        "a netlink socket": "EPERM",
        "write outside the root": "ENOENT",
        "execve /bin/sh": "EPERM",
    }, out
    assert out["tls"] == 2, out      # TLS 1.3 and TLS 1.2 with the RSA certificate
    # Unconfined, as root (the old workers): the same code gets everything.
    control = in_child(lambda: {"attacks": _attacks(material.key, oracle, sibling, proxy.port,
                                                     sandboxed=False)})
    assert set(control["attacks"].values()) == {"succeeded"}, control
    assert proxy.stop() == 0
    assert not [line for line in proxy.lines if "Traceback" in line]


def test_denied_calls_are_logged_once(material: SimpleNamespace, backend: Backend,
                                      proxies: list[ProxyProcess]) -> None:
    """In the workers' sandbox a denied call returns EPERM, and the first of
    each kind is one log line on stderr (the workers' log)."""
    proxy = _start(material, backend, *PRIVSEP, "--workers", "1", "--transport", "socketpair")
    proxies.append(proxy)
    root = proxy.root_dir()
    assert root is not None
    opts = ProxyOptions(listen=("127.0.0.1", proxy.port), backend=("127.0.0.1", backend.port),
                        certs=(str(material.cert),), keys=(str(material.key),), user="nobody",
                        oracle_user="daemon")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.dup2(w, 2)
        box = worker_sandbox(opts, privileges(opts), root, opts.backend, os.getpid())
        assert box is not None
        box.enter()
        codes = []
        for _ in range(3):
            try:
                os.fork()
            except OSError as exc:
                codes.append(exc.errno)
        os._exit(0 if codes == [errno.EPERM] * 3 else 1)
    os.close(w)
    with os.fdopen(r) as f:
        log = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, log
    lines = [line for line in log.splitlines() if "denied system call" in line]
    assert lines == [f"shmkey-proxy[{pid}] WARNING sandbox: denied system call clone (56); "
                     "it returned EPERM"], log
    # The proxy's own workers, through their whole life here, were denied nothing.
    assert proxy.stop() == 0
    assert not [line for line in proxy.lines if "denied system call" in line], proxy.lines


# ---- nobody's credentials ----

def test_nobody_cannot_read_the_key_or_the_oracle(material: SimpleNamespace, backend: Backend,
                                                  proxies: list[ProxyProcess],
                                                  tmp_path: Path) -> None:
    """With a worker's credentials, outside any sandbox: neither the key file
    nor the oracle's memory. (As root, the old workers' uid, both read.)"""
    shared = tmp_path / "open"
    shared.mkdir()
    shared.chmod(0o755)
    key = shared / "web.key"
    shutil.copy(material.key, key)
    key.chmod(0o600)
    proxy = ProxyProcess(["--listen", f"127.0.0.1:{free_port()}", "--backend",
                          f"127.0.0.1:{backend.port}", "--cert", str(material.cert),
                          "--key", str(key), *PRIVSEP, "--workers", "1"])
    proxies.append(proxy)
    (oracle,) = proxy.oracles()
    reader = [sys.executable, "-c", "import sys; open(sys.argv[1], 'rb').read(1)"]
    as_nobody = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]
    for path in (str(key), f"/proc/{oracle}/mem"):
        denied = subprocess.run([*as_nobody, *reader, path], capture_output=True, text=True)
        assert denied.returncode != 0 and "PermissionError" in denied.stderr, (path, denied)
    assert subprocess.run([*reader, str(key)]).returncode == 0      # the control: root reads it
    with open(f"/proc/{oracle}/mem", "rb"):
        pass
    proxy.kill()


# ---- refusals and warnings: one line each ----

def _run(material: SimpleNamespace, *args: str, wrapper: tuple[str, ...] = (),
         key: Optional[Path] = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*wrapper, sys.executable, "-m", "shmkey", "proxy", "--listen",
                           f"127.0.0.1:{free_port()}", "--backend", "127.0.0.1:9", "--cert",
                           str(material.cert), "--key", str(key or material.key), *args],
                          capture_output=True, text=True, timeout=60)


def _one_line(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 2, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_root_without_user_is_refused(material: SimpleNamespace) -> None:
    assert _one_line(_run(material)) == (
        "shmkey: refusing to run the network-facing workers as root: pass --user USER[:GROUP] "
        "(and --oracle-user USER for the key oracle), or --allow-root")


def test_unknown_user_is_refused(material: SimpleNamespace) -> None:
    assert _one_line(_run(material, "--user", "no-such-user-here")) == \
        "shmkey: --user no-such-user-here: no user 'no-such-user-here' on this system"
    assert _one_line(_run(material, "--user", "nobody:no-such-group")) == \
        "shmkey: --user nobody:no-such-group: no group 'no-such-group' on this system"
    assert _one_line(_run(material, "--user", "nobody", "--oracle-user", "nope-nope")) == \
        "shmkey: --oracle-user nope-nope: no user 'nope-nope' on this system"


def test_user_without_root_is_refused(material: SimpleNamespace) -> None:
    """Run by nobody (a forked child that became nobody, then runs the command)."""
    from shmkey import cli

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        sys.stderr = os.fdopen(w, "w")     # pytest's capture is not fd 2
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
        code = cli.main(["proxy", "--listen", f"127.0.0.1:{free_port()}", "--backend",
                         "127.0.0.1:9", "--cert", str(material.cert), "--key", str(material.key),
                         "--user", "daemon"])
        sys.stderr.flush()
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    out = subprocess.CompletedProcess([], os.waitstatus_to_exitcode(status), "", err)
    assert _one_line(out) == (f"shmkey: --user needs root: the proxy runs as uid {NOBODY} and "
                              "cannot change user; start it as root, or leave out --user")


def test_oracle_user_equal_to_user_is_refused(material: SimpleNamespace) -> None:
    assert _one_line(_run(material, "--user", "nobody", "--oracle-user", "nobody")) == (
        "shmkey: --oracle-user nobody has the workers' uid 65534: a compromised worker could "
        "signal the oracle and tamper with its socket; use another user, or --allow-shared-user")


def _starts(material: SimpleNamespace, backend: Backend, proxies: list[ProxyProcess],
            *args: str, key: Optional[Path] = None) -> ProxyProcess:
    proxy = ProxyProcess(["--listen", f"127.0.0.1:{free_port()}", "--backend",
                          f"127.0.0.1:{backend.port}", "--cert", str(material.cert),
                          "--key", str(key or material.key), "--workers", "1", *args])
    proxies.append(proxy)
    assert curl(proxy.port, material.cert).returncode == 0
    return proxy


def test_shared_user_when_allowed_is_a_warning(material: SimpleNamespace, backend: Backend,
                                               proxies: list[ProxyProcess]) -> None:
    proxy = _starts(material, backend, proxies, "--user", "nobody", "--oracle-user", "nobody",
                    "--allow-shared-user", "--transport", "socketpair")
    assert any("WARNING the workers and the key oracle run as one user (uid 65534)" in line
               for line in proxy.lines), proxy.lines
    assert proxy.stop() == 0


def test_allow_root_is_loud(material: SimpleNamespace, backend: Backend,
                            proxies: list[ProxyProcess]) -> None:
    proxy = _starts(material, backend, proxies, "--allow-root")
    assert any("WARNING *** --allow-root: the network-facing workers keep uid 0" in line
               for line in proxy.lines), proxy.lines
    (worker,) = proxy.workers()
    _wait_sandboxed([worker])
    st = _status(worker)
    assert st["Uid"].split()[0] == "0" and int(st["CapEff"], 16) == 0 and st["Seccomp"] == "2"
    assert proxy.stop() == 0


def test_world_readable_key_is_a_warning(material: SimpleNamespace, backend: Backend,
                                         proxies: list[ProxyProcess], tmp_path: Path) -> None:
    key = tmp_path / "open.key"
    shutil.copy(material.key, key)
    key.chmod(0o644)
    proxy = _starts(material, backend, proxies, *PRIVSEP, key=key)
    assert any(f"WARNING key file {key} (mode 0644) is readable by the workers' user nobody"
               in line for line in proxy.lines), proxy.lines
    assert proxy.stop() == 0


# ---- limits against abuse ----

async def _idle_tls(port: int, cafile: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, server_hostname=HOST,
                                         ssl=_loadgen.client_context(str(cafile)))


def test_per_source_cap(material: SimpleNamespace, backend: Backend,
                        proxies: list[ProxyProcess]) -> None:
    proxy = _starts(material, backend, proxies, *PRIVSEP, "--max-per-source", "2")

    async def main() -> bytes:
        held = [await _idle_tls(proxy.port, material.cert) for _ in range(2)]
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        third = await asyncio.wait_for(reader.read(), 5)       # closed at once
        writer.close()
        for _, w in held:
            w.close()
        return third

    assert asyncio.run(main()) == b""
    proxy.wait_for(re.compile(r"127\.0\.0\.1:\d+: 2 connections already open from this "
                              r"address; closing"))
    assert curl(proxy.port, material.cert).returncode == 0      # the held ones are gone
    assert proxy.stop() == 0


def test_full_table_closes_idle_connections_sooner(material: SimpleNamespace, backend: Backend,
                                                   proxies: list[ProxyProcess]) -> None:
    """Handshaked-then-idle connections fill the worker; an honest client gets
    in once they have been idle for --full-idle-timeout, not --idle-timeout."""
    proxy = _starts(material, backend, proxies, *PRIVSEP, "--max-connections", "3",
                    "--full-idle-timeout", "1", "--idle-timeout", "300")

    async def main() -> float:
        held = [await _idle_tls(proxy.port, material.cert) for _ in range(3)]
        began = time.monotonic()
        await asyncio.wait_for(_loadgen.request("127.0.0.1", proxy.port,
                                                _loadgen.client_context(str(material.cert)),
                                                HOST, "/honest"), 10)
        waited = time.monotonic() - began
        for _, w in held:
            w.close()
        return waited

    waited = asyncio.run(main())
    assert 0.5 < waited < 5, waited
    proxy.wait_for(re.compile(r"idle for 1 s while the worker is full; closing"))
    assert proxy.stop() == 0

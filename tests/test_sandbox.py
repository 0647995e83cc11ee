"""``shmkey.sandbox`` as a library, in forked children: what it applies, the
allow-list's argument filters (socket families and types, ioctl, executable
memory, signals), and its refusals of bad parameters. The proxy's use of it
is in test_privsep.py.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import signal
import socket
import termios
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

from shmkey import sandbox
from shmkey.errors import ConfigError, ShmkeyError

from .conftest import in_child


def _errno(action: Callable[[], object]) -> str:
    try:
        action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, "?")
    return "ok"


def test_unprivileged_sandbox_filters_calls() -> None:
    """Without root or user: the filter and limits still hold."""
    def job() -> dict[str, Any]:
        listener = socket.create_server(("127.0.0.1", 0))
        applied = sorted(sandbox.enter(families=("unix", "inet")))
        with open("/proc/self/status") as f:
            status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
        rw = mmap.PROT_READ | mmap.PROT_WRITE
        return {
            "applied": applied,
            "seccomp": status["Seccomp"], "nnp": status["NoNewPrivs"],
            "tcp": _errno(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()),
            "unix": _errno(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()),
            "inet6": _errno(lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()),
            "udp": _errno(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()),
            "unix datagram": _errno(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)),
            "bind": _errno(lambda: socket.socket().bind(("127.0.0.1", 0))),
            "accept is fine": _errno(lambda: (listener.setblocking(False), listener.accept())),
            "nonblocking ioctl": _errno(lambda: listener.setblocking(True)),
            "TIOCSTI": _errno(lambda: fcntl.ioctl(2, termios.TIOCSTI, b"x")),
            "rw memory": _errno(lambda: mmap.mmap(-1, 4096, prot=rw).close()),
            "exec memory": _errno(lambda: mmap.mmap(-1, 4096, prot=rw | mmap.PROT_EXEC)),
            "signal myself": _errno(lambda: os.kill(os.getpid(), 0)),
            "signal another": _errno(lambda: os.kill(os.getppid(), signal.SIGCONT)),
            "probe another": _errno(lambda: os.kill(os.getppid(), 0)),
            "probe the dead": _errno(lambda: os.kill(2 ** 22 - 1, 0)),
            "setpriority": _errno(lambda: os.setpriority(os.PRIO_PROCESS, 0, 1)),
            "fork": _errno(os.fork),
            "chroot": _errno(lambda: os.chroot("/")),
            "chmod": _errno(lambda: os.chmod("/tmp", 0o777)),
        }

    out = in_child(job)
    assert out.pop("applied") == ["logged", "ports", "scoped", "seccomp"]
    assert (out.pop("seccomp"), out.pop("nnp")) == ("2", "1")
    assert out == {
        "tcp": "ok", "unix": "ok", "inet6": "EPERM", "udp": "EPERM", "unix datagram": "EPERM",
        "bind": "EPERM", "accept is fine": "EAGAIN", "nonblocking ioctl": "ok",
        "TIOCSTI": "EPERM", "rw memory": "ok", "exec memory": "EPERM", "signal myself": "ok",
        # seccomp lets signal 0 through (is it alive?), Landlock's scope does not; a pid
        # that is gone is still ESRCH, which is what the ring's liveness check needs.
        "signal another": "EPERM", "probe another": "EPERM", "setpriority": "EPERM",
        "fork": "EPERM", "chroot": "EPERM", "chmod": "EPERM", "probe the dead": "ESRCH",
    }


def test_tcp_port_is_the_only_one(tmp_path: Path) -> None:
    """Landlock: connect to the allowed port only."""
    allowed, other = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))

    def job() -> dict[str, str]:
        sandbox.enter(families=("inet",), tcp_port=allowed.getsockname()[1])

        def to(port: int) -> None:
            with socket.socket() as s:
                s.connect(("127.0.0.1", port))

        return {"allowed": _errno(lambda: to(allowed.getsockname()[1])),
                "other": _errno(lambda: to(other.getsockname()[1]))}

    try:
        assert in_child(job) == {"allowed": "ok", "other": "EACCES"}
    finally:
        allowed.close()
        other.close()


def test_bad_parameters_are_refused_before_anything() -> None:
    with pytest.raises(ConfigError, match="unknown socket families"):
        sandbox.enter(families=("unix", "packet"))
    with pytest.raises(ConfigError, match="tcp_port 70000"):
        sandbox.enter(tcp_port=70000)
    with pytest.raises(ConfigError, match="no user 'no-such-user-here'"):
        sandbox.enter(user="no-such-user-here")
    with pytest.raises(ConfigError, match="sandbox root /no/such/dir"):
        sandbox.enter(root="/no/such/dir")


def test_root_must_be_unwritable_and_hold_only_sockets(tmp_path: Path) -> None:
    nobody = sandbox.resolve_user("nobody")
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(ConfigError, match="is writable by uid 65534"):
        sandbox.check_root(str(open_dir), nobody)
    full = tmp_path / "full"
    full.mkdir()
    full.chmod(0o755)
    (full / "secret").write_text("x")
    with pytest.raises(ConfigError, match="must hold nothing but sockets; it has secret"):
        sandbox.check_root(str(full), nobody)
    (full / "secret").unlink()
    sandbox.check_root(str(full), nobody)


def test_threads_are_refused() -> None:
    """Landlock and the uid change would hold for one thread only."""
    def job() -> str:
        stop = threading.Event()
        t = threading.Thread(target=stop.wait)
        t.start()
        try:
            sandbox.enter()
        except ShmkeyError as exc:
            return str(exc)
        finally:
            stop.set()
            t.join()
        return "entered"

    assert "before starting threads" in in_child(job)


def test_threads_started_halfway_are_confined() -> None:
    """Threads that ``start_threads`` starts inherit the sandbox (capabilities,
    Landlock), the filter covers them, and no thread can be started after."""
    allowed, other = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))

    def job() -> dict[str, Any]:
        go, done = threading.Event(), threading.Event()
        seen: dict[str, Any] = {}

        def to(port: int) -> None:
            with socket.socket() as s:
                s.connect(("127.0.0.1", port))

        def thread() -> None:
            go.wait(10)
            seen["fork"] = _errno(os.fork)
            seen["udp"] = _errno(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            seen["allowed port"] = _errno(lambda: to(allowed.getsockname()[1]))
            seen["other port"] = _errno(lambda: to(other.getsockname()[1]))
            done.set()

        worker = threading.Thread(target=thread, daemon=True)
        sandbox.enter(families=("unix", "inet"), tcp_port=allowed.getsockname()[1],
                      start_threads=worker.start)
        tasks = {}
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/status") as f:
                st = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
            tasks[tid] = (st["Seccomp"], st["NoNewPrivs"], int(st["CapBnd"], 16), int(st["CapEff"], 16))
        go.set()
        done.wait(10)
        try:
            threading.Thread(target=lambda: None).start()
            seen["another thread"] = "started"
        except RuntimeError:
            seen["another thread"] = "refused"
        return {"tasks": sorted(tasks.values()), **seen}

    try:
        out = in_child(job)
    finally:
        allowed.close()
        other.close()
    # Both threads: the filter (mode 2), NO_NEW_PRIVS, no capabilities at all.
    assert out.pop("tasks") == [["2", "1", 0, 0]] * 2
    assert out == {"fork": "EPERM", "udp": "EPERM", "allowed port": "ok", "other port": "EACCES",
                   "another thread": "refused"}

"""systemd: `shmkey serve` tells a real notify socket READY=1 once it serves,
WATCHDOG=1 while its workers answer and STOPPING=1 when told to stop; the
example units in contrib/systemd parse with `systemd-analyze verify`."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import shmkey
from shmkey import _notify, _process, names

from .conftest import unique

UNITS = Path(__file__).resolve().parent.parent / "contrib" / "systemd"


def _receive(sock: socket.socket, want: str, timeout: float = 20.0) -> list[str]:
    """Datagrams until one contains ``want``."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while not any(want in g for g in got):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {want} on the notify socket; got {got}")
        sock.settimeout(left)
        got.append(sock.recv(4096).decode())
    return got


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
@pytest.mark.parametrize("kind", ["thread", "process"])
def test_ready_watchdog_stopping_on_a_real_socket(tmp_path: Path, rsa2048: Path,
                                                  abstract: bool, kind: str) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        address = f"@shmkey-test-{secrets.token_hex(6)}"
        sock.bind("\0" + address[1:])
    else:
        address = str(tmp_path / "notify")
        sock.bind(address)
    name = unique("notify")
    env = dict(os.environ, NOTIFY_SOCKET=address, WATCHDOG_USEC="600000")
    proc = subprocess.Popen([sys.executable, "-m", "shmkey", "serve", "--key", str(rsa2048),
                             "--name", name, "--allow-root", "--worker-kind", kind],
                            env=env, stderr=subprocess.DEVNULL)
    try:
        ready = _receive(sock, "READY=1")[-1]
        assert f"MAINPID={proc.pid}" in ready
        # READY means serving: a client connects at once, without retrying.
        client = shmkey.connect(name)
        assert client.echo(b"x") == b"x"
        client.close()
        dogs = _receive(sock, "WATCHDOG=1") + _receive(sock, "WATCHDOG=1")
        assert sum("WATCHDOG=1" in d for d in dogs) >= 2
        proc.send_signal(signal.SIGTERM)
        _receive(sock, "STOPPING=1")
        assert proc.wait(15) == 0
    finally:
        _process.stop(proc, 0, signal.SIGKILL)
        names.clean(name)
        sock.close()


def test_no_watchdog_for_another_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert _notify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert _notify.watchdog_interval() == 1.0
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert _notify.notify("READY=1") is False


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("unit", ["shmkey-serve@.service", "shmkey-proxy.service"])
def test_units_verify(tmp_path: Path, unit: str) -> None:
    # The units name the installed /usr/bin/shmkey; point them at an executable that exists here.
    text = (UNITS / unit).read_text().replace("/usr/bin/shmkey", sys.executable)
    target = tmp_path / unit.replace("@.", "@web.")
    target.write_text(text)
    if "proxy" in unit:   # it requires the oracle's unit: give verify one to find
        (tmp_path / "shmkey-serve@web.service").write_text(
            (UNITS / "shmkey-serve@.service").read_text().replace("/usr/bin/shmkey",
                                                                   sys.executable))
    run = subprocess.run(["systemd-analyze", "verify", str(target)], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    problems = [ln for ln in (run.stdout + run.stderr).splitlines()
                if unit.split("@")[0] in ln or "shmkey" in ln]
    assert run.returncode == 0 and not problems, run.stdout + run.stderr

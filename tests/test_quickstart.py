"""README's quick start, run as written: its shell blocks (each marked with
an HTML comment ``<!-- quickstart ... -->``) run with bash, as root, in a
scratch directory, until curl gets the page from nginx and haproxy whose key
lives in the oracle; then the README's stop block, and a check that nothing
is left. Only the oracle's name and the ports come from here, through the
variables the README reads with defaults.
"""
from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest

from shmkey import names
from shmkey.tools.procfs import alive

from .conftest import ours_in_shm

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
USER = "shmkey"
BLOCK = re.compile(r"<!-- quickstart(?: (\w+))? -->\n```sh\n(.*?)```", re.S)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the quick start runs as root "
                       "(useradd, servers that switch to their own users)"),
    pytest.mark.skipif(shutil.which("nginx") is None,
                       reason="nginx is not installed (scripts/bootstrap.sh installs it)"),
]


def blocks() -> dict[str, list[str]]:
    """README's quick-start blocks by tag: "" (set-up), "nginx", "haproxy", "stop"."""
    found: dict[str, list[str]] = {}
    for tag, body in BLOCK.findall(README.read_text()):
        found.setdefault(tag, []).append(body)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shmkey_command(bindir: Path) -> str:
    """PATH entry for a `shmkey` that runs this checkout: the installed
    command if it is this tree's (CI: bootstrap's editable install), else a
    wrapper around ``python -m shmkey`` (a worktree beside another install)."""
    installed = shutil.which("shmkey")
    if installed:
        conf = subprocess.run([installed, "openssl-conf"], capture_output=True, text=True)
        if f"module = {ROOT}/shmkey/" in conf.stdout:
            return str(Path(installed).parent)
    wrapper = bindir / "shmkey"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={ROOT}${{PYTHONPATH:+:$PYTHONPATH}} '
                       f'exec {sys.executable} -m shmkey "$@"\n')
    wrapper.chmod(0o755)
    return str(bindir)


class Run(NamedTuple):
    returncode: int
    output: str


class QuickStart(NamedTuple):
    workdir: Path
    env: dict[str, str]

    def run(self, script: str, timeout: float = 120) -> Run:
        # Output to a file, not a pipe: the oracle started in the background
        # keeps the script's stdout open for as long as it runs.
        log = self.workdir / f"bash-{secrets.token_hex(3)}.out"
        with open(log, "w") as out:
            rc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script],
                                cwd=self.workdir, env=self.env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
        return Run(rc, log.read_text())

    def pid(self, what: str) -> int:
        path = self.workdir / f"{what}.pid"
        return int(path.read_text().split()[0]) if path.exists() else 0


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


@pytest.fixture(scope="module")
def quickstart() -> Iterator[QuickStart]:
    found = blocks()
    assert len(found.get("", [])) >= 3 and "nginx" in found and "stop" in found, \
        "README's quick-start blocks lost their <!-- quickstart --> markers"
    workdir = Path(tempfile.mkdtemp(prefix="shmkey-quickstart-"))
    bindir = workdir / "bin"
    bindir.mkdir()
    oracle = f"qs-{secrets.token_hex(4)}"
    env = dict(os.environ, ORACLE=oracle, PORT=str(free_port()),
               HAPROXY_PORT=str(free_port()), PATH=f"{shmkey_command(bindir)}:{os.environ['PATH']}")
    try:
        pwd.getpwnam(USER)
        made_user = False
    except KeyError:
        made_user = True
    qs = QuickStart(workdir, env)
    try:
        for body in found[""]:
            run = qs.run(body)
            assert run.returncode == 0, f"quick-start block failed:\n{body}\n--- output:\n{run.output}"
        assert f"oracle {oracle} serving" in (workdir / "oracle.log").read_text()
        yield qs
    finally:
        pids = [p for p in (qs.pid("nginx"), qs.pid("haproxy"), qs.pid("oracle")) if p]
        qs.run(found["stop"][0], timeout=30)      # the README's way; some may be gone already
        for pid in wait_gone(pids):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pids, 5)
        names.clean(oracle)
        if made_user:
            subprocess.run(["userdel", USER], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


def test_nginx_serves_with_the_key_in_the_oracle(quickstart: QuickStart) -> None:
    run = quickstart.run(blocks()["nginx"][0])
    assert run.returncode == 0, run.output
    assert "hello from nginx; its key is in the oracle" in run.output
    # nginx got a reference, never the key: nothing in its configuration names web.key.
    assert "web.key" not in (quickstart.workdir / "nginx.conf").read_text()


@pytest.mark.skipif(shutil.which("haproxy") is None,
                    reason="haproxy is not installed (scripts/bootstrap.sh installs it)")
def test_haproxy_serves_with_the_key_in_the_oracle(quickstart: QuickStart) -> None:
    run = quickstart.run(blocks()["haproxy"][0])
    assert run.returncode == 0, run.output
    assert "hello from haproxy; its key is in the oracle" in run.output


def test_without_the_oracle_nginx_cannot_sign(quickstart: QuickStart) -> None:
    """The last step: stop the oracle, and nginx's next handshake fails."""
    port = quickstart.env["PORT"]
    oracle = quickstart.pid("oracle")
    os.kill(oracle, signal.SIGTERM)
    assert not wait_gone([oracle]), "the oracle did not stop on SIGTERM"
    # Dropped to its user, it cannot remove its socket from root's /run/shmkey: the next
    # oracle of that name replaces it. Nothing of it is in /dev/shm, nor serves that socket.
    sock = names.socket_path(quickstart.env["ORACLE"])
    assert not sock.exists() or not names.listening(sock)
    assert not [e for e in ours_in_shm() if quickstart.env["ORACLE"] in e]
    run = quickstart.run(f"curl -sS --cacert web.crt https://localhost:{port}/ || echo rc=$?")
    assert "rc=35" in run.output, run.output
    errors = (quickstart.workdir / "nginx-error.log").read_text()
    assert "the key oracle is not running" in errors, errors[-2000:]

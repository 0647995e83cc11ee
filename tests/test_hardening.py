"""The key process hardens itself: no core dumps, not dumpable, no new
privileges, memory locked where allowed, inherited descriptors closed, and
privileges dropped with --user; all read back from /proc of the live oracle."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

import shmkey
from shmkey import _process, names

from .conftest import unique
from .test_serve import wait_for_oracle


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def core_limit(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max core file size"))
    return line.split()[4]


def test_owned_oracle_is_hardened(rsa2048: Path) -> None:
    with shmkey.KeyOracle(rsa2048, workers=1) as oracle:
        assert oracle.pid is not None
        st = status(oracle.pid)
        assert st["NoNewPrivs"].strip() == "1"
        assert core_limit(oracle.pid) == "0"
        if os.geteuid() == 0:       # an unprivileged RLIMIT_MEMLOCK is usually too small
            assert int(st["VmLck"].split()[0]) > 0
        with open(f"/proc/{oracle.pid}/cmdline", "rb") as f:
            cmdline = f.read()
        assert b"--key" in cmdline and b"BEGIN" not in cmdline   # a path, never the key


def test_inherited_descriptors_are_closed(rsa2048: Path, tmp_path: Path) -> None:
    name = unique("fds")
    leaked_r, leaked_w = os.pipe()
    serve = subprocess.Popen([sys.executable, "-m", "shmkey", "serve", "--key", str(rsa2048),
                              "--name", name, "--workers", "1", "--allow-root"],
                             pass_fds=[leaked_r, leaked_w], stderr=subprocess.DEVNULL)
    try:
        wait_for_oracle(name, "shm").close()
        targets: set[str] = set()
        for fd in os.listdir(f"/proc/{serve.pid}/fd"):
            try:
                targets.add(os.readlink(f"/proc/{serve.pid}/fd/{fd}"))
            except FileNotFoundError:
                pass    # a connection closing meanwhile: never the pipe
        ours = os.readlink(f"/proc/self/fd/{leaked_r}")
        assert ours not in targets, targets
    finally:
        os.close(leaked_r)
        os.close(leaked_w)
        _process.stop(serve, 15)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
@pytest.mark.parametrize("transport", ["shm", "socketpair"])
def test_root_oracle_drops_to_user(rsa2048: Path, tmp_path: Path, transport: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    name = unique(f"drop-{transport[:4]}")
    # A socket directory the dropped oracle owns, so it can remove its socket.
    rundir = Path(tempfile.mkdtemp(prefix="shmkey-run-"))
    os.chown(rundir, 65534, 65534)
    monkeypatch.setenv("SHMKEY_RUNTIME_DIR", str(rundir))
    serve = subprocess.Popen([sys.executable, "-m", "shmkey", "serve", "--key", str(rsa2048),
                              "--name", name, "--workers", "1", "--user", "nobody",
                              "--transport", transport], stderr=subprocess.PIPE, text=True)
    try:
        # The socket exists before the drop; the "serving" line comes after it.
        assert serve.stderr is not None
        lines = []
        while not any("serving" in line for line in lines):
            line = serve.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        client = wait_for_oracle(name, transport, oracle_user="nobody")
        st = status(serve.pid)
        assert st["Uid"].split() == ["65534"] * 4, st["Uid"]
        assert st["Gid"].split()[0] == "65534"
        # Not dumpable: /proc files of such a process belong to root, not to it.
        assert os.stat(f"/proc/{serve.pid}/environ").st_uid == 0
        owned = [str(names.socket_path(name))]
        assert all(os.stat(p).st_uid == 65534 for p in owned)
        key = client.private_key()
        sig = key.sign(b"m", padding.PKCS1v15(), hashes.SHA256())
        key.public_key().verify(sig, b"m", padding.PKCS1v15(), hashes.SHA256())
        client.close()
        serve.send_signal(signal.SIGTERM)
        err = "".join(lines) + serve.communicate(timeout=15)[1]
        assert serve.returncode == 0, err
        assert "dropped privileges to nobody" in err
        assert not any(os.path.exists(p) for p in owned)     # it could still unlink it
    finally:
        _process.stop(serve, 0, signal.SIGKILL)
        shutil.rmtree(rundir)

"""Who may reach an oracle: its own uid (socket 0600), a named group (0660),
and the same rule again by SO_PEERCRED in the oracle, for both transports.
Parts run as `nobody` through setpriv, as a real other user."""
from __future__ import annotations

import grp
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

import shmkey
from shmkey import _process, names

from .conftest import unique
from .ctools import build_tool
from .test_faults import wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                                reason="needs root and setpriv to act as another user")
GROUP = "users"


@pytest.fixture(scope="module")
def probe() -> Iterator[Path]:
    # A directory `nobody` can reach (pytest's tmp dirs are private to root).
    d = Path(tempfile.mkdtemp(prefix="shmkey-probe-"))
    os.chmod(d, 0o755)
    try:
        yield build_tool("attach_probe", d)
    finally:
        shutil.rmtree(d)


def as_nobody(probe: Path, target: str, *groups: int,
              transport: str = "shm") -> subprocess.CompletedProcess:
    cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup"]
    cmd += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    return subprocess.run(cmd + [str(probe), target, transport], capture_output=True, text=True,
                          timeout=30)


def test_other_user_cannot_reach_a_private_oracle(probe: Path, rsa2048: Path) -> None:
    with shmkey.KeyOracle(rsa2048, workers=1) as oracle:
        sock = names.socket_path(oracle.name)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        for transport in ("shm", "socket"):
            mine = subprocess.run([str(probe), str(sock), transport], capture_output=True,
                                  text=True, timeout=30)
            assert mine.returncode == 0 and "echoed" in mine.stdout, mine.stdout
            theirs = as_nobody(probe, str(sock), transport=transport)
            assert theirs.returncode == 1
            assert "open: permission denied: uid 65534 gid 65534 may not connect to" in theirs.stdout


def test_group_members_can_connect(probe: Path, rsa2048: Path) -> None:
    gid = grp.getgrnam(GROUP).gr_gid
    with shmkey.KeyOracle(rsa2048, workers=1, group=GROUP) as oracle:
        sock = names.socket_path(oracle.name)
        st = os.stat(sock)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, gid)
        for transport in ("shm", "socket"):
            member = as_nobody(probe, str(sock), gid, transport=transport)
            assert member.returncode == 0 and "echoed" in member.stdout, member.stdout
            stranger = as_nobody(probe, str(sock), transport=transport)
            assert "permission denied" in stranger.stdout


@pytest.mark.parametrize("transport", ["shm", "socketpair"])
def test_peers_are_checked_even_when_the_path_is_open(probe: Path, rsa2048: Path,
                                                      transport: str) -> None:
    """File modes are the first gate; SO_PEERCRED is the second, in the oracle,
    before it reads a byte: a refusal, and one line in its log."""
    rundir = Path(tempfile.mkdtemp(prefix="shmkey-run-"))
    os.chmod(rundir, 0o755)
    name = unique("peer")
    env = dict(os.environ, SHMKEY_RUNTIME_DIR=str(rundir))
    serve = subprocess.Popen([sys.executable, "-m", "shmkey", "serve", "--key", str(rsa2048),
                              "--name", name, "--transport", transport, "--workers", "1",
                              "--allow-root"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        sock = rundir / f"{names.ring_id(name)}.sock"
        assert wait_until(sock.exists), serve.stderr
        os.chmod(sock, 0o777)           # as a careless operator might
        mine = subprocess.run([str(probe), str(sock)], capture_output=True, text=True, timeout=30)
        assert mine.returncode == 0 and "echoed" in mine.stdout, mine.stdout
        theirs = as_nobody(probe, str(sock))
        assert theirs.returncode == 1, theirs.stdout
        assert "open: permission denied: the oracle refused uid 65534 gid 65534" in theirs.stdout
    finally:
        _process.stop(serve, 15)
    assert serve.stderr is not None
    log = serve.stderr.read()
    refusals = [line for line in log.splitlines() if "refused a connection" in line]
    assert len(refusals) == 1, log
    assert "uid 65534 (nobody)" in refusals[0] and "not uid 0, root, or" in refusals[0] or \
        "and the oracle has no --group" in refusals[0], refusals
    shutil.rmtree(rundir)

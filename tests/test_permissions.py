"""Who may reach an oracle: its own uid (0600), a named group (0660), and for
sockets the same rule again by SO_PEERCRED; and O_EXCL against planted names.
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

import posix_ipc
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


def as_nobody(probe: Path, target: str, *groups: int) -> subprocess.CompletedProcess:
    cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup"]
    cmd += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    return subprocess.run(cmd + [str(probe), target], capture_output=True, text=True, timeout=30)


def test_other_user_cannot_open_a_private_ring(probe: Path, rsa2048: Path) -> None:
    with shmkey.KeyOracle(rsa2048, workers=1) as oracle:
        for part in ("shm", "req", "free"):
            assert stat.S_IMODE(os.stat(names.shm_path(oracle.name, part)).st_mode) == 0o600
        mine = subprocess.run([str(probe), names.ring_id(oracle.name)], capture_output=True,
                              text=True, timeout=30)
        assert mine.returncode == 0 and "echoed" in mine.stdout
        theirs = as_nobody(probe, names.ring_id(oracle.name))
        assert theirs.returncode == 1 and "open: permission denied" in theirs.stdout


def test_group_members_can_attach(probe: Path, rsa2048: Path) -> None:
    gid = grp.getgrnam(GROUP).gr_gid
    with shmkey.KeyOracle(rsa2048, workers=1, group=GROUP) as oracle:
        for part in ("shm", "req", "free"):
            st = os.stat(names.shm_path(oracle.name, part))
            assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, gid)
        member = as_nobody(probe, names.ring_id(oracle.name), gid)
        assert member.returncode == 0 and "echoed" in member.stdout, member.stdout
        stranger = as_nobody(probe, names.ring_id(oracle.name))
        assert "permission denied" in stranger.stdout


def test_socket_peers_are_checked_even_when_the_path_is_open(probe: Path, rsa2048: Path,
                                                             tmp_path: Path) -> None:
    """File modes are the first gate; SO_PEERCRED is the second, in the oracle."""
    rundir = Path(tempfile.mkdtemp(prefix="shmkey-run-"))
    name = unique("peer")
    env = dict(os.environ, XDG_RUNTIME_DIR=str(rundir))
    serve = subprocess.Popen([sys.executable, "-m", "shmkey", "serve", "--key", str(rsa2048), "--name", name,
                              "--transport", "socketpair", "--workers", "1", "--allow-root"],
                             env=env, stderr=subprocess.PIPE, text=True)
    try:
        sock = rundir / "shmkey" / f"{names.ring_id(name)}.sock"
        assert wait_until(sock.exists), serve.stderr
        # Open every door on the way, as a careless operator might.
        os.chmod(rundir, 0o755)
        os.chmod(sock.parent, 0o755)
        os.chmod(sock, 0o777)
        mine = subprocess.run([str(probe), str(sock)], capture_output=True, text=True, timeout=30)
        assert mine.returncode == 0 and "echoed" in mine.stdout, mine.stdout
        theirs = as_nobody(probe, str(sock))
        assert theirs.returncode == 1, theirs.stdout
        assert "call: the key oracle is not running" in theirs.stdout   # it hung up on us
    finally:
        _process.stop(serve, 15)
        shutil.rmtree(rundir)


@pytest.mark.parametrize("planted", ["shm", "req", "free"])
def test_planted_name_stops_start_up(rsa2048: Path, tmp_path: Path, planted: str) -> None:
    """An object an attacker created first is never used: start-up fails, clearly."""
    name = unique(f"planted-{planted}")
    base = names.ring_id(name)
    if planted == "shm":
        obj = posix_ipc.SharedMemory(f"/{base}", posix_ipc.O_CREX, mode=0o666, size=4096)
        obj.close_fd()
    else:
        posix_ipc.Semaphore(f"/{base}-{planted}", posix_ipc.O_CREX, mode=0o666).close()
    try:
        with pytest.raises(shmkey.ShmkeyError, match=f"an oracle named '{name}' already exists"):
            shmkey.KeyOracle(rsa2048, name=name, workers=1).start()
        # The planted object is still the attacker's: we did not adopt or remove it.
        assert os.path.exists(names.shm_path(name, planted))
    finally:
        names.unlink(name)

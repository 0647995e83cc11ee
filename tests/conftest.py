"""Shared fixtures: keys made by the system ``openssl`` (so no test process
generates private keys itself), oracles per transport, and a check that the
suite puts nothing in /dev/shm and leaves no stale oracle socket; running a job
in a forked child.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import shmkey
from shmkey import names

TRANSPORTS = ("shm", "socketpair")
SHM = Path("/dev/shm")


def ours_in_shm() -> set[str]:
    """Entries in /dev/shm that look like shmkey's: there should be none at all."""
    return {p.name for p in SHM.iterdir() if "shmkey-" in p.name}


def stale_sockets() -> set[str]:
    """Oracle sockets in the runtime directories that nothing listens on."""
    out = set()
    for d in {names.runtime_dir(create=False) if _has_runtime_dir() else None, Path("/run/shmkey")}:
        if d is None or not d.is_dir():
            continue
        for p in d.glob("shmkey-*.sock"):
            try:
                if not names.listening(p):
                    out.add(str(p))
            except OSError:
                pass
    return out


def _has_runtime_dir() -> bool:
    try:
        names.runtime_dir(create=False)
        return True
    except shmkey.ShmkeyError:
        return False


def _ring_pid(segment: str) -> int:
    """The oracle pid a ring header of the old /dev/shm layout records (offset
    24), 0 if unreadable: other sessions on this machine may run old shmkeys."""
    try:
        with open(SHM / segment, "rb") as f:
            raw = f.read(28)
    except OSError:
        return 0
    return int.from_bytes(raw[24:28], "little") if len(raw) == 28 else 0


def _descends_from_us(pid: int) -> bool:
    me = os.getpid()
    while pid > 1:
        if pid == me:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def leaked(before: set[str]) -> list[str]:
    """What appeared in /dev/shm since ``before`` that a process of this run
    made: nothing should, ever (entries of other programs do not count)."""
    out = []
    for entry in sorted(ours_in_shm() - before):
        segment = entry[len("sem."):].rsplit("-", 1)[0] if entry.startswith("sem.") else entry
        if _descends_from_us(_ring_pid(segment)):
            out.append(entry)
    return out


@pytest.fixture(scope="session", autouse=True)
def no_ipc_leaks() -> Iterator[None]:
    """Fail the run if it puts anything in /dev/shm, or leaves sockets nobody serves."""
    before, stale = ours_in_shm(), stale_sockets()
    yield
    left = leaked(before)
    assert not left, f"the test run left these in /dev/shm: {left}"
    left = sorted(stale_sockets() - stale)
    assert not left, f"the test run left stale oracle sockets: {left}"


def unique(prefix: str) -> str:
    """An oracle name no other test run on this machine will pick."""
    return f"{prefix}-{secrets.token_hex(4)}"


def make_key(directory: Path, bits: int, password: str | None = None) -> Path:
    """An RSA key file written by `openssl genpkey`."""
    path = directory / f"rsa{bits}{'-enc' if password else ''}.pem"
    cmd = ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{bits}",
           "-out", str(path)]
    if password:
        cmd += ["-aes-256-cbc", "-pass", f"pass:{password}"]
    subprocess.run(cmd, check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys")


@pytest.fixture(scope="session")
def rsa2048(keydir: Path) -> Path:
    return make_key(keydir, 2048)


@pytest.fixture(scope="session")
def rsa3072(keydir: Path) -> Path:
    return make_key(keydir, 3072)


@pytest.fixture(scope="session")
def rsa4096(keydir: Path) -> Path:
    return make_key(keydir, 4096)


@pytest.fixture(scope="session")
def key_paths(rsa2048: Path, rsa3072: Path, rsa4096: Path) -> dict[int, Path]:
    return {2048: rsa2048, 3072: rsa3072, 4096: rsa4096}


@pytest.fixture(scope="module", params=TRANSPORTS)
def oracle(request: pytest.FixtureRequest, rsa2048: Path) -> Iterator[shmkey.KeyOracle]:
    """An RSA-2048 oracle per transport, shared by a module's tests."""
    with shmkey.KeyOracle(rsa2048, transport=request.param, workers=2,
                          timeout_ms=10000) as o:
        yield o


def python_child(code: str, **kw: object) -> subprocess.Popen:
    """Run ``code`` in a fresh interpreter that imports this checkout of shmkey."""
    env = dict(os.environ)
    return subprocess.Popen([sys.executable, "-c", code], env=env, **kw)  # type: ignore[call-overload]


def in_child(job: Callable[[], Any]) -> Any:
    """``job()`` in a forked child (which may confine itself for good); what it
    returned, as JSON carries it.

    Raises:
        AssertionError: the child raised, or did not exit cleanly.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = {"ok": job()}
        except BaseException as exc:        # reported to the test, which fails on it
            out = {"error": f"{type(exc).__name__}: {exc}"}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    result = json.loads(data)
    assert "error" not in result, result["error"]
    return result["ok"]

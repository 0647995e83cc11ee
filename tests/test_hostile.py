"""A hostile client on its ring while honest ones sign: the oracle (its C
layer built with AddressSanitizer) never crashes, never touches memory
outside a slot, and every honest answer verifies. The attacker runs as
another user in the oracle's --group, as a compromised server worker would."""
from __future__ import annotations

import grp
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from shmkey import _process, names

from .conftest import unique
from .ctools import asan_env, build_asan_package, build_tool
from .test_faults import open_fds, wait_until
from .test_serve import wait_for_oracle

SLOTS = 8
GROUP = "users"


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    out = tmp_path_factory.mktemp("asan")
    # The attacker runs as another user: its binary must be where that user can reach.
    reachable = Path(tempfile.mkdtemp(prefix="shmkey-hostile-"))
    os.chmod(reachable, 0o755)
    try:
        yield {"pkg": build_asan_package(out), "hostile": build_tool("hostile", reachable)}
    finally:
        shutil.rmtree(reachable)


def test_asan_build_is_instrumented(tools: dict[str, Path]) -> None:
    so = next((tools["pkg"] / "shmkey").glob("_native*.so"))
    symbols = subprocess.run(["nm", "-D", str(so)], capture_output=True, text=True).stdout
    assert "__asan_report_load" in symbols


def as_member(cmd: list[str]) -> list[str]:
    """``cmd`` as `nobody`, with the oracle's group among its groups."""
    return ["setpriv", "--reuid=nobody", "--regid=nogroup",
            f"--groups={grp.getgrnam(GROUP).gr_gid}", *cmd]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to attack as another user")
@pytest.mark.parametrize("seed", [1, 2])
def test_hostile_client_cannot_hurt_oracle_or_honest_clients(tools: dict[str, Path],
                                                             rsa2048: Path, tmp_path: Path,
                                                             seed: int) -> None:
    name = unique(f"hostile-{seed}")
    log = tmp_path / "oracle.log"
    with open(log, "w") as err:
        oracle = subprocess.Popen(
            [sys.executable, "-m", "shmkey", "serve", "--key", str(rsa2048), "--name", name,
             "--allow-root", "--workers", "2", "--slots", str(SLOTS), "--group", GROUP,
             "--log-level", "warning"], env=asan_env(tools["pkg"]), stderr=err, cwd=tmp_path)
    try:
        client = wait_for_oracle(name, "shm")
        key = client.private_key()
        pub = key.public_key()
        fds = open_fds(oracle.pid)
        hostile = subprocess.Popen(as_member([str(tools["hostile"]),
                                              str(names.socket_path(name)), "3", str(seed)]),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        verified: list[int] = []
        failures: list[BaseException] = []

        def honest(tag: int) -> None:
            n = 0
            try:
                while hostile.poll() is None:
                    msg = f"{tag}:{n}".encode() + os.urandom(8)
                    sig = key.sign(msg, padding.PKCS1v15(), hashes.SHA256())
                    pub.verify(sig, msg, padding.PKCS1v15(), hashes.SHA256())
                    echo = os.urandom(64)
                    assert client.echo(echo) == echo
                    n += 1
            except BaseException as exc:  # reported below
                failures.append(exc)
            verified.append(n)

        threads = [threading.Thread(target=honest, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        out, errs = hostile.communicate(timeout=60)
        for t in threads:
            t.join(timeout=30)
        assert hostile.returncode == 0, out + errs
        counts = [int(x) for x in out.split("actions:")[1].split("\n")[0].split()]
        assert sum(counts) > 1000, out          # the attack really ran
        assert int(out.split("reconnects:")[1]) > 0, out   # and was hung up on, and came back
        assert not failures, failures[:3]
        assert sum(verified) > 50
        assert oracle.poll() is None, "the oracle died"
        # The attacker's connections are gone, and with them everything they held.
        assert wait_until(lambda: open_fds(oracle.pid) == fds, timeout=15), open_fds(oracle.pid)
        assert client.free_slots() == SLOTS
        msg = b"after the attack"
        pub.verify(key.sign(msg, padding.PKCS1v15(), hashes.SHA256()), msg,
                   padding.PKCS1v15(), hashes.SHA256())
        client.close()
    finally:
        _process.stop(oracle, 15)
        names.clean(name)
    report = log.read_text()
    assert "AddressSanitizer" not in report, report[-3000:]
    assert oracle.returncode == 0, report[-3000:]

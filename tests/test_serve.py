"""`shmkey serve` as an operator runs it: connect by name, stop on signals,
clean up, refuse a name in use, restart at once after a crash, and `shmkey
clean` for what a crash left."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Optional
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

import shmkey
from shmkey import _process, names

from .conftest import TRANSPORTS, ours_in_shm, unique
from .test_faults import wait_until


def wait_for_oracle(name: str, transport: str, timeout: float = 15.0,
                    oracle_user: Optional[str] = None) -> shmkey.OracleClient:
    """Connect once the oracle serves (it logs readiness; we simply retry)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return shmkey.connect(name, transport=transport, oracle_user=oracle_user)
        except shmkey.OracleUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def start_serve(key: Path, name: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shmkey", "serve", "--key", str(key),
                             "--name", name, "--workers", "1", "--allow-root", *extra],
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_serve_attach_sign_and_stop(rsa2048: Path, tmp_path: Path, transport: str,
                                    sig: signal.Signals) -> None:
    name = unique(f"serve-{transport}-{sig.name}")
    proc = start_serve(rsa2048, name, "--transport", transport)
    try:
        client = wait_for_oracle(name, transport)
        key = client.private_key()
        sig_bytes = key.sign(b"m", padding.PKCS1v15(), hashes.SHA256())
        key.public_key().verify(sig_bytes, b"m", padding.PKCS1v15(), hashes.SHA256())
        assert client.transport == transport
        assert names.socket_path(name).stat().st_mode & 0o777 == 0o600
        assert not [e for e in ours_in_shm() if name in e]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert "stopped" in err
        assert not names.socket_path(name).exists()
        with pytest.raises(shmkey.OracleUnavailableError):
            key.sign(b"m", padding.PKCS1v15(), hashes.SHA256())
        client.close()
        with pytest.raises(shmkey.OracleUnavailableError):
            shmkey.connect(name)
    finally:
        _process.stop(proc, 0, signal.SIGKILL)
        names.clean(name)


def test_name_in_use_is_refused_and_clean_removes_a_crashed_oracle(rsa2048: Path,
                                                                  tmp_path: Path) -> None:
    name = unique("clash")
    first = start_serve(rsa2048, name)
    try:
        wait_for_oracle(name, "shm").close()
        second = start_serve(rsa2048, name)
        _, err = second.communicate(timeout=15)
        assert second.returncode != 0
        assert f"an oracle named {name!r} is already listening on" in err
        busy = subprocess.run([sys.executable, "-m", "shmkey", "clean", name],
                              capture_output=True, text=True)
        assert busy.returncode == 1 and "is running" in busy.stderr
        first.kill()                       # a crash: nothing removes its socket
        first.wait()
        assert names.socket_path(name).exists()
        cleaned = subprocess.run([sys.executable, "-m", "shmkey", "clean", name],
                                 capture_output=True, text=True)
        assert cleaned.returncode == 0, cleaned.stderr
        assert cleaned.stdout == f"removed {names.socket_path(name)}\n"
        again = subprocess.run([sys.executable, "-m", "shmkey", "clean", name],
                               capture_output=True, text=True)
        assert again.returncode == 1 and again.stdout == ""
        assert again.stderr == f"shmkey: nothing to remove for oracle {name!r}\n"
    finally:
        _process.stop(first, 0, signal.SIGKILL)
        names.clean(name)


def test_clean_removes_an_older_versions_ring(tmp_path: Path) -> None:
    """What shmkey before the socket handshake left in /dev/shm (a ring whose
    oracle is dead, and its semaphores) goes too."""
    name = unique("old")
    base = Path("/dev/shm") / names.ring_id(name)
    old = [base, base.with_name(f"sem.{base.name}-req"), base.with_name(f"sem.{base.name}-free")]
    for path in old:
        path.write_bytes(b"SKEY" + bytes(60))       # magic, and no live oracle pid
    run = subprocess.run([sys.executable, "-m", "shmkey", "clean", name], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [f"removed {p}" for p in old]
    assert not any(p.exists() for p in old)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_restart_after_sigkill_needs_no_clean(rsa2048: Path, transport: str) -> None:
    """As a service manager would: SIGKILL, then `shmkey serve` with the same
    name at once. The dead oracle's socket is replaced; clients reconnect."""
    name = unique(f"restart-{transport}")
    first = start_serve(rsa2048, name, "--transport", transport)
    second = None
    try:
        client = wait_for_oracle(name, transport)
        client.ping()
        first.kill()
        first.wait()
        assert names.socket_path(name).exists()          # left behind
        second = start_serve(rsa2048, name, "--transport", transport)
        assert wait_until(lambda: names.listening(names.socket_path(name)), timeout=15), \
            second.stderr.read() if second.poll() is not None else "not listening"
        assert second.poll() is None
        # The same client object reconnects: its old connection died with the oracle.
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except shmkey.OracleUnavailableError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        key = client.private_key()
        key.public_key().verify(key.sign(b"m", padding.PKCS1v15(), hashes.SHA256()), b"m",
                                padding.PKCS1v15(), hashes.SHA256())
        client.close()
    finally:
        _process.stop(first, 0, signal.SIGKILL)
        if second is not None:
            _process.stop(second, 15)
        names.clean(name)


def test_connect_to_nothing() -> None:
    with pytest.raises(shmkey.OracleUnavailableError, match="no oracle named 'no-such-oracle-here'"):
        shmkey.connect("no-such-oracle-here")
    with pytest.raises(shmkey.ConfigError):
        shmkey.connect("../etc/passwd")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_serve_refuses_to_stay_root(rsa2048: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "shmkey", "serve", "--key", str(rsa2048)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "refusing to run the key oracle as root: pass --user USER" in proc.stderr


def test_serve_reports_bad_key_and_exits(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "shmkey", "serve", "--allow-root", "--key",
                           str(tmp_path / "nope.pem")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "cannot read key file" in proc.stderr


def test_runtime_dir_option_places_the_socket(rsa2048: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``--runtime-dir`` decides where the socket goes, as its variable would."""
    rundir = tmp_path / "run"
    rundir.mkdir(mode=0o700)
    name = unique("serve-rundir")
    proc = start_serve(rsa2048, name, "--transport", "socketpair", "--runtime-dir", str(rundir))
    try:
        monkeypatch.setenv("SHMKEY_RUNTIME_DIR", str(rundir))
        client = wait_for_oracle(name, "socketpair")
        assert client.private_key().key_size == 2048
        client.close()
        assert names.socket_path(name).parent == rundir and names.socket_path(name).exists()
    finally:
        _process.stop(proc, 15)
    assert not (rundir / names.socket_path(name).name).exists()

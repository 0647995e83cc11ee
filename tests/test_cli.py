"""The `shmkey` command as a new user meets it: each rough edge once found,
with its exact message now."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import shmkey
from shmkey import _process, names
from shmkey.config import Config

from .conftest import unique
from .test_status import Oracle

ROOT = ["--allow-root"] if os.geteuid() == 0 else []


def _cli(*args: str, env: dict[str, str] | None = None,
         stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shmkey", *args], capture_output=True, text=True,
                          timeout=60, input=stdin, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory, rsa2048: Path) -> Iterator[Oracle]:
    o = Oracle(tmp_path_factory.mktemp("cli"), [rsa2048])
    yield o
    o.stop()


@pytest.fixture(scope="module")
def encrypted_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("enc") / "enc.pem"
    path.write_bytes(rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"s3cret")))
    return path


def test_clean_with_nothing_left_fails() -> None:
    name = unique("nothing")
    r = _cli("clean", name)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == f"shmkey: nothing to remove for oracle {name!r}\n"


def test_errors_name_the_option_typed(rsa2048: Path) -> None:
    r = _cli("serve", "--key", str(rsa2048), "--slots", "0", *ROOT)
    assert r.returncode == 2
    assert r.stderr == "shmkey: --slots=0 is out of range; valid range 1 to 1024\n"
    r = _cli("serve", "--key", str(rsa2048), *ROOT, env={"SHMKEY_SLOTS": "0"})
    assert r.stderr == "shmkey: SHMKEY_SLOTS='0' is out of range; valid range 1 to 1024\n"


def test_help_has_no_variables_as_metavars_and_real_defaults() -> None:
    text = " ".join(_cli("serve", "--help").stdout.split())
    assert "--slots N " in text and "--runtime-dir DIR " in text
    assert "--transport {shm,socketpair} " in text
    assert "--slots SHMKEY" not in text and "or )" not in text
    assert "(default: 16; $SHMKEY_SLOTS overrides)" in text
    assert "(default: none; $SHMKEY_PKCS11_MODULE sets it)" in text
    given = " ".join(_cli("serve", "--help", env={"SHMKEY_SLOTS": "4"}).stdout.split())
    assert "(default: 4, from $SHMKEY_SLOTS)" in given


def test_keyref_to_stdout(oracle: Oracle) -> None:
    r = _cli("keyref", "--oracle", oracle.name, "-o", "-")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("-----BEGIN SHMKEY KEY REFERENCE-----\n")
    assert r.stdout.endswith("-----END SHMKEY KEY REFERENCE-----\n")
    assert r.stderr.startswith("wrote standard output: RSA-2048 SHA256:")


def test_keyref_into_a_missing_or_wrong_place(oracle: Oracle, tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "k.pem"
    r = _cli("keyref", "--oracle", oracle.name, "-o", str(missing))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"shmkey: cannot write {missing}: No such file or directory\n"
    r = _cli("keyref", "--oracle", oracle.name, "-o", str(tmp_path))
    assert r.stderr == f"shmkey: cannot write {tmp_path}: Is a directory\n"
    assert list(tmp_path.iterdir()) == []          # no temporary file left


def test_openssl_conf_output_and_timeout(tmp_path: Path) -> None:
    out = tmp_path / "shmkey.cnf"
    assert _cli("openssl-conf", "--timeout-ms", "250", "-o", str(out)).returncode == 0
    assert "timeout_ms = 250\n" in out.read_text()
    assert _cli("openssl-conf", "-o", "-").stdout == _cli("openssl-conf").stdout
    r = _cli("openssl-conf", "--timeout-ms", "0")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "shmkey: --timeout-ms=0 is out of range; valid range 1 to 600000\n"


def test_proxy_given_a_key_reference(oracle: Oracle, tmp_path: Path) -> None:
    ref = tmp_path / "k.ref.pem"
    assert _cli("keyref", "--oracle", oracle.name, "-o", str(ref)).returncode == 0
    r = _cli("proxy", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9", "--cert", str(ref),
             "--key", str(ref), *ROOT)
    assert r.returncode == 2
    assert r.stderr.endswith(f"shmkey: {ref}: that is a key reference, not a private key; use "
                             "--oracle NAME with the oracle it names\n")


def test_misspelt_variables_are_warned_about() -> None:
    r = _cli("settings", env={"SHMKEY_SLOT": "4", "SHMKEY_BOGUS": "1"})
    assert r.returncode == 0
    assert r.stderr == ("shmkey: warning: SHMKEY_BOGUS is not a shmkey setting (shmkey settings "
                        "lists them)\n"
                        "shmkey: warning: SHMKEY_SLOT is not a shmkey setting; did you mean "
                        "SHMKEY_SLOTS?\n")


def _serve_args(key: Path, name: str, status_w: int) -> list[str]:
    return [sys.executable, "-m", "shmkey", "serve", "--key", str(key), "--name", name,
            "--password-stdin", "--status-fd", str(status_w), *ROOT]


def _ready(r: int) -> dict:
    ready, _, _ = select.select([r], [], [], 30)
    return json.loads(os.read(r, 4096) if ready else b"{}")


def test_password_stdin_stops_at_the_first_newline(encrypted_key: Path) -> None:
    name = unique("pw")
    r, w = os.pipe()
    proc = subprocess.Popen(_serve_args(encrypted_key, name, w), pass_fds=[w],
                            stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
    os.close(w)
    try:
        assert proc.stdin is not None
        proc.stdin.write(b"s3cret\nthe rest of a here-document\n")
        proc.stdin.flush()         # left open: reading to the end would wait for ever
        info = _ready(r)
        assert info.get("ok"), info
    finally:
        os.close(r)
        _process.stop(proc, 10)
        names.clean(name)


def test_password_from_a_terminal_is_not_echoed(encrypted_key: Path) -> None:
    name = unique("pw")
    r, w = os.pipe()
    master, slave = pty.openpty()
    proc = subprocess.Popen(_serve_args(encrypted_key, name, w), pass_fds=[w], stdin=slave,
                            stdout=slave, stderr=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(w)
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while b"password" not in seen:
            assert time.monotonic() < deadline, seen
            if select.select([master], [], [], 1)[0]:
                seen += os.read(master, 1024)
        os.write(master, b"s3cret\n")
        info = _ready(r)
        while select.select([master], [], [], 0.5)[0]:
            try:
                seen += os.read(master, 1024)
            except OSError:
                break
        assert info.get("ok"), info
        assert b"key password: " in seen and b"s3cret" not in seen
    finally:
        os.close(r)
        os.close(master)
        _process.stop(proc, 10)
        names.clean(name)


def test_serve_start_up_line_lists_keys_slots_and_channel(oracle: Oracle, rsa2048: Path) -> None:
    line = [x for x in oracle.log.read_text().splitlines() if " serving (pid " in x][0]
    kid = shmkey.key_id(serialization.load_pem_private_key(rsa2048.read_bytes(), None).public_key())
    workers = Config.load().workers
    assert line.endswith(f"oracle {oracle.name} serving (pid {oracle.proc.pid}): keys RSA-2048 "
                         f"{kid.hex()[:16]}; shm, 16 slots of 2048 bytes per client, {workers} "
                         f"thread workers; on socket {names.find_socket(oracle.name)}")


def test_settings_shows_values_in_force_and_flags_invalid_ones() -> None:
    r = _cli("settings", env={"SHMKEY_SLOTS": "0", "SHMKEY_WORKERS": "3"})
    assert r.returncode == 1
    assert "\n  INVALID: SHMKEY_SLOTS='0' is out of range; valid range 1 to 1024\n" in r.stdout
    assert "\n  SHMKEY_WORKERS=3\n" in r.stdout
    assert "\n  SHMKEY_SPIN_US=500 (default)\n" in r.stdout


def test_help_without_rst_markup() -> None:
    text = _cli("--help").stdout
    assert "``" not in text and "'serve' runs a key oracle" in text


def test_a_closed_pipe_is_no_traceback() -> None:
    r, w = os.pipe()
    os.close(r)                    # the reader is gone before anything is written
    proc = subprocess.run([sys.executable, "-m", "shmkey", "settings"], stdout=w,
                          stderr=subprocess.PIPE, text=True, timeout=60)
    os.close(w)
    assert proc.returncode == 1 and proc.stderr == ""

"""The `shmkey` command as a new user meets it: each rough edge once found,
with its exact message now."""
from __future__ import annotations

import fcntl
import grp
import json
import os
import pty
import pwd
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Callable, Iterator
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


# ---- as an ordinary user: --user, --group and clean, refused in one line ----

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                                reason="needs root to act as other users")
AS_USER = Path(__file__).with_name("as_user.py")
NOBODY = pwd.getpwnam("nobody").pw_uid
DAEMON = pwd.getpwnam("daemon").pw_uid
DAEMON_GID = grp.getgrnam("daemon").gr_gid


def _as(user: str, groups: str, home: Path, *args: str,
        pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[str]:
    """``shmkey ARGS`` as ``user`` (tests/as_user.py: setpriv's drop, after the
    imports), its runtime directory and home ``home``."""
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(home),
           "SHMKEY_RUNTIME_DIR": str(home)}
    return subprocess.Popen([sys.executable, str(AS_USER), user, groups, "--", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            pass_fds=pass_fds)


def _run_as(user: str, groups: str, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = _as(user, groups, home, *args)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _one_logged_line(r: subprocess.CompletedProcess[str]) -> str:
    """The oracle's one log line of a refusal, without its ``shmkey[PID] ERROR``."""
    assert r.returncode == 2 and r.stdout == "", r
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("shmkey["), r.stderr
    return lines[0].split("] ERROR ", 1)[1]


@pytest.fixture
def home_of(rsa2048: Path) -> Iterator[Callable[[str], Path]]:
    """A directory of the user's own (0700, or 0755 for others to look into),
    holding a copy of an RSA key it can read."""
    made: list[Path] = []

    def make(user: str, mode: int = 0o700) -> Path:
        d = Path(tempfile.mkdtemp(prefix="shmkey-cli-"))
        made.append(d)
        key = d / "k.pem"
        shutil.copy(rsa2048, key)
        pw = pwd.getpwnam(user)
        for path in (d, key):
            os.chown(path, pw.pw_uid, pw.pw_gid)
        d.chmod(mode)
        return d

    yield make
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


@needs_root
def test_user_without_root_is_refused(home_of: Callable[[str], Path]) -> None:
    home = home_of("nobody")
    key = str(home / "k.pem")
    serve = _run_as("nobody", "nogroup", home, "serve", "--key", key, "--user", "daemon")
    assert _one_logged_line(serve) == (f"--user needs root: the oracle runs as uid {NOBODY} and "
                                       "cannot change user; start it as root, or leave out --user")
    proxy = _run_as("nobody", "nogroup", home, "proxy", "--listen", "127.0.0.1:0", "--backend",
                    "127.0.0.1:9", "--cert", key, "--key", key, "--user", "daemon")
    assert (proxy.returncode, proxy.stdout) == (2, "")
    assert proxy.stderr == (f"shmkey: --user needs root: the proxy runs as uid {NOBODY} and "
                            "cannot change user; start it as root, or leave out --user\n")


def _serve_as(user: str, groups: str, home: Path, *extra: str) -> tuple[subprocess.Popen[str],
                                                                         dict]:
    """A real oracle of ``user`` in ``home``, and what its status pipe said."""
    r, w = os.pipe()
    proc = _as(user, groups, home, "serve", "--key", str(home / "k.pem"), "--workers", "1",
               "--status-fd", str(w), *extra, pass_fds=(w,))
    os.close(w)
    try:
        return proc, _ready(r)
    finally:
        os.close(r)


@needs_root
def test_group_the_user_is_not_in_is_refused(home_of: Callable[[str], Path]) -> None:
    home = home_of("nobody")
    key = str(home / "k.pem")
    outsider = _run_as("nobody", "nogroup", home, "serve", "--key", key, "--group", "daemon")
    assert _one_logged_line(outsider) == (
        f"--group daemon: nobody (uid {NOBODY}) is not a member of group daemon (gid "
        f"{DAEMON_GID}), so cannot give it the socket; add the user to the group, or leave out "
        "--group")
    unknown = _run_as("nobody", "nogroup", home, "serve", "--key", key, "--group", "no-such-grp")
    assert _one_logged_line(unknown) == "--group no-such-grp: no group 'no-such-grp' on this system"
    # The control: a member gives its group the socket.
    name = unique("grp")
    member, info = _serve_as("nobody", "nogroup,daemon", home, "--group", "daemon", "--name", name)
    try:
        assert info.get("ok"), (info, member.stderr and member.stderr.read())
        st = os.stat(home / f"shmkey-{name}.sock")
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (NOBODY, DAEMON_GID, 0o660)
    finally:
        member.terminate()
        member.communicate(timeout=30)


def test_unknown_group_as_root_is_refused(rsa2048: Path) -> None:
    r = _cli("serve", "--key", str(rsa2048), "--group", "no-such-grp", *ROOT)
    assert _one_logged_line(r) == "--group no-such-grp: no group 'no-such-grp' on this system"


@needs_root
def test_clean_without_permission(home_of: Callable[[str], Path]) -> None:
    """Oracles of daemon's, in daemon's directory; nobody's clean may remove
    none of their sockets, and says so; daemon's clean does."""
    home = home_of("daemon", 0o755)
    live, dead, shared = (unique(n) for n in ("live", "dead", "shared"))
    oracles = {n: _serve_as("daemon", "daemon", home, "--name", n, *extra)
               for n, extra in ((live, ()), (dead, ()), (shared, ("--group", "daemon")))}
    try:
        assert all(info.get("ok") for _, info in oracles.values()), oracles
        for n in (dead, shared):
            oracles[n][0].send_signal(signal.SIGKILL)     # its socket stays behind
            oracles[n][0].communicate(timeout=30)

        def sock(n: str) -> Path:
            return home / f"shmkey-{n}.sock"

        def cannot(n: str, why: str) -> str:
            return (f"shmkey: cannot remove {sock(n)}: {why}; this is nobody (uid {NOBODY}): run "
                    "shmkey clean as daemon or as root\n")

        unprobed = (f"cannot connect to it to see whether its oracle still runs (Permission "
                    f"denied: the socket is daemon's, uid {DAEMON})")
        for n in (live, dead):
            r = _run_as("nobody", "nogroup", home, "clean", n)
            assert (r.returncode, r.stdout, r.stderr) == (1, "", cannot(n, unprobed))
        # A member of the socket's group can tell it is stale, but not remove it.
        r = _run_as("nobody", "nogroup,daemon", home, "clean", shared)
        assert (r.returncode, r.stdout) == (1, "")
        assert r.stderr == cannot(shared, f"Permission denied (directory {home} is daemon's, "
                                          f"uid {DAEMON})")
        assert all(sock(n).exists() for n in (live, dead, shared))
        assert oracles[live][0].poll() is None
        for n in (dead, shared):
            r = _run_as("daemon", "daemon", home, "clean", n)
            assert (r.returncode, r.stdout) == (0, f"removed {sock(n)}\n"), r.stderr
    finally:
        for proc, _ in oracles.values():
            proc.terminate()
            proc.communicate(timeout=30)


def test_openssl_conf_into_a_missing_place(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "shmkey.cnf"
    r = _cli("openssl-conf", "-o", str(missing))
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == f"shmkey: cannot write {missing}: No such file or directory\n"


@needs_root
def test_writing_into_a_directory_not_ours(home_of: Callable[[str], Path]) -> None:
    """keyref (from nobody's own oracle) and openssl-conf, as nobody, into a
    directory of root's: one line each, nothing left there."""
    home = home_of("nobody")
    theirs = Path(tempfile.mkdtemp(prefix="shmkey-root-"))
    theirs.chmod(0o755)
    name = unique("ref")
    proc, info = _serve_as("nobody", "nogroup", home, "--name", name)
    try:
        assert info.get("ok"), info
        for args in (("keyref", "--oracle", name), ("openssl-conf",)):
            out = theirs / "out.pem"
            r = _run_as("nobody", "nogroup", home, *args, "-o", str(out))
            assert (r.returncode, r.stdout) == (2, ""), r
            assert r.stderr == f"shmkey: cannot write {out}: Permission denied\n"
        assert list(theirs.iterdir()) == []
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
        shutil.rmtree(theirs)

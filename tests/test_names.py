"""Oracle names and the socket directory: one rule in C (common.c), which
Python (shmkey.names), the oracle and the OpenSSL provider all apply. The
rules for other users run as real other users, through setpriv."""
from __future__ import annotations

import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from shmkey import names
from shmkey.errors import ConfigError, OracleAccessError, OracleUnavailableError
from shmkey.openssl import keyref, openssl_conf

from .ctools import build_tool

# The rule restated as a regex, to test the C against it.
SPEC = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")


@pytest.mark.parametrize("name", ["web", "a", "A.b-c_9", "x" * 64, "-dash", "anon-0f"])
def test_valid_names(name: str) -> None:
    assert names.check_name(name) == name
    assert names.ring_id(name) == f"shmkey-{name}"


@pytest.mark.parametrize("name", ["", ".hidden", "x" * 65, "a/b", "a b", "web\n", "a\0b", "é",
                                  "..", "a:b"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(ConfigError, match="is invalid: use 1 to 64 letters, digits, '_', '.' "
                                          "or '-'"):
        names.check_name(name)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=0x7f), max_size=70))
def test_names_follow_the_rule(name: str) -> None:
    valid = SPEC.fullmatch(name) is not None
    try:
        names.check_name(name)
    except ConfigError:
        assert not valid
    else:
        assert valid


@pytest.fixture
def xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh XDG_RUNTIME_DIR and no SHMKEY_RUNTIME_DIR."""
    monkeypatch.delenv("SHMKEY_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    return tmp_path


needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                                reason="needs root and setpriv to act as another user")

@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A directory under /tmp other users can reach (pytest's are root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="shmkey-names-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def probe() -> Iterator[Path]:
    """rundir_probe: the C rule, run as another user (in a directory it can reach)."""
    d = Path(tempfile.mkdtemp(prefix="shmkey-probe-"))
    os.chmod(d, 0o755)
    try:
        yield build_tool("rundir_probe", d)
    finally:
        shutil.rmtree(d)


def rule_as(probe: Path, uid: int, gid: int, env: dict[str, str], create: bool = True) -> str:
    run = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                          str(probe), "create" if create else "look"],
                         env={k: v for k, v in env.items() if k != "SHMKEY_RUNTIME_DIR"},
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


@pytest.mark.skipif(os.geteuid() != 0, reason="the rule for root")
def test_root_uses_run_shmkey(xdg: Path) -> None:
    assert names.runtime_dir() == Path("/run/shmkey")
    st = os.stat("/run/shmkey")
    assert st.st_uid == 0 and not st.st_mode & 0o022
    assert names.socket_path("web") == Path("/run/shmkey/shmkey-web.sock")


@pytest.mark.skipif(os.geteuid() != 0, reason="the rule for root")
def test_run_shmkey_made_under_the_oracles_umask_is_0755(probe: Path) -> None:
    """The oracle runs with umask 077; the directory it makes must still let
    the users it serves (nginx's workers) reach their socket in it."""
    saved = Path(tempfile.mkdtemp(prefix="run-shmkey-saved-", dir="/run"))
    had = Path("/run/shmkey").exists()
    if had:
        os.rename("/run/shmkey", saved / "shmkey")
    try:
        run = subprocess.run(["sh", "-c", f"umask 077 && exec {probe} create"],
                             capture_output=True, text=True, timeout=60)
        assert run.stdout.strip() == "/run/shmkey", run.stdout + run.stderr
        assert os.stat("/run/shmkey").st_mode & 0o777 == 0o755
    finally:
        shutil.rmtree("/run/shmkey", ignore_errors=True)
        if had:
            os.rename(saved / "shmkey", "/run/shmkey")
        saved.rmdir()


@needs_root
def test_a_user_gets_a_private_xdg_directory(probe: Path, open_tmp: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    xdg = open_tmp / "xdg"
    xdg.mkdir(mode=0o700)
    os.chown(xdg, nobody.pw_uid, nobody.pw_gid)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(xdg))
    assert rule_as(probe, nobody.pw_uid, nobody.pw_gid, env) == f"{xdg}/shmkey"
    assert stat.S_IMODE((xdg / "shmkey").stat().st_mode) == 0o700
    os.chmod(xdg / "shmkey", 0o770)
    assert "must be a directory owned by root or uid" in rule_as(probe, nobody.pw_uid,
                                                                   nobody.pw_gid, env)


@needs_root
def test_squatting_the_tmp_directory_denies_nothing(probe: Path, open_tmp: Path) -> None:
    """Another user may create /tmp/shmkey-UID first: the rule moves on to a
    directory in the victim's own home, which nobody else can make."""
    victim = f"shmkey-t{os.getpid() % 100000}"
    home = open_tmp / "home"
    home.mkdir()
    subprocess.run(["useradd", "--no-create-home", "--home-dir", str(home), "--shell",
                    "/usr/sbin/nologin", victim], check=True, capture_output=True)
    try:
        pw = pwd.getpwnam(victim)
        os.chown(home, pw.pw_uid, pw.pw_gid)
        os.chmod(home, 0o700)
        squatted = Path(f"/tmp/shmkey-{pw.pw_uid}")
        squatted.mkdir(mode=0o777)
        os.chown(squatted, pwd.getpwnam("nobody").pw_uid, -1)     # the squatter's
        env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
        assert rule_as(probe, pw.pw_uid, pw.pw_gid, env) == f"{home}/.shmkey"
        assert rule_as(probe, pw.pw_uid, pw.pw_gid, env, create=False) == f"{home}/.shmkey"
        assert stat.S_IMODE((home / ".shmkey").stat().st_mode) == 0o700
        squatted.rmdir()
        # Unsquatted, the first choice is the victim's own again.
        assert rule_as(probe, pw.pw_uid, pw.pw_gid, env) == str(squatted)
    finally:
        shutil.rmtree(f"/tmp/shmkey-{pwd.getpwnam(victim).pw_uid}", ignore_errors=True)
        subprocess.run(["userdel", victim], capture_output=True)


def test_configured_directory(xdg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    monkeypatch.setenv("SHMKEY_RUNTIME_DIR", f" {shared} ")
    assert names.socket_path("web") == shared / "shmkey-web.sock"
    assert names.find_socket("web") == shared / "shmkey-web.sock"
    os.chmod(shared, 0o775)
    with pytest.raises(OracleAccessError, match=f"SHMKEY_RUNTIME_DIR={shared}: socket directory "
                       f"{shared} must be a directory that no group or other user can write to"):
        names.runtime_dir()
    monkeypatch.setenv("SHMKEY_RUNTIME_DIR", str(tmp_path / "missing"))
    with pytest.raises(OracleUnavailableError, match=f"SHMKEY_RUNTIME_DIR={tmp_path}/missing: "
                       f"socket directory {tmp_path}/missing: No such file or directory"):
        names.runtime_dir()
    monkeypatch.setenv("SHMKEY_RUNTIME_DIR", "relative")
    with pytest.raises(ConfigError, match="SHMKEY_RUNTIME_DIR='relative' is not valid"):
        names.runtime_dir()


def test_clients_look_in_run_shmkey_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHMKEY_RUNTIME_DIR", raising=False)
    with pytest.raises(OracleUnavailableError, match="no oracle named 'nobody-here' is running "
                       r"\(no socket .*/run/shmkey/shmkey-nobody-here.sock\)"):
        names.find_socket("nobody-here")


@pytest.mark.parametrize("setting,message", [
    ("open", "permission denied:.*SHMKEY_RUNTIME_DIR={dir}/open: socket directory {dir}/open "
             "must be a directory that no group or other user can write to"),
    ("relative", "invalid argument:.*SHMKEY_RUNTIME_DIR=relative is not an absolute path"),
    ("missing", "the key oracle is not running:.*SHMKEY_RUNTIME_DIR={dir}/missing: socket "
                "directory {dir}/missing: No such file or directory"),
])
def test_provider_applies_the_same_rule(tmp_path: Path, setting: str, message: str) -> None:
    """The provider, in `openssl`, finds its socket by the same rule, with the same words."""
    public = ec.derive_private_key(7, ec.SECP256R1()).public_key()    # nothing secret
    ref = tmp_path / "key.ref.pem"
    ref.write_bytes(keyref.KeyReference("nobody-here", public, "socketpair").to_pem())
    cnf = tmp_path / "shmkey.cnf"
    cnf.write_text(openssl_conf())
    (tmp_path / "open").mkdir()
    os.chmod(tmp_path / "open", 0o777)
    (tmp_path / "message").write_bytes(b"hello")
    configured = {"open": str(tmp_path / "open"), "relative": "relative",
                  "missing": str(tmp_path / "missing")}[setting]
    run = subprocess.run(["openssl", "pkeyutl", "-sign", "-inkey", str(ref), "-rawin", "-digest",
                          "sha256", "-in", str(tmp_path / "message")],
                         env=dict(os.environ, OPENSSL_CONF=str(cnf), SHMKEY_RUNTIME_DIR=configured),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert re.search(message.format(dir=re.escape(str(tmp_path))), run.stderr), run.stderr

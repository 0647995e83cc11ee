"""Oracle names and the socket directory: one rule in C (common.c), which
Python (shmkey.names), the ring and the OpenSSL provider all apply."""
from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from shmkey import names
from shmkey.errors import ConfigError, OracleAccessError
from shmkey.openssl import keyref, openssl_conf

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


def test_default_directory_is_created_private(xdg: Path) -> None:
    assert names.runtime_dir() == xdg / "shmkey"
    assert stat.S_IMODE((xdg / "shmkey").stat().st_mode) == 0o700
    assert names.socket_path("web") == xdg / "shmkey" / "shmkey-web.sock"


def test_default_directory_open_to_others_is_refused(xdg: Path) -> None:
    (xdg / "shmkey").mkdir(mode=0o700)
    os.chmod(xdg / "shmkey", 0o750)
    with pytest.raises(OracleAccessError, match=f"socket directory {xdg}/shmkey must be a "
                       f"directory owned by uid {os.geteuid()} with mode 0700; refusing"):
        names.runtime_dir()


def test_default_directory_that_is_a_link_is_refused(xdg: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (xdg / "shmkey").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OracleAccessError, match="must be a directory owned by uid"):
        names.runtime_dir()


def test_default_directory_that_cannot_be_made(xdg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg / "missing"))
    with pytest.raises(OracleAccessError, match=f"cannot create socket directory "
                       f"{xdg}/missing/shmkey: No such file or directory"):
        names.runtime_dir()


def test_configured_directory(xdg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    monkeypatch.setenv("SHMKEY_RUNTIME_DIR", f" {shared} ")
    assert names.socket_path("web") == shared / "shmkey-web.sock"
    os.chmod(shared, 0o775)
    with pytest.raises(OracleAccessError, match=f"SHMKEY_RUNTIME_DIR={shared} must be a directory "
                                                "that no group or other user can write to"):
        names.runtime_dir()
    monkeypatch.setenv("SHMKEY_RUNTIME_DIR", str(tmp_path / "missing"))
    with pytest.raises(OracleAccessError, match=f"SHMKEY_RUNTIME_DIR={tmp_path}/missing: "
                                                "No such file or directory"):
        names.runtime_dir()
    monkeypatch.setenv("SHMKEY_RUNTIME_DIR", "relative")
    with pytest.raises(ConfigError, match="SHMKEY_RUNTIME_DIR='relative' is not valid"):
        names.runtime_dir()


@pytest.mark.parametrize("setting,message", [
    ("open", "permission denied:.*SHMKEY_RUNTIME_DIR={dir}/open must be a directory that no "
             "group or other user can write to"),
    ("relative", "invalid argument:.*SHMKEY_RUNTIME_DIR=relative is not an absolute path"),
    ("missing", "the key oracle is not running:.*SHMKEY_RUNTIME_DIR={dir}/missing: No such "
                "file or directory"),
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

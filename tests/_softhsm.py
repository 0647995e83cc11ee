"""A SoftHSM2 token in a temporary directory, for the PKCS#11 tests and
benchmarks: its own ``softhsm2.conf`` (``SOFTHSM2_CONF``, set in this
process's environment so children inherit it), a token ``web`` with PIN
``1234``, and an RSA-2048, a P-256 and an Ed25519 key imported with Debian's
``softhsm2-util`` from files whose public keys the tests verify against.
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cryptography.hazmat.primitives import serialization

from shmkey.tools import certs

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "1234"
SO_PIN = "56781234"
LABEL = "web"
#: object label -> (key kind for certs.write_key_and_cert, CKA_ID hex)
OBJECTS = {"tls-rsa": ("rsa", "01"), "tls-ec": ("p256", "02"), "tls-ed": ("ed25519", "03")}


def available() -> bool:
    """SoftHSM2 and its tool are installed (scripts/bootstrap.sh installs them)."""
    return os.path.exists(MODULE) and shutil.which("softhsm2-util") is not None


@dataclass
class TokenKey:
    """One key imported into the token: its file twin's public key and certificate."""

    label: str
    id_hex: str
    public_key: Any
    cert: Path
    key_file: Path

    def uri(self, module: bool = True, pin: Optional[str] = PIN, **extra: str) -> str:
        """An RFC 7512 URI of this key in the test token."""
        query = [f"module-path={MODULE}"] if module else []
        if pin is not None:
            query.append(f"pin-value={pin}")
        query += [f"{k.replace('_', '-')}={v}" for k, v in extra.items()]
        return f"pkcs11:token={LABEL};object={self.label}" + ("?" + "&".join(query) if query else "")


class SoftHSM:
    """The token; a context manager that restores ``SOFTHSM2_CONF`` on exit.

    Args:
        directory: an empty directory to hold the configuration and the token.
        owner: a user (name) to give the token directory to, so that an oracle
            that drops to it can still read its objects (SoftHSM2 rereads them).
    """

    def __init__(self, directory: Path, owner: Optional[str] = None) -> None:
        self.dir = directory
        self.module, self.label = MODULE, LABEL
        self.tokendir = directory / "tokens"
        self.conf = directory / "softhsm2.conf"
        self.owner = owner
        self.keys: dict[str, TokenKey] = {}
        self._old_conf: Optional[str] = None

    def __enter__(self) -> SoftHSM:
        self.tokendir.mkdir()
        self.conf.write_text(f"directories.tokendir = {self.tokendir}\n"
                             "objectstore.backend = file\nlog.level = ERROR\n"
                             "slots.removable = false\n")
        self._old_conf = os.environ.get("SOFTHSM2_CONF")
        os.environ["SOFTHSM2_CONF"] = str(self.conf)
        self.init_token()
        for label, (kind, id_hex) in OBJECTS.items():
            self.keys[label] = self.import_key(label, kind, id_hex)
        self.give_away()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old_conf is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = self._old_conf

    def util(self, *args: str) -> str:
        """Run ``softhsm2-util`` on this token's configuration."""
        out = subprocess.run(["softhsm2-util", *args], capture_output=True, text=True,
                             env={**os.environ, "SOFTHSM2_CONF": str(self.conf)})
        if out.returncode != 0:
            raise RuntimeError(f"softhsm2-util {' '.join(args)}: {out.stderr or out.stdout}")
        return out.stdout

    def init_token(self) -> None:
        """A fresh token ``web`` in the first free slot."""
        self.util("--init-token", "--free", "--label", LABEL, "--pin", PIN, "--so-pin", SO_PIN)

    def import_key(self, label: str, kind: str, id_hex: str) -> TokenKey:
        """A fresh key of ``kind`` written to a file, then imported into the token."""
        key, key_file, cert = certs.write_key_and_cert(self.dir, label, kind)
        self.util("--import", str(key_file), "--token", LABEL, "--label", label, "--id", id_hex,
                  "--pin", PIN)
        return TokenKey(label, id_hex, key.public_key(), cert, key_file)

    def give_away(self) -> None:
        """Hand the token directory to ``owner`` (when given and we are root)."""
        if self.owner is None or os.geteuid() != 0:
            return
        pw = pwd.getpwnam(self.owner)
        for root, dirs, files in os.walk(self.tokendir):
            for entry in [root] + [os.path.join(root, n) for n in dirs + files]:
                os.chown(entry, pw.pw_uid, pw.pw_gid)

    def spki(self, label: str) -> bytes:
        """SubjectPublicKeyInfo DER of an imported key, from its file twin."""
        return bytes(self.keys[label].public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))

"""What ``shmkey status`` and ``shmkey list`` ask: an oracle's status
document, over a connection of its own, and every oracle whose socket this
user can see.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .. import names
from .._binding import lib
from ..config import Config
from ..errors import ShmkeyError
from .connection import OracleClient

_PREFIX, _SUFFIX = "shmkey-", ".sock"


def connect(path: Path, timeout_ms: int) -> OracleClient:
    """A connection for status requests to the oracle listening at ``path``.

    Any user's oracle may answer: the document says which uid serves it, as
    SO_PEERCRED gives it. A socket connection, so that no ring is made for it.

    Raises:
        OracleUnavailableError, OracleAccessError: as connecting does.
    """
    return OracleClient.open(path=str(path), transport="socketpair",
                             oracle_uid=lib.SHMKEY_UID_ANY, timeout_ms=timeout_ms)


def read(path: Path, timeout_ms: int) -> dict[str, Any]:
    """The status of the oracle listening at ``path``, over a connection of its own.

    Raises:
        OracleUnavailableError, OracleAccessError, ProtocolError: as connecting and asking do.
    """
    client = connect(path, timeout_ms)
    try:
        return client.status()
    finally:
        client.close()


def status(name: str, runtime_dir: Optional[str] = None,
           timeout_ms: Optional[int] = None) -> dict[str, Any]:
    """The status of oracle ``name``, found as clients find it.

    Raises:
        OracleUnavailableError: no oracle of that name is running.
    """
    cfg = Config.load(runtime_dir=runtime_dir, timeout_ms=timeout_ms)
    return read(names.find_socket(name, cfg.runtime_dir), cfg.timeout_ms)


def sockets(runtime_dir: Optional[str] = None) -> dict[str, Path]:
    """Oracle name -> socket, in the directories where clients look for them
    (ours, then /run/shmkey; only ``SHMKEY_RUNTIME_DIR`` if it is set)."""
    cfg = Config.load(runtime_dir=runtime_dir)
    dirs: list[Path] = []
    try:
        dirs.append(names.runtime_dir(cfg.runtime_dir, create=False))
    except ShmkeyError:
        pass
    if not cfg.runtime_dir and Path("/run/shmkey") not in dirs:
        dirs.append(Path("/run/shmkey"))
    found: dict[str, Path] = {}
    for d in dirs:
        try:
            entries = sorted(d.iterdir())
        except OSError:
            continue
        for entry in entries:
            n = entry.name
            if n.startswith(_PREFIX) and n.endswith(_SUFFIX):
                found.setdefault(n[len(_PREFIX):-len(_SUFFIX)], entry)
    return found


def list_all(runtime_dir: Optional[str] = None,
             timeout_ms: Optional[int] = None) -> list[dict[str, Any]]:
    """Every oracle this user can see: its status, or ``{"name", "socket", "error"}``
    for one that does not answer (stale, stopped, or not ours to ask)."""
    cfg = Config.load(runtime_dir=runtime_dir, timeout_ms=timeout_ms)
    out = []
    for name, path in sockets(runtime_dir).items():
        try:
            doc = read(path, min(cfg.timeout_ms, 2000))
        except ShmkeyError as exc:
            doc = {"name": name, "socket": str(path), "error": str(exc)}
        out.append(doc)
    return out

"""Names and life cycle of an oracle's IPC objects: the shared-memory ring and
its two semaphores (created with ``posix_ipc``, ``O_EXCL``, mode 0600 or 0660
for a named group) and the socket path of a named socket oracle.
"""
from __future__ import annotations

import grp
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import posix_ipc

from ._binding import lib
from .config import Config
from .errors import ConfigError, OracleAccessError, ShmkeyError

PREFIX = "shmkey-"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SHM_DIR = Path("/dev/shm")


def check_name(name: str) -> str:
    """Validate an operator-chosen oracle name (letters, digits, ``_.-``)."""
    if not _NAME_RE.match(name) or name.startswith("."):
        raise ConfigError(
            f"oracle name {name!r} is invalid: use 1 to 64 letters, digits, '_', '.' or '-'")
    return name


def random_name() -> str:
    """An unpredictable oracle name (96 random bits)."""
    return "anon-" + secrets.token_hex(12)


def ring_id(name: str) -> str:
    """The POSIX IPC base name of oracle ``name`` (no leading slash)."""
    return PREFIX + check_name(name)


def runtime_dir() -> Path:
    """Directory of named oracle sockets.

    ``SHMKEY_RUNTIME_DIR`` if set: the operator's choice, trusted if no group
    or other may write to it. Otherwise a directory private to this user
    (0700, ours), created if missing; anything else there is refused, so
    nobody can plant a socket for us to talk to.
    """
    configured = Config.load().runtime_dir
    if configured:
        path = Path(configured)
        try:
            st = path.stat()
        except OSError as exc:
            raise OracleAccessError(f"SHMKEY_RUNTIME_DIR={path}: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o022:
            raise OracleAccessError(f"SHMKEY_RUNTIME_DIR={path} must be a directory that no "
                                    "group or other user can write to")
        return path
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "shmkey" if base else Path(f"/tmp/shmkey-{os.geteuid()}")
    try:
        path.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise OracleAccessError(f"cannot create socket directory {path}: {exc}") from exc
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise OracleAccessError(
            f"socket directory {path} must be a directory owned by uid {os.geteuid()} "
            "with mode 0700; refusing to use it")
    return path


def socket_path(name: str) -> Path:
    """Where a named socket-transport oracle listens."""
    return runtime_dir() / f"{ring_id(name)}.sock"


def group_id(group: Optional[str]) -> Optional[int]:
    """Resolve a group name or number; None for no group."""
    if group is None:
        return None
    try:
        return int(group) if str(group).isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"group {group!r} does not exist") from None


@dataclass
class RingObjects:
    """The IPC objects of one shared-memory ring, owned by its oracle."""

    base: str
    fd: int
    size: int

    @property
    def req_sem(self) -> str:
        return f"/{self.base}-req"

    @property
    def free_sem(self) -> str:
        return f"/{self.base}-free"


def create(name: str, nslots: int, slot_size: int, gid: Optional[int] = None) -> RingObjects:
    """Create the ring segment and semaphores of oracle ``name``, exclusively.

    O_EXCL means a name that exists (left by a crashed oracle, or planted by
    someone else) is an error here, never silently reused.

    Raises:
        ShmkeyError: the name exists, or creation failed.
    """
    base = ring_id(name)
    size = lib.shmkey_ring_size(nslots, slot_size)
    mode = 0o660 if gid is not None else 0o600
    made: list[str] = []
    try:
        shm = posix_ipc.SharedMemory(f"/{base}", posix_ipc.O_CREX, mode=mode, size=size)
        made.append("shm")
        fd = os.dup(shm.fd)
        shm.close_fd()
        _restrict(fd, None, mode, gid)
        posix_ipc.Semaphore(f"/{base}-req", posix_ipc.O_CREX, mode=mode, initial_value=0).close()
        made.append("req")
        posix_ipc.Semaphore(f"/{base}-free", posix_ipc.O_CREX, mode=mode,
                            initial_value=nslots).close()
        made.append("free")
        for sem in ("req", "free"):
            _restrict(None, _SHM_DIR / f"sem.{base}-{sem}", mode, gid)
    except posix_ipc.ExistentialError:
        unlink(name, only=made)
        raise ShmkeyError(
            f"an oracle named {name!r} already exists (/dev/shm/{base}); stop it, or "
            f"remove a stale one with 'shmkey clean {name}'") from None
    except (posix_ipc.Error, OSError) as exc:
        unlink(name, only=made)
        raise ShmkeyError(f"cannot create ring {base}: {exc}") from exc
    return RingObjects(base, fd, size)


def _restrict(fd: Optional[int], path: Optional[Path], mode: int, gid: Optional[int]) -> None:
    # The umask may have narrowed the mode; a group must be set after creation.
    if fd is not None:
        if gid is not None:
            os.fchown(fd, -1, gid)
        os.fchmod(fd, mode)
    elif path is not None and path.exists():
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, mode)


def unlink(name: str, only: Optional[list[str]] = None) -> None:
    """Remove the ring objects of oracle ``name`` that exist; never raises."""
    base = ring_id(name)
    steps = {
        "shm": lambda: posix_ipc.unlink_shared_memory(f"/{base}"),
        "req": lambda: posix_ipc.unlink_semaphore(f"/{base}-req"),
        "free": lambda: posix_ipc.unlink_semaphore(f"/{base}-free"),
    }
    for key, step in steps.items():
        if only is None or key in only:
            try:
                step()
            except posix_ipc.ExistentialError:
                pass


def shm_path(name: str, part: str) -> str:
    """File of a ring object in /dev/shm: ``part`` is "shm", "req" or "free"."""
    base = ring_id(name)
    return str(_SHM_DIR / (base if part == "shm" else f"sem.{base}-{part}"))


def exists(name: str) -> bool:
    """Whether a ring segment named for oracle ``name`` exists."""
    return (_SHM_DIR / ring_id(name)).exists()

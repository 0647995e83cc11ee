"""Names and life cycle of an oracle's IPC objects: the shared-memory ring and
its two semaphores (created with ``posix_ipc``, ``O_EXCL``, mode 0600 or 0660
for a named group) and the socket path of a named socket oracle.
"""
from __future__ import annotations

import grp
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import posix_ipc

from ._binding import ffi, lib
from .config import Config
from .errors import ConfigError, OracleAccessError, ShmkeyError

_SHM_DIR = Path("/dev/shm")
_PATH_MAX = 4096
_WHY_MAX = 4096 + 256


def check_name(name: str) -> str:
    """Validate an operator-chosen oracle name (letters, digits, ``_.-``).

    The rule is C's (``shmkey_check_name``), the one the ring and the
    OpenSSL provider apply too.

    Raises:
        ConfigError: it is not a valid name.
    """
    raw = name.encode("utf-8", "replace") if isinstance(name, str) else b""
    if b"\0" in raw or lib.shmkey_check_name(raw) != lib.SHMKEY_OK:
        raise ConfigError(
            f"oracle name {name!r} is invalid: use 1 to {lib.SHMKEY_NAME_MAX} letters, digits, "
            "'_', '.' or '-'")
    return name


def random_name() -> str:
    """An unpredictable oracle name (96 random bits)."""
    return "anon-" + secrets.token_hex(12)


def ring_id(name: str) -> str:
    """The POSIX IPC base name of oracle ``name`` (no leading slash)."""
    out = ffi.new("char[]", lib.SHMKEY_NAME_MAX + 16)
    if lib.shmkey_ring_id(check_name(name).encode(), out, len(out)) != lib.SHMKEY_OK:
        raise ConfigError(f"oracle name {name!r} is invalid")
    ring: str = ffi.string(out).decode()
    return ring


def runtime_dir(configured: Optional[str] = None) -> Path:
    """Directory of named oracle sockets, created if it is the default one.

    ``SHMKEY_RUNTIME_DIR`` if set: the operator's choice, trusted if no group
    or other may write to it. Otherwise a directory private to this user
    (0700, ours): ``$XDG_RUNTIME_DIR/shmkey`` or ``/tmp/shmkey-UID``, created
    if missing; anything else there is refused, so nobody can plant a socket
    for us to talk to. The rule is C's (``shmkey_runtime_dir``), the one the
    OpenSSL provider applies too; this side checks the variable's syntax first.

    Raises:
        ConfigError: ``SHMKEY_RUNTIME_DIR`` is not an absolute path.
        OracleAccessError: the directory is missing, unsafe or cannot be created.
    """
    if configured is None:
        configured = Config.load().runtime_dir
    out = ffi.new("char[]", _PATH_MAX)
    why = ffi.new("char[]", _WHY_MAX)
    rc = lib.shmkey_runtime_dir(os.fsencode(configured), 1, out, _PATH_MAX, why, _WHY_MAX)
    if rc != lib.SHMKEY_OK:
        raise OracleAccessError(os.fsdecode(ffi.string(why)))
    return Path(os.fsdecode(ffi.string(out)))


def socket_path(name: str, configured_dir: Optional[str] = None) -> Path:
    """Where a named socket-transport oracle listens; ``configured_dir`` is
    the resolved ``runtime_dir`` setting (by default, the environment's)."""
    directory = os.fsencode(runtime_dir(configured_dir))
    out = ffi.new("char[]", _PATH_MAX)
    if lib.shmkey_socket_path(directory, check_name(name).encode(), out, _PATH_MAX) \
            != lib.SHMKEY_OK:
        raise OracleAccessError(f"the socket path of oracle {name!r} in "
                                f"{os.fsdecode(directory)} is too long")
    return Path(os.fsdecode(ffi.string(out)))


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
    steps: dict[str, Callable[[], None]] = {
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

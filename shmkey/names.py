"""Names of oracles and where they listen: the runtime directory, the socket
path, listening on it (replacing a stale socket, refusing a live one), and
removing what a killed oracle, or an old version's ring, left behind.
The rules themselves are C's (``csrc/common.c``), shared with the provider.
"""
from __future__ import annotations

import errno
import fcntl
import grp
import os
import pwd
import secrets
import socket
import stat
import struct
from pathlib import Path
from typing import Optional, Union

from ._binding import ffi, lib
from .config import Config
from .errors import ConfigError, OracleAccessError, OracleUnavailableError, ShmkeyError

_PATH_MAX = 4096
_WHY_MAX = 4096 + 256
# What versions before the socket handshake left in /dev/shm: a ring and two semaphores.
_OLD_SHM = Path("/dev/shm")
_OLD_MAGIC, _OLD_PID_AT = 0x59454B53, 24


def check_name(name: str) -> str:
    """Validate an operator-chosen oracle name (letters, digits, ``_.-``).

    The rule is C's (``shmkey_check_name``), the one the OpenSSL provider
    applies too.

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
    """The base name of oracle ``name``'s objects: ``shmkey-NAME``."""
    out = ffi.new("char[]", lib.SHMKEY_NAME_MAX + 16)
    if lib.shmkey_ring_id(check_name(name).encode(), out, len(out)) != lib.SHMKEY_OK:
        raise ConfigError(f"oracle name {name!r} is invalid")
    ring: str = ffi.string(out).decode()
    return ring


def _configured(configured: Optional[str]) -> str:
    return Config.load().runtime_dir if configured is None else configured


def _raise(rc: int, why: str) -> None:
    if rc == lib.SHMKEY_EINVAL:
        raise ConfigError(why)
    if rc == lib.SHMKEY_EUNAVAIL:
        raise OracleUnavailableError(why)
    raise OracleAccessError(why)


def runtime_dir(configured: Optional[str] = None, create: bool = True) -> Path:
    """The directory an oracle listens in, created if it is a default one.

    ``SHMKEY_RUNTIME_DIR`` if set; else ``/run/shmkey`` as root, else
    ``$XDG_RUNTIME_DIR/shmkey``, else ``/tmp/shmkey-UID`` (or ``~/.shmkey``
    if another user took that name). It must be a directory no group or other
    user may write to (a default one owned by root or by us). The rule is C's
    (``shmkey_runtime_dir``), the one the OpenSSL provider applies too.

    Raises:
        ConfigError: ``SHMKEY_RUNTIME_DIR`` is not an absolute path.
        OracleAccessError: the directory is unsafe or cannot be created.
        OracleUnavailableError: it does not exist (``create=False``).
    """
    out = ffi.new("char[]", _PATH_MAX)
    why = ffi.new("char[]", _WHY_MAX)
    rc = lib.shmkey_runtime_dir(os.fsencode(_configured(configured)), int(create), out, _PATH_MAX,
                                why, _WHY_MAX)
    if rc != lib.SHMKEY_OK:
        _raise(rc, os.fsdecode(ffi.string(why)))
    return Path(os.fsdecode(ffi.string(out)))


def socket_path(name: str, configured_dir: Optional[str] = None) -> Path:
    """Where oracle ``name`` listens when started here (the directory is made
    if it is a default one); ``configured_dir`` is the resolved
    ``runtime_dir`` setting (by default, the environment's)."""
    directory = os.fsencode(runtime_dir(configured_dir))
    out = ffi.new("char[]", _PATH_MAX)
    if lib.shmkey_socket_path(directory, check_name(name).encode(), out, _PATH_MAX) \
            != lib.SHMKEY_OK:
        raise OracleAccessError(f"the socket path of oracle {name!r} in "
                                f"{os.fsdecode(directory)} is too long")
    return Path(os.fsdecode(ffi.string(out)))


def find_socket(name: str, configured_dir: Optional[str] = None) -> Path:
    """Where a client finds oracle ``name``: in our runtime directory, else in
    ``/run/shmkey`` (oracles started as root); only ``SHMKEY_RUNTIME_DIR``
    if it is set. C's rule (``shmkey_find_socket``), as the provider's.

    Raises:
        OracleUnavailableError: no socket of that name.
        OracleAccessError, ConfigError: as :func:`runtime_dir`.
    """
    out = ffi.new("char[]", _PATH_MAX)
    why = ffi.new("char[]", _WHY_MAX)
    rc = lib.shmkey_find_socket(os.fsencode(_configured(configured_dir)),
                                check_name(name).encode(), out, _PATH_MAX, why, _WHY_MAX)
    if rc != lib.SHMKEY_OK:
        _raise(rc, os.fsdecode(ffi.string(why)))
    return Path(os.fsdecode(ffi.string(out)))


def group_id(group: Optional[str], option: str = "--group") -> Optional[int]:
    """Resolve a group name or number; None for no group.

    Raises:
        ConfigError: no such group (the message names ``option``).
    """
    if group is None:
        return None
    try:
        return int(group) if str(group).isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"{option} {group}: no group {group!r} on this system") from None


def socket_group(group: Optional[str], option: str = "--group") -> Optional[int]:
    """The gid to give an oracle's socket: ``group`` resolved, and one this
    process may give a file (root: any; anyone else: one of its own groups).

    Raises:
        ConfigError: no such group, or we are not in it (names the user and group).
    """
    gid = group_id(group, option)
    if gid is None or os.geteuid() == 0 or gid == os.getegid() or gid in os.getgroups():
        return gid
    uid = os.geteuid()
    raise ConfigError(f"{option} {group}: {user_name(uid)} (uid {uid}) is not a member of group "
                      f"{group_name(gid)} (gid {gid}), so cannot give it the socket; add the user "
                      f"to the group, or leave out {option}")


def require_root(option: str, process: str) -> None:
    """Changing user needs root: refuse ``option`` in a ``process`` that is not.

    Raises:
        ConfigError: we are not root; says what to do instead.
    """
    euid = os.geteuid()
    if euid != 0:
        raise ConfigError(f"{option} needs root: the {process} runs as uid {euid} and cannot "
                          f"change user; start it as root, or leave out {option}")


def group_name(gid: int) -> str:
    """A gid's name, or the number when it has none."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def user_name(uid: int) -> str:
    """A uid's name, or the number when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def user_id(user: Union[str, int]) -> int:
    """Resolve a user name or number to a uid.

    Raises:
        ConfigError: no such user name.
    """
    if isinstance(user, int) or str(user).isdigit():
        return int(user)
    try:
        return pwd.getpwnam(str(user)).pw_uid
    except KeyError:
        raise ConfigError(f"user {user!r} does not exist") from None


def listening(path: Path) -> bool:
    """Whether something accepts connections on the socket at ``path`` (a
    stopped oracle's backlog still does: it counts as alive)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        probe.connect(str(path))
        return True
    except BlockingIOError:
        return True                     # a full backlog: alive, and busy
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise
    finally:
        probe.close()


def remove_stale(path: Path) -> bool:
    """Remove the socket at ``path`` if nothing listens on it; True if removed.

    Raises:
        ShmkeyError: something listens there, or ``path`` is not a socket.
        OracleAccessError: we may not connect to it (so cannot tell whether
            it is stale) or may not remove it; names its owner.
    """
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise ShmkeyError(f"{path} exists and is not a socket; refusing to touch it")
    try:
        alive = listening(path)
    except PermissionError as exc:
        raise _cannot_remove(path, st.st_uid, f"cannot connect to it to see whether its oracle "
                             f"still runs ({exc.strerror}: the socket is {_whose(st.st_uid)})") from None
    if alive:
        raise ShmkeyError(f"an oracle is already listening on {path}; stop it first")
    return _unlink(path)


def _whose(uid: int) -> str:
    return f"{user_name(uid)}'s, uid {uid}"


def _cannot_remove(path: Path, owner: int, why: str) -> OracleAccessError:
    """The one message for what this user may not remove, and whom to ask."""
    me = os.geteuid()
    return OracleAccessError(f"cannot remove {path}: {why}; this is {user_name(me)} (uid {me}): "
                             f"run shmkey clean as {user_name(owner)} or as root")


def _unlink(path: Path) -> bool:
    """Remove ``path``; False if it is gone already.

    Raises:
        OracleAccessError: not allowed; names who is (the directory's owner,
            or in a sticky directory the file's).
    """
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except PermissionError as exc:
        parent = path.parent.stat()
        if exc.errno == errno.EPERM:        # a sticky directory: the file's owner may
            owner = path.lstat().st_uid
            why = f"{exc.strerror} (it is {_whose(owner)}, in sticky directory {path.parent})"
        else:
            owner = parent.st_uid
            why = f"{exc.strerror} (directory {path.parent} is {_whose(owner)})"
        raise _cannot_remove(path, owner, why) from None
    return True


class BoundSocket:
    """An oracle's socket, bound (mode set) but not yet listening.

    ``SO_PEERCRED`` on a Unix stream socket names whoever called ``listen()``,
    so an oracle that drops privileges binds as root (the directory may be
    root's) and listens only once it is its own user: clients then see, and
    check, the user that really serves them. The directory lock is held
    until then, so no other oracle of that name can take the bound socket
    for a stale one meanwhile.
    """

    def __init__(self, sock: socket.socket, path: Path, lock_fd: int) -> None:
        self.sock, self.path, self._lock_fd = sock, path, lock_fd

    def listen(self, backlog: int = 128) -> socket.socket:
        """Start accepting and release the directory lock; returns the socket."""
        try:
            self.sock.listen(backlog)
        finally:
            self.release()
        return self.sock

    def release(self) -> None:
        """Release the directory lock (idempotent)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def bind(name: str, configured_dir: Optional[str] = None,
         gid: Optional[int] = None) -> BoundSocket:
    """Bind oracle ``name``'s socket, mode 0600 (0660 and group ``gid``);
    :meth:`BoundSocket.listen` makes it reachable.

    A socket left by an oracle that died (nothing accepts on it) is replaced;
    one that something listens on is refused. Starting oracles take a lock on
    the directory meanwhile, so two of them cannot both decide a socket is stale.

    Raises:
        ShmkeyError: an oracle of that name is listening.
        OracleAccessError: the runtime directory is unsafe.
    """
    path = socket_path(name, configured_dir)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(dfd, fcntl.LOCK_EX)
        try:
            remove_stale(path)
        except OracleAccessError:
            raise
        except ShmkeyError:
            raise ShmkeyError(f"an oracle named {name!r} is already listening on {path}; stop "
                              "it, or start this one under another name") from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)               # never reachable by anyone else, not for a moment
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, 0o660 if gid is not None else 0o600)
        return BoundSocket(sock, path, dfd)
    except BaseException:
        os.close(dfd)
        raise


def _old_ring_alive(path: Path) -> bool:
    """Whether a ring of a version before the socket handshake still has its oracle."""
    try:
        with open(path, "rb") as f:
            head = f.read(_OLD_PID_AT + 4)
    except OSError:
        return False
    if len(head) < _OLD_PID_AT + 4 or struct.unpack_from("<I", head)[0] != _OLD_MAGIC:
        return False
    pid = int(struct.unpack_from("<I", head, _OLD_PID_AT)[0])
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def clean(name: str, configured_dir: Optional[str] = None) -> list[str]:
    """Remove what a dead oracle named ``name`` left: its socket, and the ring
    objects of a version before the socket handshake in /dev/shm.

    Returns:
        The paths removed (empty: nothing to remove).

    Raises:
        ShmkeyError: an oracle of that name is running.
        OracleAccessError: something is there that this user may not remove
            (or may not probe), and whom it belongs to.
    """
    removed: list[str] = []
    base = ring_id(name)
    try:
        path: Optional[Path] = runtime_dir(configured_dir, create=False) / f"{base}.sock"
    except ShmkeyError:
        path = None
    if path is not None:
        try:
            if remove_stale(path):
                removed.append(str(path))
        except OracleAccessError:
            raise
        except ShmkeyError:
            raise ShmkeyError(f"oracle {name!r} is running; stop it instead") from None
    ring = _OLD_SHM / base
    if _old_ring_alive(ring):
        raise ShmkeyError(f"oracle {name!r} (an older shmkey) is running; stop it instead")
    for old in (ring, _OLD_SHM / f"sem.{base}-req", _OLD_SHM / f"sem.{base}-free"):
        if _unlink(old):
            removed.append(str(old))
    return removed

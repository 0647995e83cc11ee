"""Confine a network-facing process that signs through a key oracle, once it
has loaded its certificates and key references: an empty root, another user,
no capabilities, no fork or exec, and a seccomp allow-list (``csrc/sandbox.c``).
``shmkey proxy``'s workers use it; so can any server (see :func:`enter`).
"""
from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from ._binding import ensure, ffi, lib
from .config import env_name
from .errors import ConfigError

__all__ = ["FAMILIES", "Sandbox", "User", "check_root", "enter", "resolve_user"]

#: Socket families a sandboxed process may still create (stream sockets only).
FAMILIES = {"unix": lib.SHMKEY_SANDBOX_UNIX, "inet": lib.SHMKEY_SANDBOX_INET,
            "inet6": lib.SHMKEY_SANDBOX_INET6}
_APPLIED = {"chroot": lib.SHMKEY_SANDBOX_CHROOT, "user": lib.SHMKEY_SANDBOX_USER,
            "seccomp": lib.SHMKEY_SANDBOX_SECCOMP, "logged": lib.SHMKEY_SANDBOX_LOGGED,
            "ports": lib.SHMKEY_SANDBOX_PORTS, "scoped": lib.SHMKEY_SANDBOX_SCOPED}
_WHY = 512


@dataclass(frozen=True)
class User:
    """A user and the one group a sandboxed process keeps."""

    name: str
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"{self.name} (uid {self.uid}, gid {self.gid})"


def resolve_user(spec: str, what: str = "--user") -> User:
    """``USER`` or ``USER:GROUP`` (names or numbers) to ids; the group
    defaults to the user's primary group.

    Raises:
        ConfigError: the user or group does not exist.
    """
    name, _, group = spec.partition(":")
    try:
        pw = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except (KeyError, ValueError):
        raise ConfigError(f"{what} {spec}: no user {name!r} on this system") from None
    gid = pw.pw_gid
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"{what} {spec}: no group {group!r} on this system") from None
    return User(pw.pw_name, pw.pw_uid, gid)


def check_root(root: str, user: Optional[User]) -> None:
    """A sandbox root must be a directory that the confined user cannot
    write to and that holds nothing but sockets (an oracle's).

    Raises:
        ConfigError: it is missing, writable by that user, or holds files.
    """
    try:
        st = os.stat(root)
    except OSError as exc:
        raise ConfigError(f"sandbox root {root}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"sandbox root {root} is not a directory")
    uid, gid = (user.uid, user.gid) if user else (os.geteuid(), os.getegid())
    writable = st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and st.st_gid == gid) \
        or (st.st_mode & stat.S_IWUSR and st.st_uid == uid)
    if writable and uid != 0:
        raise ConfigError(f"sandbox root {root} is writable by uid {uid}; it must not be")
    for entry in os.scandir(root):
        if not stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode):
            raise ConfigError(f"sandbox root {root} must hold nothing but sockets; "
                              f"it has {entry.name}")


@dataclass(frozen=True)
class Sandbox:
    """What :func:`enter` applies; ``shmkey proxy`` builds one per worker.

    Attributes:
        user: who to become (None: stay; changing needs root).
        root: the new root directory (None: stay; needs root), which
            :func:`check_root` accepts.
        families: socket families still allowed (:data:`FAMILIES`), stream only.
        tcp_port: the one TCP port it may connect to (None: any); enforced
            with Landlock where the kernel has it.
        runtime_dir: ``SHMKEY_RUNTIME_DIR`` once inside, where the provider
            finds the oracle's socket; by default ``/`` when ``root`` is set.
        log_prefix: starts the stderr line that reports a denied call.
    """

    user: Optional[User] = None
    root: Optional[str] = None
    families: Sequence[str] = ("unix", "inet", "inet6")
    tcp_port: Optional[int] = None
    runtime_dir: Optional[str] = None
    log_prefix: str = ""

    def enter(self, start_threads: Optional[Callable[[], None]] = None) -> frozenset[str]:
        """Apply it to this process, calling ``start_threads`` halfway; see :func:`enter`."""
        unknown = set(self.families) - set(FAMILIES)
        if unknown:
            raise ConfigError(f"unknown socket families {sorted(unknown)}: use {sorted(FAMILIES)}")
        if self.tcp_port is not None and not 0 <= self.tcp_port <= 65535:
            raise ConfigError(f"tcp_port {self.tcp_port} is not 0 to 65535")
        if self.root is not None:
            check_root(self.root, self.user)
            os.environ[env_name("runtime_dir")] = self.runtime_dir or "/"
        elif self.runtime_dir is not None:
            os.environ[env_name("runtime_dir")] = self.runtime_dir
        families = 0
        for name in self.families:
            families |= FAMILIES[name]
        applied = ffi.new("uint32_t *")
        why = ffi.new("char[]", _WHY)
        rc = lib.shmkey_sandbox_confine(
            os.fsencode(self.root) if self.root else ffi.NULL,
            self.user.uid if self.user else -1, self.user.gid if self.user else -1, families,
            -1 if self.tcp_port is None else self.tcp_port, self.log_prefix.encode(), applied,
            why, _WHY)
        ensure(rc, ffi.string(why).decode("utf-8", "replace"))
        if start_threads is not None:
            start_threads()
        ensure(lib.shmkey_sandbox_seal(applied, why, _WHY),
               ffi.string(why).decode("utf-8", "replace"))
        return frozenset(name for name, bit in _APPLIED.items() if applied[0] & bit)


def enter(user: Optional[str] = None, root: Optional[str] = None,
          families: Sequence[str] = ("unix", "inet", "inet6"), tcp_port: Optional[int] = None,
          runtime_dir: Optional[str] = None, log_prefix: str = "",
          start_threads: Optional[Callable[[], None]] = None) -> frozenset[str]:
    """Confine this process for good. Call it once everything it will ever
    need is loaded (modules imported, certificates and key references
    loaded, listening sockets open) and before starting threads; afterwards
    it cannot open files outside ``root``, fork, exec, trace, load code,
    start threads or make sockets other than those ``families`` allow.
    Threads it needs are started by ``start_threads``, which runs halfway:
    the process is then confined but not yet sealed, so the threads inherit
    the root, user, capabilities and Landlock rules, and the filter and the
    process limit that come last hold for them too.

    A Python server using the provider::

        shmkey.openssl.enable()
        ctx.load_cert_chain("web.crt", "web.ref.pem")
        sock = socket.create_server(("0.0.0.0", 443))       # as root, then drop
        shmkey.sandbox.enter(user="www-data:shmkey", root="/run/web-root",
                             families=("unix", "inet"), tcp_port=8080)
        serve(sock, ctx)

    where ``/run/web-root`` (root-owned, 0755, nothing else in it) holds the
    oracle's socket: start the oracle with ``SHMKEY_RUNTIME_DIR=/run/web-root``.

    Args:
        user: ``USER`` or ``USER:GROUP`` to become (needs root); None stays.
            The group must be the oracle's ``--group`` for the server to reach it.
        root: empty directory, not writable by ``user``, to chroot into (needs root).
        families: of ``unix``, ``inet``, ``inet6``: the socket families it
            may still create; stream sockets (TCP, Unix) only.
        tcp_port: the only TCP port it may connect to (a backend); None: any.
        runtime_dir: where the provider looks for oracles' sockets once
            inside (``SHMKEY_RUNTIME_DIR``); ``/`` by default with ``root``.
        log_prefix: starts the stderr line logged, once per system call,
            when the filter denies one (the call returns EPERM).
        start_threads: starts every thread the process will have (it must
            return once they run); None: the process stays single-threaded.

    Returns:
        What the kernel applied, of ``chroot``, ``user``, ``seccomp``,
        ``logged`` (denials reported), ``ports`` and ``scoped`` (Landlock:
        TCP ports; abstract sockets and signals).

    Raises:
        ConfigError: a bad user, root or parameter (nothing applied yet).
        SystemCallError: a step failed; the process may be half-confined
            and should exit.
    """
    return Sandbox(resolve_user(user) if user else None, root, tuple(families), tcp_port,
                   runtime_dir, log_prefix).enter(start_threads)

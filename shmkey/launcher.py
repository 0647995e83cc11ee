"""Starting and stopping an owned key oracle from the calling process.

:class:`KeyOracle` fork+execs ``python -m shmkey serve`` (a clean process
image: nothing of the caller's memory is inherited), which opens the key
file itself. The caller never reads the key; it gets a client, connected to the very
process it started, and an :class:`~shmkey.keys.OracleKey` (or its EC and
Ed25519 siblings).
"""
from __future__ import annotations

import json
import os
import pwd
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from . import _p11uri, _process, names
from .client import OracleClient
from .client.keys import AnyOracleKey
from .config import Config
from .errors import (ConfigError, KeyLoadError, OracleIdentityError, OracleUnavailableError,
                     ShmkeyError)

PathLike = Union[str, "os.PathLike[str]"]

_START_ERRORS = {"ConfigError": ConfigError, "KeyLoadError": KeyLoadError}


class KeyOracle:
    """A key process owned by this one; a context manager.

    Args:
        key_path: PEM private key (RSA >= 2048, EC P-256/P-384, Ed25519), or a
            PKCS#11 URI (``pkcs11:token=...;object=...``), or several of
            either for one oracle; opened only by the oracle process.
        transport: ``"shm"`` (default) or ``"socketpair"``; overrides
            ``SHMKEY_TRANSPORT``. Likewise ``slots``, ``slot_size``,
            ``workers``, ``timeout_ms``, ``spin_us``.
        password: for an encrypted key; handed over a pipe, never argv or env.
        name: an oracle name others may ``connect()`` to; random by default.
        allow_pkcs1v15_decrypt: allow PKCS#1 v1.5 decryption (off by default).
        allow_oaep_decrypt: allow OAEP decryption (on by default).
        group: make the oracle's socket 0660 and owned by this group, and
            let the group's members connect.
        by_name: let other processes ``connect(name)`` to it. An oracle with
            the ring always listens on its named socket; with ``"socketpair"``
            this makes it listen there instead of on a control socket only
            this process holds.
        user: started by root, the user the oracle drops to once it has read
            the key (``shmkey serve --user``); None keeps root (``--allow-root``).

    Raises:
        ConfigError: a setting is invalid (before anything starts).
    """

    def __init__(self, key_path: Union[PathLike, Sequence[PathLike]], *,
                 transport: Optional[str] = None,
                 password: Optional[bytes] = None, name: Optional[str] = None,
                 slots: Optional[int] = None, slot_size: Optional[int] = None,
                 workers: Optional[int] = None, timeout_ms: Optional[int] = None,
                 spin_us: Optional[int] = None, worker_kind: Optional[str] = None,
                 allow_pkcs1v15_decrypt: bool = False, allow_oaep_decrypt: bool = True,
                 group: Optional[str] = None, by_name: bool = False,
                 user: Optional[str] = None) -> None:
        self.config = Config.load(transport=transport, slots=slots, slot_size=slot_size,
                                  workers=workers, timeout_ms=timeout_ms, spin_us=spin_us,
                                  worker_kind=worker_kind)
        self.name = names.check_name(name) if name else names.random_name()
        paths = [key_path] if isinstance(key_path, (str, os.PathLike)) else list(key_path)
        # A PIN in a PKCS#11 URI goes to the oracle over a pipe, like the password.
        split = [_p11uri.without_pin(os.fspath(p)) for p in paths]
        self._key_paths = [source for source, _ in split]
        self._pins = {i: pin for i, (_, pin) in enumerate(split) if pin is not None}
        self._password = password
        self._policy_args = (["--allow-pkcs1v15-decrypt"] if allow_pkcs1v15_decrypt else []) + \
                            ([] if allow_oaep_decrypt else ["--no-oaep-decrypt"])
        self._group = group
        self._by_name = by_name
        self._user = user
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._client: Optional[OracleClient] = None
        self._lifeline: Optional[int] = None
        self._created = False       # the oracle made its socket: ours to remove if it dies

    @property
    def pid(self) -> Optional[int]:
        """The key process's pid, while it runs."""
        return self._proc.pid if self._proc else None

    def poll(self) -> Optional[int]:
        """None while the key process runs (or before it started); its exit
        status once it has exited, after which :meth:`stop` cleans up."""
        return self._proc.poll() if self._proc else None

    @property
    def client(self) -> OracleClient:
        """This process's connection to the oracle."""
        if self._client is None:
            raise OracleUnavailableError("the oracle is not started")
        return self._client

    def start(self) -> KeyOracle:
        """Start the key process and wait until it serves.

        Raises:
            KeyLoadError: the oracle could not load the key.
            ConfigError: a setting does not fit the key (e.g. slot size).
            OracleUnavailableError: it died or did not start in time.
        """
        if self._proc is not None:
            return self
        cfg = self.config
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        life_r, life_w = os.pipe2(os.O_CLOEXEC)
        ctl_parent = ctl_child = None
        keys = [arg for path in self._key_paths for arg in ("--key", path)]
        args = [sys.executable, "-m", "shmkey", "serve", "--log-level", "warning", *keys,
                "--name", self.name, "--status-fd", str(status_w), "--lifeline-fd", str(life_r),
                *cfg.as_args(), *self._policy_args]
        if self._group is not None:
            args += ["--group", str(self._group)]
        if self._user is not None:
            args += ["--user", self._user]
        elif os.geteuid() == 0:
            args.append("--allow-root")     # we are root already: isolation is by process
        if threading.current_thread() is threading.main_thread():
            # PR_SET_PDEATHSIG fires when the forking *thread* exits, so only the
            # main thread may ask for it; the lifeline pipe covers every case.
            args += ["--parent-pid", str(os.getpid())]
        pass_fds = [status_w, life_r]
        if cfg.transport == "socketpair" and not self._by_name:
            ctl_parent, ctl_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            args += ["--socket-fd", str(ctl_child.fileno())]
            pass_fds.append(ctl_child.fileno())
        secrets = self._password is not None or bool(self._pins)
        if secrets:
            args.append("--secrets-stdin")
        try:
            # A session of its own: a terminal's Ctrl-C goes to us, and we stop it.
            self._proc = subprocess.Popen(args, pass_fds=pass_fds, start_new_session=True,
                                          stdin=subprocess.PIPE if secrets else None)
        finally:
            os.close(status_w)
            os.close(life_r)
            if ctl_child is not None:
                ctl_child.close()
        self._lifeline = life_w
        try:
            if secrets:
                assert self._proc.stdin is not None
                password = None if self._password is None else self._password.decode("latin-1")
                self._proc.stdin.write(json.dumps({"password": password, "pins": self._pins}).encode())
                self._proc.stdin.close()
            self._await_ready(status_r, cfg.start_timeout_ms / 1000)
            self._created = True
            if ctl_parent is not None:
                self._client = OracleClient.open(ctl_fd=ctl_parent.fileno(),
                                                 transport=cfg.transport,
                                                 timeout_ms=cfg.timeout_ms, name=self.name)
            else:
                self._client = self._connect_own()
        except BaseException:
            self.stop()
            raise
        finally:
            os.close(status_r)
            if ctl_parent is not None:
                ctl_parent.close()
        return self

    def _connect_own(self) -> OracleClient:
        """Connect to the oracle this object started, and to no other: its
        socket must be served by our uid and by the very process we started."""
        assert self._proc is not None
        cfg = self.config
        client = OracleClient.open(path=str(self._socket_path()), transport=cfg.transport,
                                   oracle_uid=self._oracle_uid(), exact_uid=True,
                                   timeout_ms=cfg.timeout_ms, name=self.name)
        if client.oracle_pid != self._proc.pid:
            client.close()
            raise OracleIdentityError(
                f"the socket of oracle {self.name!r} is served by pid {client.oracle_pid}, "
                f"not by the oracle this process started (pid {self._proc.pid})")
        return client

    def _oracle_uid(self) -> int:
        """The uid our oracle serves under: ours, or the ``user`` it drops to."""
        if self._user is None:
            return os.geteuid()
        name = self._user.split(":", 1)[0]
        return int(name) if name.isdigit() else pwd.getpwnam(name).pw_uid

    def _socket_path(self) -> Path:
        return names.socket_path(self.name, self.config.runtime_dir)

    def _await_ready(self, fd: int, timeout: float) -> dict[str, Any]:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise OracleUnavailableError(f"the key oracle did not start within {timeout:g} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    code = self._proc.wait(timeout=5)
                    raise OracleUnavailableError(f"the key oracle exited during start (status {code})")
                buf += chunk
        info: dict[str, Any] = json.loads(buf.split(b"\n", 1)[0])
        if not info.get("ok"):
            cls = _START_ERRORS.get(info.get("kind", ""), ShmkeyError)
            raise cls(info.get("error", "the key oracle failed to start"))
        return info

    def private_key(self, which: Union[int, bytes, None] = None) -> AnyOracleKey:
        """An oracle-held key (the first, an index or a key id), usable where
        ``cryptography``'s private key of that type is."""
        return self.client.private_key(which)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the key process (SIGTERM, then SIGKILL) and remove its names."""
        if self._client is not None:
            self._client.close()
            self._client = None
        proc, self._proc = self._proc, None
        if proc is not None:
            _process.stop(proc, timeout)
            # An oracle killed hard cannot clean up after itself. One that never
            # started created nothing: what exists under its name is someone else's.
            if self._created and (self.config.transport == "shm" or self._by_name):
                try:
                    names.remove_stale(self._socket_path())
                except ShmkeyError:
                    pass            # another oracle took the name meanwhile: not ours
            self._created = False
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None

    def __enter__(self) -> KeyOracle:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:
        if getattr(self, "_proc", None) is not None:
            try:
                self.stop(timeout=1.0)
            except Exception:
                pass

"""The key process: loads the private key, then serves sign and decrypt
requests from its clients' rings or sockets with worker threads until told
to stop.

It runs as ``shmkey serve`` (foreground, or forked+exec'd by
:class:`shmkey.KeyOracle`). It listens on its named socket (or an owned
oracle's control socket); the C layer checks each peer, hands each client a
ring of its own, and copies requests out of it once. Only the private copy
reaches this module, which checks it against the policy and does the math
with ``cryptography``.
"""
from __future__ import annotations

import json
import logging
import os
import pwd
import resource
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .. import _notify, _p11uri, _process, _wire, names
from .._binding import ffi, lib, raise_for_status
from .._process import close_inherited_fds
from .._version import __version__
from ..config import Config, env_name
from ..errors import ConfigError, ShmkeyError
from . import status
from .audit import Audit, Summary
from .dispatch import Dispatcher, KeySet
from .handler import Handler, Policy, PrivateKey, load_key, needs_worker_process
from .limits import RateLimits
from .stats import Meter, Region

log = logging.getLogger("shmkey.oracle")

_WAIT_MS = 1000         # workers look at the stop flag this often (stopping also wakes them)
_REAP_INTERVAL = 0.25   # seconds between scans for overdue handshakes and freed connections
_AUDIT_INTERVAL = 0.25  # seconds between a worker process's looks at its connection events


class _SignalFlag:
    """A stop flag that signal handlers may set. A threading.Event may not be
    set from one: its set() takes a lock that the interrupted code may hold."""

    def __init__(self) -> None:
        self._value = False

    def set(self, *_: object) -> None:
        self._value = True

    def is_set(self) -> bool:
        return self._value

    def clear(self) -> None:
        self._value = False


def _serve_worker(srv: Any, dispatcher: Dispatcher, cap: int,
                  stopping: Union[threading.Event, _SignalFlag]) -> None:
    work = ffi.gc(lib.shmkey_work_new(cap), lib.shmkey_work_free)
    if work == ffi.NULL:
        raise MemoryError("shmkey_work_new")
    next_request, reply, buffer = lib.shmkey_server_next, lib.shmkey_server_reply, ffi.buffer
    ok, timed_out = lib.SHMKEY_OK, lib.SHMKEY_ETIMEDOUT
    req = work.req
    while True:
        rc = next_request(srv, work, _WAIT_MS)        # GIL released while waiting
        if rc == ok:
            status, out = dispatcher.serve(work, buffer(req.key_id)[:], tuple(req.p),
                                           buffer(work.payload, req.in_len)[:])
            reply(srv, work, status, out, len(out))
        elif rc == timed_out:
            if stopping.is_set():
                return
        elif stopping.is_set() or rc == lib.SHMKEY_EUNAVAIL:
            return
        else:
            log.error("worker wait failed: status %d", rc)
            time.sleep(0.05)        # a failing wait must not become a busy loop


@dataclass
class ServeOptions:
    """Everything ``shmkey serve`` needs, resolved."""

    key_paths: list[str]
    name: Optional[str]
    config: Config
    policy: Policy
    password: Optional[bytes] = None
    group: Optional[str] = None
    socket_fd: int = -1          # control socket of a forked socketpair oracle
    status_fd: int = -1          # where to report readiness (owned oracles)
    lifeline_fd: int = -1        # EOF here means the owner is gone
    user: Optional[str] = None   # drop to this user after reading the key
    allow_root: bool = False     # keep running as root (owned oracles of a root caller)
    parent_pid: int = -1         # die with this parent (PR_SET_PDEATHSIG)
    rate_limits: RateLimits = field(default_factory=RateLimits)

    def keep_fds(self) -> set[int]:
        """Inherited descriptors the oracle was told about; all others are closed."""
        return {0, 1, 2} | {fd for fd in (self.socket_fd, self.status_fd, self.lifeline_fd)
                            if fd >= 0}


class Oracle:
    """A running key process: transport, workers and the main loop."""

    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.name = opts.name or names.random_name()
        self._stopping = threading.Event()
        self._stop_requested = _SignalFlag()
        self._reload_requested = _SignalFlag()
        self._loaded: list[PrivateKey] = []       # the key of each --key, as served now
        self._workers: list[threading.Thread] = []
        self._worker_pids: list[int] = []
        self._keys: Optional[KeySet] = None
        self._region: Optional[Region] = None
        self._dispatcher: Optional[Dispatcher] = None
        self._audit: Optional[Audit] = None
        self._summary: Optional[Summary] = None
        self._kind = "thread"
        self._started = time.time()
        self._main_pid = os.getpid()
        self._srv: Any = None
        self._listener: Optional[socket.socket] = None
        self._sock_path: Optional[str] = None
        self._user: Optional[pwd.struct_passwd] = None     # --user, resolved
        self._gid: Optional[int] = None                    # --group, resolved

    def start(self) -> None:
        """Load the keys, open the transport and start the workers."""
        opts = self.opts
        # Who we become and whose the socket is: refused before any key is read.
        if opts.user:
            names.require_root("--user", "oracle")
            self._user = _lookup_user(opts.user)
        self._gid = names.socket_group(opts.group)
        keys = [load_key(path, opts.password, opts.config.pkcs11_module) for path in opts.key_paths]
        self._loaded = keys
        _lock_memory(logging.INFO, resident_only=False)
        try:
            self._open(keys)
        except BaseException:
            self.stop()
            raise

    def _check_slot_size(self, keys: list[PrivateKey], handler: Handler) -> None:
        """A slot must hold every reply: key list, public keys, RSA plaintexts."""
        cfg = self.opts.config
        needs = [len(handler.key_list())] + [len(d) for d in handler.public_der()]
        needs += [(k.key_size + 7) // 8 + 64 for k in keys if isinstance(k, rsa.RSAPrivateKey)]
        if cfg.slot_size < max(needs):
            what = "these keys" if len(keys) > 1 else f"an {_describe(keys[0])} key"
            raise ConfigError(
                f"{env_name('slot_size')}={cfg.slot_size} is too small for {what}: it needs "
                f"at least {max(needs)} bytes (valid range 256 to 65536)")

    def _open(self, keys: list[PrivateKey]) -> None:
        opts, cfg = self.opts, self.opts.config
        handler = Handler(keys, opts.policy)
        self._check_slot_size(keys, handler)
        gid = self._gid
        kind = cfg.worker_kind
        if kind == "auto":
            kind = "process" if any(needs_worker_process(k) for k in keys) else "thread"
        out = ffi.new("struct shmkey_server **")
        transport = lib.SHMKEY_TRANSPORT_SHM if cfg.transport == "shm" else lib.SHMKEY_TRANSPORT_SOCKET
        nprocs = cfg.workers if kind == "process" else 1
        bound: Optional[names.BoundSocket] = None
        if opts.socket_fd >= 0:
            fd, listening = opts.socket_fd, 0
        else:
            bound = names.bind(self.name, cfg.runtime_dir, gid)
            self._listener, self._sock_path = bound.sock, str(bound.path)
            fd, listening = self._listener.fileno(), 1
        self._kind = kind
        self._region = Region(nprocs)
        self._keys = self._key_set(keys, handler)
        self._summary = Summary(self._region, self._describe_keys)
        try:
            rc = lib.shmkey_server_open(fd, listening, transport, cfg.slots, cfg.slot_size,
                                        cfg.spin_us, nprocs, out)
            if opts.socket_fd >= 0:
                os.close(opts.socket_fd)
            if rc != lib.SHMKEY_OK:
                raise_for_status(rc, "opening the oracle's socket")
            self._srv = out[0]
            if self._user is not None:
                self._drop_privileges(self._user, gid)
            if bound is not None:
                bound.listen()          # now: SO_PEERCRED names the user that serves
        finally:
            if bound is not None:
                bound.release()
        lib.shmkey_server_allow_peers(self._srv, os.geteuid(), -1 if gid is None else gid)
        if kind != "process":
            self._dispatcher, self._audit = self._front(0)
        for i in range(cfg.workers):
            if kind == "process":
                self._worker_pids.append(self._fork_worker(i))
            else:
                t = threading.Thread(target=_serve_worker, name=f"shmkey-worker-{i}", daemon=True,
                                     args=(self._srv, self._dispatcher, cfg.slot_size,
                                           self._stopping))
                t.start()
                self._workers.append(t)

    def _key_set(self, keys: list[PrivateKey], handler: Handler, register: bool = True) -> KeySet:
        """The keys with their ids, kinds and rate limits; with ``register``,
        each new id is given a counter row."""
        ids = [_wire.key_id(k.public_key()) for k in keys]
        assert self._region is not None
        if register:
            try:
                self._region.add_keys(ids)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        return KeySet(handler, ids, [_describe(k) for k in keys],
                      self.opts.rate_limits.resolve(ids))

    def _describe_keys(self) -> list[tuple[str, str, int]]:
        assert self._keys is not None and self._region is not None
        slots = self._region.key_slots()
        return [(kid.hex(), kind, slots[kid]) for kid, kind in zip(self._keys.ids, self._keys.kinds)]

    def summary(self) -> str:
        """The start-up line's middle: keys, transport, slots, workers and channel."""
        so, cfg = self.opts, self.opts.config
        assert self._keys is not None
        keys = ", ".join(f"{kind} {kid.hex()[:16]}" for kid, kind in zip(self._keys.ids, self._keys.kinds))
        channel = f"socket {self._sock_path}" if self._sock_path else "its owner's control socket"
        return (f"keys {keys}; {cfg.transport}, {cfg.slots} slots of {cfg.slot_size} bytes per "
                f"client, {cfg.workers} {self._kind} workers; on {channel}"
                + (f" (group {so.group})" if so.group else ""))

    def _front(self, proc: int) -> tuple[Dispatcher, Audit]:
        """A worker process's dispatcher and audit (thread workers share one of each)."""
        assert self._keys is not None and self._region is not None
        # Token keys are signed in C in worker processes only. python-pkcs11
        # initializes a module without OS locking, so one thread at a time may
        # be inside it: a worker process has one serving thread, which makes
        # both the C signer's calls and Python's, one after the other; worker
        # threads share the module, and only _Module.lock (Python) keeps them apart.
        dispatcher = Dispatcher(self._keys, Meter(self._region, proc), self.status_document,
                                self.opts.config.slot_size, self._srv,
                                tokens_in_c=self._kind == "process")
        dispatcher.audit = Audit(self._srv, dispatcher.meter, dispatcher.forget)
        return dispatcher, dispatcher.audit

    def status_document(self) -> dict[str, Any]:
        """What ``shmkey status`` shows: see docs/operations.md."""
        so, cfg = self.opts, self.opts.config
        assert self._region is not None
        dispatcher = self._dispatcher
        keys = dispatcher.keys if dispatcher is not None else self._keys
        assert keys is not None
        info = {
            "name": self.name, "pid": os.getpid() if self._kind != "process" else os.getppid(),
            "uid": os.geteuid(), "user": names.user_name(os.geteuid()),
            "transport": cfg.transport, "version": __version__, "started": self._started,
            "socket": self._sock_path,
            "settings": {"slots": cfg.slots, "slot_size": cfg.slot_size,
                         "workers": cfg.workers, "worker_kind": self._kind,
                         "spin_us": cfg.spin_us, "timeout_ms": cfg.timeout_ms,
                         "group": so.group,
                         "allow_oaep_decrypt": so.policy.allow_oaep_decrypt,
                         "allow_pkcs1v15_decrypt": so.policy.allow_pkcs1v15_decrypt,
                         **so.rate_limits.describe()},
            "worker_restarts": self._region.restarts,
        }
        return status.document(info, keys, self._region)

    def _fork_worker(self, index: int) -> int:
        """Worker process ``index``: for keys whose signing holds the GIL (Ed25519).

        Forked, not exec'd: it is the oracle, with the keys already loaded.
        It serves the connections it accepts itself. It dies with the oracle
        (PR_SET_PDEATHSIG) and stops on SIGTERM.
        """
        parent = os.getpid()
        pid = os.fork()
        if pid:
            return pid
        code = 0
        try:
            stopping = _SignalFlag()
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGTERM, stopping.set)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, self._reload_requested.set)
            lib.shmkey_die_with_parent(signal.SIGKILL, parent)
            # Locks are not inherited; a page of key this process writes to
            # (a reference count) becomes its own copy, so lock its memory too.
            _lock_memory(logging.DEBUG)
            if lib.shmkey_server_after_fork(self._srv, index) != lib.SHMKEY_OK:
                raise OSError(ffi.errno, "cannot set up the worker's event loop")
            for fd in (self.opts.status_fd, self.opts.lifeline_fd):
                if fd >= 0:
                    os.close(fd)
            self._dispatcher, self._audit = self._front(index)
            threading.Thread(target=self._audit_loop, args=(self._audit, stopping),
                             name="shmkey-audit", daemon=True).start()
            _serve_worker(self._srv, self._dispatcher, self.opts.config.slot_size, stopping)
            lib.shmkey_server_stop(self._srv)     # hang up on this process's clients,
            self._audit.poll()                    # and say so
        except BaseException:
            log.exception("worker process failed")
            code = 1
        finally:
            os._exit(code)

    def _audit_loop(self, audit: Audit, stopping: _SignalFlag) -> None:
        """A worker process's look at its connections' comings and goings, and its reloads."""
        while not stopping.is_set():
            audit.poll()
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                self._reload()
            time.sleep(_AUDIT_INTERVAL)

    def request_reload(self, *_: object) -> None:
        """The SIGHUP handler: reload the keys from the main loop."""
        self._reload_requested.set()

    def _reload(self) -> None:
        """Read every --key again; serve the new set from the next request on.

        A key that fails to load (unreadable after dropping privileges,
        malformed, encrypted: the password is not kept) keeps the one it
        replaces, with a log line. Clients stay connected; a request in
        flight finishes with the keys it started with. The main process
        reloads first (giving new key ids their counter rows), then tells
        its worker processes, which reload the same way.
        """
        assert self._keys is not None and self._region is not None
        keys = []
        for path, old in zip(self.opts.key_paths, self._loaded):
            if _p11uri.is_uri(path):
                keys.append(old)        # a token key lives in its token: nothing to read again
                continue
            try:
                keys.append(load_key(path, None))
            except ShmkeyError as exc:
                log.warning("reload: %s; keeping the key loaded before", exc)
                keys.append(old)
        try:
            handler = Handler(keys, self.opts.policy)
            self._check_slot_size(keys, handler)
            # Only the main process gives key ids counter rows; its workers find them there.
            keyset = self._key_set(keys, handler, register=os.getpid() == self._main_pid)
        except ShmkeyError as exc:
            log.warning("reload refused, keeping every key loaded before: %s", exc)
            return
        self._loaded, self._keys = keys, keyset
        # mlockall(MCL_CURRENT) locked what was mapped at start; the new keys
        # may lie in pages mapped since. (MCL_FUTURE would lock every client's
        # ring too, and fail their connections past RLIMIT_MEMLOCK.)
        _lock_memory(logging.INFO if os.getpid() == self._main_pid else logging.DEBUG)
        if self._dispatcher is not None:
            self._dispatcher.use(keyset)
        for pid in self._worker_pids:
            os.kill(pid, signal.SIGHUP)
        if os.getpid() == self._main_pid:
            log.info("reloaded: serving %s", _key_summary(keyset))

    def _respawn_dead_workers(self) -> None:
        for i, pid in enumerate(self._worker_pids):
            done, code = os.waitpid(pid, os.WNOHANG)
            if done and not self._stopping.is_set():
                log.warning("worker process %d exited (status %d); starting another", pid, code)
                assert self._region is not None
                self._region.count_restart()
                self._worker_pids[i] = self._fork_worker(i)

    def _drop_privileges(self, pw: pwd.struct_passwd, gid: Optional[int]) -> None:
        """Become ``pw``'s user once the key is read and the socket is open.

        The socket is handed to that user first, so that clients of its uid
        may connect.
        """
        if self._sock_path:
            os.chown(self._sock_path, pw.pw_uid, -1 if gid is None else gid)
        os.setgroups(os.getgrouplist(pw.pw_name, pw.pw_gid))
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
        if os.geteuid() == 0 or os.getuid() == 0:
            raise ShmkeyError("failed to drop root privileges")
        log.info("dropped privileges to %s (uid %d)", pw.pw_name, pw.pw_uid)

    def run(self, ready: Callable[[], None], wake_fd: int) -> None:
        """Serve until stopped (see :meth:`request_stop`) or the owner's lifeline closes.

        ``wake_fd`` becomes readable when a signal arrives.
        """
        try:
            ready()
            _notify.notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving {self.name}")
            dog = _notify.watchdog_interval()
            next_dog = 0.0
            watch = [wake_fd] + ([self.opts.lifeline_fd] if self.opts.lifeline_fd >= 0 else [])
            while not self._stopping.is_set() and not self._stop_requested.is_set():
                if dog is not None and time.monotonic() >= next_dog and self._workers_answer():
                    _notify.notify("WATCHDOG=1")
                    next_dog = time.monotonic() + dog
                readable, _, _ = select.select(watch, [], [], _REAP_INTERVAL)
                if self.opts.lifeline_fd in readable:
                    if not os.read(self.opts.lifeline_fd, 64):
                        log.info("owner process is gone; stopping")
                        break
                if wake_fd in readable:
                    os.read(wake_fd, 64)
                if self._reload_requested.is_set():
                    self._reload_requested.clear()
                    self._reload()
                self._respawn_dead_workers()
                lib.shmkey_server_reap(self._srv)
                if self._audit is not None:
                    self._audit.poll()
                if self._summary is not None:
                    self._summary.tick()
        finally:
            self.stop()

    def request_stop(self, *_: object) -> None:
        """Ask the oracle to stop: the SIGTERM/SIGINT handler, so it takes no
        lock (the main thread may hold the one of an Event when it runs)."""
        self._stop_requested.set()

    def _workers_answer(self) -> bool:
        """Whether every worker is there to answer: threads alive, worker
        processes not exited (a dead one is replaced first)."""
        if self._worker_pids:
            # WNOWAIT: look without reaping; replacing a dead worker is _respawn_dead_workers' job.
            return all(os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
                       for pid in self._worker_pids)
        return all(t.is_alive() for t in self._workers)

    def stop(self) -> None:
        """Stop workers, then unlink every name this oracle created."""
        if not self._stopping.is_set() and self._srv is not None:
            _notify.notify("STOPPING=1")
        self._stopping.set()
        if self._srv is not None:
            lib.shmkey_server_stop(self._srv)
            for t in self._workers:
                t.join(timeout=5)
            self._stop_worker_processes()
            if self._audit is not None:
                self._audit.poll()          # the hang-ups of stopping
        self._cleanup()

    def _stop_worker_processes(self, timeout: float = 5.0) -> None:
        _process.stop_all(self._worker_pids, timeout)
        self._worker_pids = []

    def _cleanup(self) -> None:
        if self._listener is not None:
            self._listener.close()
            if self._sock_path:
                try:
                    os.unlink(self._sock_path)
                except FileNotFoundError:
                    pass
                except PermissionError:
                    log.info("cannot remove %s after dropping privileges; the next oracle "
                             "of this name replaces it", self._sock_path)
        if self._srv is not None and not any(t.is_alive() for t in self._workers) \
                and not self._worker_pids:
            lib.shmkey_server_close(self._srv)
            self._srv = None


def _lock_memory(level: int, resident_only: bool = True) -> None:
    """Lock every page now mapped (the keys among them) out of swap; a refusal
    (an unprivileged ``RLIMIT_MEMLOCK`` is usually too small) is logged at
    ``level``. ``resident_only``: fault nothing in (``shmkey_lock_memory``)."""
    if lib.shmkey_lock_memory(int(resident_only)) != lib.SHMKEY_OK:
        log.log(level, "could not lock the keys in memory (mlockall: %s); they may be swapped",
                os.strerror(ffi.errno))


def _lookup_user(user: str) -> pwd.struct_passwd:
    """``--user``'s name or number.

    Raises:
        ConfigError: no such user.
    """
    try:
        return pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise ConfigError(f"--user {user}: no user {user!r} on this system") from None


def _describe(key: PrivateKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"EC {key.curve.name}"
    return "Ed25519"


def _key_summary(keys: KeySet) -> str:
    return ", ".join(f"{kind} {kid.hex()[:16]}" for kid, kind in zip(keys.ids, keys.kinds))


def _report(fd: int, message: dict[str, Any]) -> None:
    if fd >= 0:
        os.write(fd, (json.dumps(message) + "\n").encode())
        os.close(fd)


def serve(opts: ServeOptions) -> int:
    """Run an oracle until it is stopped; the exit status for ``shmkey serve``."""
    close_inherited_fds(opts.keep_fds())
    oracle = Oracle(opts)
    # Signals are ours before anything exists that a signal could orphan.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, oracle.request_stop)
    signal.signal(signal.SIGHUP, oracle.request_reload)
    if opts.parent_pid > 0:
        lib.shmkey_die_with_parent(signal.SIGTERM, opts.parent_pid)
    if lib.shmkey_harden_process() != lib.SHMKEY_OK:
        log.warning("could not fully harden the key process (core dumps / ptrace)")
    # Each client connection holds a socket and a wake-up socket per slot.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    os.umask(0o077)
    try:
        if os.geteuid() == 0 and not opts.user and not opts.allow_root:
            raise ConfigError("refusing to run the key oracle as root: pass --user USER to drop "
                              "privileges after the key is read, or --allow-root")
        oracle.start()
    except Exception as exc:
        kind = type(exc).__name__ if isinstance(exc, ShmkeyError) else "ShmkeyError"
        _report(opts.status_fd, {"ok": False, "error": str(exc), "kind": kind})
        log.error("%s", exc)
        return 2
    opts.password = None

    def ready() -> None:
        info = {"ok": True, "name": oracle.name, "pid": os.getpid(),
                "transport": opts.config.transport, "workers": opts.config.workers}
        _report(opts.status_fd, info)
        log.info("oracle %s serving (pid %d): %s", oracle.name, os.getpid(), oracle.summary())

    oracle.run(ready, wake_r)
    log.info("oracle %s stopped", oracle.name)
    return 0

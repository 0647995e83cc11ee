"""``shmkey proxy``: a TLS-terminating TCP proxy whose private key lives in a
key oracle. A supervisor binds the port, starts (and restarts) the oracle,
writes the key reference and pre-forks workers (``proxy.worker``) that
share the port with SO_REUSEPORT; none of them ever opens the key file.
Each worker confines itself (``shmkey.sandbox``) before its first accept.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import resource
import secrets
import select
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from .. import _process, names, openssl
from .._binding import lib
from .._process import close_inherited_fds
from ..client import OracleClient, connect
from ..openssl import keyref
from ..sandbox import Sandbox, User, check_root, resolve_user
from .worker import Limits, Worker, warm_up
from ..config import env_name
from ..errors import ConfigError, KeyMismatchError, ShmkeyError
from ..launcher import KeyOracle

log = logging.getLogger("shmkey.proxy")

KEY_MODES = ("oracle", "inprocess")
# TLS 1.2 suites: forward secrecy and AEAD only. No RSA key exchange, which
# would need PKCS#1 v1.5 decryption, refused by the oracle's default policy.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
INPROCESS_WARNING = ("*** --key-mode inprocess: the private key is loaded INTO THE NETWORK-FACING "
                     "PROXY WORKERS. No isolation: for benchmarks only. ***")
ROOT_WARNING = ("*** --allow-root: the network-facing workers keep uid 0 (sandboxed, without "
                "capabilities, but root owns every root-owned file they can reach); use --user "
                "USER[:GROUP] ***")
NO_SANDBOX_WARNING = ("*** --no-sandbox: the workers are not confined (no chroot, no seccomp): "
                      "for benchmarks and debugging only ***")
_TICK = 0.2                 # supervisor's look at its oracle and workers, seconds
_PING_EVERY = 1.0           # its ping of the oracle it owns, seconds
_PING_WAIT = 0.5            # how long one ping may wait; --oracle-timeout decides "hung"
_RESTART_BACKOFF = (0.0, 0.5, 1.0, 2.0, 5.0)
_FD_PER_CONNECTION = 2
_MAX_HANDSHAKE_THREADS = 64


def parse_address(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) to (host, port).

    Raises:
        ConfigError: not of that form, or the port is not 0 to 65535.
    """
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{what} {text!r} is not HOST:PORT")
    return host, int(port)


@dataclass
class ProxyOptions:
    """What ``shmkey proxy`` was asked to do.

    Attributes:
        listen, backend: (host, port) pairs.
        certs: PEM certificate chains, each the server's certificate first;
            several (say RSA and ECDSA) for clients to choose from.
        keys: PEM private keys, opened only by the oracle the proxy starts
            (or by the workers with ``key_mode="inprocess"``, paired with
            ``certs`` in order); one oracle holds them all.
        oracle: name of a running ``shmkey serve`` to use instead of ``key``.
        workers: worker processes sharing the port.
        transport: how the workers reach the oracle (``"shm"``, ``"socketpair"``).
        key_mode: ``"oracle"``, or ``"inprocess"`` (benchmarks only: no isolation).
        limits: connection bounds and timeouts, per worker.
        user: ``USER[:GROUP]`` the workers run as (the proxy must start as root).
        oracle_user: the user the proxy's own oracle drops to once it has read the key.
        allow_root: started as root, let the workers keep uid 0.
        allow_shared_user: let ``user`` and ``oracle_user`` be one uid.
        sandbox: confine each worker (``shmkey.sandbox``); off for benchmarks only.
        oracle_timeout: seconds the proxy's own oracle may leave its pings
            unanswered before it is called hung, killed and replaced.
    """

    listen: tuple[str, int]
    backend: tuple[str, int]
    certs: tuple[str, ...]
    keys: tuple[str, ...] = ()
    oracle: Optional[str] = None
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    transport: Optional[str] = None
    key_mode: str = "oracle"
    limits: Limits = field(default_factory=Limits)
    user: Optional[str] = None
    oracle_user: Optional[str] = None
    allow_root: bool = False
    allow_shared_user: bool = False
    sandbox: bool = True
    oracle_timeout: float = 3.0

    @property
    def cert(self) -> str:
        """The first certificate, for messages."""
        return self.certs[0]

    @property
    def key(self) -> Optional[str]:
        """The first key file, for messages; None with ``oracle``."""
        return self.keys[0] if self.keys else None

    def check(self) -> None:
        """Check the options and files without opening the key file.

        Raises:
            ConfigError: the first problem found, in one line.
        """
        if not self.certs:
            raise ConfigError("give --cert CERT.pem")
        if bool(self.keys) == (self.oracle is not None):
            raise ConfigError("give either --key KEY.pem or --oracle NAME")
        if self.key_mode == "inprocess" and len(self.keys) != len(self.certs):
            raise ConfigError("--key-mode inprocess pairs each --cert with a --key, in order")
        if self.key_mode not in KEY_MODES:
            raise ConfigError(f"--key-mode {self.key_mode!r}: use oracle or inprocess")
        if self.key_mode == "inprocess" and self.key is None:
            raise ConfigError("--key-mode inprocess needs --key")
        if not 1 <= self.workers <= 256:
            raise ConfigError(f"--workers {self.workers}: use 1 to 256")
        lim = self.limits
        if lim.max_connections < 1:
            raise ConfigError("--max-connections must be at least 1")
        if lim.max_per_source < 1:
            raise ConfigError("--max-per-source must be at least 1")
        if not 0 <= lim.handshake_threads <= _MAX_HANDSHAKE_THREADS:
            raise ConfigError(f"--handshake-threads {lim.handshake_threads}: use 0 to "
                              f"{_MAX_HANDSHAKE_THREADS}")
        for value, option in ((lim.handshake_timeout, "--handshake-timeout"),
                              (lim.idle_timeout, "--idle-timeout"),
                              (lim.full_idle_timeout, "--full-idle-timeout"),
                              (lim.connect_timeout, "--connect-timeout"),
                              (self.oracle_timeout, "--oracle-timeout")):
            if not value > 0:
                raise ConfigError(f"{option} must be more than 0 seconds")
        if not lim.drain_timeout >= 0:
            raise ConfigError("--drain-timeout must be 0 seconds or more")
        for path, what in [(c, "certificate") for c in self.certs] + \
                [(k, "key") for k in self.keys]:
            # stat, not open: the proxy never reads the key (the oracle does).
            if not os.path.isfile(path):
                raise ConfigError(f"{what} file {path}: no such file")
            if not os.access(path, os.R_OK):
                raise ConfigError(f"{what} file {path}: permission denied")


@dataclass(frozen=True)
class Privileges:
    """Who the proxy's processes run as: ``workers`` (None: the supervisor's
    user) and ``oracle`` (None: root's ``--allow-root``, or the supervisor's user)."""

    workers: Optional[User]
    oracle: Optional[User]

    @property
    def ring_group(self) -> Optional[int]:
        """The group the oracle's ring and socket are open to: the workers'."""
        return self.workers.gid if self.workers else None


def privileges(opts: ProxyOptions) -> Privileges:
    """Check ``--user``, ``--oracle-user`` and friends against who we are, and
    log what the choice means.

    Raises:
        ConfigError: a refusal, in one line that says what to pass.
    """
    euid = os.geteuid()
    if euid != 0:
        for given, option in ((opts.user, "--user"), (opts.oracle_user, "--oracle-user")):
            if given:
                names.require_root(option, "proxy")
    elif not opts.user and not opts.allow_root:
        raise ConfigError("refusing to run the network-facing workers as root: pass --user "
                          "USER[:GROUP] (and --oracle-user USER for the key oracle), or --allow-root")
    workers = resolve_user(opts.user) if opts.user else None
    oracle = resolve_user(opts.oracle_user, "--oracle-user") if opts.oracle_user else None
    if workers is not None and workers.uid == 0:
        raise ConfigError(f"--user {opts.user} is root; pass --allow-root instead")
    worker_uid = workers.uid if workers else euid
    oracle_uid = oracle.uid if oracle else euid
    if opts.keys and opts.key_mode == "oracle" and worker_uid == oracle_uid:
        if euid == 0 and oracle is not None and not opts.allow_shared_user:
            raise ConfigError(f"--oracle-user {opts.oracle_user} has the workers' uid "
                              f"{worker_uid}: a compromised worker could signal the oracle and "
                              "tamper with its socket; use another user, or --allow-shared-user")
        if euid != 0 or opts.allow_shared_user:
            log.warning("the workers and the key oracle run as one user (uid %d): code execution "
                        "in a worker could read what that user can read (the key file, if it "
                        "is readable by it) and signal the oracle; start the proxy as root with "
                        "--user and --oracle-user to separate them", worker_uid)
    if opts.allow_root and workers is None and euid == 0:
        log.warning(ROOT_WARNING)
    if euid == 0 and oracle is None and opts.keys and opts.key_mode == "oracle":
        log.info("the key oracle runs as root; --oracle-user USER runs it as a user of its own")
    if not opts.sandbox:
        log.warning(NO_SANDBOX_WARNING)
    return Privileges(workers, oracle)


def _warn_readable_keys(keys: Sequence[str], user: User) -> None:
    """A key file the workers' user could read defeats separating them."""
    for path in keys:
        st = os.stat(path)
        if st.st_mode & 0o004 or (st.st_mode & 0o040 and st.st_gid == user.gid) or \
                (st.st_mode & 0o400 and st.st_uid == user.uid):
            log.warning("key file %s (mode %04o) is readable by the workers' user %s; only "
                        "the oracle needs it, and it reads it as root: chmod 600 it",
                        path, st.st_mode & 0o7777, user.name)


def worker_sandbox(opts: ProxyOptions, privs: Privileges, root: Optional[Path],
                   backend: tuple[str, int], pid: int) -> Optional[Sandbox]:
    """The sandbox each worker (``pid``) enters before its first accept: its
    user, the root that holds only the oracles' sockets (as root), stream
    sockets to the backend's family and to the oracle, TCP to the backend's
    port only. None with ``opts.sandbox`` off.
    """
    if not opts.sandbox:
        return None
    chroot = root is not None and os.geteuid() == 0
    family = "inet6" if ":" in backend[0] else "inet"
    return Sandbox(user=privs.workers, root=str(root) if chroot else None,
                   families=("unix", family), tcp_port=backend[1],
                   runtime_dir="/" if chroot else (str(root) if root else None),
                   log_prefix=f"shmkey-proxy[{pid}] WARNING ")


def _searchable(directory: Path, user: Optional[User]) -> bool:
    """Whether ``user`` (None: root without capabilities) may look names up in it."""
    st = directory.stat()
    uid, gid = (user.uid, user.gid) if user else (0, 0)
    if st.st_uid == uid:
        return bool(st.st_mode & 0o100)
    return bool(st.st_mode & (0o010 if st.st_gid == gid else 0o001))


def make_root(privs: Privileges) -> Path:
    """The workers' root directory: it holds nothing but the oracles' sockets.
    Owned by the oracle's user, who may create and remove sockets in it;
    the workers' group may only look them up."""
    root = Path(tempfile.mkdtemp(prefix="shmkey-proxy-root-"))
    if os.geteuid() == 0:
        owner = privs.oracle.uid if privs.oracle else 0
        group = privs.ring_group if privs.ring_group is not None else 0
        worker_uid = privs.workers.uid if privs.workers else 0
        os.chown(root, owner, group)
        # Sharing the owner's uid, the workers must not write either (seccomp
        # stops them from chmod-ing it back); the oracle writes as root.
        os.chmod(root, 0o550 if owner == worker_uid else 0o750)
    return root


def server_context(pairs: Sequence[tuple[str, str]]) -> ssl.SSLContext:
    """The proxy's TLS settings: 1.2 and 1.3, forward-secret AEAD suites, no renegotiation.

    ``pairs`` are (certificate, key) files; a key is a PEM private key or a key
    reference (with the provider enabled). With several, say RSA and ECDSA,
    OpenSSL gives each client the one its signature algorithms allow.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    for cert, key in pairs:
        ctx.load_cert_chain(cert, key)
    return ctx


class _KeySource:
    """Where one generation of workers gets its key: an oracle (owned or not)
    behind a key reference, or the key file itself (inprocess)."""

    def __init__(self, opts: ProxyOptions, workdir: Path, generation: int, base: str,
                 privs: Privileges) -> None:
        self.opts = opts
        self.oracle: Optional[KeyOracle] = None
        self.name = opts.oracle
        # (certificate, key or key reference) for each certificate.
        self.pairs: list[tuple[str, str]] = list(zip(opts.certs, opts.keys))
        self.down_since = 0.0
        self.restarts = 0
        self.next_attempt = 0.0
        self.pinger: Optional[OracleClient] = None     # the health check's connection
        self.next_ping = 0.0
        # The uid the oracle serves under: --oracle-user (None: ours or root).
        self.oracle_uid = privs.oracle.uid if privs.oracle else None
        self.unanswered_since = 0.0     # when the first of the pings now failing began
        if opts.key_mode == "inprocess":
            return
        if opts.keys:
            self.name = f"{base}.{generation}"
            group = privs.ring_group
            self.oracle = KeyOracle(list(opts.keys), transport=opts.transport, name=self.name,
                                    by_name=True, spin_us=_oracle_spin_us(),
                                    group=None if group is None else str(group),
                                    user=privs.oracle.name if privs.oracle else None)
            self._start_oracle()
        self.pairs = []
        try:
            assert self.name is not None
            for i, cert in enumerate(opts.certs):
                ref = str(workdir / f"key.{generation}.{i}.ref.pem")
                self.pairs.append((cert, ref))
                try:
                    # The oracle's key that matches this certificate, whatever their order.
                    keyref.write(self.name, ref, cert=cert, transport=opts.transport,
                                 oracle_user=self.oracle_uid)
                except KeyMismatchError:
                    what = (" or ".join(opts.keys) if opts.keys
                            else f"the keys of oracle {self.name!r}")
                    raise KeyMismatchError(f"certificate {cert} does not match {what}") from None
        except BaseException:
            self.stop()
            raise

    def _start_oracle(self) -> None:
        assert self.oracle is not None
        self.oracle.start()
        # The supervisor signs nothing; workers connect on their own.
        self.oracle.client.close()
        self.next_ping = time.monotonic() + _PING_EVERY
        self.unanswered_since = 0.0

    def describe(self) -> str:
        if self.opts.key_mode == "inprocess":
            return "key IN-PROCESS (no isolation)"
        if self.oracle is not None:
            return (f"key in oracle {self.name!r} (pid {self.oracle.pid}, "
                    f"{self.oracle.config.transport})")
        return f"key in oracle {self.name!r}"

    def supervise(self) -> None:
        """Restart an owned oracle that died or hung, with back-off if restarting fails."""
        if self.oracle is None:
            return
        now = time.monotonic()
        if not self.down_since:
            status = self.oracle.poll()
            if status is None and not self._hung(now):
                return
            if status is None:
                log.error("key oracle %r (pid %s) answered no ping for %.1f s: hung; killing "
                          "it (SIGKILL) and starting another", self.name, self.oracle.pid,
                          time.monotonic() - self.unanswered_since)
                self.kill_oracle()
            else:
                log.error("key oracle %r (pid %s) died (%s); handshakes fail until it is back",
                          self.name, self.oracle.pid, _exit_text(status))
            self.close_pinger()
            self.oracle.stop()
            now = time.monotonic()
            self.down_since, self.restarts, self.next_attempt = now, 0, now
        if now < self.next_attempt:
            return
        try:
            self._start_oracle()
        except (ShmkeyError, OSError) as exc:
            delay = _RESTART_BACKOFF[min(self.restarts + 1, len(_RESTART_BACKOFF) - 1)]
            log.error("restarting key oracle %r failed: %s; next try in %g s", self.name, exc,
                      delay)
            self.restarts += 1
            self.next_attempt = now + delay
            return
        log.warning("key oracle %r restarted (pid %d), %.2f s after it died", self.name,
                    self.oracle.pid, time.monotonic() - self.down_since)
        self.down_since = 0.0

    def _hung(self, now: float) -> bool:
        """Ping the oracle once a second, over its own channel (the client API);
        True once none has been answered for ``--oracle-timeout``."""
        if now < self.next_ping:
            return False
        self.next_ping = now + _PING_EVERY
        try:
            if self.pinger is None:
                assert self.name is not None
                self.pinger = connect(self.name, transport=self.opts.transport,
                                      oracle_user=self.oracle_uid)
            self.pinger.ping(timeout_ms=int(min(_PING_WAIT, self.opts.oracle_timeout) * 1000))
        except ShmkeyError as exc:
            # A connection whose request timed out is not reused; the next ping opens another.
            self.close_pinger()
            if not self.unanswered_since:
                self.unanswered_since = now
                log.warning("key oracle %r (pid %s) did not answer a ping: %s", self.name,
                            self.oracle.pid if self.oracle else None, exc)
            return time.monotonic() - self.unanswered_since >= self.opts.oracle_timeout
        if self.unanswered_since:
            log.warning("key oracle %r answers pings again, after %.1f s", self.name,
                        time.monotonic() - self.unanswered_since)
        self.unanswered_since = 0.0
        return False

    def kill_oracle(self) -> None:
        """SIGKILL an owned oracle (even a stopped one dies of it); :meth:`supervise` restarts it."""
        if self.oracle is not None and self.oracle.pid is not None:
            _signal(self.oracle.pid, signal.SIGKILL)

    def close_pinger(self) -> None:
        """Close the health check's connection (before a fork: a worker must
        not inherit it); the next ping opens another."""
        if self.pinger is not None:
            self.pinger.close()
            self.pinger = None

    def stop(self) -> None:
        """Stop an owned oracle (it unlinks its names) and remove the reference."""
        self.close_pinger()
        if self.oracle is not None:
            self.oracle.stop()
        if self.opts.key_mode != "inprocess":
            for _, ref in self.pairs:
                Path(ref).unlink(missing_ok=True)


def _oracle_spin_us() -> Optional[int]:
    """0 unless SHMKEY_SPIN_US says otherwise.

    The ring spins while its own threads leave a core free, but it cannot see
    the proxy's workers doing TLS on those cores: measured here, spinning cost
    a third more CPU per handshake and no throughput. An RSA signature takes
    ~0.3 ms, so a spinning waiter rarely catches its reply anyway.
    """
    return None if os.environ.get(env_name("spin_us"), "").strip() else 0


def _exit_text(status: int) -> str:
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
    return f"exit status {status}"


def _bind(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets on one port, with SO_REUSEPORT.

    A first bind without SO_REUSEPORT makes a port that anything else
    listens on an error, even another SO_REUSEPORT group of this user.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, _, _, _, addr = infos[0]
    socks: list[socket.socket] = []
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(addr)
            addr = probe.getsockname()      # a port of 0 becomes a real one
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(addr)
            s.listen(1024)
            s.setblocking(False)
    except OSError as exc:
        for s in socks:
            s.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return socks


def _raise_fd_limit(limits: Limits, workers: int) -> Limits:
    """Room for every connection's two descriptors; fewer connections if the
    hard limit says so."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = limits.max_connections * _FD_PER_CONNECTION + 64 + workers
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    fit = (soft - 64 - workers) // _FD_PER_CONNECTION
    if fit < limits.max_connections:
        log.warning("open file limit %d allows %d connections per worker, not %d", soft, fit,
                    limits.max_connections)
        limits = dataclasses.replace(limits, max_connections=max(1, fit))
    return limits


class Proxy:
    """The supervisor: binds, starts the key source and the workers, and
    handles SIGTERM/SIGINT (drain and stop), SIGHUP (reload) and deaths."""

    def __init__(self, opts: ProxyOptions) -> None:
        self.opts = opts
        self.socks: list[socket.socket] = []
        self.workdir: Optional[Path] = None
        self.generation = 0
        self.source: Optional[_KeySource] = None
        self.ctx: Optional[ssl.SSLContext] = None
        self.workers: dict[int, tuple[int, int, float]] = {}   # pid: (slot, generation, started)
        self.retiring: list[tuple[_KeySource, int, float]] = []  # source, its generation, deadline
        self.base = f"proxy-{secrets.token_hex(4)}"
        self.signals: list[int] = []
        self.wake_fd = -1
        self.backend_addr: tuple[str, int] = opts.backend
        self.privs = Privileges(None, None)
        self.root: Optional[Path] = None        # the workers' root: the oracles' sockets

    # ---- start ----

    def start(self) -> None:
        """Bind, start the key source, load the context and fork the workers.

        Raises:
            ConfigError, KeyMismatchError, KeyLoadError, OracleUnavailableError:
                what is wrong, in one line; nothing is left running.
        """
        opts = self.opts
        self.privs = privileges(opts)
        opts.check()
        if self.privs.workers is not None:
            _warn_readable_keys(opts.keys, self.privs.workers)
        self.backend_addr = self._resolve_backend()
        self.opts.limits = _raise_fd_limit(opts.limits, opts.workers)
        self.socks = _bind(*opts.listen, opts.workers)
        self.workdir = Path(tempfile.mkdtemp(prefix="shmkey-proxy-"))
        self.root = self._root()
        if opts.key_mode == "oracle":
            openssl.enable()
        self.source, self.ctx = self._load(1)
        if opts.oracle is not None and opts.sandbox and os.geteuid() == 0:
            assert self.root is not None
            if not _searchable(self.root, self.privs.workers):
                log.warning("the workers cannot look up sockets in %s: they keep the connection "
                            "made before their sandbox, but cannot reconnect if oracle %r "
                            "restarts; point SHMKEY_RUNTIME_DIR of both at a directory they may "
                            "search but not write", self.root, opts.oracle)
        if opts.key_mode == "inprocess":
            log.warning(INPROCESS_WARNING)
        self.generation = 1
        for slot in range(opts.workers):
            self._spawn(slot)
        log.info("workers: %s, %s", self.privs.workers or f"uid {os.geteuid()}",
                 "not sandboxed" if not opts.sandbox else
                 f"sandboxed in {self.root}" if os.geteuid() == 0 else
                 "sandboxed without a root of their own (not started as root)")
        log.info("proxy ready: %s -> %s, %d workers, %s",
                 _address(*self.socks[0].getsockname()[:2]), _address(*self.backend_addr),
                 opts.workers, self.source.describe())

    def _root(self) -> Optional[Path]:
        """Where the oracles' sockets are, which the workers chroot into."""
        if self.opts.key_mode == "inprocess":
            return make_root(self.privs)      # empty: no oracle to reach
        if self.opts.oracle is not None:
            root = names.runtime_dir()        # the running oracle's sockets
            if self.opts.sandbox and os.geteuid() == 0:
                check_root(str(root), self.privs.workers)
            return root
        root = make_root(self.privs)
        # The oracle listens there, and every side (the supervisor's checks,
        # the provider in each worker) finds it there: the one place it is looked up.
        os.environ[env_name("runtime_dir")] = str(root)
        return root

    def _resolve_backend(self) -> tuple[str, int]:
        host, port = self.opts.backend
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        except socket.gaierror as exc:
            raise ConfigError(f"backend {host}:{port}: {exc.strerror}") from None
        return str(info[4][0]), port

    def _load(self, generation: int) -> tuple[_KeySource, ssl.SSLContext]:
        """A key source and a context for a generation of workers."""
        assert self.workdir is not None
        source = _KeySource(self.opts, self.workdir, generation, self.base, self.privs)
        try:
            return source, server_context(source.pairs)
        except ssl.SSLError as exc:
            source.stop()
            if "KEY_VALUES_MISMATCH" in str(exc):
                raise KeyMismatchError(
                    f"certificate {self.opts.cert} does not match {self.opts.key}") from None
            raise ConfigError(f"cannot load certificate {self.opts.cert} and key: "
                              f"{exc.reason or exc}") from None
        except BaseException:
            source.stop()
            raise

    def _spawn(self, slot: int) -> None:
        assert self.ctx is not None
        if self.source is not None:
            self.source.close_pinger()
        parent = os.getpid()
        pid = os.fork()
        if pid:
            self.workers[pid] = (slot, self.generation, time.monotonic())
            return
        code = 1
        try:
            self._become_worker(slot, parent)
            code = 0
        except BaseException:
            log.exception("worker failed")
        finally:
            logging.shutdown()
            os._exit(code)

    def _become_worker(self, slot: int, parent: int) -> None:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)      # the supervisor handles these
        for sig in (signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        lib.shmkey_die_with_parent(signal.SIGTERM, parent)
        sock = self.socks[slot]
        for other in self.socks:
            if other is not sock:
                other.detach()      # closed below; the object must not close a reused number
        # Only this worker's socket: not the others', nor the oracle's lifeline.
        close_inherited_fds({0, 1, 2, sock.fileno()})
        assert self.ctx is not None
        worker = Worker(sock, self.ctx, self.backend_addr, self.opts.limits,
                        key_in_oracle=self.opts.key_mode == "oracle")
        box = worker_sandbox(self.opts, self.privs, self.root, self.backend_addr, os.getpid())
        if box is None:
            worker.start_threads()
        else:
            warm_up(self.ctx)
            # Halfway into the sandbox: the threads inherit it, and the filter covers them.
            applied = box.enter(start_threads=worker.start_threads)
            if slot == 0 and self.generation == 1:
                _log_missing(applied)
        worker.serve()

    # ---- run ----

    @contextlib.contextmanager
    def signals_handled(self) -> Iterator[None]:
        """Note TERM, INT, HUP and CHLD for :meth:`run`, which a pipe wakes."""
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        self.wake_fd = wake_r
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(old_wakeup)
            os.close(wake_r)
            os.close(wake_w)

    def run(self) -> int:
        """Supervise until SIGTERM or SIGINT; the exit status."""
        while True:
            pending, self.signals = self.signals, []
            if signal.SIGTERM in pending or signal.SIGINT in pending:
                break
            if signal.SIGHUP in pending:
                self._reload()
            self._reap()
            assert self.source is not None
            self.source.supervise()
            self._retire()
            select.select([self.wake_fd], [], [], _TICK)
            try:
                os.read(self.wake_fd, 512)
            except BlockingIOError:
                pass
        return self.shutdown()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)

    def _reap(self) -> None:
        """Start another worker for one of the current generation that died."""
        for pid, (slot, generation, started) in list(self.workers.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done:
                continue
            del self.workers[pid]
            if generation != self.generation:
                continue        # an old generation's worker, done draining
            code = os.waitstatus_to_exitcode(status)
            log.error("worker %d died (%s); starting another", pid, _exit_text(code))
            if time.monotonic() - started < 1.0:
                time.sleep(0.5)     # dying at once again and again: not a busy loop
            self._spawn(slot)

    def _reload(self) -> None:
        """SIGHUP: new key source and context, new workers; the old ones drain."""
        log.info("SIGHUP: reloading certificate %s and %s", self.opts.cert,
                 self.opts.key or f"the key of oracle {self.opts.oracle!r}")
        try:
            self.opts.check()
            source, ctx = self._load(self.generation + 1)
        except (ShmkeyError, OSError) as exc:
            log.error("reload failed; still serving the previous certificate and key: %s", exc)
            return
        if self.opts.key_mode == "inprocess":
            log.warning(INPROCESS_WARNING)
        old_source, old_generation = self.source, self.generation
        if old_source is not None:
            old_source.close_pinger()       # retiring: no more pings, and no worker inherits it
        self.source, self.ctx = source, ctx
        self.generation += 1
        old = [pid for pid, (_, gen, _) in self.workers.items() if gen == old_generation]
        for slot in range(self.opts.workers):
            self._spawn(slot)
        for pid in old:
            _signal(pid, signal.SIGTERM)
        assert old_source is not None
        # The old oracle serves the old workers' handshakes in flight.
        deadline = time.monotonic() + self.opts.limits.handshake_timeout + 1.0
        self.retiring.append((old_source, old_generation, deadline))
        log.info("reloaded: %d new workers, %s", self.opts.workers, source.describe())

    def _retire(self) -> None:
        """Stop the key sources of old generations once their workers are gone."""
        keep = []
        for source, generation, deadline in self.retiring:
            busy = any(gen == generation for _, gen, _ in self.workers.values())
            if busy and time.monotonic() < deadline:
                keep.append((source, generation, deadline))
            else:
                source.stop()
        self.retiring = keep

    # ---- stop ----

    def shutdown(self) -> int:
        """Drain the workers, stop the oracle, remove every file and name."""
        log.info("stopping: no new connections; draining %d worker(s), up to %g s",
                 len(self.workers), self.opts.limits.drain_timeout)
        self.close_sockets()
        # Told twice (TERM or INT again): SIGKILL whoever is still draining.
        _process.stop_all(list(self.workers), self.opts.limits.drain_timeout + 5.0,
                          give_up=lambda: bool({signal.SIGINT, signal.SIGTERM} & set(self.signals)))
        self.workers.clear()
        self.stop_sources()
        log.info("stopped")
        return 0

    def close_sockets(self) -> None:
        """Close the supervisor's listening sockets."""
        for s in self.socks:
            s.close()
        self.socks = []

    def stop_sources(self) -> None:
        """Stop every key source and remove the working directory."""
        for source, _, _ in self.retiring:
            source.stop()
        self.retiring = []
        if self.source is not None:
            self.source.stop()
            self.source = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        if self.root is not None and self.opts.oracle is None:
            shutil.rmtree(self.root, ignore_errors=True)
        self.root = None


def _log_missing(applied: frozenset[str]) -> None:
    """Once: what this kernel could not confine (Landlock is Linux 6.7+ for ports, 6.12+ for scopes)."""
    if "ports" not in applied:
        log.warning("this kernel has no Landlock network rules: the workers may connect to any "
                    "TCP port, not only the backend's")
    if "scoped" not in applied:
        log.warning("this kernel has no Landlock scopes: the workers may reach abstract Unix "
                    "sockets and signal one another")


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def run_proxy(opts: ProxyOptions) -> int:
    """Run ``shmkey proxy`` in the foreground; the exit status.

    Raises:
        ShmkeyError: start-up failed (nothing is left running).
    """
    proxy = Proxy(opts)
    with proxy.signals_handled():
        try:
            proxy.start()
        except BaseException:
            _process.stop_all(list(proxy.workers), 0, signal.SIGKILL)
            proxy.close_sockets()
            proxy.stop_sources()
            raise
        try:
            return proxy.run()
        except Exception:
            # A bug, not an operator's error: still stop everything we started.
            log.exception("the supervisor failed; stopping")
            proxy.shutdown()
            return 1


def configure_logging(level: str) -> None:
    """One line per event on stderr, tagged with the process id."""
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="shmkey-proxy[%(process)d] %(levelname)s %(message)s")

"""Benchmarks that answer "what does key isolation cost, and what does the ring
save over a socket?": the same operation through an in-process key, a
socketpair oracle and a shared-memory oracle, side by side. The engine behind
``shmkey bench`` and the pytest-benchmark suite in ``bench/``.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, TextIO

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding as apad
from cryptography.hazmat.primitives.asymmetric import rsa

from ..errors import ShmkeyError
from ..client.keys import OracleKey
from ..launcher import KeyOracle

MODES = ("in-process", "socketpair", "shm")
TRANSPORTS = ("socketpair", "shm")
OPERATIONS = ("ping", "ping-c", "sign-pss", "sign-pkcs1", "decrypt-oaep")
KINDS = ("threads", "processes")

MESSAGE = b"shmkey bench: the bytes a TLS server signs" * 2
PLAINTEXT = b"a 48-byte TLS premaster secret, give or take...."
PSS = apad.PSS(mgf=apad.MGF1(hashes.SHA256()), salt_length=apad.PSS.DIGEST_LENGTH)
OAEP = apad.OAEP(mgf=apad.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)

ProgressFn = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------------------
# keys, modes and operations
# ---------------------------------------------------------------------------

def write_key(path: Path, bits: int) -> Path:
    """Generate a throwaway RSA key and write it as PEM, mode 0600.

    Args:
        path: file to create (must not exist).
        bits: modulus size.

    Returns:
        ``path``.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return path


@dataclass
class Target:
    """One mode ready to serve: a key object, and the oracle behind it if any."""

    mode: str
    bits: int
    key: rsa.RSAPrivateKey
    oracle: Optional[KeyOracle] = None

    def close(self) -> None:
        """Stop the oracle, if this target has one."""
        if self.oracle is not None:
            self.oracle.stop()
            self.oracle = None


def open_target(mode: str, key_path: Path, **settings: Optional[int]) -> Target:
    """Make ``mode`` ready: load the key here, or start an oracle on it.

    Args:
        mode: one of :data:`MODES`.
        key_path: the PEM key.
        settings: ``workers``, ``slots``, ``spin_us``... for an oracle (None: default).

    Raises:
        ValueError: unknown mode.
        ShmkeyError: the oracle did not start.
    """
    if mode == "in-process":
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        return Target(mode, key.key_size, key)
    if mode not in TRANSPORTS:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    oracle = KeyOracle(key_path, transport=mode, **settings).start()  # type: ignore[arg-type]
    try:
        okey = oracle.private_key()
        if not isinstance(okey, OracleKey):
            raise ValueError("shmkey bench measures RSA keys")
    except BaseException:
        oracle.stop()
        raise
    return Target(mode, okey.key_size, okey, oracle)


def _noop() -> None:
    """The in-process "round trip": a Python call that does nothing."""


@dataclass
class Workload:
    """One operation on one target: ``run()`` does it once, ``check(result)``
    raises AssertionError unless the result is right, ``per_call`` is how many
    operations one ``run()`` performs.
    """

    op: str
    mode: str
    run: Callable[[], Any]
    check: Callable[[Any], None]
    per_call: int = 1


def _check_none(result: Any) -> None:
    assert result is None, f"ping returned {result!r}"


def workload(target: Target, op: str, batch: int = 200) -> Workload:
    """Bind ``op`` (one of :data:`OPERATIONS`) to ``target``.

    Args:
        target: the mode and key.
        op: operation name; ``ping-c`` times ``batch`` pings in one C loop and
            exists only for oracle modes.
        batch: pings per ``run()`` for ``ping-c``.

    Raises:
        ValueError: unknown operation, or ``ping-c`` in-process.
    """
    key, pub = target.key, target.key.public_key()
    if op == "ping":
        return Workload(op, target.mode, target.key.ping if target.oracle else _noop,  # type: ignore[attr-defined]
                        _check_none)
    if op == "ping-c":
        if target.oracle is None:
            raise ValueError("ping-c needs an oracle; in-process has no transport")
        client = target.oracle.client

        def check_loop(ns: Any) -> None:
            assert len(ns) == batch and all(t > 0 for t in ns), "ping_loop returned bad timings"
        return Workload(op, target.mode, lambda: client.ping_loop(batch), check_loop, batch)
    if op in ("sign-pss", "sign-pkcs1"):
        pad: apad.AsymmetricPadding = PSS if op == "sign-pss" else apad.PKCS1v15()

        def check_sig(sig: Any) -> None:
            pub.verify(sig, MESSAGE, pad, hashes.SHA256())   # raises InvalidSignature
        return Workload(op, target.mode, lambda: key.sign(MESSAGE, pad, hashes.SHA256()),
                        check_sig)
    if op == "decrypt-oaep":
        ciphertext = pub.encrypt(PLAINTEXT, OAEP)

        def check_plain(plain: Any) -> None:
            assert plain == PLAINTEXT, "OAEP decrypt returned the wrong plaintext"
        return Workload(op, target.mode, lambda: key.decrypt(ciphertext, OAEP), check_plain)
    raise ValueError(f"operation {op!r} is not one of {', '.join(OPERATIONS)}")


class Lab:
    """Keys and targets for a run, made on first use and reused; a context
    manager that stops every oracle and deletes every key at the end.

    Keys are throwaway, generated in a private temporary directory.
    """

    def __init__(self, key_path: Optional[Path] = None) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="shmkey-bench-")
        self._keys: dict[int, Path] = {}
        self._given = Path(key_path) if key_path else None
        self._targets: dict[tuple, Target] = {}
        self._names: list[str] = []

    def key_path(self, bits: int) -> Path:
        """A PEM key of ``bits`` (the given key, if one was given and fits)."""
        if bits not in self._keys:
            if self._given is not None:
                self._keys[bits] = self._given
            else:
                self._keys[bits] = write_key(Path(self._dir.name) / f"rsa{bits}.pem", bits)
        return self._keys[bits]

    @staticmethod
    def _ident(mode: str, bits: int, settings: dict) -> tuple:
        given = {k: v for k, v in settings.items() if v is not None}
        return (mode, bits) + (tuple(sorted(given.items())) if mode != "in-process" else ())

    def target(self, mode: str, bits: int = 2048, **settings: Optional[int]) -> Target:
        """The target for ``mode`` with these oracle settings (ignored in-process)."""
        ident = self._ident(mode, bits, settings)
        if ident not in self._targets:
            target = open_target(mode, self.key_path(bits), **dict(ident[2:]))
            if target.oracle is not None:
                self._names.append(target.oracle.name)
            self._targets[ident] = target
        return self._targets[ident]

    def oracle_pids(self) -> list[int]:
        """Process ids of the oracles running now."""
        return [t.oracle.pid for t in self._targets.values()
                if t.oracle is not None and t.oracle.pid is not None]

    def oracle_names(self) -> list[str]:
        """Names of every oracle this lab started, stopped or not."""
        return list(self._names)

    def workload(self, mode: str, op: str, bits: int = 2048,
                 **settings: Optional[int]) -> Workload:
        """Shortcut: ``workload(self.target(mode, bits, **settings), op)``."""
        return workload(self.target(mode, bits, **settings), op)

    def release(self, mode: str, bits: int = 2048, **settings: Optional[int]) -> None:
        """Stop one target's oracle now (frees its processes for the next test)."""
        target = self._targets.pop(self._ident(mode, bits, settings), None)
        if target is not None:
            target.close()

    def close(self) -> None:
        """Stop every oracle and delete the keys."""
        errors: list[BaseException] = []

        def stop(target: Target) -> None:
            try:
                target.close()
            except ShmkeyError as exc:   # keep stopping the others
                errors.append(exc)
        # In parallel: a socket oracle takes a few hundred ms to wind down.
        stoppers = [threading.Thread(target=stop, args=(t,)) for t in self._targets.values()]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        self._targets.clear()
        self._dir.cleanup()
        if errors:
            raise errors[0]

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Busy:
    """``n`` CPU-bound processes (Python busy loops) running beside the
    benchmark, standing in for the rest of a busy server; a context manager.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Busy":
        for _ in range(self.n):
            self._procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self._procs:
            p.kill()
        for p in self._procs:
            p.wait()
        self._procs.clear()


# ---------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------

def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100) of an already sorted list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class Latency:
    """Latencies of one operation in one mode, one client, in microseconds."""

    op: str
    mode: str
    bits: int
    n: int
    p50_us: float
    p99_us: float
    mean_us: float
    ops_per_s: float
    samples_us: list[float] = field(default_factory=list, repr=False)
    other_load_cores: float = 0.0     # CPU other processes used meanwhile

    @classmethod
    def from_ns(cls, op: str, mode: str, bits: int, ns: list[int], keep: int = 2000) -> "Latency":
        """Summarize per-operation times in ns; keep a spread-out sample for plots."""
        s = sorted(ns)
        total = sum(s)
        step = max(1, len(s) // keep)
        return cls(op, mode, bits, len(s), percentile(s, 50) / 1e3, percentile(s, 99) / 1e3,
                   total / len(s) / 1e3, len(s) / (total / 1e9) if total else math.nan,
                   [v / 1e3 for v in s[::step]])


def _time_calls(w: Workload, seconds: float, out: list[int]) -> None:
    clock = time.perf_counter_ns
    run = w.run
    end = clock() + int(seconds * 1e9)
    if w.op == "ping-c":
        while True:      # the C loop timed each ping itself
            out.extend(run())
            if clock() >= end:
                return
    while True:
        t0 = clock()
        run()
        t1 = clock()
        out.append(t1 - t0)
        if t1 >= end:
            return


def latency(workloads: Sequence[Workload], bits: int, seconds: float, rounds: int = 10,
            progress: ProgressFn = _quiet) -> list[Latency]:
    """One client, one call at a time: each workload runs ``seconds`` in all,
    interleaved in ``rounds`` so that the machine's noise hits every mode alike.
    Each result is checked once before timing starts.

    Returns:
        One :class:`Latency` per workload, in the given order.
    """
    times: list[list[int]] = [[] for _ in workloads]
    for w in workloads:
        w.check(w.run())            # also warms up connections and caches
    slice_s = seconds / max(1, rounds)
    for r in range(rounds):
        progress(f"{workloads[0].op}: round {r + 1}/{rounds}")
        order = list(range(len(workloads)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in order:
            _time_calls(workloads[i], slice_s, times[i])
    return [Latency.from_ns(w.op, w.mode, bits, t) for w, t in zip(workloads, times)]


@dataclass
class Throughput:
    """Several concurrent clients doing one operation as fast as they can."""

    op: str
    mode: str
    bits: int
    kind: str           # "threads" or "processes"
    clients: int
    settings: dict
    per_client_ops: list[int]
    per_client_s: list[float]
    other_load_cores: float = 0.0     # CPU other processes used meanwhile

    @property
    def rates(self) -> list[float]:
        """Operations per second of each client."""
        return [n / s if s > 0 else 0.0 for n, s in zip(self.per_client_ops, self.per_client_s)]

    @property
    def ops_per_s(self) -> float:
        """All clients together: every operation over the longest client's time
        (summing per-client rates would overstate it when some finish early).
        """
        longest = max(self.per_client_s, default=0.0)
        return sum(self.per_client_ops) / longest if longest > 0 else 0.0

    @property
    def fairness(self) -> float:
        """Slowest client's rate over the fastest's (1.0: perfectly fair)."""
        rates = self.rates
        return min(rates) / max(rates) if rates and max(rates) > 0 else math.nan

    def as_dict(self) -> dict:
        """JSON-ready, with the derived figures."""
        d = asdict(self)
        d.update(ops_per_s=self.ops_per_s, fairness=self.fairness, rates=self.rates)
        return d


def _client_loop(w: Workload, count: Optional[int], seconds: Optional[float]) -> tuple[int, float]:
    """Run ``w`` ``count`` times or for ``seconds``; check the first and last result."""
    run, clock = w.run, time.perf_counter
    w.check(run())                  # warm-up, outside the timed part
    n = 0
    t0 = clock()
    if count is not None:
        for _ in range(count - 1):
            run()
        result = run()
        n = count
    else:
        end = t0 + (seconds or 0.0)
        while True:
            result = run()
            n += 1
            if clock() >= end:
                break
    elapsed = clock() - t0
    w.check(result)
    return n * w.per_call, elapsed


def _threads(w: Workload, clients: int, count: Optional[int],
             seconds: Optional[float]) -> list[tuple[int, float]]:
    results: list[Any] = [None] * clients
    gate = threading.Barrier(clients)

    def client(i: int) -> None:
        try:
            gate.wait()
            results[i] = _client_loop(w, count, seconds)
        except BaseException as exc:     # re-raised in the caller's thread
            results[i] = exc

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def _processes(w: Workload, clients: int, count: Optional[int],
               seconds: Optional[float]) -> list[tuple[int, float]]:
    # fork, as a pre-fork TLS server does: children use the parent's oracle
    # connection (the ring mapping, or fresh sockets through the control socket).
    go_r, go_w = os.pipe()
    kids: list[tuple[int, int]] = []
    try:
        for _ in range(clients):
            r, wfd = os.pipe()
            pid = os.fork()
            if pid == 0:
                # The child must never return into the caller's frames: they
                # would stop the oracles (Lab.__exit__) a second time.
                code = 1
                try:
                    os.close(r)
                    os.read(go_r, 1)
                    try:
                        n, s = _client_loop(w, count, seconds)
                        msg, code = json.dumps({"n": n, "s": s}), 0
                    except BaseException as exc:
                        msg = json.dumps({"error": f"{type(exc).__name__}: {exc}"})
                    os.write(wfd, msg.encode())
                finally:
                    os._exit(code)
            os.close(wfd)
            kids.append((pid, r))
        os.write(go_w, b"g" * clients)
        results = []
        for pid, r in kids:
            chunks = []
            while True:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
            os.close(r)
            os.waitpid(pid, 0)
            results.append(json.loads(b"".join(chunks) or b'{"error": "client died"}'))
        kids = []
    finally:
        os.close(go_r)
        os.close(go_w)
        for pid, r in kids:       # only after an error (or Ctrl-C) in the parent
            os.close(r)
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise AssertionError(f"a client process failed: {errors[0]}")
    return [(r["n"], r["s"]) for r in results]


def throughput(w: Workload, bits: int, clients: int, kind: str = "processes", *,
               count: Optional[int] = None, seconds: Optional[float] = None,
               settings: Optional[dict] = None) -> Throughput:
    """``clients`` threads or forked processes run ``w`` at once, each
    ``count`` times or for ``seconds``; each checks its first and last result.

    Raises:
        AssertionError: a result was wrong or a client failed.
        ValueError: neither or both of count and seconds, or an unknown kind.
    """
    if (count is None) == (seconds is None):
        raise ValueError("give exactly one of count and seconds")
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    run = _threads if kind == "threads" else _processes
    res = run(w, clients, count, seconds)
    return Throughput(w.op, w.mode, bits, kind, clients, dict(settings or {}),
                      [n for n, _ in res], [s for _, s in res])


# ---------------------------------------------------------------------------
# a whole run: what `shmkey bench` does
# ---------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _system_openssl() -> str:
    try:
        out = subprocess.run(["openssl", "version"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "not installed"


def machine() -> dict:
    """What the numbers were measured on: date, cores, CPU, kernel, Python, OpenSSL."""
    from cryptography import __version__ as crypto_version
    from cryptography.hazmat.backends.openssl.backend import backend

    from .. import __version__
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl_system": _system_openssl(),
        "cryptography": f"{crypto_version} ({backend.openssl_version_text()})",
        "shmkey": __version__,
    }


@dataclass
class Options:
    """What ``shmkey bench`` runs. ``seconds`` is per mode per measurement."""

    seconds: float = 2.0
    bits: int = 2048
    ops: tuple[str, ...] = ("ping", "ping-c", "sign-pss", "sign-pkcs1", "decrypt-oaep")
    throughput_op: str = "sign-pss"
    clients: tuple[int, ...] = (1, 2, 4)
    kinds: tuple[str, ...] = KINDS
    transports: tuple[str, ...] = TRANSPORTS
    rounds: int = 10
    workers: Optional[int] = None
    slots: Optional[int] = None
    spin_us: Optional[int] = None
    key_path: Optional[str] = None
    busy: int = 0

    def settings(self) -> dict:
        """Oracle settings given on the command line (None: the default)."""
        return {"workers": self.workers, "slots": self.slots, "spin_us": self.spin_us}


@dataclass
class Check:
    """One target of issue 3 against what this run measured."""

    target: str
    measured: str
    met: Optional[bool]     # None: not measured in this run


@dataclass
class Report:
    """Everything one run measured, with the machine and the command."""

    meta: dict
    latency: list[Latency]
    throughput: list[Throughput]

    def find(self, op: str, mode: str) -> Optional[Latency]:
        """The latency row for ``op`` in ``mode``, if measured."""
        return next((r for r in self.latency if r.op == op and r.mode == mode), None)

    def rate(self, mode: str, kind: str, clients: int) -> Optional[Throughput]:
        """The throughput row, if measured."""
        return next((t for t in self.throughput
                     if t.mode == mode and t.kind == kind and t.clients == clients), None)

    def checks(self) -> list[Check]:
        """Issue 3's targets, each met, missed or not measured here. A result
        whose measurements ran while other processes used more than 0.1 cores
        says so: on a shared machine it may be the neighbours' doing.
        """
        out: list[Check] = []

        def add(what: str, measured: str, met: bool, *rows: Any) -> None:
            other = max(r.other_load_cores for r in rows)
            if other > 0.1:
                measured += f"; other load {other:.2f} cores, suspect"
            out.append(Check(what, measured, met))

        def ratio(op: str, num: str, den: str, limit: float, what: str) -> None:
            a, b = self.find(op, num), self.find(op, den)
            if a and b:
                r = a.p50_us / b.p50_us
                add(what, f"{r:.3f} ({a.p50_us:.2f} / {b.p50_us:.2f} us)", r <= limit, a, b)
            else:
                out.append(Check(what, "not measured", None))

        ratio("ping", "shm", "socketpair", 0.25, "ping() via Python: shm p50 <= 0.25 x socketpair p50")
        ratio("ping-c", "shm", "socketpair", 0.10, "ping in C: shm p50 <= 0.10 x socketpair p50")
        shm, inp = self.find("sign-pss", "shm"), self.find("sign-pss", "in-process")
        what50 = f"RSA-{self.meta.get('bits', '?')} PSS sign, 1 client: shm p50 <= in-process p50 + 15 us"
        what99 = "... and shm p99 <= 1.3 x in-process p99"
        if shm and inp:
            d = shm.p50_us - inp.p50_us
            add(what50, f"{d:+.1f} us ({shm.p50_us:.1f} vs {inp.p50_us:.1f})", d <= 15, shm, inp)
            r = shm.p99_us / inp.p99_us
            add(what99, f"{r:.2f} x ({shm.p99_us:.0f} vs {inp.p99_us:.0f} us)", r <= 1.3, shm, inp)
        else:
            out += [Check(what50, "not measured", None), Check(what99, "not measured", None)]
        a, b = self.rate("shm", "processes", 2), self.rate("in-process", "processes", 2)
        what = "2 client processes: shm >= 0.85 x in-process throughput"
        fair = "... fairness: slowest client >= 0.5 x fastest"
        if a and b:
            r = a.ops_per_s / b.ops_per_s
            add(what, f"{r:.2f} x ({a.ops_per_s:,.0f} vs {b.ops_per_s:,.0f}/s, "
                      f"workers={self.meta.get('workers')})", r >= 0.85, a, b)
            add(fair, f"{a.fairness:.2f}", a.fairness >= 0.5, a)
        else:
            out += [Check(what, "not measured", None), Check(fair, "not measured", None)]
        cores = self.meta.get("cores") or 1
        over = [(t, self.rate("socketpair", t.kind, t.clients)) for t in self.throughput
                if t.mode == "shm" and t.clients > cores]
        pairs = [(s, p) for s, p in over if p is not None]
        what = "no collapse: clients > cores, shm throughput >= socketpair"
        if pairs:
            worst = min(pairs, key=lambda sp: sp[0].ops_per_s / sp[1].ops_per_s)
            r = worst[0].ops_per_s / worst[1].ops_per_s
            add(what, f"worst {r:.2f} x ({worst[0].clients} {worst[0].kind})", r >= 1.0, *worst)
        else:
            out.append(Check(what, "not measured", None))
        return out

    def to_json(self) -> dict:
        """JSON-ready: meta, latency rows (with a sample of times), throughput, targets."""
        return {"meta": self.meta, "latency": [asdict(r) for r in self.latency],
                "throughput": [t.as_dict() for t in self.throughput],
                "targets": [asdict(c) for c in self.checks()]}


def run(opts: Options, progress: ProgressFn = _quiet, command: str = "") -> Report:
    """Measure latency per operation (interleaved across modes), then
    throughput per client count and kind (modes interleaved in rounds).

    Raises:
        AssertionError: a result did not verify.
        ShmkeyError: an oracle did not start.
    """
    modes = ["in-process"] + [t for t in TRANSPORTS if t in opts.transports]
    settings = {k: v for k, v in opts.settings().items() if v is not None}
    from ..config import Config
    meta = machine()
    meta.update(bits=opts.bits, seconds=opts.seconds, rounds=opts.rounds,
                workers=Config.load(**settings).workers, settings=settings,
                command=command)
    lat: list[Latency] = []
    tput: list[Throughput] = []
    steps = len(opts.ops) + len(opts.kinds) * len(opts.clients)
    step = 0
    meta["busy_processes"] = opts.busy
    load = _LoadMeter()
    with Lab(Path(opts.key_path) if opts.key_path else None) as lab, Busy(opts.busy):
        for op in opts.ops:
            step += 1
            op_modes = [m for m in modes if not (op == "ping-c" and m == "in-process")]
            say = lambda msg, s=step: progress(f"[{s}/{steps}] latency {msg}")  # noqa: E731
            say(f"{op}: starting {', '.join(op_modes)}")
            ws = [lab.workload(m, op, opts.bits, **settings) for m in op_modes]
            meter = _LoadMeter(lab.oracle_pids())
            rows = latency(ws, opts.bits, opts.seconds, opts.rounds, say)
            other = meter.stop(lab.oracle_pids())["other_load_cores"]
            for r in rows:
                r.other_load_cores = other
            lat += rows
        for kind in opts.kinds:
            for clients in opts.clients:
                step += 1
                meter = _LoadMeter(lab.oracle_pids())
                rows_t = _throughput_round_robin(lab, opts, modes, kind, clients, settings,
                                                 _step_progress(progress, step, steps))
                other = meter.stop(lab.oracle_pids())["other_load_cores"]
                for t in rows_t:
                    t.other_load_cores = other
                tput += rows_t
        meta.update(load.stop(lab.oracle_pids()))
    return Report(meta, lat, tput)


class _LoadMeter:
    """How busy the machine was with work that is not this run's, and how
    much CPU the hypervisor stole: on a shared machine, the context that a
    table of timings needs.
    """

    def __init__(self, oracle_pids: Sequence[int] = ()) -> None:
        self._t0 = time.monotonic()
        self._busy0, self._steal0 = self._system()
        self._own0 = self._own(oracle_pids)

    @staticmethod
    def _system() -> tuple[int, int]:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return 0, 0
        steal = v[7] if len(v) > 7 else 0
        return sum(v[:8]) - v[3] - v[4] - steal, steal   # all but idle, iowait, steal

    @staticmethod
    def _own(pids: Sequence[int]) -> int:
        tck = os.sysconf("SC_CLK_TCK")
        t = os.times()      # this process and its reaped children (forked clients)
        ticks = int((t.user + t.system + t.children_user + t.children_system) * tck)
        for pid in pids:    # the oracles, still running
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])
            except (OSError, ValueError, IndexError):
                pass
        return ticks

    def stop(self, oracle_pids: Sequence[int]) -> dict:
        """Average cores used by other processes, and stolen, since start."""
        elapsed = max(1e-9, time.monotonic() - self._t0)
        tck = os.sysconf("SC_CLK_TCK")
        busy, steal = self._system()
        other = (busy - self._busy0) - (self._own(oracle_pids) - self._own0)
        return {"elapsed_s": round(elapsed, 1),
                "other_load_cores": round(max(0.0, other / tck / elapsed), 2),
                "steal_cores": round((steal - self._steal0) / tck / elapsed, 2)}


def _step_progress(progress: ProgressFn, step: int, steps: int) -> ProgressFn:
    """Progress messages prefixed with the step they belong to."""
    def say(msg: str) -> None:
        progress(f"[{step}/{steps}] {msg}")
    return say


def _throughput_round_robin(lab: Lab, opts: Options, modes: Sequence[str], kind: str,
                            clients: int, settings: dict, progress: ProgressFn) -> list[Throughput]:
    rounds = max(1, min(opts.rounds, int(opts.seconds / 0.5)))   # >= 0.5 s a slice
    acc: dict[str, Throughput] = {}
    for r in range(rounds):
        progress(f"throughput {opts.throughput_op}, {clients} {kind}: round {r + 1}/{rounds}")
        for m in list(modes[r % len(modes):]) + list(modes[:r % len(modes)]):
            w = lab.workload(m, opts.throughput_op, opts.bits, **settings)
            t = throughput(w, opts.bits, clients, kind, seconds=opts.seconds / rounds,
                           settings=settings if m != "in-process" else {})
            if m in acc:
                prev = acc[m]
                prev.per_client_ops = [a + b for a, b in zip(prev.per_client_ops, t.per_client_ops)]
                prev.per_client_s = [a + b for a, b in zip(prev.per_client_s, t.per_client_s)]
            else:
                acc[m] = t
    return [acc[m] for m in modes]


def _num(v: float) -> str:
    if v != v:      # NaN
        return "-"
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def format_report(report: Report) -> str:
    """The run as text tables: latency with ratios, throughput with fairness, targets."""
    m = report.meta
    lines = [f"shmkey bench, {m['date']}: RSA-{m['bits']}, oracle workers={m['workers']}"
             + (f", {m['settings']}" if m.get("settings") else ""),
             f"machine: {m['cores']} cores, {m['cpu']}, Linux {m['kernel']}, Python {m['python']}",
             f"OpenSSL: system {m['openssl_system']}; cryptography {m['cryptography']}",
             f"run: {m.get('elapsed_s', '?')} s; other processes used {m.get('other_load_cores', '?')} "
             f"cores on average, the hypervisor stole {m.get('steal_cores', '?')}"
             + (f" ({m['busy_processes']} of them the CPU-bound processes of --busy)"
                if m.get("busy_processes") else
                " (a busy machine: expect noise)" if (m.get("other_load_cores") or 0) > 0.1 else ""),
             "", "Latency, 1 client, one call at a time (us; modes interleaved)",
             f"{'operation':<13} {'mode':<11} {'p50':>9} {'p99':>9} {'ops/s':>9} "
             f"{'p50 +us':>9} {'x in-proc':>9} {'shm/sock':>9} {'other':>6}"]
    for op in dict.fromkeys(r.op for r in report.latency):
        base, sock = report.find(op, "in-process"), report.find(op, "socketpair")
        for i, r in enumerate(x for x in report.latency if x.op == op):
            plus = f"{r.p50_us - base.p50_us:+.1f}" if base and r is not base else ""
            rel = f"{r.p50_us / base.p50_us:.2f}" if base else ""
            ss = f"{r.p50_us / sock.p50_us:.3f}" if sock and r.mode == "shm" else ""
            other = f"{r.other_load_cores:.2f}" if i == 0 else ""
            lines.append(f"{op if i == 0 else '':<13} "
                         f"{r.mode:<11} {_num(r.p50_us):>9} {_num(r.p99_us):>9} "
                         f"{_num(r.ops_per_s):>9} {plus:>9} {rel:>9} {ss:>9} {other:>6}")
    if report.throughput:
        op = report.throughput[0].op
        lines += ["", f"Throughput, {op} RSA-{m['bits']}, concurrent clients (ops/s, all clients)",
                  f"{'clients':<14} {'mode':<11} {'ops/s':>9} {'x in-proc':>9} {'shm/sock':>9} "
                  f"{'slowest/fastest':>16} {'other':>6}"]
        for t in report.throughput:
            tbase = report.rate("in-process", t.kind, t.clients)
            tsock = report.rate("socketpair", t.kind, t.clients)
            rel = f"{t.ops_per_s / tbase.ops_per_s:.2f}" if tbase else ""
            ss = f"{t.ops_per_s / tsock.ops_per_s:.2f}" if tsock and t.mode == "shm" else ""
            first = t is next(x for x in report.throughput
                              if x.kind == t.kind and x.clients == t.clients)
            label = f"{t.clients} {t.kind}" if first else ""
            tother = f"{t.other_load_cores:.2f}" if first else ""
            lines.append(f"{label:<14} {t.mode:<11} {_num(t.ops_per_s):>9} {rel:>9} {ss:>9} "
                         f"{t.fairness:>16.2f} {tother:>6}")
    lines += ["", "other: cores that other processes used during that measurement "
              "(above 0.1, its ratios are suspect)", "", "Targets (issue 3)"]
    for c in report.checks():
        mark = {True: "met   ", False: "MISSED", None: "n/a   "}[c.met]
        lines.append(f"  [{mark}] {c.target}: {c.measured}")
    return "\n".join(lines)


def plot(report: Report, path: str) -> None:
    """Latency distributions per mode (one panel per operation) and
    throughput against client count, as a PNG.

    Raises:
        ImportError: matplotlib is missing (``pip install 'shmkey[plot]'``).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ops = list(dict.fromkeys(r.op for r in report.latency))
    panels = max(1, len(ops) + (1 if report.throughput else 0))
    cols = min(3, panels)
    rows = (panels + cols - 1) // cols
    fig, grid = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[panels:]:
        ax.set_visible(False)
    colors = {"in-process": "tab:green", "socketpair": "tab:orange", "shm": "tab:blue"}
    for ax, op in zip(axes, ops):
        for r in (x for x in report.latency if x.op == op):
            xs = r.samples_us
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.plot(xs, ys, label=f"{r.mode} (p50 {_num(r.p50_us)})", color=colors.get(r.mode))
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 3.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{op}, 1 client")
        ax.set_xlabel("latency (us, log)")
        ax.set_ylabel("fraction of calls")
        ax.legend(fontsize="small")
    if report.throughput:
        ax = axes[panels - 1]
        for kind in dict.fromkeys(t.kind for t in report.throughput):
            for mode in dict.fromkeys(t.mode for t in report.throughput):
                series = sorted((t for t in report.throughput if t.kind == kind and t.mode == mode),
                                key=lambda t: t.clients)
                ax.plot([t.clients for t in series], [t.ops_per_s for t in series], marker="o",
                        linestyle="-" if kind == "processes" else "--", color=colors.get(mode),
                        label=f"{mode}, {kind}")
        ax.set_title(f"{report.throughput[0].op} throughput")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("ops/s")
        ax.set_xticks(sorted({t.clients for t in report.throughput}))
        ax.legend(fontsize="small")
    fig.suptitle(f"shmkey bench, RSA-{report.meta['bits']}, {report.meta['cores']} cores, "
                 f"{report.meta['date']}", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse_list(text: str, conv: Callable[[str], Any], allowed: Optional[Iterable] = None) -> tuple:
    items = tuple(conv(x.strip()) for x in text.split(",") if x.strip())
    if not items:
        raise ValueError("empty list")
    if conv is int and min(items) < 1:
        raise ValueError("counts must be at least 1")
    if allowed is not None:
        bad = [x for x in items if x not in allowed]
        if bad:
            raise ValueError(f"{bad[0]!r} is not one of {', '.join(map(str, allowed))}")
    return items


def _parser() -> Any:
    import argparse

    p = argparse.ArgumentParser(
        prog="shmkey bench",
        description="What does key isolation cost, and what does the shared-memory ring "
                    "save over a socket? Latency of each operation with one client "
                    "(in-process, socketpair and shm interleaved), then throughput with "
                    "concurrent clients; a table with p50, p99, ops/s and ratios.")

    def listed(conv: Callable[[str], Any], allowed: Optional[Iterable] = None) -> Callable[[str], tuple]:
        def parse(text: str) -> tuple:
            try:
                return _parse_list(text, conv, allowed)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
        return parse

    d = Options()
    p.add_argument("--duration", type=float, default=d.seconds, metavar="SECONDS",
                   help=f"seconds per mode per measurement (default {d.seconds:g})")
    p.add_argument("--bits", type=int, default=d.bits, choices=(2048, 3072, 4096),
                   help="RSA key size of the throwaway key (default 2048)")
    p.add_argument("--key", help="use this PEM RSA key instead of a throwaway one")
    p.add_argument("--ops", type=listed(str, OPERATIONS), default=d.ops,
                   help=f"latency operations, comma-separated (default {','.join(d.ops)})")
    p.add_argument("--throughput-op", default=d.throughput_op,
                   choices=[o for o in OPERATIONS if o != "ping-c"],
                   help="operation for the throughput runs (default sign-pss)")
    p.add_argument("--clients", type=listed(int), default=d.clients,
                   help="concurrent client counts, comma-separated (default 1,2,4)")
    p.add_argument("--kinds", type=listed(str, KINDS), default=d.kinds,
                   help="clients as threads, processes or both (default threads,processes)")
    p.add_argument("--transports", type=listed(str, TRANSPORTS), default=d.transports,
                   help="oracle transports beside in-process (default socketpair,shm)")
    p.add_argument("--rounds", type=int, default=d.rounds,
                   help="interleaving rounds per measurement (default 10)")
    p.add_argument("--workers", type=int, help="SHMKEY_WORKERS for the oracles")
    p.add_argument("--slots", type=int, help="SHMKEY_SLOTS for the oracles")
    p.add_argument("--spin-us", type=int, help="SHMKEY_SPIN_US for the oracles")
    p.add_argument("--busy", type=int, default=0, metavar="N",
                   help="run N CPU-bound processes beside the benchmark, as the rest of a "
                        "busy server would (default 0)")
    p.add_argument("--no-throughput", action="store_true", help="latency only")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png",
                   help="also draw latency CDFs and throughput (needs matplotlib: shmkey[plot])")
    return p


def main(argv: Optional[Sequence[str]] = None, out: TextIO = sys.stdout,
         err: TextIO = sys.stderr) -> int:
    """``shmkey bench [options]``: run, print the table; the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (fail before a long run, not after)
        except ImportError:
            print("shmkey bench: --plot needs matplotlib (pip install 'shmkey[plot]')", file=err)
            return 2
    opts = Options(seconds=args.duration, bits=args.bits, ops=args.ops,
                   throughput_op=args.throughput_op,
                   clients=() if args.no_throughput else args.clients, kinds=args.kinds,
                   transports=args.transports, rounds=max(1, args.rounds), workers=args.workers,
                   slots=args.slots, spin_us=args.spin_us, key_path=args.key,
                   busy=max(0, args.busy))
    tty = err.isatty()

    def progress(msg: str) -> None:
        if tty:
            err.write("\r\033[K" + msg)
        else:
            err.write(msg + "\n")
        err.flush()

    try:
        report = run(opts, progress, command="shmkey bench " + " ".join(
            shlex.quote(a) for a in argv))
    except KeyboardInterrupt:
        return 130
    except ShmkeyError as exc:
        print(f"shmkey bench: {exc}", file=err)
        return 2
    finally:
        if tty:
            err.write("\r\033[K")
    print(format_report(report), file=out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_json(), f, indent=1)
        print(f"\nwrote {args.json}", file=out)
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}", file=out)
    return 0

"""How ``shmkey bench`` measures: one-client latency with the modes interleaved
round by round, throughput of concurrent client threads or forked processes,
busy loads beside them, and the CPU the rest of the machine used meanwhile.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, NoReturn, Optional, Sequence

from ... import _process
from ...client import connect
from ..procfs import cpu_seconds
from ..stats import percentile
from .workloads import Lab, Workload

KINDS = ("threads", "processes")

ProgressFn = Callable[[str], None]


def quiet(_: str) -> None:
    """A :data:`ProgressFn` that says nothing."""


class Busy:
    """``n`` CPU-bound processes (Python busy loops) running beside the
    benchmark, standing in for the rest of a busy server; a context manager.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self._procs: list[subprocess.Popen[bytes]] = []

    # Spins until its parent is gone, were the benchmark killed before it stops them.
    _LOOP = "import os, sys\nparent = int(sys.argv[1])\nwhile os.getppid() == parent: pass"

    def __enter__(self) -> Busy:
        for _ in range(self.n):
            # A session of its own: a Ctrl-C at the terminal is the
            # benchmark's to handle, and it stops these.
            self._procs.append(subprocess.Popen([sys.executable, "-c", self._LOOP,
                                                 str(os.getpid())], start_new_session=True))
        return self

    def __exit__(self, *exc: object) -> None:
        _process.stop_all(self._procs, 0, signal.SIGKILL)
        self._procs.clear()


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
    def from_ns(cls, op: str, mode: str, bits: int, ns: list[int], keep: int = 2000) -> Latency:
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
            progress: ProgressFn = quiet) -> list[Latency]:
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
    settings: dict[str, Any]
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

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, with the derived figures."""
        d = asdict(self)
        d.update(ops_per_s=self.ops_per_s, fairness=self.fairness, rates=self.rates)
        return d


def _client_loop(w: Workload, count: Optional[int], seconds: Optional[float],
                 cut: Sequence[bool] = (False,)) -> tuple[int, float]:
    """Run ``w`` ``count`` times or for ``seconds`` (or until ``cut[0]`` turns
    true); check the first and last result."""
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
            if clock() >= end or cut[0]:
                break
    elapsed = clock() - t0
    w.check(result)
    return n * w.per_call, elapsed


def _threads(w: Workload, clients: int, count: Optional[int],
             seconds: Optional[float]) -> list[tuple[int, float]]:
    results: list[Any] = [None] * clients
    gate = threading.Barrier(clients)
    cut = [False]       # a list, not an Event: read in the timed loop, it must cost little
    # Not Thread.join: interrupted by Ctrl-C, Python 3.11's may return early
    # from the next join, while the thread still runs.
    done = [threading.Event() for _ in range(clients)]

    def client(i: int) -> None:
        try:
            gate.wait()
            results[i] = _client_loop(w, count, seconds, cut)
        except BaseException as exc:     # re-raised in the caller's thread
            results[i] = exc
        finally:
            done[i].set()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    try:
        for t in threads:
            t.start()
        for d in done:
            d.wait()
    except BaseException:
        # Ctrl-C: the clients must be done before the caller stops their
        # oracles, or they would call into a closed connection.
        cut[0] = True
        gate.abort()
        for t, d in zip(threads, done):
            if t.ident is not None:
                d.wait()
        raise
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) back until the block ends: forking inside it,
    a child never gets KeyboardInterrupt before it can ignore SIGINT, nor the
    parent before it has noted the child. Only the main thread handles signals;
    elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda sig, _: caught.append(sig))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _client_process(w: Workload, count: Optional[int], seconds: Optional[float],
                    go_r: int, go_w: int, r: int, wfd: int) -> NoReturn:
    """A forked client: waits for "go", runs, writes its result as JSON and
    exits. It must never return into the caller's frames: they would stop
    the oracles (Lab.__exit__) a second time."""
    code = 1
    try:
        # The parent stops its clients (SIGTERM) on Ctrl-C.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.close(r)
        os.close(go_w)          # so that "go" ends in EOF if the parent dies first
        if os.read(go_r, 1):
            try:
                n, s = _client_loop(w, count, seconds)
                msg, code = json.dumps({"n": n, "s": s}), 0
            except BaseException as exc:
                msg = json.dumps({"error": f"{type(exc).__name__}: {exc}"})
            os.write(wfd, msg.encode())
    finally:
        os._exit(code)


def _processes(w: Workload, clients: int, count: Optional[int],
               seconds: Optional[float]) -> list[tuple[int, float]]:
    # fork, as a pre-fork TLS server does: children use the parent's oracle
    # connection (the ring mapping, or fresh sockets through the control socket).
    go_r, go_w = os.pipe()
    kids: list[tuple[int, int]] = []
    try:
        with _ctrl_c_deferred():
            for _ in range(clients):
                r, wfd = os.pipe()
                pid = os.fork()
                if pid == 0:
                    _client_process(w, count, seconds, go_r, go_w, r, wfd)
                os.close(wfd)
                kids.append((pid, r))
        os.write(go_w, b"g" * clients)
        results = []
        for i, (pid, r) in enumerate(kids):
            chunks = []
            while True:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
            os.close(r)
            kids[i] = (pid, -1)
            os.waitpid(pid, 0)
            results.append(json.loads(b"".join(chunks) or b'{"error": "client died"}'))
        kids = []
    finally:
        os.close(go_r)
        os.close(go_w)
        # Only after an error (or Ctrl-C) in the parent.
        for _, r in kids:
            if r >= 0:
                os.close(r)
        _process.stop_all([pid for pid, _ in kids], 5.0)
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise AssertionError(f"a client process failed: {errors[0]}")
    return [(r["n"], r["s"]) for r in results]


def throughput(w: Workload, bits: int, clients: int, kind: str = "processes", *,
               count: Optional[int] = None, seconds: Optional[float] = None,
               settings: Optional[dict[str, Any]] = None) -> Throughput:
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


def idle_cpu(oracle_name: str, oracle_pid: int, clients: int, seconds: float,
             transport: Optional[str] = None) -> float:
    """Cores the oracle uses while ``clients`` connections to it sit idle (each
    made one request first, so its ring is set up): CPU time from
    ``/proc/PID/stat`` over ``seconds``.

    Raises:
        ShmkeyError: a client could not connect.
    """
    conns = [connect(oracle_name, transport=transport) for _ in range(clients)]
    try:
        for c in conns:
            c.ping()
        time.sleep(0.3)                 # the workers' spins after those pings are over
        t0, c0 = time.monotonic(), cpu_seconds(oracle_pid)
        time.sleep(seconds)
        return (cpu_seconds(oracle_pid) - c0) / (time.monotonic() - t0)
    finally:
        for c in conns:
            c.close()


class LoadMeter:
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
    def _own(pids: Sequence[int]) -> float:
        """CPU seconds of this process, its reaped children (forked clients)
        and the oracles still running."""
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system + \
            sum(cpu_seconds(pid) for pid in pids)

    def stop(self, oracle_pids: Sequence[int]) -> dict[str, float]:
        """Average cores used by other processes, and stolen, since start."""
        elapsed = max(1e-9, time.monotonic() - self._t0)
        tck = os.sysconf("SC_CLK_TCK")
        busy, steal = self._system()
        other = (busy - self._busy0) / tck - (self._own(oracle_pids) - self._own0)
        return {"elapsed_s": round(elapsed, 1),
                "other_load_cores": round(max(0.0, other / elapsed), 2),
                "steal_cores": round((steal - self._steal0) / tck / elapsed, 2)}


def throughput_round_robin(lab: Lab, op: str, bits: int, modes: Sequence[str], kind: str,
                           clients: int, *, seconds: float, rounds: int, settings: dict[str, Any],
                           progress: ProgressFn = quiet) -> list[Throughput]:
    """Throughput of ``op`` in each mode, ``seconds`` each in all, in up to
    ``rounds`` slices of at least 0.5 s, the modes taking turns to go first.

    Returns:
        One :class:`Throughput` per mode, in the given order, summed over the slices.
    """
    rounds = max(1, min(rounds, int(seconds / 0.5)))
    acc: dict[str, Throughput] = {}
    for r in range(rounds):
        progress(f"throughput {op}, {clients} {kind}: round {r + 1}/{rounds}")
        for m in list(modes[r % len(modes):]) + list(modes[:r % len(modes)]):
            w = lab.workload(m, op, bits, **settings)
            t = throughput(w, bits, clients, kind, seconds=seconds / rounds,
                           settings=settings if m != "in-process" else {})
            if m in acc:
                prev = acc[m]
                prev.per_client_ops = [a + b for a, b in zip(prev.per_client_ops, t.per_client_ops)]
                prev.per_client_s = [a + b for a, b in zip(prev.per_client_s, t.per_client_s)]
            else:
                acc[m] = t
    return [acc[m] for m in modes]

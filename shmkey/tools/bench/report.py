"""The report of a ``shmkey bench`` run: the machine it ran on, the rows it
measured, the design targets met or missed (a table, :data:`DESIGN_TARGETS`),
as text tables or JSON.
"""
from __future__ import annotations

import operator
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence, Union

from ..._version import __version__
from .measure import Latency, Throughput

Row = Union[Latency, Throughput]


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


def machine() -> dict[str, Any]:
    """What the numbers were measured on: date, cores, CPU, kernel, Python, OpenSSL."""
    from cryptography import __version__ as crypto_version
    from cryptography.hazmat.backends.openssl.backend import backend

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
class Check:
    """One design target against what this run measured."""

    target: str
    measured: str
    met: Optional[bool]     # None: not measured in this run


@dataclass
class Report:
    """Everything one run measured, with the machine and the command."""

    meta: dict[str, Any]
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
        """Each of :data:`DESIGN_TARGETS` met, missed or not measured here."""
        return [target.check(self) for target in DESIGN_TARGETS]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready: meta, latency rows (with a sample of times), throughput, targets."""
        return {"meta": self.meta, "latency": [asdict(r) for r in self.latency],
                "throughput": [t.as_dict() for t in self.throughput],
                "targets": [asdict(c) for c in self.checks()]}


# ---- the measurements a design target compares with its threshold ----

@dataclass(frozen=True)
class Measured:
    """A measurement's value, how to say it, and the rows it came from."""

    value: float
    text: str
    rows: Sequence[Row]


@dataclass(frozen=True)
class _LatencyPair:
    """``stat`` (``p50_us``, ``p99_us``) of ``op`` in ``mode`` against the same in ``base``."""

    op: str
    stat: str
    mode: str
    base: str
    text: str

    @staticmethod
    def combine(x: float, y: float) -> float:
        """The figure from ``mode``'s value and ``base``'s."""
        raise NotImplementedError

    def __call__(self, report: Report) -> Optional[Measured]:
        a, b = report.find(self.op, self.mode), report.find(self.op, self.base)
        if a is None or b is None:
            return None
        x, y = getattr(a, self.stat), getattr(b, self.stat)
        value = self.combine(x, y)
        return Measured(value, self.text.format(value=value, a=x, b=y), (a, b))


@dataclass(frozen=True)
class LatencyRatio(_LatencyPair):
    """``mode``'s latency over ``base``'s."""

    text: str = "{value:.3f} ({a:.2f} / {b:.2f} us)"

    @staticmethod
    def combine(x: float, y: float) -> float:
        return x / y


@dataclass(frozen=True)
class LatencyDifference(_LatencyPair):
    """``mode``'s latency minus ``base``'s, in microseconds."""

    text: str = "{value:+.1f} us ({a:.1f} vs {b:.1f})"

    @staticmethod
    def combine(x: float, y: float) -> float:
        return x - y


@dataclass(frozen=True)
class LatencyValue:
    """``mode``'s latency of ``op`` itself, in microseconds."""

    op: str
    stat: str
    mode: str
    text: str = "{value:.2f} us"

    def __call__(self, report: Report) -> Optional[Measured]:
        row = next((r for r in report.latency if r.op == self.op and r.mode == self.mode), None)
        if row is None:
            return None
        value = float(getattr(row, self.stat))
        return Measured(value, self.text.format(value=value), (row,))


@dataclass(frozen=True)
class ThroughputRatio:
    """Throughput of ``clients`` ``kind`` in ``mode`` over the same in ``base``."""

    kind: str
    clients: int
    mode: str
    base: str
    text: str = "{value:.2f} x ({a:,.0f} vs {b:,.0f}/s, workers={workers})"

    def __call__(self, report: Report) -> Optional[Measured]:
        a = report.rate(self.mode, self.kind, self.clients)
        b = report.rate(self.base, self.kind, self.clients)
        if a is None or b is None:
            return None
        value = a.ops_per_s / b.ops_per_s
        return Measured(value, self.text.format(value=value, a=a.ops_per_s, b=b.ops_per_s,
                                                workers=report.meta.get("workers")), (a, b))


@dataclass(frozen=True)
class Fairness:
    """Slowest client's rate over the fastest's, ``clients`` ``kind`` in ``mode``."""

    kind: str
    clients: int
    mode: str
    text: str = "{value:.2f}"

    def __call__(self, report: Report) -> Optional[Measured]:
        a = report.rate(self.mode, self.kind, self.clients)
        if a is None:
            return None
        return Measured(a.fairness, self.text.format(value=a.fairness), (a,))


@dataclass(frozen=True)
class WorstRatioBeyondCores:
    """The lowest throughput ratio of ``mode`` over ``base`` among the runs
    with more clients than the machine has cores."""

    mode: str
    base: str
    text: str = "worst {value:.2f} x ({clients} {kind})"

    def __call__(self, report: Report) -> Optional[Measured]:
        cores = report.meta.get("cores") or 1
        pairs = [(t, b) for t in report.throughput if t.mode == self.mode and t.clients > cores
                 for b in [report.rate(self.base, t.kind, t.clients)] if b is not None]
        if not pairs:
            return None
        a, b = min(pairs, key=lambda ab: ab[0].ops_per_s / ab[1].ops_per_s)
        value = a.ops_per_s / b.ops_per_s
        return Measured(value, self.text.format(value=value, clients=a.clients, kind=a.kind),
                        (a, b))


Measurement = Callable[[Report], Optional[Measured]]
_COMPARISONS: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, ">=": operator.ge}
#: Above this many cores used by other processes, a result says it is suspect.
SUSPECT_LOAD_CORES = 0.1


@dataclass(frozen=True)
class DesignTarget:
    """What the design promises: ``measurement`` ``comparison`` ``threshold``.

    ``name`` is what the report prints; ``{threshold}`` and ``{bits}`` in it
    are filled in, so the number is written once.
    """

    name: str
    measurement: Measurement
    threshold: float
    comparison: str         # "<=" or ">="

    def check(self, report: Report) -> Check:
        """Met, missed, or not measured in ``report``. A result whose rows ran
        while other processes used more than :data:`SUSPECT_LOAD_CORES` says
        so: on a shared machine it may be the neighbours' doing."""
        name = self.name.format(threshold=self.threshold, bits=report.meta.get("bits", "?"))
        m = self.measurement(report)
        if m is None:
            return Check(name, "not measured", None)
        text = m.text
        other = max(r.other_load_cores for r in m.rows)
        if other > SUSPECT_LOAD_CORES:
            text += f"; other load {other:.2f} cores, suspect"
        return Check(name, text, _COMPARISONS[self.comparison](m.value, self.threshold))


DESIGN_TARGETS: tuple[DesignTarget, ...] = (
    DesignTarget("ping() via Python: shm p50 <= {threshold:.2f} x socketpair p50",
                 LatencyRatio("ping", "p50_us", "shm", "socketpair"), 0.25, "<="),
    DesignTarget("ping in C: shm p50 <= {threshold:.2f} x socketpair p50",
                 LatencyRatio("ping-c", "p50_us", "shm", "socketpair"), 0.10, "<="),
    DesignTarget("ping in C: shm p50 <= {threshold:g} us",
                 LatencyValue("ping-c", "p50_us", "shm"), 1.0, "<="),
    DesignTarget("RSA-{bits} PSS sign, 1 client: shm p50 <= in-process p50 + {threshold:g} us",
                 LatencyDifference("sign-pss", "p50_us", "shm", "in-process"), 10, "<="),
    DesignTarget("... and shm p99 <= {threshold:g} x in-process p99",
                 LatencyRatio("sign-pss", "p99_us", "shm", "in-process",
                              text="{value:.2f} x ({a:.0f} vs {b:.0f} us)"), 1.2, "<="),
    DesignTarget("2 client processes: shm >= {threshold:.2f} x in-process throughput",
                 ThroughputRatio("processes", 2, "shm", "in-process"), 0.92, ">="),
    DesignTarget("... and shm >= {threshold:g} x socketpair",
                 ThroughputRatio("processes", 2, "shm", "socketpair"), 1.0, ">="),
    DesignTarget("... fairness: slowest client >= {threshold:g} x fastest",
                 Fairness("processes", 2, "shm"), 0.5, ">="),
    DesignTarget("no collapse: clients > cores, shm throughput >= socketpair",
                 WorstRatioBeyondCores("shm", "socketpair"), 1.0, ">="),
)


# ---- text ----

def short_number(v: float) -> str:
    """A figure in a few characters: 1.23M, 4,567, 89.1, 0.12; NaN as a dash."""
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
    busy = ""
    if m.get("busy_processes"):
        busy = f" ({m['busy_processes']} of them the CPU-bound processes of --busy)"
    elif (m.get("other_load_cores") or 0) > SUSPECT_LOAD_CORES:
        busy = " (a busy machine: expect noise)"
    lines = [f"shmkey bench, {m['date']}: RSA-{m['bits']}, oracle workers={m['workers']}"
             + (f", {m['settings']}" if m.get("settings") else ""),
             f"machine: {m['cores']} cores, {m['cpu']}, Linux {m['kernel']}, Python {m['python']}",
             f"OpenSSL: system {m['openssl_system']}; cryptography {m['cryptography']}",
             f"run: {m.get('elapsed_s', '?')} s; other processes used {m.get('other_load_cores', '?')} "
             f"cores on average, the hypervisor stole {m.get('steal_cores', '?')}{busy}",
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
                         f"{r.mode:<11} {short_number(r.p50_us):>9} {short_number(r.p99_us):>9} "
                         f"{short_number(r.ops_per_s):>9} {plus:>9} {rel:>9} {ss:>9} {other:>6}")
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
            lines.append(f"{label:<14} {t.mode:<11} {short_number(t.ops_per_s):>9} {rel:>9} {ss:>9} "
                         f"{t.fairness:>16.2f} {tother:>6}")
    lines += ["", "other: cores that other processes used during that measurement "
              f"(above {SUSPECT_LOAD_CORES:g}, its ratios are suspect)", "", "Design targets"]
    for c in report.checks():
        mark = {True: "met   ", False: "MISSED", None: "n/a   "}[c.met]
        lines.append(f"  [{mark}] {c.target}: {c.measured}")
    return "\n".join(lines)

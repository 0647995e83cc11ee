"""Session fixtures for the benchmarks: one :class:`shmkey.tools.bench.Lab` (throwaway
keys in a private temporary directory, oracles started on first use and all
stopped at the end), how much work a measurement does (tiny under
``--benchmark-disable``, so CI only checks that every path still works), and a
closing table of throughput and fairness, which pytest-benchmark's own table
cannot show.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from shmkey import names
from shmkey.tools import bench

SHM = Path("/dev/shm")
_THROUGHPUT: list[tuple[str, str, bench.Throughput]] = []   # (group, label, result)
IDLE: dict[tuple[str, int], float] = {}     # (mode, idle clients) -> cores the oracle used


@pytest.fixture(scope="session")
def lab() -> Iterator[bench.Lab]:
    """Keys and oracles shared by every benchmark; nothing is left behind (no
    socket, nothing in /dev/shm)."""
    with bench.Lab() as the_lab:
        yield the_lab
        started = the_lab.oracle_names()
    left = [n for n in started if names.socket_path(n).exists() or
            (SHM / names.ring_id(n)).exists()]
    assert not left, f"oracles left sockets or rings: {left}"


@pytest.fixture
def timed(benchmark) -> bool:   # type: ignore[no-untyped-def]
    """True when pytest-benchmark really measures (not ``--benchmark-disable``)."""
    return not benchmark.disabled


@pytest.fixture
def measure_throughput(benchmark, timed: bool):   # type: ignore[no-untyped-def]
    """Run a throughput measurement as a benchmark: a fixed number of operations
    per client per round, so that within a group a shorter round is a higher
    rate. The rate and fairness go to ``extra_info`` and the closing table.
    """
    def run(w: bench.Workload, clients: int, kind: str, settings: dict,
            count: int = 150, label: str = "") -> bench.Throughput:
        n = count if timed else 2
        rounds = 3 if timed else 1
        results = []
        benchmark.pedantic(lambda: results.append(
            bench.throughput(w, 2048, clients, kind, count=n, settings=settings)),
            rounds=rounds, iterations=1)
        total = results[0]
        for r in results[1:]:
            total.per_client_ops = [a + b for a, b in zip(total.per_client_ops, r.per_client_ops)]
            total.per_client_s = [a + b for a, b in zip(total.per_client_s, r.per_client_s)]
        benchmark.extra_info.update(ops_per_s=round(total.ops_per_s),
                                    fairness=round(total.fairness, 3), clients=clients,
                                    kind=kind, **settings)
        assert total.fairness > 0, "a client made no progress"
        if timed:
            _THROUGHPUT.append((benchmark.group or "", label or w.mode, total))
        return total
    return run


def pytest_terminal_summary(terminalreporter) -> None:   # type: ignore[no-untyped-def]
    """Throughput per group with ratios, and what idle clients cost: the figures
    the timing table hides."""
    tr = terminalreporter
    if IDLE:
        tr.section("shmkey idle oracle: cores used while clients connect and send nothing")
        for (mode, clients), cores in sorted(IDLE.items()):
            tr.write_line(f"  {mode:<12} {clients:>3} idle clients: {cores:.4f} cores")
    if not _THROUGHPUT:
        return
    tr.section("shmkey throughput: ops/s by the clients' own clocks")
    for group in dict.fromkeys(g for g, _, _ in _THROUGHPUT):
        rows = [(label, t) for g, label, t in _THROUGHPUT if g == group]
        ref = next((t.ops_per_s for label, t in rows if t.mode == "in-process"), None)
        sock = next((t.ops_per_s for label, t in rows if t.mode == "socketpair"), None)
        tr.write_line(f"{group}")
        tr.write_line(f"  {'':<16} {'ops/s':>8} {'x in-proc':>9} {'x socketpair':>12} "
                      f"{'slowest/fastest':>16}")
        for label, t in rows:
            rel = f"{t.ops_per_s / ref:.2f}" if ref else ""
            rs = f"{t.ops_per_s / sock:.2f}" if sock and t.mode == "shm" else ""
            tr.write_line(f"  {label:<16} {t.ops_per_s:>8,.0f} {rel:>9} {rs:>12} "
                          f"{t.fairness:>16.2f}")

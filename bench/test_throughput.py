"""Throughput of RSA-2048 PSS signing with 1, 2 and 4 concurrent clients
(threads of one process, or forked processes as in a pre-fork TLS server),
against an oracle with SHMKEY_WORKERS=1 and 2. Each group compares the
three modes for one client count; the closing table gives ops/s, ratios and
fairness (slowest client's rate over the fastest's).
"""
from __future__ import annotations

import pytest

from shmkey.tools import bench


@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("clients", [1, 2, 4])
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("kind", bench.KINDS)
def test_throughput(benchmark, lab: bench.Lab, measure_throughput, kind: str,  # type: ignore[no-untyped-def]
                    workers: int, clients: int, mode: str) -> None:
    benchmark.group = f"throughput sign-pss: {clients} client {kind}, workers={workers}"
    settings = {} if mode == "in-process" else {"workers": workers}
    t = measure_throughput(lab.workload(mode, "sign-pss", **settings), clients, kind, settings)
    assert len(t.per_client_ops) == clients and min(t.per_client_ops) > 0


@pytest.mark.parametrize("mode", bench.MODES)
def test_beside_a_busy_process(benchmark, lab: bench.Lab, measure_throughput,  # type: ignore[no-untyped-def]
                               mode: str) -> None:
    """One client thread while a CPU-bound process competes for the cores,
    as the rest of a busy server does: waiting by spinning must not take a
    core the oracle's worker needs ("no collapse").
    """
    benchmark.group = "throughput sign-pss: 1 client thread beside 1 CPU-bound process"
    with bench.Busy(1):
        t = measure_throughput(lab.workload(mode, "sign-pss"), 1, "threads", {})
    assert t.per_client_ops[0] > 0

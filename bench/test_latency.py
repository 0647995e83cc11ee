"""Latency, one client, one call at a time: each group holds the same
operation in-process, through a socketpair oracle and through the shm ring.
Every result is checked (signatures verify, plaintexts match).
"""
from __future__ import annotations

import pytest

from shmkey.tools import bench


@pytest.mark.benchmark(group="ping round trip, Python API")
@pytest.mark.parametrize("mode", bench.MODES)
def test_ping(benchmark, lab: bench.Lab, mode: str) -> None:  # type: ignore[no-untyped-def]
    w = lab.workload(mode, "ping")
    w.check(benchmark(w.run))


@pytest.mark.benchmark(group="ping round trip, C loop of 200 pings per call")
@pytest.mark.parametrize("mode", bench.TRANSPORTS)
def test_ping_c(benchmark, lab: bench.Lab, mode: str) -> None:  # type: ignore[no-untyped-def]
    w = lab.workload(mode, "ping-c")
    w.check(benchmark(w.run))


@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("op", ["sign-pss", "sign-pkcs1", "decrypt-oaep"])
def test_rsa2048(benchmark, lab: bench.Lab, op: str, mode: str) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"RSA-2048 {op}, SHA-256"
    w = lab.workload(mode, op)
    w.check(benchmark(w.run))


@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("bits", [3072, 4096])
def test_sign_larger_keys(benchmark, lab: bench.Lab, bits: int, mode: str) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"RSA-{bits} sign-pss, SHA-256"
    w = lab.workload(mode, "sign-pss", bits)
    w.check(benchmark(w.run))

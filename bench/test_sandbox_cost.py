"""The sandbox's cost, as benchmarks: a system call with and without the
seccomp filter, and TLS 1.3 handshakes through ``shmkey proxy`` with
sandboxed workers and with ``--no-sandbox``. Under ``--benchmark-disable``
each runs once, as a test that it works. Interleaved rounds and ratios:
``bench/sandbox_syscall.py`` and ``bench/proxy_handshakes.py --compare sandbox``.
"""
from __future__ import annotations

import os
from typing import Iterator

import pytest

from shmkey.tools.rig import SANDBOX_MODES, ProxyRig

from .sandbox_syscall import ns_per_call

WORKERS = 2


@pytest.mark.parametrize("filtered", [False, True], ids=["plain", "filtered"])
def test_getppid_cost(benchmark, filtered: bool) -> None:
    calls = 10_000 if benchmark.disabled else 1_000_000
    benchmark.group = f"os.getppid(), {calls} calls in a child"
    ns = benchmark.pedantic(ns_per_call, args=(filtered, calls), rounds=1 if benchmark.disabled
                            else 5)
    assert ns > 0
    benchmark.extra_info["ns_per_call"] = round(ns, 1)


@pytest.fixture(scope="module")
def rig() -> Iterator[ProxyRig]:
    with ProxyRig(WORKERS, loaders=2, modes=list(SANDBOX_MODES)) as r:
        yield r


@pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox's chroot and user need root")
@pytest.mark.parametrize("label", list(SANDBOX_MODES))
def test_proxy_handshakes_sandboxed_or_not(benchmark, rig: ProxyRig, label: str) -> None:
    count = 64 if benchmark.disabled else 2000
    benchmark.group = f"shmkey proxy: {count} full TLS 1.3 handshakes, {WORKERS} workers, sandbox"
    result = benchmark.pedantic(rig.measure, args=(label,), kwargs={"count": count},
                                rounds=1 if benchmark.disabled else 5,
                                warmup_rounds=0 if benchmark.disabled else 1)
    assert (result.ok, result.failed) == (count, 0), result.errors
    benchmark.extra_info["handshakes_per_s"] = round(result.rate)

"""pytest-benchmark: a round of full TLS 1.3 handshakes (each a new connection
with a checked request) through ``shmkey proxy`` per key mode, same worker
count: in-process, oracle over shm, oracle over socketpair. Lower is better;
``extra_info`` has handshakes/s. Under ``--benchmark-disable`` each mode runs
one short round, as a test that the rig works. For interleaved rounds and
ratios, run ``bench/proxy_handshakes.py``.
"""
from __future__ import annotations

from typing import Iterator

import pytest

from shmkey.tools.rig import MODES, ProxyRig

WORKERS = 2
HANDSHAKES = 2000


@pytest.fixture(scope="module")
def rig() -> Iterator[ProxyRig]:
    with ProxyRig(WORKERS, loaders=2) as r:
        yield r


@pytest.mark.parametrize("label", list(MODES))
def test_proxy_tls13_handshakes(benchmark, rig: ProxyRig, label: str) -> None:
    quick = benchmark.disabled
    count = 64 if quick else HANDSHAKES
    benchmark.group = f"shmkey proxy: {count} full TLS 1.3 handshakes, {WORKERS} workers"
    result = benchmark.pedantic(rig.measure, args=(label,), kwargs={"count": count},
                                rounds=1 if quick else 5, warmup_rounds=0 if quick else 1)
    assert (result.ok, result.failed) == (count, 0), result.errors
    benchmark.extra_info["handshakes_per_s"] = round(result.rate)
    benchmark.extra_info["proxy_and_oracle_cpu_ms_per_handshake"] = \
        round(result.cpu_per_request * 1e3, 3)

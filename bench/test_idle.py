"""What idle clients cost the oracle: its CPU time (/proc/PID/stat) while 1,
then 16, connected clients send nothing. A client's ring is waited on through
its socket, which no worker polls on a timer, so 16 should cost what 1 does.
"""
from __future__ import annotations

import pytest

from shmkey.tools import bench

from .conftest import IDLE


@pytest.mark.parametrize("mode", bench.TRANSPORTS)
@pytest.mark.parametrize("clients", [1, 16])
def test_idle_clients(benchmark, lab: bench.Lab, timed: bool, mode: str,  # type: ignore[no-untyped-def]
                      clients: int) -> None:
    benchmark.group = f"idle oracle, {mode}: cores it uses"
    target = lab.target(mode, by_name=True)
    assert target.oracle is not None and target.oracle.pid is not None
    seconds = 3.0 if timed else 0.3
    cores: list[float] = []
    benchmark.pedantic(lambda: cores.append(bench.idle_cpu(target.oracle.name,  # type: ignore[union-attr]
                                                           target.oracle.pid, clients, seconds,  # type: ignore[union-attr]
                                                           mode)),
                       rounds=1, iterations=1)
    IDLE[(mode, clients)] = cores[0]
    benchmark.extra_info.update(oracle_cores=round(cores[0], 4), clients=clients)
    assert cores[0] < 0.5, f"an idle oracle used {cores[0]:.2f} cores"

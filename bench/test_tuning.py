"""What the ring's knobs do, under 4 concurrent client processes signing with
RSA-2048 PSS: a sweep of SHMKEY_SLOTS (requests in flight; fewer slots than
clients means clients queue for a slot) and of SHMKEY_SPIN_US (0: always
sleep, as a semaphore-only ring would). socketpair and in-process are in each
group as references.
"""
from __future__ import annotations

from typing import Optional

import pytest

from shmkey.tools import bench

CLIENTS = 4
REFERENCES = [("in-process", None), ("socketpair", None)]


def _sweep(benchmark, lab: bench.Lab, measure_throughput, knob: str,  # type: ignore[no-untyped-def]
           mode: str, value: Optional[int]) -> None:
    benchmark.group = f"tuning {knob.upper()}: RSA-2048 sign-pss, {CLIENTS} client processes"
    settings = {knob: value} if value is not None else {}
    label = f"{mode} {knob}={value}" if value is not None else mode
    t = measure_throughput(lab.workload(mode, "sign-pss", **settings), CLIENTS, "processes",
                           settings, label=label)
    assert min(t.per_client_ops) > 0


@pytest.mark.parametrize("mode,slots", [("shm", n) for n in (1, 4, 16, 64)] + REFERENCES)
def test_slots(benchmark, lab: bench.Lab, measure_throughput, mode: str,  # type: ignore[no-untyped-def]
               slots: Optional[int]) -> None:
    _sweep(benchmark, lab, measure_throughput, "slots", mode, slots)


@pytest.mark.parametrize("mode,spin_us", [("shm", n) for n in (0, 20, 500, 5000)] + REFERENCES)
def test_spin(benchmark, lab: bench.Lab, measure_throughput, mode: str,  # type: ignore[no-untyped-def]
              spin_us: Optional[int]) -> None:
    _sweep(benchmark, lab, measure_throughput, "spin_us", mode, spin_us)

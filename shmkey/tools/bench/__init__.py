"""``shmkey bench`` and the engine of the pytest-benchmark suite in ``bench/``:
what key isolation costs and what the ring saves over a socket, the same
operation in-process, through a socketpair oracle and a shm oracle, side by side.
"""
from .cli import Options, main, run
from .measure import (KINDS, Busy, Latency, LoadMeter, Throughput, idle_cpu, latency, throughput,
                      throughput_round_robin)
from .plot import plot
from .report import DESIGN_TARGETS, Check, DesignTarget, Report, format_report, machine
from .workloads import MODES, OPERATIONS, TRANSPORTS, Lab, Target, Workload, open_target, \
    workload, write_key

__all__ = [
    "MODES", "TRANSPORTS", "OPERATIONS", "KINDS",
    "Lab", "Target", "Workload", "open_target", "workload", "write_key",
    "Busy", "Latency", "Throughput", "LoadMeter", "idle_cpu", "latency", "throughput",
    "throughput_round_robin",
    "Check", "DesignTarget", "DESIGN_TARGETS", "Report", "format_report", "machine", "plot",
    "Options", "run", "main",
]

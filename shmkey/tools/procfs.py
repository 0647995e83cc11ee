"""Processes as ``/proc`` shows them: whether one runs, its children, the CPU
it has used. For the rig, the benchmark and the tests that watch processes.
"""
from __future__ import annotations

import os
from typing import Optional

_TICK = os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int) -> Optional[list[str]]:
    """The fields of ``/proc/PID/stat`` after the command name (state first);
    None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def children(pid: int) -> list[int]:
    """Live child processes of ``pid``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields is not None and int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                out.append(int(entry))
    return out


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process (all its threads) so far; 0 if it is gone."""
    fields = stat_fields(pid)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / _TICK

"""``shmkey metrics``: a Prometheus exporter for one oracle, in a process of
its own. Each scrape asks the oracle for its status document over one kept
connection and turns it into metrics; the key process never sees HTTP.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

from .. import names
from ..client import status as oracle_status
from ..client.connection import OracleClient
from ..config import Config
from ..errors import ConfigError, ShmkeyError
from ..proxy.supervisor import parse_address

from prometheus_client import start_http_server
from prometheus_client.core import (CollectorRegistry, CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)

log = logging.getLogger("shmkey.metrics")

# The oracle's histogram has eight buckets an octave; every eighth bound is a
# power of two microseconds, so these bounds count exactly what it counted.
BOUNDS_US: tuple[int, ...] = tuple(2 ** k for k in range(4, 22))    # 16 us .. 2.1 s


def _rebucket(fine: list[list[Optional[float]]], count: int) -> list[tuple[str, float]]:
    """The oracle's cumulative ``[upper bound us, count]`` pairs (nonempty
    buckets only, the last bound possibly null) at BOUNDS_US, in seconds."""
    out: list[tuple[str, float]] = []
    for bound in BOUNDS_US:
        below = 0.0
        for upper, cum in fine:
            if upper is not None and cum is not None and upper <= bound * (1 + 1e-9):
                below = float(cum)
        out.append((repr(bound / 1e6), below))
    out.append(("+Inf", float(count)))
    return out


class OracleCollector:
    """A Prometheus collector reading oracle ``name``'s status at each scrape.

    It keeps one connection (so the oracle's audit log gets two lines per
    exporter, not per scrape) and reconnects after a failure; a new oracle
    pid behind the name counts as a restart.
    """

    def __init__(self, name: str, timeout_ms: int, runtime_dir: Optional[str] = None) -> None:
        self.name = name
        self._timeout_ms = timeout_ms
        self._runtime_dir = runtime_dir
        self._lock = threading.Lock()
        self._client: Optional[OracleClient] = None
        self._pid: Optional[int] = None
        self.restarts = 0

    def _status(self) -> dict[str, Any]:
        with self._lock:
            for attempt in (0, 1):
                try:
                    if self._client is None:
                        path = names.find_socket(self.name, self._runtime_dir)
                        self._client = oracle_status.connect(path, self._timeout_ms)
                    doc = self._client.status()
                    break
                except ShmkeyError:
                    self.close()
                    if attempt:
                        raise
            pid = doc.get("pid")
            if self._pid is not None and pid != self._pid:
                self.restarts += 1
            self._pid = pid
            return doc

    def close(self) -> None:
        """Drop the connection, if any (the next scrape makes a new one)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def collect(self) -> Iterator[Metric]:
        """The metrics of one scrape (docs/operations.md lists them)."""
        up = GaugeMetricFamily("shmkey_up", "1 if the oracle answered this scrape's status request",
                               labels=["oracle"])
        restarts = CounterMetricFamily(
            "shmkey_oracle_restarts", "changes of the oracle's pid seen by this exporter",
            labels=["oracle"])
        try:
            doc = self._status()
        except ShmkeyError as exc:
            log.warning("oracle %s: %s", self.name, exc)
            up.add_metric([self.name], 0)
            restarts.add_metric([self.name], self.restarts)
            yield up
            yield restarts
            return
        up.add_metric([self.name], 1)
        restarts.add_metric([self.name], self.restarts)
        yield up
        yield restarts
        yield from _from_document(self.name, doc, own_pid=os.getpid())


def _from_document(name: str, doc: dict[str, Any], own_pid: int) -> Iterator[Metric]:
    ops = CounterMetricFamily("shmkey_operations", "private-key operations by key, kind and result",
                              labels=["oracle", "key_id", "op", "result"])
    in_c = CounterMetricFamily("shmkey_signs_in_c", "signatures among the ok signs made by the "
                               "oracle's C signer, without its Python", labels=["oracle", "key_id"])
    hist = HistogramMetricFamily("shmkey_operation_duration_seconds",
                                 "time in the oracle's handler (policy checks and the math)",
                                 labels=["oracle", "key_id"])
    for key in doc.get("keys", []):
        kid = str(key.get("key_id", ""))
        ops.add_metric([name, kid, "sign", "ok"], key.get("signs", 0))
        ops.add_metric([name, kid, "decrypt", "ok"], key.get("decrypts", 0))
        in_c.add_metric([name, kid], key.get("signs_in_c", 0))
        # The oracle counts failures per key, not per kind of operation.
        ops.add_metric([name, kid, "any", "refused_policy"], key.get("refused_policy", 0))
        ops.add_metric([name, kid, "any", "refused_rate_limit"], key.get("refused_rate_limit", 0))
        ops.add_metric([name, kid, "any", "error"], key.get("errors", 0))
        count = int((key.get("latency_us") or {}).get("count") or 0)
        hist.add_metric([name, kid], _rebucket(key.get("latency_buckets_us", []), count),
                        sum_value=float(key.get("latency_sum_us", 0.0)) / 1e6)
    yield ops
    yield in_c
    yield hist
    clients = [c for c in doc.get("clients", []) if c.get("pid") != own_pid]
    settings = doc.get("settings", {})
    slots = int(settings.get("slots") or 0)
    gauges = (
        ("shmkey_clients", "client connections (this exporter's own not counted)", len(clients)),
        ("shmkey_ring_slots", "slots in the rings of the connected shm clients",
         slots * sum(1 for c in clients if c.get("transport") == "shm")),
        ("shmkey_slots_per_ring", "slots in each client's ring (--slots)", slots),
        ("shmkey_uptime_seconds", "seconds since the oracle started", doc.get("uptime_s", 0)),
    )
    for metric, text, value in gauges:
        g = GaugeMetricFamily(metric, text, labels=["oracle"])
        g.add_metric([name], value)
        yield g
    restarts = CounterMetricFamily("shmkey_worker_restarts",
                                   "worker processes the oracle replaced after they died",
                                   labels=["oracle"])
    restarts.add_metric([name], doc.get("worker_restarts", 0))
    yield restarts


@dataclass
class MetricsOptions:
    """What ``shmkey metrics`` was asked to do."""

    oracle: str
    listen: str
    allow_root: bool = False


def run(opts: MetricsOptions) -> int:
    """Serve ``/metrics`` until SIGTERM or SIGINT.

    Raises:
        ConfigError: --listen is malformed or taken, or started as root
            without ``allow_root``.
    """
    host, port = parse_address(opts.listen, "--listen")
    if os.geteuid() == 0 and not opts.allow_root:
        raise ConfigError("shmkey metrics needs no privilege: run it as an unprivileged user "
                          "the oracle admits (its uid or --group), or pass --allow-root")
    logging.basicConfig(level="INFO", stream=sys.stderr,
                        format="shmkey-metrics[%(process)d] %(levelname)s %(message)s")
    collector = OracleCollector(names.check_name(opts.oracle), Config.load().timeout_ms)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    try:
        server, _thread = start_http_server(port, host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"--listen {opts.listen}: {exc.strerror or exc}") from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("serving oracle %s's metrics at http://%s:%d/metrics", opts.oracle,
             f"[{host}]" if ":" in host else host, server.server_address[1])
    stop.wait()
    server.shutdown()
    collector.close()
    return 0

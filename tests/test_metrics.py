"""`shmkey metrics` against a real oracle: scraped over HTTP, the text
parses, the counters after N signatures are N, and the exporter sees the
oracle go down and come back as a restart."""
from __future__ import annotations

import os
import select
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

import shmkey
from shmkey import _process

from .test_status import Oracle

parser = pytest.importorskip("prometheus_client.parser")

PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


class Exporter:
    """``shmkey metrics`` in a child on a free port, its URL read from its start-up line."""

    def __init__(self, oracle: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shmkey", "metrics", "--oracle", oracle,
             "--listen", "127.0.0.1:0", *(["--allow-root"] if os.geteuid() == 0 else [])],
            stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        ready, _, _ = select.select([self.proc.stderr], [], [], 30)
        line = self.proc.stderr.readline() if ready else ""
        if " at http://" not in line:
            self.proc.kill()
            raise RuntimeError(f"shmkey metrics did not start: {line!r}")
        self.url = line.rsplit(" at ", 1)[1].strip()

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(self.url, timeout=10) as reply:
            assert reply.status == 200
            text = reply.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in parser.text_string_to_metric_families(text) for s in family.samples}

    def stop(self) -> None:
        _process.stop(self.proc, 10)
        assert self.proc.returncode == 0


@pytest.fixture
def running() -> Iterator[list]:
    things: list = []
    yield things
    for t in reversed(things):
        t.stop()


def _value(samples: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and want <= set(ls)]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_scrape_counts_n_signatures(running, tmp_path: Path, rsa2048: Path) -> None:
    o = Oracle(tmp_path, [rsa2048])
    running.append(o)
    exporter = Exporter(o.name)
    running.append(exporter)
    client = shmkey.connect(o.name)
    key = client.private_key()
    n = 37
    for i in range(n):
        key.sign(b"m%d" % i, PSS, hashes.SHA256())
    samples = exporter.scrape()
    labels = {"oracle": o.name, "key_id": shmkey.key_id(key.public_key()).hex()}
    assert _value(samples, "shmkey_up", oracle=o.name) == 1
    assert _value(samples, "shmkey_operations_total", op="sign", result="ok", **labels) == n
    assert _value(samples, "shmkey_operations_total", op="decrypt", result="ok", **labels) == 0
    # A connection's first signature goes through Python (it gets its counters there), the rest C.
    assert n - 1 <= _value(samples, "shmkey_signs_in_c_total", **labels) <= n
    assert _value(samples, "shmkey_operation_duration_seconds_count", **labels) == n
    assert _value(samples, "shmkey_operation_duration_seconds_bucket", le="+Inf", **labels) == n
    assert _value(samples, "shmkey_operation_duration_seconds_sum", **labels) > 0
    assert _value(samples, "shmkey_clients", oracle=o.name) == 1     # not the exporter itself
    # A client's transport is known once the oracle has read its connection event (every 250 ms).
    deadline = time.monotonic() + 10
    while _value(exporter.scrape(), "shmkey_ring_slots", oracle=o.name) != 16:
        assert time.monotonic() < deadline, "the shm client's ring never showed"
        time.sleep(0.1)
    assert _value(samples, "shmkey_oracle_restarts_total", oracle=o.name) == 0
    key.sign(b"one more", PSS, hashes.SHA256())
    again = exporter.scrape()      # the same kept connection, a fresh document
    assert _value(again, "shmkey_operations_total", op="sign", result="ok", **labels) == n + 1
    client.close()


def test_oracle_down_and_restarted(running, tmp_path: Path, rsa2048: Path) -> None:
    o = Oracle(tmp_path, [rsa2048])
    exporter = Exporter(o.name)
    running.append(exporter)
    assert _value(exporter.scrape(), "shmkey_up", oracle=o.name) == 1
    o.stop()
    down = exporter.scrape()
    assert _value(down, "shmkey_up", oracle=o.name) == 0
    assert not [k for k in down if k[0] == "shmkey_operations_total"]
    again = Oracle(tmp_path, [rsa2048], name=o.name)
    running.insert(0, again)
    back = exporter.scrape()
    assert _value(back, "shmkey_up", oracle=o.name) == 1
    assert _value(back, "shmkey_oracle_restarts_total", oracle=o.name) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_refuses_root_without_allow_root() -> None:
    r = subprocess.run([sys.executable, "-m", "shmkey", "metrics", "--oracle", "x",
                        "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr == ("shmkey: shmkey metrics needs no privilege: run it as an unprivileged user "
                        "the oracle admits (its uid or --group), or pass --allow-root\n")

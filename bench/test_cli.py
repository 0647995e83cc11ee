"""``shmkey bench`` end to end, as small as it goes, so that the command, its
table, its targets and its JSON never rot; and the design targets checked on a
made-up report. Measures nothing worth keeping.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from shmkey.tools import bench


def test_shmkey_bench_runs_and_writes_json(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    path = tmp_path / "run.json"
    rc = bench.main(["--duration", "0.05", "--rounds", "1", "--ops", "ping,sign-pss",
                     "--clients", "2", "--kinds", "processes", "--json", str(path)], out, err)
    assert rc == 0, err.getvalue()
    text = out.getvalue()
    assert "Latency" in text and "Throughput" in text and "Design targets" in text
    report = json.loads(path.read_text())
    assert {r["mode"] for r in report["latency"]} == set(bench.MODES)
    assert [t["clients"] for t in report["throughput"]] == [2, 2, 2]
    assert all(min(t["per_client_ops"]) > 0 for t in report["throughput"])
    assert len(report["targets"]) == len(bench.DESIGN_TARGETS) == 9


def test_shmkey_bench_rejects_bad_options() -> None:
    err = io.StringIO()
    assert bench.main(["--workers", "0", "--duration", "0.05", "--no-throughput",
                       "--ops", "ping"], io.StringIO(), err) == 2
    assert "SHMKEY_WORKERS" in err.getvalue()


def test_design_targets_from_a_made_up_report() -> None:
    """Each row of the table: met, missed, not measured, and flagged when the
    machine was busy; the threshold in its name is the one it checks."""
    def lat(op: str, mode: str, p50: float, p99: float, other: float = 0.0) -> bench.Latency:
        return bench.Latency(op, mode, 2048, 100, p50, p99, p50, 1e6 / p50, [], other)

    def tput(mode: str, clients: int, per_client: list[int]) -> bench.Throughput:
        return bench.Throughput("sign-pss", mode, 2048, "processes", clients, {}, per_client,
                                [1.0] * clients)

    report = bench.Report(
        {"bits": 3072, "cores": 2, "workers": 2},
        [lat("ping", "socketpair", 40, 80), lat("ping", "shm", 2, 4, other=0.5),
         lat("ping-c", "shm", 0.7, 1.2),
         lat("sign-pss", "in-process", 300, 500), lat("sign-pss", "shm", 320, 600)],
        [tput("in-process", 2, [100, 100]), tput("shm", 2, [90, 30]),
         tput("socketpair", 2, [70, 70]),
         tput("socketpair", 4, [50] * 4), tput("shm", 4, [60] * 4)])
    checks = {c.target: c for c in report.checks()}
    assert list(checks) == [t.name.format(threshold=t.threshold, bits=3072)
                            for t in bench.DESIGN_TARGETS]
    ping, ping_c, ping_us, sign50, sign99, tput2, vs_sock, fair, collapse = checks.values()
    assert ping.met is True and ping.measured.endswith("other load 0.50 cores, suspect")
    assert ping_c.met is None and ping_c.measured == "not measured"    # no socketpair row
    assert ping_us.met is True and ping_us.measured == "0.70 us"
    assert sign50.target.startswith("RSA-3072") and sign50.met is False   # +20 us > 10
    assert sign99.met is True and sign99.measured.startswith("1.20 x")
    assert tput2.met is False and tput2.measured.startswith("0.60 x")
    assert vs_sock.met is False and vs_sock.measured.startswith("0.86 x")
    assert fair.met is False and fair.measured == "0.33"
    assert collapse.met is True and collapse.measured == "worst 1.20 x (4 processes)"

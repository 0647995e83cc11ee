"""``shmkey bench`` end to end, as small as it goes, so that the command, its
table, its targets and its JSON never rot. Measures nothing worth keeping.
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
    assert len(report["targets"]) == 7


def test_shmkey_bench_rejects_bad_options() -> None:
    err = io.StringIO()
    assert bench.main(["--workers", "0", "--duration", "0.05", "--no-throughput",
                       "--ops", "ping"], io.StringIO(), err) == 2
    assert "SHMKEY_WORKERS" in err.getvalue()

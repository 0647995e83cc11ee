"""``shmkey status NAME`` and ``shmkey list``: an oracle's status document,
or every visible oracle's, as text or JSON.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Optional

from ..client import status as oracle_status
from ..errors import ShmkeyError


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def _us(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:g}"


def render_status(doc: dict[str, Any]) -> str:
    """An oracle's status in lines of text."""
    st = doc.get("settings", {})
    lines = [
        f"oracle {doc['name']}: pid {doc['pid']}, user {doc['user']} (uid {doc['uid']}), "
        f"{doc['transport']}, up {_duration(doc['uptime_s'])}, shmkey {doc.get('version', '?')}",
        "settings: " + ", ".join(f"{k}={v}" for k, v in st.items() if v not in (None, {}, "")),
    ]
    if doc.get("worker_restarts"):
        lines.append(f"worker processes restarted: {doc['worker_restarts']}")
    lines.append("keys:")
    for k in doc.get("keys", []):
        lat = k["latency_us"]
        lines.append(f"  {k['key_id'][:16]} {k['type']:<14} signs {k['signs']} "
                     f"(in C {k.get('signs_in_c', 0)})  decrypts "
                     f"{k['decrypts']}  refused {k['refused']} (policy {k['refused_policy']}, "
                     f"rate limit {k['refused_rate_limit']})  errors {k['errors']}  "
                     f"math us p50 {_us(lat['p50'])} p90 {_us(lat['p90'])} p99 {_us(lat['p99'])}")
    clients = doc.get("clients", [])
    lines.append(f"clients: {len(clients)}")
    for c in clients:
        lines.append(f"  pid {c['pid']} uid {c['uid']} {c['process']:<16} {c['transport']:<10} "
                     f"for {_duration(c['connected_s'])}: {c['operations']} operations, "
                     f"{c['refused']} refused, {c['errors']} errors")
    return "\n".join(lines)


def render_list(docs: list[dict[str, Any]]) -> str:
    """One line per oracle."""
    if not docs:
        return "no oracles running"
    rows = [("NAME", "PID", "USER", "TRANSPORT", "KEYS", "UPTIME", "CLIENTS")]
    for d in docs:
        if "error" in d:
            rows.append((d["name"], "-", "-", "-", "-", "-", f"({d['error']})"))
            continue
        rows.append((d["name"], str(d["pid"]), d["user"], d["transport"],
                     ",".join(k["type"] for k in d.get("keys", [])),
                     _duration(d["uptime_s"]), str(len(d.get("clients", [])))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1]
                     for r in rows)


def main(command: str, name: Optional[str], as_json: bool) -> int:
    """Run ``status`` or ``list``; the exit status."""
    try:
        if command == "status":
            assert name is not None
            doc = oracle_status.status(name)
            print(json.dumps(doc, indent=2) if as_json else render_status(doc))
            return 0
        docs = oracle_status.list_all()
    except ShmkeyError as exc:
        print(f"shmkey: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(docs, indent=2) if as_json else render_list(docs))
    return 0

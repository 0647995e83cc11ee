"""The status document an oracle gives its clients (``shmkey status``): who
it is, its settings, and per key and per client the counters of every worker
process added up. Its keys are documented in docs/operations.md and stable.
"""
from __future__ import annotations

import time
from typing import Any

from .dispatch import KeySet
from .stats import (BOUNDS_NS, DECRYPTS, ERRORS, LATENCY_SUM_NS, REFUSED_POLICY, REFUSED_RATE,
                    SIGNS, SIGNS_IN_C, Region, histogram, percentile_us)

FORMAT = 1      # of the document; grows keys, never renames or drops one


def _key(kid: bytes, kind: str, row: list[int]) -> dict[str, Any]:
    hist = histogram(row)
    done = sum(hist)
    buckets, seen = [], 0
    for i, count in enumerate(hist):
        seen += count
        if count:
            buckets.append([BOUNDS_NS[i] / 1000 if i < len(BOUNDS_NS) else None, seen])
    return {
        "key_id": kid.hex(), "type": kind,
        "signs": row[SIGNS], "signs_in_c": row[SIGNS_IN_C], "decrypts": row[DECRYPTS],
        "refused": row[REFUSED_POLICY] + row[REFUSED_RATE],
        "refused_policy": row[REFUSED_POLICY], "refused_rate_limit": row[REFUSED_RATE],
        "errors": row[ERRORS],
        "latency_us": {"count": done,
                       "mean": round(row[LATENCY_SUM_NS] / done / 1000, 1) if done else None,
                       "p50": percentile_us(hist, 0.50), "p90": percentile_us(hist, 0.90),
                       "p99": percentile_us(hist, 0.99), "p999": percentile_us(hist, 0.999)},
        "latency_buckets_us": buckets,
        "latency_sum_us": round(row[LATENCY_SUM_NS] / 1000, 1),
    }


def document(info: dict[str, Any], keys: KeySet, region: Region) -> dict[str, Any]:
    """The whole status: ``info`` (name, pid, user, transport, started, settings,
    workers...) with uptime, keys and clients added."""
    slots = region.key_slots()
    out = dict(info)
    out["format"] = FORMAT
    out["uptime_s"] = round(time.time() - info["started"], 1)
    out["keys"] = [_key(kid, kind, region.key_totals(slots[kid]))
                   for kid, kind in zip(keys.ids, keys.kinds) if kid in slots]
    now = time.time()
    out["clients"] = [{"pid": c.pid, "uid": c.uid, "process": c.process,
                       "transport": c.transport, "connection": f"{c.serial:x}",
                       "connected_s": round(now - c.since, 1), "operations": c.operations,
                       "refused": c.refused + c.rate_limited, "refused_policy": c.refused,
                       "refused_rate_limit": c.rate_limited, "errors": c.errors}
                      for c in region.clients()]
    return out

"""Full TLS 1.3 handshakes per second through ``shmkey proxy``, with the key in
the proxy's workers (in-process), in its oracle over the shm ring, and in its
oracle over the socket: same worker count, same backend, same load.

The load generator is not the proxy: a pool of Python client processes
(``shmkey.tools.loadgen``), each connection new (no session reuse), one HTTP
request each, every response checked; or, with ``--client s_time``, parallel
``openssl s_time -new -tls1_3 -www /``. Modes are interleaved round by round,
and the ratio to in-process is taken per round, then the median of those. The
p99 is given for the handshake (connect to its end) and for the whole
request (connect to the checked response): at equal throughput, a proxy
whose loop is free relays sooner, so more of the same wait falls in the
handshake.
``--compare sandbox`` instead puts the ring with sandboxed workers beside the
ring with ``--no-sandbox`` (the ratio is to the latter): what the sandbox costs.
``--compare threads`` puts the ring with handshake steps on each worker's loop
(``--handshake-threads 0``) beside the default threads and the key in-process.

    PYTHONPATH=. python3 bench/proxy_handshakes.py --seconds 3 --rounds 5 --workers 2
    PYTHONPATH=. python3 bench/proxy_handshakes.py --compare sandbox
    PYTHONPATH=. python3 bench/proxy_handshakes.py --compare threads --workers 1
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shmkey.tools.rig import MODES, SANDBOX_MODES, THREAD_MODES, ProxyRig


def s_time(rig: ProxyRig, label: str, seconds: int, processes: int) -> tuple[float, float]:
    """Handshakes/s from ``processes`` parallel ``openssl s_time -new`` runs,
    and the proxy's CPU milliseconds per handshake."""
    args = ["openssl", "s_time", "-connect", f"127.0.0.1:{rig.proxies[label].port}", "-new",
            "-tls1_3", "-time", str(seconds), "-www", "/", "-CAfile", str(rig.cert_path)]
    before = rig.proxies[label].cpu_seconds()
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(processes)]
    total, count = 0.0, 0
    for proc in procs:
        out = proc.communicate(timeout=seconds + 60)[0]
        m = re.search(r"(\d+) connections in (\d+) real seconds", out)
        if not m:
            raise RuntimeError(f"s_time said: {out[-300:]}")
        total += int(m.group(1)) / int(m.group(2))
        count += int(m.group(1))
    return total, (rig.proxies[label].cpu_seconds() - before) / max(count, 1) * 1e3


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _median_and_ratio(by_label: dict[str, list[float]], label: str,
                      base_label: str) -> tuple[float, float]:
    """The median of ``label``'s rounds, and the median of its per-round ratios to the base."""
    ratios = [a / b for a, b in zip(by_label[label], by_label[base_label])]
    return _median(by_label[label]), _median(ratios)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=3, help="per mode and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2, help="proxy workers, every mode")
    parser.add_argument("--loaders", type=int, default=2, help="client processes")
    parser.add_argument("--concurrency", type=int, default=16, help="connections at once, in all")
    parser.add_argument("--client", choices=["python", "s_time"], default="python")
    parser.add_argument("--compare", choices=["key", "sandbox", "threads"], default="key",
                        help="key: in-process, socketpair, shm; sandbox: shm with and without "
                             "it; threads: shm with handshake steps on the loop or in threads")
    args = parser.parse_args()
    modes = list({"key": MODES, "sandbox": SANDBOX_MODES, "threads": THREAD_MODES}[args.compare])
    base_label = "shm, --no-sandbox" if args.compare == "sandbox" else "in-process"
    rates: dict[str, list[float]] = {label: [] for label in modes}
    cpu: dict[str, list[float]] = {label: [] for label in modes}
    p99: dict[str, list[float]] = {label: [] for label in modes}
    p99_whole: dict[str, list[float]] = {label: [] for label in modes}
    failed = 0
    with ProxyRig(args.workers, loaders=args.loaders, modes=modes) as rig:
        for r in range(args.rounds):
            for label in modes if r % 2 == 0 else reversed(modes):
                if args.client == "s_time":
                    rate, ms = s_time(rig, label, args.seconds, args.concurrency)
                    cpu[label].append(ms)
                else:
                    result = rig.measure(label, concurrency=args.concurrency,
                                         seconds=args.seconds)
                    rate, failed = result.rate, failed + result.failed
                    cpu[label].append(result.cpu_per_request * 1e3)
                    p99[label].append(result.handshake_ms(99))
                    p99_whole[label].append(result.request_ms(99))
                rates[label].append(rate)
                print(f"round {r + 1}: {label}: {rate:.0f}/s", file=sys.stderr, flush=True)
    client = (f"{args.loaders} Python client processes" if args.client == "python"
              else "parallel openssl s_time") + f", {args.concurrency} connections at once"
    print(f"\nFull TLS 1.3 handshakes/s through shmkey proxy, {args.workers} workers; {client}; "
          f"{args.rounds} rounds of {args.seconds} s; {failed} failed\n")
    print(f"| mode | handshakes/s median (min-max) | vs {base_label}, median of rounds (min-max) "
          f"| proxy+oracle CPU ms per handshake | handshakes per CPU-second vs {base_label} "
          f"| p99 handshake ms, median of rounds | p99 vs {base_label} "
          f"| p99 whole request ms | p99 vs {base_label} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label in modes:
        ratios = [a / b for a, b in zip(rates[label], rates[base_label])]
        ms = _median(cpu[label])
        base = _median(cpu[base_label])
        tail, tail_ratio = _median_and_ratio(p99, label, base_label)
        whole, whole_ratio = _median_and_ratio(p99_whole, label, base_label)
        print(f"| {label} | {statistics.median(rates[label]):.0f} ({min(rates[label]):.0f}-"
              f"{max(rates[label]):.0f}) | {statistics.median(ratios):.3f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}) | {ms:.3f} | {base / ms:.3f}x "
              f"| {tail:.2f} | {tail_ratio:.2f}x | {whole:.2f} | {whole_ratio:.2f}x |")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

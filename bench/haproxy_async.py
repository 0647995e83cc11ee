"""Full TLS 1.3 handshakes per second through haproxy with ``ssl-mode-async``,
the key in a shmkey oracle (the provider pauses each handshake's ASYNC job
while the oracle signs) against the key in haproxy itself, with
``nbthread 1`` and ``2``. The load is several ``openssl s_time -new`` at once
(C clients, one handshake at a time each, no resumption); modes are
interleaved round by round and the median is reported.

    PYTHONPATH=. python3 bench/haproxy_async.py --seconds 3 --rounds 3 --clients 4
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _tls import Serve, free_port, wait_for_port, write_key_and_cert

from shmkey import _process
from shmkey.openssl import keyref

CFG = """\
global
    nbthread {threads}
    ssl-mode-async
    tune.ssl.cachesize 0
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend tls
    bind 127.0.0.1:{port} ssl crt {crt} ssl-min-ver TLSv1.3
    http-request return status 200 content-type text/plain string "hello"
"""


def handshakes(port: int, clients: int, seconds: int) -> float:
    """Handshakes per second of ``clients`` concurrent ``s_time -new`` runs, summed."""
    procs = [subprocess.Popen(["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new",
                               "-time", str(seconds)], stdout=subprocess.PIPE, text=True)
             for _ in range(clients)]
    total = 0.0
    for p in procs:
        out, _ = p.communicate(timeout=seconds + 60)
        for line in out.splitlines():
            if "connections in" in line and "real seconds" in line:
                words = line.split()
                total += int(words[0]) / int(words[3])
    return total


def measure(crt: Path, cnf: Path, threads: int, clients: int, seconds: int) -> float:
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "haproxy.cfg"
        cfg.write_text(CFG.format(threads=threads, port=port, crt=crt))
        proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)],
                                env=dict(os.environ, OPENSSL_CONF=str(cnf)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(port, proc)
            return handshakes(port, clients, seconds)
        finally:
            _process.stop(proc, 10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        key, cert = write_key_and_cert(work, "server")
        cnf = work / "shmkey.cnf"
        cnf.write_bytes(subprocess.run([sys.executable, "-m", "shmkey", "openssl-conf"],
                                       check=True, capture_output=True).stdout)
        serve = Serve(key, "shm").start()
        try:
            ref = work / "ref.pem"
            keyref.write(serve.name, ref, cert=cert, oracle_user=serve.user)
            crts = {"oracle": work / "oracle.pem", "in-haproxy": work / "own.pem"}
            crts["oracle"].write_bytes(cert.read_bytes() + ref.read_bytes())
            crts["in-haproxy"].write_bytes(cert.read_bytes() + key.read_bytes())
            results: dict[tuple[int, str], list[float]] = {}
            for _ in range(args.rounds):
                for threads in (1, 2):
                    for mode, crt in crts.items():
                        rate = measure(crt, cnf, threads, args.clients, args.seconds)
                        results.setdefault((threads, mode), []).append(rate)
        finally:
            serve.stop()
    print(f"{'nbthread':>8} {'in-haproxy':>11} {'oracle':>9} {'ratio':>6}   (handshakes/s, median)")
    for threads in (1, 2):
        own = statistics.median(results[(threads, "in-haproxy")])
        ora = statistics.median(results[(threads, "oracle")])
        print(f"{threads:>8} {own:>11.0f} {ora:>9.0f} {ora / own:>6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

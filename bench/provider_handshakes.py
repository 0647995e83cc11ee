"""Full TLS handshakes per second through shmkey's OpenSSL provider, side by side
with the key loaded in-process: ``openssl s_server`` (the loadable module) and
Python's ssl (the builtin provider), the oracle on its ring and on its socket.
Then RSA-PSS signatures per second through EVP in C (provider_sign.c), 1 and 2
threads: the oracle round trip without TLS around it.

The handshake client is ``openssl s_time -new`` (one handshake at a time, no
resumption), so those numbers are per-connection latency as much as
throughput. Modes are interleaved round by round; the median is reported.

    PYTHONPATH=. python3 bench/provider_handshakes.py --seconds 3 --rounds 3
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _tls import Serve, free_port, wait_for_port, write_key_and_cert

import shmkey.openssl
from shmkey import _process
from shmkey.openssl import keyref


def s_time(port: int, seconds: int, *args: str) -> float:
    out = subprocess.run(["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new",
                          "-time", str(seconds), *args], capture_output=True, text=True,
                         timeout=seconds + 30).stdout
    m = re.search(r"(\d+) connections in (\d+) real seconds", out)
    if not m:
        raise RuntimeError(f"s_time said: {out[-500:]}")
    return int(m.group(1)) / int(m.group(2))


class PythonServer:
    """Handshake, then close: Python's ssl, one connection at a time."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


def measure_s_server(cert: Path, key: Path, cnf: Path, seconds: int, tls: str) -> float:
    port = free_port()
    proc = subprocess.Popen(["openssl", "s_server", "-accept", f"127.0.0.1:{port}",
                             "-cert", str(cert), "-key", str(key), "-quiet"],
                            env=dict(os.environ, OPENSSL_CONF=str(cnf)),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        return s_time(port, seconds, tls)
    finally:
        _process.stop(proc, 10)


def measure_python(cert: Path, key: Path, seconds: int, tls: str) -> float:
    server = PythonServer(cert, key)
    try:
        return s_time(server.port, seconds, tls)
    finally:
        server.close()


def measure_signs(binary: Path, key: Path, cnf: Path, threads: int, signs: int) -> float:
    out = subprocess.run([str(binary), str(key), str(signs), str(threads)], check=True,
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OPENSSL_CONF=str(cnf))).stdout
    return float(out.split()[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--signs", type=int, default=1000, help="per thread and round")
    args = parser.parse_args()
    shmkey.openssl.enable()
    with tempfile.TemporaryDirectory(prefix="shmkey-bench-provider-") as tmp:
        d = Path(tmp)
        key, cert = write_key_and_cert(d, "server")
        cnf = d / "shmkey.cnf"
        cnf.write_text(shmkey.openssl.openssl_conf())
        oracles = {t: Serve(key, t).start() for t in ("shm", "socketpair")}
        try:
            keys = {"in-process": key}
            for t, serve in oracles.items():
                keys[f"oracle {t}"] = d / f"{t}.ref.pem"
                keyref.write(serve.name, keys[f"oracle {t}"], cert=cert, transport=t)
            binary = d / "provider_sign"
            subprocess.run(["cc", "-O2", str(Path(__file__).with_name("provider_sign.c")),
                            "-o", str(binary), "-lcrypto", "-lpthread"], check=True)
            results: dict[tuple[str, str, str], list[float]] = {}
            signs: dict[tuple[int, str], list[float]] = {}
            for _ in range(args.rounds):
                for threads in (1, 2):
                    for mode, k in keys.items():
                        signs.setdefault((threads, mode), []).append(
                            measure_signs(binary, k, cnf, threads, args.signs))
                for tls in ("-tls1_3", "-tls1_2"):
                    for mode, k in keys.items():
                        for server in ("s_server", "python ssl"):
                            rate = (measure_s_server(cert, k, cnf, args.seconds, tls)
                                    if server == "s_server"
                                    else measure_python(cert, k, args.seconds, tls))
                            results.setdefault((server, tls[1:], mode), []).append(rate)
        finally:
            for serve in oracles.values():
                serve.stop()
    print(f"| EVP_DigestSign RSA-2048 PSS | key | signs/s (median of {args.rounds}) "
          "| vs in-process |")
    print("|---|---|---|---|")
    for (threads, mode), rates in signs.items():
        base = statistics.median(signs[(threads, "in-process")])
        med = statistics.median(rates)
        print(f"| {threads} thread{'s' if threads > 1 else ''} | {mode} | {med:.0f} "
              f"| {med / base:.2f}x |")
    print()
    print(f"| server | TLS | key | handshakes/s (median of {args.rounds}) | vs in-process |")
    print("|---|---|---|---|---|")
    for (server, tls, mode), rates in results.items():
        base = statistics.median(results[(server, tls, "in-process")])
        med = statistics.median(rates)
        print(f"| {server} | {tls} | {mode} | {med:.0f} | {med / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

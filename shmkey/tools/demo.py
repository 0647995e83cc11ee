"""``shmkey demo``: three ``shmkey proxy`` before one backend (key in-process, in
an oracle over a socketpair, over the shm ring); real HTTPS through them,
handshakes/s, sign latency, and a memory scan that finds the key only in the oracle.
"""
from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ..client import connect
from . import loadgen as _loadgen
from .certs import HOST
from .memscan import ScanResult, key_secrets, scan_process
from .rig import MODES, ProxyProcess, ProxyRig
from .stats import percentile

LABELS = {"in-process": "key in the proxy (in-process)",
          "oracle socketpair": "key in the oracle, socketpair",
          "oracle shm": "key in the oracle, shm ring"}
_REQUESTS = 200
_SIGNS = 400
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)   # as TLS 1.3 signs


def _status(text: str) -> None:
    """A progress line, rewritten in place on a terminal; not written elsewhere."""
    if sys.stdout.isatty():
        print(f"\r{text:<79}", end="", flush=True)


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = width * done // total
    return "[" + "#" * filled + "." * (width - filled) + f"] {done}/{total}"


def _sign_us(sign: Callable[[bytes], bytes], n: int) -> list[float]:
    out = []
    for _ in range(n):
        digest = os.urandom(32)
        t0 = time.perf_counter()
        sign(digest)
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def _https_requests(proxy: ProxyProcess, cafile: Path) -> int:
    """Real HTTPS requests through the proxy, half TLS 1.3, half 1.2; how many were right."""
    ok = 0
    for version in ("1.3", "1.2"):
        def progress(r: _loadgen.LoadResult, version: str = version, done: int = ok) -> None:
            _status(f"  HTTPS requests through the proxy (TLS {version}): "
                    f"{_bar(done + r.ok + r.failed, _REQUESTS)}")

        result = asyncio.run(_loadgen.run("127.0.0.1", proxy.port,
                                          _loadgen.client_context(str(cafile), version),
                                          concurrency=4, count=_REQUESTS // 2,
                                          tag=f"demo-tls{version}", progress=progress))
        ok += result.ok
        for error, count in result.errors.items():
            print(f"\n    {count} failed: {error}")
    _status("")
    print(f"\r  HTTPS requests through the proxy: {ok} of {_REQUESTS} answered correctly, "
          "each checked against its request")
    return ok


def _memory_check(proxy: ProxyProcess, key: rsa.RSAPrivateKey) -> bool:
    print("\nMemory check: the key's primes, private exponent, CRT values, DER and PEM "
          "searched in /proc/PID/mem")
    secrets = key_secrets(key)
    ok = True
    targets = [("proxy supervisor", proxy.pid)] + [("proxy worker", p) for p in proxy.workers()]
    targets += [("key oracle", p) for p in proxy.oracles()]
    for role, pid in targets:
        try:
            scan: Optional[ScanResult] = scan_process(pid, secrets)
        except PermissionError:
            scan = None
        if scan is None:
            print(f"  {role:<17} pid {pid:<7} not readable (run as root to scan it)")
            ok = ok and role == "key oracle"
            continue
        note = ""
        if role == "key oracle":
            note = "  (found: the scanner works)" if scan.found else "  (UNEXPECTED: not found)"
            ok = ok and scan.found > 0
        else:
            ok = ok and scan.found == 0
        print(f"  {role:<17} pid {pid:<7} {scan.found:>3} hits in "
              f"{scan.bytes_scanned / 1e6:5.0f} MB{note}")
    return ok


def run(seconds: float = 2.0, rounds: int = 2, workers: Optional[int] = None) -> int:
    """Run the demo; 0 when every request was answered and the memory check came out right."""
    workers = workers or min(os.cpu_count() or 1, 4)
    print("shmkey demo: a TLS proxy whose private key lives in a separate key oracle\n")
    with ProxyRig(workers, loaders=2) as rig:
        main = rig.proxies["oracle shm"]
        print(f"  throwaway RSA-2048 key and certificate for {HOST} in {rig.dir}")
        print(f"  HTTP backend on 127.0.0.1:{rig.backend.port}")
        print(f"  `shmkey proxy` on https://{HOST}:{main.port}/ -> backend: pid {main.pid}, "
              f"{workers} workers, key in oracle {main.oracle_name!r} (pid {main.oracle_pid})\n"
              "  (and two more like it: key in-process, and in an oracle over socketpair)\n")
        answered = _https_requests(main, rig.cert_path)
        memory_ok = _memory_check(main, rig.key)

        print(f"\nFull TLS 1.3 handshakes per second through each proxy ({workers} workers; "
              f"load: {rig.loaders} client processes x {16 // rig.loaders} connections, a new "
              f"connection and checked request each; {rounds} rounds of {seconds:g} s, "
              "interleaved):")
        rates: dict[str, list[float]] = {label: [] for label in MODES}
        failed = 0
        for r in range(rounds):
            for label in MODES:
                _status(f"  round {r + 1}/{rounds}: {LABELS[label]}")
                result = rig.measure(label, seconds=seconds)
                rates[label].append(result.rate)
                failed += result.failed
        _status("")
        print("\r", end="")
        signs = {label: _sign_latencies(rig, label) for label in MODES}

    base = statistics.median(rates["in-process"])
    print(f"  {'':<32}{'handshakes/s':>13}{'vs in-process':>15}{'sign p50':>11}{'sign p99':>11}")
    for label in MODES:
        rate = statistics.median(rates[label])
        print(f"  {LABELS[label]:<32}{rate:>13.0f}{rate / base:>14.2f}x"
              f"{percentile(signs[label], 50):>9.0f}us{percentile(signs[label], 99):>9.0f}us")
    print(f"  (sign: RSA-2048 PSS, {_SIGNS} one at a time from this process, through the "
          f"proxy's oracle; {failed} handshakes failed under load)")
    ok = memory_ok and answered == _REQUESTS and failed == 0
    print("\n" + ("OK: real HTTPS through the proxy, and the key is only in the oracle."
                  if ok else "UNEXPECTED: see above."))
    print("Everything the demo started has stopped; its files and shared memory are removed.")
    return 0 if ok else 1


def _sign_latencies(rig: ProxyRig, label: str) -> list[float]:
    """Signing latency with the key as that proxy holds it."""
    if label == "in-process":
        return _sign_us(lambda d: rig.key.sign(d, _PSS, hashes.SHA256()), _SIGNS)
    name = rig.proxies[label].oracle_name
    assert name is not None
    client = connect(name, transport=label.split()[1])
    try:
        key = client.private_key()
        assert isinstance(key, rsa.RSAPrivateKey)
        _sign_us(lambda d: key.sign(d, _PSS, hashes.SHA256()), 20)      # connect, warm up
        return _sign_us(lambda d: key.sign(d, _PSS, hashes.SHA256()), _SIGNS)
    finally:
        client.close()


def main(seconds: float = 2.0) -> int:
    """``shmkey demo``: :func:`run`, and on Ctrl-C one "interrupted" line and
    status 130, once everything the demo started has stopped."""
    try:
        return run(seconds)
    except KeyboardInterrupt:
        _status("")     # over the progress line, and the terminal's ^C
        print(("\r" if sys.stdout.isatty() else "") + "shmkey demo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Signing with a SoftHSM2 token key, side by side: a key file in this
process (``cryptography``), the token in this process (python-pkcs11, through
shmkey's token key), the token behind shmkey's oracle over the shm ring and
over socketpair, and the token behind ``p11-kit server`` (p11-kit's remote
mode: the client module ``p11-kit-client.so`` in this process).

RSA-2048 PSS and PKCS#1 v1.5 and ECDSA P-256, all over SHA-256, interleaved
round by round; every signature verified with the public key afterwards. The
targets: shmkey over shm <= in-process token + 15 us p50, and at least 5x
less added latency than p11-kit remote.

    PYTHONPATH=. python3 bench/test_pkcs11_sign.py

SoftHSM2's RSA drifts by 10-20% over seconds on a shared machine, more than
the differences measured, so the modes take turns often: 40 rounds of 25
signatures each by default (blocks of 300 made the ring look 100-180 us
slower or faster from one run to the next).

Under pytest (``--benchmark-disable`` in CI) each mode signs a few times and
verifies, so the paths cannot rot.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import padding as apad

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _softhsm import PIN, SoftHSM, available

import shmkey
from shmkey.oracle import pkcs11 as token_keys
from shmkey.tools.stats import percentile

P11KIT_CLIENT = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
MESSAGE = b" " * 64 + b"TLS 1.3, server CertificateVerify\x00" + bytes(range(32))
PSS = apad.PSS(mgf=apad.MGF1(hashes.SHA256()), salt_length=apad.PSS.DIGEST_LENGTH)
OPS: dict[str, tuple[str, Callable[[Any], bytes]]] = {
    "RSA-2048 PSS": ("tls-rsa", lambda k: k.sign(MESSAGE, PSS, hashes.SHA256())),
    "RSA-2048 PKCS#1 v1.5": ("tls-rsa", lambda k: k.sign(MESSAGE, apad.PKCS1v15(), hashes.SHA256())),
    "ECDSA P-256": ("tls-ec", lambda k: k.sign(MESSAGE, ec.ECDSA(hashes.SHA256()))),
}
MODES = ("file in-process", "token in-process", "shmkey shm", "shmkey socketpair", "p11-kit remote")


class P11KitRemote:
    """``p11-kit server`` exporting the token; keys signing through its client module."""

    def __init__(self, token: SoftHSM) -> None:
        self.sock = token.dir / "p11-kit.sock"
        self.proc = subprocess.Popen(["p11-kit", "server", "-f", "-n", str(self.sock),
                                      "--provider", token.module, f"pkcs11:token={token.label}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not self.sock.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("p11-kit server did not start")
            time.sleep(0.05)
        os.environ["P11_KIT_SERVER_ADDRESS"] = f"unix:path={self.sock}"

    def keys(self, token: SoftHSM) -> dict[str, Any]:
        """Token keys whose module is p11-kit's client (a separate PIN file keeps argv clean)."""
        pin = token.dir / "p11kit.pin"
        pin.write_text(PIN)
        pin.chmod(0o600)
        out = {}
        for label in ("tls-rsa", "tls-ec"):
            uri = token.keys[label].uri(module=False, pin=None, pin_source=f"file:{pin}")
            out[label] = token_keys.load(uri, P11KIT_CLIENT)
        return out

    def stop(self) -> None:
        os.environ.pop("P11_KIT_SERVER_ADDRESS", None)
        self.proc.terminate()
        self.proc.wait(10)


@contextlib.contextmanager
def lab() -> Iterator[dict[str, dict[str, Any]]]:
    """mode -> label -> a key object with cryptography's sign()."""
    with tempfile.TemporaryDirectory() as tmp, SoftHSM(Path(tmp)) as token:
        uris = [token.keys[label].uri() for label in ("tls-rsa", "tls-ec")]
        files = {label: serialization.load_pem_private_key(token.keys[label].key_file.read_bytes(),
                                                            None)
                 for label in ("tls-rsa", "tls-ec")}
        modes: dict[str, dict[str, Any]] = {"file in-process": files}
        modes["token in-process"] = {label: token_keys.load(uri) for label, uri in
                                     zip(("tls-rsa", "tls-ec"), uris)}
        remote: Optional[P11KitRemote] = None
        with contextlib.ExitStack() as stack:
            for transport in ("shm", "socketpair"):
                oracle = stack.enter_context(shmkey.KeyOracle(uris, transport=transport))
                rsa_key, ec_key = oracle.client.private_keys()
                modes[f"shmkey {transport}"] = {"tls-rsa": rsa_key, "tls-ec": ec_key}
            if os.path.exists(P11KIT_CLIENT):
                remote = P11KitRemote(token)
                stack.callback(remote.stop)
                modes["p11-kit remote"] = remote.keys(token)
            yield modes


def measure(modes: dict[str, dict[str, Any]], rounds: int, calls: int
            ) -> dict[tuple[str, str], list[float]]:
    """Interleaved: every round runs every operation in every mode."""
    out: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for op, (label, sign) in OPS.items():
            for mode, keys in modes.items():
                key, times = keys[label], out.setdefault((op, mode), [])
                for _ in range(calls):
                    t0 = time.perf_counter_ns()
                    sign(key)
                    times.append((time.perf_counter_ns() - t0) / 1000)
    return out


def verify_all(modes: dict[str, dict[str, Any]]) -> None:
    """Each mode's signature checks out against the file key's public half."""
    for op, (label, sign) in OPS.items():
        public = modes["file in-process"][label].public_key()
        for keys in modes.values():
            sig = sign(keys[label])
            if label == "tls-rsa":
                pad = PSS if "PSS" in op else apad.PKCS1v15()
                public.verify(sig, MESSAGE, pad, hashes.SHA256())
            else:
                public.verify(sig, MESSAGE, ec.ECDSA(hashes.SHA256()))


def report(times: dict[tuple[str, str], list[float]]) -> str:
    """p50/p99 per mode, the latency each adds over the in-process token, and the ratio."""
    lines = []
    for op in OPS:
        lines.append(f"{op}")
        base = percentile(times[(op, "token in-process")], 50)
        remote = times.get((op, "p11-kit remote"))
        remote_added = percentile(remote, 50) - base if remote else None
        for mode in MODES:
            if (op, mode) not in times:
                continue
            t = times[(op, mode)]
            p50, p99 = percentile(t, 50), percentile(t, 99)
            added = p50 - base
            vs = (f"  {remote_added / added:5.1f}x less than p11-kit" if remote_added and
                  mode.startswith("shmkey") and added > 0 else "")
            lines.append(f"  {mode:<18} p50 {p50:8.1f} us  p99 {p99:8.1f} us  "
                         f"added {added:+7.1f} us{vs}")
    return "\n".join(lines)


@pytest.mark.skipif(not available(), reason="softhsm2 is not installed")
def test_pkcs11_sign(benchmark, timed: bool) -> None:  # type: ignore[no-untyped-def]
    with lab() as modes:
        verify_all(modes)
        times: dict[tuple[str, str], list[float]] = {}
        benchmark.pedantic(lambda: times.update(measure(modes, 3 if timed else 1,
                                                        200 if timed else 2)),
                           rounds=1, iterations=1)
        benchmark.extra_info["table"] = report(times)


def main(argv: Optional[list[str]] = None) -> int:
    """Print the side-by-side table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--calls", type=int, default=25, help="signatures per mode, operation, round")
    args = parser.parse_args(argv)
    with lab() as modes:
        verify_all(modes)
        print(report(measure(modes, args.rounds, args.calls)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

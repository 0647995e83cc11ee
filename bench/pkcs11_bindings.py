"""The two PKCS#11 bindings from PyPI side by side on the oracle's hot path:
python-pkcs11 (Cython) and PyKCS11 (SWIG), signing with the same SoftHSM2
keys in a throwaway token.

* per-call cost: ECDSA P-256 over a digest (cheap in SoftHSM2, so the
  binding's own overhead shows) and RSA-2048 PKCS#1 v1.5, p50 and p99,
  interleaved round by round;
* the GIL: how much a pure-Python thread gets done while another signs
  RSA-2048 in a loop (1.0x: ``C_Sign`` runs without the GIL).

Threads are not used for throughput: python-pkcs11 calls ``C_Initialize``
without ``CKF_OS_LOCKING_OK``, so a module may not be entered from two threads
at once (SoftHSM2 then fails with CKR_GENERAL_ERROR or crashes); the oracle
serves token keys from worker processes, one session each.

    PYTHONPATH=. python3 bench/pkcs11_bindings.py --rounds 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from cryptography.hazmat.primitives import hashes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _softhsm import LABEL, MODULE, PIN, SoftHSM

from shmkey.tools.stats import percentile

DIGEST = hashes.Hash(hashes.SHA256())
DIGEST.update(b"bench")
SHA256 = DIGEST.finalize()
# RFC 8017 9.2 note 1: DigestInfo prefix of SHA-256, for CKM_RSA_PKCS.
PKCS1_SHA256 = bytes.fromhex("3031300d060960864801650304020105000420") + SHA256

Signer = Callable[[], bytes]


def python_pkcs11(module: str, label: str) -> dict[str, Callable[[], Signer]]:
    """Signers on fresh sessions of python-pkcs11 (one session per call of the factory)."""
    import pkcs11

    lib = pkcs11.lib(module)
    tok = lib.get_token(token_label=label)
    login = tok.open(user_pin=PIN)      # the login is the application's: later sessions share it

    def factory(obj: str, mech: pkcs11.Mechanism, data: bytes) -> Callable[[], Signer]:
        def make() -> Signer:
            assert login
            session = tok.open()
            key = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, label=obj)
            return lambda: key.sign(data, mechanism=mech)
        return make

    return {"ecdsa": factory("tls-ec", pkcs11.Mechanism.ECDSA, SHA256),
            "rsa": factory("tls-rsa", pkcs11.Mechanism.RSA_PKCS, PKCS1_SHA256)}


def pykcs11(module: str, label: str) -> dict[str, Callable[[], Signer]]:
    """The same signers through PyKCS11."""
    import PyKCS11 as P

    lib = P.PyKCS11Lib()
    lib.load(module)
    slot = next(s for s in lib.getSlotList(tokenPresent=True)
                if lib.getTokenInfo(s).label.strip() == label)
    login = lib.openSession(slot, P.CKF_SERIAL_SESSION)
    login.login(PIN)

    def factory(obj: str, mech: int, data: bytes) -> Callable[[], Signer]:
        def make() -> Signer:
            assert login
            session = lib.openSession(slot, P.CKF_SERIAL_SESSION)
            key = session.findObjects([(P.CKA_CLASS, P.CKO_PRIVATE_KEY), (P.CKA_LABEL, obj)])[0]
            mechanism = P.Mechanism(mech, None)
            return lambda: bytes(session.sign(key, data, mechanism))
        return make

    return {"ecdsa": factory("tls-ec", P.CKM_ECDSA, SHA256),
            "rsa": factory("tls-rsa", P.CKM_RSA_PKCS, PKCS1_SHA256)}


def latencies(sign: Signer, n: int) -> list[float]:
    """``n`` timed calls, in microseconds."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        sign()
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


def rate(make: Callable[[], Signer], seconds: float) -> float:
    """RSA signatures per second from one thread."""
    sign, count = make(), 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        sign()
        count += 1
    return count / (time.monotonic() - t0)


def gil_share(make: Callable[[], Signer], seconds: float) -> float:
    """How much a pure-Python thread gets done while another thread signs
    RSA-2048 in a loop, relative to alone: about 1 on two cores when the
    binding releases the GIL inside ``C_Sign``, far less when it holds it."""
    def count(stop: float) -> int:
        n = 0
        while time.monotonic() < stop:
            n += 1
        return n

    alone = count(time.monotonic() + seconds)
    sign, done = make(), threading.Event()

    def signer() -> None:
        while not done.is_set():
            sign()

    t = threading.Thread(target=signer)
    t.start()
    try:
        shared = count(time.monotonic() + seconds)
    finally:
        done.set()
        t.join()
    return shared / alone


def one_round(binding: str, calls: int, seconds: float) -> dict[str, object]:
    """One round of every measurement for one binding, in this process."""
    ops = BINDINGS[binding](MODULE, LABEL)
    out: dict[str, object] = {op: latencies(make(), calls) for op, make in ops.items()}
    out["rsa/s"] = rate(ops["rsa"], seconds)
    out["gil"] = gil_share(ops["rsa"], seconds)
    return out


BINDINGS = {"python-pkcs11": python_pkcs11, "PyKCS11": pykcs11}


def main(argv: list[str] | None = None) -> int:
    """Print the side-by-side table. Each binding measures in a child process of
    its own (both in one process would load the module twice), round by round."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=400, help="signatures per mode and round")
    parser.add_argument("--seconds", type=float, default=1.0, help="per throughput round")
    parser.add_argument("--child", choices=list(BINDINGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(one_round(args.child, args.calls, args.seconds)))
        return 0
    results: dict[str, list[dict[str, Any]]] = {b: [] for b in BINDINGS}
    with tempfile.TemporaryDirectory() as tmp, SoftHSM(Path(tmp)):
        for _ in range(args.rounds):
            for b in BINDINGS:
                out = subprocess.run([sys.executable, __file__, "--child", b, "--calls",
                                      str(args.calls), "--seconds", str(args.seconds)],
                                     check=True, capture_output=True, text=True).stdout
                results[b].append(json.loads(out))
    print(f"{'binding':<14} {'ECDSA P-256 p50/p99 us':>22} {'RSA-2048 p50/p99 us':>20} "
          f"{'RSA signs/s':>12} {'Python thread beside C_Sign':>28}")
    for b, rounds in results.items():
        e = [v for r in rounds for v in r["ecdsa"]]
        rs = [v for r in rounds for v in r["rsa"]]
        print(f"{b:<14} {percentile(e, 50):>12.1f}/{percentile(e, 99):<9.1f} "
              f"{percentile(rs, 50):>10.1f}/{percentile(rs, 99):<9.1f} "
              f"{statistics.median(r['rsa/s'] for r in rounds):>12,.0f} "
              f"{statistics.median(r['gil'] for r in rounds):>27.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""atheris target for the oracle's Python-facing decode path: any operation
code, key index, parameters and payload a client can put in a slot reach
``Handler.handle``, which must answer with a status and never raise. An
EINTERNAL answer means an exception escaped the checks: that is a finding.

    python3 tests/fuzz/fuzz_handler.py -max_total_time=60
"""
from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from cryptography.hazmat.primitives.asymmetric import rsa

    from shmkey import _wire
    from shmkey._binding import lib
    from shmkey.oracle.handler import Handler, Policy

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
HANDLER = Handler([KEY], Policy(allow_pkcs1v15_decrypt=True))


def param(fdp: atheris.FuzzedDataProvider) -> int:
    # Mostly small codes (the meaningful ones), sometimes any 32-bit value.
    return fdp.ConsumeIntInRange(0, 600) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 2**32 - 1)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    op = fdp.ConsumeIntInRange(0, 6)
    index = fdp.ConsumeIntInRange(0, 2)
    p = (param(fdp), param(fdp), param(fdp), param(fdp))
    payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 700))
    _wire.decode_sign(p, KEY.key_size)
    _wire.decode_decrypt(p)
    status, out = HANDLER.handle(op, index, p, payload)
    if status == lib.SHMKEY_EINTERNAL or status > 0 or not isinstance(out, bytes):
        raise AssertionError(f"op={op} p={p} len={len(payload)} -> {status} {out[:80]!r}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()

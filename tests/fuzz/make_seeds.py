"""Write the libFuzzer seed corpus: one well-formed request per operation, for
the ring and for the socket framing (after a hello), laid out by the cffi
build of shmkey.h so the seeds always match the real structs.
Run: python3 tests/fuzz/make_seeds.py
"""
from __future__ import annotations

import struct
from pathlib import Path

from shmkey._binding import ffi, lib

OUT = Path(__file__).resolve().parent / "seeds"
SHA256 = bytes(32)

REQUESTS = {
    "ping": (lib.SHMKEY_OP_PING, (0, 0, 0, 0), b"echo me"),
    "pubkey": (lib.SHMKEY_OP_PUBKEY, (0, 0, 0, 0), b""),
    "sign-pkcs1": (lib.SHMKEY_OP_SIGN, (lib.SHMKEY_PAD_PKCS1V15, lib.SHMKEY_HASH_SHA256, 0, 0), SHA256),
    "sign-pss": (lib.SHMKEY_OP_SIGN, (lib.SHMKEY_PAD_PSS, lib.SHMKEY_HASH_SHA256,
                                      lib.SHMKEY_HASH_SHA256, 32), SHA256),
    "decrypt-oaep": (lib.SHMKEY_OP_DECRYPT, (lib.SHMKEY_PAD_OAEP, lib.SHMKEY_HASH_SHA256,
                                             lib.SHMKEY_HASH_SHA256, 5), bytes(256) + b"label"),
    "decrypt-pkcs1": (lib.SHMKEY_OP_DECRYPT, (lib.SHMKEY_PAD_PKCS1V15, 0, 0, 0), bytes(256)),
    "unknown-op": (99, (0, 0, 0, 0), b"x"),
}


def ring_seed(op: int, p: tuple[int, ...], payload: bytes) -> bytes:
    slot = ffi.new("struct shmkey_slot *")
    slot.ctl = lib.SHMKEY_SLOT_SUBMITTED          # the worker takes it as it is
    slot.req = {"op": op, "p": p, "in_len": len(payload)}
    return b"\x00\x01\x01" + ffi.buffer(slot)[:] + payload


def socket_seed(op: int, p: tuple[int, ...], payload: bytes) -> bytes:
    hello = ffi.new("struct shmkey_hello *", {"magic": lib.SHMKEY_MAGIC,
                                              "version": lib.SHMKEY_VERSION,
                                              "transport": lib.SHMKEY_TRANSPORT_SOCKET})
    req = ffi.new("struct shmkey_req *", {"op": op, "p": p, "in_len": len(payload)})
    body = ffi.buffer(req)[:] + payload
    return b"\x80" + ffi.buffer(hello)[:] + struct.pack("<I", len(body)) + body


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, (op, p, payload) in REQUESTS.items():
        (OUT / f"ring-{name}").write_bytes(ring_seed(op, p, payload))
        (OUT / f"socket-{name}").write_bytes(socket_seed(op, p, payload))


if __name__ == "__main__":
    main()

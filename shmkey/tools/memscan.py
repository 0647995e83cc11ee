"""Search a live process's memory (``/proc/PID/mem``: needs ptrace rights) for
a private key's primes, private exponent, CRT values, DER and PEM: to show that
the network side holds none of the key, and that the oracle, scanned too, does.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

_MAPS = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (r)\S* \S+ \S+ \S+\s*(.*)$")
_CHUNK = 1 << 22


def key_secrets(key: rsa.RSAPrivateKey) -> dict[str, bytes]:
    """Byte strings that appear in memory only where the private key is.

    Numbers are searched big-endian (as in DER) and little-endian (as
    OpenSSL's BIGNUM limbs lie in memory on little-endian machines).
    """
    nums = key.private_numbers()
    out: dict[str, bytes] = {}
    for label, value in (("p", nums.p), ("q", nums.q), ("d", nums.d),
                         ("dmp1", nums.dmp1), ("dmq1", nums.dmq1), ("iqmp", nums.iqmp)):
        size = (value.bit_length() + 7) // 8
        out[f"{label} (big-endian)"] = value.to_bytes(size, "big")
        out[f"{label} (little-endian)"] = value.to_bytes(size, "little")
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    trad = key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())
    out["PKCS#8 DER"] = der
    # A PEM line from the middle of the body: distinctive, and past the modulus,
    # which is public (the same base64 can be in a certificate or key reference).
    out["PKCS#8 PEM line"] = _middle_line(pem)
    out["PKCS#1 PEM line"] = _middle_line(trad)
    return out


def _middle_line(pem: bytes) -> bytes:
    lines = pem.splitlines()
    return lines[len(lines) // 2]


@dataclass
class ScanResult:
    """What one scan found: secret name to how many hits."""

    pid: int
    bytes_scanned: int
    hits: dict[str, int]

    @property
    def found(self) -> int:
        """Total hits over all secrets."""
        return sum(self.hits.values())


def scan_process(pid: int, secrets: dict[str, bytes]) -> ScanResult:
    """Count occurrences of each secret in the readable memory of ``pid``.

    Raises:
        PermissionError: no ptrace rights over the process.
    """
    hits = {name: 0 for name in secrets}
    overlap = max(len(s) for s in secrets.values())
    scanned = 0
    with open(f"/proc/{pid}/maps") as maps_file:
        maps = maps_file.read().splitlines()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            m = _MAPS.match(line)
            if not m or m.group(4) in ("[vvar]", "[vsyscall]", "[vvar_vclock]"):
                continue
            start, end = int(m.group(1), 16), int(m.group(2), 16)
            tail = b""
            pos = start
            while pos < end:
                try:
                    mem.seek(pos)
                    chunk = mem.read(min(_CHUNK, end - pos))
                except OSError:
                    break
                if not chunk:
                    break
                data = tail + chunk
                for name, secret in secrets.items():
                    hits[name] += data.count(secret)
                # Keep a tail so a secret across chunks is found, but never twice.
                tail = data[-(overlap - 1):] if overlap > 1 else b""
                scanned += len(chunk)
                pos += len(chunk)
    return ScanResult(pid, scanned, hits)

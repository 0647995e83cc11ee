"""Throwaway keys and self-signed certificates for localhost: what the demo,
the proxy rig, the benchmarks and the tests serve TLS with.
"""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

HOST = "localhost"
KEY_KINDS = ("rsa", "p256", "p384", "ed25519")


def write_key_and_cert(directory: Path, stem: str = "demo", kind: str = "rsa"
                       ) -> tuple[Any, Path, Path]:
    """A throwaway key (RSA-2048, EC P-256 or P-384, or Ed25519; see
    KEY_KINDS) and a self-signed certificate for localhost, written as
    ``STEM.key.pem`` (0600) and ``STEM.cert.pem``."""
    key: Any
    if kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif kind in ("p256", "p384"):
        key = ec.generate_private_key(ec.SECP256R1() if kind == "p256" else ec.SECP384R1())
    elif kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"key kind {kind!r} is not one of {KEY_KINDS}")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST)]), critical=False)
            .sign(key, None if kind == "ed25519" else hashes.SHA256()))
    key_path, cert_path = directory / f"{stem}.key.pem", directory / f"{stem}.cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, key_path, cert_path

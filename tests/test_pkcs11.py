"""PKCS#11 key sources against Debian's SoftHSM2: a token in a temporary
directory, keys imported from files whose public halves check every result.
URIs and PIN files; every operation through ``shmkey serve`` over both
transports; the common signatures made in C by worker processes (and only
there), the rest by Python; start-up failures; a token that goes away and
comes back, and a module finalized under the handles C holds; the PIN kept
out of argv and logs; real TLS through key references to token keys
(Python's ssl, nginx with two workers and a reload, haproxy -W).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import padding as apad

import shmkey
import shmkey.openssl
from shmkey import _p11uri, names
from shmkey._binding import ffi, lib
from shmkey.client.connection import OracleClient
from shmkey.errors import ConfigError
from shmkey.openssl import keyref
from shmkey.oracle import pkcs11 as token_keys
from shmkey.oracle.dispatch import Dispatcher, KeySet
from shmkey.oracle.handler import Handler, Policy
from shmkey.oracle.server import _serve_worker
from shmkey.oracle.stats import SIGNS_IN_C, Meter, Region
from shmkey.tools import certs

from . import _softhsm
from ._softhsm import MODULE, PIN, SoftHSM
from ._tls import (RUN_AS_ROOT, Serve, TLSServer, client_context, curl, free_port, handshake,
                   running, s_client, server_context)
from .conftest import TRANSPORTS
from .test_provider import HAPROXY_CFG, NGINX_CONF

pytestmark = pytest.mark.skipif(not _softhsm.available(), reason="softhsm2 is not installed "
                                "(scripts/bootstrap.sh installs it)")
ORACLE_USER = "nobody" if RUN_AS_ROOT else None
LABELS = ("tls-rsa", "tls-ec", "tls-ed")


@pytest.fixture(scope="module")
def token() -> Iterator[SoftHSM]:
    # Not under pytest's tmp_path (0700 root): the oracle reads the token after
    # dropping to nobody, so the directory must be reachable by it.
    directory = Path(tempfile.mkdtemp(prefix="shmkey-softhsm-"))
    directory.chmod(0o755)
    try:
        with SoftHSM(directory, owner=ORACLE_USER) as tok:
            tok.conf.chmod(0o644)
            yield tok
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def pin_file(token: SoftHSM) -> Path:
    path = token.dir / "pin"
    path.write_text(PIN + "\n")
    path.chmod(0o600)       # root's: the oracle reads it before it drops to nobody
    return path


def _uris(token: SoftHSM, pin_file: Path) -> list[str]:
    return [token.keys[label].uri(pin=None, pin_source=f"file:{pin_file}") for label in LABELS]


@pytest.fixture(scope="module")
def oracles(token: SoftHSM, pin_file: Path) -> Iterator[dict[str, Serve]]:
    started: dict[str, Serve] = {}
    try:
        for transport in TRANSPORTS:
            started[transport] = Serve(_uris(token, pin_file), transport).start()   # type: ignore[arg-type]
        yield started
    finally:
        for s in started.values():
            s.stop()


# ---- URIs and PIN files -----------------------------------------------------

def test_uri_attributes_and_redaction() -> None:
    uri = _p11uri.parse("pkcs11:token=my%20web;object=tls;id=%01%ab;slot-id=7;type=private"
                        "?module-path=/usr/lib/x.so&pin-value=12%334")
    assert uri.path == {"token": "my web", "object": "tls", "slot-id": "7", "type": "private"}
    assert uri.key_id == b"\x01\xab" and uri.slot_id == 7
    assert uri.query["pin-value"] == "1234" and "1234" not in uri.redacted()
    assert _p11uri.without_pin("pkcs11:token=a;object=b?pin-value=99") == \
        ("pkcs11:token=a;object=b", "99")
    assert _p11uri.parse(_p11uri.with_pin("pkcs11:token=a;object=b", "p&w")).query["pin-value"] == "p&w"


@pytest.mark.parametrize("uri,named", [
    ("pkcs11:token=web;objekt=tls", "unknown path attribute 'objekt'"),
    ("pkcs11:token=web;object=tls?module=/x.so", "unknown query attribute 'module'"),
    ("pkcs11:token=w%zzb;object=tls", "bad percent-encoding in attribute 'token' (at '%zz')"),
    ("pkcs11:token=web;object=t%4", "bad percent-encoding in attribute 'object'"),
    ("pkcs11:token=web;object=a;object=b", "attribute 'object' is given twice"),
    ("pkcs11:token=web", "name the key with object="),
    ("pkcs11:token=web;object=a;type=cert", "type='cert'"),
    ("pkcs11:token=web;object=a;slot-id=x", "slot-id='x' is not a number"),
    ("pkcs11:token=web;object=a;module-path=/x.so", "it belongs in the query part"),
    ("pkcs11:token=web;object=a?module-name=softhsm2", "attribute 'module-name' is not supported"),
    ("pkcs11:token=web;object=a?pin-source=https://x/pin", "pin-source must be a file: URI"),
    ("pkcs11:token=web;object=a?pin-value=1&pin-source=file:/p", "not both"),
    ("/etc/key.pem", "is not a PKCS#11 URI"),
])
def test_bad_uris_are_refused_with_the_part_named(uri: str, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        _p11uri.parse(uri)
    assert named in str(info.value)


@pytest.mark.parametrize("uri", [
    "pkcs11:token=web;object=a?pin-value=se%zzcret",
    "pkcs11:token=web;object=a?pin-valuesecret",
    "pkcs11:token=web;object=a;pin-value=secret",
    "pkcs11:token=web?pin-value=secret",
])
def test_uri_errors_never_show_the_pin(uri: str) -> None:
    with pytest.raises(ConfigError) as info:
        _p11uri.parse(uri)
    assert "secret" not in str(info.value) and "cret" not in str(info.value)


def test_pin_file_must_be_private(tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text("4321\n")
    pin.chmod(0o600)
    uri = _p11uri.parse(f"pkcs11:token=t;object=o?pin-source=file:{pin}")
    assert _p11uri.read_pin(uri) == b"4321"
    pin.chmod(0o640)
    with pytest.raises(ConfigError, match=r"has mode 0640; group and others must have no access"):
        _p11uri.read_pin(uri)
    pin.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(pin)
    with pytest.raises(ConfigError, match="cannot open the PIN file"):
        _p11uri.read_pin(_p11uri.parse(f"pkcs11:token=t;object=o?pin-source=file:{link}"))
    with pytest.raises(ConfigError, match="is not a regular file"):
        _p11uri.read_pin(_p11uri.parse(f"pkcs11:token=t;object=o?pin-source=file:{tmp_path}"))
    if RUN_AS_ROOT:
        shutil.chown(pin, "nobody")
        with pytest.raises(ConfigError, match="belongs to uid"):
            _p11uri.read_pin(uri)


# ---- every operation, verified with the file twin's public key ---------------

SALTS = (apad.PSS.DIGEST_LENGTH, 0, 20, apad.PSS.MAX_LENGTH)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_operation_verifies(oracles: dict[str, Serve], token: SoftHSM, transport: str) -> None:
    client = shmkey.connect(oracles[transport].name, oracle_user=oracles[transport].user)
    try:
        keys = {shmkey.key_id(k.public_key()): k for k in client.private_keys()}
        twins = {label: token.keys[label].public_key for label in LABELS}
        assert set(keys) == {shmkey.key_id(p) for p in twins.values()}   # key ids unchanged
        rsa_key = keys[shmkey.key_id(twins["tls-rsa"])]
        for h in (hashes.SHA256(), hashes.SHA384(), hashes.SHA512()):
            sig = rsa_key.sign(b"message", apad.PKCS1v15(), h)
            twins["tls-rsa"].verify(sig, b"message", apad.PKCS1v15(), h)
            for salt in SALTS:
                pss = apad.PSS(mgf=apad.MGF1(type(h)()), salt_length=salt)
                sig = rsa_key.sign(b"message", pss, h)
                twins["tls-rsa"].verify(sig, b"message", pss, h)
        # SoftHSM2 2.6 wants the MGF1 hash to be the message hash: a typed refusal.
        with pytest.raises(shmkey.UnsupportedOperationError, match="token refused PSS"):
            rsa_key.sign(b"message", apad.PSS(mgf=apad.MGF1(hashes.SHA1()), salt_length=20),
                         hashes.SHA256())
        ec_key = keys[shmkey.key_id(twins["tls-ec"])]
        for h in (hashes.SHA256(), hashes.SHA384()):
            twins["tls-ec"].verify(ec_key.sign(b"message", ec.ECDSA(h)), b"message", ec.ECDSA(h))
        ed_key = keys[shmkey.key_id(twins["tls-ed"])]
        twins["tls-ed"].verify(ed_key.sign(b"message"), b"message")
        # OAEP: SoftHSM2 2.6 offers SHA-1 only; the refusal of SHA-256 is typed, not a decrypt error.
        oaep1 = apad.OAEP(mgf=apad.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
        assert rsa_key.decrypt(twins["tls-rsa"].encrypt(b"secret", oaep1), oaep1) == b"secret"
        oaep256 = apad.OAEP(mgf=apad.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
        with pytest.raises(shmkey.UnsupportedOperationError, match="token refused OAEP"):
            rsa_key.decrypt(twins["tls-rsa"].encrypt(b"secret", oaep256), oaep256)
        labelled = apad.OAEP(mgf=apad.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=b"l")
        with pytest.raises(shmkey.UnsupportedOperationError, match="labels"):
            rsa_key.decrypt(twins["tls-rsa"].encrypt(b"secret", labelled), labelled)
        with pytest.raises(shmkey.DecryptionError):
            rsa_key.decrypt(bytes([1]) * 256, oaep1)
        with pytest.raises(shmkey.PolicyError):         # refused before the token is asked
            rsa_key.decrypt(twins["tls-rsa"].encrypt(b"x", apad.PKCS1v15()), apad.PKCS1v15())
        sig = rsa_key.sign(b"still fine", apad.PKCS1v15(), hashes.SHA256())
        twins["tls-rsa"].verify(sig, b"still fine", apad.PKCS1v15(), hashes.SHA256())
    finally:
        client.close()


# ---- the common signatures made in C, by worker processes only ----------------------

def _counts(client: OracleClient) -> dict[bytes, tuple[int, int]]:
    """Key id -> (signs, of which made in C), from the status document."""
    return {bytes.fromhex(k["key_id"]): (k["signs"], k["signs_in_c"]) for k in client.status()["keys"]}


def _c_shapes(keys: dict[str, Any]) -> list[tuple[str, Any]]:
    """(label, a signing call) for every shape the C signer makes: PKCS#1 v1.5
    and PSS with a digest-long salt over SHA-256/384/512, ECDSA over the same,
    Ed25519 over a message and over nothing."""
    rsa_key, ec_key, ed_key = keys["tls-rsa"], keys["tls-ec"], keys["tls-ed"]
    out: list[tuple[str, Any]] = []
    for h in (hashes.SHA256(), hashes.SHA384(), hashes.SHA512()):
        pss = apad.PSS(mgf=apad.MGF1(type(h)()), salt_length=apad.PSS.DIGEST_LENGTH)
        out += [("tls-rsa", (rsa_key.sign, (b"m", apad.PKCS1v15(), h), (apad.PKCS1v15(), h))),
                ("tls-rsa", (rsa_key.sign, (b"m", pss, h), (pss, h))),
                ("tls-ec", (ec_key.sign, (b"m", ec.ECDSA(h)), (ec.ECDSA(h),)))]
    out += [("tls-ed", (ed_key.sign, (b"m" * 100,), ())), ("tls-ed", (ed_key.sign, (b"",), ()))]
    return out


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_worker_processes_sign_token_keys_in_c(token: SoftHSM, transport: str) -> None:
    uris = [token.keys[label].uri() for label in LABELS]
    with shmkey.KeyOracle(uris, workers=1, worker_kind="process", transport=transport) as oracle:
        client = oracle.client
        keys = {label: client.private_key(shmkey.key_id(token.keys[label].public_key))
                for label in LABELS}
        ids = {label: shmkey.key_id(token.keys[label].public_key) for label in LABELS}
        shapes = _c_shapes(keys)
        for label in LABELS:    # Python: the connection's counters, then each key's session
            sign, args, _ = next(call for lab, call in shapes if lab == label)
            sign(*args)
        before = _counts(client)
        for label, (sign, args, how) in shapes:
            sig = sign(*args)
            token.keys[label].public_key.verify(sig, args[0], *how)     # raises if wrong
        after = _counts(client)
        for label in LABELS:
            n = sum(1 for lab, _ in shapes if lab == label)
            assert after[ids[label]][0] - before[ids[label]][0] == n
            assert after[ids[label]][1] - before[ids[label]][1] == n, label

        # Every other shape is Python's: signed there (other salts), refused by the
        # token (MGF1 that is not the hash), or refused by Python (SHA-1).
        rsa_key, public = keys["tls-rsa"], token.keys["tls-rsa"].public_key
        for salt in (0, 20, apad.PSS.MAX_LENGTH):
            pss = apad.PSS(mgf=apad.MGF1(hashes.SHA256()), salt_length=salt)
            public.verify(rsa_key.sign(b"p", pss, hashes.SHA256()), b"p", pss, hashes.SHA256())
        with pytest.raises(shmkey.UnsupportedOperationError, match="token refused PSS"):
            rsa_key.sign(b"p", apad.PSS(mgf=apad.MGF1(hashes.SHA1()), salt_length=32),
                         hashes.SHA256())
        with pytest.raises(shmkey.UnsupportedOperationError, match="bad padding, hash"):
            client.call(lib.SHMKEY_OP_SIGN, (lib.SHMKEY_PAD_PKCS1V15, lib.SHMKEY_HASH_SHA1, 0, 0),
                        bytes(20), ids["tls-rsa"])
        python = _counts(client)[ids["tls-rsa"]]
        assert python == (after[ids["tls-rsa"]][0] + 3, after[ids["tls-rsa"]][1])
        # and C goes on signing the common ones after them
        public.verify(rsa_key.sign(b"q", apad.PKCS1v15(), hashes.SHA256()), b"q",
                      apad.PKCS1v15(), hashes.SHA256())
        assert _counts(client)[ids["tls-rsa"]] == (python[0] + 1, python[1] + 1)


def test_worker_threads_leave_token_keys_to_python(token: SoftHSM, tmp_path: Path) -> None:
    # Threads share the module, which only Python's lock keeps to one at a time.
    file_key = certs.write_key_and_cert(tmp_path, "file", "p256")[1]
    with shmkey.KeyOracle([token.keys["tls-ec"].uri(), file_key], workers=2,
                          worker_kind="thread") as oracle:
        token_key, file_twin = oracle.client.private_keys()
        for _ in range(5):
            for key in (token_key, file_twin):
                key.public_key().verify(key.sign(b"t", ec.ECDSA(hashes.SHA256())), b"t",
                                        ec.ECDSA(hashes.SHA256()))
        counts = _counts(oracle.client)
        assert counts[shmkey.key_id(token_key.public_key())] == (5, 0)
        signs, in_c = counts[shmkey.key_id(file_twin.public_key())]
        assert signs == 5 and in_c >= 4          # the first request of a connection is Python's


def test_keyoracle_takes_uris_and_files_mixed(token: SoftHSM) -> None:
    file_key = token.keys["tls-ec"].key_file
    uri = token.keys["tls-rsa"].uri()          # pin-value: must reach the oracle off argv
    with shmkey.KeyOracle([uri, file_key], workers=1) as oracle:
        cmdline = Path(f"/proc/{oracle.pid}/cmdline").read_bytes()
        assert b"pkcs11:token=web;object=tls-rsa" in cmdline and PIN.encode() not in cmdline
        rsa_key, ec_key = oracle.client.private_keys()
        sig = rsa_key.sign(b"m", apad.PKCS1v15(), hashes.SHA256())
        token.keys["tls-rsa"].public_key.verify(sig, b"m", apad.PKCS1v15(), hashes.SHA256())
        token.keys["tls-ec"].public_key.verify(ec_key.sign(b"m", ec.ECDSA(hashes.SHA256())),
                                               b"m", ec.ECDSA(hashes.SHA256()))


# ---- start-up failures: one clear error, no PIN ---------------------------------

@pytest.mark.parametrize("change,expected", [
    ({"pin": "9999"}, "the token refused the PIN"),
    ({"object": "no-such-key"}, "no private key in token 'web'"),
    ({"id": "%02"}, "no private key with both that object= and that id="),
    ({"module": "/nonexistent/libpkcs11.so"}, "the PKCS#11 module /nonexistent/libpkcs11.so does not exist"),
    ({"token": "other"}, "no token matches"),
])
def test_start_failures_are_one_clear_error(token: SoftHSM, change: dict[str, str],
                                            expected: str) -> None:
    path = f"token={change.get('token', 'web')};object={change.get('object', 'tls-rsa')}"
    if "id" in change:
        path += f";id={change['id']}"
    uri = f"pkcs11:{path}?module-path={change.get('module', MODULE)}&pin-value={change.get('pin', PIN)}"
    out = subprocess.run([sys.executable, "-m", "shmkey", "serve", "--key", uri, "--allow-root",
                          "--log-level", "debug"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert expected in out.stderr, out.stderr
    assert change.get("pin", PIN) not in out.stderr.replace("/nonexistent", "")
    errors = [line for line in out.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, out.stderr


def test_module_from_setting_when_uri_has_none(token: SoftHSM, pin_file: Path) -> None:
    uri = token.keys["tls-ec"].uri(module=False, pin=None, pin_source=f"file:{pin_file}")
    with pytest.raises(ConfigError, match="no PKCS#11 module"):
        shmkey.KeyOracle(uri, workers=1).start()
    env = dict(os.environ, SHMKEY_PKCS11_MODULE=MODULE)
    code = ("import shmkey,sys; o=shmkey.KeyOracle(sys.argv[1], workers=1).start(); "
            "print(len(o.private_key().sign(b'x', __import__('cryptography.hazmat.primitives."
            "asymmetric.ec', fromlist=['ec']).ECDSA(__import__('cryptography.hazmat.primitives."
            "hashes', fromlist=['h']).SHA256())))>0); o.stop()")
    out = subprocess.run([sys.executable, "-c", code, uri], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr


# ---- the PIN: not in argv, not in logs --------------------------------------------

def test_pin_value_on_the_command_line_is_hidden_and_never_logged(token: SoftHSM) -> None:
    uri = token.keys["tls-rsa"].uri()
    name = f"p11-{os.getpid()}"
    args = [sys.executable, "-m", "shmkey", "serve", "--key", uri, "--name", name,
            "--log-level", "debug", "--workers", "1"]
    if RUN_AS_ROOT:
        args += ["--user", "nobody"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if "serving" in line or not line:
                break
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert b"pin-value=****" in cmdline and f"pin-value={PIN}".encode() not in cmdline
        assert any("use pin-source=file:" in line for line in lines)
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=20)[1]
        names.clean(name)      # an oracle that dropped root cannot remove its socket in root's directory
    log = "".join(lines) + rest
    assert f"pin-value={PIN}" not in log and "serving" in log, log


# ---- a token that goes away and comes back ------------------------------------------

def test_token_lost_gives_typed_error_then_recovers(token: SoftHSM, pin_file: Path) -> None:
    uri = token.keys["tls-ec"].uri(pin=None, pin_source=f"file:{pin_file}")
    serve = Serve([uri], "shm", extra=("--log-level", "info")).start()   # type: ignore[list-item]
    away = token.tokendir.with_name("tokens.away")
    public = token.keys["tls-ec"].public_key
    client = shmkey.connect(serve.name, oracle_user=serve.user)
    kid = shmkey.key_id(public)
    try:
        key = client.private_key()
        for data in (b"a", b"a2"):     # Python opens the session; C signs with it
            public.verify(key.sign(data, ec.ECDSA(hashes.SHA256())), data, ec.ECDSA(hashes.SHA256()))
        assert _counts(client)[kid] == (2, 1)
        token.tokendir.rename(away)
        errors = 0
        for _ in range(6):       # every worker finds its session gone; none hangs
            with pytest.raises(shmkey.TokenUnavailableError, match="token of pkcs11:token=web"):
                key.sign(b"b", ec.ECDSA(hashes.SHA256()))
            errors += 1
        away.rename(token.tokendir)
        deadline = time.monotonic() + 10
        while True:
            try:
                sig = key.sign(b"c", ec.ECDSA(hashes.SHA256()))
                break
            except shmkey.TokenUnavailableError:
                assert time.monotonic() < deadline, "the oracle never re-opened the token"
                time.sleep(0.05)
        public.verify(sig, b"c", ec.ECDSA(hashes.SHA256()))
        assert errors == 6
        # Python re-opened the session and gave C its new handles: C signs again.
        signs, in_c = _counts(client)[kid]
        for data in (b"d", b"e", b"f"):
            public.verify(key.sign(data, ec.ECDSA(hashes.SHA256())), data, ec.ECDSA(hashes.SHA256()))
        assert _counts(client)[kid] == (signs + 3, in_c + 3)
    finally:
        client.close()
        if away.exists():
            away.rename(token.tokendir)
        serve.stop()


class _OneWorker:
    """The serving half of a worker process, in this process: a C server on a
    socket of its own, a Dispatcher whose token keys C signs, and the one
    serving thread (server._serve_worker). This test's thread can then do to
    the module what no request does: finalize it under the handles C holds."""

    def __init__(self, keys: list[Any], directory: Path) -> None:
        ids = [shmkey.key_id(k.public_key()) for k in keys]
        self.region = Region(1)
        self.region.add_keys(ids)
        keyset = KeySet(Handler(keys, Policy()), ids, ["token"] * len(ids), {})
        self.path = str(directory / "worker.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen()
        out = ffi.new("struct shmkey_server **")
        assert lib.shmkey_server_open(self.sock.fileno(), 1, lib.SHMKEY_TRANSPORT_SHM, 16, 2048, 0,
                                      1, out) == lib.SHMKEY_OK
        self.srv = out[0]
        lib.shmkey_server_allow_peers(self.srv, os.geteuid(), -1)
        dispatcher = Dispatcher(keyset, Meter(self.region, 0), dict, 2048, self.srv,
                                tokens_in_c=True)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=_serve_worker,
                                       args=(self.srv, dispatcher, 2048, self.stopping))
        self.thread.start()

    def signs_in_c(self, kid: bytes) -> int:
        return self.region.key_totals(self.region.key_slots()[kid])[SIGNS_IN_C]

    def close(self) -> None:
        self.stopping.set()
        lib.shmkey_server_stop(self.srv)
        self.thread.join(10)
        lib.shmkey_server_close(self.srv)
        self.sock.close()


def test_module_finalized_under_a_key_recovers(token: SoftHSM, tmp_path: Path) -> None:
    key = token_keys.load(token.keys["tls-rsa"].uri())
    public, kid = token.keys["tls-rsa"].public_key, shmkey.key_id(token.keys["tls-rsa"].public_key)
    worker = _OneWorker([key], tmp_path)
    client = OracleClient.open(path=worker.path, transport="shm", timeout_ms=5000)
    try:
        signer = client.private_key()
        for data in (b"w", b"x"):       # Python opens the session; C signs with it
            public.verify(signer.sign(data, apad.PKCS1v15(), hashes.SHA256()), data,
                          apad.PKCS1v15(), hashes.SHA256())
        assert worker.signs_in_c(kid) == 1
        token_keys._module(MODULE)._lib.finalize()      # the module ends under the key's session
        with pytest.raises(shmkey.TokenUnavailableError):   # C's call fails, then Python's
            signer.sign(b"y", apad.PKCS1v15(), hashes.SHA256())
        for data in (b"z", b"v", b"u"):     # Python starts the module again; then C signs
            public.verify(signer.sign(data, apad.PKCS1v15(), hashes.SHA256()), data,
                          apad.PKCS1v15(), hashes.SHA256())
        assert worker.signs_in_c(kid) == 3
    finally:
        client.close()
        worker.close()
        key.source.release()


# ---- real TLS through key references to token keys ------------------------------------

@pytest.fixture(scope="module")
def refs(oracles: dict[str, Serve], token: SoftHSM) -> dict[str, Path]:
    out = {}
    for label in ("tls-rsa", "tls-ec"):
        out[label] = token.dir / f"{label}.ref.pem"
        keyref.write(oracles["shm"].name, out[label], cert=token.keys[label].cert,
                     oracle_user=oracles["shm"].user)
        out[label].chmod(0o644)
    return out


@pytest.fixture(scope="module")
def openssl_cnf(token: SoftHSM) -> Path:
    out = subprocess.run([sys.executable, "-m", "shmkey", "openssl-conf"], check=True,
                         capture_output=True)
    path = token.dir / "shmkey.cnf"
    path.write_bytes(out.stdout)
    return path


@pytest.mark.parametrize("label", ["tls-rsa", "tls-ec"])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_python_ssl_handshake_with_token_key(refs: dict[str, Path], token: SoftHSM, label: str,
                                             version: ssl.TLSVersion) -> None:
    shmkey.openssl.enable()
    cert = token.keys[label].cert
    with TLSServer(server_context(cert, refs[label])) as server:
        greeting, _ = handshake(server.port, client_context(cert, version))
    assert greeting.startswith("hello TLSv1."), server.errors
    assert not server.errors


def _dual_nginx_conf(directory: Path, port: int, token: SoftHSM, refs: dict[str, Path]) -> Path:
    conf = NGINX_CONF.format(user="user nobody nogroup;" if RUN_AS_ROOT else "", dir=directory,
                             port=port, cert=token.keys["tls-rsa"].cert, keyref=refs["tls-rsa"])
    conf = conf.replace(
        f"ssl_certificate_key {refs['tls-rsa']};",
        f"ssl_certificate_key {refs['tls-rsa']};\n"
        f"        ssl_certificate {token.keys['tls-ec'].cert};\n"
        f"        ssl_certificate_key {refs['tls-ec']};")
    path = directory / "nginx.conf"
    path.write_text(conf)
    return path


def _both_certificates(port: int, token: SoftHSM) -> None:
    rsa_cert, ec_cert = token.keys["tls-rsa"].cert, token.keys["tls-ec"].cert
    for version in ("-tls1_3", "-tls1_2"):
        out = s_client(port, rsa_cert, version, "-sigalgs", "RSA-PSS+SHA256:RSA+SHA256")
        assert "Verify return code: 0 (ok)" in out, out
        out = s_client(port, ec_cert, version, "-sigalgs", "ECDSA+SHA256")
        assert "Verify return code: 0 (ok)" in out and "Peer signature type: ECDSA" in out, out
    both = rsa_cert.with_name("both-certs.pem")
    both.write_bytes(rsa_cert.read_bytes() + ec_cert.read_bytes())
    result = curl(port, both)       # curl picks the ECDSA certificate when offered
    assert result.returncode == 0 and b"hello from nginx" in result.stdout, result.stderr


def test_nginx_two_workers_and_reload(refs: dict[str, Path], token: SoftHSM, openssl_cnf: Path,
                                      tmp_path: Path) -> None:
    # The master loads the references, forks two workers, and each signs through
    # the ring: no PKCS#11 session crosses a fork, because none is in nginx.
    port = free_port()
    tmp_path.chmod(0o755)
    conf = _dual_nginx_conf(tmp_path, port, token, refs)
    env = dict(os.environ, OPENSSL_CONF=str(openssl_cnf))
    with running(["nginx", "-c", str(conf), "-e", str(tmp_path / "error.log")], openssl_cnf,
                  port):
        for _ in range(3):
            _both_certificates(port, token)
        subprocess.run(["nginx", "-c", str(conf), "-e", str(tmp_path / "error.log"), "-s",
                        "reload"], env=env, check=True, timeout=30)
        log = tmp_path / "error.log"
        deadline = time.monotonic() + 15       # until the new workers run
        while log.read_text().count("start worker process") < 4:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        for _ in range(3):
            _both_certificates(port, token)
    log = (tmp_path / "error.log").read_text()
    assert "[emerg]" not in log and "[crit]" not in log, log
    assert "reconfiguring" in log


def test_haproxy_master_worker(refs: dict[str, Path], token: SoftHSM, openssl_cnf: Path,
                               tmp_path: Path) -> None:
    combined = tmp_path / "combined.pem"
    combined.write_bytes(token.keys["tls-rsa"].cert.read_bytes() + refs["tls-rsa"].read_bytes())
    port = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(port=port, combined=combined)
                   .replace("global\n", "global\n    nbthread 2\n", 1))
    with running(["haproxy", "-W", "-db", "-f", str(cfg)], openssl_cnf, port):
        for args in ((), ("--tlsv1.2", "--tls-max", "1.2")):
            result = curl(port, token.keys["tls-rsa"].cert, *args)
            assert result.returncode == 0 and b"hello from haproxy" in result.stdout, result.stderr

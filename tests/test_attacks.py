"""The attacks of a local peer, run for real: a member of the oracle's
--group (another uid, through setpriv) truncating, scribbling on and
unlinking everything it can open, and reaching for other clients' results;
a fake oracle under another uid on the oracle's socket; a peer that trickles
its bytes; and what is left in shared memory after a decryption.

Against shmkey before the socket handshake, the truncate killed the oracle
(SIGBUS), a peer's forged DONE reached other clients, any local user could
squat the name in /dev/shm, the plaintext stayed in the freed slot, and a
trickling socket peer held a worker for its whole stall.
"""
from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

import shmkey
import shmkey.openssl
from shmkey import _process, names
from shmkey._binding import ffi, lib
from shmkey.openssl import keyref

from ._tls import TLSServer, client_context, handshake, server_context, write_key_and_cert
from .conftest import leaked, ours_in_shm, unique
from .ctools import build_tool
from .test_faults import sigstop, wait_until
from .test_serve import wait_for_oracle

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                                reason="needs root and setpriv to act as other users")
GROUP = "users"
OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
PKCS1 = padding.PKCS1v15()


@pytest.fixture(scope="module")
def tools() -> Iterator[dict[str, Path]]:
    d = Path(tempfile.mkdtemp(prefix="shmkey-attack-"))
    os.chmod(d, 0o755)      # reachable by the other users that run these
    try:
        yield {name: build_tool(name, d) for name in ("member", "fake_oracle")}
    finally:
        shutil.rmtree(d)


def as_member(*cmd: str) -> list[str]:
    """``cmd`` as `nobody`, a member of the oracle's group."""
    return ["setpriv", "--reuid=nobody", "--regid=nogroup",
            f"--groups={grp.getgrnam(GROUP).gr_gid}", *cmd]


@pytest.fixture
def oracle(rsa2048: Path) -> Iterator[subprocess.Popen]:
    """`shmkey serve` as root would run it for a server's workers: --group."""
    name = unique("attacked")
    proc = subprocess.Popen([sys.executable, "-m", "shmkey", "serve", "--key", str(rsa2048),
                             "--name", name, "--group", GROUP, "--workers", "2", "--allow-root",
                             "--log-level", "warning"], stderr=subprocess.PIPE, text=True)
    proc.name = name  # type: ignore[attr-defined]
    try:
        wait_for_oracle(name, "shm").close()
        yield proc
    finally:
        _process.stop(proc, 15)
        names.clean(name)


def honest_load(client: shmkey.OracleClient, stop: threading.Event, out: dict[str, int]) -> None:
    """Sign and decrypt, checking every answer, until told to stop."""
    key = client.private_key()
    assert isinstance(key, shmkey.OracleKey)
    pub = key.public_key()
    try:
        while not stop.is_set():
            msg = os.urandom(24)
            pub.verify(key.sign(msg, PKCS1, hashes.SHA256()), msg, PKCS1, hashes.SHA256())
            secret = os.urandom(32)
            assert key.decrypt(pub.encrypt(secret, OAEP), OAEP) == secret, "a wrong plaintext"
            out["ok"] = out.get("ok", 0) + 1
    except BaseException as exc:        # reported by the test
        out["error"] = out.get("error", 0) + 1
        out.setdefault("first", repr(exc))  # type: ignore[arg-type]


def test_member_cannot_truncate_scribble_or_unlink(tools: dict[str, Path],
                                                   oracle: subprocess.Popen) -> None:
    """Everything the member can open, attacked while honest clients work: the
    oracle lives, every honest answer is right, and each attempt is refused."""
    name = oracle.name  # type: ignore[attr-defined]
    before = ours_in_shm()
    clients = [shmkey.connect(name) for _ in range(2)]
    stop, results = threading.Event(), [dict[str, int]() for _ in clients]
    threads = [threading.Thread(target=honest_load, args=(c, stop, r))
               for c, r in zip(clients, results)]
    for t in threads:
        t.start()
    try:
        run = subprocess.run(as_member(str(tools["member"]), str(names.socket_path(name)), "3",
                                       str(oracle.pid), str(os.getpid())),
                             capture_output=True, text=True, timeout=60)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert "ALLOWED" not in run.stdout, run.stdout
    for attempt in ("ftruncate ring to 0", "ftruncate ring larger", "add F_SEAL_WRITE to ring",
                    "write status page", "map status page writable",
                    "make status page writable (mprotect)", "unlink the oracle's socket",
                    "rename the oracle's socket"):
        assert f"refused {attempt}" in lines, run.stdout
    assert "dev-shm entries 0" in lines or not leaked(before), run.stdout
    assert int(re.search(r"scribble rounds (\d+)", run.stdout).group(1)) > 1000  # type: ignore[union-attr]
    assert oracle.poll() is None, "the oracle died"
    assert all("error" not in r for r in results), results
    assert all(r["ok"] > 3 for r in results), results
    assert names.listening(names.socket_path(name))
    for c in clients:
        c.close()


def test_member_cannot_read_or_forge_another_clients_results(tools: dict[str, Path],
                                                             oracle: subprocess.Popen) -> None:
    """The member tries /proc for the honest client's and the oracle's
    descriptors and memory, and forges DONE with a plaintext of its own in
    every slot it can reach, while the honest client decrypts: every plaintext
    the honest client gets is its own."""
    name = oracle.name  # type: ignore[attr-defined]
    client = shmkey.connect(name)
    key = client.private_key()
    assert isinstance(key, shmkey.OracleKey)
    pub = key.public_key()
    member = subprocess.Popen(as_member(str(tools["member"]), str(names.socket_path(name)), "4",
                                        str(oracle.pid), str(os.getpid())),
                              stdout=subprocess.PIPE, text=True)
    wrong = done = 0
    try:
        while member.poll() is None:
            secret = os.urandom(32)
            plain = key.decrypt(pub.encrypt(secret, OAEP), OAEP)
            wrong += plain != secret
            done += 1
    finally:
        out, _ = member.communicate(timeout=60)
    assert member.returncode == 0, out
    assert done > 20 and wrong == 0, (done, wrong)
    assert "FORGED" not in out
    for pid in (oracle.pid, os.getpid()):
        assert f"refused open /proc/{pid}/fd/*" in out.replace(" (listed)", "").replace(
            " (not listed)", ""), out
        assert f"refused open /proc/{pid}/mem" in out, out
    assert "ALLOWED" not in out, out
    client.close()


def ring_bytes() -> list[bytes]:
    """This process's own ring mappings (the memfd the oracle handed us), read
    through /proc/self/mem, as a scanner or a core dump would."""
    out = []
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb") as mem:
        for line in maps:
            if "memfd:shmkey-ring" in line:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                mem.seek(lo)
                out.append(mem.read(hi - lo))
    return out


@pytest.mark.parametrize("workers", [1, 2])
def test_no_plaintext_left_in_the_ring_after_decrypt(rsa2048: Path, workers: int) -> None:
    with shmkey.KeyOracle(rsa2048, workers=workers, spin_us=0) as owned:
        key = owned.private_key()
        assert isinstance(key, shmkey.OracleKey)
        pub = key.public_key()
        marker = b"PLAINTEXT-" + os.urandom(8).hex().encode()
        ciphertext = pub.encrypt(marker, OAEP)
        assert key.decrypt(ciphertext, OAEP) == marker
        rings = ring_bytes()
        assert rings and all(len(r) >= lib.shmkey_ring_size(16, 2048) for r in rings)
        assert not any(marker in r for r in rings), "the plaintext stayed in shared memory"
        assert not any(ciphertext in r for r in rings), "the request stayed in shared memory"
        # The scan reads the ring itself: its first slot's control word says FREE,
        # in a later generation than the one it started at.
        ctls = [struct.unpack_from("<Q", r)[0] for r in rings]
        assert any(c & 0xffffffff == lib.SHMKEY_SLOT_FREE and c >> 32 >= 2 for c in ctls), ctls


def test_nothing_in_dev_shm(rsa2048: Path) -> None:
    before = ours_in_shm()
    with shmkey.KeyOracle(rsa2048, workers=1, group=GROUP) as owned:
        owned.private_key().sign(b"m", PKCS1, hashes.SHA256())  # type: ignore[call-arg]
        assert not [e for e in ours_in_shm() - before if owned.name in e]
    assert not leaked(before)


# ---- impostors ----

@pytest.fixture
def squat_dir() -> Iterator[Path]:
    """A runtime directory owned by `nobody`: an operator's choice that lets
    that user bind sockets in it, and so pose as an oracle."""
    d = Path(tempfile.mkdtemp(prefix="shmkey-squat-"))
    os.chmod(d, 0o755)
    nobody = pwd.getpwnam("nobody")
    os.chown(d, nobody.pw_uid, nobody.pw_gid)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def start_fake(tools: dict[str, Path], path: Path, spki: bytes) -> subprocess.Popen:
    der = path.parent / "fake.spki"
    der.write_bytes(spki)
    fake = subprocess.Popen(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                             str(tools["fake_oracle"]), str(path), str(der)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert fake.stdout is not None and fake.stdout.readline() == "listening\n", \
        fake.stderr.read() if fake.stderr else ""
    return fake


def spki_of(path: Path) -> bytes:
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def test_nobody_can_squat_the_system_directory(rsa2048: Path) -> None:
    """/run/shmkey is root's: another user cannot put a socket there first."""
    name = unique("squat")
    path = names.socket_path(name)
    run = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                          "python3", "-c", "import socket,sys;"
                          "socket.socket(socket.AF_UNIX).bind(sys.argv[1])", str(path)],
                         capture_output=True, text=True, timeout=30, cwd="/")
    assert run.returncode != 0 and not path.exists()


def test_fake_oracle_of_another_uid_is_refused(tools: dict[str, Path], rsa2048: Path,
                                               squat_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The squatter got there first and serves the right public key: connect()
    refuses it by its uid, naming both users, and so does KeyOracle's reconnect."""
    monkeypatch.setenv("SHMKEY_RUNTIME_DIR", str(squat_dir))
    name = unique("fake")
    fake = start_fake(tools, names.socket_path(name), spki_of(rsa2048))
    try:
        with pytest.raises(shmkey.OracleIdentityError,
                           match=r"runs as uid 65534 \(nobody\) \(pid \d+\); expected uid 0 "
                                 r"\(root\) or root"):
            shmkey.connect(name)
        # Named as trusted, it is accepted: the check is the uid, nothing else.
        assert shmkey.connect(name, oracle_user="nobody").oracle_uid == 65534
        # The real oracle will not take a name that something serves.
        with pytest.raises(shmkey.ShmkeyError, match="is already listening"):
            shmkey.KeyOracle(rsa2048, name=name, workers=1).start()
    finally:
        _process.stop(fake, 5)
    # An owned oracle whose socket is taken over after a crash: its client refuses the impostor.
    with shmkey.KeyOracle(rsa2048, name=name, workers=1, timeout_ms=2000) as owned:
        owned.client.ping()
        os.kill(owned.pid, 9)
        assert wait_until(lambda: not names.listening(names.socket_path(name)))
        fake = start_fake(tools, names.socket_path(name), spki_of(rsa2048))
        try:
            with pytest.raises(shmkey.OracleIdentityError, match="runs as uid 65534"):
                owned.client.ping()
        finally:
            _process.stop(fake, 5)


def test_provider_refuses_a_fake_oracle(tools: dict[str, Path], tmp_path: Path,
                                        squat_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Python's ssl with a version 2 key reference (which names the oracle's
    uid): a handshake against the impostor fails, with OpenSSL's reason."""
    monkeypatch.setenv("SHMKEY_RUNTIME_DIR", str(squat_dir))
    shmkey.openssl.enable()
    name = unique("fake-ssl")
    key, cert = write_key_and_cert(tmp_path, "web")
    ref = tmp_path / "web.ref.pem"
    with shmkey.KeyOracle(key, name=name, workers=1):
        written = keyref.write(name, ref, cert=cert)
        assert written.oracle_uid == 0 and keyref.load(ref).oracle_uid == 0
        with TLSServer(server_context(cert, ref)) as server:
            assert handshake(server.port, client_context(cert))[0] == "hello TLSv1.3"
    fake = start_fake(tools, names.socket_path(name), spki_of(key))
    try:
        with TLSServer(server_context(cert, ref)) as server:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                handshake(server.port, client_context(cert))
            assert wait_until(lambda: server.errors)
        reason = server.errors[0][1]
        assert "the key oracle runs as an unexpected user" in reason, reason
        assert "runs as uid 65534 (nobody)" in reason and "expected uid 0 (root)" in reason
    finally:
        _process.stop(fake, 5)


# ---- peers that stall ----

def test_trickling_peer_holds_only_its_own_connection(rsa2048: Path) -> None:
    """A peer that sends its hello, or a message, a byte at a time: the oracle
    drops it after the whole-message deadline, and one worker keeps serving
    everyone else meanwhile."""
    with shmkey.KeyOracle(rsa2048, transport="socketpair", workers=1, by_name=True,
                          timeout_ms=5000) as owned:
        path = str(names.socket_path(owned.name))
        hello = struct.pack("<4I", lib.SHMKEY_MAGIC, lib.SHMKEY_VERSION,
                            lib.SHMKEY_TRANSPORT_SOCKET, 0)
        ping = ffi.buffer(ffi.new("struct shmkey_req *", {"op": lib.SHMKEY_OP_PING}))[:]
        cases = {"hello": hello, "message": struct.pack("<I", len(ping)) + ping}
        for what, data in cases.items():
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            peer.connect(path)
            if what == "message":
                peer.sendall(hello)
                assert len(peer.recv(4096)) == ffi.sizeof("struct shmkey_welcome")
            started, sent, served = time.monotonic(), 0, 0
            try:
                while sent < len(data):
                    peer.send(data[sent:sent + 1])
                    sent += 1
                    owned.client.ping()             # the one worker is not held
                    served += 1
                    time.sleep(0.15)
            except (BrokenPipeError, ConnectionResetError):
                pass
            peer.settimeout(5)
            try:
                assert peer.recv(4096) == b""       # the oracle hung up on it
            except ConnectionResetError:
                pass
            took = time.monotonic() - started
            assert sent < len(data), f"the {what} went through a byte at a time"
            assert 0.9 < took < lib.SHMKEY_HANDSHAKE_MS / 1000 + 1.5, (what, took)
            assert served >= 5
            peer.close()


def test_connect_to_a_stopped_oracle_honours_the_deadline(rsa2048: Path) -> None:
    with shmkey.KeyOracle(rsa2048, workers=1) as owned:
        sigstop(owned.pid)              # the kernel still queues connections
        try:
            started = time.monotonic()
            with pytest.raises(shmkey.OracleTimeoutError, match="did not answer the hello"):
                shmkey.connect(owned.name, timeout_ms=300)
            assert time.monotonic() - started < 1.5
        finally:
            os.kill(owned.pid, 18)

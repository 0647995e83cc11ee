"""The provider inside OpenSSL ASYNC jobs: a signature pauses its job until
the oracle's reply is there, so the caller's thread serves others meanwhile.
Many jobs of one thread in flight, some dropped mid-way (as closed
connections are), each checked; the oracle killed while jobs wait; and
haproxy (ssl-mode-async, one thread) and openssl s_server -async for real.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from types import SimpleNamespace
from typing import Iterator

import pytest

from shmkey.openssl import keyref

from shmkey import _process

from ._tls import HOST, Serve, curl, free_port, key_material, running, wait_for_port
from .ctools import ROOT
from .test_faults import sigstop

ROUND = re.compile(r"signed (\d+) failed (\d+) dropped (\d+) max_in_flight (\d+)")


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    m = key_material(tmp_path_factory.mktemp("async"))
    m.pub = m.dir / "server.pub.pem"
    subprocess.run(["openssl", "pkey", "-in", str(m.key), "-pubout", "-out", str(m.pub)],
                   check=True, capture_output=True)
    out = subprocess.run(["python3", "-m", "shmkey", "openssl-conf"], check=True,
                         capture_output=True, env=dict(os.environ))
    m.cnf = m.dir / "shmkey.cnf"
    m.cnf.write_bytes(out.stdout)
    m.jobs = m.dir / "async_jobs"
    subprocess.run(["gcc", "-O1", "-g", "-Wall", "-o", str(m.jobs),
                    str(ROOT / "tests" / "c" / "async_jobs.c"), "-lcrypto"],
                   check=True, capture_output=True)
    return m


@pytest.fixture()
def oracle(material: SimpleNamespace) -> Iterator[SimpleNamespace]:
    serve = Serve(material.key, "shm").start()
    ref = material.dir / f"{serve.name}.ref.pem"
    try:
        keyref.write(serve.name, ref, cert=material.cert, oracle_user=serve.user)
        yield SimpleNamespace(serve=serve, keyref=ref)
    finally:
        serve.stop()


def rounds(text: str) -> list[tuple[int, ...]]:
    return [tuple(map(int, m.groups())) for m in ROUND.finditer(text)]


def test_many_jobs_in_flight_some_dropped(material, oracle) -> None:
    """48 jobs of one thread, every 5th dropped after it paused; then 96 more:
    with a ring of 16 slots, a dropped job that kept its slot, or a reply
    delivered to the wrong job, fails the second round."""
    out = subprocess.run([str(material.jobs), str(oracle.keyref), str(material.pub), "48", "5"],
                         env=dict(os.environ, OPENSSL_CONF=str(material.cnf)),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first, second = rounds(out.stdout)
    signed, failed, dropped, in_flight = first
    assert failed == 0 and dropped > 0 and signed == 48 - dropped, out.stdout + out.stderr
    assert in_flight > 16, "jobs paused instead of blocking the thread"
    assert second == (96, 0, 0, 96), out.stdout + out.stderr


def test_oracle_killed_while_jobs_wait(material, oracle) -> None:
    """Jobs paused on a stopped oracle; SIGKILL: each fails cleanly (no hang,
    no crash); a new oracle under the same name serves the next jobs."""
    proc = oracle.serve.proc
    assert proc is not None
    jobs = subprocess.Popen([str(material.jobs), str(oracle.keyref), str(material.pub), "24",
                             "wait"], env=dict(os.environ, OPENSSL_CONF=str(material.cnf)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert jobs.stdout is not None and jobs.stdin is not None
        assert jobs.stdout.readline().strip() == "ready"
        sigstop(proc.pid)
        jobs.stdin.write("go\n")
        jobs.stdin.flush()
        assert jobs.stdout.readline().strip() == "paused 24"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        started = time.monotonic()
        jobs.stdin.write("go\n")
        jobs.stdin.flush()
        assert rounds(jobs.stdout.readline()) == [(0, 24, 0, 24)]
        assert time.monotonic() - started < 4, "the provider's timeout is 5 s: no waiting for it"
        oracle.serve.start()
        jobs.stdin.write("go\n")
        jobs.stdin.flush()
        assert rounds(jobs.stdout.readline()) == [(24, 0, 0, 24)]
        assert jobs.wait(30) == 0
    finally:
        if jobs.poll() is None:
            jobs.kill()
        jobs.wait()


HAPROXY_ASYNC_CFG = """\
global
    log stderr format raw local0 info
    nbthread 1
    ssl-mode-async
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend oracle_key
    bind 127.0.0.1:{port} ssl crt {combined}
    http-request return status 200 content-type text/plain string "key in the oracle"
frontend own_key
    bind 127.0.0.1:{own_port} ssl crt {own}
    http-request return status 200 content-type text/plain string "key in haproxy"
frontend plain
    bind 127.0.0.1:{plain_port}
    http-request return status 200 content-type text/plain string "plain"
"""



def test_haproxy_async_serves_others_while_a_handshake_waits(material, oracle, tmp_path) -> None:
    """One haproxy thread; the oracle SIGSTOPped while a handshake waits for
    its signature: plain HTTP and handshakes with haproxy's own key are
    answered within 1 s each, and the waiting handshake completes after SIGCONT."""
    combined = tmp_path / "combined.pem"
    combined.write_bytes(material.cert.read_bytes() + oracle.keyref.read_bytes())
    own = tmp_path / "own.pem"
    own.write_bytes(material.other_cert.read_bytes() + material.other_key.read_bytes())
    port, own_port, plain_port = free_port(), free_port(), free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY_ASYNC_CFG.format(port=port, own_port=own_port, plain_port=plain_port,
                                            combined=combined, own=own))
    proc = oracle.serve.proc
    assert proc is not None
    with running(["haproxy", "-db", "-f", str(cfg)], material.cnf, port) as haproxy:
        assert b"key in the oracle" in curl(port, material.cert).stdout
        sigstop(proc.pid)
        try:
            waiting = subprocess.Popen(
                ["curl", "-sS", "--max-time", "15", "--cacert", str(material.cert), "--resolve",
                 f"{HOST}:{port}:127.0.0.1", f"https://{HOST}:{port}/"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            time.sleep(0.5)     # its ClientHello is in, its signature waits
            assert waiting.poll() is None
            for _ in range(3):
                t0 = time.monotonic()
                plain = subprocess.run(["curl", "-sS", "--max-time", "5",
                                        f"http://127.0.0.1:{plain_port}/"],
                                       capture_output=True, timeout=10)
                assert plain.stdout == b"plain" and time.monotonic() - t0 < 1.0
                t0 = time.monotonic()
                tls = curl(own_port, material.other_cert)
                assert b"key in haproxy" in tls.stdout and time.monotonic() - t0 < 1.0
            assert waiting.poll() is None
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        body, err = waiting.communicate(timeout=10)
        assert waiting.returncode == 0 and body == b"key in the oracle", err
        # Handshakes at once, some whose signature comes back before their
        # job would pause: haproxy must never see a descriptor it was not given.
        loads = [subprocess.Popen(["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new",
                                   "-time", "1"], stdout=subprocess.PIPE, text=True)
                 for _ in range(3)]
        for load in loads:
            out, _ = load.communicate(timeout=30)
            assert re.search(r"[1-9]\d* connections in", out), out
        assert haproxy.poll() is None, "haproxy died"


def test_s_server_async_with_s_time(material, oracle) -> None:
    """s_server -async pauses its handshake's job on our descriptor. (Its -www
    mode would not show it: that loop sleeps a whole second whenever a job
    pauses, instead of waiting on the job's descriptors.)"""
    port = free_port()
    server = subprocess.Popen(["openssl", "s_server", "-async", "-quiet", "-accept",
                               f"127.0.0.1:{port}", "-cert", str(material.cert), "-key",
                               str(oracle.keyref)],
                              env=dict(os.environ, OPENSSL_CONF=str(material.cnf)),
                              # s_time closes without a close_notify: a line each on stderr
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, server)
        timed_run = subprocess.run(["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new",
                                    "-time", "2"], capture_output=True, text=True, timeout=30)
        found = re.search(r"(\d+) connections in [\d.]+s", timed_run.stdout)
        assert found and int(found.group(1)) > 100, timed_run.stdout + timed_run.stderr
        assert server.poll() is None
    finally:
        _process.stop(server, 10)

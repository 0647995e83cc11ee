"""The ``shmkey`` command: ``serve`` runs a key oracle, ``proxy`` terminates
TLS with the key in one, ``demo`` shows both at work, ``clean`` removes what
a killed oracle left, ``settings`` lists the environment variables,
``keyref`` and ``openssl-conf`` set up OpenSSL, ``status``, ``list`` and
``metrics`` show running oracles, ``bench`` compares the
oracle's transports with an in-process key.

Each command imports its module when it runs, so that the key process
(``serve``) never loads the proxy, asyncio or the tools.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional, Sequence

from . import _p11uri, config, names
from ._binding import ffi, lib
from ._version import __version__
from .errors import ConfigError, ShmkeyError


def _add_settings(p: argparse.ArgumentParser) -> None:
    for s in config.SETTINGS:
        kind = str if s.choices or s.path else int
        p.add_argument(s.option, type=kind, default=None, metavar=s.metavar,
                       help=f"{s.help.rstrip('.')} (default: {s.shown_default(os.environ)})")


def version_line() -> str:
    """``shmkey 0.1.0 (OpenSSL 3.0.13 30 Jan 2024)``: the package and the OpenSSL
    headers its provider was compiled with."""
    return f"shmkey {__version__} ({ffi.string(lib.shmkey_openssl_version()).decode()})"


def _parser() -> argparse.ArgumentParser:
    # The docstring's first paragraph, without its RST markup.
    parser = argparse.ArgumentParser(prog="shmkey",
                                     description=(__doc__ or "").split("\n\n")[0].replace("``", "'"))
    parser.add_argument("--version", action="version", version=version_line(),
                        help="print shmkey's version and the OpenSSL its provider is built for")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a key oracle in the foreground")
    serve.add_argument("--key", required=True, action="append",
                       help="PEM private key file (RSA, EC P-256/P-384, Ed25519), or a PKCS#11 "
                            "URI 'pkcs11:token=T;object=O?pin-source=file:/path' "
                            "(docs/pkcs11.md); repeat for several")
    serve.add_argument("--name", help="name clients connect to (default: random, logged)")
    serve.add_argument("--password-stdin", action="store_true",
                       help="read the key's password from standard input")
    serve.add_argument("--group", help="let this group's members connect (socket 0660, this group)")
    serve.add_argument("--user", help="when started as root: run as this user once the key is read")
    serve.add_argument("--allow-root", action="store_true",
                       help="keep running as root (not recommended; use --user)")
    serve.add_argument("--allow-pkcs1v15-decrypt", action="store_true",
                       help="allow PKCS#1 v1.5 decryption (a padding-oracle risk)")
    serve.add_argument("--no-oaep-decrypt", action="store_true", help="refuse OAEP decryption")
    serve.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])
    serve.add_argument("--secrets-stdin", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--rate-limit", action="append", default=[], metavar="[KEYID=]N",
                       help="at most N private-key operations per second per client connection "
                            "(burst N), for every key or for the key whose id starts with KEYID; "
                            "repeat for several")
    for hidden in ("--status-fd", "--lifeline-fd", "--socket-fd", "--parent-pid"):
        serve.add_argument(hidden, type=int, default=-1, help=argparse.SUPPRESS)
    _add_settings(serve)

    proxy = sub.add_parser("proxy", help="TLS-terminating TCP proxy; the key stays in an oracle")
    proxy.add_argument("--listen", required=True, metavar="HOST:PORT", help="where to accept TLS")
    proxy.add_argument("--backend", required=True, metavar="HOST:PORT",
                       help="plain TCP service to forward to")
    proxy.add_argument("--cert", required=True, action="append",
                       help="PEM certificate (chain); repeat for several (say RSA and ECDSA)")
    source = proxy.add_mutually_exclusive_group(required=True)
    source.add_argument("--key", action="append",
                        help="PEM private key: the proxy starts an oracle that reads it; "
                             "repeat for several certificates, one oracle holds them all")
    source.add_argument("--oracle", metavar="NAME", help="use a running 'shmkey serve --name NAME'")
    proxy.add_argument("--workers", type=int, help="worker processes (default: CPU count)")
    proxy.add_argument("--transport", choices=["shm", "socketpair"],
                       help="how workers reach the oracle (default: $SHMKEY_TRANSPORT or shm)")
    proxy.add_argument("--key-mode", choices=["oracle", "inprocess"], default="oracle",
                       help="inprocess loads the key into the workers: benchmarks only")
    proxy.add_argument("--max-connections", type=int, default=1000,
                       help="open connections per worker; more wait to be accepted (1000)")
    proxy.add_argument("--handshake-timeout", type=float, default=10.0,
                       help="seconds a client has to finish its handshake, waiting for the key "
                            "included (10)")
    proxy.add_argument("--idle-timeout", type=float, default=300.0,
                       help="seconds without data either way before closing (300)")
    proxy.add_argument("--connect-timeout", type=float, default=5.0,
                       help="seconds to connect to the backend (5)")
    proxy.add_argument("--drain-timeout", type=float, default=10.0,
                       help="seconds open connections may take to finish on SIGTERM (10)")
    proxy.add_argument("--max-per-source", type=int, default=100,
                       help="open connections per worker from one client address (100)")
    proxy.add_argument("--full-idle-timeout", type=float, default=10.0,
                       help="while a worker has --max-connections open, the idle timeout (10)")
    proxy.add_argument("--handshake-threads", type=int, default=4,
                       help="threads per worker for handshake steps, so that one waiting for "
                            "the key oracle stops no other connection; 0: on the loop (4)")
    proxy.add_argument("--oracle-timeout", type=float, default=3.0,
                       help="seconds the proxy's own oracle may leave its health pings "
                            "unanswered before it is killed and replaced (3)")
    proxy.add_argument("--user", metavar="USER[:GROUP]",
                       help="run the workers as this user (started as root; required then)")
    proxy.add_argument("--oracle-user", metavar="USER",
                       help="run the proxy's key oracle as this user once it has read the key")
    proxy.add_argument("--allow-root", action="store_true",
                       help="started as root without --user: let the workers keep uid 0")
    proxy.add_argument("--allow-shared-user", action="store_true",
                       help="let --user and --oracle-user be the same uid (not recommended)")
    proxy.add_argument("--no-sandbox", action="store_true",
                       help="do not confine the workers (no chroot, no seccomp): benchmarks only")
    proxy.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    demo = sub.add_parser("demo", help="the proxy and the oracle at work on a throwaway key")
    demo.add_argument("--seconds", type=float, default=2.0,
                      help="load per mode and round, for handshakes/s (2)")

    clean = sub.add_parser("clean", help="remove what a killed oracle left: its stale socket, "
                                         "an older version's /dev/shm ring")
    clean.add_argument("name")

    sub.add_parser("settings", help="list the SHMKEY_* environment variables")

    status = sub.add_parser("status", help="a running oracle's keys, counters and clients")
    status.add_argument("name")
    status.add_argument("--json", action="store_true", help="the status document as JSON")
    listing = sub.add_parser("list", help="the running oracles this user can see, one a line")
    listing.add_argument("--json", action="store_true", help="their status documents as JSON")

    metrics = sub.add_parser("metrics", help="serve a running oracle's counters to Prometheus, "
                                             "from a process of its own")
    metrics.add_argument("--oracle", required=True, metavar="NAME", help="a running 'shmkey serve --name NAME'")
    metrics.add_argument("--listen", required=True, metavar="HOST:PORT",
                         help="where to serve /metrics over HTTP")
    metrics.add_argument("--allow-root", action="store_true",
                         help="run as root (it needs no privilege; not recommended)")

    keyref = sub.add_parser("keyref", help="write a key reference file for OpenSSL (no secret in it)")
    keyref.add_argument("--oracle", required=True, help="name of a running 'shmkey serve'")
    keyref.add_argument("--cert", help="PEM certificate that must be for the oracle's key")
    keyref.add_argument("-o", "--output", required=True,
                        help="file to write, e.g. key.ref.pem; - for standard output")
    keyref.add_argument("--transport", choices=["shm", "socketpair"],
                        help="how OpenSSL reaches the oracle (default: what the oracle offers)")
    keyref.add_argument("--oracle-user", metavar="USER",
                        help="the user the oracle runs as, if not yours or root (its --user)")

    conf = sub.add_parser("openssl-conf", help="print an openssl.cnf that loads shmkey's provider")
    conf.add_argument("--timeout-ms", type=int, metavar="MS",
                      help="how long a private-key operation waits for the oracle (default: 5000)")
    conf.add_argument("-o", "--output", default="-",
                      help="file to write; - for standard output (default: -)")

    # Listed here for --help; shmkey.tools.bench parses its own options, so that
    # `serve` never imports the benchmark code.
    sub.add_parser("bench", add_help=False,
                   help="compare in-process, socketpair and shm (shmkey bench --help)")
    return parser


def _read_password() -> bytes:
    """The key's password: the first line of standard input, without echo if
    that is a terminal."""
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass("key password: ").encode()
    line = sys.stdin.buffer.readline()
    return line[:-1].rstrip(b"\r") if line.endswith(b"\n") else line


def _serve(args: argparse.Namespace) -> int:
    from .oracle.handler import Policy
    from .oracle.limits import RateLimits
    from .oracle.server import ServeOptions, serve

    hid_pins = _p11uri.hide_pins_in_cmdline() if any(
        _p11uri.is_uri(k) and "pin-value" in k.lower() for k in args.key) else False
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="shmkey[%(process)d] %(levelname)s %(message)s")
    if hid_pins:
        logging.getLogger("shmkey.oracle").warning(
            "a PIN was given on the command line (pin-value=); it is now hidden from ps, but "
            "was readable by every local user until start-up: use pin-source=file:")
    cfg = config.Config.from_options({s.field: getattr(args, s.field) for s in config.SETTINGS})
    password = _read_password() if args.password_stdin else None
    keys = list(args.key)
    if args.secrets_stdin:
        # From KeyOracle: a password and the PINs taken out of its URIs, never argv.
        secrets = json.loads(sys.stdin.buffer.read())
        if secrets.get("password") is not None:
            password = secrets["password"].encode("latin-1")
        for index, pin in secrets.get("pins", {}).items():
            keys[int(index)] = _p11uri.with_pin(keys[int(index)], pin)
    opts = ServeOptions(
        key_paths=keys, name=args.name and names.check_name(args.name), config=cfg,
        policy=Policy(allow_oaep_decrypt=not args.no_oaep_decrypt,
                      allow_pkcs1v15_decrypt=args.allow_pkcs1v15_decrypt),
        password=password, group=args.group, socket_fd=args.socket_fd,
        status_fd=args.status_fd, lifeline_fd=args.lifeline_fd, user=args.user,
        allow_root=args.allow_root, parent_pid=args.parent_pid,
        rate_limits=RateLimits.parse(args.rate_limit))
    return serve(opts)


def _proxy(args: argparse.Namespace) -> int:
    from .proxy.supervisor import ProxyOptions, configure_logging, parse_address, run_proxy
    from .proxy.worker import Limits

    configure_logging(args.log_level)
    limits = Limits(max_connections=args.max_connections,
                    handshake_timeout=args.handshake_timeout, idle_timeout=args.idle_timeout,
                    connect_timeout=args.connect_timeout, drain_timeout=args.drain_timeout,
                    max_per_source=args.max_per_source,
                    full_idle_timeout=args.full_idle_timeout,
                    handshake_threads=args.handshake_threads)
    opts = ProxyOptions(listen=parse_address(args.listen, "--listen"),
                        backend=parse_address(args.backend, "--backend"),
                        certs=tuple(args.cert), keys=tuple(args.key or ()),
                        oracle=args.oracle, transport=args.transport,
                        key_mode=args.key_mode, limits=limits, user=args.user,
                        oracle_user=args.oracle_user, allow_root=args.allow_root,
                        allow_shared_user=args.allow_shared_user, sandbox=not args.no_sandbox,
                        oracle_timeout=args.oracle_timeout)
    if args.workers is not None:
        opts.workers = args.workers
    return run_proxy(opts)


def _clean(name: str) -> int:
    try:
        removed = names.clean(names.check_name(name))
    except ShmkeyError as exc:
        print(f"shmkey: {exc}", file=sys.stderr)
        return 1
    for path in removed:
        print(f"removed {path}")
    if not removed:
        print(f"shmkey: nothing to remove for oracle {name!r}", file=sys.stderr)
        return 1
    return 0


def _write_text(output: str, text: str) -> None:
    """``text`` to standard output (``-``) or to the file ``output``.

    Raises:
        ConfigError: the file cannot be written.
    """
    if output == "-":
        sys.stdout.write(text)
        return
    try:
        with open(output, "w") as f:
            f.write(text)
    except OSError as exc:
        raise ConfigError(f"cannot write {output}: {exc.strerror}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``shmkey`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for warning in config.unknown_variables(os.environ):
        print(f"shmkey: warning: {warning}", file=sys.stderr)
    if argv[:1] == ["bench"]:
        from .tools.bench import main as bench_main

        return bench_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "proxy":
            return _proxy(args)
        if args.command == "demo":
            from .tools.demo import main as demo_main

            return demo_main(args.seconds)
        if args.command == "clean":
            return _clean(args.name)
        if args.command in ("status", "list"):
            from .tools import opsview

            return opsview.main(args.command, getattr(args, "name", None), args.json)
        if args.command == "metrics":
            try:
                from .tools.metrics import MetricsOptions, run
            except ImportError as exc:
                print(f"shmkey: shmkey metrics needs prometheus-client ({exc}): "
                      "pip install 'shmkey[metrics]'", file=sys.stderr)
                return 2

            return run(MetricsOptions(oracle=args.oracle, listen=args.listen,
                                      allow_root=args.allow_root))
        if args.command == "settings":
            print(config.markdown_table())
            lines = config.in_force(os.environ)
            print("\nin force here:\n" + "\n".join(lines))
            return 1 if any("INVALID" in line for line in lines) else 0
        if args.command == "keyref":
            from .openssl import keyref

            if args.output == "-":
                ref = keyref.create(args.oracle, cert=args.cert, transport=args.transport,
                                    oracle_user=args.oracle_user)
                sys.stdout.buffer.write(ref.to_pem())
            else:
                ref = keyref.write(args.oracle, args.output, cert=args.cert,
                                   transport=args.transport, oracle_user=args.oracle_user)
            where = "standard output" if args.output == "-" else args.output
            print(f"wrote {where}: {keyref.describe(ref.public_key)} key of oracle "
                  f"{ref.oracle!r} (uid {ref.oracle_uid})",
                  file=sys.stderr if args.output == "-" else sys.stdout)
            return 0
        if args.command == "openssl-conf":
            from .openssl import openssl_conf

            timeout = None if args.timeout_ms is None else \
                config.Config.from_options({"timeout_ms": args.timeout_ms}).timeout_ms
            _write_text(args.output, openssl_conf(timeout))
            return 0
    except ShmkeyError as exc:
        print(f"shmkey: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:         # `shmkey settings | head`: the reader is gone, not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 1


if __name__ == "__main__":
    sys.exit(main())

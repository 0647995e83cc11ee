"""``shmkey bench``: its options, a whole run (latency per operation with
the modes interleaved, then throughput per client count), and the command
line that prints the report and writes its JSON and plot.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, TextIO

from ...config import Config
from ...errors import ShmkeyError
from .measure import (KINDS, Busy, Latency, LoadMeter, ProgressFn, Throughput, latency, quiet,
                      throughput_round_robin)
from .plot import plot
from .report import Report, format_report, machine
from .workloads import OPERATIONS, TRANSPORTS, Lab


@dataclass
class Options:
    """What ``shmkey bench`` runs. ``seconds`` is per mode per measurement."""

    seconds: float = 2.0
    bits: int = 2048
    ops: tuple[str, ...] = ("ping", "ping-c", "sign-pss", "sign-pkcs1", "decrypt-oaep")
    throughput_op: str = "sign-pss"
    clients: tuple[int, ...] = (1, 2, 4)
    kinds: tuple[str, ...] = KINDS
    transports: tuple[str, ...] = TRANSPORTS
    rounds: int = 10
    workers: Optional[int] = None
    slots: Optional[int] = None
    spin_us: Optional[int] = None
    key_path: Optional[str] = None
    busy: int = 0

    def settings(self) -> dict[str, Any]:
        """Oracle settings given on the command line (None: the default)."""
        return {"workers": self.workers, "slots": self.slots, "spin_us": self.spin_us}


def run(opts: Options, progress: ProgressFn = quiet, command: str = "") -> Report:
    """Measure latency per operation (interleaved across modes), then
    throughput per client count and kind (modes interleaved in rounds).

    Raises:
        AssertionError: a result did not verify.
        ShmkeyError: an oracle did not start.
    """
    modes = ["in-process"] + [t for t in TRANSPORTS if t in opts.transports]
    settings = {k: v for k, v in opts.settings().items() if v is not None}
    meta = machine()
    meta.update(bits=opts.bits, seconds=opts.seconds, rounds=opts.rounds,
                workers=Config.load(**settings).workers, settings=settings,
                command=command)
    lat: list[Latency] = []
    tput: list[Throughput] = []
    steps = len(opts.ops) + len(opts.kinds) * len(opts.clients)
    step = 0
    meta["busy_processes"] = opts.busy
    load = LoadMeter()
    with Lab(Path(opts.key_path) if opts.key_path else None) as lab, Busy(opts.busy):
        for op in opts.ops:
            step += 1
            op_modes = [m for m in modes if not (op == "ping-c" and m == "in-process")]
            say = _step_progress(progress, step, steps, "latency ")
            say(f"{op}: starting {', '.join(op_modes)}")
            ws = [lab.workload(m, op, opts.bits, **settings) for m in op_modes]
            meter = LoadMeter(lab.oracle_pids())
            rows = latency(ws, opts.bits, opts.seconds, opts.rounds, say)
            other = meter.stop(lab.oracle_pids())["other_load_cores"]
            for r in rows:
                r.other_load_cores = other
            lat += rows
        for kind in opts.kinds:
            for clients in opts.clients:
                step += 1
                meter = LoadMeter(lab.oracle_pids())
                rows_t = throughput_round_robin(
                    lab, opts.throughput_op, opts.bits, modes, kind, clients,
                    seconds=opts.seconds, rounds=opts.rounds, settings=settings,
                    progress=_step_progress(progress, step, steps))
                other = meter.stop(lab.oracle_pids())["other_load_cores"]
                for t in rows_t:
                    t.other_load_cores = other
                tput += rows_t
        meta.update(load.stop(lab.oracle_pids()))
    return Report(meta, lat, tput)


def _step_progress(progress: ProgressFn, step: int, steps: int, what: str = "") -> ProgressFn:
    """Progress messages prefixed with the step they belong to (and ``what``)."""
    def say(msg: str) -> None:
        progress(f"[{step}/{steps}] {what}{msg}")
    return say


def _parse_list(text: str, conv: Callable[[str], Any], allowed: Optional[Iterable[Any]] = None) -> tuple[Any, ...]:
    items = tuple(conv(x.strip()) for x in text.split(",") if x.strip())
    if not items:
        raise ValueError("empty list")
    if conv is int and min(items) < 1:
        raise ValueError("counts must be at least 1")
    if allowed is not None:
        bad = [x for x in items if x not in allowed]
        if bad:
            raise ValueError(f"{bad[0]!r} is not one of {', '.join(map(str, allowed))}")
    return items


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shmkey bench",
        description="What does key isolation cost, and what does the shared-memory ring "
                    "save over a socket? Latency of each operation with one client "
                    "(in-process, socketpair and shm interleaved), then throughput with "
                    "concurrent clients; a table with p50, p99, ops/s and ratios.")

    def listed(conv: Callable[[str], Any], allowed: Optional[Iterable[Any]] = None) -> Callable[[str], tuple[Any, ...]]:
        def parse(text: str) -> tuple[Any, ...]:
            try:
                return _parse_list(text, conv, allowed)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
        return parse

    d = Options()
    p.add_argument("--duration", type=float, default=d.seconds, metavar="SECONDS",
                   help=f"seconds per mode per measurement (default {d.seconds:g})")
    p.add_argument("--bits", type=int, default=d.bits, choices=(2048, 3072, 4096),
                   help="RSA key size of the throwaway key (default 2048)")
    p.add_argument("--key", help="use this PEM RSA key instead of a throwaway one")
    p.add_argument("--ops", type=listed(str, OPERATIONS), default=d.ops,
                   help=f"latency operations, comma-separated (default {','.join(d.ops)})")
    p.add_argument("--throughput-op", default=d.throughput_op,
                   choices=[o for o in OPERATIONS if o != "ping-c"],
                   help="operation for the throughput runs (default sign-pss)")
    p.add_argument("--clients", type=listed(int), default=d.clients,
                   help="concurrent client counts, comma-separated (default 1,2,4)")
    p.add_argument("--kinds", type=listed(str, KINDS), default=d.kinds,
                   help="clients as threads, processes or both (default threads,processes)")
    p.add_argument("--transports", type=listed(str, TRANSPORTS), default=d.transports,
                   help="oracle transports beside in-process (default socketpair,shm)")
    p.add_argument("--rounds", type=int, default=d.rounds,
                   help="interleaving rounds per measurement (default 10)")
    p.add_argument("--workers", type=int, help="SHMKEY_WORKERS for the oracles")
    p.add_argument("--slots", type=int, help="SHMKEY_SLOTS for the oracles")
    p.add_argument("--spin-us", type=int, help="SHMKEY_SPIN_US for the oracles")
    p.add_argument("--busy", type=int, default=0, metavar="N",
                   help="run N CPU-bound processes beside the benchmark, as the rest of a "
                        "busy server would (default 0)")
    p.add_argument("--no-throughput", action="store_true", help="latency only")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png",
                   help="also draw latency CDFs and throughput (needs matplotlib: shmkey[plot])")
    return p


def main(argv: Optional[Sequence[str]] = None, out: TextIO = sys.stdout,
         err: TextIO = sys.stderr) -> int:
    """``shmkey bench [options]``: run, print the table, write the JSON and plot.

    Returns:
        The exit status: 0; 2 when an option is wrong or an oracle did not
        start; 130 on Ctrl-C, after one "interrupted" line, with everything
        the run started stopped.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (fail before a long run, not after)
        except ImportError:
            print("shmkey bench: --plot needs matplotlib (pip install 'shmkey[plot]')", file=err)
            return 2
    opts = Options(seconds=args.duration, bits=args.bits, ops=args.ops,
                   throughput_op=args.throughput_op,
                   clients=() if args.no_throughput else args.clients, kinds=args.kinds,
                   transports=args.transports, rounds=max(1, args.rounds), workers=args.workers,
                   slots=args.slots, spin_us=args.spin_us, key_path=args.key,
                   busy=max(0, args.busy))
    tty = err.isatty()

    def progress(msg: str) -> None:
        if tty:
            err.write("\r\033[K" + msg)
        else:
            err.write(msg + "\n")
        err.flush()

    try:
        try:
            report = run(opts, progress, command="shmkey bench " + " ".join(
                shlex.quote(a) for a in argv))
        finally:
            if tty:
                err.write("\r\033[K")
        print(format_report(report), file=out)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report.to_json(), f, indent=1)
            print(f"\nwrote {args.json}", file=out)
        if args.plot:
            plot(report, args.plot)
            print(f"wrote {args.plot}", file=out)
    except KeyboardInterrupt:
        print("shmkey bench: interrupted", file=err)
        return 130
    except ShmkeyError as exc:
        print(f"shmkey bench: {exc}", file=err)
        return 2
    return 0

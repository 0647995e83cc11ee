"""Every tunable setting of shmkey: its environment variable, default, valid
range and error message, listed once. Constructor arguments override the
environment; README's table is rendered from :data:`SETTINGS`.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, fields
from typing import Callable, Mapping, Optional, Union

from .errors import ConfigError

TRANSPORTS = ("shm", "socketpair")


@dataclass(frozen=True)
class Setting:
    """One setting: where it comes from and what it accepts."""

    field: str
    env: str
    default: Union[int, str]
    help: str
    low: int = 0
    high: int = 0
    choices: tuple[str, ...] = ()
    path: bool = False
    file: bool = False          # with path: a file, not a directory

    @property
    def option(self) -> str:
        """The command-line option that overrides it: ``--slot-size``."""
        return "--" + self.field.replace("_", "-")

    @property
    def metavar(self) -> str:
        """What its option takes, for help texts."""
        if self.path:
            return "FILE" if self.file else "DIR"
        return "{" + ",".join(self.choices) + "}" if self.choices else "N"

    def shown_default(self, env: Mapping[str, str]) -> str:
        """The value in force without the option, for help texts."""
        raw = env.get(self.env, "").strip()
        if raw:
            return f"{raw}, from ${self.env}"
        if self.default == "":
            return f"{'as above' if 'Default:' in self.help else 'none'}; ${self.env} sets it"
        return f"{self.default}; ${self.env} overrides"

    def valid(self) -> str:
        """Describe the valid values, for errors and README."""
        if self.path:
            return "an absolute file path" if self.file else "an absolute directory path"
        if self.choices:
            return " or ".join(self.choices)
        return f"{self.low} to {self.high}"

    def parse(self, raw: object, origin: str) -> Union[int, str]:
        """Check one value; ``origin`` names where it came from in the error."""
        if self.path:
            value = str(raw).strip()
            if not os.path.isabs(value):
                raise ConfigError(f"{origin}={raw!r} is not valid; use {self.valid()}")
            return value
        if self.choices:
            value = str(raw).strip().lower()
            if value not in self.choices:
                raise ConfigError(f"{origin}={raw!r} is not valid; use {self.valid()}")
            return value
        try:
            number = int(str(raw).strip(), 10) if isinstance(raw, str) else int(raw)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise ConfigError(
                f"{origin}={raw!r} is not a whole number; valid range {self.valid()}"
            ) from None
        if isinstance(raw, bool) or not self.low <= number <= self.high:
            raise ConfigError(f"{origin}={raw!r} is out of range; valid range {self.valid()}")
        return number


def _default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 16))


SETTINGS: tuple[Setting, ...] = (
    Setting("transport", "SHMKEY_TRANSPORT", "shm",
            "How clients reach the oracle by default: a shared-memory ring of their own, or "
            "messages on the socket.",
            choices=TRANSPORTS),
    Setting("slots", "SHMKEY_SLOTS", 16,
            "Slots of each client's ring: its requests in flight at once; more wait "
            "(backpressure).",
            low=1, high=1024),
    Setting("slot_size", "SHMKEY_SLOT_SIZE", 2048,
            "Payload bytes per slot (and per socket message); must hold the "
            "key's modulus and its public key.", low=256, high=65536),
    Setting("workers", "SHMKEY_WORKERS", _default_workers(),
            "Oracle worker threads serving requests (by default the CPU count, at most 16).",
            low=1, high=64),
    Setting("worker_kind", "SHMKEY_WORKER_KIND", "auto",
            "Workers as threads (cryptography releases the GIL for RSA and ECDSA) or "
            "processes (needed for Ed25519, which holds it); auto picks processes "
            "when an Ed25519 key or a PKCS#11 token key is loaded.", choices=("auto", "thread", "process")),
    Setting("timeout_ms", "SHMKEY_TIMEOUT_MS", 5000,
            "How long a client waits for a slot and a reply before giving up.",
            low=1, high=600000),
    Setting("spin_us", "SHMKEY_SPIN_US", 500,
            "Microseconds either side of the ring spins before sleeping, when a "
            "core is free (0: always sleep).", low=0, high=100000),
    Setting("start_timeout_ms", "SHMKEY_START_TIMEOUT_MS", 15000,
            "How long starting an oracle may take before it is an error.",
            low=100, high=600000),
    Setting("runtime_dir", "SHMKEY_RUNTIME_DIR", "",
            "Directory of oracle sockets. Default: /run/shmkey as root, else "
            "$XDG_RUNTIME_DIR/shmkey, else /tmp/shmkey-UID (~/.shmkey if another user took "
            "that); clients also look in /run/shmkey. Set it to a directory no group or other "
            "may write to, e.g. inside a chroot.", path=True),
    Setting("pkcs11_module", "SHMKEY_PKCS11_MODULE", "",
            "PKCS#11 module (.so) for key URIs without module-path= "
            "(pkcs11:token=...;object=...); read by the oracle only.", path=True, file=True),
)

_BY_FIELD = {s.field: s for s in SETTINGS}


@dataclass(frozen=True)
class Config:
    """Resolved settings for one oracle or client."""

    transport: str
    slots: int
    slot_size: int
    workers: int
    worker_kind: str
    timeout_ms: int
    spin_us: int
    start_timeout_ms: int
    runtime_dir: str
    pkcs11_module: str

    @classmethod
    def from_options(cls, options: Mapping[str, object],
                     env: Optional[Mapping[str, str]] = None) -> Config:
        """Resolve settings as :meth:`load` does, from command-line options
        (field name to value, None when not given): errors name the option
        (``--slots=0``), not a field or variable.

        Raises:
            ConfigError: as :meth:`load`.
        """
        return cls._resolve(env, options, lambda s: s.option)

    @classmethod
    def load(cls, env: Optional[Mapping[str, str]] = None, **overrides: object) -> Config:
        """Resolve settings: an override (not None) wins over the environment,
        which wins over the default.

        Args:
            env: the environment to read; ``os.environ`` by default.
            overrides: field name to value, e.g. ``slots=4``.

        Raises:
            ConfigError: a value is malformed or out of range; the message
                names the variable (or argument) and the valid range.
        """
        return cls._resolve(env, overrides, lambda s: f"{s.field} (overrides {s.env})")

    @classmethod
    def _resolve(cls, env: Optional[Mapping[str, str]], overrides: Mapping[str, object],
                 origin: Callable[[Setting], str]) -> Config:
        env = os.environ if env is None else env
        unknown = set(overrides) - set(_BY_FIELD)
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        values: dict[str, object] = {}
        for setting in SETTINGS:
            given = overrides.get(setting.field)
            if given is not None:
                values[setting.field] = setting.parse(given, origin(setting))
            elif env.get(setting.env, "").strip():
                values[setting.field] = setting.parse(env[setting.env], setting.env)
            else:
                values[setting.field] = setting.default
        return cls(**values)  # type: ignore[arg-type]

    def as_args(self) -> list[str]:
        """The settings as ``shmkey serve`` options, to hand to a child oracle."""
        out: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value != "":
                out += [f"--{f.name.replace('_', '-')}", str(value)]
        return out


# SHMKEY_* variables that are not settings: the example systemd units' argument
# lists, and knobs of the test suite.
OTHER_VARIABLES = frozenset({"SHMKEY_SERVE_ARGS", "SHMKEY_PROXY_ARGS", "SHMKEY_FUZZ_SECONDS",
                             "SHMKEY_SOAK_REQUESTS"})


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """A warning for each ``SHMKEY_*`` variable in ``env`` that shmkey does not
    read, most likely a misspelt setting (which would otherwise be ignored)."""
    known = {s.env for s in SETTINGS} | OTHER_VARIABLES
    out = []
    for name in sorted(n for n in env if n.startswith("SHMKEY_") and n not in known):
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        out.append(f"{name} is not a shmkey setting" +
                   (f"; did you mean {close[0]}?" if close else " (shmkey settings lists them)"))
    return out


def in_force(env: Mapping[str, str]) -> list[str]:
    """One line per setting: the value ``env`` gives it (or its default), or
    why the value set is invalid."""
    out = []
    for s in SETTINGS:
        raw = env.get(s.env, "").strip()
        if not raw:
            shown = s.default if s.default != "" else "(not set)"
            out.append(f"  {s.env}={shown} (default)")
            continue
        try:
            out.append(f"  {s.env}={s.parse(raw, s.env)}")
        except ConfigError as exc:
            out.append(f"  INVALID: {exc}")
    return out


def env_name(field: str) -> str:
    """The environment variable behind a setting, for error messages."""
    return _BY_FIELD[field].env


def markdown_table() -> str:
    """README's table of settings, rendered from :data:`SETTINGS`."""
    rows = ["| variable | default | valid | what it does |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = {"workers": "CPU count (max 16)", "runtime_dir": "(see text)",
                   "pkcs11_module": "(none)"}.get(s.field, s.default)
        rows.append(f"| `{s.env}` | `{default}` | {s.valid()} | {s.help} |")
    return "\n".join(rows)

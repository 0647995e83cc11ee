"""Rate limits: ``--rate-limit N`` and ``--rate-limit KEYID=N`` parsed, and one
token bucket per client connection and key (rate N per second, burst N).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..errors import ConfigError


@dataclass(frozen=True)
class RateLimits:
    """Private-key operations per second allowed per client connection.

    ``default`` applies to every key without its own limit; ``per_key`` maps a
    key id (hex, or a unique prefix of at least 8 hex digits) to its limit.
    """

    default: Optional[float] = None
    per_key: dict[str, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, values: list[str]) -> RateLimits:
        """From the ``--rate-limit`` options as typed.

        Raises:
            ConfigError: a value is not N or KEYID=N with N > 0.
        """
        default: Optional[float] = None
        per_key: dict[str, float] = {}
        for value in values:
            kid, sep, rate = value.rpartition("=")
            try:
                n = float(rate)
            except ValueError:
                n = 0.0
            if not n > 0 or n == float("inf"):
                raise ConfigError(f"--rate-limit {value!r}: expected N or KEYID=N, "
                                  "N operations per second above 0")
            if not sep:
                default = n
                continue
            kid = kid.lower()
            if len(kid) < 8 or any(c not in "0123456789abcdef" for c in kid):
                raise ConfigError(f"--rate-limit {value!r}: KEYID is a key id in hex (at least "
                                  "8 digits of it), as `shmkey status` shows")
            per_key[kid] = n
        return cls(default, per_key)

    def resolve(self, key_ids: list[bytes]) -> dict[bytes, float]:
        """The limit of each key id that has one.

        Raises:
            ConfigError: a KEYID matches none or several of the keys.
        """
        out = {kid: self.default for kid in key_ids if self.default is not None}
        for prefix, n in self.per_key.items():
            matches = [kid for kid in key_ids if kid.hex().startswith(prefix)]
            if len(matches) != 1:
                what = "no key" if not matches else "several keys"
                raise ConfigError(f"--rate-limit {prefix}={n:g}: {what} of this oracle "
                                  "has that id")
            out[matches[0]] = n
        return out

    def describe(self) -> dict[str, object]:
        """For the status document's settings."""
        return {"rate_limit": self.default, "rate_limits": dict(self.per_key)}


class Bucket:
    """A token bucket: ``rate`` tokens a second, holding at most ``rate`` (and at least one)."""

    __slots__ = ("rate", "cap", "tokens", "last")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.cap = max(rate, 1.0)
        self.tokens = self.cap
        self.last = now

    def take(self, now: float) -> bool:
        """Spend a token if there is one."""
        self.tokens = min(self.cap, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

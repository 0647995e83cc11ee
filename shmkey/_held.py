"""What every private-key object whose secret lives elsewhere shares: the
oracle's keys on the network side and a token's keys in the oracle. They
refuse to be exported and are never copied (a copy would be the same handle).
"""
from __future__ import annotations

from typing import Any, NoReturn

from .errors import KeyIsolatedError


class HeldElsewhere:
    """Mixin for a ``cryptography`` private-key class; ``_HELD_IN`` says where."""

    _HELD_IN = "elsewhere"

    def private_bytes(self, *args: Any, **kwargs: Any) -> NoReturn:
        """Always raises: the private key never leaves where it is held."""
        raise KeyIsolatedError(f"the private key lives in {self._HELD_IN}; "
                               "it cannot be serialized")

    def private_numbers(self) -> NoReturn:
        """Always raises: the private numbers never leave where they are held."""
        raise KeyIsolatedError(f"the private key lives in {self._HELD_IN}; it cannot be exported")

    def __copy__(self) -> Any:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return self

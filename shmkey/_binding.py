"""The compiled C layer (``ffi``, ``lib``) and the check that turns its statuses
into exceptions. Private: the public API wraps it in ``client`` and ``server``.
"""
from __future__ import annotations

from ._native import ffi, lib  # noqa: F401  (re-exported)


def ensure(status: int, detail: str = "") -> None:
    """Return if ``status`` is ``SHMKEY_OK``, else raise its typed exception."""
    if status != lib.SHMKEY_OK:
        from .errors import raise_for_status

        raise_for_status(status, detail)

"""systemd's notify protocol (``Type=notify``, the watchdog): one datagram
per state change to ``$NOTIFY_SOCKET``. Nothing is sent, and nothing fails,
when the variable is not set.
"""
from __future__ import annotations

import os
import socket
from typing import Optional


def _address(value: str) -> str:
    # "@name" is Linux's abstract namespace, a leading NUL on the wire.
    return "\0" + value[1:] if value.startswith("@") else value


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``, ``"STOPPING=1"``, ``"WATCHDOG=1"``).

    Returns:
        Whether a notify socket was set and took the datagram.
    """
    target = os.environ.get("NOTIFY_SOCKET", "")
    if not target or not (target.startswith("/") or target.startswith("@")):
        return False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.sendto(state.encode(), _address(target))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def watchdog_interval() -> Optional[float]:
    """How often to send ``WATCHDOG=1``, in seconds: half of ``$WATCHDOG_USEC``,
    when it is set for this process (``$WATCHDOG_PID`` unset or ours); else None."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6

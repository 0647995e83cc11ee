"""Process housekeeping shared by the launcher, the key process, the proxy and
the tools: stopping a child (a signal, a bounded wait, then SIGKILL and a
reap), the one place for it; and closing descriptors a parent leaked.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any, Callable, Optional, Sequence, Union, overload

#: A child of this process: a :class:`subprocess.Popen`, or the pid of one forked.
Child = Union["subprocess.Popen[Any]", int]


@overload
def stop(proc: subprocess.Popen[Any], timeout: float,
         sig: Optional[int] = signal.SIGTERM) -> int: ...
@overload
def stop(proc: int, timeout: float, sig: Optional[int] = signal.SIGTERM) -> Optional[int]: ...


def stop(proc: Child, timeout: float, sig: Optional[int] = signal.SIGTERM) -> Optional[int]:
    """Send ``sig``, wait up to ``timeout`` seconds for ``proc`` to exit, then
    SIGKILL it; it is reaped either way.

    Args:
        proc: a :class:`subprocess.Popen`, or the pid of a child of this
            process (one that ``os.fork`` made). A child that has exited
            already is only reaped; one reaped already is left alone.
        timeout: seconds it has to exit before SIGKILL (0: SIGKILL at once).
        sig: the first signal; None when it has been told to exit some
            other way (its stdin closed, say) and needs only the wait.

    Returns:
        Its exit status as :attr:`subprocess.Popen.returncode` has it (the
        exit code, or ``-N`` when signal N ended it); None for a pid that
        was no child of this process, or was reaped elsewhere.
    """
    return stop_all([proc], timeout, sig)[0]


def stop_all(procs: Sequence[Child], timeout: float, sig: Optional[int] = signal.SIGTERM,
             give_up: Optional[Callable[[], bool]] = None) -> list[Optional[int]]:
    """:func:`stop` for several children at once: all are signalled first,
    and they share one deadline.

    Args:
        procs: the children, as for :func:`stop`.
        timeout: seconds all of them have to exit before SIGKILL.
        sig: the first signal, or None, as for :func:`stop`.
        give_up: polled while waiting; once it returns True, whoever is left
            gets SIGKILL without waiting out the timeout (a second Ctrl-C, say).

    Returns:
        The exit statuses, in the order of ``procs``, as for :func:`stop`.
    """
    status: list[Optional[int]] = [None] * len(procs)
    left: list[int] = []            # indexes into procs of those still running
    for i, proc in enumerate(procs):
        done, status[i] = _poll(proc)
        if not done:
            left.append(i)
            if sig is not None:
                _signal(proc, sig)
                # A stopped child (SIGSTOP, a debugger) would hold the signal pending until the
                # timeout's SIGKILL: let it run and handle it now.
                _signal(proc, signal.SIGCONT)
    deadline = time.monotonic() + timeout
    pause = 0.001
    while left:
        running = []
        for i in left:
            done, status[i] = _poll(procs[i])
            if not done:
                running.append(i)
        left = running
        if not left or time.monotonic() >= deadline or (give_up is not None and give_up()):
            break
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 2, 0.02)
    for i in left:
        _signal(procs[i], signal.SIGKILL)
    for i in left:
        status[i] = _wait(procs[i])
    return status


def _poll(proc: Child) -> tuple[bool, Optional[int]]:
    """(exited, its status) without waiting; exited and None if no child of ours."""
    if isinstance(proc, subprocess.Popen):
        code = proc.poll()
        return code is not None, code
    try:
        pid, st = os.waitpid(proc, os.WNOHANG)
    except ChildProcessError:
        return True, None
    return (True, os.waitstatus_to_exitcode(st)) if pid else (False, None)


def _signal(proc: Child, sig: int) -> None:
    if isinstance(proc, subprocess.Popen):
        proc.send_signal(sig)           # a no-op once it is reaped
        return
    try:
        os.kill(proc, sig)              # unreaped, so the pid is still this child's
    except ProcessLookupError:
        pass


def _wait(proc: Child) -> Optional[int]:
    if isinstance(proc, subprocess.Popen):
        return proc.wait()
    try:
        return os.waitstatus_to_exitcode(os.waitpid(proc, 0)[1])
    except ChildProcessError:
        return None


def close_inherited_fds(keep: set[int]) -> None:
    """Close every descriptor an operator's shell or supervisor leaked to us."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass    # the listing's own descriptor, already closed

"""Process housekeeping shared by the key process and the proxy's workers."""
from __future__ import annotations

import os


def close_inherited_fds(keep: set[int]) -> None:
    """Close every descriptor an operator's shell or supervisor leaked to us."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass    # the listing's own descriptor, already closed

"""cffi build of ``shmkey._native``: shmkey.h is the cdef, csrc/*.c the source.

The header is handed to cffi verbatim, so the ring layout that Python sees
is the one the C compiler laid out (cffi checks the struct sizes at build).
``make_ffi`` also builds sanitizer variants for the tests.
"""
from pathlib import Path
from typing import Optional, Sequence

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = ["common.c", "ring.c", "sock.c", "api.c"]
CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fvisibility=hidden"]


def make_ffi(extra_cflags: Sequence[str] = (), extra_ldflags: Sequence[str] = (),
             root: Optional[Path] = HERE.parent) -> FFI:
    """The FFI for ``shmkey._native``.

    Source paths are relative to ``root`` (setuptools runs in setup.py's
    directory and wants them so), or absolute with ``root=None``.
    """
    ffi = FFI()
    ffi.cdef((HERE / "shmkey.h").read_text())
    rel = HERE if root is None else HERE.relative_to(root)
    ffi.set_source(
        "shmkey._native",
        '#include "internal.h"\n',
        sources=[str(rel / name) for name in SOURCES],
        include_dirs=[str(rel)],
        libraries=["pthread"],
        extra_compile_args=CFLAGS + list(extra_cflags),
        extra_link_args=list(extra_ldflags),
    )
    return ffi


ffi = make_ffi()

if __name__ == "__main__":
    ffi.compile(verbose=True)

"""cffi build of ``shmkey._native``: shmkey.h is the cdef, csrc/*.c the source.

The header is handed to cffi verbatim, so the ring layout that Python sees
is the one the C compiler laid out (cffi checks the struct sizes at build).
"""
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = ["common.c", "ring.c", "sock.c", "api.c"]

ffi = FFI()
ffi.cdef((HERE / "shmkey.h").read_text())
ffi.set_source(
    "shmkey._native",
    '#include "internal.h"\n',
    # setuptools wants paths relative to setup.py, which is where it runs.
    sources=[f"csrc/{name}" for name in SOURCES],
    include_dirs=["csrc"],
    libraries=["pthread"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-fvisibility=hidden"],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)

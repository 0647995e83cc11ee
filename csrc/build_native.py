"""cffi build of ``shmkey._native``: shmkey.h is the cdef, csrc/*.c the source.

The header is handed to cffi verbatim, so the ring layout that Python sees
is the one the C compiler laid out (cffi checks the struct sizes at build).
``make_ffi`` also builds sanitizer variants for the tests. The same C, with
provider_module.c added, is also built as the OpenSSL loadable module (see
``provider_module``, used by setup.py).
"""
from pathlib import Path
from typing import Optional, Sequence

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = ["common.c", "ring.c", "sock.c", "api.c", "provider.c"]
# The extension and the module use the same flags, so an object file one of
# them leaves in build/temp is right for the other too.
CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fvisibility=hidden"]
# The system libcrypto: the one Python's ssl module links, which the provider
# registers into (shmkey.openssl checks that at run time).
LIBRARIES = ["pthread", "crypto"]

# Where the loadable module goes: "-provider-path <dir> -provider shmkey" finds it.
MODULE_NAME = "shmkey.ossl-modules.shmkey"


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
        libraries=LIBRARIES,
        extra_compile_args=CFLAGS + list(extra_cflags),
        extra_link_args=list(extra_ldflags),
    )
    return ffi


ffi = make_ffi()


def provider_module():
    """The OpenSSL provider as a plain shared library exporting OSSL_provider_init."""
    from setuptools import Extension

    return Extension(MODULE_NAME,
                     sources=[f"csrc/{name}" for name in SOURCES + ["provider_module.c"]],
                     include_dirs=["csrc"], libraries=LIBRARIES, extra_compile_args=CFLAGS,
                     extra_link_args=["-Wl,--no-undefined"])


if __name__ == "__main__":
    ffi.compile(verbose=True)

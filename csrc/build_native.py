"""cffi build of ``shmkey._native``: shmkey.h is the cdef, csrc/*.c the source.

The header is handed to cffi verbatim, so the ring layout that Python sees
is the one the C compiler laid out (cffi checks the struct sizes at build).
``make_ffi`` also builds sanitizer variants for the tests. The same C, with
provider_module.c added, is also built as the OpenSSL loadable module (see
``provider_module``, used by setup.py). Both get shmkey/_version.py's
version as a C define (``VERSION_CFLAGS``), which ``shmkey_version()`` returns.
"""
import re
from pathlib import Path
from typing import Optional, Sequence

from cffi import FFI

HERE = Path(__file__).resolve().parent
# Connections, the ring and the socket transport, the oracle's C signer (its
# token part too) and counters; then the OpenSSL provider (provider.h).
LIB_SOURCES = ["common.c", "conn.c", "ring.c", "sock.c", "api.c", "signer.c", "signer_token.c",
               "stats.c"]
SOURCES = LIB_SOURCES + ["provider.c", "prov_decoder.c", "prov_keyref.c", "prov_keymgmt.c",
                         "prov_signature.c", "prov_cipher.c", "prov_oracle.c"]
# The Python extension alone also has the sandbox, and so links libseccomp;
# the OpenSSL module (loaded into nginx, haproxy) keeps its link line as it is.
EXTENSION_SOURCES = SOURCES + ["sandbox.c"]
EXTENSION_LIBRARIES = ["seccomp"]
# The extension and the module use the same flags, so an object file one of
# them leaves in build/temp is right for the other too.
CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fvisibility=hidden"]
# The system libcrypto: the one Python's ssl module links, which the provider
# registers into (shmkey.openssl checks that at run time). dl: the token part
# of the signer takes its own reference on a PKCS#11 module.
LIBRARIES = ["pthread", "crypto", "m", "dl"]
# Beside csrc: <p11-kit/pkcs11.h> (Debian's libp11-kit-dev), the PKCS#11 header
# signer_token.c is written against; nothing of p11-kit is linked.
INCLUDE_DIRS = ["/usr/include/p11-kit-1"]


def package_version() -> str:
    """shmkey/_version.py's ``__version__``, read without importing the package
    (whose import needs the extension being built)."""
    text = (HERE.parent / "shmkey" / "_version.py").read_text()
    match = re.search(r'^__version__ = "([0-9A-Za-z.+-]+)"$', text, re.MULTILINE)
    if not match:
        raise RuntimeError("shmkey/_version.py has no __version__ = \"...\" line")
    return match.group(1)


# Every build of csrc/common.c needs it; common.c refuses to compile without.
VERSION_CFLAGS = [f'-DSHMKEY_PACKAGE_VERSION="{package_version()}"']
# A new version or header rebuilds both builds, so that they never go stale.
DEPENDS = [str(HERE.parent / "shmkey" / "_version.py")] + \
    [str(h) for h in sorted(HERE.glob("*.h"))]

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
        sources=[str(rel / name) for name in EXTENSION_SOURCES],
        include_dirs=[str(rel)] + INCLUDE_DIRS,
        libraries=LIBRARIES + EXTENSION_LIBRARIES,
        extra_compile_args=CFLAGS + VERSION_CFLAGS + list(extra_cflags),
        depends=DEPENDS,
        extra_link_args=list(extra_ldflags),
    )
    return ffi


ffi = make_ffi()


def provider_module():
    """The OpenSSL provider as a plain shared library exporting OSSL_provider_init."""
    from setuptools import Extension

    return Extension(MODULE_NAME,
                     sources=[f"csrc/{name}" for name in SOURCES + ["provider_module.c"]],
                     include_dirs=["csrc"] + INCLUDE_DIRS, libraries=LIBRARIES,
                     extra_compile_args=CFLAGS + VERSION_CFLAGS, depends=DEPENDS,
                     extra_link_args=["-Wl,--no-undefined"])


if __name__ == "__main__":
    ffi.compile(verbose=True)

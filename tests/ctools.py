"""Build the C test programs in tests/c and an AddressSanitizer copy of the
package, for tests that attack the ring or run as another user."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
sys.path.insert(0, str(CSRC))
try:
    import build_native
finally:
    sys.path.pop(0)
LIB_SOURCES = [CSRC / n for n in build_native.LIB_SOURCES]
# What a program linking LIB_SOURCES links.
LIB_LDFLAGS = [f"-l{lib}" for lib in build_native.LIBRARIES]
# What every compile of LIB_SOURCES needs: the headers and the package version.
LIB_CFLAGS = ["-std=gnu11", "-I", str(CSRC), *(f"-I{d}" for d in build_native.INCLUDE_DIRS),
              *build_native.VERSION_CFLAGS]


def build_tool(name: str, outdir: Path, *cflags: str) -> Path:
    """Compile tests/c/NAME.c with the ring's C sources into outdir/NAME."""
    out = outdir / name
    subprocess.run(["gcc", "-O1", "-g", *LIB_CFLAGS, *cflags, "-o", str(out),
                    str(ROOT / "tests" / "c" / f"{name}.c"), *map(str, LIB_SOURCES),
                    *LIB_LDFLAGS],
                   check=True, capture_output=True)
    return out


def asan_runtime() -> str:
    """Path of gcc's ASan runtime, to LD_PRELOAD into an uninstrumented python."""
    return subprocess.run(["gcc", "-print-file-name=libasan.so"], check=True,
                          capture_output=True, text=True).stdout.strip()


def build_asan_package(outdir: Path) -> Path:
    """A copy of the shmkey package whose C layer is built with -fsanitize=address.

    Returns the directory to put first on PYTHONPATH.
    """
    pkg = outdir / "shmkey"
    shutil.copytree(ROOT / "shmkey", pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    ffi = build_native.make_ffi(["-fsanitize=address", "-fno-omit-frame-pointer", "-O1", "-g"],
                   ["-fsanitize=address"], root=None)
    built = ffi.compile(tmpdir=str(outdir / "build"))
    shutil.copy(built, pkg / Path(built).name)
    return outdir


def asan_env(pythonpath: Path) -> dict[str, str]:
    """Environment for a python process that loads the ASan copy."""
    env = dict(os.environ)
    env.update(PYTHONPATH=str(pythonpath), LD_PRELOAD=asan_runtime(),
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=99:halt_on_error=1")
    return env

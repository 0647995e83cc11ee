"""One version string: shmkey/_version.py, compiled into the extension and the
OpenSSL module; a build of another version is refused with a clear message."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import shmkey
from shmkey import cli
from shmkey._binding import check_build, ffi, lib
from shmkey.openssl import check_module, module_dir, module_path

from .ctools import ROOT, build_native


def test_one_version_everywhere() -> None:
    assert shmkey.__version__ == build_native.package_version()
    assert ffi.string(lib.shmkey_version()).decode() == shmkey.__version__
    assert 'version = {attr = "shmkey._version.__version__"}' in \
        (ROOT / "pyproject.toml").read_text()


def test_stale_version_is_refused() -> None:
    with pytest.raises(shmkey.StaleBuildError) as info:
        check_build("shmkey's extension /x/_native.so", "0.0.9", "0.1.0")
    message = str(info.value)
    assert message.startswith("stale build: shmkey's extension /x/_native.so is version 0.0.9, "
                              "but the shmkey package is version 0.1.0; rebuild it")
    assert "python3 setup.py build_ext --inplace" in message
    # Either base class catches it: a failed import of shmkey is an ImportError.
    assert isinstance(info.value, ImportError) and isinstance(info.value, shmkey.ShmkeyError)


def test_build_without_a_version_is_refused() -> None:
    with pytest.raises(shmkey.StaleBuildError, match="records no version, but the shmkey "
                                                     "package is version 0.1.0"):
        check_build("shmkey's extension /x/_native.so", None, "0.1.0")


def test_import_refuses_an_extension_of_another_version(tmp_path: Path) -> None:
    """A copy of the package whose Python says 9.9.9 beside the 0.1.0 build."""
    pkg = tmp_path / "shmkey"
    shutil.copytree(ROOT / "shmkey", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "_version.py").write_text('__version__ = "9.9.9"\n')
    run = subprocess.run([sys.executable, "-c", "import shmkey"], cwd=tmp_path,
                         env={"PYTHONPATH": str(tmp_path)}, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode != 0
    assert "shmkey.errors.StaleBuildError: stale build: shmkey's extension" in run.stderr
    assert f"is version {shmkey.__version__}, but the shmkey package is version 9.9.9" \
        in run.stderr


def test_module_reports_the_version_to_openssl() -> None:
    run = subprocess.run(["openssl", "list", "-provider-path", str(module_dir()), "-provider",
                          "shmkey", "-providers", "-verbose"],
                         capture_output=True, text=True, check=True, timeout=60)
    assert f"version: {shmkey.__version__}\n" in run.stdout


def test_module_of_another_version_is_refused() -> None:
    check_module(module_path())
    with pytest.raises(shmkey.StaleBuildError,
                       match=rf"shmkey's OpenSSL module {module_path()} is version "
                             rf"{shmkey.__version__}, but the shmkey package is version 9\.9\.9"):
        check_module(module_path(), expected="9.9.9")


@pytest.mark.parametrize("path", ["missing.so", "not-a-provider.so"])
def test_unusable_module_is_refused(tmp_path: Path, path: str) -> None:
    module = tmp_path / path
    if path == "not-a-provider.so":
        shutil.copy(Path(shmkey._binding._native.__file__), module)
    with pytest.raises(shmkey.StaleBuildError,
                       match=rf"{module} is unusable: OpenSSL cannot load it as a provider"):
        check_module(module)


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"shmkey {shmkey.__version__} (OpenSSL 3.")
    assert out == cli.version_line() + "\n"

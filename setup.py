"""setuptools needs setup.py only to pass cffi_modules and to build the OpenSSL
provider module; metadata is in pyproject.toml."""
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, str(Path(__file__).resolve().parent / "csrc"))
from build_native import MODULE_NAME, provider_module  # noqa: E402


class BuildExt(build_ext):
    """Names the provider module ``shmkey.so``, as OpenSSL looks modules up, not
    with Python's extension suffix: it is a plain library, never imported."""

    def get_ext_filename(self, fullname: str) -> str:
        # distutils passes the full name or, for --inplace, only its last part.
        if fullname in (MODULE_NAME, MODULE_NAME.rsplit(".", 1)[1]):
            return fullname.replace(".", "/") + ".so"
        return super().get_ext_filename(fullname)

    def run(self) -> None:
        # Its directory is no Python package, so nothing else creates it.
        package = MODULE_NAME.rpartition(".")[0]
        self.mkpath(str(Path(self.build_lib, *package.split("."))))
        if self.inplace:
            self.mkpath(self.get_finalized_command("build_py").get_package_dir(package))
        super().run()


setup(cffi_modules=["csrc/build_native.py:ffi"], ext_modules=[provider_module()],
      cmdclass={"build_ext": BuildExt})

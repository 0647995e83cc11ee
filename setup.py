"""setuptools needs setup.py only to pass cffi_modules; metadata is in pyproject.toml."""
from setuptools import setup

setup(cffi_modules=["csrc/build_native.py:ffi"])

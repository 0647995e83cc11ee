#!/usr/bin/env bash
# Set up a developer's or CI machine to build, test and demo shmkey: Debian
# packages (as root, when missing), including the test servers, then shmkey
# itself in editable mode with its test extras. (Operators: scripts/install.sh.)
# Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Build: gcc + OpenSSL 3 headers. Tests: real TLS clients and servers
# (nginx, haproxy: the OpenSSL provider tests serve TLS from them; strace: the
# proxy test that only the oracle opens the key file). libseccomp-dev: the
# workers' seccomp filter, built into the extension. libp11-kit-dev: the
# PKCS#11 header the oracle's C signer of token keys is built against.
APT_PACKAGES=(gcc libssl-dev libseccomp-dev libp11-kit-dev openssl curl procps util-linux
              binutils clang libclang-rt-14-dev nginx haproxy strace)
# PKCS#11 key sources: a software token to test against, and OpenSC's pkcs11-tool.
APT_PACKAGES+=(softhsm2 opensc p11-kit)
PY=${PYTHON:-python3}
# Debian's own Python brings pip and its headers as packages.
"$PY" -m pip --version >/dev/null 2>&1 || APT_PACKAGES+=(python3-pip)
[ -e "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] ||
    APT_PACKAGES+=(python3-dev)

. scripts/apt-missing.sh
install_missing bootstrap "${APT_PACKAGES[@]}"

PIP_FLAGS=(-q --disable-pip-version-check --root-user-action=ignore)
# Debian's Python refuses pip (externally-managed-environment). This is a
# build and test machine, so install beside its packages; operators use
# scripts/install.sh, which makes a virtual environment.
if "$PY" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
    PIP_FLAGS+=(--break-system-packages)
fi
"$PY" -m pip install "${PIP_FLAGS[@]}" -e '.[test,pkcs11,metrics]'

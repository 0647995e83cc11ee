#!/usr/bin/env bash
# Install shmkey for running it, not for developing it: the build needs only
# (gcc, the OpenSSL 3 and Python headers, venv), then shmkey from this
# checkout into a virtual environment of its own. No test servers.
#
#   bash scripts/install.sh [VENV]      # default /opt/shmkey
#   export PATH=/opt/shmkey/bin:$PATH   # then: shmkey --help
#
# Developers and CI use scripts/bootstrap.sh instead (nginx, haproxy, clang,
# strace, test extras, editable install). Safe to run again.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
VENV=${1:-/opt/shmkey}
PY=${PYTHON:-python3}

APT_PACKAGES=(gcc libssl-dev libseccomp-dev libp11-kit-dev python3-dev python3-venv)
. "$SRC/scripts/apt-missing.sh"
install_missing install "${APT_PACKAGES[@]}"

"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 9))' ||
    { echo "install: shmkey needs Python 3.9 or newer" >&2; exit 1; }
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check "$SRC"
echo "install: shmkey is $VENV/bin/shmkey; add $VENV/bin to PATH" >&2

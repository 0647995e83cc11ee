#!/usr/bin/env bash
# Set up a machine to build, test and demo shmkey: Debian packages (as root,
# when missing), then shmkey itself in editable mode with its test extras.
# Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Build: gcc + OpenSSL 3 headers. Tests: real TLS clients and servers
# (nginx, haproxy: the OpenSSL provider tests serve TLS from them; strace: the
# proxy test that only the oracle opens the key file).
APT_PACKAGES=(gcc libssl-dev openssl curl procps util-linux binutils clang libclang-rt-14-dev
              nginx haproxy strace)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        echo "bootstrap: installing ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "bootstrap: please install: ${missing[*]} (apt-get, as root)" >&2
        exit 1
    fi
fi

PY=${PYTHON:-python3}
"$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test]'

# Sourced by install.sh and bootstrap.sh: install_missing WHO PKG... installs
# the Debian packages not yet installed (as root), or names them and fails.
install_missing() {
    local who=$1; shift
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "$who: please install: ${missing[*]} (apt-get, as root)" >&2
        return 1
    fi
    echo "$who: installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

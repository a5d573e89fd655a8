# Shared by the scripts in this directory. Source it; do not run it.

# The workspace root.
ATOLL_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# ensure_packages PKG...: installs the Debian packages that are missing (all of them, after an
# `apt-get update`, when CI=true).
ensure_packages() {
    local missing=() pkg sudo=()
    for pkg in "$@"; do
        if [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" != "install ok installed" ]; then
            missing+=("$pkg")
        fi
    done
    if [ "${CI:-}" = true ]; then
        missing=("$@")
    fi
    [ "${#missing[@]}" -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || {
            echo "error: packages ${missing[*]} are missing and neither root nor sudo is available" >&2
            return 1
        }
        sudo=(sudo)
    fi
    echo "==> apt-get install ${missing[*]}" >&2
    timeout 1200 "${sudo[@]}" apt-get update
    timeout 1800 "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
}

# step DESCRIPTION SECONDS COMMAND...: prints a banner and runs COMMAND under `timeout`.
step() {
    local what=$1 secs=$2
    shift 2
    echo "==> $what: $*" >&2
    timeout -k 30 "$secs" "$@"
}

# Sourced by scripts/test, scripts/demo and scripts/bench: a project virtualenv with the
# gateway installed (editable, compiled frame parser when a compiler is there).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 9))' 2>/dev/null; then
    echo "meter-gateway needs Python 3.9 or newer ($PY)" >&2
    exit 2
fi

apt_install() {
    # Debian: install missing system packages when we may (root), otherwise say what is missing
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        if [ ! -f /tmp/.mgw-apt-updated ]; then
            apt-get update -qq >/dev/null && touch /tmp/.mgw-apt-updated
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    else
        echo "missing system packages: $* (install them with apt-get)" >&2
        return 1
    fi
}

if ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then
    apt_install python3-venv
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
EXTRAS=${MGW_EXTRAS:-test}
"$VPY" -m pip install -q --disable-pip-version-check -e ".[${EXTRAS}]"

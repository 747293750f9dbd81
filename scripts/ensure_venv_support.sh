#!/usr/bin/env bash
# Debian/Ubuntu ship Python without `venv` (ensurepip) unless python3-venv is installed.
set -euo pipefail
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    version=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    echo "ensure_venv_support.sh: installing python$version-venv"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python$version-venv" >/dev/null ||
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    exit 0
fi
echo "make: cannot create .venv; on Debian/Ubuntu run: sudo apt-get install -y python3-venv" >&2
exit 1

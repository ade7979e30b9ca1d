#!/usr/bin/env bash
# Set up everything vxpu needs on a fresh Debian/Ubuntu machine with Python >= 3.11:
# a virtual environment in .venv with vxpu and its dev/test dependencies installed.
# Idempotent: re-running only reinstalls when pyproject.toml or setup.py changed.
# Source it (". scripts/bootstrap.sh") to get VXPU_PY set to the venv's python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VXPU_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

die() { echo "vxpu bootstrap: $*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

command -v "$PYTHON" >/dev/null || die "python3 not found: install it with 'apt-get install python3 python3-venv'"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "Python >= 3.11 is required, found $("$PYTHON" --version 2>&1); install a newer python3"

if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  echo "vxpu bootstrap: installing python3-venv with apt" >&2
  pyver=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  as_root apt-get update -qq && as_root apt-get install -y -qq "python${pyver}-venv" python3-venv \
    || die "could not install python3-venv; run 'sudo apt-get install python3-venv' and retry"
fi

# QEMU and the guest image come from Debian's archive, verified with Debian's keyring
# (Ubuntu hosts don't have it by default).
if [ ! -f /usr/share/keyrings/debian-archive-keyring.gpg ] && command -v apt-get >/dev/null; then
  echo "vxpu bootstrap: installing debian-archive-keyring (to verify Debian's QEMU packages)" >&2
  as_root apt-get install -y -qq debian-archive-keyring \
    || echo "vxpu bootstrap: warning: could not install debian-archive-keyring; fetching QEMU will fail until it is installed (or set VXPU_QEMU)" >&2
fi

stamp_src=$(cat "$ROOT/pyproject.toml" "$ROOT/setup.py" | sha256sum | cut -c1-16)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.vxpu-stamp" 2>/dev/null)" != "$stamp_src" ]; then
  echo "vxpu bootstrap: creating $VENV and installing vxpu[dev] (first run: about 1.6 GB installed)" >&2
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]" || die "pip install failed (is PyPI reachable?)"
  echo "$stamp_src" > "$VENV/.vxpu-stamp"
fi
export VXPU_PY="$VENV/bin/python"

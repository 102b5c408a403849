#!/usr/bin/env bash
# Make (or bring up to date) the project's own virtual environment, so that `make train` and
# `make test` work on a machine that has only Python: a venv in $VENV (.venv), uv in it for fast
# installs, the torch build that fits the machine (CPU-only without a GPU), then minigpt[dev].
# The Makefile calls this only when pyproject.toml or this script is newer than the last set-up.
#   TORCH=...   what to install for torch instead of choosing (e.g. TORCH=torch==2.13.0, a wheel
#               file, or "torch --index-url https://download.pytorch.org/whl/cu126"); through pip,
#               so pip's own configuration (find-links, constraints) applies.
#   PYTHON=...  the interpreter to make the venv with (python3; 3.10 or newer).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

say() { echo "setup: $*"; }
die() { echo "error: $*" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
    command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON not found; install Python 3.10+ or pass PYTHON=/path/to/python3"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "PYTHON=$PYTHON is $("$PYTHON" -V 2>&1); minigpt needs Python 3.10 or newer: pass PYTHON=python3.11 (or another)"
    say "creating $VENV with $("$PYTHON" -V 2>&1)"
    "$PYTHON" -m venv "$VENV" || die "$PYTHON -m venv failed (on Debian/Ubuntu: apt install python3-venv)"
fi
py="$VENV/bin/python"

# uv resolves and installs several times faster than pip and picks torch's build for the machine;
# pip stays the fallback where uv cannot be installed.
uv=""
if [ -x "$VENV/bin/uv" ] || "$py" -m pip install --quiet uv; then
    uv="$VENV/bin/uv"
else
    say "uv could not be installed; using pip"
fi

if ! "$py" -c 'import torch' 2>/dev/null; then
    if [ -n "${TORCH:-}" ]; then
        say "installing torch: pip install $TORCH"
        # shellcheck disable=SC2086  # TORCH may hold options, e.g. --index-url
        "$py" -m pip install --quiet $TORCH
    elif [ -n "$uv" ]; then
        # auto: the CUDA build that the driver supports, or the CPU-only build without a GPU
        say "installing torch for this machine (uv --torch-backend auto)"
        "$uv" pip install --quiet --python "$py" --torch-backend auto "torch>=2.3" \
            || die "could not install torch (no network to download.pytorch.org?); pass TORCH=... e.g. make test TORCH=torch==2.13.0"
    elif [ "$(uname -s)" = Linux ] && ! nvidia-smi -L >/dev/null 2>&1; then
        say "installing the CPU-only torch (no GPU seen)"
        "$py" -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu \
            || die "could not install torch; pass TORCH=... e.g. make test TORCH=torch==2.13.0"
    else
        "$py" -m pip install --quiet torch
    fi
fi

say "installing minigpt and its dependencies (editable, with the test tools)"
if [ -n "$uv" ]; then
    "$uv" pip install --quiet --python "$py" -e ".[dev]"
else
    "$py" -m pip install --quiet -e ".[dev]"
fi
"$py" -c 'import torch; print("setup: torch", torch.__version__, "| CUDA GPU:", torch.cuda.is_available())'

#!/usr/bin/env bash
# Create .venv (once) and install the broker with the given extras.
# Usage: scripts/setup.sh EXTRAS   (e.g. "dev" or "emulator")
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $(python3 --version)" >&2
  python3 -m venv .venv
fi
stamp=".venv/.installed-${extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  case "$extras" in
    dev) what="the broker with every cloud's SDK, the emulators and the test tools (about 2 minutes the first time)" ;;
    emulator) what="the broker with the AWS SDK and its emulator, moto (about 30 seconds the first time)" ;;
    *) what="the broker with the extras: ${extras}" ;;
  esac
  echo "setup: installing ${what} into .venv" >&2
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[${extras}]"
  touch "$stamp"
  echo "setup: done" >&2
fi

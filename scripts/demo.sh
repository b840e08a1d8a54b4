#!/usr/bin/env bash
# The README's first command: install, then run the broker end to end on the emulator.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh emulator
exec .venv/bin/kidp-broker demo "$@"

#!/usr/bin/env bash
# The README's second command: install, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
exec .venv/bin/pytest "$@"

#!/usr/bin/env bash
# The README's second command: install, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
# kubectl (kustomize), checkov, cfn-lint: the infrastructure tests render and scan with them.
scripts/setup-tools.sh
exec .venv/bin/pytest "$@"

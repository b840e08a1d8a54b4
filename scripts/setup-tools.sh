#!/usr/bin/env bash
# Infrastructure checkers in their own venv (.venv-tools): checkov and cfn-lint
# pin versions of boto3 and friends that must not leak into the broker's venv.
# Usage: scripts/setup-tools.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-tools
stamp=".venv-tools/.installed"
if [ ! -f "$stamp" ] || [ "$0" -nt "$stamp" ]; then
  .venv-tools/bin/python -m pip install --quiet --upgrade pip
  .venv-tools/bin/python -m pip install --quiet "checkov>=3.2,<4" "cfn-lint>=1.20,<2"
  touch "$stamp"
fi

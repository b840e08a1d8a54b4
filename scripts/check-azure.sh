#!/usr/bin/env bash
# The Azure deployment, checked offline:
#   1. every Bicep file under infra/azure parses with checkov's own Bicep parser
#      (pycep; checkov itself only counts a file it cannot parse);
#   2. tests/infra/test_bicep.py: the app settings are exactly KIDP_* variables
#      that kidp.settings reads (the required ones present), the queue and table
#      they name are the ones the template makes, secrets are Key Vault
#      references, the identity's roles are the adapters' needs, the managed
#      group is never the broker's own, and the broker's own resources carry its
#      managed-by key with a value of their own (not orphans to its scans);
#   3. checkov on infra/azure (Bicep, offline): no failed check; every exception
#      is a `// checkov:skip=ID: reason` comment in the resource it concerns;
#   4. azure/function_app.py imports and indexes its functions (no Azure needed).
# Exits non-zero on the first failure.
#
# Needs .venv (scripts/setup.sh dev) and .venv-tools (scripts/setup-tools.sh).
# Usage: scripts/check-azure.sh
set -euo pipefail
cd "$(dirname "$0")/.."

tools=.venv-tools/bin
for tool in "$tools/checkov" "$tools/python" .venv/bin/pytest .venv/bin/python; do
  if [ ! -x "$tool" ]; then
    echo "check-azure: $tool is missing (run scripts/setup.sh dev and scripts/setup-tools.sh)" >&2
    exit 2
  fi
done
if [ -e azure/__init__.py ]; then
  echo "check-azure: azure/__init__.py shadows the Azure SDK's azure namespace; remove it" >&2
  exit 1
fi

echo "== parse (pycep): infra/azure"
"$tools/python" - infra/azure <<'PY'
import sys
from pathlib import Path

from pycep import BicepParser

files = sorted(Path(sys.argv[1]).rglob("*.bicep"))
for path in files:
    BicepParser().parse(text=path.read_text())
print(f"{len(files)} Bicep files parse")
PY

echo "== validate (tests/infra/test_bicep.py)"
.venv/bin/pytest -q -p no:cacheprovider tests/infra/test_bicep.py

echo "== checkov: infra/azure"
"$tools/checkov" --framework bicep -d infra/azure --compact --quiet --skip-download

echo "== index: azure/function_app.py"
.venv/bin/python - <<'PY'
import importlib.util
import logging

logging.disable(logging.WARNING)  # the SDK warns when it indexes no HTTP auth level
spec = importlib.util.spec_from_file_location("function_app", "azure/function_app.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
names = sorted(f.get_function_name() for f in module.app.get_functions())
module.app.startup_task_done = False
print(f"azure/function_app.py: {len(names)} functions: {', '.join(names)}")
PY

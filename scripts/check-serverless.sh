#!/usr/bin/env bash
# The AWS deployment, checked offline: build the Lambda artifact, `serverless
# package` serverless.yml into .serverless/ (no AWS account or credentials),
# then cfn-lint and checkov on the generated CloudFormation template.
#
# Usage: scripts/check-serverless.sh [--build-only]
#   --build-only      build the artifact serverless.yml deploys, nothing else
#   KIDP_LAMBDA_ARCH  x86_64 (default) or arm64; must match the `architecture`
#                     param that `serverless deploy` is given
#
# The artifact (node_modules/.cache/kidp-lambda/<arch>/kidp-broker.zip) holds
# aws/handlers.py, the kidp package and the dependencies of
# kidp-broker[lambda]: manylinux2014 wheels for the Lambda architecture
# (Amazon Linux 2, glibc 2.26), pinned to the versions installed in .venv when
# it exists (the versions the tests ran with), and byte-compiled (unchecked-hash
# .pyc files, valid whatever the times in the zip) because /var/task is
# read-only: an uncompiled module would be compiled again on every cold start. The dependencies are cached outside the
# work tree (~/.cache/kidp-broker), keyed by their requirements and platform,
# so a rebuild after a code change, or in a fresh clone, takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

build_only=false
case "${1:-}" in
  --build-only) build_only=true ;;
  "") ;;
  *) echo "usage: $0 [--build-only]" >&2; exit 2 ;;
esac

arch="${KIDP_LAMBDA_ARCH:-x86_64}"
case "$arch" in
  x86_64) platform=manylinux2014_x86_64 ;;
  arm64) platform=manylinux2014_aarch64 ;;
  *) echo "KIDP_LAMBDA_ARCH must be x86_64 or arm64, not '$arch'" >&2; exit 2 ;;
esac

# The interpreter that byte-compiles must be the runtime's Python (3.11).
python=""
for candidate in .venv/bin/python python3.11 python3; do
  if command -v "$candidate" >/dev/null 2>&1 &&
    "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
    python="$candidate"
    break
  fi
done
if [ -z "$python" ]; then
  echo "Python 3.11 is needed to build the artifact for the python3.11 Lambda runtime" >&2
  exit 1
fi
if [ ! -f aws/handlers.py ]; then
  echo "aws/handlers.py is missing: it holds the functions serverless.yml points at" >&2
  exit 1
fi

start=$SECONDS
# The framework (osls) from package-lock.json; the build cache lives under
# node_modules/.cache, so a fresh install also rebuilds the artifact.
if [ ! -x node_modules/.bin/serverless ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi

cache="node_modules/.cache/kidp-lambda/$arch"
deps_cache="${XDG_CACHE_HOME:-$HOME/.cache}/kidp-broker/lambda-$arch"
mkdir -p "$cache" "$deps_cache"
"$python" - "$cache" "$platform" "$deps_cache" <<'PY'
"""Build <cache>/kidp-broker.zip from the cached dependencies and the code."""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

cache, platform, deps_cache = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
project = tomllib.loads(Path("pyproject.toml").read_text())["project"]

# kidp-broker's dependencies plus those of its `lambda` extra, with the
# extra's self-references (kidp-broker[aws]) followed.
requirements = list(project["dependencies"])
pending, seen = ["lambda"], set()
while pending:
    extra = pending.pop()
    if extra in seen:
        continue
    seen.add(extra)
    for requirement in project["optional-dependencies"][extra]:
        own = re.fullmatch(rf"{re.escape(project['name'])}\[([^\]]+)\]", requirement.replace(" ", ""))
        if own:
            pending.extend(own.group(1).split(","))
        else:
            requirements.append(requirement)

# The versions the tests ran with, when the development environment exists.
constraints = ""
if Path(".venv/bin/python").exists():
    frozen = subprocess.run(
        [".venv/bin/python", "-m", "pip", "freeze", "--exclude-editable", "--disable-pip-version-check"],
        check=True, capture_output=True, text=True,
    ).stdout
    constraints = "\n".join(
        line for line in frozen.splitlines()
        if "==" in line and not line.lower().startswith("kidp-broker")
    )

EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed times: the same files give the same zip


def compile_tree(root: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j", "0",
         "--invalidation-mode", "unchecked-hash", str(root)],
        check=True,
    )


def add_tree(archive: zipfile.ZipFile, root: Path) -> None:
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        info = zipfile.ZipInfo(path.relative_to(root).as_posix(), EPOCH)
        info.external_attr = (0o755 if os.access(path, os.X_OK) else 0o644) << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        archive.writestr(info, path.read_bytes())


key = hashlib.sha256(
    "\n--\n".join([platform, sys.version, "\n".join(requirements), constraints, "v1"]).encode()
).hexdigest()[:16]
built = deps_cache / key
if not (built / "dependencies.zip").exists():
    print(f"building the dependencies for {platform} (cached in {deps_cache})", flush=True)
    for old in deps_cache.iterdir():  # one cached set per architecture
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    work = deps_cache / f".{key}"
    site = work / "site"
    (work / "requirements.txt").parent.mkdir(parents=True)
    (work / "requirements.txt").write_text("\n".join(requirements) + "\n")
    (work / "constraints.txt").write_text(constraints + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-warn-script-location", "--target", str(site), "--platform", platform,
         "--implementation", "cp", "--python-version", "3.11", "--only-binary=:all:",
         "--no-compile", "-r", str(work / "requirements.txt"),
         "-c", str(work / "constraints.txt")],
        check=True,
    )
    shutil.rmtree(site / "bin", ignore_errors=True)
    compile_tree(site)
    with zipfile.ZipFile(work / "dependencies.zip", "w", compresslevel=6) as archive:
        add_tree(archive, site)
    work.rename(built)
(cache / "dependencies.path").write_text(str(built / "site"))

# The broker's own code, fresh every time, added to a copy of the dependencies.
app = cache / "app"
shutil.rmtree(app, ignore_errors=True)
shutil.copytree("common/kidp", app / "kidp", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
(app / "aws").mkdir()
shutil.copy2("aws/handlers.py", app / "aws" / "handlers.py")
compile_tree(app)
artifact = cache / "kidp-broker.zip"
partial = artifact.with_suffix(".tmp")
shutil.copyfile(built / "dependencies.zip", partial)
with zipfile.ZipFile(partial, "a", compresslevel=6) as archive:
    add_tree(archive, app)
partial.replace(artifact)
unpacked = sum(i.file_size for i in zipfile.ZipFile(artifact).infolist())
print(f"{artifact}: {artifact.stat().st_size / 2**20:.1f} MiB, {unpacked / 2**20:.1f} MiB unpacked")
if unpacked > 250 * 2**20:
    sys.exit("the artifact exceeds Lambda's 250 MiB unpacked limit")
PY

# On a machine of the same architecture, import the handlers as Lambda does
# (handler "aws/handlers.<name>" is the module aws.handlers) and the modules
# its functions load on first use, from the artifact's contents alone (-I -S:
# no site-packages). Without _HANDLER the import builds nothing: no AWS needed.
if [ "$(uname -m)" = "$arch" ] || { [ "$arch" = arm64 ] && [ "$(uname -m)" = aarch64 ]; }; then
  "$python" -I -S - "$cache/app" "$(cat "$cache/dependencies.path")" <<'PY'
import importlib
import sys

sys.path[:0] = sys.argv[1:3]
modules = [
    "aws.handlers",
    "kidp.bootstrap",
    "kidp.api",
    "mangum",
    "aws_lambda_powertools.utilities.batch",
    "aws_lambda_powertools.metrics",
    "aws_lambda_powertools.tracing",
    "kidp.providers.aws",
    "kidp.secrets.aws",
    "kidp.stores.dynamodb",
    "kidp.queues.sqs",
]
for name in modules:
    importlib.import_module(name)
print(f"the artifact imports aws.handlers and the {len(modules) - 1} modules its functions load")
PY
fi

if $build_only; then
  echo "built in $((SECONDS - start)) s"
  exit 0
fi

# Package offline: no credentials, no instance metadata, no telemetry.
rm -rf .serverless
AWS_EC2_METADATA_DISABLED=true SLS_TELEMETRY_DISABLED=1 SLS_NOTIFICATIONS_MODE=off \
  node_modules/.bin/serverless package --stage dev --region us-east-1 --param="architecture=$arch"
template=.serverless/cloudformation-template-update-stack.json
echo "packaged in $((SECONDS - start)) s"

scripts/setup-tools.sh
.venv-tools/bin/cfn-lint --non-zero-exit-code warning -- "$template" .serverless/cloudformation-template-create-stack.json
echo "cfn-lint: no findings"
.venv-tools/bin/checkov --framework cloudformation --file "$template" --compact --quiet --skip-download
echo "checked in $((SECONDS - start)) s"

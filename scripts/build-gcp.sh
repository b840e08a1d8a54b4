#!/usr/bin/env bash
# The Cloud Functions source archive infra/gcp deploys (var.source_archive):
# gcp/main.py at the root, the kidp package beside it, and a requirements.txt
# of the broker's dependencies plus the gcp extra, which Cloud Functions
# installs when it builds each function.
#
# Usage: scripts/build-gcp.sh [OUTPUT]   (default build/gcp/function-source.zip)
set -euo pipefail
cd "$(dirname "$0")/.."
output="${1:-build/gcp/function-source.zip}"
python="python3"
[ -x .venv/bin/python ] && python=.venv/bin/python
"$python" - "$output" <<'PY'
import sys
import tomllib
import zipfile
from pathlib import Path

output = Path(sys.argv[1])
project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
requirements = [*project["dependencies"], *project["optional-dependencies"]["gcp"]]
output.parent.mkdir(parents=True, exist_ok=True)
# Fixed times and order: the same source makes the same archive (and the same
# object name in infra/gcp, so nothing redeploys for nothing).
stamp = (2020, 1, 1, 0, 0, 0)


def add(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=stamp)
    info.external_attr = 0o644 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    archive.writestr(info, data)


with zipfile.ZipFile(output, "w") as archive:
    add(archive, "main.py", Path("gcp/main.py").read_bytes())
    add(archive, "requirements.txt", ("\n".join(requirements) + "\n").encode())
    for path in sorted(Path("common/kidp").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            add(archive, str(path.relative_to("common")), path.read_bytes())
print(f"{output}: {len(requirements)} requirements")
PY

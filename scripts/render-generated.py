"""Write every object the on-prem provider generates, for a representative
matrix, as YAML files a scanner can read (scripts/check-k8s.sh runs checkov on
them). The matrix is kidp.providers.onprem.manifests.sample_objects: the same
one the tests validate against the Kubernetes schemas.

Usage: .venv/bin/python scripts/render-generated.py DIRECTORY [--all-sizes]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from kidp.models import Size
from kidp.providers.onprem import manifests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="where to write <group>.yaml files")
    parser.add_argument(
        "--all-sizes",
        action="store_true",
        help="every size preset, not only small (sizes change only quantities)",
    )
    args = parser.parse_args(argv)
    sizes = tuple(Size) if args.all_sizes else (Size.SMALL,)
    args.directory.mkdir(parents=True, exist_ok=True)
    total = 0
    for group, objects in manifests.sample_objects(sizes).items():
        path = args.directory / f"{group}.yaml"
        path.write_text(yaml.safe_dump_all(objects, sort_keys=False))
        total += len(objects)
    print(f"render-generated: {total} objects in {args.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

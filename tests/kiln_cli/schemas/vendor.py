"""Writes a CRD's OpenAPI schema, without its descriptions, as the JSON the tests load.

Usage: python tests/kiln_cli/schemas/vendor.py CRD.yaml OUT.json (see README.md here).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml


def without_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: without_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [without_descriptions(v) for v in node]
    return node


def vendor(crd_path: Path, out: Path) -> None:
    crd = yaml.safe_load(crd_path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v.get("served", True)]
    doc = {
        "group": crd["spec"]["group"],
        "version": version["name"],
        "kind": crd["spec"]["names"]["kind"],
        "scope": crd["spec"]["scope"],
        "openAPIV3Schema": without_descriptions(version["schema"]["openAPIV3Schema"]),
    }
    out.write_text(json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    vendor(Path(sys.argv[1]), Path(sys.argv[2]))

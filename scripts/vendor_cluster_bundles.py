"""Writes the pinned third-party Kubernetes objects kiln's deploy-time handler applies: Karpenter's
CRDs and Kueue's release install, as JSON bundles under platform_constructs/handlers/bundles.

Reads from git clones of the upstream repositories at the pinned tags (no network), so a bundle
can be reproduced and reviewed:

    python scripts/vendor_cluster_bundles.py \\
        --karpenter-repo ../karpenter-provider-aws --karpenter-version 1.14.1 \\
        --kueue-repo ../kueue --kueue-version v0.19.2

Karpenter's CRDs are the release's `pkg/apis/crds`. Kueue's install is `kubectl kustomize
config/default` at the tag (what its release `manifests.yaml` is built from) with the controller
image set to the release's. JSON, not YAML: the handler runs in Lambda's Python runtime, which
has no YAML parser. Each bundle records where it came from.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

OUT = Path(__file__).resolve().parent.parent / "platform_constructs" / "handlers" / "bundles"
KUEUE_IMAGE = "registry.k8s.io/kueue/kueue"


def _git_show(repo: Path, ref: str, path: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "show", f"{ref}:{path}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def _docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def karpenter_crds(repo: Path, version: str) -> list[dict[str, Any]]:
    tag = f"v{version}"
    listing = subprocess.run(
        ["git", "-C", str(repo), "ls-tree", "--name-only", tag, "pkg/apis/crds/"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return [
        d
        for path in sorted(listing)
        if path.endswith(".yaml")
        for d in _docs(_git_show(repo, tag, path))
    ]


def kueue_install(repo: Path, version: str) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", version, "config"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        rendered = subprocess.run(
            ["kubectl", "kustomize", f"{tmp}/config/default"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    objects = _docs(rendered)
    for obj in objects:
        if obj["kind"] == "Deployment":
            for container in obj["spec"]["template"]["spec"]["containers"]:
                if container["name"] == "manager":
                    container["image"] = f"{KUEUE_IMAGE}:{version}"
    return objects


def write(name: str, source: str, objects: list[dict[str, Any]]) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    bundle = {"source": source, "objects": objects}
    path.write_text(json.dumps(bundle, separators=(",", ":"), sort_keys=True) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--karpenter-repo", type=Path, required=True)
    parser.add_argument("--karpenter-version", required=True)
    parser.add_argument("--kueue-repo", type=Path, required=True)
    parser.add_argument("--kueue-version", required=True)
    args = parser.parse_args(argv)
    karpenter = write(
        f"karpenter-{args.karpenter_version}",
        f"github.com/aws/karpenter-provider-aws v{args.karpenter_version} pkg/apis/crds",
        karpenter_crds(args.karpenter_repo, args.karpenter_version),
    )
    kueue = write(
        f"kueue-{args.kueue_version}",
        f"github.com/kubernetes-sigs/kueue {args.kueue_version} config/default (kubectl kustomize)",
        kueue_install(args.kueue_repo, args.kueue_version),
    )
    for path in (karpenter, kueue):
        print(f"wrote {path} ({path.stat().st_size} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Times a warm `cdk synth` of kiln's default environment against a one-bucket app, in one run.

The one-bucket app pays the same fixed costs (CDK CLI start, Python and jsii start-up,
loading aws-cdk-lib) and almost nothing else, so the ratio shows what kiln's own
constructs and the policy packs add. Usage: `python scripts/bench_synth.py [--runs N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
CDK = REPO / "node_modules" / ".bin" / "cdk"

ONE_BUCKET_APP = """\
import aws_cdk as cdk
from aws_cdk import aws_s3 as s3

app = cdk.App()
s3.Bucket(cdk.Stack(app, "OneBucket", env=cdk.Environment(region="us-east-1")), "Bucket")
app.synth()
"""


def synth_seconds(cwd: Path, args: list[str], out: Path) -> float:
    env = {
        **os.environ,
        "AWS_EC2_METADATA_DISABLED": "true",
        "CDK_DISABLE_CLI_TELEMETRY": "true",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    start = time.perf_counter()
    subprocess.run(
        [str(CDK), "synth", "--quiet", "--output", str(out), *args],
        cwd=cwd,
        env=env,
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--env", default="dev")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        floor_app = Path(tmp) / "one-bucket"
        floor_app.mkdir()
        (floor_app / "app.py").write_text(ONE_BUCKET_APP)
        context = json.loads((REPO / "cdk.json").read_text())["context"]
        (floor_app / "cdk.json").write_text(
            json.dumps({"app": f"{sys.executable} app.py", "context": context})
        )
        kiln, floor = [], []
        synth_seconds(REPO, ["-c", f"env={options.env}"], Path(tmp) / "warmup")  # warm caches
        # The synths take a few seconds each: a bar on stderr says how far the runs are.
        for run in tqdm(range(options.runs), desc="synth runs (kiln, floor)", file=sys.stderr):
            kiln.append(synth_seconds(REPO, ["-c", f"env={options.env}"], Path(tmp) / f"k{run}"))
            floor.append(synth_seconds(floor_app, [], Path(tmp) / f"f{run}"))
    k, f = statistics.median(kiln), statistics.median(floor)
    rows = [(f"kiln env={options.env}", k, kiln), ("one-bucket app (floor)", f, floor)]
    print(f"{'app':<26}{'median s':>9}   runs (s)")
    for name, median, runs in rows:
        print(f"{name:<26}{median:>9.2f}   {'  '.join(f'{t:.2f}' for t in runs)}")
    print(f"ratio kiln / floor: {k / f:.2f}x")


if __name__ == "__main__":
    main()

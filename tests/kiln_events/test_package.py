"""The event package stands alone: what the inference image copies of the platform (kiln_events/
and the contract) is enough to build, serialize and produce events."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import sys
from kiln.contract import ServerEnv
from kiln_events.events import PredictionEvent
from kiln_events.producer import EventProducer, ProducerConfig
assert ServerEnv.EVENTS_TOPIC == "KILN_EVENTS_TOPIC"
loaded = sorted(m for m in sys.modules if m == "kiln" or m.startswith(("kiln.", "kiln_")))
print(" ".join(loaded))
"""


def test_events_import_with_only_what_the_inference_image_copies(tmp_path: Path) -> None:
    dockerfile = (REPO / "inference" / "Dockerfile").read_text()
    copied = [
        source
        for line in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.M)
        for source in line.split()
        if source.startswith(("kiln/", "kiln_"))
    ]
    assert copied, "the inference image copies nothing of the platform"
    for source in copied:
        target = tmp_path / source
        target.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / source).is_dir():
            shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / source, target)
    # -S: no site hooks, so the editable install cannot reach the repository's kiln/; the
    # third-party packages come from site-packages, the platform only from what was copied.
    site = sysconfig.get_paths()["purelib"]
    proc = subprocess.run(
        [sys.executable, "-S", "-c", PROBE],
        cwd=tmp_path,
        env={"PYTHONPATH": f"{tmp_path}:{site}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        "kiln",
        "kiln.contract",
        "kiln_events",
        "kiln_events.events",
        "kiln_events.producer",
    ]

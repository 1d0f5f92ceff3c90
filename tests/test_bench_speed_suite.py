"""benchmarks/speed_suite.sh: every stage it runs is documented in its header and named by its usage error."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "speed_suite.sh"


def _stages(text: str) -> list[str]:
    return re.findall(r"^ {4}(\w+)\)", text, flags=re.M)  # the case labels of the stage loop


def test_every_stage_is_documented_and_listed_by_the_usage_error(tmp_path: Path) -> None:
    text = SUITE.read_text()
    stages = _stages(text)
    assert {"step", "startup", "startup_profile", "step_nograph", "step_head", "tests"} <= set(stages)
    header = text.split("\nset -u")[0]
    undocumented = [s for s in stages if not re.search(rf"(^#\s+|\s){s}\s", header, flags=re.M)]
    assert not undocumented, undocumented
    out = subprocess.run(["bash", str(SUITE), str(tmp_path / "out"), "no_such_stage"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "unknown stage 'no_such_stage'" in out.stdout
    listed = re.search(r"unknown stage '[^']*' \(([^)]*)\)", out.stdout).group(1).split()
    assert sorted(listed) == sorted(stages)

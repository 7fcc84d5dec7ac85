"""The benchmark suite's smoke run (`python -m benchmarks --quick`), so that the suite cannot rot:
it must finish, print all thirteen figures with their ratios (the eighth through containerd's CRI, the ninth with
checkpoint and restore only where the host can save a VM, the tenth only where it can load a template, the
eleventh only where docker's default seccomp profile is installed: elsewhere it says why not; the twelfth
through a pod's network namespace, the thirteenth growing vCPUs where the host has two cores), and write the page and its PNG.
No figure is asserted: the times are only reported."""
import os
import re
import subprocess
import sys

import pytest

from benchmarks import seccomp
from pyrunv import config
from pyrunv.vm import versions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def test_quick_run_prints_thirteen_figures_and_writes_the_page(tmp_path):
    out = tmp_path / "performance.md"
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)], cwd=REPO,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    summary = [line for line in result.stdout.splitlines() if line.startswith("figure ")]
    for number in range(1, 14):
        lines = [line for line in summary if line.startswith(f"figure {number} ")]
        assert lines, f"figure {number} missing from the summary:\n{result.stdout[-3000:]}"
        assert "FAILED" not in lines[0], lines[0]
        if (number == 10 and versions.template_refusal(config.load())
                or number == 11 and not os.path.exists(seccomp.PROFILE)):
            assert "not measured here: " in lines[0], lines[0]
            continue
        assert re.search(r"\| ratio [^|]+ [0-9.]+x", lines[0]), f"figure {number} has no ratio: {lines[0]}"
    assert "Targets:" in result.stdout
    assert "KVM" in result.stdout

    page = out.read_text()
    for number in range(1, 14):
        assert re.search(rf"^## {number}\. ", page, re.M), f"section {number} missing from the page"
    for heading in ("## Machine and run", "## Targets", "## What holds it back", "## Reproduce"):
        assert heading in page
    assert "](performance.png)" in page
    png = tmp_path / "performance.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

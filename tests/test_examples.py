"""The examples run end to end in their reduced (--tiny) form and print their metric."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each example trains or probes for seconds

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--tiny", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_sed_head_example(tmp_path):
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    plot = tmp_path / "scores.png"
    out = run_example("sed_head.py", "--plot", str(plot) if has_matplotlib else "", cwd=tmp_path)
    f1 = float(re.search(r"event-based F1: ([0-9.]+)", out).group(1))
    assert 0.3 < f1 <= 1.0, out  # a head on random tiny features still finds most events
    if has_matplotlib:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_linear_probe_example(tmp_path):
    out = run_example("linear_probe.py", cwd=tmp_path)
    accuracy = float(re.search(r"accuracy: ([0-9.]+)", out).group(1))
    assert 0.4 < accuracy <= 1.0, out  # well above the 0.25 of chance


@pytest.mark.parametrize("name", ["sed_head.py", "linear_probe.py"])
def test_examples_reject_a_missing_model(tmp_path, name):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--tiny", "--model", str(tmp_path / "nothing-here")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0 and "nothing-here" in result.stderr

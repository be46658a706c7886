"""Benchmarks start both as scripts (``python benchmarks/<name>.py``) and as modules (``-m``)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv", [
    ["benchmarks/quality.py"],
    ["-m", "benchmarks.search_strategies"],
    ["benchmarks/search_strategies.py"],
], ids=lambda a: " ".join(a))
def test_help_runs_as_script_and_module(tmp_path, argv):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cwd = ROOT if argv[0] == "-m" else tmp_path  # a script must not need the repository as cwd
    target = argv if argv[0] == "-m" else [str(ROOT / argv[0])]
    r = subprocess.run([sys.executable, *target, "--help"], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("usage: ") and "--quick" in r.stdout


def test_quality_and_search_strategies_share_soup_objective_through_common():
    import benchmarks.common as common
    import benchmarks.quality as quality
    import benchmarks.search_strategies as strategies

    assert quality.soup_objective is strategies.soup_objective is common.soup_objective
    src = {n: (ROOT / "benchmarks" / f"{n}.py").read_text()
           for n in ("quality", "search_strategies")}
    assert "from benchmarks.search_strategies import" not in src["quality"]
    assert "from benchmarks.quality import" not in src["search_strategies"].split("\ndef ")[0]

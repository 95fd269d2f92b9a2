"""python -m apps.benchmark: options and outputs checked before any benchmark runs, one fresh process per
benchmark, and memory figures that are the measuring process's own."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from apps import benchmark
from tests.conftest import run_env
from vision.cli import UserError

# A parent that imported torch and then touched 300 MB more starts a child that reports its own peak.
# getrusage's ru_maxrss would report the parent's peak in the child (Linux carries it across fork and
# exec): the bug this guards against, which gave every benchmark of `--all` the same figure.
_BIG_PARENT = r"""
import json, subprocess, sys
import torch
from apps.benchmarks import peak_rss_mb
ballast = bytearray(300 * 2**20)
for i in range(0, len(ballast), 4096):
    ballast[i] = 1
child = subprocess.run([sys.executable, *sys.argv[1:]], capture_output=True, text=True, check=True)
print(json.dumps({"parent": peak_rss_mb(), "child": child.stdout.strip().splitlines()[-1]}))
"""


def _in_big_parent(*child_args: str) -> tuple[float, str]:
    proc = subprocess.run([sys.executable, "-c", _BIG_PARENT, *child_args], env=run_env(), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    return out["parent"], out["child"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's; elsewhere ru_maxrss is used")
def test_peak_rss_of_a_child_is_its_own():
    parent, child = _in_big_parent("-c", "from apps.benchmarks import peak_rss_mb; print(peak_rss_mb())")
    assert parent > 300
    assert float(child) < 100  # a bare interpreter, whatever its parent held


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's; elsewhere ru_maxrss is used")
def test_segment_benchmark_child_reports_its_own_memory(tmp_path):
    parent, line = _in_big_parent("-m", "apps.benchmarks.segment", "tessera", "32,32,16", "16,16,8",
                                  str(tmp_path / "labels.npy"), "1")
    figures = json.loads(line)
    # torch and a 16k-voxel volume: far under torch + 300 MB (the old figure was at least the parent's)
    assert 0 < figures["baseline_rss_mb"] <= figures["peak_rss_mb"] < parent - 150


def _no_benchmark(*_):
    raise AssertionError("a benchmark ran although the command was refused")


def test_outputs_and_names_are_checked_before_any_benchmark_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "run_isolated", _no_benchmark)
    existing = tmp_path / "b.json"
    existing.write_text("{}")
    refused = {
        "exists; pass --overwrite": ["toolkit", "--json", str(existing)],
        "does not exist": ["toolkit", "--json", str(tmp_path / "missing" / "b.json")],
        "is a folder": ["toolkit", "--json", str(tmp_path), "--overwrite"],
        "unknown benchmark 'nope'": ["toolkit", "nope", "--json", str(tmp_path / "new.json")],
        "name a benchmark": [],
    }
    for match, argv in refused.items():
        with pytest.raises(UserError, match=match):
            benchmark.main(argv)
    assert existing.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]


def test_each_benchmark_in_its_own_run_and_a_failure_keeps_the_others(tmp_path, monkeypatch, capsys):
    calls = []

    def fake(name, quick):
        calls.append((name, quick))
        return None if name == "fid" else {"figure": float(len(calls))}

    monkeypatch.setattr(benchmark, "run_isolated", fake)
    out = tmp_path / "b.json"
    assert benchmark.main(["--all", "--quick", "--json", str(out)]) == 1
    names = list(benchmark.registry())
    assert calls == [(n, True) for n in names] and "fid" in names
    figures = json.loads(out.read_text())
    assert {k: v for k, v in figures.items() if k.endswith("_figure")} == \
        {f"{n}_figure": float(i + 1) for i, n in enumerate(names) if n != "fid"}
    assert figures["quick"] == 1
    assert "1 benchmark(s) failed: fid" in capsys.readouterr().err


def test_a_failing_benchmark_is_one_error_line(monkeypatch):
    # the child entry point, with an unknown name standing in for a benchmark that raises
    proc = subprocess.run([sys.executable, "-c", "from apps.benchmark import child; child()", "no-such", "x.json",
                           "1"], env=run_env(), capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["error: benchmark no-such failed: KeyError: 'no-such'"]

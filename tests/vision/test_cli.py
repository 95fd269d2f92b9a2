import subprocess
import sys

import pytest

from tests.conftest import run_env
from vision.cli import UserError, atomic_output


def test_atomic_output_keeps_existing_and_cleans_up(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(UserError, match="--overwrite"):
        with atomic_output(target):
            pass
    with pytest.raises(RuntimeError):
        with atomic_output(target, overwrite=True) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    with atomic_output(target, overwrite=True) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    with pytest.raises(UserError, match="does not exist"):
        with atomic_output(tmp_path / "nope" / "x.txt"):
            pass


def test_benchmark_app_errors_are_one_line_exit_2(tmp_path):
    cmd = [sys.executable, "-m", "apps.benchmark", "no-such-benchmark"]
    proc = subprocess.run(cmd, env=run_env(), capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: unknown benchmark 'no-such-benchmark'; known: "
                                                + proc.stderr.split("known: ")[1].strip()]
    proc = subprocess.run([sys.executable, "-m", "apps.benchmark", "--bogus"], env=run_env(), capture_output=True,
                          text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    listing = subprocess.run([sys.executable, "-m", "apps.benchmark", "--list"], env=run_env(), capture_output=True,
                             text=True)
    assert listing.returncode == 0 and "toolkit" in listing.stdout

import subprocess
import sys

import pytest
from PIL import Image

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


def run_main(main, capsys) -> tuple[int, str]:
    from vision.cli import run

    with pytest.raises(SystemExit) as exit_:
        run(main, [])
    return exit_.value.code, capsys.readouterr().err


def test_config_errors_interrupts_and_notes_are_one_line(tmp_path, capsys):
    from tokenizers.wetok import wetok_config
    from vision.data import ImageFolder

    assert run_main(lambda argv: wetok_config("wetok-tiny-f4", image_size=30), capsys) == (
        2, "error: image size 30 must be a multiple of the model's downsampling factor 4 (e.g. 28)\n")

    def interrupted(argv):
        raise KeyboardInterrupt

    assert run_main(interrupted, capsys) == (130, "error: interrupted\n")  # not a trainer: nothing to resume
    # a folder's non-image files are counted in one note, whatever their number
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    for name in ("a.txt", "b.txt", "labels.csv", "README"):
        (tmp_path / name).write_text("not an image")
    (tmp_path / ".hidden").write_text("ignored")
    code, err = run_main(lambda argv: len(ImageFolder(tmp_path)) - 3, capsys)
    assert code == 0 and err == f"note: {tmp_path}: skipped 4 file(s) that are not images (.csv, .txt, README; " \
                                "e.g. README)\n"


def test_cli_and_trainer_import_without_a_cycle():
    """vision.train never imports vision.cli (vision.cli may import vision.train): either one imports first."""
    code = ("import sys, importlib; importlib.import_module(sys.argv[1]); "
            "print('vision.cli' in sys.modules)")
    for first, cli_loaded in (("vision.train.trainer", "False"), ("vision.cli", "True")):
        proc = subprocess.run([sys.executable, "-c", code, first], env=run_env(), capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stdout.strip() == cli_loaded, proc.stderr
    from vision.cli import progress as from_cli
    from vision.progress import progress
    from vision.train.trainer import TrainingDiverged
    from vision.errors import TrainingDiverged as from_errors

    assert from_cli is progress and TrainingDiverged is from_errors


SKIP_TEARDOWN_APP = r"""
import atexit, sys
from vision.cli import UserError, run

def main(argv):
    atexit.register(lambda: open(sys.argv[2], "w").write("atexit ran"))
    print("partial line, no newline", end="")
    print("to stderr", end="", file=sys.stderr)
    if sys.argv[1] == "user-error":
        raise UserError("bad input")
    if sys.argv[1] == "argparse":
        sys.exit(2)
    return int(sys.argv[1])

run(main, [], skip_teardown=True)
"""


@pytest.mark.parametrize("mode, code, err", [("0", 0, "to stderr"), ("3", 3, "to stderr"),
                                              ("user-error", 2, "to stderrerror: bad input\n"),
                                              ("argparse", 2, "to stderr")])
def test_skip_teardown_flushes_runs_atexit_and_keeps_the_exit_code(tmp_path, mode, code, err):
    """apps.upscale leaves without the interpreter's teardown: nothing printed or registered may be lost."""
    marker = tmp_path / "atexit.txt"
    proc = subprocess.run([sys.executable, "-c", SKIP_TEARDOWN_APP, mode, str(marker)], env=run_env(),
                          capture_output=True, text=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (code, "partial line, no newline", err)
    assert marker.read_text() == "atexit ran"


TORCHRUN_RANK_APP = r"""
import atexit, os, sys
import torch
import torch.distributed as dist
from vision.cli import run
from vision.train.distributed import setup_distributed

marker = os.path.join(sys.argv[1], f"rank{os.environ['RANK']}")
atexit.register(lambda: open(marker + ".atexit", "w").write(str(dist.is_initialized())))


class WrittenAtInterpreterTeardown:
    def __del__(self, open=open, path=marker + ".teardown"):  # builtins may be gone by then
        open(path, "w").write("the interpreter's teardown ran")


keep = WrittenAtInterpreterTeardown()


def main(argv):
    setup_distributed(torch.device("cpu"))
    print(f"rank {os.environ['RANK']} done", end="")
    return 0

run(main, [])
"""


def test_a_torchrun_rank_leaves_without_the_interpreter_teardown(tmp_path):
    """DDP keeps gloo's threads alive past destroy_process_group; tearing them down with the interpreter
    aborted a finished rank now and then. A rank that joined a group runs its atexit handlers (the group is
    destroyed by then), flushes, and leaves before the interpreter's teardown."""
    app = tmp_path / "app.py"
    app.write_text(TORCHRUN_RANK_APP)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(app), str(tmp_path)], env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rank 0 done" in proc.stdout and "rank 1 done" in proc.stdout
    for rank in range(2):
        assert (tmp_path / f"rank{rank}.atexit").read_text() == "False"  # the group was destroyed first
        assert not (tmp_path / f"rank{rank}.teardown").exists()

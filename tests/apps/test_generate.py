"""apps.generate end to end on the tiny registered family: outputs, determinism, sharding, bad input."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apps import generate
from generators.base import SamplerOption
from tests.conftest import ROOT, run_env
from tests.helpers.tiny_generator import TinyConfig, TinyGenerator
from vision.cli import run
from vision.hub import save_pretrained

HELPER = ROOT / "tests" / "helpers" / "tiny_generator.py"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_pretrained(TinyGenerator(TinyConfig()), folder)
    return folder


def gen(*argv):
    run(generate.main, [str(a) for a in argv])


def error_of(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        gen(*argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(folder)): np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))}


def test_labels_parse():
    assert generate.parse_labels("0-3,7") == [0, 1, 2, 3, 7]
    assert generate.parse_labels("5") == [5]
    assert generate.parse_labels(None) is None


def test_grid_folders_and_json(tmp_path, model_dir, capsys):
    grid, out, js = tmp_path / "grid.png", tmp_path / "samples", tmp_path / "stats.json"
    with pytest.raises(SystemExit) as e:
        gen("--model", model_dir, "--labels", "2,5", "--per-label", 3, "--batch-size", 4, "-o", grid,
            "--out-dir", out, "--json", js, "--quiet")
    assert e.value.code == 0
    files = pngs(out)
    assert sorted(files) == [f"{lab}/{i:05d}.png" for lab in (2, 5) for i in range(3)]
    # a grid row per label, the images of DIR/<label>/ in order, 2-pixel gutters
    g = np.asarray(Image.open(grid))
    assert g.shape[:2] == (2 * 34 + 2, 3 * 34 + 2)
    np.testing.assert_array_equal(g[36:68, 36:68], files["5/00001.png"])
    figures = json.loads(js.read_text())
    assert figures["images"] == 6 and figures["nfe"] == 2  # two batches, one forward pass each
    assert set(figures) == {"images", "wall_time_s", "images_per_s", "nfe", "draft_nfe", "mean_accepted",
                            "peak_memory_mb"}


def test_same_seed_same_files_other_seed_differs(tmp_path, model_dir):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        with pytest.raises(SystemExit):
            gen("--model", model_dir, "--labels", "0-2", "--per-label", 2, "--out-dir", tmp_path / name,
                "--seed", seed, "--quiet")
    a, b, c = (pngs(tmp_path / n) for n in "abc")
    assert all((a[k] == b[k]).all() for k in a)
    assert any((a[k] != c[k]).any() for k in a)


def test_sampler_options_reach_the_sampler(tmp_path, model_dir):
    js = tmp_path / "s.json"
    with pytest.raises(SystemExit):
        gen("--model", model_dir, "--labels", "1", "--per-label", 2, "--sampler", "twice", "--rounds", 3,
            "--json", js, "--quiet")
    assert json.loads(js.read_text())["nfe"] == 3


def test_bad_inputs_one_line_exit_2_and_no_output(tmp_path, model_dir, capsys):
    out = tmp_path / "grid.png"
    cases = {
        ("--sampler", "nope"): "no sampler 'nope'",
        ("--labels", "0-10"): "labels must lie in 0..9",
        ("--labels", "3-1"): "empty range",
        ("--labels", "a"): "expected numbers",
        ("--per-label", "0"): "--per-label must be >= 1",
        ("--rounds", "2"): "not an option of --sampler plain",
        ("--sampler", "twice", "--rounds", "0"): "--rounds must be >= 1",
        ("--top-k", "-1"): "--top-k must be >= 0",
        ("--tokenizer", "wetok-mnist"): "2 groups",
        ("--model", tmp_path / "missing"): "does not exist",
        ("--model", "no-such-model"): "no model named",
    }
    for extra, message in cases.items():
        args = ["--model", model_dir, "--labels", "0-1", "-o", out]
        if extra[0] == "--model":
            args[1] = extra[1]
            extra = ()
        assert message in error_of(capsys, *args, *extra), extra
        assert not out.exists() and list(tmp_path.iterdir()) == []
    assert "class-conditional" in error_of(capsys, "--model", model_dir, "-o", out)
    assert "nothing to write" in error_of(capsys, "--model", model_dir, "--labels", "1")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert "garbage.pt" in error_of(capsys, "--model", garbage, "--labels", "1", "-o", out)


def test_existing_output_kept_without_overwrite(tmp_path, model_dir, capsys):
    out = tmp_path / "samples"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert "exists" in error_of(capsys, "--model", model_dir, "--labels", "1", "--out-dir", out)
    # --overwrite replaces only a folder of samples: mine.txt is named and kept
    assert "mine.txt" in error_of(capsys, "--model", model_dir, "--labels", "1", "--out-dir", out, "--overwrite")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    (out / "mine.txt").unlink()
    for per_label in (2, 4):
        with pytest.raises(SystemExit):
            gen("--model", model_dir, "--labels", "1", "--per-label", per_label, "--out-dir", out, "--overwrite",
                "--quiet")
    assert sorted(pngs(out)) == ["1/00000.png", "1/00001.png", "1/00002.png", "1/00003.png"]
    assert not list(tmp_path.glob(".*"))


def test_sampler_option_validation_unit():
    opt = SamplerOption("window", int, 16, "draft window", min=1)
    assert opt.check("4") == 4
    with pytest.raises(ValueError, match="--window must be >= 1"):
        opt.check(0)
    with pytest.raises(ValueError, match="one of"):
        SamplerOption("init", str, "a", "", choices=("a", "b")).check("c")


def test_torchrun_two_processes_write_the_same_files(tmp_path, model_dir):
    common = ["--model", str(model_dir), "--labels", "0-4", "--per-label", "3", "--batch-size", "4", "--quiet"]
    one = subprocess.run([sys.executable, str(HELPER), "generate", *common, "--out-dir", str(tmp_path / "one")],
                         env=run_env(), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(HELPER),
                          "generate", *common, "--out-dir", str(tmp_path / "two")],
                         env=run_env(), capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    a, b = pngs(tmp_path / "one"), pngs(tmp_path / "two")
    assert sorted(a) == sorted(b) and len(a) == 15
    assert all((a[k] == b[k]).all() for k in a)

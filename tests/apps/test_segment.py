"""python -m apps.segment and apps.train_segmenter end to end, in subprocesses (exit codes, files, geometry)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file, get_testdata_files

from segmentation.io import read_volume
from segmentation.neunet import NeUNet, NeUNetConfig
from segmentation.pipeline import Segmenter
from tests.conftest import run_env
from vision.cli import UserError
from vision.hub import from_pretrained, save_pretrained

ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"  # 33x41x25, LAS, 2 mm
CT5N = sorted(get_testdata_files("dicomdirtests/98892001/CT5N/*"))  # 5-slice CT series


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], env=run_env(), capture_output=True, text=True)


def _tiny(path: Path, in_channels: int = 1) -> Path:
    torch.manual_seed(0)
    net = NeUNet(NeUNetConfig(in_channels=in_channels, num_classes=3, features=(4, 8), strides=((1, 1, 1), (2, 2, 2)),
                              kernel_sizes=None, wavelet_inputs=False))
    seg = Segmenter.wrap(net, class_names=("background", "dark", "bright"), window=(16, 16, 8), intensity="zscore")
    return save_pretrained(seg, path)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory.mktemp("seg") / "tiny")


def _series(folder: Path, files=CT5N) -> Path:
    folder.mkdir()
    for i, f in enumerate(files):
        shutil.copy(f, folder / f"IM{i}")
    return folder


def _assert_refused(proc: subprocess.CompletedProcess, match: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], proc.stderr


def test_nifti_in_nifti_out_same_geometry_and_labels(model, tmp_path):
    out = tmp_path / "seg.nii.gz"
    proc = _run("apps.segment", "--model", str(model), str(ANATOMICAL), "-o", str(out), "--tta", "--overlap", "0.25",
                "--batch", "3", "--labels", "bg,csf,matter", "--quiet")
    assert proc.returncode == 0, proc.stderr
    src, seg = nib.load(str(ANATOMICAL)), nib.load(str(out))
    assert np.array_equal(seg.affine, src.affine) and seg.shape == src.shape
    assert int(seg.header["qform_code"]) == int(src.header["qform_code"])
    vol = read_volume(ANATOMICAL)
    expected = from_pretrained(model).segment(vol.array, vol.affine, tta=True, overlap=0.25, batch=3)
    labels = np.asarray(seg.dataobj)
    assert np.array_equal(labels, expected)
    rows = {ln.split()[1]: ln.split() for ln in proc.stdout.splitlines() if ln.split()[:1] in (["0"], ["1"], ["2"])}
    assert set(rows) == {"bg", "csf", "matter"}
    for i, name in enumerate(("bg", "csf", "matter")):
        count = int((labels == i).sum())
        assert int(rows[name][2]) == count and float(rows[name][3]) == pytest.approx(count * 8 / 1000, abs=1e-3)

    # an existing output is kept without --overwrite
    before = out.read_bytes()
    _assert_refused(_run("apps.segment", "--model", str(model), str(ANATOMICAL), "-o", str(out)), "--overwrite")
    assert out.read_bytes() == before


def test_dicom_series_in_gets_its_ras_affine(model, tmp_path):
    folder = _series(tmp_path / "ct")
    out = tmp_path / "ct_seg.nii.gz"
    proc = _run("apps.segment", "--model", str(model), str(folder), "--quiet")  # default name beside the folder
    assert proc.returncode == 0, proc.stderr
    vol = read_volume(folder)
    seg = nib.load(str(out))
    np.testing.assert_allclose(seg.affine, vol.affine, atol=1e-4)
    assert nib.aff2axcodes(seg.affine) == nib.aff2axcodes(vol.affine)
    assert np.array_equal(np.asarray(seg.dataobj), from_pretrained(model).segment(vol.array, vol.affine))


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    tmp_path.mkdir()
    (tmp_path / "notes.txt").write_text("not a volume")
    two = _series(tmp_path / "two")
    shutil.copy(get_testdata_file("CT_small.dcm"), two / "other")
    gap = _series(tmp_path / "gap", CT5N[:2] + CT5N[3:])
    return {
        "text": (tmp_path / "notes.txt", "not a NIfTI file"),
        "dicom file": (Path(get_testdata_file("CT_small.dcm")), "2-D image"),
        "two series": (two, "2 DICOM series"),
        "missing slice": (gap, "missing slices"),
    }


def test_bad_inputs_exit_2_and_write_nothing(model, tmp_path):
    cases = _bad_inputs(tmp_path / "in")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for what, (src, match) in cases.items():
        _assert_refused(_run("apps.segment", "--model", str(model), str(src), "-o", str(out_dir / f"{what}.nii.gz")),
                        match)
    assert list(out_dir.iterdir()) == []
    assert pydicom.dcmread(get_testdata_file("CT_small.dcm")).Rows == 128  # (the 2-D image really is one slice)


def test_model_channel_mismatch(model, tmp_path):
    two_channels = _tiny(tmp_path / "two", in_channels=2)
    out = tmp_path / "seg.nii.gz"
    _assert_refused(_run("apps.segment", "--model", str(two_channels), str(ANATOMICAL), "-o", str(out)),
                    "expects 2 input channels")
    assert not out.exists()


def test_user_errors_in_process(model, tmp_path):
    """The same UserError paths, called in-process (run() maps them to exit 2)."""
    from apps import segment, train_segmenter
    from vision.cli import UserError
    from vision.hub import HubError

    out = str(tmp_path / "seg.nii.gz")
    with pytest.raises(UserError, match="the model predicts 3"):
        segment.main(["--model", str(model), str(ANATOMICAL), "-o", out, "--labels", "a,b"])
    with pytest.raises(UserError, match="use a .nii.gz"):
        segment.main(["--model", str(model), str(ANATOMICAL), "-o", str(tmp_path / "seg.png")])
    with pytest.raises(UserError, match="overlap"):
        segment.main(["--model", str(model), str(ANATOMICAL), "-o", out, "--overlap", "1"])
    with pytest.raises(HubError, match="no model named"):
        segment.main(["--model", "no-such-model", str(ANATOMICAL), "-o", out])
    with pytest.raises(UserError, match="--val"):
        train_segmenter.main(["--data", str(tmp_path), "--out", str(tmp_path / "r"), "--ship", "x"])
    with pytest.raises(UserError, match="imagesTr"):
        train_segmenter.main(["--data", str(tmp_path), "--out", str(tmp_path / "r")])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_train_segmenter_on_phantoms_then_segment(tmp_path):
    data = tmp_path / "data"
    proc = _run("apps.train_segmenter", "--make-phantoms", str(data), "2", "--phantom-shape", "32,32,16",
                "--organs", "2", "--lesions", "1")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (data / "imagesTr").iterdir()) == ["phantom_0000_0000.nii.gz", "phantom_0001_0000.nii.gz"]
    meta = json.loads((data / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "organ_1": 1, "organ_2": 2, "lesion": 3}
    run_dir = tmp_path / "run"
    proc = _run("apps.train_segmenter", "--model", "neunet", "--data", str(data), "--val", str(data), "--out",
                str(run_dir), "--features", "4,8", "--patch", "16,16,8", "--steps", "2", "--batch-size", "2",
                "--repeat", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr
    # one of the two cases is held out of training to choose the post-processing on
    held = re.search(r"1 training cases \(1 more held out to choose the post-processing: (phantom_000[01])\)", proc.stderr)
    assert held, proc.stderr
    assert "post-processing (chosen on 1 held-out training case(s))" in proc.stdout
    trained = ({"phantom_0000", "phantom_0001"} - {held.group(1)}).pop()
    seg = from_pretrained(run_dir / "model")
    c = seg.config
    assert c.class_names == ("background", "organ_1", "organ_2", "lesion") and c.spacing == (1.5, 1.5, 3.0)
    assert c.intensity == "ct" and c.window == (16, 16, 8) and seg.net.config.strides == ((1, 1, 1), (2, 2, 1))
    # the CT statistics are those of the foreground of the case trained on, not of the held-out one
    fg = read_volume(data / "imagesTr" / f"{trained}_0000.nii.gz").array[
        read_volume(data / "labelsTr" / f"{trained}.nii.gz").array > 0].astype(np.float64)
    assert c.ct_mean == pytest.approx(fg.mean()) and c.ct_upper == pytest.approx(np.percentile(fg, 99.5))
    metrics = json.loads((run_dir / "val_metrics.json").read_text())
    assert metrics["cases"] == 2 and "dice_organ_1" in metrics


def test_folder_outputs_never_land_among_the_inputs(model, tmp_path, monkeypatch):
    from apps import segment
    from vision.cli import UserError

    med = tmp_path / "med"
    med.mkdir()
    shutil.copy(ANATOMICAL, med / "anatomical.nii")
    monkeypatch.chdir(tmp_path)
    base = ["--model", str(model), "--quiet"]
    for same in ("med", "med/", "med/.", str(med)):  # the input folder, however it is spelled
        with pytest.raises(UserError, match="is the input folder"):
            segment.main([*base, "med", "-o", same, "--overwrite"])
    for name in ("x8.nii.gz", "single.png", "labels.nii"):  # a file name for a folder input
        with pytest.raises(UserError, match="looks like a file name"):
            segment.main([*base, "med", "-o", name])
    with pytest.raises(UserError, match="is the input volume"):
        segment.main([*base, "med/anatomical.nii", "-o", str(med / "anatomical.nii"), "--overwrite"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["med"] and os.listdir(med) == ["anatomical.nii"]
    assert (med / "anatomical.nii").read_bytes() == ANATOMICAL.read_bytes()

    # the default output folder is beside the input, so a rerun reads the same single volume
    for extra in ([], ["--overwrite"]):
        assert segment.main([*base, "med", *extra]) == 0
        assert os.listdir(tmp_path / "med_seg") == ["anatomical.nii.gz"] and os.listdir(med) == ["anatomical.nii"]


def test_postprocess_split_holds_out_a_fifth_of_the_training_cases():
    from apps.train_segmenter import postprocess_split

    for n in range(1, 31):
        cases = list(range(n))
        train, held = postprocess_split(cases, 0.2, seed=0)
        assert len(held) == (0 if n == 1 else min(n - 1, max(1, round(0.2 * n))))
        assert sorted(train + held) == cases and not set(train) & set(held)
        assert train == [c for c in cases if c in train]  # order kept
        assert postprocess_split(cases, 0.2, seed=0) == (train, held)
    draws = {tuple(postprocess_split(list(range(20)), 0.2, seed=s)[1]) for s in range(5)}
    assert len(draws) > 1  # the seed picks the held-out cases


def test_postprocessing_is_chosen_on_held_out_training_cases_only(tmp_path, monkeypatch):
    """The cases the post-processing is chosen on were neither trained on nor scored (--val)."""
    from apps import train_segmenter

    data, val = tmp_path / "data", tmp_path / "val"
    small = ["--phantom-shape", "32,32,16", "--organs", "1", "--lesions", "0"]
    assert train_segmenter.main(["--make-phantoms", str(data), "3", *small]) == 0
    assert train_segmenter.main(["--make-phantoms", str(val), "1", "--first-seed", "1000", *small]) == 0
    seen = {}

    def record_choice(segmenter, cases, device):
        seen["chosen_on"] = [name for name, _, _ in cases]
        return (1,)

    real_split = train_segmenter.postprocess_split

    def record_split(cases, share, seed):
        train, held = real_split(cases, share, seed)
        seen["trained_on"] = [name for name, _, _ in train]
        return train, held

    monkeypatch.setattr(train_segmenter, "choose_postprocessing", record_choice)
    monkeypatch.setattr(train_segmenter, "postprocess_split", record_split)
    monkeypatch.setattr("vision.hub.WEIGHTS_DIR", tmp_path / "weights")  # where --ship writes
    assert train_segmenter.main(["--data", str(data), "--val", str(val), "--out", str(tmp_path / "run"),
                                 "--features", "4,8", "--patch", "16,16,8", "--steps", "1", "--batch-size", "1",
                                 "--repeat", "1", "--quiet", "--ship", "tiny"]) == 0
    assert len(seen["chosen_on"]) == 1 and len(seen["trained_on"]) == 2
    assert sorted(seen["chosen_on"] + seen["trained_on"]) == ["phantom_0000", "phantom_0001", "phantom_0002"]
    assert from_pretrained(tmp_path / "run" / "model").config.largest_component == (1,)
    entry = json.loads((tmp_path / "weights" / "index.json").read_text())["tiny"]
    assert entry["data"].startswith(f"2 cases from {data} ") and entry["config"]["largest_component"] == [1]
    assert f"1 of its cases held out of training to choose the post-processing ({seen['chosen_on'][0]})" in entry["data"]
    assert "post-processing chosen on the 1 held-out training cases, not on the scored ones" in entry["metrics_protocol"]
    with pytest.raises(SystemExit) as refused:  # argparse's range check: one `error:` line, exit 2
        train_segmenter.main(["--data", str(data), "--out", str(tmp_path / "r2"), "--postprocess-split", "1"])
    assert refused.value.code == 2 and not (tmp_path / "r2").exists()

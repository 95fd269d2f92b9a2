"""python -m apps.segment with released files: nnU-Net result folders / checkpoint_final.pth of neU-Net, HBFormer's
Synapse weights with --preset synapse; unusable files and folders are one line, exit 2, nothing written."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import zoom

from segmentation.hbformer import HBFormer, HBFormerConfig
from segmentation.io import read_volume
from tests.conftest import run_env
from tests.helpers import nnunet_fixtures as fx
from vision.cli import UserError


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apps.segment", *map(str, args)], env=run_env(), capture_output=True,
                          text=True)


def _refused(proc: subprocess.CompletedProcess, match: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], proc.stderr


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Path:
    """pydicom's 5-slice CT series as a NIfTI file with its own (LPS-ordered) affine and an sform code 1."""
    vol = read_volume(fx.CT5N)
    path = tmp_path_factory.mktemp("ct") / "ct.nii.gz"
    img = nib.Nifti1Image(vol.array, vol.affine)
    img.set_sform(vol.affine, code=1)
    nib.save(img, path)
    return path


@pytest.fixture(scope="module")
def hbformer_file(tmp_path_factory) -> Path:
    """A random-weight HBFormer saved as lzeeorno/HBFormer's train_synapse.py saves best_dice.pth (a small Swin)."""
    torch.manual_seed(0)
    net = HBFormer(HBFormerConfig(num_classes=9, img_size=224, feature_size=8, embed_dim=16, depths=(1, 1, 1, 1),
                                  num_heads=(1, 1, 2, 2)))
    with torch.no_grad():  # weights large enough that the label map is not one class (timm's init nearly is)
        for p in net.parameters():
            if p.ndim >= 2:
                p.normal_(0, 1.5 / p[0].numel() ** 0.5)
    path = tmp_path_factory.mktemp("hb") / "HBFormer_Synapse.pth"
    torch.save(net.state_dict(), path)
    return path


def synapse_reference(net: HBFormer, array: np.ndarray) -> np.ndarray:
    """The official test protocol re-stated: the volume as TransUNet's h5 stores it ((z, y, x): the NIfTI array
    transposed), HU clipped to [-125, 275] and scaled to [0, 1], each slice zoomed (order 3) to img_size,
    argmax, zoomed back (order 0)."""
    image = np.clip(array.astype(np.float32), -125, 275)
    image = ((image + 125) / 400).astype(np.float32).transpose(2, 1, 0)
    s = net.config.img_size
    out = np.zeros(image.shape, dtype=np.uint8)
    for ind, sl in enumerate(image):
        x, y = sl.shape
        z = zoom(sl, (s / x, s / y), order=3).astype(np.float32)
        with torch.no_grad():
            pred = net.eval()(torch.from_numpy(z)[None, None]).argmax(1)[0].numpy()
        out[ind] = zoom(pred, (x / s, y / s), order=0)
    return out.transpose(2, 1, 0)


def test_hbformer_synapse_weights_with_the_preset(ct, hbformer_file, tmp_path, capsys):
    from apps import segment

    out = tmp_path / "seg.nii.gz"
    assert segment.main([str(a) for a in ("--model", hbformer_file, "--preset", "synapse", ct, "-o", out,
                                          "--quiet")]) == 0
    report = capsys.readouterr().out
    written, source = nib.load(str(out)), nib.load(str(ct))
    assert np.array_equal(written.affine, source.affine) and written.shape == source.shape
    labels = np.asarray(written.dataobj)
    assert labels.min() >= 0 and labels.max() <= 8 and len(np.unique(labels)) >= 2
    from segmentation.hbformer import from_official

    net = from_official(torch.load(hbformer_file, weights_only=True))
    assert np.array_equal(labels, synapse_reference(net, np.asarray(source.dataobj)))
    for organ in ("aorta", "gallbladder", "left_kidney", "right_kidney", "liver", "pancreas", "spleen", "stomach"):
        assert organ in report
    # the preset's preparation is part of the model once saved
    from segmentation.presets import apply_preset
    from vision.hub import from_pretrained, save_pretrained

    seg = apply_preset(net, "synapse")
    again = from_pretrained(save_pretrained(seg, tmp_path / "saved"))
    assert again.config == seg.config and again.config.inference == "resize_slices"
    vol = read_volume(ct)
    assert np.array_equal(again.segment(vol.array, vol.affine), labels)


def _one_line(error_type, match: str, argv: list) -> None:
    """In-process (run() turns these into one `error:` line and exit 2, as the subprocess tests show)."""
    from apps import segment

    with pytest.raises(error_type, match=match) as info:
        segment.main([str(a) for a in argv])
    assert "\n" not in str(info.value)


def test_a_bare_network_needs_a_preset(ct, hbformer_file, tmp_path):
    out = tmp_path / "seg.nii.gz"
    _one_line(UserError, r"is a bare HBFormer checkpoint: it does not say how scans are prepared for it; pass "
              r"--preset NAME, one of: synapse \(", ["--model", hbformer_file, ct, "-o", out])
    assert not out.exists()


def test_nnunet_result_folder_and_checkpoint(ct, tmp_path, capsys):
    from apps import segment

    folder = fx.write_result_folder(tmp_path, "ct3d")
    out = tmp_path / "seg.nii.gz"
    assert segment.main([str(a) for a in ("--model", folder, ct, "-o", out, "--folds", "0", "--tta", "--quiet")]) == 0
    written = nib.load(str(out))
    assert written.shape == (16, 16, 5) and np.array_equal(written.affine, nib.load(str(ct)).affine)
    assert np.array_equal(np.asarray(written.dataobj), np.load(fx.REFERENCE)["ct3d/labels_tta"])
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in table[3:]] == ["background", "liver", "spleen", "kidney"]  # dataset.json
    single = tmp_path / "single.nii.gz"
    assert segment.main([str(a) for a in ("--model", folder / "fold_0" / "checkpoint_final.pth", ct, "-o", single,
                                          "--quiet")]) == 0
    assert np.array_equal(np.asarray(nib.load(str(single)).dataobj), np.load(fx.REFERENCE)["ct3d/labels_plain"])


def test_unusable_models_are_one_line_and_write_nothing(ct, tmp_path):
    from vision.hub import HubError

    out = tmp_path / "out" / "seg.nii.gz"
    out.parent.mkdir()
    (tmp_path / "garbage.pth").write_text("not a checkpoint\n" * 20)
    _refused(_run("--model", tmp_path / "garbage.pth", ct, "-o", out), "not a readable PyTorch checkpoint")
    no_plans = fx.write_result_folder(tmp_path / "a", "ct3d", plans_file=False)
    _one_line(HubError, "no plans.json", ["--model", no_plans, ct, "-o", out])
    folder = fx.write_result_folder(tmp_path / "b", "ct3d")
    _one_line(HubError, "fold 4 is missing", ["--model", folder, ct, "-o", out, "--folds", "0,4"])
    _one_line(UserError, "--folds '0,x'", ["--model", folder, ct, "-o", out, "--folds", "0,x"])
    _one_line(UserError, "already says how scans are prepared", ["--model", folder, ct, "-o", out, "--preset", "synapse"])
    bare = tmp_path / "neunet_weights.pth"
    torch.save(fx.network("ct3d", 0).state_dict(), bare)
    _one_line(UserError, "preset synapse: preset 'synapse' runs a 2-D network", ["--model", bare, ct, "-o", out,
                                                                                "--preset", "synapse"])
    assert not any(out.parent.iterdir())

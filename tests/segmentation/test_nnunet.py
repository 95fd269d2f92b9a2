"""nnU-Net v2 inference re-implemented (segmentation/nnunet.py) against values recorded from nnunetv2 2.8.1.

tests/data/nnunet_reference.npz was written by running nnU-Net's own code in a scratch environment
(never imported here) on the volumes, plans and weights of tests/helpers/nnunet_fixtures.py:

- ``<case>/input``: DefaultPreprocessor.run_case_npy on the image as SimpleITKIO read it (the
  network's input after transpose, crop, normalisation and resampling) and ``<case>/bbox``;
- ``<case>/logits_plain``: nnUNetPredictor.predict_logits_from_preprocessed_data on that input;
- ``<case>/labels_{plain,tta}``: nnUNetPredictor.predict_single_npy_array (preprocessing, sliding
  window, fold averaging, export), without and with mirroring;

the logits and those labels with the predictor's float16 accumulators and Gaussian switched to
float32, and ``<case>/labels_fp16_plain`` from the unchanged float16 predictor. The volumes are real:
pydicom's 5-slice CT series (CT5N) and nibabel's anatomical.nii MR volume.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from segmentation.io import read_volume
from segmentation.neunet import NeUNet
from segmentation.nnunet import (NnUNetPlan, NnUNetSegmenter, compute_new_shape, load_result_folder, preprocess,
                                 resample)
from tests.helpers import nnunet_fixtures as fx
from vision.hub import HubError, resolve_model


@pytest.fixture(scope="module")
def reference():
    return np.load(fx.REFERENCE)


def _plan(case: str) -> NnUNetPlan:
    return NnUNetPlan.from_json(fx.plans(case), fx.dataset_json(case), fx.CASES[case]["configuration"], case)


@pytest.mark.parametrize("case", list(fx.CASES))
def test_preprocessing_equals_nnunet(reference, case):
    """Same resampled, normalised network input as nnU-Net's preprocessor (CT clip + dataset z-score with
    anisotropic separate-z resampling, 2-D configuration, per-case z-score, transposes, crop + masked z-score)."""
    vol = fx.read_case_volume(fx.CASES[case]["volume"])
    prepared = preprocess(vol.array, vol.affine, _plan(case))
    want = reference[f"{case}/input"]
    assert prepared.data.shape == want.shape and prepared.data.dtype == np.float32
    assert np.abs(prepared.data - want).max() <= 1e-4
    assert prepared.bbox == reference[f"{case}/bbox"].tolist()
    assert np.std(want) > 0.5  # the values are informative, not a constant


@pytest.mark.parametrize("case", ["ct3d", "ct2d"])
def test_sliding_window_logits_equal_nnunet(reference, case):
    """nnU-Net's window placement, Gaussian and 2-D slicing: the blended logits of its predictor (float32)."""
    seg = NnUNetSegmenter([fx.network(case, f) for f in fx.CASES[case]["folds"]], _plan(case),
                          mirror_axes=fx.CASES[case]["mirror"])
    logits = seg.predict_logits(reference[f"{case}/input"]).numpy()
    want = reference[f"{case}/logits_plain"]
    assert logits.shape == want.shape
    assert np.abs(logits - want).max() <= 1e-4 < np.abs(want).max() / 100


@pytest.mark.parametrize("case", list(fx.CASES))
def test_result_folder_labels_equal_nnunet(reference, tmp_path, case):
    """The whole predictor on a result folder: same labels on the input grid as nnU-Net's own (its float32
    accumulation), with and without mirroring, the folds' logits averaged (mr3d has two)."""
    c = fx.CASES[case]
    folder = fx.write_result_folder(tmp_path, case)
    model = resolve_model(folder, kind="segmenter")
    assert isinstance(model, NnUNetSegmenter) and model.folds == tuple(str(f) for f in c["folds"])
    assert model.config.class_names == ("background", "liver", "spleen", "kidney")
    vol = fx.read_case_volume(c["volume"])
    for tag in ("plain", "tta"):
        labels = model.segment(vol.array, vol.affine, tta=tag == "tta")
        want = reference[f"{case}/labels_{tag}"]
        assert labels.shape == vol.array.shape and np.array_equal(labels, want), (tag, int((labels != want).sum()))
    # nnU-Net's usual float16 accumulation flips a few near-tied voxels, no more
    fp16 = reference[f"{case}/labels_fp16_plain"]
    assert (model.segment(vol.array, vol.affine) != fp16).mean() < 0.005
    assert len(np.unique(reference[f"{case}/labels_plain"])) >= 3  # a test with teeth: several classes


def test_one_fold_of_two_is_not_the_average(reference, tmp_path):
    folder = fx.write_result_folder(tmp_path, "mr3d")
    vol = fx.read_case_volume("anatomical")
    one = resolve_model(folder, kind="segmenter", folds=["1"]).segment(vol.array, vol.affine)
    assert (one != reference["mr3d/labels_plain"]).mean() > 0.01


def test_checkpoint_final_alone_carries_plans_and_dataset(reference, tmp_path):
    """fold_0/checkpoint_final.pth on its own (init_args hold plans, dataset.json, configuration), read with
    weights_only (its logging holds numpy scalars)."""
    folder = fx.write_result_folder(tmp_path, "ct3d")
    model = resolve_model(folder / "fold_0" / "checkpoint_final.pth", kind="segmenter")
    assert isinstance(model, NnUNetSegmenter) and model.mirror_axes == (0, 1, 2)
    vol = read_volume(fx.CT5N)
    assert np.array_equal(model.segment(vol.array, vol.affine), reference["ct3d/labels_plain"])


def test_bare_state_dict_is_a_bare_network(tmp_path):
    torch.save(fx.network("ct3d", 0).state_dict(), tmp_path / "weights.pth")
    net = resolve_model(tmp_path / "weights.pth", kind="segmenter")
    assert isinstance(net, NeUNet) and net.config.strides == fx.CASES["ct3d"]["strides"]


def test_plans_in_the_2_1_layout_neunet_released(tmp_path):
    """neU-Net's released plans (nnU-Net 2.1.1) name strides pool_op_kernel_sizes, with no architecture block."""
    plans = fx.plans("ct3d")
    conf = plans["configurations"]["3d_fullres"]
    arch = conf.pop("architecture")["arch_kwargs"]
    conf.update(UNet_class_name="neUNet", UNet_base_num_features=4, pool_op_kernel_sizes=arch["strides"],
                conv_kernel_sizes=arch["kernel_sizes"], n_conv_per_stage_encoder=arch["n_conv_per_stage"],
                n_conv_per_stage_decoder=arch["n_conv_per_stage_decoder"], unet_max_num_features=320)
    assert NnUNetPlan.from_json(plans, fx.dataset_json("ct3d"), "3d_fullres", "old") == _plan("ct3d")
    plans["configurations"]["3d_lowres"] = {"inherits_from": "3d_fullres", "spacing": [2.0, 1.0, 1.0]}
    low = NnUNetPlan.from_json(plans, fx.dataset_json("ct3d"), "3d_lowres", "old")
    assert low.spacing == (2.0, 1.0, 1.0) and low.patch_size == (8, 8, 8)


def test_resampling_rules():
    """nnU-Net's shape rule (Python rounding of spacing ratio x shape) and its separate-z choice."""
    assert compute_new_shape((5, 16, 16), (2.5, 0.48828, 0.48828), (1.0, 0.6, 0.6)) == (12, 13, 13)  # 12.5 -> 12
    x = np.arange(2 * 4 * 6, dtype=np.float32).reshape(1, 2, 4, 6)
    # anisotropic (3.0 / 0.5 > 3): nearest along the first axis, so each output slice repeats an input slice
    out = resample(x, (4, 8, 12), (3.0, 0.5, 0.5), (1.5, 0.25, 0.25))
    assert np.array_equal(out[0, 0], out[0, 1]) and np.array_equal(out[0, 2], out[0, 3])
    assert not np.array_equal(out[0, 1], out[0, 2])
    # isotropic: cubic in 3-D, clipped to the input's range
    iso = resample(x, (4, 8, 12), (1.0, 1.0, 1.0), (0.5, 0.5, 0.5))
    assert iso.min() >= x.min() and iso.max() <= x.max() and not np.array_equal(iso[0, 0], iso[0, 1])


def _expect(match: str, fn, *args, **kwargs):
    with pytest.raises(HubError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_unusable_folders_and_files_say_why_in_one_line(tmp_path):
    folder = fx.write_result_folder(tmp_path / "a", "ct3d")
    _expect(r"fold 3 is missing \(no fold_3/checkpoint_final.pth\); folds present: 0", resolve_model, folder,
            kind="segmenter", folds=["0", "3"])
    no_plans = fx.write_result_folder(tmp_path / "b", "ct3d", plans_file=False)
    _expect("no plans.json; an nnU-Net result folder holds plans.json, dataset.json and fold_N", resolve_model,
            no_plans, kind="segmenter")
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect(r"not a save_pretrained folder .* \(tried: nnunet-results\)", resolve_model, empty, kind="segmenter")
    (tmp_path / "garbage.pth").write_bytes(b"GIF89a, not a checkpoint at all\n" * 10)
    _expect("not a readable PyTorch checkpoint", resolve_model, tmp_path / "garbage.pth", kind="segmenter")
    torch.save({"network_weights": {"encoder.stages.0.0.convs.0.conv.weight": torch.zeros(1)}}, tmp_path / "x.pth")
    _expect(r"not a segmenter checkpoint of any family .*neunet", resolve_model, tmp_path / "x.pth", kind="segmenter")
    _expect("only apply to a released result folder", resolve_model, folder / "fold_0" / "checkpoint_final.pth",
            kind="segmenter", folds=["0"])
    # a plain nnU-Net (PlainConvUNet) fold: Tessera has no such network
    plain = fx.write_result_folder(tmp_path / "c", "ct3d")
    ckpt = fx.checkpoint("ct3d", 0)
    ckpt["network_weights"] = {"encoder.stages.0.0.convs.0.conv.weight": torch.zeros(4, 1, 1, 3, 3),
                               "decoder.transpconvs.0.weight": torch.zeros(8, 4, 2, 2, 2)}
    torch.save(ckpt, plain / "fold_0" / "checkpoint_final.pth")
    _expect("not a neU-Net checkpoint", load_result_folder, plain)


@pytest.mark.parametrize("edit, match", [
    (lambda p, d: d["labels"].update(liver=[1, 2]), "region-based"),
    (lambda p, d: p["configurations"]["3d_fullres"].update(normalization_schemes=["MyNorm"]), "MyNorm"),
    (lambda p, d: p.update(image_reader_writer="Tiff3DIO"), "Tiff3DIO"),
    (lambda p, d: p["configurations"]["3d_fullres"].update(previous_stage="3d_lowres"), "cascade"),
    (lambda p, d: p.update(transpose_backward=[0, 1, 2], transpose_forward=[2, 0, 1]), "inverse permutations"),
])
def test_plans_tessera_cannot_reproduce_are_refused(tmp_path, edit, match):
    folder = fx.write_result_folder(tmp_path, "ct3d")
    plans, dataset = fx.plans("ct3d"), fx.dataset_json("ct3d")
    edit(plans, dataset)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    _expect(match, resolve_model, folder, kind="segmenter")


def test_classes_must_match_the_network(tmp_path):
    folder = fx.write_result_folder(tmp_path, "ct3d")
    dataset = fx.dataset_json("ct3d")
    dataset["labels"]["lesion"] = 4
    (folder / "dataset.json").write_text(json.dumps(dataset))
    _expect("predicts 4 classes, dataset.json names 5", resolve_model, folder, kind="segmenter")


def test_nibabel_reorienting_reader_is_simpleitk_order_of_the_ras_volume(tmp_path):
    """Plans read with NibabelIOWithReorient: the scan reoriented to RAS, then as SimpleITKIO would read that
    file; the labels come back on the scan's own (LAS) grid."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    vol = fx.read_case_volume("anatomical")
    plans = fx.plans("mr3d")
    nets = [fx.network("mr3d", f) for f in fx.CASES["mr3d"]["folds"]]
    sitk_plan = NnUNetPlan.from_json(plans, fx.dataset_json("mr3d"), "3d_fullres", "sitk")
    plans["image_reader_writer"] = "NibabelIOWithReorient"
    nib_plan = NnUNetPlan.from_json(plans, fx.dataset_json("mr3d"), "3d_fullres", "nib")
    labels = NnUNetSegmenter(nets, nib_plan, mirror_axes=None).segment(vol.array, vol.affine)
    to_ras = ornt_transform(io_orientation(vol.affine), axcodes2ornt("RAS"))
    assert not np.array_equal(to_ras, axcodes2ornt("RAS"))  # anatomical.nii is LAS: the reader has work to do
    ras = np.asarray(apply_orientation(vol.array, to_ras))
    ras_affine = vol.affine @ inv_ornt_aff(to_ras, vol.array.shape)
    want = NnUNetSegmenter(nets, sitk_plan, mirror_axes=None).segment(ras, ras_affine)
    back = ornt_transform(axcodes2ornt("RAS"), io_orientation(vol.affine))
    assert np.array_equal(labels, np.asarray(apply_orientation(want, back)))


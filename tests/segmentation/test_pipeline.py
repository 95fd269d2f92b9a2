"""Segmenter (config round trip, orientation, resampling, intensity), losses vs MONAI, patch sampling, evaluation."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from segmentation.dataset import PatchDataset, case_name, find_cases, read_dataset_json
from segmentation.evaluation import evaluate_folders, format_table
from segmentation.inference import sliding_window_inference
from segmentation.intensity import CTStatistics, normalize_ct, resample_to_shape, resample_to_spacing
from segmentation.losses import DeepSupervisionLoss, DiceCELoss, deep_supervision_weights
from segmentation.metrics import dice_per_class, hd95_per_class
from segmentation.neunet import NeUNet, NeUNetConfig
from segmentation.pipeline import Segmenter, SegmenterConfig, keep_largest_component
from vision.data.phantom import make_phantom
from vision.hub import from_pretrained, save_pretrained

STATS = dict(ct_lower=-90.0, ct_upper=230.0, ct_mean=80.0, ct_std=55.0)


def _net(classes: int = 3, in_channels: int = 1) -> NeUNet:
    torch.manual_seed(0)
    return NeUNet(NeUNetConfig(in_channels=in_channels, num_classes=classes, features=(4, 8),
                               strides=((1, 1, 1), (2, 2, 2)), kernel_sizes=None, wavelet_inputs=False)).eval()


def _segmenter(**kw) -> Segmenter:
    fields = dict(class_names=("background", "a", "b"), window=(16, 16, 8), intensity="ct", **STATS)
    fields.update(kw)
    return Segmenter.wrap(_net(len(fields["class_names"])), **fields).eval()


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(3, shape=(40, 36, 20), n_organs=2, n_lesions=1)


def test_save_pretrained_round_trips_config_and_labels(tmp_path, phantom):
    seg = _segmenter(spacing=(1.5, 1.5, 3.0), overlap=0.25)
    save_pretrained(seg, tmp_path / "m")
    back = from_pretrained(tmp_path / "m")
    assert isinstance(back, Segmenter) and back.config == seg.config
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architecture"] == "segmenter"
    image, _ = phantom
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    assert np.array_equal(back.segment(image, affine), seg.segment(image, affine))


def test_segment_equals_monai_sliding_window_on_prepared_input(phantom):
    monai = pytest.importorskip("monai.inferers")
    seg = _segmenter(orientation=None)
    image, _ = phantom
    x = torch.from_numpy(normalize_ct(image, CTStatistics(-90.0, 230.0, 80.0, 55.0)))[None, None]
    with torch.no_grad():
        logits = monai.sliding_window_inference(x, (16, 16, 8), 4, seg.net, overlap=0.5, mode="gaussian")[0]
    labels = seg.segment(image, np.eye(4))
    assert labels.dtype == np.uint8 and labels.shape == image.shape
    assert np.array_equal(labels, logits.argmax(0).numpy())


def test_orientation_is_undone(phantom):
    """The same anatomy stored LPS (x and y reversed) gives the same labels, reversed back."""
    seg = _segmenter()
    image, _ = phantom
    ras = np.diag([1.5, 1.5, 3.0, 1.0])
    lps = ras.copy()
    lps[:2, :2] *= -1
    lps[:2, 3] = [1.5 * (image.shape[0] - 1), 1.5 * (image.shape[1] - 1)]  # voxel (0,0,0) at the far corner
    flipped = np.ascontiguousarray(image[::-1, ::-1])
    np.testing.assert_allclose(lps @ [image.shape[0] - 1, image.shape[1] - 1, 0, 1], ras @ [0, 0, 0, 1])
    a = seg.segment(image, ras)
    b = seg.segment(flipped, lps)
    assert np.array_equal(b, a[::-1, ::-1])
    # and a transposed file (axes y, x, z) maps back too
    swap = ras[:, [1, 0, 2, 3]]
    c = seg.segment(np.ascontiguousarray(image.transpose(1, 0, 2)), swap)
    assert np.array_equal(c, a.transpose(1, 0, 2))


def test_resampling_to_the_model_spacing_and_back(phantom):
    seg = _segmenter(spacing=(2.0, 2.0, 4.0), orientation=None)
    image, _ = phantom
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    labels = seg.segment(image, affine)
    x = resample_to_spacing(image, (1.0, 1.0, 2.0), (2.0, 2.0, 4.0))
    assert x.shape == (20, 18, 10)
    coarse = sliding_window_inference(torch.from_numpy(seg.normalize(x))[None], seg.net, (16, 16, 8), overlap=0.5)
    assert labels.shape == image.shape
    assert np.array_equal(labels, resample_to_shape(coarse.numpy(), image.shape, is_label=True))


def test_intensity_modes(phantom):
    image, _ = phantom
    seg = _segmenter(intensity="ct_window")
    out = seg.normalize(image)
    assert out.min() == 0.0 and out.max() <= 1.0
    np.testing.assert_allclose(out, (np.clip(image, -90, 230) + 90) / 320, atol=1e-6)
    z = _segmenter(intensity="zscore").normalize(image)
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1) < 1e-4
    np.testing.assert_array_equal(_segmenter().normalize(image), normalize_ct(image, CTStatistics(-90.0, 230.0, 80.0, 55.0)))


def test_config_validation():
    with pytest.raises(ValueError, match="class names"):
        Segmenter.wrap(_net(3), class_names=("bg", "a"), window=(16, 16, 8), intensity="none")
    with pytest.raises(ValueError, match="divisible"):
        _segmenter(window=(15, 16, 8))
    with pytest.raises(ValueError, match="statistics"):
        SegmenterConfig(intensity="ct")
    with pytest.raises(ValueError, match="orientation"):
        SegmenterConfig(intensity="none", orientation="RRS")
    with pytest.raises(ValueError, match="input channels"):
        Segmenter.wrap(_net(3, in_channels=2), class_names=("a", "b", "c"), window=(8, 8, 8),
                       intensity="none").segment(np.zeros((8, 8, 8)), np.eye(4))


def test_largest_component_postprocessing(phantom):
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[1:4, 1:4, 1:4] = 1
    lab[4, 4, 4] = 1  # touches the block's corner: the same component under 26-connectivity
    lab[7, 7, 7] = 1  # a stray voxel
    lab[5:7, 0, 0] = 2
    lab[0, 9, 9] = 2
    out = keep_largest_component(lab, [1])
    expected = lab.copy()
    expected[7, 7, 7] = 0
    assert np.array_equal(out, expected) and lab[7, 7, 7] == 1  # class 2 untouched, input not modified
    seg = _segmenter(largest_component=(1, 2))
    image, _ = phantom
    raw = seg.segment(image, np.eye(4), postprocess=False)
    assert np.array_equal(seg.segment(image, np.eye(4)), keep_largest_component(raw, [1, 2]))
    with pytest.raises(ValueError, match="foreground classes"):
        _segmenter(largest_component=(3,))


# ----------------------------------------------------------------------------------------------- losses

@pytest.mark.parametrize("batch,background", [(True, False), (False, True), (False, False)])
def test_dice_ce_matches_monai(batch, background):
    monai_losses = pytest.importorskip("monai.losses")
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 6, 7, 4, generator=g, requires_grad=True)
    target = torch.randint(0, 5, (3, 6, 7, 4), generator=g)
    target[0] = 0  # an image without foreground
    ref = monai_losses.DiceCELoss(include_background=background, to_onehot_y=True, softmax=True, batch=batch,
                                  smooth_nr=1e-5, smooth_dr=1e-5)(logits, target[:, None])
    mine = DiceCELoss(include_background=background, batch=batch)(logits, target)
    torch.testing.assert_close(mine, ref, rtol=1e-6, atol=1e-6)
    g1, = torch.autograd.grad(mine, logits)
    g2, = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)


def test_deep_supervision_weights_and_targets():
    assert deep_supervision_weights(1) == [1.0]
    np.testing.assert_allclose(deep_supervision_weights(4), [4 / 7, 2 / 7, 1 / 7, 0.0])
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 8, 8, 4), generator=g)
    outs = [torch.randn(2, 3, 8, 8, 4, generator=g), torch.randn(2, 3, 4, 4, 2, generator=g),
            torch.randn(2, 3, 2, 2, 1, generator=g)]
    base = DiceCELoss()
    expected = 2 / 3 * base(outs[0], target) + 1 / 3 * base(outs[1], target[:, 1::2, 1::2, 1::2])
    torch.testing.assert_close(DeepSupervisionLoss(base)(outs, target), expected)


# ----------------------------------------------------------------------------------------------- data

def test_patch_sampling_is_seeded_and_oversamples_foreground(phantom):
    image, labels = phantom
    lesion = int(labels.max())
    data = PatchDataset([image], [labels], (16, 16, 8), num_classes=lesion + 1, samples_per_epoch=10, fg_fraction=1.0)
    a = data.sample(3, torch.Generator().manual_seed(7))
    b = data.sample(3, torch.Generator().manual_seed(7))
    assert a[0].shape == (1, 16, 16, 8) and a[1].shape == (16, 16, 8) and a[1].dtype == torch.int64
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], data.sample(3, torch.Generator().manual_seed(8))[0])
    # a large class far from a one-voxel class: foreground patches pick the class uniformly (1/2 each),
    # random patches see the single voxel only when they happen to cover it (8 of 113 positions)
    lab = np.zeros((128, 16, 8), np.uint8)
    lab[:40] = 1
    lab[120, 8, 4] = 2
    img = lab.astype(np.float32)
    frac = {}
    for fg in (1.0, 0.0):
        ds = PatchDataset([img], [lab], (16, 16, 8), num_classes=3, fg_fraction=fg, mirror=False)
        draws = [ds.sample(0, torch.Generator().manual_seed(s))[1] for s in range(200)]
        frac[fg] = sum(bool((d == 2).any()) for d in draws) / len(draws)
        if fg == 1.0:
            assert all(bool((d > 0).any()) for d in draws)
    assert 0.38 < frac[1.0] < 0.62 and frac[0.0] < 0.15
    # 2-D patches: one slice
    flat = PatchDataset([image], [labels], (16, 16), num_classes=lesion + 1)
    x, y = flat.sample(0, torch.Generator().manual_seed(0))
    assert x.shape == (1, 16, 16) and y.shape == (16, 16)


def _write(path, data, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)


def test_find_cases_and_dataset_json(tmp_path):
    aff = np.eye(4)
    for n in ("b", "a"):
        _write(tmp_path / "imagesTr" / f"{n}_0000.nii.gz", np.zeros((4, 4, 4), np.int16), aff)
        _write(tmp_path / "labelsTr" / f"{n}.nii.gz", np.zeros((4, 4, 4), np.uint8), aff)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1},
                                                       "channel_names": {"0": "CT"}}))
    cases = find_cases(tmp_path)
    assert [c.name for c in cases] == ["a", "b"] and cases[0].label.name == "a.nii.gz"
    meta = read_dataset_json(tmp_path)
    assert meta["class_names"] == ["background", "liver"] and meta["modality_name"] == "CT"
    assert case_name("x_0000.nii.gz") == "x" and case_name("x_0000.nii", image=False) == "x_0000"
    _write(tmp_path / "imagesTr" / "c_0000.nii.gz", np.zeros((4, 4, 4), np.int16), aff)
    with pytest.raises(ValueError, match="without a label.*'c'"):
        find_cases(tmp_path)


# ----------------------------------------------------------------------------------------------- evaluation

def test_evaluate_folders_matches_metrics(tmp_path):
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    expected = []
    for seed in (0, 1):
        _, truth = make_phantom(seed, shape=(40, 36, 20), n_organs=2, n_lesions=2)
        pred = np.roll(truth, 1, axis=0)
        pred[pred == 3] = 0  # every lesion missed in the prediction
        _write(tmp_path / "truth" / f"case{seed}.nii.gz", truth, affine)
        _write(tmp_path / "pred" / f"case{seed}.nii.gz", pred, affine)
        expected.append((dice_per_class(pred, truth, 4, include_background=False),
                         hd95_per_class(pred, truth, 4, spacing=(1.5, 1.5, 3.0))))
    result = evaluate_folders(tmp_path / "pred", tmp_path / "truth", class_names=["bg", "liver", "spleen", "lesion"])
    s = result.summary()
    assert s["liver"]["dice"] == pytest.approx(np.mean([e[0][0] for e in expected]))
    assert s["spleen"]["hd95_mm"] == pytest.approx(np.mean([e[1][1] for e in expected]))
    assert s["lesion"]["dice"] == 0 and s["lesion"]["hd95_inf_cases"] == 2 and s["lesion"]["detected"] == 0
    assert s["lesion"]["components"] == 4 and s["liver"]["detected"] == s["liver"]["components"] == 2
    assert "lesion" in format_table(result) and result.flat_metrics()["hd95_inf_cases_lesion"] == 2
    # class names from an nnU-Net dataset.json beside the ground-truth folder
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "l": 1, "s": 2, "t": 3}}))
    assert list(evaluate_folders(tmp_path / "pred", tmp_path / "truth").summary()) == ["l", "s", "t"]
    _write(tmp_path / "pred" / "case1.nii.gz", np.zeros((40, 36, 20), np.uint8), np.eye(4))
    with pytest.raises(ValueError, match="affines"):
        evaluate_folders(tmp_path / "pred", tmp_path / "truth")


def test_2d_network_runs_slice_by_slice(phantom):
    from segmentation.hbformer import HBFormer, HBFormerConfig

    torch.manual_seed(0)
    net = HBFormer(HBFormerConfig(num_classes=3, img_size=32, embed_dim=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                                  feature_size=8, drop_path_rate=0.0))
    seg = Segmenter.wrap(net, class_names=("background", "a", "b"), window=(32, 32), intensity="ct_window",
                         orientation=None, **STATS).eval()
    image = phantom[0][4:36, 2:34, :5]
    labels = seg.segment(image, np.eye(4))
    x = torch.from_numpy(seg.normalize(image)).permute(2, 0, 1)[:, None]  # slices as a batch
    with torch.no_grad():
        expected = net(x).argmax(1).permute(1, 2, 0).numpy()
    assert seg.spatial_dims == 2 and np.array_equal(labels, expected)

"""nnU-Net v2 result folders and checkpoints written the way nnU-Net writes them, for tests.

Shared by tests/segmentation/test_nnunet.py and the script that recorded tests/data/nnunet_reference.npz
(nnU-Net 2.8.1's own preprocessing and predictor, run in a scratch environment on the same volumes, plans
and network weights). Everything here is deterministic without torch's RNG: weights come from
numpy's RandomState, whose streams numpy keeps stable across versions.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from pydicom.data import get_testdata_files

from segmentation.neunet import NeUNet, NeUNetConfig

ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"  # MR, 33x41x25, 2 mm, LAS, int16
CT5N = Path(sorted(get_testdata_files("dicomdirtests/98892001/CT5N/*"))[0]).parent  # CT, 16x16x5, 0.49x0.49x2.5 mm
REFERENCE = Path(__file__).resolve().parent.parent / "data" / "nnunet_reference.npz"

CLASSES = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3}
CT_PROPERTIES = {"max": 3071.0, "mean": 20.0, "median": 30.0, "min": -1024.0,
                 "percentile_00_5": -830.0, "percentile_99_5": 50.0, "std": 150.0}

# name -> (volume, configuration, plans fields, network strides, mirror axes, folds)
CASES = {
    # anisotropic CT (2.5 / 0.49 mm > 3): in-plane cubic, nearest along z; clipped and z-scored with dataset stats
    "ct3d": dict(volume="ct5n", configuration="3d_fullres", transpose=(0, 1, 2), spacing=(1.0, 0.6, 0.6),
                 patch=(8, 8, 8), norm="CTNormalization", mask=False,
                 strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)), mirror=(0, 1, 2), folds=(0,)),
    # the same scan through a 2-D configuration: slices along the first (transposed) axis, z kept
    "ct2d": dict(volume="ct5n", configuration="2d", transpose=(0, 1, 2), spacing=(0.6, 0.6),
                 patch=(8, 8), norm="CTNormalization", mask=False,
                 strides=((1, 1), (2, 2), (2, 2)), mirror=(0, 1), folds=(0,)),
    # isotropic MR, z-score per case, a transpose that reverses the axes, two folds averaged
    "mr3d": dict(volume="anatomical", configuration="3d_fullres", transpose=(2, 1, 0), spacing=(3.5, 3.5, 3.5),
                 patch=(16, 16, 16), norm="ZScoreNormalization", mask=False,
                 strides=((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)), mirror=(0, 1, 2), folds=(0, 1)),
    # MR padded with zeros: cropped to the non-zero box, z-scored inside the mask only, mirroring on 2 axes
    "mr_crop": dict(volume="anatomical_padded", configuration="3d_fullres", transpose=(1, 0, 2),
                    spacing=(4.0, 4.0, 4.0), patch=(16, 16, 16), norm="ZScoreNormalization", mask=True,
                    strides=((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)), mirror=(1, 2), folds=(0,)),
}


def anatomical_padded(array: np.ndarray) -> np.ndarray:
    """The MR volume inside a zero border (and a zero hole that binary_fill_holes closes)."""
    out = np.pad(array, ((3, 2), (0, 4), (2, 0)))
    out[15:18, 20:23, 12:14] = 0
    return out


def network_config(case: str) -> NeUNetConfig:
    c = CASES[case]
    dims = len(c["patch"])
    n = len(c["strides"])
    kernels = tuple((1, 3, 3) if dims == 3 and s == 0 else (3,) * dims for s in range(n))
    return NeUNetConfig(spatial_dims=dims, in_channels=1, num_classes=len(CLASSES),
                        features=tuple(4 * (s + 1) for s in range(n)), strides=c["strides"], kernel_sizes=kernels,
                        n_conv_per_stage=1, n_conv_per_stage_decoder=1, wavelet_inputs=True)


def numpy_weights(net: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A state dict drawn from numpy's RandomState(seed): He-scaled convolutions, norms near 1 / 0."""
    rs = np.random.RandomState(seed)
    out = {}
    for key, value in sorted(net.state_dict().items()):
        shape = tuple(value.shape)
        if not value.is_floating_point():
            out[key] = value.clone()
        elif key.endswith("norm.weight"):
            out[key] = torch.from_numpy(1 + 0.1 * rs.standard_normal(shape)).float()
        elif value.ndim >= 3:
            fan_in = int(np.prod(shape[1:]))
            out[key] = torch.from_numpy(rs.standard_normal(shape) * np.sqrt(2.0 / fan_in)).float()
        else:
            out[key] = torch.from_numpy(0.1 * rs.standard_normal(shape)).float()
    return out


def network(case: str, fold: int) -> NeUNet:
    net = NeUNet(network_config(case))
    net.load_state_dict(numpy_weights(net, 1000 * (list(CASES).index(case) + 1) + fold))
    return net.eval()


def plans(case: str) -> dict:
    """A plans.json in nnU-Net v2's current layout (configurations[...]["architecture"])."""
    c = CASES[case]
    dims = len(c["patch"])
    cfg = network_config(case)
    transpose = list(c["transpose"])
    configuration = {
        "data_identifier": f"nnUNetPlans_{c['configuration']}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": list(c["patch"]),
        "median_image_size_in_voxels": [16.0] * dims,
        "spacing": list(c["spacing"]),
        "normalization_schemes": [c["norm"]],
        "use_mask_for_norm": [c["mask"]],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {
            "network_class_name": "neUNet_utils.model.neUNet",
            "arch_kwargs": {
                "n_stages": cfg.n_stages, "features_per_stage": list(cfg.features),
                "conv_op": f"torch.nn.modules.conv.Conv{dims}d",
                "kernel_sizes": [list(k) for k in cfg.kernel_sizes], "strides": [list(s) for s in cfg.strides],
                "n_conv_per_stage": [1] * cfg.n_stages, "n_conv_per_stage_decoder": [1] * (cfg.n_stages - 1),
                "conv_bias": True, "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "batch_dice": True,
    }
    return {
        "dataset_name": "Dataset042_Tiny",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": [16, 16, 16],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": transpose,
        "transpose_backward": [int(i) for i in np.argsort(transpose)],
        "configurations": {c["configuration"]: configuration},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": CT_PROPERTIES if c["norm"] == "CTNormalization" else {
            "max": 30393.0, "mean": 1000.0, "median": 900.0, "min": -610.0, "percentile_00_5": 0.0,
            "percentile_99_5": 5000.0, "std": 800.0}},
    }


def dataset_json(case: str) -> dict:
    modality = "CT" if CASES[case]["norm"] == "CTNormalization" else "T1"
    return {"channel_names": {"0": modality}, "labels": dict(CLASSES), "numTraining": 4, "file_ending": ".nii.gz"}


def checkpoint(case: str, fold: int) -> dict:
    """What nnU-Net's trainer saves as fold_N/checkpoint_final.pth (numpy scalars included, as it logs them)."""
    c = CASES[case]
    return {
        "network_weights": network(case, fold).state_dict(),
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-2, "params": []}]},
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.5)],
                    "train_losses": [np.float32(-0.4)], "lrs": [0.01], "epoch_end_timestamps": [1.0]},
        "_best_ema": np.float64(0.5),
        "current_epoch": 1000,
        "init_args": {"plans": plans(case), "configuration": c["configuration"], "fold": fold,
                      "dataset_json": dataset_json(case), "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": tuple(c["mirror"]),
    }


def write_result_folder(root: Path, case: str, folds=None, *, plans_file: bool = True) -> Path:
    """<root>/neUNetTrainer__nnUNetPlans__<configuration> as nnUNetv2_train leaves it."""
    import json

    c = CASES[case]
    folder = Path(root) / f"nnUNetTrainer__nnUNetPlans__{c['configuration']}"
    folder.mkdir(parents=True)
    if plans_file:
        (folder / "plans.json").write_text(json.dumps(plans(case), indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset_json(case), indent=2))
    for fold in (c["folds"] if folds is None else folds):
        (folder / f"fold_{fold}").mkdir()
        torch.save(checkpoint(case, fold), folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


def read_case_volume(name: str):
    """The real volume behind a case as Tessera reads it (array in file voxel order, RAS affine)."""
    from segmentation.io import Volume, read_volume

    if name == "ct5n":
        return read_volume(CT5N)
    vol = read_volume(ANATOMICAL)
    if name == "anatomical":
        return vol
    return Volume(array=anatomical_padded(vol.array), affine=vol.affine, header=None, source="padded")


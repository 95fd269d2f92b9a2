"""nnU-Net v2 results as they are: result folders, checkpoint_final.pth, and nnU-Net's own inference.

Isensee et al., "nnU-Net: a self-configuring method for deep learning-based biomedical image
segmentation" (Nature Methods 2021); official code MIC-DKFZ/nnUNet, v2 (checked against nnunetv2
2.8.1 and the 2.1.1 fork neU-Net trains in): `preprocessing/preprocessors/default_preprocessor.py`,
`preprocessing/cropping/cropping.py`, `preprocessing/normalization/default_normalization_schemes.py`,
`preprocessing/resampling/default_resampling.py`, `inference/predict_from_raw_data.py`,
`inference/sliding_window_prediction.py`, `inference/export_prediction.py`, `imageio/*`.

A trained model is a folder such as ``.../neUNetTrainer__nnUNetPlans__3d_fullres`` holding
``plans.json``, ``dataset.json`` and ``fold_N/checkpoint_final.pth`` (each checkpoint's
``init_args`` also carries the plans, the dataset.json and the configuration name, so one file is
enough). Everything a segmenter needs comes from them, and each step is nnU-Net's:

1. reading: the array in the order nnU-Net's reader gives (SimpleITK's ``(z, y, x)``: the NIfTI
   voxel order reversed, spacing reversed; ``NibabelIOWithReorient`` reorients to RAS first);
2. ``transpose_forward`` of the plans (data and spacing);
3. cropping to the bounding box of the non-zero voxels (holes filled);
4. normalisation per channel: ``CTNormalization`` (clip to the dataset's foreground
   ``percentile_00_5``/``percentile_99_5``, subtract its ``mean``, divide by its ``std``),
   ``ZScoreNormalization`` (the case's own mean/std, inside the non-zero mask when
   ``use_mask_for_norm``), ``NoNormalization``, ``RescaleTo01Normalization``;
5. resampling to the configuration's spacing: ``skimage.transform.resize`` (order 3, edge mode, no
   anti-aliasing, clipped to the input's range), and when the spacing is anisotropic (max/min > 3)
   slice by slice in-plane and nearest (order 0) along the low-resolution axis; a 2-D configuration
   keeps the slice spacing;
6. a sliding window of the plans' patch size with nnU-Net's window placement and Gaussian
   (`segmentation.inference`, ``placement="nnunet"``), mirroring over the checkpoint's
   ``inference_allowed_mirroring_axes`` when asked (``--tta``); 2-D configurations run slice by slice
   along the first axis;
7. the folds' logits averaged (nnU-Net v2's predictor averages logits, not softmax), resampled
   back to the cropped shape (order 1, nearest along a low-resolution axis), argmax, put back into
   the uncropped volume, ``transpose_backward``, and the reader's axis order undone.

Differences, deliberate: nnU-Net accumulates the window logits in float16 on the GPU; here they are
float32 (equal labels except where two classes' logits tie within float16 rounding). nnU-Net's
optional post-processing (``postprocessing.pkl``, a pickle) is not read. Region-based models and the
cascade's second stage are refused. The network must be neU-Net (the only nnU-Net-trained network
Tessera implements; `segmentation.neunet`).

This is a re-implementation, tested against values recorded from nnunetv2 2.8.1 on real volumes
(tests/data/nnunet_reference.npz); nnunetv2 itself is not a dependency.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segmentation.inference import sliding_window_inference
from vision.hub import HubError, load_official_state_dict, register_official, register_official_folder

__all__ = ["NnUNetPlan", "NnUNetSegmenter", "preprocess", "resample", "compute_new_shape", "crop_to_nonzero",
           "load_result_folder", "ANISO_THRESHOLD"]

ANISO_THRESHOLD = 3  # nnunetv2.configuration.ANISO_THRESHOLD
CHECKPOINT = "checkpoint_final.pth"
READERS = ("SimpleITKIO", "NibabelIO", "NibabelIOWithReorient")
NORMALIZATIONS = ("CTNormalization", "ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization")


# ---------------------------------------------------------------- plans + dataset.json


def configuration_of(plans: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A configuration with its ``inherits_from`` chain resolved (nnU-Net's PlansManager)."""
    configurations = plans.get("configurations", {})
    if name not in configurations:
        raise KeyError(f"configuration {name!r} is not in the plans (they have {', '.join(configurations) or 'none'})")
    conf = dict(configurations[name])
    if "inherits_from" in conf:
        parent = configuration_of(plans, conf.pop("inherits_from"))
        parent.update(conf)
        conf = parent
    return conf


def plan_strides(conf: Mapping[str, Any]) -> list[list[int]]:
    """The per-stage strides, from the current plans layout (``architecture.arch_kwargs.strides``) or the
    2.1-era one (``pool_op_kernel_sizes``, what neU-Net's released plans use)."""
    if "pool_op_kernel_sizes" in conf:
        return [list(s) for s in conf["pool_op_kernel_sizes"]]
    return [list(s) for s in conf["architecture"]["arch_kwargs"]["strides"]]


@dataclass(frozen=True)
class NnUNetPlan:
    """What inference needs from plans.json + dataset.json for one configuration (axes in nnU-Net's order)."""

    configuration: str
    reader: str
    transpose_forward: tuple[int, ...]
    transpose_backward: tuple[int, ...]
    spacing: tuple[float, ...]                 # target spacing after transpose (2 entries for 2-D)
    patch_size: tuple[int, ...]
    normalization: tuple[str, ...]             # one scheme per input channel
    use_mask_for_norm: tuple[bool, ...]
    intensity: tuple[dict, ...]                # foreground intensity properties per channel
    data_resampling: dict                      # order, order_z, force_separate_z
    probability_resampling: dict
    strides: tuple[tuple[int, ...], ...]
    class_names: tuple[str, ...]               # one per network output, background first
    channel_names: tuple[str, ...]

    @property
    def spatial_dims(self) -> int:
        return len(self.patch_size)

    @classmethod
    def from_json(cls, plans: Mapping[str, Any], dataset: Mapping[str, Any], configuration: str,
                  source: str) -> "NnUNetPlan":
        try:
            return cls._parse(plans, dataset, configuration)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            what = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str) else e
            raise HubError(f"{source}: not usable nnU-Net plans/dataset.json ({what})") from None

    @classmethod
    def _parse(cls, plans: Mapping[str, Any], dataset: Mapping[str, Any], configuration: str) -> "NnUNetPlan":
        conf = configuration_of(plans, configuration)
        if conf.get("previous_stage"):
            raise ValueError(f"{configuration!r} is a cascade stage: it needs the low-resolution stage's "
                             "segmentation as input, which Tessera does not run")
        reader = plans.get("image_reader_writer", "SimpleITKIO")
        if reader not in READERS:
            raise ValueError(f"image reader {reader!r} is not one Tessera reproduces ({', '.join(READERS)})")
        forward = tuple(int(i) for i in plans["transpose_forward"])
        backward = tuple(int(i) for i in plans["transpose_backward"])
        if sorted(forward) != [0, 1, 2] or tuple(np.argsort(forward)) != backward:
            raise ValueError(f"transpose_forward {forward} / transpose_backward {backward} are not inverse permutations")
        channels = dataset.get("channel_names", dataset.get("modality"))
        if not isinstance(channels, Mapping) or not channels:
            raise ValueError("dataset.json has no channel_names")
        channel_names = tuple(str(channels[k]) for k in sorted(channels, key=int))
        norms = tuple(str(n) for n in conf["normalization_schemes"])
        unknown = [n for n in norms if n not in NORMALIZATIONS]
        if unknown:
            raise ValueError(f"normalization {unknown[0]!r} is not one Tessera reproduces ({', '.join(NORMALIZATIONS)})")
        if len(norms) != len(channel_names):
            raise ValueError(f"{len(norms)} normalization schemes for {len(channel_names)} channels")
        props = plans.get("foreground_intensity_properties_per_channel", {})
        intensity = tuple(dict(props.get(str(c), {})) for c in range(len(channel_names)))
        for c, n in enumerate(norms):
            need = ("mean", "std", "percentile_00_5", "percentile_99_5")
            if n == "CTNormalization" and any(k not in intensity[c] for k in need):
                raise ValueError(f"CTNormalization of channel {c} needs foreground_intensity_properties_per_channel"
                                 f"[{c}] with {', '.join(need)}")
        for key in ("resampling_fn_data", "resampling_fn_probabilities"):
            if conf.get(key, "resample_data_or_seg_to_shape") != "resample_data_or_seg_to_shape":
                raise ValueError(f"{key} {conf[key]!r} is not nnU-Net's default resample_data_or_seg_to_shape")
        resampling = {k: {"order": int(kw.get("order", 3 if k == "data" else 1)), "order_z": int(kw.get("order_z", 0)),
                          "force_separate_z": kw.get("force_separate_z")}
                      for k, kw in (("data", conf.get("resampling_fn_data_kwargs", {})),
                                    ("probabilities", conf.get("resampling_fn_probabilities_kwargs", {})))}
        return cls(configuration=configuration, reader=reader, transpose_forward=forward, transpose_backward=backward,
                   spacing=tuple(float(s) for s in conf["spacing"]), patch_size=tuple(int(p) for p in conf["patch_size"]),
                   normalization=norms, use_mask_for_norm=tuple(bool(b) for b in conf.get("use_mask_for_norm",
                                                                                          [False] * len(norms))),
                   intensity=intensity, data_resampling=resampling["data"],
                   probability_resampling=resampling["probabilities"],
                   strides=tuple(tuple(int(s) for s in st) for st in plan_strides(conf)),
                   class_names=class_names_of(dataset), channel_names=channel_names)


def class_names_of(dataset: Mapping[str, Any]) -> tuple[str, ...]:
    """Names of the network's outputs from dataset.json ``labels`` ({name: id}, background 0; ``ignore`` left out)."""
    labels = dataset.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        raise ValueError("dataset.json has no labels")
    pairs = {}
    for name, value in labels.items():
        if name == "ignore":
            continue
        if isinstance(value, (list, tuple)):
            raise ValueError("region-based labels (lists of ids) are not supported")
        pairs[int(value)] = str(name)
    if sorted(pairs) != list(range(len(pairs))):
        raise ValueError(f"label ids {sorted(pairs)} are not 0..{len(pairs) - 1}")
    return tuple(pairs[i] for i in range(len(pairs)))


# ---------------------------------------------------------------- preprocessing (numpy, nnU-Net's order of axes)


def compute_new_shape(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    """nnU-Net's ``compute_new_shape``: round(old_spacing / new_spacing * old_shape) per axis (Python rounding)."""
    return tuple(int(round(s / t * n)) for s, t, n in zip(spacing, new_spacing, shape))


def crop_to_nonzero(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """(cropped data, cropped non-zero mask, bbox [[start, end) per axis]) of a (C, *spatial) array."""
    from scipy.ndimage import binary_fill_holes

    mask = binary_fill_holes(np.any(data != 0, axis=0))
    bbox = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        bbox.append([int(hit[0]), int(hit[-1]) + 1] if hit.size else [0, mask.shape[axis]])
    box = tuple(slice(a, b) for a, b in bbox)
    return data[(slice(None), *box)], mask[box], bbox


def normalize(image: np.ndarray, scheme: str, mask: np.ndarray, use_mask: bool, props: Mapping[str, float]) -> np.ndarray:
    """One channel, in float32, with the same operations as nnU-Net's normalisation classes."""
    image = image.astype(np.float32, copy=True)
    if scheme == "CTNormalization":
        np.clip(image, props["percentile_00_5"], props["percentile_99_5"], out=image)
        image -= props["mean"]
        image /= max(props["std"], 1e-8)
    elif scheme == "ZScoreNormalization":
        if use_mask:
            mean, std = image[mask].mean(), image[mask].std()
            image[mask] = (image[mask] - mean) / max(std, 1e-8)
        else:
            mean, std = image.mean(), image.std()
            image -= mean
            image /= max(std, 1e-8)
    elif scheme == "RescaleTo01Normalization":
        image -= image.min()
        image /= np.clip(image.max(), a_min=1e-8, a_max=None)
    return image


def _resize(image: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """``skimage.transform.resize(image, shape, order, mode="edge", anti_aliasing=False)`` on float64."""
    from scipy import ndimage

    out = ndimage.zoom(image, [n / o for n, o in zip(shape, image.shape)], order=order, mode="nearest", grid_mode=True)
    if order > 0:  # resize's clip=True: the input's range
        np.clip(out, image.min(), image.max(), out=out)
    return out


def _separate_z(force: bool | None, current: Sequence[float], new: Sequence[float]) -> int | None:
    """The low-resolution axis to resample on its own, or None (nnU-Net's ``determine_do_sep_z_and_axis``)."""
    def lowres(spacing):
        axes = np.where(max(spacing) / np.array(spacing) == 1)[0]
        return int(axes[0]) if len(axes) == 1 else None

    def anisotropic(spacing):
        return (np.max(spacing) / np.min(spacing)) > ANISO_THRESHOLD

    if force is not None:
        return lowres(current) if force else None
    if anisotropic(current):
        return lowres(current)
    if anisotropic(new):
        return lowres(new)
    return None


def resample(data: np.ndarray, new_shape: Sequence[int], current_spacing: Sequence[float],
             new_spacing: Sequence[float], *, order: int = 3, order_z: int = 0,
             force_separate_z: bool | None = None) -> np.ndarray:
    """nnU-Net's ``resample_data_or_seg_to_shape`` for images / logits: (C, *spatial) -> (C, *new_shape), same dtype."""
    from scipy import ndimage

    new_shape = tuple(int(n) for n in new_shape)
    shape = tuple(data.shape[1:])
    if shape == new_shape:
        return data
    axis = _separate_z(force_separate_z, current_spacing, new_spacing)
    out = np.zeros((data.shape[0], *new_shape), dtype=data.dtype)
    for c in range(data.shape[0]):
        channel = data[c].astype(np.float64)
        if axis is None:
            out[c] = _resize(channel, new_shape, order)
            continue
        inplane = tuple(n for a, n in enumerate(new_shape) if a != axis)
        moved = np.moveaxis(channel, axis, 0)
        stack = np.stack([_resize(s, inplane, order) for s in moved])
        if shape[axis] != new_shape[axis]:
            # along the axis: map_coordinates at scale * (i + 0.5) - 0.5, mode "nearest", order_z
            coords = shape[axis] / new_shape[axis] * (np.arange(new_shape[axis]) + 0.5) - 0.5
            if order_z == 0:
                index = ndimage.map_coordinates(np.arange(shape[axis], dtype=np.float64), coords[None], order=0,
                                                mode="nearest").astype(np.int64)
                stack = stack[index]
            else:
                grid = np.meshgrid(coords, *[np.arange(n, dtype=np.float64) for n in inplane], indexing="ij")
                stack = ndimage.map_coordinates(stack, np.array(grid), order=order_z, mode="nearest")
        out[c] = np.moveaxis(stack, 0, axis)
    return out


@dataclass
class Prepared:
    """A case in nnU-Net's preprocessed space, and what it takes to go back."""

    data: np.ndarray                       # (C, *resampled) float32, the network's input volume
    shape_before_cropping: tuple[int, ...]  # after reading and transpose_forward
    bbox: list[list[int]]
    shape_after_cropping: tuple[int, ...]
    spacing: tuple[float, ...]             # of the transposed, cropped volume (3 entries)
    reorient: np.ndarray | None            # NibabelIOWithReorient's orientation transform, else None


def to_reader_order(array: np.ndarray, affine: np.ndarray, reader: str) -> tuple[np.ndarray, tuple[float, ...], Any]:
    """A volume in file voxel order (x, y, z) -> the reader's (z, y, x) array and spacing."""
    from segmentation.pipeline import canonical_transform, grid_spacing

    transform = None
    spacing = tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))
    if reader == "NibabelIOWithReorient":
        from nibabel.orientations import apply_orientation

        transform = canonical_transform(affine, "RAS")
        array = np.asarray(apply_orientation(array, transform))
        spacing = grid_spacing(affine, "RAS")
    return np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)), spacing[::-1], transform


def preprocess(array: np.ndarray, affine: np.ndarray, plan: NnUNetPlan) -> Prepared:
    """nnU-Net's DefaultPreprocessor on one single-channel volume given in file voxel order."""
    data, spacing, reorient = to_reader_order(array, affine, plan.reader)
    data = data[None].astype(np.float32)
    data = data.transpose(0, *[i + 1 for i in plan.transpose_forward])
    spacing = tuple(spacing[i] for i in plan.transpose_forward)
    shape_before = tuple(data.shape[1:])
    data, mask, bbox = crop_to_nonzero(data)
    shape_after = tuple(data.shape[1:])
    target = plan.spacing if len(plan.spacing) == 3 else (spacing[0], *plan.spacing)
    new_shape = compute_new_shape(shape_after, spacing, target)
    data = np.stack([normalize(data[c], plan.normalization[c], mask, plan.use_mask_for_norm[c], plan.intensity[c])
                     for c in range(data.shape[0])])
    r = plan.data_resampling
    data = resample(data, new_shape, spacing, target, order=r["order"], order_z=r["order_z"],
                    force_separate_z=r["force_separate_z"])
    return Prepared(data=data.astype(np.float32, copy=False), shape_before_cropping=shape_before, bbox=bbox,
                    shape_after_cropping=shape_after, spacing=spacing, reorient=reorient)


# ---------------------------------------------------------------- the segmenter


class NnUNetSegmenter(nn.Module):
    """One or more folds of an nnU-Net-trained network plus their plans: ``segment(array, affine)`` runs
    nnU-Net's whole inference (module docstring) and returns labels on the volume's own grid.

    ``config`` is the `NnUNetPlan` (``config.class_names`` as every segmenter has them).
    """

    kind = "segmenter"

    def __init__(self, nets: Sequence[nn.Module], plan: NnUNetPlan, *, mirror_axes: Sequence[int] | None,
                 source: str = "", folds: Sequence[str] = ()):
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.config = plan
        self.mirror_axes = tuple(range(plan.spatial_dims)) if mirror_axes is None else tuple(int(a) for a in mirror_axes)
        self.source, self.folds = source, tuple(str(f) for f in folds)
        for net in self.nets:
            c = net.config
            if c.num_classes != len(plan.class_names):
                raise HubError(f"{source}: the network predicts {c.num_classes} classes, dataset.json names "
                               f"{len(plan.class_names)} ({', '.join(plan.class_names)})")
            if c.spatial_dims != plan.spatial_dims or c.in_channels != len(plan.channel_names):
                raise HubError(f"{source}: a {c.spatial_dims}-D network with {c.in_channels} input channel(s) does not "
                               f"fit the {plan.configuration} plans ({len(plan.channel_names)} channel(s))")
            if any(p % t for p, t in zip(plan.patch_size, c.total_stride)):
                raise HubError(f"{source}: patch size {plan.patch_size} is not divisible by the network's total "
                               f"stride {c.total_stride}")
        if any(not 0 <= a < plan.spatial_dims for a in self.mirror_axes):
            raise HubError(f"{source}: mirroring axes {self.mirror_axes} do not fit a {plan.spatial_dims}-D network")

    @property
    def in_channels(self) -> int:
        return len(self.config.channel_names)

    @property
    def spatial_dims(self) -> int:
        return self.config.spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The folds' logits averaged, for one window batch."""
        out = self.nets[0](x)
        for net in self.nets[1:]:
            out = out + net(x)
        return out / len(self.nets)

    @torch.no_grad()
    def predict_logits(self, data: np.ndarray, *, overlap: float = 0.5, tta: bool = False, batch: int = 4,
                       device: str | torch.device | None = None, progress: bool = False) -> torch.Tensor:
        """Averaged fold logits (K, *spatial) float32 of a preprocessed (C, *spatial) volume."""
        volume = torch.from_numpy(np.ascontiguousarray(data))
        two_d = self.spatial_dims == 2
        if two_d:  # nnU-Net slices along the first axis; Tessera's per-slice path walks the last one
            volume = volume.permute(0, 2, 3, 1)
        total = None
        for net in self.nets:
            was = net.training
            net.eval()
            try:
                logits = sliding_window_inference(
                    volume, net, self.config.patch_size, overlap=overlap, mode="gaussian_nnunet", placement="nnunet",
                    sw_batch_size=batch, output="logits", spatial_dims=2 if two_d else None, tta_mirror=tta,
                    mirror_axes=self.mirror_axes, device=device, progress=progress)
            finally:
                net.train(was)
            total = logits if total is None else total.add_(logits)
        total /= len(self.nets)
        return total.permute(0, 3, 1, 2).contiguous() if two_d else total

    def labels_from_logits(self, logits: torch.Tensor, prepared: Prepared, shape: Sequence[int]) -> np.ndarray:
        """nnU-Net's export: resample logits to the cropped grid, argmax, uncrop, undo transpose and reading order."""
        plan, r = self.config, self.config.probability_resampling
        current = plan.spacing if len(plan.spacing) == 3 else (prepared.spacing[0], *plan.spacing)
        logits = logits.numpy()
        best, labels = None, None
        for k in range(logits.shape[0]):  # class by class: the same numbers, a fraction of the memory
            score = resample(logits[k: k + 1], prepared.shape_after_cropping, current, prepared.spacing,
                             order=r["order"], order_z=r["order_z"], force_separate_z=r["force_separate_z"])[0]
            if best is None:
                best, labels = score, np.zeros(score.shape, dtype=np.uint8 if logits.shape[0] <= 256 else np.int16)
            else:
                better = score > best
                labels[better] = k
                np.maximum(best, score, out=best)
        full = np.zeros(prepared.shape_before_cropping, dtype=labels.dtype)
        full[tuple(slice(a, b) for a, b in prepared.bbox)] = labels
        full = full.transpose(plan.transpose_backward).transpose(2, 1, 0)
        if prepared.reorient is not None:
            from nibabel.orientations import apply_orientation

            from segmentation.pipeline import _invert

            full = np.asarray(apply_orientation(full, _invert(prepared.reorient)))
        if tuple(full.shape) != tuple(shape):
            raise RuntimeError(f"labels of shape {full.shape} for a volume of shape {tuple(shape)}")
        return np.ascontiguousarray(full)

    @torch.no_grad()
    def segment(self, array: np.ndarray, affine: np.ndarray, *, overlap: float | None = None, tta: bool = False,
                batch: int = 4, device: str | torch.device | None = None, progress: bool = False,
                postprocess: bool = True) -> np.ndarray:
        """Label map of a single-channel 3-D scan (file voxel order, voxel-to-RAS ``affine``), on its own grid.

        ``overlap`` is 1 - nnU-Net's ``tile_step_size`` (default 0.5); ``postprocess`` is accepted for the
        common interface: nnU-Net's post-processing pickle is not applied.
        """
        array = np.asarray(array)
        if array.ndim != 3:
            raise ValueError(f"expected a 3-D volume, got shape {array.shape}")
        if self.in_channels != 1:
            raise ValueError(f"the network expects {self.in_channels} input channels; a single volume has 1")
        prepared = preprocess(array, affine, self.config)
        logits = self.predict_logits(prepared.data, overlap=0.5 if overlap is None else overlap, tta=tta, batch=batch,
                                     device=device, progress=progress)
        return self.labels_from_logits(logits, prepared, array.shape)


# ---------------------------------------------------------------- loading: checkpoint_final.pth and result folders


def _network_state(obj: Any) -> Mapping | None:
    state = obj.get("network_weights", obj) if isinstance(obj, Mapping) else None
    return state if isinstance(state, Mapping) else None


def recognise_checkpoint(obj: Any) -> bool:
    """An nnU-Net checkpoint (or plain state dict) of neU-Net: its encoder stages and pixel-shuffle decoder."""
    state = _network_state(obj)
    if state is None:
        return False
    keys = [k.removeprefix("module.").removeprefix("_orig_mod.") for k in state]
    return "encoder.stages.0.0.convs.0.conv.weight" in keys and any(
        k.startswith("decoder.convswithpixelshuffle.") for k in keys)


def _network(checkpoint: Mapping, strides: Sequence[Sequence[int]] | None, source: str) -> nn.Module:
    from segmentation.neunet import _infer_config, _official_state_dict, from_official

    try:
        config = None
        if strides is not None:
            config = _infer_config(_official_state_dict(checkpoint), {"strides": strides})
        return from_official(checkpoint, config)
    except (ValueError, KeyError) as e:
        raise HubError(f"{source}: {e}") from None


def _init_args(obj: Any) -> Mapping | None:
    init = obj.get("init_args") if isinstance(obj, Mapping) else None
    return init if isinstance(init, Mapping) and "plans" in init and "dataset_json" in init else None


def load_checkpoint(obj: Any, path: Path) -> nn.Module:
    """A released neU-Net file: with nnU-Net's ``init_args`` (checkpoint_final.pth) a whole `NnUNetSegmenter`;
    a bare state dict gives the bare network (which then needs a preparation preset)."""
    path = Path(path)
    init = _init_args(obj)
    if init is None:
        return _network(obj, None, path.name)
    configuration = str(init.get("configuration", "3d_fullres"))
    plan = NnUNetPlan.from_json(init["plans"], init["dataset_json"], configuration, f"{path.name} (init_args)")
    net = _network(obj, plan.strides, path.name)
    return NnUNetSegmenter([net], plan, mirror_axes=obj.get("inference_allowed_mirroring_axes"), source=path.name,
                           folds=(str(init.get("fold", "?")),))


def recognise_result_folder(path: Path) -> bool:
    """Looks like an nnU-Net training output folder: plans.json, dataset.json or fold_* inside."""
    path = Path(path)
    return ((path / "plans.json").is_file() or (path / "dataset.json").is_file()
            or any(p.is_dir() and p.name.startswith("fold_") for p in path.iterdir()))


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HubError(f"{path}: unreadable {what} ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise HubError(f"{path}: {what} must hold a JSON object")
    return data


def available_folds(path: Path, checkpoint: str = CHECKPOINT) -> list[str]:
    """The numbered folds with a checkpoint, as nnU-Net's auto-detection (fold_all left out)."""
    found = [p.name[len("fold_"):] for p in Path(path).iterdir()
             if p.is_dir() and p.name.startswith("fold_") and p.name[len("fold_"):].isdigit() and (p / checkpoint).is_file()]
    return sorted(found, key=int)


def load_result_folder(path: Path, *, folds: Sequence[str | int] | None = None,
                       checkpoint: str = CHECKPOINT) -> NnUNetSegmenter:
    """An nnU-Net v2 result folder: plans.json, dataset.json and fold_N/checkpoint_final.pth.

    ``folds``: fold names (ints, or "all" for fold_all); default: every numbered fold that has the
    checkpoint, as nnU-Net's predictor chooses them.
    """
    path = Path(path)
    layout = f"an nnU-Net result folder holds plans.json, dataset.json and fold_N/{checkpoint}"
    for name in ("plans.json", "dataset.json"):
        if not (path / name).is_file():
            raise HubError(f"{path}: no {name}; {layout}")
    present = available_folds(path, checkpoint)
    if folds is None:
        if not present:
            raise HubError(f"{path}: no fold_N/{checkpoint}; {layout}")
        folds = present
    folds = [str(f) for f in folds]
    for f in folds:
        if not (path / f"fold_{f}" / checkpoint).is_file():
            raise HubError(f"{path}: fold {f} is missing (no fold_{f}/{checkpoint}); folds present: "
                           f"{', '.join(present) or 'none'}")
    plans, dataset = _read_json(path / "plans.json", "plans.json"), _read_json(path / "dataset.json", "dataset.json")
    nets, configuration, mirror = [], None, None
    for f in folds:
        file = path / f"fold_{f}" / checkpoint
        source = f"{path.name}/fold_{f}/{checkpoint}"
        obj = load_official_state_dict(file)
        if not recognise_checkpoint(obj):
            trainer = obj.get("trainer_name", "?") if isinstance(obj, Mapping) else "?"
            raise HubError(f"{source}: not a neU-Net checkpoint (trainer {trainer}); Tessera runs nnU-Net results "
                           "of neU-Net, the nnU-Net-trained network it implements")
        init = obj.get("init_args") if isinstance(obj.get("init_args"), Mapping) else {}
        conf = str(init.get("configuration") or path.name.rsplit("__", 1)[-1])
        if configuration is None:
            configuration, mirror = conf, obj.get("inference_allowed_mirroring_axes")
            plan = NnUNetPlan.from_json(plans, dataset, configuration, str(path))
        elif conf != configuration:
            raise HubError(f"{source}: trained as configuration {conf!r}, fold {folds[0]} as {configuration!r}")
        nets.append(_network(obj, plan.strides, source))
    shapes = [{k: tuple(v.shape) for k, v in n.state_dict().items()} for n in nets]
    if any(s != shapes[0] for s in shapes[1:]):
        raise HubError(f"{path}: the folds' networks differ in architecture")
    return NnUNetSegmenter(nets, plan, mirror_axes=mirror, source=str(path), folds=folds)


def _load_folder(path: Path, *, folds: Sequence[str | int] | None = None, checkpoint: str = CHECKPOINT) -> nn.Module:
    return load_result_folder(path, folds=folds, checkpoint=checkpoint)


register_official("neunet", kind="segmenter", recognise=recognise_checkpoint, load=load_checkpoint)
register_official_folder("nnunet-results", kind="segmenter", recognise=recognise_result_folder, load=_load_folder)

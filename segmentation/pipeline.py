"""`Segmenter`: a segmentation network together with everything needed to run it on a scan.

A network alone does not say how a CT or MRI volume must be prepared for it. A `Segmenter`
wraps one (HBFormer, neU-Net, any registered model mapping ``(B, C, *window)`` to ``(B, K,
*window)`` logits) and stores, in its config, what the trainer used, so that
``save_pretrained``/``from_pretrained`` round-trip all of it and ``python -m apps.segment`` can run
a shipped model end to end:

- ``orientation``: the volume is first reordered/flipped to the closest canonical orientation
  (``"RAS"``, nibabel's ``as_closest_canonical``; MONAI's ``Orientation``), or left in the file's
  voxel order (``None``). Labels are mapped back, so the output always has the input's geometry;
- ``spacing``: the voxel size (mm, per axis after reorientation) the network was trained at
  (nnU-Net: the median spacing of the training set). Volumes are resampled to it (trilinear)
  and the label map back to the original grid (nearest neighbour); ``None`` skips resampling;
- ``intensity``: ``"ct"`` (nnU-Net: clip to the training foreground's 0.5/99.5 percentiles
  ``ct_lower``/``ct_upper``, z-score with its ``ct_mean``/``ct_std``), ``"ct_window"`` (clip to
  the same window and scale to [0, 1]: the input HBFormer's pseudo-HDR stack expects),
  ``"zscore"`` / ``"zscore_nonzero"`` (MRI, per case), ``"percentile_window"`` (per case 0.5/99.5
  percentiles to [0, 1]) or ``"none"``;
- ``window``: the sliding-window size (3 entries for a 3-D network; 2 for a 2-D network, which is
  run slice by slice along the last axis) and the default ``overlap``;
- ``class_names``: one name per output class, background first;
- ``largest_component``: classes whose prediction is reduced to its largest connected component
  (26-connectivity), the rest set to background -- nnU-Net's post-processing, chosen by the trainer
  for classes where it does not lower the Dice (single organs; never for scattered lesions).

Inference is `segmentation.inference.sliding_window_inference` (Gaussian blending, optional
mirroring TTA), reduced to labels slab by slab, so memory stays bounded on large volumes. A 2-D
network can instead see whole slices resized to its window (``inference="resize_slices"``, the
TransUNet/Synapse protocol: cubic-spline zoom of each slice along the last axis to the window,
argmax, nearest zoom back; ``transpose_slices`` feeds slice ``[:, :, k]`` transposed, rows being
the second voxel axis, as SimpleITK's array order gives them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from segmentation.inference import sliding_window_inference
from segmentation.intensity import CTStatistics, normalize_ct, resample_to_shape, resample_to_spacing, zscore
from vision.hub import build_model, config_to_dict, register_model

__all__ = ["SegmenterConfig", "Segmenter", "INTENSITY_MODES", "canonical_transform", "grid_spacing", "to_model_grid",
           "from_model_grid", "keep_largest_component"]

INTENSITY_MODES = ("ct", "ct_window", "zscore", "zscore_nonzero", "percentile_window", "none")
INFERENCE_MODES = ("sliding_window", "resize_slices")


@dataclass
class SegmenterConfig:
    architecture: str = "neunet"                 # registered name of the wrapped network
    model: dict[str, Any] = field(default_factory=dict)  # that network's config, as in its config.json
    class_names: tuple[str, ...] = ("background", "foreground")
    window: tuple[int, ...] = (64, 64, 32)       # sliding window; 2 entries: a 2-D network run per slice
    overlap: float = 0.5                         # default window overlap (nnU-Net: 0.5)
    spacing: tuple[float, ...] | None = None     # target voxel size in mm after reorientation; None: native
    orientation: str | None = "RAS"              # canonical axis order/direction; None: the file's voxel order
    intensity: str = "ct"
    ct_lower: float | None = None
    ct_upper: float | None = None
    ct_mean: float | None = None
    ct_std: float | None = None
    modality: str = "CT"
    largest_component: tuple[int, ...] = ()      # classes reduced to their largest connected component
    inference: str = "sliding_window"            # or "resize_slices" (2-D: whole slices resized to the window)
    transpose_slices: bool = False               # resize_slices: feed slice [:, :, k] transposed

    def __post_init__(self) -> None:
        self.class_names = tuple(str(n) for n in self.class_names)
        self.largest_component = tuple(int(c) for c in self.largest_component)
        if any(not 0 < c < len(self.class_names) for c in self.largest_component):
            raise ValueError(f"largest_component classes {self.largest_component} must be foreground classes "
                             f"1..{len(self.class_names) - 1}")
        self.window = tuple(int(w) for w in self.window)
        if self.spacing is not None:
            self.spacing = tuple(float(s) for s in self.spacing)
            if len(self.spacing) != 3 or min(self.spacing) <= 0:
                raise ValueError(f"spacing must be 3 positive numbers (mm), got {self.spacing}")
        if self.intensity not in INTENSITY_MODES:
            raise ValueError(f"intensity must be one of {', '.join(INTENSITY_MODES)}, got {self.intensity!r}")
        if self.inference not in INFERENCE_MODES:
            raise ValueError(f"inference must be one of {', '.join(INFERENCE_MODES)}, got {self.inference!r}")
        if self.inference == "resize_slices" and len(self.window) != 2:
            raise ValueError("inference 'resize_slices' runs a 2-D network: window needs 2 entries")
        if self.intensity in ("ct", "ct_window"):
            needed = ("ct_lower", "ct_upper", "ct_mean", "ct_std") if self.intensity == "ct" else ("ct_lower", "ct_upper")
            missing = [n for n in needed if getattr(self, n) is None]
            if missing:
                raise ValueError(f"intensity {self.intensity!r} needs the dataset statistics {', '.join(missing)}")
            if not self.ct_lower < self.ct_upper:
                raise ValueError(f"ct_lower {self.ct_lower} must be below ct_upper {self.ct_upper}")
        if len(self.window) not in (2, 3) or min(self.window) < 1:
            raise ValueError(f"window must be 2 or 3 positive sizes, got {self.window}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if len(self.class_names) < 2:
            raise ValueError("a segmenter needs at least two classes (background first)")
        if self.orientation is not None and (len(self.orientation) != 3 or len(_axis_letters(self.orientation)) != 3):
            raise ValueError(f"orientation must be 3 axis codes such as 'RAS', got {self.orientation!r}")

    @property
    def ct_statistics(self) -> CTStatistics:
        return CTStatistics(lower=self.ct_lower, upper=self.ct_upper, mean=self.ct_mean, std=self.ct_std)


def _axis_letters(codes: str) -> list[str]:
    """The letters of an orientation string, checking that each physical axis appears once."""
    pairs = ("LR", "PA", "IS")
    out = []
    for c in codes.upper():
        axis = next((p for p in pairs if c in p), None)
        if axis is None or any(c2 in axis for c2 in out):
            return []
        out.append(c)
    return out


def canonical_transform(affine: np.ndarray, orientation: str | None) -> np.ndarray | None:
    """nibabel orientation transform (rows: target axis, flip) from the file's voxel axes to ``orientation``."""
    if orientation is None:
        return None
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    return ornt_transform(io_orientation(np.asarray(affine)), axcodes2ornt(tuple(orientation.upper())))


def _apply(array: np.ndarray, transform: np.ndarray | None) -> np.ndarray:
    if transform is None:
        return array
    from nibabel.orientations import apply_orientation

    return np.ascontiguousarray(apply_orientation(array, transform))


def _invert(transform: np.ndarray) -> np.ndarray:
    inv = np.empty_like(transform)
    for axis, (target, flip) in enumerate(transform):
        inv[int(target)] = (axis, flip)
    return inv


def grid_spacing(affine: np.ndarray, orientation: str | None) -> tuple[float, float, float]:
    """Voxel size (mm) of each array axis after reorientation to ``orientation``."""
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    transform = canonical_transform(affine, orientation)
    if transform is None:
        return tuple(float(s) for s in spacing)
    out = [0.0, 0.0, 0.0]
    for axis, (target, _flip) in enumerate(transform):
        out[int(target)] = float(spacing[axis])
    return tuple(out)


def to_model_grid(array: np.ndarray, affine: np.ndarray, orientation: str | None,
                  spacing: tuple[float, ...] | None, *, is_label: bool = False) -> np.ndarray:
    """Reorient a volume to ``orientation`` and resample it to ``spacing`` (trilinear; nearest for labels)."""
    out = _apply(np.asarray(array), canonical_transform(affine, orientation))
    current = grid_spacing(affine, orientation)
    if spacing is not None and not np.allclose(current, spacing, rtol=1e-3):
        src = out if is_label else out.astype(np.float32, copy=False)
        out = resample_to_spacing(src, current, spacing, is_label=is_label)
    return out


def from_model_grid(labels: np.ndarray, affine: np.ndarray, shape: tuple[int, ...],
                    orientation: str | None) -> np.ndarray:
    """Inverse of `to_model_grid` for a label map: resample (nearest) and reorient back to the file grid ``shape``."""
    transform = canonical_transform(affine, orientation)
    oriented = tuple(shape) if transform is None else tuple(shape[int(a)] for a in _invert(transform)[:, 0])
    if tuple(labels.shape) != oriented:
        labels = resample_to_shape(labels, oriented, is_label=True)
    return labels if transform is None else _apply(labels, _invert(transform))


def keep_largest_component(labels: np.ndarray, classes: tuple[int, ...] | list[int]) -> np.ndarray:
    """For each class in ``classes``, keep its largest 26-connected component; other voxels of it become 0."""
    from scipy import ndimage

    if not classes:
        return labels
    labels = labels.copy()
    structure = np.ones((3,) * labels.ndim, dtype=bool)
    for c in classes:
        comp, n = ndimage.label(labels == c, structure=structure)
        if n > 1:
            sizes = np.bincount(comp.ravel())
            sizes[0] = 0
            labels[(comp > 0) & (comp != int(sizes.argmax()))] = 0
    return labels


def _import_architecture(name: str) -> None:
    """Register a segmentation network by importing its own module (cheaper than the hub importing every package)."""
    import importlib

    try:
        importlib.import_module(f"segmentation.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"segmentation.{name}":
            raise
        # defined elsewhere: vision.hub.build_model imports every model package


@register_model("segmenter")
class Segmenter(nn.Module):
    """A network plus its input preparation and inference settings (see the module docstring).

    ``forward(x)`` is the wrapped network's forward; ``segment(array, affine)`` runs the whole
    pipeline on a volume and returns labels on the volume's own voxel grid.
    """

    config_class = SegmenterConfig

    def __init__(self, config: SegmenterConfig, net: nn.Module | None = None):
        super().__init__()
        self.config = config
        if net is None:
            _import_architecture(config.architecture)
            net = build_model(config.architecture, config.model)
        self.net = net
        self._validate()

    @classmethod
    def wrap(cls, net: nn.Module, **fields: Any) -> "Segmenter":
        """A Segmenter around an existing network (its weights are kept, not copied)."""
        arch = getattr(type(net), "architecture", None)
        if arch is None:
            raise TypeError(f"{type(net).__name__} is not registered with @register_model")
        return cls(SegmenterConfig(architecture=arch, model=config_to_dict(net.config), **fields), net)

    def _validate(self) -> None:
        c, nc = self.config, self.net.config
        net_classes = getattr(nc, "num_classes", None)
        if net_classes is not None and net_classes != len(c.class_names):
            raise ValueError(f"{len(c.class_names)} class names for a network with {net_classes} classes")
        if len(c.window) != self.spatial_dims:
            raise ValueError(f"window {c.window} needs {self.spatial_dims} entries for a "
                             f"{self.spatial_dims}-D {c.architecture} network")
        img_size = getattr(nc, "img_size", None)  # HBFormer: a fixed square input
        if img_size is not None and c.window != (img_size, img_size):
            raise ValueError(f"window {c.window} must be ({img_size}, {img_size}) for img_size {img_size}")
        stride = getattr(nc, "total_stride", None)  # neU-Net: sizes divisible by the total stride
        if stride is not None and any(w % s for w, s in zip(c.window, stride)):
            raise ValueError(f"window {c.window} must be divisible by the network's total stride {stride}")

    # ------------------------------------------------------------------ properties

    @property
    def spatial_dims(self) -> int:
        dims = getattr(self.net.config, "spatial_dims", None)
        if dims is None:
            dims = 2 if hasattr(self.net.config, "img_size") else 3
        return int(dims)

    @property
    def in_channels(self) -> int:
        return int(getattr(self.net.config, "in_channels", 1))

    @property
    def num_classes(self) -> int:
        return len(self.config.class_names)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        return self.net(x)

    # ------------------------------------------------------------------ preparation (shared with training)

    def to_model_grid(self, array: np.ndarray, affine: np.ndarray, *, is_label: bool = False) -> np.ndarray:
        """Reorient to ``config.orientation`` and resample to ``config.spacing`` (nearest for labels)."""
        return to_model_grid(array, affine, self.config.orientation, self.config.spacing, is_label=is_label)

    def from_model_grid(self, labels: np.ndarray, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Inverse of `to_model_grid` for a label map: back to the file's voxel grid ``shape``."""
        return from_model_grid(labels, affine, shape, self.config.orientation)

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """Intensity preparation (``config.intensity``), float32."""
        c, mode = self.config, self.config.intensity
        image = np.asarray(image, dtype=np.float32)
        if mode == "ct":
            return normalize_ct(image, c.ct_statistics)
        if mode == "ct_window":
            return ((np.clip(image, c.ct_lower, c.ct_upper) - np.float32(c.ct_lower))
                    / np.float32(c.ct_upper - c.ct_lower)).astype(np.float32)
        if mode in ("zscore", "zscore_nonzero"):
            return zscore(image, nonzero=mode == "zscore_nonzero")
        if mode == "percentile_window":
            lo, hi = np.percentile(image, (0.5, 99.5))
            return ((np.clip(image, lo, hi) - lo) / max(float(hi - lo), 1e-8)).astype(np.float32)
        return image

    def prepare(self, array: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """A scan on its file grid -> the network's input volume (oriented, resampled, normalised)."""
        return self.normalize(self.to_model_grid(array, affine))

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def segment(self, array: np.ndarray, affine: np.ndarray, *, overlap: float | None = None, tta: bool = False,
                batch: int = 4, device: str | torch.device | None = None, progress: bool = False,
                postprocess: bool = True) -> np.ndarray:
        """Label map (uint8/int16, shape of ``array``) of a single-channel 3-D scan with voxel-to-world ``affine``.

        ``postprocess=False`` skips the largest-component step (``config.largest_component``).
        """
        array = np.asarray(array)
        if array.ndim != 3:
            raise ValueError(f"expected a 3-D volume, got shape {array.shape}")
        if self.in_channels != 1:
            raise ValueError(f"the network expects {self.in_channels} input channels; a single volume has 1")
        x = torch.from_numpy(self.prepare(array, affine))[None]
        was_training = self.training
        self.eval()
        try:
            if self.config.inference == "resize_slices":
                labels = torch.from_numpy(self._resize_slices(x[0].numpy(), tta=tta, batch=batch, device=device,
                                                              progress=progress))
            else:
                labels = sliding_window_inference(
                    x, self.net, self.config.window, overlap=self.config.overlap if overlap is None else overlap,
                    mode="gaussian", sw_batch_size=batch, output="labels",
                    spatial_dims=2 if self.spatial_dims == 2 else None, tta_mirror=tta, device=device,
                    progress=progress)
        finally:
            self.train(was_training)
        labels = self.from_model_grid(labels.numpy(), affine, array.shape)
        return keep_largest_component(labels, self.config.largest_component) if postprocess else labels

    def _resize_slices(self, volume: np.ndarray, *, tta: bool, batch: int, device, progress: bool) -> np.ndarray:
        """Labels of a prepared (X, Y, Z) volume, slice by slice along Z, each slice resized to the window.

        As the TransUNet/Synapse test code (``utils.test_single_volume``): ``scipy.ndimage.zoom`` of the
        float32 slice to the window (order 3), argmax of the network's logits, ``zoom`` of the labels
        back (order 0). ``tta`` averages the logits over flips of the two slice axes.
        """
        from scipy.ndimage import zoom

        size = tuple(self.config.window)
        if device is None:
            device = next(self.net.parameters()).device
        slices = np.moveaxis(volume, -1, 0)
        if self.config.transpose_slices:
            slices = slices.transpose(0, 2, 1)
        shape = slices.shape[1:]
        labels = np.zeros(slices.shape, dtype=np.uint8 if self.num_classes <= 256 else np.int16)
        flips = [(2,), (3,), (2, 3)] if tta else []
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(slices), desc="slices", unit="slice", leave=False)
        for start in range(0, len(slices), batch):
            chunk = slices[start: start + batch].astype(np.float32, copy=False)
            if shape != size:
                chunk = np.stack([zoom(s, (size[0] / shape[0], size[1] / shape[1]), order=3) for s in chunk])
            x = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32))[:, None].to(device)
            logits = self.net(x).float()
            for axes in flips:
                logits += torch.flip(self.net(torch.flip(x, axes)).float(), axes)
            pred = logits.argmax(1).cpu().numpy()
            for i, p in enumerate(pred):
                labels[start + i] = p if shape == size else zoom(p, (shape[0] / size[0], shape[1] / size[1]), order=0)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        if self.config.transpose_slices:
            labels = labels.transpose(0, 2, 1)
        return np.ascontiguousarray(np.moveaxis(labels, 0, -1))

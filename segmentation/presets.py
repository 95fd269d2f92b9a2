"""Preparation presets: how scans are prepared for a released network whose checkpoint does not say.

A released state dict (e.g. HBFormer's ``best_dice.pth``) holds weights only; the protocol the
network was trained with lives in its authors' data pipeline. A preset names that protocol and
wraps the network into a `segmentation.pipeline.Segmenter` (``apps.segment --preset NAME``).

``synapse``: the TransUNet Synapse multi-organ protocol that lzeeorno/HBFormer's data and test code
use (TransUNet's preprocessed ``.npz``/``.npy.h5`` files; HBFormer ``test_synapse.py`` and
``utils.test_single_volume``):

- HU clipped to [-125, 275] and scaled to [0, 1] over the whole volume;
- axial slices in the order TransUNet's volumes store them: the NIfTI voxel array read as
  SimpleITK reads it, ``[z, y, x]``, so a slice's rows are the file's second voxel axis (a scan is
  fed as it is stored; no reorientation, as in the official pipeline);
- each slice resized to the network's square input (``img_size``: 224, or 256 for the released
  Synapse run) with ``scipy.ndimage.zoom(order=3)``, the pseudo-HDR stack built inside HBFormer's
  forward, argmax, and the label slice resized back with ``zoom(order=0)``;
- 9 classes in TransUNet's order: background, aorta, gallbladder, left kidney, right kidney, liver,
  pancreas, spleen, stomach (HBFormer ``test_synapse.py``; its training log prints another list,
  with an esophagus, that does not match the data's labels).
"""
from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["PRESETS", "apply_preset"]

SYNAPSE_CLASSES = ("background", "aorta", "gallbladder", "left_kidney", "right_kidney", "liver", "pancreas", "spleen",
                   "stomach")

PRESETS: dict[str, dict[str, Any]] = {
    "synapse": {
        "what": "TransUNet/Synapse abdominal CT, 8 organs (HBFormer's released Synapse weights)",
        "fields": dict(class_names=SYNAPSE_CLASSES, orientation=None, spacing=None, intensity="ct_window",
                       ct_lower=-125.0, ct_upper=275.0, modality="CT", inference="resize_slices",
                       transpose_slices=True),
    },
}


def apply_preset(net: nn.Module, name: str):
    """A Segmenter around ``net`` with preset ``name``'s preparation; ValueError if it does not fit the network."""
    from segmentation.pipeline import Segmenter

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    fields = dict(PRESETS[name]["fields"])
    config = getattr(net, "config", None)
    size = getattr(config, "img_size", None)
    if size is None or getattr(config, "spatial_dims", 2) != 2:
        raise ValueError(f"preset {name!r} runs a 2-D network with a fixed square input on axial slices; "
                         f"{type(net).__name__} is not one")
    classes = getattr(config, "num_classes", None)
    if classes != len(fields["class_names"]):
        raise ValueError(f"preset {name!r} has {len(fields['class_names'])} classes, the network predicts {classes}")
    if getattr(config, "in_channels", 1) != 1:
        raise ValueError(f"preset {name!r} feeds one CT channel, the network takes {config.in_channels}")
    return Segmenter.wrap(net, window=(size, size), **fields)

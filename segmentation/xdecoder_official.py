"""Loading microsoft/X-Decoder's released checkpoints (`xdecoder_focalt_last.pt`, Focal-T).

The official `BaseModel.save_pretrained` writes `GeneralizedXdecoder.state_dict()` with
`torch.save`, and `BaseModel.from_pretrained` (utils/model.py `align_and_update_state_dicts`)
matches the file's keys to the model's exactly, with no prefix handling. So the file is one plain
state dict whose keys are Tessera's `XDecoder` keys (the module names are the official ones),
plus one entry that is not part of the model:

- `criterion.empty_weight` (SetCriterion's buffer: the no-object class weight of the loss over
  133 + 1 classes) is ignored; Tessera's loss lives outside the model.

Everything else must match name for name and shape for shape (`check_state_dict`), including
`backbone_proj` (the retrieval ensemble's projection) and the predictor's `self_attn_mask` buffer.
The sizes come from the weights (backbone width, depths, focal levels and windows, decoder width,
queries, layers, context, vocabulary); the attention head counts, which weights do not show, are
the Focal-T config's (8). The default vocabulary is COCO panoptic's 133 classes, the training
vocabulary of the released model, with its thing/stuff flags.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from segmentation.xdecoder import XDecoder, XDecoderConfig
from vision.hub import HubError, check_state_dict, register_official

__all__ = ["from_official", "recognise_official", "config_from_state_dict", "coco_panoptic_vocabulary"]

IGNORED_KEYS = frozenset({"criterion.empty_weight"})
_BACKBONE = "backbone."
_PIXEL = "sem_seg_head.pixel_decoder."
_PREDICTOR = "sem_seg_head.predictor."
_LANG = _PREDICTOR + "lang_encoder."


def coco_panoptic_vocabulary() -> tuple[tuple[str, ...], tuple[bool, ...]]:
    """The 133 COCO panoptic class names (official spelling, e.g. 'wall-other-merged') and thing flags."""
    data = json.loads((Path(__file__).with_name("xdecoder_coco_panoptic.json")).read_text())
    return tuple(data["classes"]), tuple(data["is_thing"])


def _count(state: Mapping[str, Tensor], pattern: str) -> int:
    """How many distinct indices the single group of `pattern` takes over the keys."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.fullmatch(k))})


def config_from_state_dict(state: Mapping[str, Tensor]) -> XDecoderConfig:
    """An XDecoderConfig with every size the weights determine."""
    try:
        embed_dim = state[_BACKBONE + "patch_embed.proj.weight"].shape[0]
        stages = _count(state, r"backbone\.layers\.(\d+)\..*")
        depths = tuple(_count(state, rf"backbone\.layers\.{i}\.blocks\.(\d+)\..*") for i in range(stages))
        levels = tuple(_count(state, rf"backbone\.layers\.{i}\.blocks\.0\.modulation\.focal_layers\.(\d+)\..*")
                       for i in range(stages))
        windows = tuple(state[f"{_BACKBONE}layers.{i}.blocks.0.modulation.focal_layers.0.0.weight"].shape[-1]
                        for i in range(stages))
        mlp_ratio = state[_BACKBONE + "layers.0.blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
        mask_features = state[_PIXEL + "mask_features.weight"]
        query_feat = state[_PREDICTOR + "query_feat.weight"]
        token_embedding = state[_LANG + "lang_encoder.token_embedding.weight"]
        dim_proj = state[_PREDICTOR + "class_embed"].shape[1]
    except KeyError as e:
        raise ValueError(f"not an X-Decoder checkpoint: missing {e.args[0]!r}") from None
    class_names, is_thing = coco_panoptic_vocabulary()
    backbone_proj = state.get("backbone_proj")
    return XDecoderConfig(
        embed_dim=embed_dim, depths=depths, focal_levels=levels, focal_windows=windows, mlp_ratio=mlp_ratio,
        conv_dim=mask_features.shape[1], mask_dim=mask_features.shape[0],
        enc_layers=_count(state, r"sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\..*"),
        hidden_dim=query_feat.shape[1], num_queries=query_feat.shape[0],
        dim_feedforward=state[_PREDICTOR + "transformer_ffn_layers.0.linear1.weight"].shape[0],
        dec_layers=_count(state, r"sem_seg_head\.predictor\.transformer_ffn_layers\.(\d+)\..*"),
        dim_proj=dim_proj, context_length=state[_LANG + "lang_encoder.positional_embedding"].shape[0],
        vocab_size=token_embedding.shape[0], lang_width=token_embedding.shape[1],
        lang_layers=_count(state, r"sem_seg_head\.predictor\.lang_encoder\.lang_encoder\.resblocks\.(\d+)\..*"),
        captioning=_PREDICTOR + "caping_embed" in state, retrieval=backbone_proj is not None,
        backbone_dim=backbone_proj.shape[0] if backbone_proj is not None else embed_dim * 2 ** (stages - 1),
        class_names=class_names, is_thing=is_thing,
        test_min_size=800, test_max_size=1333, caption_size=224)  # COCO.INPUT.*_SIZE_TEST, VLP.INPUT.IMAGE_SIZE


def from_official(state: Mapping[str, Any], source: str = "X-Decoder checkpoint") -> XDecoder:
    """An XDecoder with the weights of a released state dict (see the module docstring)."""
    if not isinstance(state, Mapping):
        raise ValueError(f"{source}: expected a state dict, got {type(state).__name__}")
    state = {k: v for k, v in state.items() if k not in IGNORED_KEYS}
    model = XDecoder(config_from_state_dict(state))
    check_state_dict(model.state_dict(), state, source)
    model.load_state_dict(state, strict=True)
    return model


def recognise_official(obj: Any) -> bool:
    """A released X-Decoder state dict: FocalNet backbone, X-Decoder predictor and its language encoder."""
    if not isinstance(obj, Mapping):
        return False
    return (_BACKBONE + "patch_embed.proj.weight" in obj and _PREDICTOR + "query_feat.weight" in obj
            and _LANG + "lang_proj" in obj and _PIXEL + "mask_features.weight" in obj)


def _load_official(obj: Any, path: Path) -> XDecoder:
    try:
        return from_official(obj, Path(path).name)
    except HubError:
        raise
    except ValueError as e:
        raise HubError(f"{Path(path).name}: {e}") from None


register_official("xdecoder-focalt", kind="segmenter", recognise=recognise_official, load=_load_official)

"""Import the U-ViT MaskGIT checkpoint ReCAP evaluates with (`nnet_ema.pth`, from AutoNAT/ImprovedNAT;
liebenxj/ReCAP `examples/MaskGIT+ReCAP`, config `configs/maskgit.yaml`).

The file is the model's state dict (a `module.` prefix, as DDP saves it, is also accepted). Keys
map one to one (table below). The configuration comes from the shapes: width and codebook from
the token table (its last row is the mask token), the grid from the position table (a square),
classes from the class table (its last row, 1000 in the release, is the null class), depth by
counting in-blocks, MLP width from `fc1`, long skips from `skip_linear`. The number of heads is not
stored: the release is 768 wide with 8 heads (`num_heads: 8` in the config), and another width is
refused rather than guessed. Its tokens are those of MaskGIT's VQGAN (f16, 1024 codes), which
ships apart (`--tokenizer`).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from generators.maskgit.model import MaskGIT, MaskGITConfig
from vision.hub import HubError, check_state_dict, register_official

HEADS_BY_WIDTH = {768: 8}
DOWNSAMPLE = 16  # MaskGIT's VQGAN

# official key (inside a block) -> Tessera key
BLOCK_KEYS = {
    "norm1.weight": "attn_norm.weight", "norm1.bias": "attn_norm.bias",
    "attn.qkv.weight": "attn.qkv.weight",
    "attn.proj.weight": "attn.proj.weight", "attn.proj.bias": "attn.proj.bias",
    "norm2.weight": "mlp_norm.weight", "norm2.bias": "mlp_norm.bias",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
    "skip_linear.weight": "skip_proj.weight", "skip_linear.bias": "skip_proj.bias",
}
TOP_KEYS = {
    "token_emb.word_embeddings.weight": "token_embed.weight",
    "token_emb.position_embeddings.weight": "pos_embed.weight",
    "token_emb.LayerNorm.weight": "embed_norm.weight",
    "token_emb.LayerNorm.bias": "embed_norm.bias",
    "context_embed.word_embeddings.weight": "class_embed.weight",
    "context_embed.position_embeddings.weight": "class_pos_embed.weight",
    "context_embed.LayerNorm.weight": "class_norm.weight",
    "context_embed.LayerNorm.bias": "class_norm.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
    "mlm_layer.fc.weight": "head.fc.weight",
    "mlm_layer.fc.bias": "head.fc.bias",
    "mlm_layer.ln.weight": "head.norm.weight",
    "mlm_layer.ln.bias": "head.norm.bias",
    "mlm_layer.bias": "head.bias",
}


def official_state(obj: Any) -> dict:
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        return {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def recognise(obj: Any) -> bool:
    state = official_state(obj)
    return (isinstance(state, dict) and "token_emb.word_embeddings.weight" in state
            and "context_embed.word_embeddings.weight" in state and "mlm_layer.bias" in state)


def map_key(key: str) -> str | None:
    """Tessera's name for an official key (None: no counterpart)."""
    if key in TOP_KEYS:
        return TOP_KEYS[key]
    m = re.fullmatch(r"(in_blocks\.\d+|mid_block|out_blocks\.\d+)\.(.+)", key)
    if m and m.group(2) in BLOCK_KEYS:
        return f"{m.group(1)}.{BLOCK_KEYS[m.group(2)]}"
    return None


def official_config(state: dict, source: str) -> MaskGITConfig:
    try:
        rows, dim = state["token_emb.word_embeddings.weight"].shape
        positions = state["token_emb.position_embeddings.weight"].shape[0]
        classes = state["context_embed.word_embeddings.weight"].shape[0]
        depth = 2 * len({k.split(".")[1] for k in state if k.startswith("in_blocks.")})
        mlp_hidden = state["mid_block.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as e:
        raise HubError(f"{source}: not a U-ViT MaskGIT state dict ({e})") from None
    side = math.isqrt(positions)
    if side * side != positions:
        raise HubError(f"{source}: {positions} token positions is not a square grid")
    if dim not in HEADS_BY_WIDTH:
        raise HubError(f"{source}: width {dim} is not the released U-ViT MaskGIT's (768); its number of heads "
                       f"is not stored in the file")
    return MaskGITConfig(tokenizer=None, num_classes=classes - 1, vocab_size=rows - 1, grid=(side, side),
                         downsample=DOWNSAMPLE, dim=dim, depth=depth, heads=HEADS_BY_WIDTH[dim],
                         mlp_ratio=mlp_hidden / dim, skip="out_blocks.0.skip_linear.weight" in state)


def from_official(obj: Any, path: str | Path) -> MaskGIT:
    """Build the Tessera model for `nnet_ema.pth` (already read with weights_only=True)."""
    path = Path(path)
    state = official_state(obj)
    with torch.device("meta"):  # every weight comes from the file: skip the random initialisation
        model = MaskGIT(official_config(state, path.name))
    mapped = {}
    for key, value in state.items():
        new = map_key(key)
        if new is None:
            raise HubError(f"{path.name}: unexpected key {key!r} (no counterpart in the U-ViT MaskGIT)")
        mapped[new] = value.reshape(-1) if key == "mlm_layer.bias" else value  # stored as (1, 1, rows)
    check_state_dict(model.state_dict(), mapped, path.name)
    model.load_state_dict({k: v.to(torch.float32) for k, v in mapped.items()}, assign=True)
    return model.eval()


register_official("maskgit-uvit", kind="generator", recognise=recognise, load=from_official)

"""Import LlamaGen's released class-conditional GPT checkpoints (c2i_B_256.pt ... c2i_3B_384.pt).

The DDP files hold ``{"model": state_dict, ...}``, the FSDP ones (XXL, 3B) the state dict itself.
Key names map one to one (table below); the configuration comes from the shapes:

* width from `tok_embeddings.weight`, vocabulary from `output.weight`, classes from the class
  table (its last row is the null class), layers by counting `layers.N.`, SwiGLU width from
  `feed_forward.w1.weight`;
* heads from the width, by LlamaGen's own size table (width / 64, except GPT-3B: 3200 wide with
  32 heads, and GPT-7B: 4096 with 32); a width not in that table is refused;
* the token grid is not stored (LlamaGen's rotary table is not a buffer in the released files).
  It is read from a `freqs_cis` entry when a checkpoint has one, else from the file name's image
  size: `..._256.pt` is a 16 x 16 grid, `..._384.pt` 24 x 24 (the tokenizer's 16x downsampling).
  Keep the official file names, or the import stops and says so.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from generators.ar.model import OFFICIAL_SIZES, LlamaGenConfig, LlamaGenGPT
from vision.hub import HubError, check_state_dict, register_official

HEADS_BY_WIDTH = {dim: heads for _, heads, dim in OFFICIAL_SIZES.values()}
DOWNSAMPLE = 16  # every released c2i GPT was trained on VQ-16 tokens
IMAGE_SIZES = (256, 384, 512)

# official key (after "layers.N.") -> Tessera key (after "blocks.N.")
BLOCK_KEYS = {
    "attention.wqkv.weight": "attn.qkv.weight",
    "attention.wo.weight": "attn.proj.weight",
    "feed_forward.w1.weight": "ffn.w1.weight",
    "feed_forward.w2.weight": "ffn.w2.weight",
    "feed_forward.w3.weight": "ffn.w3.weight",
    "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
TOP_KEYS = {
    "cls_embedding.embedding_table.weight": "class_embed.weight",
    "tok_embeddings.weight": "token_embed.weight",
    "norm.weight": "norm.weight",
    "output.weight": "head.weight",
}


def official_state(obj: Any) -> dict:
    """The state dict inside a DDP ``{"model": ...}`` file, or the FSDP file itself."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj["model"]
    return obj


def recognise(obj: Any) -> bool:
    state = official_state(obj)
    return (isinstance(state, dict) and "tok_embeddings.weight" in state
            and "cls_embedding.embedding_table.weight" in state and "layers.0.attention.wqkv.weight" in state)


def map_key(key: str) -> str | None:
    """Tessera's name for an official key (None: not a key of the class-conditional GPT)."""
    if key in TOP_KEYS:
        return TOP_KEYS[key]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    if m and m.group(2) in BLOCK_KEYS:
        return f"blocks.{m.group(1)}.{BLOCK_KEYS[m.group(2)]}"
    return None


def grid_from_name(path: Path) -> int | None:
    sizes = [int(s) for s in re.findall(r"\d+", path.stem) if int(s) in IMAGE_SIZES]
    return sizes[-1] // DOWNSAMPLE if sizes else None


def official_config(state: dict, path: Path) -> LlamaGenConfig:
    source = path.name
    try:
        vocab, dim = state["output.weight"].shape
        n_layer = len({k.split(".")[1] for k in state if k.startswith("layers.")})
        rows = state["cls_embedding.embedding_table.weight"].shape[0]
        ffn_hidden = state["layers.0.feed_forward.w1.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as e:
        raise HubError(f"{source}: not a LlamaGen class-conditional GPT state dict ({e})") from None
    if dim not in HEADS_BY_WIDTH:
        raise HubError(f"{source}: width {dim} is not one of LlamaGen's GPT sizes "
                       f"({', '.join(map(str, sorted(HEADS_BY_WIDTH)))}); cannot tell its number of heads")
    heads = HEADS_BY_WIDTH[dim]
    if "freqs_cis" in state:
        side = round((state["freqs_cis"].shape[0] - 1) ** 0.5)
    else:
        side = grid_from_name(path)
    if side is None:
        raise HubError(f"{source}: LlamaGen checkpoints do not store their image size; keep the official file name "
                       f"ending in _256 or _384 (e.g. c2i_B_256.pt) so the token grid is known")
    return LlamaGenConfig(tokenizer=None, num_classes=rows - 1, vocab_size=vocab, grid=side, downsample=DOWNSAMPLE,
                          dim=dim, n_layer=n_layer, n_head=heads, ffn_hidden=ffn_hidden, class_dropout_prob=0.1)


def from_official(obj: Any, path: str | Path) -> LlamaGenGPT:
    """Build the Tessera model for an official checkpoint (already read with weights_only=True)."""
    path = Path(path)
    state = official_state(obj)
    config = official_config(state, path)
    with torch.device("meta"):  # every weight comes from the file: skip the random initialisation
        model = LlamaGenGPT(config)
    mapped = {}
    for key, value in state.items():
        if key == "freqs_cis":  # older files carry the rotary table; Tessera recomputes it
            if tuple(value.shape) != tuple(model.rope.shape):
                raise HubError(f"{path.name}: freqs_cis has shape {tuple(value.shape)}, "
                               f"expected {tuple(model.rope.shape)}")
            continue
        new = map_key(key)
        if new is None:
            raise HubError(f"{path.name}: unexpected key {key!r} (no counterpart in LlamaGen's class-conditional GPT)")
        mapped[new] = value
    check_state_dict(model.state_dict(), mapped, path.name)
    model.load_state_dict({k: v.float() for k, v in mapped.items()}, assign=True)  # float32, as LlamaGen computes
    model.rope = model.rotary_table()  # the one buffer not in the file
    return model.eval()


register_official("llamagen-gpt", kind="generator", recognise=recognise, load=from_official)

"""Import VAR's released transformers (FoundationVision/VAR: var_d16.pth, var_d20.pth, var_d24.pth,
var_d30.pth; CoDe's fine-tuned drafter_N.pth / refiner_N.pth have the same layout).

Each file is a plain state dict of `models/var.py`'s VAR (220 keys for d16). The configuration comes from the
shapes: depth by counting `blocks.N.`, width and classes from `class_emb.weight` (its last row is the null
class), heads from `scale_mul_1H11` (official: heads = depth, width = 64 depth; a file without it, which VAR
never released, gets heads = depth), vocabulary from `head.weight`, code width from `word_embed.weight`, FFN ratio
from `ffn.fc1.weight`, and the scales from the `lvl_1L` buffer (how many positions each level holds: pn^2). Key names map one to one except

* `blocks.N.attn.mat_qkv.weight` -> `blocks.N.attn.qkv.weight`, `scale_mul_1H11` -> `log_head_scale`,
  `blocks.N.ada_lin.*` -> `blocks.N.adaln.ada_lin.*` (vision.nn's names);
* the buffers `attn_bias_for_masking`, `lvl_1L` and `blocks.N.attn.zero_k_bias` are recomputed by Tessera:
  the importer checks the file's copies equal them and refuses the file otherwise.

The VQVAE ships apart (`vae_ch160v4096z32.pth`, generators/var/vqvae.py): pass it with --vae.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from generators.var.model import VAR, VARConfig
from vision.hub import HubError, check_state_dict, register_official
from vision.nn import block_causal_mask

DOWNSAMPLE = 16  # every released VAR was trained on the f16 VQVAE
BUFFERS = ("attn_bias_for_masking", "lvl_1L")

# official key (after "blocks.N.") -> Tessera key (after "blocks.N."); None: a recomputed buffer
BLOCK_KEYS = {
    "attn.mat_qkv.weight": "attn.qkv.weight",
    "attn.scale_mul_1H11": "attn.log_head_scale",
    "attn.q_bias": "attn.q_bias",
    "attn.v_bias": "attn.v_bias",
    "attn.zero_k_bias": None,
    "attn.proj.weight": "attn.proj.weight",
    "attn.proj.bias": "attn.proj.bias",
    "ffn.fc1.weight": "ffn.fc1.weight",
    "ffn.fc1.bias": "ffn.fc1.bias",
    "ffn.fc2.weight": "ffn.fc2.weight",
    "ffn.fc2.bias": "ffn.fc2.bias",
    "ada_lin.1.weight": "adaln.ada_lin.1.weight",
    "ada_lin.1.bias": "adaln.ada_lin.1.bias",
    "ada_gss": "ada_gss",  # shared_aln
}
TOP_KEYS = ("pos_start", "pos_1LC", "word_embed.weight", "word_embed.bias", "class_emb.weight", "lvl_embed.weight",
            "head_nm.ada_lin.1.weight", "head_nm.ada_lin.1.bias", "head.weight", "head.bias",
            "shared_ada_lin.1.weight", "shared_ada_lin.1.bias")


def official_state(obj: Any) -> dict:
    """The state dict itself, or a training file's `{"trainer": {"var_wo_ddp": ...}}` / `{"model": ...}`."""
    if isinstance(obj, dict):
        trainer = obj.get("trainer")
        if isinstance(trainer, dict) and isinstance(trainer.get("var_wo_ddp"), dict):
            return trainer["var_wo_ddp"]
        if isinstance(obj.get("model"), dict):
            return obj["model"]
    return obj


def recognise(obj: Any) -> bool:
    state = official_state(obj)
    return (isinstance(state, dict) and "class_emb.weight" in state and "pos_1LC" in state
            and "lvl_embed.weight" in state and "blocks.0.attn.mat_qkv.weight" in state)


def map_key(key: str) -> str | None:
    """Tessera's name for an official key; None for a buffer Tessera recomputes; KeyError if unknown."""
    if key in BUFFERS:
        return None
    if key in TOP_KEYS:
        return key
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if m and m.group(2) in BLOCK_KEYS:
        new = BLOCK_KEYS[m.group(2)]
        return None if new is None else f"blocks.{m.group(1)}.{new}"
    raise KeyError(key)


def levels_of(patch_nums) -> torch.Tensor:
    """The level (scale index) of each of the L positions: official lvl_1L without its leading 1."""
    return torch.cat([torch.full((pn * pn,), i, dtype=torch.long) for i, pn in enumerate(patch_nums)])


def patch_nums_from_levels(levels: torch.Tensor, source: str) -> tuple[int, ...]:
    """The scales from lvl_1L (the level of each of the L positions, in order): pn_k = sqrt(count of level k)."""
    flat = levels.reshape(-1).tolist()
    counts = [flat.count(k) for k in range(max(flat) + 1)]
    if flat != sorted(flat) or any(math.isqrt(n) ** 2 != n for n in counts):
        raise HubError(f"{source}: lvl_1L is not a VAR level layout")
    return tuple(math.isqrt(n) for n in counts)


def official_config(state: dict, source: str) -> VARConfig:
    try:
        rows, width = state["class_emb.weight"].shape
        vocab = state["head.weight"].shape[0]
        cvae = state["word_embed.weight"].shape[1]
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        hidden = state["blocks.0.ffn.fc1.weight"].shape[0]
        l2 = "blocks.0.attn.scale_mul_1H11" in state
        # without L2-normalised attention (no released file) the file does not say: build_vae_var's heads = depth
        heads = state["blocks.0.attn.scale_mul_1H11"].shape[1] if l2 else depth
        levels = state["lvl_1L"]
    except (KeyError, ValueError, IndexError, AttributeError) as e:
        raise HubError(f"{source}: not a VAR transformer state dict (missing or odd {e})") from None
    if levels.is_meta:  # shapes only (tests of the key list): the official scales when the length fits
        if levels.shape[-1] != sum(p * p for p in VARConfig.patch_nums):
            raise HubError(f"{source}: cannot read the scales from a meta lvl_1L")
        patch_nums = VARConfig.patch_nums
    else:
        patch_nums = patch_nums_from_levels(levels, source)
    return VARConfig(tokenizer=None, num_classes=rows - 1, vocab_size=vocab, cvae=cvae, patch_nums=patch_nums,
                     downsample=DOWNSAMPLE, depth=depth, embed_dim=width, num_heads=heads, mlp_ratio=hidden / width,
                     drop_path_rate=0.1 * depth / 24, shared_aln="blocks.0.ada_gss" in state, attn_l2_norm=l2,
                     cond_drop_rate=0.1)


def from_official(obj: Any, path: str | Path) -> VAR:
    """Build the Tessera model for an official VAR state dict (already read with weights_only=True)."""
    path = Path(path)
    state = official_state(obj)
    config = official_config(state, path.name)
    with torch.device("meta"):  # every weight comes from the file
        model = VAR(config)
    mapped = {}
    for key, value in state.items():
        try:
            new = map_key(key)
        except KeyError:
            raise HubError(f"{path.name}: unexpected key {key!r} (no counterpart in VAR)") from None
        if new is None:
            _check_buffer(key, value, config, path.name)
            continue
        mapped[new] = value
    check_state_dict(model.state_dict(), mapped, path.name)
    model.load_state_dict({k: v.float() for k, v in mapped.items()}, assign=True)
    for block in model.blocks:  # the one buffer left on the meta device
        block.attn.zero_k_bias = torch.zeros(config.embed_dim)
    return model.eval()


def _check_buffer(key: str, value: torch.Tensor, config: VARConfig, source: str) -> None:
    """The file's copy of a buffer Tessera recomputes must be what Tessera computes."""
    L = sum(p * p for p in config.patch_nums)
    if value.is_meta:
        return
    if key.endswith("zero_k_bias"):
        ok = value.shape == (config.embed_dim,) and not value.any()
    elif key == "lvl_1L":
        ok = value.shape == (1, L) and torch.equal(value.reshape(-1).long().cpu(), levels_of(config.patch_nums))
    else:  # attn_bias_for_masking: 0 where a position may attend (its scale and earlier ones), -inf elsewhere
        allowed = block_causal_mask([pn * pn for pn in config.patch_nums])
        ok = value.shape == (1, 1, L, L) and torch.equal(value.reshape(L, L).cpu() == 0, allowed) and bool(
            torch.isneginf(value.reshape(L, L).cpu()[~allowed]).all())
    if not ok:
        raise HubError(f"{source}: buffer {key!r} is not what VAR computes for scales {config.patch_nums}")


register_official("var", kind="generator", recognise=recognise, load=from_official)

"""Import LTH14/mar's released checkpoints: `mar_base`, `mar_large`, `mar_huge` `checkpoint-last.pth`.

A file holds `{"model": state, "model_ema": state, "optimizer", "epoch", "scaler", "args"}` (`util/misc.py`
`save_model`; `args` is the training `argparse.Namespace`, which `vision.hub.load_official_state_dict`
allows under `weights_only`, nothing else). The authors evaluate the EMA weights, and so does the import
by default; `load(path, weights="model")` (or the environment variable `TESSERA_MAR_WEIGHTS=model` for
the apps) takes the raw ones. A bare state dict is accepted too.

Tessera's MAR uses the official parameter names, so every key maps to itself; the import checks every
name and shape (`check_state_dict`) and refuses anything left over or missing. The configuration comes
from the shapes (widths, depths, token size, sequence and buffer lengths, classes, MLP ratio, diffusion
MLP width and depth) and, where the file has them, the training arguments (patch size, VAE stride and
channels, the model name -- the number of heads is not stored in the weights: 12 for `mar_base`, 16 for
the others, as `models/mar.py` builds them). Its tokens are the KL-16 VAE's latents times 0.2325; the VAE
ships apart (`--vae kl16.ckpt`). Sampling defaults are the README's evaluation settings: cfg 2.9 / 3.0 /
3.2 (base / large / huge) with the linear schedule, temperature 1.0, 100 diffusion steps, and 64
autoregressive steps (the faster setting; 256 for the best FID).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from generators.mar.model import MAR, MARConfig
from vision.hub import HubError, check_state_dict, load_official_state_dict, register_official

HEADS_BY_MODEL = {"mar_base": 12, "mar_large": 16, "mar_huge": 16}
HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16}
CFG_BY_WIDTH = {768: 2.9, 1024: 3.0, 1280: 3.2}
WEIGHTS = ("model_ema", "model")
SIGNATURE = ("z_proj.weight", "encoder_pos_embed_learned", "diffusion_pos_embed_learned",
             "diffloss.net.input_proj.weight")


def _is_state(obj: Any) -> bool:
    return isinstance(obj, dict) and all(k in obj for k in SIGNATURE)


def recognise(obj: Any) -> bool:
    if _is_state(obj):
        return True
    return isinstance(obj, dict) and any(_is_state(obj.get(k)) for k in WEIGHTS)


def official_state(obj: Any, weights: str, source: str) -> dict:
    if weights not in WEIGHTS:
        raise HubError(f"weights must be one of {', '.join(WEIGHTS)}; got {weights!r}")
    if _is_state(obj):
        return obj
    state = obj.get(weights) if isinstance(obj, dict) else None
    if not _is_state(state):
        raise HubError(f"{source}: holds no {weights!r} state dict of MAR")
    return state


def _args(obj: Any) -> dict:
    args = obj.get("args") if isinstance(obj, dict) else None
    return dict(vars(args)) if args is not None and hasattr(args, "__dict__") else {}


def official_config(state: dict, args: dict, source: str) -> MARConfig:
    try:
        n_pos, enc_dim = state["encoder_pos_embed_learned"].shape[1:]
        seq_len, dec_dim = state["diffusion_pos_embed_learned"].shape[1:]
        token_dim = state["z_proj.weight"].shape[1]
        classes = state["class_emb.weight"].shape[0]
        enc_depth = len({k.split(".")[1] for k in state if k.startswith("encoder_blocks.")})
        dec_depth = len({k.split(".")[1] for k in state if k.startswith("decoder_blocks.")})
        mlp_hidden = state["encoder_blocks.0.mlp.fc1.weight"].shape[0]
        diff_width = state["diffloss.net.input_proj.weight"].shape[0]
        diff_depth = len({k.split(".")[3] for k in state if k.startswith("diffloss.net.res_blocks.")})
    except (KeyError, ValueError, IndexError) as e:
        raise HubError(f"{source}: not a MAR state dict ({e})") from None
    patch = int(args.get("patch_size", 1))
    channels = int(args.get("vae_embed_dim", token_dim // (patch * patch)))
    if channels * patch * patch != token_dim:
        raise HubError(f"{source}: tokens of {token_dim} values do not match vae_embed_dim {channels} x patch "
                       f"{patch}^2 of its arguments")
    side = math.isqrt(seq_len)
    if side * side != seq_len:
        raise HubError(f"{source}: {seq_len} token positions is not a square grid")
    name = str(args.get("model", ""))
    heads = HEADS_BY_MODEL.get(name) or HEADS_BY_WIDTH.get(enc_dim)
    if heads is None or enc_dim % heads or dec_dim % heads:
        raise HubError(f"{source}: width {enc_dim} is not that of mar_base/large/huge and the file does not name "
                       "its model; the number of heads is not stored in the weights")
    sampling = {"steps": 64, "diffusion_steps": 100, "cfg": CFG_BY_WIDTH.get(enc_dim, 1.0), "cfg_schedule": "linear",
                "temperature": 1.0}
    return MARConfig(
        tokenizer=None, num_classes=classes, grid=(side * patch, side * patch),
        downsample=int(args.get("vae_stride", 16)), channels=channels, patch_size=patch,
        encoder_dim=enc_dim, encoder_depth=enc_depth, encoder_heads=heads,
        decoder_dim=dec_dim, decoder_depth=dec_depth, decoder_heads=heads, mlp_ratio=mlp_hidden / enc_dim,
        buffer_size=n_pos - seq_len, diffloss_depth=diff_depth, diffloss_width=diff_width,
        diffusion_batch_mul=int(args.get("diffusion_batch_mul", 4)),
        mask_ratio_min=float(args.get("mask_ratio_min", 0.7)), label_drop_prob=float(args.get("label_drop_prob", 0.1)),
        attn_dropout=float(args.get("attn_dropout", 0.1)), proj_dropout=float(args.get("proj_dropout", 0.1)),
        sampling=sampling)


def from_official(obj: Any, path: str | Path, weights: str | None = None) -> MAR:
    """Tessera's MAR for a released checkpoint (already read with weights_only=True)."""
    path = Path(path)
    weights = weights or os.environ.get("TESSERA_MAR_WEIGHTS", "model_ema")
    weights = {"ema": "model_ema"}.get(weights, weights)
    state = official_state(obj, weights, path.name)
    state = {re.sub(r"^module\.", "", k): v for k, v in state.items()}
    with torch.device("meta"):  # every weight comes from the file
        model = MAR(official_config(state, _args(obj), path.name))
    check_state_dict(model.state_dict(), state, path.name)
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, assign=True)
    return model.eval()


def load(path: str | os.PathLike, weights: str = "model_ema") -> MAR:
    """Read a released checkpoint with `weights` "model_ema" (the default, as the authors evaluate) or "model"."""
    return from_official(load_official_state_dict(path), path, weights)


register_official("mar", kind="generator", recognise=recognise, load=from_official)

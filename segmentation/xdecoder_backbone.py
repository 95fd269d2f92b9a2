"""FocalNet with depth-wise convolutions ("focal_dw"): X-Decoder's image backbone.

Yang et al., "Focal Modulation Networks" (NeurIPS 2022), as used by Zou et al., "Generalized
Decoding for Pixel, Image, and Language" (X-Decoder, CVPR 2023). Official code microsoft/X-Decoder,
branch v2.0, `modeling/vision/backbone/focal_dw.py` (`D2FocalNet`, built by `get_focal_backbone`
for `BACKBONE.NAME: focal_dw`); Focal-T is configs/xdecoder/focalt_unicl_lang.yaml. Module and
parameter names are the official ones, so the `backbone.` part of a released state dict loads
without renaming.

Conventions of the official code, kept as they are:

- Stem and downsampling are `PatchEmbed`s. With `use_conv_embed` the stem is a 7x7 stride-4 conv
  (padding 3) and each downsampling a 3x3 stride-2 conv (padding 1), each followed by a LayerNorm
  over channels. Before each conv the input is zero-padded at the bottom/right to a multiple of
  the patch size (4 for the stem, 2 after), so any H, W work: the grids are ceil(H/4), then
  halved with ceil at each stage.
- Downsampling sits at the *end* of stages 0-2 (`layers.i.downsample`), and stage i's output is
  taken before it, through its own LayerNorm `norm{i}`; these are "res2".."res5" (strides 4-32).
- A block ("DW" variant): x += dw1(x) (3x3 depth-wise conv with bias) -> focal modulation ->
  x += dw2(x) -> MLP. With `use_postln` (Focal-T) the norms come after each residual sum
  (x = norm1(x + g1 * FM(x)); x = norm2(x + g2 * MLP(x))), else before the branch. The layer
  scales `gamma_1`, `gamma_2` start at 1e-4. The depth-wise convs are not normalised or scaled.
- Focal modulation: one linear `f` gives the query, the context and L+1 gates; L depth-wise convs
  (kernel focal_window + 2k, no bias, each followed by GELU) are applied in sequence to the
  context, each level's output gated and summed, plus the GELU of the spatial mean of the last
  level, gated; with `scaling_modulator` the sum is divided by L+1. The query is multiplied by the
  1x1 conv `h` of that sum, then projected by the linear `proj`.

Why not timm's FocalNet (timm.models.focalnet): it is a different layout of the same idea. timm
keeps NCHW and uses 1x1 convs for `f`/`proj` and the MLP (weights (out, in, 1, 1), not (out, in)),
names the post-norms `norm1_post`/`norm2_post` and the layer scales `ls1.gamma`, moves the
downsampling to the start of the next stage, and has no depth-wise `dw1`/`dw2` convs at all. So
its blocks can neither load the official weights nor compute the focal_dw block. Only timm's
`Mlp` (fc1 -> GELU -> fc2, the official names and maths) and `DropPath` are reused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import Tensor, nn

__all__ = ["FocalModulation", "FocalModulationBlock", "BasicLayer", "PatchEmbed", "FocalNetDW"]


def _to_channels_last(x: Tensor) -> Tensor:
    return x.permute(0, 2, 3, 1)


def _to_channels_first(x: Tensor) -> Tensor:
    return x.permute(0, 3, 1, 2)


class FocalModulation(nn.Module):
    """Focal modulation on a (B, H, W, C) map."""

    def __init__(self, dim: int, focal_level: int, focal_window: int, focal_factor: int = 2,
                 proj_drop: float = 0.0, use_postln_in_modulation: bool = False, scaling_modulator: bool = False):
        super().__init__()
        self.focal_level = focal_level
        self.scaling_modulator = scaling_modulator
        self.f = nn.Linear(dim, 2 * dim + focal_level + 1)
        self.h = nn.Conv2d(dim, dim, kernel_size=1)
        self.act = nn.GELU()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.focal_layers = nn.ModuleList()
        for k in range(focal_level):
            kernel = focal_window + focal_factor * k
            self.focal_layers.append(nn.Sequential(
                nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim, bias=False), nn.GELU()))
        self.ln = nn.LayerNorm(dim) if use_postln_in_modulation else None

    def forward(self, x: Tensor) -> Tensor:
        dim = x.shape[-1]
        q, ctx, gates = _to_channels_first(self.f(x)).split((dim, dim, self.focal_level + 1), dim=1)
        ctx_all = 0
        for level, layer in enumerate(self.focal_layers):
            ctx = layer(ctx)
            ctx_all = ctx_all + ctx * gates[:, level:level + 1]
        ctx_global = self.act(ctx.mean(dim=(2, 3), keepdim=True))
        ctx_all = ctx_all + ctx_global * gates[:, self.focal_level:]
        if self.scaling_modulator:
            ctx_all = ctx_all / (self.focal_level + 1)
        out = _to_channels_last(q * self.h(ctx_all))
        if self.ln is not None:
            out = self.ln(out)
        return self.proj_drop(self.proj(out))


class FocalModulationBlock(nn.Module):
    """dw1 -> focal modulation -> dw2 -> MLP on a (B, H, W, C) map (see the module docstring)."""

    def __init__(self, dim: int, focal_level: int, focal_window: int, mlp_ratio: float = 4.0, drop: float = 0.0,
                 drop_path: float = 0.0, use_postln: bool = False, use_postln_in_modulation: bool = False,
                 scaling_modulator: bool = False, use_layerscale: bool = False, layerscale_value: float = 1e-4):
        super().__init__()
        self.use_postln = use_postln
        self.dw1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.modulation = FocalModulation(dim, focal_level, focal_window, proj_drop=drop,
                                          use_postln_in_modulation=use_postln_in_modulation,
                                          scaling_modulator=scaling_modulator)
        self.dw2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if use_layerscale:
            self.gamma_1 = nn.Parameter(torch.full((dim,), layerscale_value))
            self.gamma_2 = nn.Parameter(torch.full((dim,), layerscale_value))
        else:
            self.gamma_1 = self.gamma_2 = None

    def _scale(self, x: Tensor, gamma: Tensor | None) -> Tensor:
        return self.drop_path(x if gamma is None else gamma * x)

    @staticmethod
    def _depthwise_residual(x: Tensor, conv: nn.Conv2d) -> Tensor:
        return x + _to_channels_last(conv(_to_channels_first(x)))

    def forward(self, x: Tensor) -> Tensor:
        x = self._depthwise_residual(x, self.dw1)
        if self.use_postln:
            x = self.norm1(x + self._scale(self.modulation(x), self.gamma_1))
        else:
            x = x + self._scale(self.modulation(self.norm1(x)), self.gamma_1)
        x = self._depthwise_residual(x, self.dw2)
        if self.use_postln:
            return self.norm2(x + self._scale(self.mlp(x), self.gamma_2))
        return x + self._scale(self.mlp(self.norm2(x)), self.gamma_2)


class PatchEmbed(nn.Module):
    """Pad to a multiple of the patch size, conv, LayerNorm over channels: (B, C, H, W) -> (B, C', H', W')."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, use_conv_embed: bool, is_stem: bool,
                 norm: bool = True):
        super().__init__()
        self.patch_size = patch_size
        if use_conv_embed:  # overlapping convs: 7x7/4 for the stem, 3x3/2 between stages
            kernel, stride, padding = (7, 4, 3) if is_stem else (3, 2, 1)
        else:
            kernel, stride, padding = patch_size, patch_size, 0
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch_size
        x = F.pad(x, (0, -x.shape[-1] % p, 0, -x.shape[-2] % p))
        x = self.proj(x)
        if self.norm is not None:
            x = _to_channels_first(self.norm(_to_channels_last(x)))
        return x


class BasicLayer(nn.Module):
    """One stage: blocks, then (stages 0-2) the downsampling PatchEmbed."""

    def __init__(self, dim: int, depth: int, drop_path: list[float], downsample: bool, use_conv_embed: bool,
                 patch_norm: bool = True, **block_kwargs):
        super().__init__()
        self.blocks = nn.ModuleList(
            FocalModulationBlock(dim, drop_path=drop_path[i], **block_kwargs) for i in range(depth))
        self.downsample = (PatchEmbed(2, dim, 2 * dim, use_conv_embed, is_stem=False, norm=patch_norm)
                           if downsample else None)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B, H, W, C) -> (stage output (B, H, W, C), downsampled (B, C2, H2, W2) or None)."""
        for block in self.blocks:
            x = block(x)
        down = self.downsample(_to_channels_first(x)) if self.downsample is not None else None
        return x, down


class FocalNetDW(nn.Module):
    """The focal_dw backbone; `forward` gives {"res2": (B, C, H/4, W/4), ..., "res5": (B, 8C, H/32, W/32)}.

    The input is the normalised image ((x - mean) / std in 0-255 units, as X-Decoder does before
    the backbone). Sizes are ceil-divided, e.g. H = 50 gives 13, 7, 4, 2.
    """

    def __init__(self, embed_dim: int = 96, depths: tuple[int, ...] = (2, 2, 6, 2),
                 focal_levels: tuple[int, ...] = (3, 3, 3, 3), focal_windows: tuple[int, ...] = (3, 3, 3, 3),
                 mlp_ratio: float = 4.0, drop_rate: float = 0.0, drop_path_rate: float = 0.3, patch_size: int = 4,
                 in_chans: int = 3, patch_norm: bool = True, use_conv_embed: bool = True, use_postln: bool = True,
                 use_postln_in_modulation: bool = False, use_layerscale: bool = True, scaling_modulator: bool = True,
                 out_indices: tuple[int, ...] = (0, 1, 2, 3)):
        super().__init__()
        n = len(depths)
        if not (len(focal_levels) == len(focal_windows) == n) or any(i not in range(n) for i in out_indices):
            raise ValueError(f"depths {depths}, focal_levels {focal_levels}, focal_windows {focal_windows} need "
                             f"one entry per stage and out_indices {out_indices} must name stages")
        self.out_indices = tuple(out_indices)
        self.num_features = [embed_dim * 2 ** i for i in range(n)]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, use_conv_embed, is_stem=True, norm=patch_norm)
        self.pos_drop = nn.Dropout(drop_rate)
        total = sum(depths)  # stochastic depth rises linearly over all blocks, 0 to drop_path_rate
        rates = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.layers.append(BasicLayer(
                self.num_features[i], depth, rates[start:start + depth], downsample=i < n - 1,
                use_conv_embed=use_conv_embed, patch_norm=patch_norm, focal_level=focal_levels[i],
                focal_window=focal_windows[i], mlp_ratio=mlp_ratio, drop=drop_rate, use_postln=use_postln,
                use_postln_in_modulation=use_postln_in_modulation, scaling_modulator=scaling_modulator,
                use_layerscale=use_layerscale))
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.out_channels = {f"res{i + 2}": self.num_features[i] for i in self.out_indices}
        self.strides = {f"res{i + 2}": patch_size * 2 ** i for i in self.out_indices}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.ndim != 4:
            raise ValueError(f"FocalNetDW expects (B, C, H, W), got {tuple(x.shape)}")
        x = self.pos_drop(self.patch_embed(x))
        outs = {}
        for i, layer in enumerate(self.layers):
            stage, x = layer(_to_channels_last(x))
            if i in self.out_indices:
                outs[f"res{i + 2}"] = _to_channels_first(getattr(self, f"norm{i}")(stage)).contiguous()
        return outs

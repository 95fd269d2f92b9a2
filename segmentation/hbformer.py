"""HBFormer: a Swin-T encoder with a multi-scale feature-fusion (MFF) decoder, for 2-D slices.

Zheng et al., "HBFormer: A Hybrid-Bridge Transformer for Microtumor and Miniature Organ
Segmentation" (BIBM 2025, arXiv:2512.03597); official code lzeeorno/HBFormer
(`models/HBFormer.py`, `models/swin_backbone.py`). Module names and the order of operations
follow the official code so that its checkpoints load unchanged (`from_official`).

Pipeline (official behaviour, kept as is):
- input: one CT slice in [0, 1] becomes the 3-channel "pseudo-HDR" stack (slice,
  clamp(1.2 * slice, 0, 1), 3x3 average of the slice) -- done by the official data loader, here by
  `pseudo_hdr` inside `forward` when `config.pseudo_hdr` -- then a 1x1 `input_proj` (3 -> 3);
- encoder `MWAencoder.backbone`: timm Swin-T (embed 96, depths 2-2-6-2, heads 3-6-12-24, patch 4,
  drop path 0.2), window = the first of 7, 8, 6, 5, 4 that divides img_size / 4; the raw stage
  outputs (no final norm) c1..c4 = 96/192/384/768 channels at 1/4..1/32;
- decoder: four `MFF_Decoder`s (ConvTranspose2d k2 s2 -> concat skip -> `LRD_Block` -> `Med_DSPP`
  -> ReLU -> BN). The official wiring is shifted by one level: decoder 4 takes c4 with skip c3,
  decoder 3 takes the 1x1 projection of c3 (feature_size*4) upsampled x2 as its skip, decoder 2 the
  projection of c2 upsampled x2, decoder 1 the projection of c1 upsampled x2 (bilinear,
  align_corners=True). `proj_enc4` and the Swin final norm exist but are unused. 36.71 M
  parameters at the defaults (the "30.05 M" in a comment of the official file does not match its
  current code, which gives 36.71 M too);
- head `out`: ConvTranspose2d(48, 48, k4, s2, p1, no bias) + 1x1 conv to the classes (full size).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vision.hub import HubError, check_state_dict, load_official_state_dict, register_model, register_official

__all__ = ["HBFormerConfig", "HBFormer", "pseudo_hdr", "swin_window_size", "Med_DSPP", "from_official"]

WINDOW_CANDIDATES = (7, 8, 6, 5, 4)


def swin_window_size(img_size: int) -> int:
    """Official rule: the first of 7, 8, 6, 5, 4 that divides the 1/4 patch grid (img_size // 4)."""
    grid = img_size // 4
    for w in WINDOW_CANDIDATES:
        if grid % w == 0:
            return w
    raise ValueError(f"img_size {img_size}: img_size/4 = {grid} is not divisible by any of {WINDOW_CANDIDATES}")


def pseudo_hdr(x: Tensor) -> Tensor:
    """(B, 1, H, W) slice in [0, 1] -> (B, 3, H, W): [x, clamp(1.2x, 0, 1), avg_pool3x3(x)].

    As the official loaders (`datasets/dataset.py` RandomGenerator, `utils.test_single_volume`):
    the 3x3 average uses zero padding counted in the mean (F.avg_pool2d defaults).
    """
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"pseudo_hdr expects (B, 1, H, W), got {tuple(x.shape)}")
    smooth = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
    return torch.cat([x, torch.clamp(x * 1.2, 0, 1), smooth], dim=1)


@dataclass
class HBFormerConfig:
    in_channels: int = 1          # channels the model is called with (1 = a CT slice when pseudo_hdr)
    num_classes: int = 9          # Synapse: background + 8 organs
    img_size: int = 224           # square input size; the official Synapse setting is 256
    feature_size: int = 48
    pseudo_hdr: bool = True       # build the 3-channel pseudo-HDR input inside forward (needs in_channels=1)
    drop_path_rate: float = 0.2
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    dspp_rates: tuple[int, ...] = (1, 4, 8)
    dspp_experts: int = 4

    def __post_init__(self) -> None:
        if self.img_size % 4:
            raise ValueError(f"img_size must be a multiple of 4, got {self.img_size}")
        swin_window_size(self.img_size)  # raises on sizes the official rule cannot handle
        if self.pseudo_hdr and self.in_channels != 1:
            raise ValueError("pseudo_hdr=True builds 3 channels from one slice: in_channels must be 1")
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ValueError("HBFormer uses a 4-stage Swin encoder")

    @property
    def window_size(self) -> int:
        return swin_window_size(self.img_size)


# ---------------------------------------------------------------- decoder blocks (official names)


class ECALayer(nn.Module):
    """Efficient channel attention: GAP -> Conv1d(k3) over channels -> sigmoid -> scale."""

    def __init__(self, channels: int, k_size: int = 3):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, kernel_size=k_size, padding=(k_size - 1) // 2, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        y = self.avg_pool(x)  # (B, C, 1, 1)
        y = self.conv(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        return x * self.sigmoid(y)


def _gate(in_dims: int, n: int) -> nn.Sequential:
    """GAP -> 1x1 (C -> C/8) -> ReLU -> 1x1 (C/8 -> n) -> softmax over n (official layout)."""
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Conv2d(in_dims, in_dims // 8, 1),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_dims // 8, n, 1),
        nn.Softmax(dim=1),
    )


class Med_DSPP(nn.Module):  # noqa: N801  (official name, kept for checkpoint keys)
    """Dynamic dilated spatial pyramid pooling (official `Med_DSPP`).

    Branches with dilation rates (1, 4, 8); in each, `num_experts` depth-wise dilated 3x3 convs are
    mixed by one softmax gate, then `num_experts` point-wise 1x1 convs applied to that mixture are
    mixed by the same gate (the gate is shared by all branches); BN + SiLU; each branch is scaled
    by a second softmax gate over branches; concat -> ECA -> 1x1 fuse -> BN.
    """

    def __init__(self, in_dims: int, out_dims: int, rates: tuple[int, ...] = (1, 4, 8), num_experts: int = 4):
        super().__init__()
        self.rates = tuple(rates)
        self.num_experts = num_experts
        self.num_branches = len(rates)
        self.branch_attention = _gate(in_dims, self.num_branches)
        self.expert_attention = _gate(in_dims, num_experts)
        self.dw_experts = nn.ModuleList(
            nn.ModuleList(
                nn.Conv2d(in_dims, in_dims, 3, padding=r, dilation=r, groups=in_dims, bias=False)
                for _ in range(num_experts)
            )
            for r in rates
        )
        self.pw_experts = nn.ModuleList(
            nn.ModuleList(nn.Conv2d(in_dims, out_dims, 1, bias=False) for _ in range(num_experts)) for _ in rates
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(out_dims) for _ in rates)
        self.activations = nn.ModuleList(nn.SiLU(inplace=True) for _ in rates)
        self.eca = ECALayer(out_dims * self.num_branches)
        self.fuse = nn.Conv2d(out_dims * self.num_branches, out_dims, kernel_size=1, bias=False)
        self.fuse_bn = nn.BatchNorm2d(out_dims)

    @staticmethod
    def _mix(x: Tensor, convs: nn.ModuleList, weights: Tensor) -> Tensor:
        out = weights[:, 0:1] * convs[0](x)
        for i in range(1, len(convs)):
            out = out + weights[:, i : i + 1] * convs[i](x)
        return out

    def forward(self, x: Tensor) -> Tensor:
        branch_w = self.branch_attention(x)  # (B, branches, 1, 1)
        expert_w = self.expert_attention(x)  # (B, experts, 1, 1)
        feats = []
        for i in range(self.num_branches):
            dw = self._mix(x, self.dw_experts[i], expert_w)
            pw = self._mix(dw, self.pw_experts[i], expert_w)
            feats.append(self.activations[i](self.bns[i](pw)) * branch_w[:, i : i + 1])
        return self.fuse_bn(self.fuse(self.eca(torch.cat(feats, dim=1))))


class LRD_Block(nn.Module):  # noqa: N801
    """Long-range-dependency residual block: 3x3 conv-BN-LeakyReLU, 1x1 conv-BN, + 1x1 shortcut, LeakyReLU."""

    def __init__(self, inplanes: int, planes: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, padding=1, bias=False)
        self.relu = nn.LeakyReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=1, bias=False)
        self.conv_skip = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.conv_skip(x))


class MFF_Decoder(nn.Module):  # noqa: N801
    """ConvTranspose2d(k2, s2) -> concat skip -> LRD block -> Med_DSPP -> ReLU -> BN.

    Officially `MFF_Decoder(in_planes, out_planes)` with skips of in_planes - out_planes channels
    (the LRD block reads in_planes); `skip_planes` generalises that and defaults to it.
    """

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        skip_planes: int | None = None,
        rates: tuple[int, ...] = (1, 4, 8),
        num_experts: int = 4,
    ):
        super().__init__()
        skip_planes = in_planes - out_planes if skip_planes is None else skip_planes
        self.transp_conv = nn.ConvTranspose2d(in_planes, out_planes, kernel_size=2, stride=2)
        self.LRD_block = LRD_Block(out_planes + skip_planes, out_planes)
        self.Med_DSPP = Med_DSPP(out_planes, out_planes, rates, num_experts)
        self.ReLU = nn.ReLU(inplace=True)
        self.BN = nn.BatchNorm2d(out_planes)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.LRD_block(torch.cat([self.transp_conv(x), skip], dim=1))
        return self.BN(self.ReLU(self.Med_DSPP(x)))


# ---------------------------------------------------------------- encoder


class SwinEncoder(nn.Module):
    """timm Swin-T returning the four raw stage outputs (NCHW, no final norm), as `SwinBackbone`."""

    def __init__(self, config: HBFormerConfig):
        super().__init__()
        import timm  # imported here: it takes seconds, and every app's model lookup imports this module

        self.backbone = timm.create_model(
            "swin_tiny_patch4_window7_224",
            pretrained=False,
            num_classes=0,
            img_size=config.img_size,
            window_size=config.window_size,
            embed_dim=config.embed_dim,
            depths=config.depths,
            num_heads=config.num_heads,
            drop_path_rate=config.drop_path_rate,
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.backbone.forward_intermediates(x, norm=False, intermediates_only=True)


@register_model("hbformer")
class HBFormer(nn.Module):
    """HBFormer. `forward(x)`: (B, in_channels, S, S) with S = config.img_size -> logits (B, classes, S, S)."""

    config_class = HBFormerConfig

    def __init__(self, config: HBFormerConfig, backbone_weights: str | Path | None = None):
        super().__init__()
        self.config = config
        fs = config.feature_size
        dims = [config.embed_dim * 2**i for i in range(4)]
        rates, experts = tuple(config.dspp_rates), config.dspp_experts
        self.input_proj = nn.Conv2d(3 if config.pseudo_hdr else config.in_channels, 3, kernel_size=1)
        self.MWAencoder = SwinEncoder(config)
        self.proj_enc1 = nn.Conv2d(dims[0], fs, kernel_size=1)
        self.proj_enc2 = nn.Conv2d(dims[1], fs * 2, kernel_size=1)
        self.proj_enc3 = nn.Conv2d(dims[2], fs * 4, kernel_size=1)
        self.proj_enc4 = nn.Conv2d(dims[3], fs * 8, kernel_size=1)  # unused by the official forward
        # official wiring (see module docstring): decoder 4 fuses c4 with c3, the others fuse with
        # the upsampled projections of c3, c2, c1; at feature_size 48 these are the official shapes
        self.MFF_decoder4 = MFF_Decoder(dims[3], fs * 8, dims[2], rates, experts)
        self.MFF_decoder3 = MFF_Decoder(fs * 8, fs * 4, fs * 4, rates, experts)
        self.MFF_decoder2 = MFF_Decoder(fs * 4, fs * 2, fs * 2, rates, experts)
        self.MFF_decoder1 = MFF_Decoder(fs * 2, fs, fs, rates, experts)
        self.out = nn.Sequential(
            nn.ConvTranspose2d(fs, fs, kernel_size=4, stride=2, padding=1, bias=False),
            nn.Conv2d(fs, config.num_classes, 1),
        )
        if backbone_weights is not None:
            self.load_backbone_weights(backbone_weights)

    def forward(self, x: Tensor) -> Tensor:
        if self.config.pseudo_hdr:
            x = pseudo_hdr(x)
        c1, c2, c3, c4 = self.MWAencoder(self.input_proj(x))
        up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=True)  # noqa: E731
        d4 = self.MFF_decoder4(c4, c3)
        d3 = self.MFF_decoder3(d4, up(self.proj_enc3(c3)))
        d2 = self.MFF_decoder2(d3, up(self.proj_enc2(c2)))
        d1 = self.MFF_decoder1(d2, up(self.proj_enc1(c1)))
        return self.out(d1)

    @torch.no_grad()
    def load_backbone_weights(self, path_or_state: str | Path | Mapping[str, Tensor]) -> None:
        """Load ImageNet Swin-T weights (a local file, e.g. Microsoft's swin_tiny_patch4_window7_224.pth).

        No download. Both the original layout (downsample at the end of a stage, {'model': ...}) and
        timm's are accepted; timm's `checkpoint_filter_fn` remaps stages, drops the non-persistent
        buffers and resizes relative-position tables to this window (bicubic). The classifier head is
        dropped; any other missing or unexpected key raises. (The official loader silently skips
        the patch-merging weights of original-layout files under timm >= 0.9; this loads them.)
        """
        from timm.models.swin_transformer import checkpoint_filter_fn

        state = load_official_state_dict(path_or_state) if isinstance(path_or_state, (str, Path)) else path_or_state
        backbone = self.MWAencoder.backbone
        state = checkpoint_filter_fn(dict(state), backbone)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        missing, unexpected = backbone.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"Swin weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")


# ---------------------------------------------------------------- official checkpoint import

_NON_PERSISTENT = ("relative_position_index", "attn_mask")


def _official_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """Unwrap, strip `module.` / `_orig_mod.`, drop derived buffers, remap pre-0.9 timm Swin stages."""
    state: Mapping[str, Any] = checkpoint
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        if not isinstance(v, Tensor):
            raise ValueError(f"official HBFormer key {k!r} holds a {type(v).__name__}, not a tensor")
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.endswith(_NON_PERSISTENT):  # rebuilt from the config; older timm saved them
            continue
        out[k] = v
    if "MWAencoder.backbone.layers.0.downsample.reduction.weight" in out:
        # timm < 0.9 (original Swin layout): stage i's patch merging sits at the end of stage i;
        # timm >= 0.9 puts it at the start of stage i + 1
        stage = re.compile(r"^MWAencoder\.backbone\.layers\.(\d+)\.downsample\.")
        out = {stage.sub(lambda m: f"MWAencoder.backbone.layers.{int(m.group(1)) + 1}.downsample.", k): v
               for k, v in out.items()}
    return out


def _swin_sizes(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """embed_dim, depths and heads of the Swin encoder from its weights (Swin-T: 96, 2-2-6-2, 3-6-12-24)."""
    prefix = "MWAencoder.backbone.layers"
    blocks = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table$")
    depth: dict[int, int] = {}
    heads: dict[int, int] = {}
    for key, value in state.items():
        m = blocks.match(key)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            depth[stage] = max(depth.get(stage, 0), block + 1)
            heads[stage] = int(value.shape[1])
    if sorted(depth) != [0, 1, 2, 3]:
        raise ValueError("not an HBFormer checkpoint: its Swin encoder needs 4 stages of attention blocks")
    return {"embed_dim": int(state["MWAencoder.backbone.patch_embed.proj.weight"].shape[0]),
            "depths": tuple(depth[i] for i in range(4)), "num_heads": tuple(heads[i] for i in range(4))}


def from_official(checkpoint: Mapping[str, Any] | str | Path, config: HBFormerConfig | None = None) -> HBFormer:
    """Build an HBFormer from an official lzeeorno/HBFormer checkpoint (state dict or file path).

    Accepts a raw `model.state_dict()` (what `train_synapse.py` saves), `{'state_dict' |
    'model_state_dict' | 'model': ...}` wrappers, DataParallel `module.` / torch.compile `_orig_mod.`
    prefixes. Without `config`, num_classes, feature_size and the Swin encoder's width, depths and
    heads are read from the weights, and the image size defaults to the official Synapse setting
    (256) when the Swin window is 8, 224 when it is 7; pass `config` for any other size. Every key must map with an equal shape, and every
    parameter and buffer of the model must be covered, or ValueError names the key.
    """
    if isinstance(checkpoint, (str, Path)):
        checkpoint = load_official_state_dict(checkpoint)
    state = _official_state_dict(checkpoint)
    if config is None:
        try:
            num_classes = state["out.1.weight"].shape[0]
            feature_size = state["proj_enc1.weight"].shape[0]
            table = state["MWAencoder.backbone.layers.0.blocks.0.attn.relative_position_bias_table"]
        except KeyError as e:
            raise ValueError(f"not an HBFormer checkpoint: missing {e.args[0]!r}") from None
        window = (math.isqrt(table.shape[0]) + 1) // 2
        img_size = {7: 224, 8: 256}.get(window)
        if img_size is None:
            raise ValueError(f"Swin window {window}: pass an HBFormerConfig with the training img_size")
        config = HBFormerConfig(num_classes=num_classes, feature_size=feature_size, img_size=img_size,
                                **_swin_sizes(state))
    model = HBFormer(config)
    check_state_dict(model.state_dict(), state, "official HBFormer checkpoint")
    model.load_state_dict(state, strict=True)
    return model


def recognise_official(obj: Any) -> bool:
    """An lzeeorno/HBFormer state dict (bare, wrapped, or a resume file): its Swin encoder and MFF decoders."""
    if not isinstance(obj, Mapping):
        return False
    state: Mapping[str, Any] = obj
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    keys = {k.removeprefix("module.").removeprefix("_orig_mod.") for k in state}
    return "MWAencoder.backbone.patch_embed.proj.weight" in keys and "MFF_decoder4.transp_conv.weight" in keys


def _load_official(obj: Any, path: Path) -> HBFormer:
    try:
        return from_official(obj)
    except ValueError as e:
        raise HubError(f"{Path(path).name}: {e}") from None


register_official("hbformer", kind="segmenter", recognise=recognise_official, load=_load_official)

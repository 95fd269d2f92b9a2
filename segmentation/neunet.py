"""neU-Net: a plain-conv nnU-Net with a pixel-shuffle decoder and multi-scale Haar wavelet inputs.

"More complex encoder is not all you need" (neU-Net); official code aitechlabcn/neUNet
(`neUNet_utils/model.py`, `MultiscaleEncoder.py`, `wavelet_downsampling.py`), built inside nnU-Net
v2 (3d_fullres plans, dynamic_network_architectures blocks). Behaviour kept from the official code:

- every conv block is conv (bias) -> InstanceNorm(affine, eps 1e-5) -> LeakyReLU(0.01); stage s
  runs `n_conv_per_stage[s]` blocks, the first with stride `strides[s]` (anisotropic allowed);
- wavelet inputs: for encoder stages s = 1 .. n-2 the image is decomposed recursively (Haar, all
  sub-bands concatenated, the approximation transformed again over the axes `strides[s-1]` halves;
  a stride of ones passes the current approximation through) to the resolution of stage s-1's
  output; a 3^d conv-norm-LeakyReLU maps it to `features[s-1]` channels and it is concatenated to
  stage s-1's output before stage s's strided conv. The last stage gets none;
- decoder (`neUnetDecoder`): `ConvWithPixelShuffle` (conv k5 C -> 2C, tanh, conv k3 2C ->
  C_skip * prod(stride), tanh, pixel shuffle by the stride), concat the skip, n x conv-norm-LeakyReLU,
  and a 1x1 segmentation head per stage (deep supervision, largest output first).

Differences, all deliberate: the wavelet pyramid is computed in torch inside `forward` (officially
in the data loader with pywt, same numbers; a precomputed list is still accepted), so test-time
mirroring flips the image rather than the sub-bands; the wavelet conv reads in_channels * 2^k
channels (officially prod(stride), i.e. one input channel only, and x3 in 2-D, marked "may be a
bug" there); the 2-D pixel shuffle accepts anisotropic strides. State-dict names match the official
ones minus nnU-Net's duplicate aliases (`*.all_modules.*`, `decoder.encoder.*`); `from_official`
maps an nnU-Net checkpoint.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from segmentation.pixel_shuffle import PixelShuffleND
from segmentation.wavelets import wavelet_pyramid
from vision.hub import check_state_dict, load_official_state_dict, register_model

__all__ = ["NeUNetConfig", "NeUNet", "ConvWithPixelShuffle", "from_official"]

_SYNAPSE_STRIDES = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2))
_SYNAPSE_KERNELS = ((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))


@dataclass
class NeUNetConfig:
    """Defaults: the official Synapse 3d_fullres plan (patch 48x192x192, spacing 3x0.76x0.76)."""

    spatial_dims: int = 3
    in_channels: int = 1
    num_classes: int = 9
    features: tuple[int, ...] = (32, 64, 128, 256, 320, 320)
    strides: tuple[tuple[int, ...], ...] = _SYNAPSE_STRIDES
    kernel_sizes: tuple[tuple[int, ...], ...] | None = _SYNAPSE_KERNELS  # None: 3 on every axis
    n_conv_per_stage: tuple[int, ...] | int = 2
    n_conv_per_stage_decoder: tuple[int, ...] | int = 2
    deep_supervision: bool = True
    wavelet_inputs: bool = True  # False: the official `PlainneUNet` (plain encoder, same decoder)
    negative_slope: float = 0.01

    def __post_init__(self) -> None:
        n, d = len(self.features), self.spatial_dims
        if d not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {d}")
        self.features = tuple(int(f) for f in self.features)
        self.strides = tuple(tuple(int(s) for s in st) for st in self.strides)
        if self.kernel_sizes is not None:
            self.kernel_sizes = tuple(tuple(int(k) for k in ks) for ks in self.kernel_sizes)
        if len(self.strides) != n or any(len(s) != d for s in self.strides):
            raise ValueError(f"need {n} strides of {d} entries (one per stage), got {self.strides}")
        if self.kernel_sizes is not None and (len(self.kernel_sizes) != n or any(len(k) != d for k in self.kernel_sizes)):
            raise ValueError(f"need {n} kernel sizes of {d} entries, got {self.kernel_sizes}")
        if n < 2:
            raise ValueError("a U-Net needs at least 2 stages")
        if self.wavelet_inputs and any(s not in (1, 2) for st in self.strides[: n - 2] for s in st):
            raise ValueError("Haar wavelet inputs halve an axis or leave it: strides feeding them must be 1 or 2")

    @property
    def n_stages(self) -> int:
        return len(self.features)

    def stage_kernels(self) -> tuple[tuple[int, ...], ...]:
        return self.kernel_sizes or tuple((3,) * self.spatial_dims for _ in self.features)

    def convs_encoder(self) -> tuple[int, ...]:
        c = self.n_conv_per_stage
        return (c,) * self.n_stages if isinstance(c, int) else tuple(c)

    def convs_decoder(self) -> tuple[int, ...]:
        c = self.n_conv_per_stage_decoder
        return (c,) * (self.n_stages - 1) if isinstance(c, int) else tuple(c)

    @property
    def total_stride(self) -> tuple[int, ...]:
        return tuple(math.prod(s[i] for s in self.strides) for i in range(self.spatial_dims))


# ---------------------------------------------------------------- blocks (official attribute names)


def _conv(dims: int) -> type[nn.Module]:
    return nn.Conv3d if dims == 3 else nn.Conv2d


class ConvNormAct(nn.Module):
    """conv (same padding) -> InstanceNorm(affine) -> LeakyReLU; dynamic_network_architectures'
    `ConvDropoutNormReLU` without dropout (nnU-Net plans use none) and without its alias `all_modules`."""

    def __init__(self, dims: int, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int], slope: float):
        super().__init__()
        self.conv = _conv(dims)(cin, cout, tuple(kernel), tuple(stride), padding=tuple((k - 1) // 2 for k in kernel))
        self.norm = (nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d)(cout, eps=1e-5, affine=True)
        self.nonlin = nn.LeakyReLU(slope, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.nonlin(self.norm(self.conv(x)))


class ConvStack(nn.Module):
    """`StackedConvBlocks`: n ConvNormAct, the first one strided."""

    def __init__(self, n: int, dims: int, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int], slope: float):
        super().__init__()
        ones = (1,) * dims
        self.convs = nn.Sequential(
            *[ConvNormAct(dims, cin if i == 0 else cout, cout, kernel, stride if i == 0 else ones, slope) for i in range(n)]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.convs(x)


class ConvWithPixelShuffle(nn.Module):
    """Learned upsampling: conv k5 (C -> 2C) -> tanh -> conv k3 (2C -> C_out * prod(stride)) -> tanh -> shuffle."""

    def __init__(self, dims: int, in_channels: int, out_channels: int, stride: Sequence[int]):
        super().__init__()
        conv = _conv(dims)
        self.conv1 = conv(in_channels, 2 * in_channels, 5, 1, 2)
        self.tanh = nn.Tanh()
        self.conv2 = conv(2 * in_channels, out_channels * math.prod(stride), 3, 1, 1)
        self.pixelshuffle = PixelShuffleND(stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.pixelshuffle(self.tanh(self.conv2(self.tanh(self.conv1(x)))))


class MultiscaleEncoder(nn.Module):
    """Plain-conv encoder; stages 1..n-2 also read a wavelet input (see module docstring)."""

    def __init__(self, config: NeUNetConfig):
        super().__init__()
        c, d, n = config, config.spatial_dims, config.n_stages
        kernels, nconv = c.stage_kernels(), c.convs_encoder()
        stages, wavelet_convs = [], []
        cin = c.in_channels
        for s in range(n):
            if c.wavelet_inputs and 1 <= s <= n - 2:
                bands = c.in_channels * 2 ** sum(f == 2 for f in c.strides[s - 1])
                wavelet_convs.append(ConvNormAct(d, bands, cin, (3,) * d, (1,) * d, c.negative_slope))
                cin = 2 * cin
            # nn.Sequential wrapper kept so names read `stages.{s}.0.convs...` as in nnU-Net
            stages.append(nn.Sequential(ConvStack(nconv[s], d, cin, c.features[s], kernels[s], c.strides[s], c.negative_slope)))
            cin = c.features[s]
        self.stages = nn.Sequential(*stages)
        if c.wavelet_inputs:
            self.multiscale_input = nn.Sequential(*wavelet_convs)
        self.wavelet_inputs = c.wavelet_inputs

    def forward(self, x: Tensor, wavelets: Sequence[Tensor] = ()) -> list[Tensor]:
        out = self.stages[0](x)
        skips = [out]
        for s in range(1, len(self.stages)):
            if self.wavelet_inputs and s < len(self.stages) - 1:
                out = torch.cat([out, self.multiscale_input[s - 1](wavelets[s - 1])], dim=1)
            out = self.stages[s](out)
            skips.append(out)
        return skips


class NeUnetDecoder(nn.Module):
    """Pixel-shuffle decoder with one segmentation head per stage (heads always built, as nnU-Net)."""

    def __init__(self, config: NeUNetConfig):
        super().__init__()
        c, d, n = config, config.spatial_dims, config.n_stages
        kernels, nconv = c.stage_kernels(), c.convs_decoder()
        ups, stages, heads = [], [], []
        for s in range(1, n):
            below, skip = c.features[-s], c.features[-(s + 1)]
            ups.append(ConvWithPixelShuffle(d, below, skip, c.strides[-s]))
            stages.append(ConvStack(nconv[s - 1], d, 2 * skip, skip, kernels[-(s + 1)], (1,) * d, c.negative_slope))
            heads.append(_conv(d)(skip, c.num_classes, 1, 1, 0, bias=True))
        self.stages = nn.ModuleList(stages)
        self.convswithpixelshuffle = nn.ModuleList(ups)
        self.seg_layers = nn.ModuleList(heads)

    def forward(self, skips: Sequence[Tensor], deep_supervision: bool) -> Tensor | list[Tensor]:
        x = skips[-1]
        outputs = []
        for s, (up, stage, head) in enumerate(zip(self.convswithpixelshuffle, self.stages, self.seg_layers)):
            x = stage(torch.cat([up(x), skips[-(s + 2)]], dim=1))
            if deep_supervision or s == len(self.stages) - 1:
                outputs.append(head(x))
        outputs = outputs[::-1]  # largest first
        return outputs if deep_supervision else outputs[0]


def _init_he(module: nn.Module, neg_slope: float = 1e-2) -> None:
    """nnU-Net's InitWeights_He(1e-2): kaiming-normal conv weights (a=0.01), zero biases."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=neg_slope)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@register_model("neunet")
class NeUNet(nn.Module):
    """neU-Net. `forward(x)`: (B, C, *spatial) -> logits (B, classes, *spatial).

    Spatial sizes must be divisible by `config.total_stride`. In training mode with deep
    supervision the output is a list of logits, full resolution first, then one per decoder stage
    (as nnU-Net); otherwise only the full-resolution logits (as MONAI's DynUNet in eval).
    `x` may also be the official list [image, wavelet input for stage 1, ..., stage n-2].
    """

    config_class = NeUNetConfig

    def __init__(self, config: NeUNetConfig):
        super().__init__()
        self.config = config
        self.encoder = MultiscaleEncoder(config)
        self.decoder = NeUnetDecoder(config)
        self.deep_supervision = config.deep_supervision
        self.apply(_init_he)

    def wavelet_inputs(self, x: Tensor) -> list[Tensor]:
        """The wavelet inputs of encoder stages 1..n-2 for image `x` (see `wavelet_pyramid`)."""
        return wavelet_pyramid(x, self.config.strides[: self.config.n_stages - 2])

    def forward(self, x: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
        if isinstance(x, Tensor):
            image = x
            wavelets = self.wavelet_inputs(x) if self.config.wavelet_inputs else []
        else:
            image, *wavelets = x
        total = self.config.total_stride
        if image.ndim != self.config.spatial_dims + 2 or any(s % t for s, t in zip(image.shape[2:], total)):
            raise ValueError(
                f"expected (B, C, *spatial) with {self.config.spatial_dims} spatial axes divisible by {total}, "
                f"got {tuple(image.shape)}"
            )
        skips = self.encoder(image, wavelets)
        return self.decoder(skips, self.deep_supervision and self.training)


# ---------------------------------------------------------------- official checkpoint import


def _official_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    state = checkpoint.get("network_weights", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if not isinstance(v, Tensor):
            raise ValueError(f"official neU-Net key {k!r} holds a {type(v).__name__}, not a tensor")
        out[k] = v
    # nnU-Net aliases: ConvDropoutNormReLU.all_modules.{i} repeats conv/norm, the decoder holds the encoder
    primary = {k: v for k, v in out.items() if ".all_modules." not in k and not k.startswith("decoder.encoder.")}
    for k, v in out.items():
        twin = None
        if k.startswith("decoder.encoder."):
            twin = k[len("decoder."):]
        elif ".all_modules." in k:  # Sequential(conv, norm, nonlin) without dropout, as nnU-Net plans build it
            head, _, tail = k.partition(".all_modules.")
            index, _, param = tail.partition(".")
            twin = f"{head}.{ {'0': 'conv', '1': 'norm'}.get(index, index) }.{param}"
        if twin is not None and (twin not in out or out[twin].shape != v.shape or not torch.equal(out[twin], v)):
            raise ValueError(f"official neU-Net alias {k!r} does not repeat {twin!r}")
    return primary


def _plans_config(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """Architecture fields from an nnU-Net checkpoint's `init_args` (plans + configuration name)."""
    from segmentation.nnunet import configuration_of, plan_strides

    init = checkpoint.get("init_args") if isinstance(checkpoint, Mapping) else None
    if not isinstance(init, Mapping) or "plans" not in init:
        return None
    try:
        conf = configuration_of(init["plans"], init.get("configuration", "3d_fullres"))
        return {"strides": plan_strides(conf)}
    except (KeyError, TypeError) as e:
        raise ValueError(f"the checkpoint's init_args plans have no strides for its configuration ({e})") from None


def from_official(checkpoint: Mapping[str, Any] | str | Path, config: NeUNetConfig | None = None) -> NeUNet:
    """Build a NeUNet from an official checkpoint (nnU-Net `checkpoint_final.pth` dict or a state dict).

    Without `config`, everything is read from the weights (stages, features, kernels, conv counts,
    classes, input channels, wavelet inputs) except each stage's stride, which comes from the
    checkpoint's `init_args` plans when present; otherwise from the pixel-shuffle widths when they
    leave no choice (1 -> ones, 2^d -> twos), and a 4x stride in 3-D is taken as (1, 2, 2), the
    nnU-Net layout for anisotropic CT -- pass `config` if yours differs. Every weight must map with
    an equal shape and every model weight must be covered, or ValueError names the key.
    """
    if isinstance(checkpoint, (str, Path)):
        checkpoint = load_official_state_dict(checkpoint)
    state = _official_state_dict(checkpoint)
    if config is None:
        config = _infer_config(state, _plans_config(checkpoint))
    model = NeUNet(config)
    check_state_dict(model.state_dict(), state, "official neU-Net checkpoint")
    model.load_state_dict(state, strict=True)
    return model


def _infer_config(state: Mapping[str, Tensor], plans: Mapping[str, Any] | None) -> NeUNetConfig:
    def w(key: str) -> Tensor:
        if key not in state:
            raise ValueError(f"not a neU-Net checkpoint: missing {key!r}")
        return state[key]

    n = 0
    while f"encoder.stages.{n}.0.convs.0.conv.weight" in state:
        n += 1
    if n < 2:
        raise ValueError("not a neU-Net checkpoint: no encoder.stages.{s}.0.convs.0.conv.weight keys")
    first = w("encoder.stages.0.0.convs.0.conv.weight")
    dims = first.ndim - 2
    features = tuple(w(f"encoder.stages.{s}.0.convs.0.conv.weight").shape[0] for s in range(n))
    kernels = tuple(tuple(w(f"encoder.stages.{s}.0.convs.0.conv.weight").shape[2:]) for s in range(n))

    def count(prefix: str) -> int:
        i = 0
        while f"{prefix}.convs.{i}.conv.weight" in state:
            i += 1
        return i

    wavelets = "encoder.multiscale_input.0.conv.weight" in state
    in_channels = first.shape[1]
    if plans is not None:
        strides = tuple(tuple(s) for s in plans["strides"])
    else:
        def from_factor(up: int, what: str) -> tuple[int, ...]:
            if up == 1:
                return (1,) * dims
            if up == 2**dims:
                return (2,) * dims
            if dims == 3 and up == 4:
                return (1, 2, 2)
            raise ValueError(f"cannot tell {what} from a {up}x factor: pass a NeUNetConfig")

        # stage 0's stride shows only in the first wavelet conv's width (otherwise assume 1s, as plans do)
        bands = w("encoder.multiscale_input.0.conv.weight").shape[1] // in_channels if wavelets else 1
        strides = [from_factor(bands, "stage 0's stride")]
        for s in range(1, n):
            up = w(f"decoder.convswithpixelshuffle.{n - 1 - s}.conv2.weight").shape[0] // features[s - 1]
            strides.append(from_factor(up, f"stage {s}'s stride"))
        strides = tuple(strides)
    return NeUNetConfig(
        spatial_dims=dims,
        in_channels=in_channels,
        num_classes=w("decoder.seg_layers.0.weight").shape[0],
        features=features,
        strides=strides,
        kernel_sizes=kernels,
        n_conv_per_stage=tuple(count(f"encoder.stages.{s}.0") for s in range(n)),
        n_conv_per_stage_decoder=tuple(count(f"decoder.stages.{s}") for s in range(n - 1)),
        deep_supervision=True,
        wavelet_inputs=wavelets,
    )

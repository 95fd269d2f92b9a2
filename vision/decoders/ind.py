"""The implicit neural decoder's convolutional trunk (IND), used as a LIIF encoder.

Kim & Kim, "Arbitrary-Scale Image Generation and Upsampling using Latent Diffusion Model and Implicit
Neural Decoder" (CVPR 2024); official code github.com/zhenshij/arbitrary-scale-diffusion,
``ldm/models/firststagemodel.py`` (class ``IND``) and ``ldm/modules/diffusionmodules/model.py`` (the
modified ``Decoder``).

The official IND is ``Sequential(Conv2d(z, z, 1), Decoder)`` followed by a LIIF MLP. Its ``Decoder`` is
the latent-diffusion decoder with every ``Upsample`` and the ``norm_out``/swish/``conv_out`` tail removed:
conv_in (z -> ch * ch_mult[-1], 3x3), the middle block (ResnetBlock, attention, ResnetBlock), then for each
level from the deepest ``num_res_blocks + 1`` ResnetBlocks of width ``ch * ch_mult[level]``. So the LIIF
feature map has ``ch * ch_mult[0]`` channels at the latent's own resolution, and is the raw output of the
last ResnetBlock (no normalisation or activation after it).

The blocks here are diffusers' own (``UNetMidBlock2D``, ``UpDecoderBlock2D`` with ``add_upsample=False``;
GroupNorm + SiLU ResnetBlocks, eps 1e-6, single-head mid attention), not re-implementations.
``mid_attention`` (default False, a CPU-scale departure from the official configs, which all have it)
switches the middle attention on.

Receptive field: counting only the convolutions, an output feature sees ``conv_radius`` latent pixels on
each side (one per 3x3 conv). But GroupNorm normalises with statistics over the whole feature map, so
every output depends (weakly) on every latent pixel, attention or not. ``receptive_radius`` therefore
reports ``GLOBAL_RADIUS``; ``LIIF.decode`` then encodes the whole latent once and tiles only the queries,
so a tiled render still equals the untiled one exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from vision.errors import ConfigError

GLOBAL_RADIUS = 1 << 30  # "every output sees the whole input" (GroupNorm statistics, attention)


@dataclass
class INDConfig:
    z_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2  # per level the trunk has num_res_blocks + 1 ResnetBlocks, as the LDM decoder
    norm_num_groups: int = 32
    mid_attention: bool = False

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ConfigError(f"ch_mult needs at least one level, each >= 1, got {self.ch_mult}")
        for name in ("z_channels", "ch", "num_res_blocks", "norm_num_groups"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % self.norm_num_groups]
        if bad:
            raise ConfigError(f"width {bad[0]} (ch * ch_mult) is not divisible by norm_num_groups "
                              f"{self.norm_num_groups}")


class INDTrunk(nn.Module):
    """Latent (B, z_channels, h, w) -> LIIF feature map (B, ch * ch_mult[0], h, w)."""

    def __init__(self, config: INDConfig | None = None):
        super().__init__()
        from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, UpDecoderBlock2D  # heavy import

        self.config = c = config or INDConfig()
        widths = [c.ch * m for m in c.ch_mult]
        self.post_quant = nn.Conv2d(c.z_channels, c.z_channels, 1)  # official decoder.0
        self.conv_in = nn.Conv2d(c.z_channels, widths[-1], 3, padding=1)
        self.mid_block = UNetMidBlock2D(
            in_channels=widths[-1], temb_channels=None, resnet_eps=1e-6, resnet_act_fn="silu", output_scale_factor=1,
            resnet_time_scale_shift="default", attention_head_dim=widths[-1], resnet_groups=c.norm_num_groups,
            add_attention=c.mid_attention,
        )
        blocks, width_in = [], widths[-1]
        for width in reversed(widths):  # deepest level first, as the LDM decoder
            blocks.append(UpDecoderBlock2D(
                in_channels=width_in, out_channels=width, num_layers=c.num_res_blocks + 1, resnet_eps=1e-6,
                resnet_act_fn="silu", resnet_groups=c.norm_num_groups, add_upsample=False, temb_channels=None,
            ))
            width_in = width
        self.up_blocks = nn.ModuleList(blocks)
        self.out_dim = widths[0]

    @property
    def conv_radius(self) -> int:
        """Latent pixels on each side reached through the convolutions alone (one per 3x3 conv): conv_in,
        the middle block's two ResnetBlocks, then two convs per up-level ResnetBlock. 1x1 convs add none."""
        c = self.config
        return 1 + 2 * 2 + 2 * len(c.ch_mult) * (c.num_res_blocks + 1)

    @property
    def receptive_radius(self) -> int:
        """Global (``GLOBAL_RADIUS``): GroupNorm (and the optional attention) mix the whole map."""
        return GLOBAL_RADIUS

    @property
    def peak_channels(self) -> int:
        """Channels per latent pixel alive at once in an inference forward (memory planning): the input and
        a ResnetBlock at the widest level (its input, normalised/activated copy, conv output, shortcut).
        The optional attention's (h w)^2 score matrix is not counted."""
        return 5 * self.config.ch * max(self.config.ch_mult) + self.config.z_channels

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid_block(self.conv_in(self.post_quant(z)))
        for block in self.up_blocks:
            h = block(h)
        return h

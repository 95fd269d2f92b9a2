"""X-Decoder's pixel decoder: an FPN whose coarsest level runs through a transformer encoder.

Zou et al., "Generalized Decoding for Pixel, Image, and Language" (X-Decoder, CVPR 2023), reusing
Mask2Former's `TransformerEncoderPixelDecoder` (Cheng et al., CVPR 2022) and DETR's sine position
encoding. Official code microsoft/X-Decoder, branch v2.0: `modeling/vision/encoder/
transformer_encoder_fpn.py` (`ENCODER.NAME: transformer_encoder_fpn`), `.../transformer_blocks.py`
and `modeling/modules/position_encoding.py`. Module and parameter names are the official ones, so
the `sem_seg_head.pixel_decoder.` part of a released state dict loads without renaming.

Conventions of the official code, kept as they are:

- Features are taken in stride order (res2..res5). The coarsest one goes through `input_proj`
  (1x1 conv with bias), a post-norm transformer encoder (`transformer.encoder.layers.N`, with
  torch's MultiheadAttention; the position encoding is added to queries and keys, not values;
  no padding mask), then `layer_{n}`. Each finer level i: `adapter_i` (1x1 conv) + nearest
  upsampling of the level above, then `layer_i` (3x3 conv).
- adapter/layer convs are detectron2 `Conv2d`s: conv -> GroupNorm(32) as the child `norm` -> ReLU
  (adapters have no ReLU); they have no bias when a norm is used. `mask_features` (3x3, bias, no
  norm) maps the finest level to the mask embeddings.
- `forward_features` returns (mask_features at stride 4, the transformer encoder's output at
  stride 32, multi_scale_features = the outputs of `layer_n`, `layer_{n-1}`, `layer_{n-2}`, i.e.
  strides 32, 16, 8: coarse to fine, the order X-Decoder's decoder cycles through).
- The position encoding uses conv_dim / 2 frequencies per axis, normalised to [0, 2 pi]: y first,
  then x, each as interleaved (sin, cos) pairs.
- The encoder's heads, feed-forward width, dropout and pre-norm come from the *decoder's* config
  keys (`DECODER.NHEADS`, `DIM_FEEDFORWARD`, `DROPOUT`, `PRE_NORM`; Focal-T: 8, 2048, 0.0, False);
  only the depth is the encoder's own (`ENCODER.TRANSFORMER_ENC_LAYERS`, 6).
- Initialisation as the official: convs by detectron2's `c2_xavier_fill` (Kaiming-uniform a=1,
  zero bias), every matrix of the transformer encoder Xavier-uniform.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PositionEmbeddingSine", "Conv2d", "TransformerEncoderLayer", "TransformerEncoder",
           "TransformerEncoderOnly", "TransformerEncoderPixelDecoder"]


class PositionEmbeddingSine(nn.Module):
    """DETR's 2-D sine encoding: (B, C, H, W) -> (B, 2 * num_pos_feats, H, W), y channels then x channels."""

    def __init__(self, num_pos_feats: int = 64, temperature: float = 10000, normalize: bool = False,
                 scale: float | None = None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("normalize should be True if scale is passed")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """`mask` (B, H, W) is True at padding; positions count the unpadded pixels only."""
        if mask is None:
            mask = torch.zeros((x.shape[0], x.shape[2], x.shape[3]), device=x.device, dtype=torch.bool)
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=x.dtype)
        x_embed = not_mask.cumsum(2, dtype=x.dtype)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=x.dtype, device=x.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = x_embed[..., None] / dim_t
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class Conv2d(nn.Conv2d):
    """detectron2's Conv2d: conv -> optional `norm` (a child module, hence the key names) -> optional activation."""

    def __init__(self, *args, norm: nn.Module | None = None, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def _c2_xavier_fill(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _norm_conv(in_channels: int, out_channels: int, kernel_size: int, norm: str, relu: bool) -> Conv2d:
    """An FPN conv: GroupNorm(32) and no bias with norm="GN", a biased conv with norm=""."""
    if norm not in ("GN", ""):
        raise ValueError(f"norm must be 'GN' or '', got {norm!r}")
    return _c2_xavier_fill(Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                                  bias=norm == "", norm=nn.GroupNorm(32, out_channels) if norm == "GN" else None,
                                  activation=F.relu if relu else None))


class TransformerEncoderLayer(nn.Module):
    """DETR's encoder layer on (L, B, C) sequences; the position is added to queries and keys only."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 normalize_before: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def _attend(self, x: Tensor, pos: Tensor | None, key_padding_mask: Tensor | None) -> Tensor:
        qk = x if pos is None else x + pos
        return self.dropout1(self.self_attn(qk, qk, value=x, key_padding_mask=key_padding_mask,
                                            need_weights=False)[0])

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x)))))

    def forward(self, src: Tensor, pos: Tensor | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        if self.normalize_before:
            src = src + self._attend(self.norm1(src), pos, key_padding_mask)
            return src + self._feed_forward(self.norm2(src))
        src = self.norm1(src + self._attend(src, pos, key_padding_mask))
        return self.norm2(src + self._feed_forward(src))


class TransformerEncoder(nn.Module):
    def __init__(self, layers: list[TransformerEncoderLayer], norm: nn.LayerNorm | None = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm

    def forward(self, src: Tensor, pos: Tensor | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos, key_padding_mask)
        return src if self.norm is None else self.norm(src)


class TransformerEncoderOnly(nn.Module):
    """The encoder on a (B, C, H, W) map: flattened to (HW, B, C) and back; a final LayerNorm only with pre-norm."""

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6, dim_feedforward: int = 2048,
                 dropout: float = 0.1, normalize_before: bool = False):
        super().__init__()
        self.encoder = TransformerEncoder(
            [TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, normalize_before)
             for _ in range(num_encoder_layers)],
            nn.LayerNorm(d_model) if normalize_before else None)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, pos_embed: Tensor, mask: Tensor | None = None) -> Tensor:
        b, c, h, w = src.shape
        out = self.encoder(src.flatten(2).permute(2, 0, 1), pos_embed.flatten(2).permute(2, 0, 1),
                           None if mask is None else mask.flatten(1))
        return out.permute(1, 2, 0).reshape(b, c, h, w)


class TransformerEncoderPixelDecoder(nn.Module):
    """FPN with a transformer encoder on the coarsest level (see the module docstring).

    `in_channels` and `strides` name the backbone features (e.g. FocalNetDW's `out_channels` and
    `strides`); they are used in stride order.
    """

    num_multi_scale = 3  # the official `maskformer_num_feature_levels`: the decoder uses 3 scales

    def __init__(self, in_channels: dict[str, int], strides: dict[str, int], conv_dim: int = 512, mask_dim: int = 512,
                 norm: str = "GN", enc_layers: int = 6, nheads: int = 8, dim_feedforward: int = 2048,
                 dropout: float = 0.0, pre_norm: bool = False):
        super().__init__()
        if set(in_channels) != set(strides) or len(in_channels) < self.num_multi_scale:
            raise ValueError(f"in_channels {in_channels} and strides {strides} must name the same "
                             f">= {self.num_multi_scale} features")
        self.in_features = sorted(in_channels, key=lambda k: strides[k])
        self.conv_dim = conv_dim
        self.mask_dim = mask_dim
        channels = [in_channels[k] for k in self.in_features]
        n = len(channels)
        for i, c in enumerate(channels[:-1], start=1):
            self.add_module(f"adapter_{i}", _norm_conv(c, conv_dim, 1, norm, relu=False))
            self.add_module(f"layer_{i}", _norm_conv(conv_dim, conv_dim, 3, norm, relu=True))
        self.add_module(f"layer_{n}", _norm_conv(conv_dim, conv_dim, 3, norm, relu=True))
        self.mask_features = _c2_xavier_fill(Conv2d(conv_dim, mask_dim, 3, padding=1))
        self.input_proj = _c2_xavier_fill(Conv2d(channels[-1], conv_dim, 1))
        self.transformer = TransformerEncoderOnly(conv_dim, nheads, enc_layers, dim_feedforward, dropout, pre_norm)
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

    def forward_features(self, features: dict[str, Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
        """-> (mask_features (B, mask_dim, H/4, W/4), encoder output (B, conv_dim, H/32, W/32),
        [the 3 coarsest FPN outputs, coarse to fine])."""
        n = len(self.in_features)
        top = features[self.in_features[-1]]
        encoded = self.transformer(self.input_proj(top), self.pe_layer(top))
        y = getattr(self, f"layer_{n}")(encoded)
        multi_scale = [y]
        for i in range(n - 1, 0, -1):  # finer levels, top-down
            lateral = getattr(self, f"adapter_{i}")(features[self.in_features[i - 1]])
            y = getattr(self, f"layer_{i}")(lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest"))
            if len(multi_scale) < self.num_multi_scale:
                multi_scale.append(y)
        return self.mask_features(y), encoded, multi_scale

    def forward(self, features: dict[str, Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
        return self.forward_features(features)

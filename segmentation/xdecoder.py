"""X-Decoder: one decoder for pixel-level segmentation, grounding and language (captioning, retrieval).

Zou et al., "Generalized Decoding for Pixel, Image, and Language" (CVPR 2023, arXiv:2212.11270);
official code microsoft/X-Decoder, branch v2.0: the decoder `modeling/interface/xdecoder.py`
(class `XDecoder`, here `XDecoderPredictor`), its layers `modeling/interface/modules.py`, the head
`modeling/body/xdecoder_head.py` and the model with its inference
`modeling/architectures/xdecoder_model.py` (`GeneralizedXdecoder`), configured by
`configs/xdecoder/focalt_unicl_lang.yaml` (Focal-T, the defaults of `XDecoderConfig`). Module and
parameter names are the official ones, so a released state dict loads without renaming
(segmentation/xdecoder_official.py): `backbone.` (FocalNet-DW, segmentation/xdecoder_backbone.py),
`sem_seg_head.pixel_decoder.` (segmentation/xdecoder_pixel_decoder.py),
`sem_seg_head.predictor.` (this module) with `sem_seg_head.predictor.lang_encoder.`
(segmentation/xdecoder_language.py) and `backbone_proj`.

Conventions of the official code, kept as they are:

- Images: RGB in 0-255, normalised with the ImageNet mean/std, zero-padded at the bottom/right to a
  multiple of 32 (detectron2's ImageList); predictions are cropped back. Here images come in as
  float [0, 1] and are scaled inside.
- Queries: `num_queries` (101) latent queries, the first 100 "object" queries and the last one the
  global ("class") query. Self-attention (`self_attn_mask`, True = blocked): object queries do not
  see the global query nor the reverse; latent queries never see text queries; text (caption)
  queries see all latent queries and earlier text tokens only. After each layer's norm the
  global query's output is *replaced* by a softmax(cosine)-weighted mean of the object outputs.
- Each decoder layer: masked cross-attention to one of the 3 pixel-decoder scales (cycling from
  the coarsest), its mask the previous prediction resized (bicubic, antialias) to that scale with
  sigmoid < 0.5 blocked and fully blocked rows left unblocked; then self-attention; then an FFN.
  Post-norm. Heads after the initial queries and after each of the 9 layers (`DEC_LAYERS` 10 - 1).
- Heads: masks = einsum(MLP3(q), mask features); class logits = exp(logit_scale) *
  cos(q @ class_embed, text embeddings of the class names + "background"); `pred_captions` =
  q @ class_embed (unnormalised); caption-token outputs @ caping_embed, scored against the tied
  token-embedding table of the language encoder.
- Grounding (referring) pass: the 100 object queries are duplicated (queries 101..200, same
  features and positions), the text tokens are appended for self-attention only (not
  cross-attention) and updated by every layer; the copies attend to each other and the tokens,
  never to the first 101. The official code unblocks the cross-attention mask of query index
  `num_queries` (the comment says "cls token", but that index is the first copy): kept.
- Inference (`evaluate`) scores all 101 queries (the global one included); training outputs
  (`forward_seg`) keep the 100 object queries, as `GeneralizedXdecoder.forward_seg` slices them.

Output dicts (what segmentation/xdecoder_loss.py and the trainer consume). B images, Q =
num_queries (101), P = Q - 1 object queries, K + 1 classes (background last), h, w = 1/4 of the
padded input, L = context_length (77), C = dim_proj:

  forward_seg -> {"pred_logits": (B, P, K+1), "pred_masks": (B, P, h, w), "pred_captions": (B, P, C),
                  with grounding tokens also "pred_gmasks": (B, P, h, w), "pred_gtexts": (B, P, C);
                  "aux_outputs": a list of dec_layers dicts with the same keys (the initial queries and
                  each layer but the last, in order)}
  forward_vlp -> {"pred_captionings": (B, L, C) (token outputs @ caping_embed),
                  "pred_captions": (B, Q, C) ([:, -1] is the global query),
                  "aux_outputs": dec_layers dicts of both keys,
                  "caption_tokens": (B, L, C), "caption_proj": (B, C) (the language encoder's token and
                  sentence embeddings of the caption, the official `target_vlp`),
                  with retrieval "backbone_embeddings": (B, C) (mean-pooled res5 @ backbone_proj)}
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from segmentation.xdecoder_backbone import FocalNetDW
from segmentation.xdecoder_language import LanguageEncoder
from segmentation.xdecoder_pixel_decoder import PositionEmbeddingSine, TransformerEncoderPixelDecoder
from vision.hub import register_model

__all__ = ["XDecoderConfig", "XDecoder", "XDecoderHead", "XDecoderPredictor", "build_self_attn_mask"]

START_TOKEN = 49406  # CLIP's <|startoftext|>; official evaluate_captioning fills all 77 positions with it


@dataclass
class XDecoderConfig:
    # backbone: FocalNet-DW (MODEL.BACKBONE.FOCAL)
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    focal_levels: tuple[int, ...] = (3, 3, 3, 3)
    focal_windows: tuple[int, ...] = (3, 3, 3, 3)
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.3
    # pixel decoder: transformer_encoder_fpn (MODEL.ENCODER)
    conv_dim: int = 512
    mask_dim: int = 512
    norm: str = "GN"
    enc_layers: int = 6
    # decoder (MODEL.DECODER); nheads / dim_feedforward / pre_norm are shared with the pixel decoder
    hidden_dim: int = 512
    num_queries: int = 101  # 100 object queries + 1 global query
    nheads: int = 8
    dim_feedforward: int = 2048
    dec_layers: int = 9  # DEC_LAYERS 10 counts the prediction on the initial queries
    pre_norm: bool = False
    captioning_step: int = 50
    # language (MODEL.TEXT, MODEL.DIM_PROJ)
    dim_proj: int = 512
    context_length: int = 77
    vocab_size: int = 49408
    lang_width: int = 512
    lang_layers: int = 12
    lang_heads: int = 8
    autoregressive: bool = True
    start_token: int = START_TOKEN
    # tasks: captioning adds caping_embed / pos_embed_caping, retrieval (with the backbone ensemble)
    # adds backbone_proj; grounding enables the referring pass
    grounding: bool = True
    captioning: bool = True
    retrieval: bool = True
    backbone_dim: int = 768  # channels of res5 (8 * embed_dim)
    # input
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    size_divisibility: int = 32
    # inference
    object_mask_threshold: float = 0.8
    overlap_threshold: float = 0.8
    test_topk_per_image: int = 100
    # input size for inference (apps.segment resizes, outputs come back at the image's size); None: as given.
    # The released model: shorter side 800, longer at most 1333 (COCO.INPUT.*_SIZE_TEST), captions at 224 x 224
    test_min_size: int | None = None
    test_max_size: int | None = None
    caption_size: int | None = None
    class_names: tuple[str, ...] = ()  # a trained model's default vocabulary
    is_thing: tuple[bool, ...] = ()  # per class_names entry: a countable object (panoptic "thing")


def build_self_attn_mask(num_queries: int, context_length: int) -> Tensor:
    """The official `self_attn_mask` (1, Q + L, Q + L), True = may not attend."""
    q = num_queries
    n = q + context_length
    mask = torch.zeros(1, n, n, dtype=torch.bool)
    mask[:, :q, q:] = True  # latent queries do not see text
    mask[:, q:, q:] = torch.ones(context_length, context_length, dtype=torch.bool).triu(1)  # causal text
    mask[:, :q - 1, q - 1:q] = True  # object queries do not see the global query
    mask[:, q - 1:q, :q - 1] = True  # nor the global query the object queries
    return mask


def _xavier_matrices(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class SelfAttentionLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, normalize_before: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.normalize_before = normalize_before
        _xavier_matrices(self)

    def forward(self, x: Tensor, attn_mask: Tensor | None, query_pos: Tensor) -> Tensor:
        h = self.norm(x) if self.normalize_before else x
        q = h + query_pos
        x = x + self.self_attn(q, q, h, attn_mask=attn_mask, need_weights=False)[0]
        return x if self.normalize_before else self.norm(x)


class CrossAttentionLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, normalize_before: bool = False):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.normalize_before = normalize_before
        _xavier_matrices(self)

    def forward(self, x: Tensor, memory: Tensor, attn_mask: Tensor | None, pos: Tensor, query_pos: Tensor) -> Tensor:
        h = self.norm(x) if self.normalize_before else x
        x = x + self.multihead_attn(h + query_pos, memory + pos, memory, attn_mask=attn_mask, need_weights=False)[0]
        return x if self.normalize_before else self.norm(x)


class FFNLayer(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int, normalize_before: bool = False):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.normalize_before = normalize_before
        _xavier_matrices(self)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x) if self.normalize_before else x
        x = x + self.linear2(F.relu(self.linear1(h)))
        return x if self.normalize_before else self.norm(x)


class MLP(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def _unit(x: Tensor) -> Tensor:
    return x / (x.norm(dim=-1, keepdim=True) + 1e-7)


class XDecoderPredictor(nn.Module):
    """The X-Decoder transformer decoder and its heads (official `XDecoder` interface).

    Works batch-first: queries (B, N, hidden). `features` are the pixel decoder's 3 scales, coarsest
    first, `mask_features` its (B, mask_dim, h, w) per-pixel embeddings.
    """

    num_feature_levels = 3

    def __init__(self, config: XDecoderConfig, in_channels: int):
        super().__init__()
        c = config
        if c.hidden_dim != c.dim_proj and (c.captioning or c.grounding):
            raise ValueError("caption and grounding tokens enter the decoder as queries: "
                             "hidden_dim must equal dim_proj")
        if c.captioning and c.lang_width != c.dim_proj:
            raise ValueError("captions are scored against the token embeddings: lang_width must equal dim_proj")
        self.num_queries = c.num_queries
        self.num_heads = c.nheads
        self.num_layers = c.dec_layers
        self.contxt_len = c.context_length
        self.captioning_step = c.captioning_step
        self.pe_layer = PositionEmbeddingSine(c.hidden_dim // 2, normalize=True)
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(c.hidden_dim, c.nheads, c.pre_norm) for _ in range(c.dec_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(c.hidden_dim, c.nheads, c.pre_norm) for _ in range(c.dec_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(c.hidden_dim, c.dim_feedforward, c.pre_norm) for _ in range(c.dec_layers))
        self.decoder_norm = nn.LayerNorm(c.hidden_dim)
        self.query_feat = nn.Embedding(c.num_queries, c.hidden_dim)
        self.query_embed = nn.Embedding(c.num_queries, c.hidden_dim)
        self.level_embed = nn.Embedding(self.num_feature_levels, c.hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels == c.hidden_dim:
                self.input_proj.append(nn.Sequential())
            else:
                conv = nn.Conv2d(in_channels, c.hidden_dim, kernel_size=1)
                nn.init.kaiming_uniform_(conv.weight, a=1)  # detectron2's c2_xavier_fill
                nn.init.zeros_(conv.bias)
                self.input_proj.append(conv)
        self.lang_encoder = LanguageEncoder(c.vocab_size, c.context_length, c.lang_width, c.lang_layers, c.lang_heads,
                                            c.dim_proj, c.autoregressive)
        self.mask_embed = MLP(c.hidden_dim, c.hidden_dim, c.mask_dim, 3)
        self.class_embed = nn.Parameter(torch.empty(c.hidden_dim, c.dim_proj))
        trunc_normal_(self.class_embed, std=0.02)
        if c.captioning:
            self.caping_embed = nn.Parameter(torch.empty(c.hidden_dim, c.dim_proj))
            trunc_normal_(self.caping_embed, std=0.02)
            self.pos_embed_caping = nn.Embedding(c.context_length, c.hidden_dim)
        self.register_buffer("self_attn_mask", build_self_attn_mask(c.num_queries, c.context_length))

    # ------------------------------------------------------------------ pieces

    def memory(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[tuple[int, int]]]:
        """Flattened (B, HW, hidden) keys/values with level embeddings, their sine positions, and sizes."""
        if len(features) != self.num_feature_levels:
            raise ValueError(f"the decoder takes {self.num_feature_levels} feature scales, got {len(features)}")
        src, pos, sizes = [], [], []
        for i, x in enumerate(features):
            sizes.append(tuple(x.shape[-2:]))
            pos.append(self.pe_layer(x).flatten(2).transpose(1, 2))
            src.append((self.input_proj[i](x).flatten(2) + self.level_embed.weight[i][None, :, None]).transpose(1, 2))
        return src, pos, sizes

    def prediction_heads(self, output: Tensor, mask_features: Tensor, size: tuple[int, int],
                         text_embeddings: Tensor | None, *, grounding: bool = False,
                         captioning: bool = False) -> dict[str, Tensor | None]:
        q = self.num_queries
        x = self.decoder_norm(output)
        captionings = x[:, q:] @ self.caping_embed if captioning else None
        unit = _unit(x)
        weights = (unit[:, q - 1:q] @ unit[:, :q - 1].transpose(1, 2)).softmax(-1)
        global_query = (weights.transpose(1, 2) * x[:, :q - 1]).sum(dim=1, keepdim=True)
        parts = [x[:, :q - 1], global_query] + ([x[:, q:2 * q - 1]] if grounding else [])
        queries = torch.cat(parts, dim=1)
        class_embed = queries @ self.class_embed
        logits = None
        if text_embeddings is not None:
            logits = self.lang_encoder.logit_scale.exp() * _unit(class_embed) @ text_embeddings.t()
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(queries), mask_features)
        small = F.interpolate(masks, size=size, mode="bicubic", align_corners=False, antialias=True)
        blocked = (small.sigmoid().flatten(2) < 0.5).detach()
        if grounding:
            blocked[:, q] = False  # official: meant for the global query, lands on the first copy
        return {"logits": logits, "masks": masks, "captions": class_embed, "captionings": captionings,
                "blocked": blocked}

    def decode(self, memory, mask_features: Tensor, text_embeddings: Tensor | None = None, *,
               grounding_tokens: Tensor | None = None, caption_tokens: Tensor | None = None) -> list[dict]:
        """Run the decoder; the head outputs after the initial queries and after every layer.

        grounding_tokens: (B, G, C) text tokens of the referring phrases (zero-padded per image);
        caption_tokens: (B, L, C) the language encoder's token embeddings of a caption (L = context).
        """
        src, pos, sizes = memory
        b = src[0].shape[0]
        q = self.num_queries
        output = self.query_feat.weight.unsqueeze(0).repeat(b, 1, 1)
        query_pos = self.query_embed.weight.unsqueeze(0).repeat(b, 1, 1)
        grounding = grounding_tokens is not None
        captioning = caption_tokens is not None
        if grounding and captioning:
            raise ValueError("a decoder pass is either a grounding or a captioning pass")
        if captioning:
            if caption_tokens.shape[1] != self.contxt_len:
                raise ValueError(f"caption tokens must span the context ({self.contxt_len}), "
                                 f"got {caption_tokens.shape[1]}")
            output = torch.cat([output, caption_tokens.detach()], dim=1)
            query_pos = torch.cat([query_pos, caption_tokens + self.pos_embed_caping.weight], dim=1)
            self_mask = self.self_attn_mask[0]
        elif grounding:
            n = 2 * q - 1 + grounding_tokens.shape[1]
            self_mask = torch.ones(n, n, dtype=torch.bool, device=output.device)
            self_mask[:q, :q] = self.self_attn_mask[0, :q, :q]
            self_mask[q:, q:] = False
            output = torch.cat([output, output[:, :q - 1]], dim=1)
            query_pos = torch.cat([query_pos, query_pos[:, :q - 1]], dim=1)
            tokens = grounding_tokens.detach()
        else:
            self_mask = self.self_attn_mask[0, :q, :q]

        heads = self.prediction_heads(output, mask_features, sizes[0], text_embeddings, grounding=grounding,
                                      captioning=captioning)
        predictions = [heads]
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            blocked = heads["blocked"]
            blocked = blocked & ~blocked.all(dim=-1, keepdim=True)
            if captioning:
                blocked = torch.cat([blocked, blocked.new_zeros(b, self.contxt_len, blocked.shape[-1])], dim=1)
            output = self.transformer_cross_attention_layers[i](
                output, src[level], blocked.repeat_interleave(self.num_heads, dim=0), pos[level], query_pos)
            if grounding:
                output = torch.cat([output, tokens], dim=1)
                output = self.transformer_self_attention_layers[i](
                    output, self_mask, torch.cat([query_pos, grounding_tokens], dim=1))
                output = self.transformer_ffn_layers[i](output)
                output, tokens = output[:, :-tokens.shape[1]], output[:, -tokens.shape[1]:]
            else:
                output = self.transformer_self_attention_layers[i](output, self_mask, query_pos)
                output = self.transformer_ffn_layers[i](output)
            heads = self.prediction_heads(output, mask_features, sizes[(i + 1) % self.num_feature_levels],
                                          text_embeddings, grounding=grounding, captioning=captioning)
            predictions.append(heads)
        return predictions

    def forward(self, features: list[Tensor], mask_features: Tensor, text_embeddings: Tensor | None = None, *,
                grounding_tokens: Tensor | None = None, caption_tokens: Tensor | None = None) -> dict[str, Any]:
        """The official decoder's output dict over all queries (seg / grounding: pred_logits, pred_masks,
        pred_captions, aux_outputs; with caption_tokens: pred_captionings, pred_captions, aux_outputs)."""
        predictions = self.decode(self.memory(features), mask_features, text_embeddings,
                                  grounding_tokens=grounding_tokens, caption_tokens=caption_tokens)
        if caption_tokens is not None:
            names = {"pred_captionings": "captionings", "pred_captions": "captions"}
        else:
            names = {"pred_logits": "logits", "pred_masks": "masks", "pred_captions": "captions"}
        packed = [{key: h[head] for key, head in names.items()} for h in predictions]
        return {**packed[-1], "aux_outputs": packed[:-1]}

    @torch.no_grad()
    def generate_caption(self, features: list[Tensor], mask_features: Tensor, steps: int, start_token: int) -> Tensor:
        """Greedy captioning (official `forward_captioning`): (B, L) token ids, position 0 the start token.

        All L positions start as `start_token`; step t decodes the whole context again (the text
        queries are causal) and writes the arg-max token of position t into position t + 1.
        """
        memory = self.memory(features)
        b = mask_features.shape[0]
        ids = torch.full((b, self.contxt_len), start_token, dtype=torch.long, device=mask_features.device)
        table = self.lang_encoder.lang_encoder.token_embedding.weight
        for step in range(min(steps, self.contxt_len - 1)):
            token_emb, _ = self.lang_encoder.forward_language_token(ids, None, norm=False)
            last = self.decode(memory, mask_features, caption_tokens=token_emb)[-1]
            ids[:, step + 1] = (last["captionings"][:, step] @ table.t()).argmax(-1)
        return ids


class XDecoderHead(nn.Module):
    """Pixel decoder + predictor (official `XdecoderHead`, TRANSFORMER_IN_FEATURE multi_scale_pixel_decoder)."""

    def __init__(self, config: XDecoderConfig, in_channels: dict[str, int], strides: dict[str, int]):
        super().__init__()
        c = config
        self.pixel_decoder = TransformerEncoderPixelDecoder(
            in_channels, strides, conv_dim=c.conv_dim, mask_dim=c.mask_dim, norm=c.norm, enc_layers=c.enc_layers,
            nheads=c.nheads, dim_feedforward=c.dim_feedforward, dropout=0.0, pre_norm=c.pre_norm)
        self.predictor = XDecoderPredictor(c, c.conv_dim)

    def pixels(self, features: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        mask_features, _, multi_scale = self.pixel_decoder.forward_features(features)
        return mask_features, multi_scale

    def forward(self, features: dict[str, Tensor], text_embeddings: Tensor | None = None, **tokens) -> dict[str, Any]:
        mask_features, multi_scale = self.pixels(features)
        return self.predictor(multi_scale, mask_features, text_embeddings, **tokens)


@register_model("xdecoder")
class XDecoder(nn.Module):
    """X-Decoder (official `GeneralizedXdecoder`): FocalNet-DW + pixel decoder + X-Decoder predictor.

    Images are float RGB (B, 3, H, W) in [0, 1]; outputs are at the input size.
    """

    config_class = XDecoderConfig
    kind = "segmenter"

    def __init__(self, config: XDecoderConfig):
        super().__init__()
        c = self.config = config
        if c.is_thing and len(c.is_thing) != len(c.class_names):
            raise ValueError(f"is_thing has {len(c.is_thing)} entries for {len(c.class_names)} class names")
        self.backbone = FocalNetDW(embed_dim=c.embed_dim, depths=c.depths, focal_levels=c.focal_levels,
                                   focal_windows=c.focal_windows, mlp_ratio=c.mlp_ratio,
                                   drop_path_rate=c.drop_path_rate)
        self.sem_seg_head = XDecoderHead(c, self.backbone.out_channels, self.backbone.strides)
        if c.retrieval:
            if self.backbone.out_channels["res5"] != c.backbone_dim:
                raise ValueError(f"backbone_dim {c.backbone_dim} != res5 channels {self.backbone.out_channels['res5']}")
            self.backbone_proj = nn.Parameter(torch.empty(c.backbone_dim, c.dim_proj))
            trunc_normal_(self.backbone_proj, std=0.02)
        self.register_buffer("pixel_mean", torch.tensor(c.pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(c.pixel_std).view(-1, 1, 1), persistent=False)

    @property
    def predictor(self) -> XDecoderPredictor:
        return self.sem_seg_head.predictor

    @property
    def num_queries(self) -> int:
        return self.config.num_queries

    # ------------------------------------------------------------------ input

    def preprocess(self, images: Tensor) -> Tensor:
        """[0, 1] RGB -> normalised 0-255, zero-padded (after normalising) to size_divisibility."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"X-Decoder expects float RGB images (B, 3, H, W) in [0, 1], got "
                             f"{tuple(images.shape)} {images.dtype}")
        x = (images * 255.0 - self.pixel_mean) / self.pixel_std
        d = self.config.size_divisibility
        h, w = x.shape[-2:]
        if d > 1:
            x = F.pad(x, (0, -w % d, 0, -h % d))
        return x

    def _upsample(self, masks: Tensor, padded: tuple[int, int], size: tuple[int, int],
                  output_size: tuple[int, int] | None = None) -> Tensor:
        """Mask logits at 1/4 -> the padded input size (bicubic, antialias) -> cropped to the image -> resized
        (bilinear) to `output_size`, the original image's size when the input was resized for the model
        (official sem_seg_postprocess)."""
        masks = F.interpolate(masks, size=padded, mode="bicubic", align_corners=False, antialias=True)
        masks = masks[..., :size[0], :size[1]]
        if output_size is not None and tuple(output_size) != tuple(size):
            masks = F.interpolate(masks, size=tuple(output_size), mode="bilinear", align_corners=False)
        return masks

    # ------------------------------------------------------------------ training paths

    def forward_seg(self, images: Tensor, text_embeddings: Tensor, grounding_tokens: Tensor | None = None
                    ) -> dict[str, Any]:
        """The training forward of official `forward_seg` (losses are computed outside).

        text_embeddings: (K + 1, dim_proj) unit class embeddings, background last (`class_embeddings`).
        grounding_tokens: (B, G, dim_proj) per image the token embeddings of its referring phrases,
        zero-padded to a common G (`grounding_embeddings`). See the module docstring for the outputs.
        """
        if grounding_tokens is not None and not self.config.grounding:
            raise ValueError("this X-Decoder was built without grounding")
        features = self.backbone(self.preprocess(images))
        out = self.sem_seg_head(features, text_embeddings, grounding_tokens=grounding_tokens)
        return self._object_queries(out, grounding_tokens is not None)

    def _object_queries(self, out: dict[str, Any], grounding: bool) -> dict[str, Any]:
        q = self.num_queries

        def keep(d: dict[str, Tensor]) -> dict[str, Tensor]:
            kept = {"pred_logits": d["pred_logits"][:, :q - 1], "pred_masks": d["pred_masks"][:, :q - 1],
                    "pred_captions": d["pred_captions"][:, :q - 1]}
            if grounding:
                kept["pred_gmasks"] = d["pred_masks"][:, q:2 * q - 1]
                kept["pred_gtexts"] = d["pred_captions"][:, q:2 * q - 1]
            return kept

        return {**keep(out), "aux_outputs": [keep(a) for a in out["aux_outputs"]]}

    def forward_vlp(self, images: Tensor, caption_input_ids: Tensor, caption_attention_mask: Tensor
                    ) -> dict[str, Any]:
        """The training forward of official `forward_vlp`: captions (B, L) as CLIP token ids and mask."""
        if not self.config.captioning:
            raise ValueError("this X-Decoder was built without captioning")
        lang = self.predictor.lang_encoder
        token_emb, class_emb = lang.forward_language_token(caption_input_ids, caption_attention_mask, norm=False)
        features = self.backbone(self.preprocess(images))
        out = self.sem_seg_head(features, caption_tokens=token_emb)
        out["caption_tokens"] = token_emb
        out["caption_proj"] = class_emb
        if self.config.retrieval:
            out["backbone_embeddings"] = features["res5"].flatten(2).mean(-1) @ self.backbone_proj
        return out

    # ------------------------------------------------------------------ text

    def class_embeddings(self, class_names: list[str] | tuple[str, ...]) -> Tensor:
        """(K + 1, dim_proj): each class name (and "background", last) embedded with every prompt
        template and averaged (official get_text_embeddings(names + ["background"], is_eval=True)).

        Under no_grad the result is kept for the next call with the same names (the official model stores
        it once per vocabulary too), until any language-encoder weight changes (tracked by version)."""
        names = tuple(class_names) + ("background",)
        if torch.is_grad_enabled():
            return self.predictor.lang_encoder.text_embeddings(list(names), prompt=True)
        lang = self.predictor.lang_encoder
        key = (names, tuple((id(p), p._version, p.device) for p in lang.parameters()))
        cached = self.__dict__.get("_text_cache")
        if cached is None or cached[0] != key:
            cached = (key, lang.text_embeddings(list(names), prompt=True))
            self.__dict__["_text_cache"] = cached  # a plain attribute: not a buffer, not in the state dict
        return cached[1]

    def grounding_embeddings(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """For referring phrases: their tokens' embeddings, concatenated over the phrases ((N, dim_proj),
        padding dropped: the grounding queries), and one embedding per phrase ((T, dim_proj), the
        end-of-text token's), unnormalised as in official get_text_token_embeddings(norm=False)."""
        lang = self.predictor.lang_encoder
        tokens = lang.tokenize(texts)
        token_emb, class_emb = lang.forward_language_token(tokens["input_ids"].to(self.pixel_mean.device),
                                                           tokens["attention_mask"].to(self.pixel_mean.device),
                                                           norm=False)
        return token_emb[tokens["attention_mask"].bool()], class_emb

    # ------------------------------------------------------------------ inference

    def _evaluate(self, images: Tensor, class_names, output_size: tuple[int, int] | None = None
                  ) -> tuple[Tensor, Tensor]:
        """Class logits (B, Q, K+1) of all queries and their mask logits (B, Q, H, W) at the input size."""
        x = self.preprocess(images)
        out = self.sem_seg_head(self.backbone(x), self.class_embeddings(class_names))
        return out["pred_logits"], self._upsample(out["pred_masks"], x.shape[-2:], images.shape[-2:], output_size)

    @torch.no_grad()
    def semantic(self, images: Tensor, class_names: list[str] | tuple[str, ...] | None = None,
                 output_size: tuple[int, int] | None = None) -> Tensor:
        """(B, K, H, W) per-class scores: sum over queries of softmax class prob (background dropped)
        times sigmoid mask (official semantic_inference)."""
        logits, masks = self._evaluate(images, self._names(class_names), output_size)
        return torch.einsum("bqc,bqhw->bchw", logits.softmax(-1)[..., :-1], masks.sigmoid())

    @torch.no_grad()
    def panoptic(self, images: Tensor, class_names: list[str] | tuple[str, ...] | None = None,
                 is_thing: list[bool] | None = None, output_size: tuple[int, int] | None = None
                 ) -> tuple[Tensor, list[list[dict]]]:
        """(B, H, W) int32 segment ids (0 = none) and per image [{"id", "category_id", "isthing"}]
        (official panoptic_inference). Stuff segments of one class are merged. Without `is_thing`
        the model's own flags are used for its own vocabulary, else every class counts as a thing."""
        names = self._names(class_names)
        things = self._things(names, is_thing)
        logits, masks = self._evaluate(images, names, output_size)
        results = [self._panoptic_one(l, m, things) for l, m in zip(logits, masks)]
        return torch.stack([r[0] for r in results]), [r[1] for r in results]

    def _panoptic_one(self, logits: Tensor, masks: Tensor, things: list[bool]) -> tuple[Tensor, list[dict]]:
        num_classes = logits.shape[-1] - 1
        scores, labels = logits.softmax(-1).max(-1)
        masks = masks.sigmoid()
        keep = labels.ne(num_classes) & (scores > self.config.object_mask_threshold)
        scores, labels, masks = scores[keep], labels[keep], masks[keep]
        segments = torch.zeros(masks.shape[-2:], dtype=torch.int32, device=masks.device)
        info: list[dict] = []
        if len(masks) == 0:
            return segments, info
        owner = (scores.view(-1, 1, 1) * masks).argmax(0)
        stuff_ids: dict[int, int] = {}
        for k in range(len(labels)):
            label = int(labels[k])
            thing = things[label]
            area = int((owner == k).sum())
            original = int((masks[k] >= 0.5).sum())
            region = (owner == k) & (masks[k] >= 0.5)
            if area == 0 or original == 0 or not bool(region.any()):
                continue
            if area / original < self.config.overlap_threshold:
                continue
            if not thing:
                if label in stuff_ids:
                    segments[region] = stuff_ids[label]
                    continue
                stuff_ids[label] = len(info) + 1
            segments[region] = len(info) + 1
            info.append({"id": len(info) + 1, "isthing": thing, "category_id": label})
        return segments, info

    @torch.no_grad()
    def instance(self, images: Tensor, class_names: list[str] | tuple[str, ...] | None = None,
                 is_thing: list[bool] | None = None, output_size: tuple[int, int] | None = None
                 ) -> list[dict[str, Tensor]]:
        """Per image {"masks": (N, H, W) bool, "scores": (N,), "labels": (N,)} (official instance_inference):
        the top test_topk_per_image (query, class) pairs, thing classes only, each score times the
        mean mask probability inside its mask."""
        names = self._names(class_names)
        things = torch.tensor(self._things(names, is_thing), device=images.device)
        logits, masks = self._evaluate(images, names, output_size)
        results = []
        for l, m in zip(logits, masks):
            k = l.shape[-1] - 1
            scores = l.softmax(-1)[:, :-1].flatten()
            top_scores, top = scores.topk(min(self.config.test_topk_per_image, scores.numel()), sorted=False)
            labels, query = top % k, top // k
            keep = things[labels]
            top_scores, labels, m = top_scores[keep], labels[keep], m[query[keep]]
            binary = m > 0
            mask_scores = (m.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
            results.append({"masks": binary, "scores": top_scores * mask_scores, "labels": labels})
        return results

    @torch.no_grad()
    def referring(self, images: Tensor, prompts: list[str], output_size: tuple[int, int] | None = None) -> Tensor:
        """(B, H, W) mask probabilities of one referring phrase per image (official evaluate_grounding):
        the duplicated object query whose caption embedding best matches the phrase."""
        if not self.config.grounding:
            raise ValueError("this X-Decoder was built without grounding")
        if len(prompts) != len(images):
            raise ValueError(f"one prompt per image: {len(prompts)} prompts for {len(images)} images")
        q = self.num_queries
        x = self.preprocess(images)
        mask_features, multi_scale = self.sem_seg_head.pixels(self.backbone(x))  # once for the batch
        src, pos, sizes = self.predictor.memory(multi_scale)
        scale = self.predictor.lang_encoder.logit_scale.exp().clamp(max=100)
        out = []
        for i, prompt in enumerate(prompts):  # one decoder pass per phrase (the official batch size is 1)
            tokens, phrase = self.grounding_embeddings([prompt])
            last = self.predictor.decode(([s[i:i + 1] for s in src], [p[i:i + 1] for p in pos], sizes),
                                         mask_features[i:i + 1], grounding_tokens=tokens[None])[-1]
            match = (scale * _unit(last["captions"][0, q:2 * q - 1]) @ _unit(phrase).t()).argmax(0)
            out.append(last["masks"][0, q + match])
        masks = self._upsample(torch.cat(out)[:, None], x.shape[-2:], images.shape[-2:], output_size)
        return masks[:, 0].sigmoid()

    @torch.no_grad()
    def caption(self, images: Tensor, max_len: int | None = None) -> list[str]:
        """Greedy captions (official evaluate_captioning): up to max_len (captioning_step) tokens, cut
        at the end-of-text token and at the first full stop."""
        if not self.config.captioning:
            raise ValueError("this X-Decoder was built without captioning")
        mask_features, multi_scale = self.sem_seg_head.pixels(self.backbone(self.preprocess(images)))
        ids = self.predictor.generate_caption(multi_scale, mask_features, max_len or self.config.captioning_step,
                                              self.config.start_token)
        tokenizer = self.predictor.lang_encoder.tokenizer  # cuts at <|endoftext|>, drops <|startoftext|>
        return [tokenizer.decode(row).split(".")[0] for row in ids]

    @torch.no_grad()
    def multitask(self, images: Tensor, class_names: list[str] | tuple[str, ...] | None, prompts: list[str],
                  caption: bool = True) -> dict[str, Any]:
        """Semantic scores (as `semantic`), referring masks (as `referring`) and captions (as `caption`) of
        every image from ONE backbone + pixel-decoder pass and, per image, ONE decoder pass carrying the
        latent queries and the phrase's grounding queries together (the paper's shared decoder). It is the
        official grounding pass: the latent queries never attend to the grounding side, so their class and
        mask outputs are those of a plain pass. Captions decode over the same features."""
        if len(prompts) != len(images):
            raise ValueError(f"one prompt per image: {len(prompts)} prompts for {len(images)} images")
        q = self.num_queries
        x = self.preprocess(images)
        mask_features, multi_scale = self.sem_seg_head.pixels(self.backbone(x))
        text = self.class_embeddings(self._names(class_names))
        src, pos, sizes = self.predictor.memory(multi_scale)
        scale = self.predictor.lang_encoder.logit_scale.exp().clamp(max=100)
        logits, masks, referred = [], [], []
        for i, prompt in enumerate(prompts):
            tokens, phrase = self.grounding_embeddings([prompt])
            last = self.predictor.decode(([s[i:i + 1] for s in src], [p[i:i + 1] for p in pos], sizes),
                                         mask_features[i:i + 1], text, grounding_tokens=tokens[None])[-1]
            logits.append(last["logits"][:, :q])
            masks.append(last["masks"][:, :q])
            match = (scale * _unit(last["captions"][0, q:2 * q - 1]) @ _unit(phrase).t()).argmax(0)
            referred.append(last["masks"][:, q + match])
        size = images.shape[-2:]
        masks = self._upsample(torch.cat(masks), x.shape[-2:], size)
        semantic = torch.einsum("bqc,bqhw->bchw", torch.cat(logits).softmax(-1)[..., :-1], masks.sigmoid())
        result = {"semantic": semantic, "referring": self._upsample(torch.cat(referred), x.shape[-2:], size)[:, 0]
                  .sigmoid()}
        if caption:
            ids = self.predictor.generate_caption(multi_scale, mask_features, self.config.captioning_step,
                                                  self.config.start_token)
            tokenizer = self.predictor.lang_encoder.tokenizer
            result["captions"] = [tokenizer.decode(row).split(".")[0] for row in ids]
        return result

    # ------------------------------------------------------------------ vocabulary

    def _names(self, class_names) -> tuple[str, ...]:
        names = tuple(class_names) if class_names is not None else self.config.class_names
        if not names:
            raise ValueError("no class names given and the model has no default vocabulary")
        return names

    def _things(self, names: tuple[str, ...], is_thing: list[bool] | None) -> list[bool]:
        if is_thing is not None:
            if len(is_thing) != len(names):
                raise ValueError(f"is_thing has {len(is_thing)} entries for {len(names)} classes")
            return [bool(t) for t in is_thing]
        if names == self.config.class_names and self.config.is_thing:
            return list(self.config.is_thing)
        return [True] * len(names)

"""X-Decoder's training losses (Zou et al., "Generalized Decoding for Pixel, Image, and Language",
CVPR 2023; github.com/microsoft/X-Decoder, branch v2.0: modeling/modules/matcher.py, criterion.py,
point_features.py, modeling/language/loss.py, and how modeling/architectures/xdecoder_model.py
builds and calls them).

Conventions that matter:

* **Queries.** The segmentation losses see the 100 object queries only: the model drops the global
  (class) query before calling the criterion. ``pred_logits`` (B, Q, K + 1) are similarities to
  the K class-name embeddings plus a last "background" entry, which is the no-object class
  (weight ``eos_coef`` = 0.1 in the cross-entropy).
* **Points.** Masks are compared at random points, never on the full grid. Coordinates lie in
  [0, 1] x [0, 1] as (x, y) and are read with ``grid_sample(align_corners=False)`` (detectron2's
  ``point_sample``), so predictions and targets of different sizes share the same points. The
  matcher draws one set of ``num_points`` uniform points per image, shared by every prediction
  and target. The loss draws PointRend importance-sampled points for each matched pair: of
  ``oversample_ratio * num_points`` uniform candidates, the ``importance_sample_ratio`` share
  whose bilinear logit is closest to 0, plus fresh uniform points for the rest.
* **Matching.** ``cost = cost_class * (-p[target class]) + cost_mask * BCE + cost_dice * dice``
  (weights 2 / 5 / 5), solved per image with ``scipy.optimize.linear_sum_assignment``. Grounding
  queries are matched with the same costs, but their class cost is the softmax over *queries* of
  the query-to-phrase similarity.
* **Normalisation.** Mask BCE and dice are summed over matched pairs and divided by the number
  of target masks in the batch (averaged over processes under DDP, at least 1); the grounding
  mask losses by the number of matched grounding pairs.
* **Deep supervision.** Losses of the last layer end in ``_0``; the auxiliary outputs are taken
  in reverse, so ``_1`` is the layer before the last, ``_9`` the prediction from the learnable
  queries alone (10 predictions for 9 decoder layers). Caption, captioning, retrieval and
  grounding losses are only computed on the last ``TOP_*_LAYERS`` (3) predictions. Each layer is
  matched on its own.
* **Random numbers.** Points are drawn in the official order (per layer: matcher, mask loss,
  grounding matcher, grounding loss) with ``torch.rand``; pass a ``torch.Generator`` to make
  them reproducible without touching the global generator.

Outputs (keys as in the official model; every tensor batch-first):

* segmentation (``SetCriterion.forward``): ``pred_logits`` (B, Q, K+1), ``pred_masks`` (B, Q, h, w)
  logits, ``pred_captions`` (B, Q, D) class embeddings of the queries (before normalisation),
  ``pred_gmasks`` (B, G, h, w) and ``pred_gtexts`` (B, G, D) for the grounding queries, and
  ``aux_outputs``: a list (first layer first) of dicts with the same keys.
* vision-language (``SetCriterion.forward_vlp``): ``pred_captions`` (B, Q+1, D), the object
  queries then the global one; ``pred_captionings`` (B, L, D) the caption-token outputs;
  ``aux_outputs``; optionally ``backbone_embeddings`` (B, D), the pooled backbone feature
  projected by ``backbone_proj``, for the model's own contrast ``loss_retrieval_backbone_0``
  (computed in the official model's ``forward_vlp``; here, when the key is present).

Targets (one dict per image):

* ``labels`` (n,) int64 in [0, K), ``masks`` (n, H, W) in {0, 1};
* captions: ``captions`` (m, D) normalised embeddings of the image's noun phrases and caption,
  ``captions_hash`` (m,) and ``labels_hash`` (n,) integer ids of the (stemmed) texts: equal
  hashes are the same concept, so they are positives of each other;
* grounding: ``grounding_masks`` (t, H, W) or None, ``grounding_class_embs`` (t, D),
  ``grounding_hash`` (t,), ``grounding_task`` "text" or "class";
* vision-language: ``caption_tokens`` (1, L, D) token embeddings of the caption, ``caption_proj``
  (1, D) its projected embedding, ``caption_tokenids`` (1, L), ``caption_mask`` (1, L)
  (``vlp_targets`` splits batched tensors into these).

``extra``: ``logit_scale`` (the language encoder's log temperature ``lang_encoder.logit_scale``, a
0-d tensor), ``class_embeddings`` (K+1, D) the normalised class-name embeddings the class logits
were computed with (caption loss) and ``token_embedding`` (V, D) the tied token-embedding matrix
(captioning loss).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

__all__ = [
    "point_sample", "calculate_uncertainty", "get_uncertain_point_coords_with_randomness",
    "dice_loss", "sigmoid_ce_loss", "batch_dice_cost", "batch_sigmoid_ce_cost",
    "vl_similarity", "image_text_contrastive_loss", "multi_positive_contrastive_loss",
    "HungarianMatcher", "SetCriterion", "vlp_targets", "xdecoder_weight_dict", "weight_losses", "total_loss",
    "TOP_LAYERS", "GROUNDING_WEIGHT",
]

TOP_LAYERS = {"mask": 10, "caption": 3, "captioning": 3, "retrieval": 3, "grounding": 3}  # focalt_unicl_lang.yaml
GROUNDING_WEIGHT = {"text": 2.0, "class": 0.5}  # GROUNDING.TEXT_WEIGHT / CLASS_WEIGHT
MAX_LOGIT_SCALE = 100.0
EPS = 1e-7  # the official `x / (x.norm() + 1e-7)`

Indices = list[tuple[Tensor, Tensor]]


# ----------------------------------------------------------------------------- points

def point_sample(input: Tensor, point_coords: Tensor, **kwargs: Any) -> Tensor:
    """Bilinear values of ``input`` (N, C, H, W) at ``point_coords`` (N, P, 2) or (N, h, w, 2).

    Coordinates are (x, y) in [0, 1] (``grid_sample`` with ``2 c - 1``); pass
    ``align_corners=False`` as the official code does. Returns (N, C, P) or (N, C, h, w).
    """
    flat = point_coords.dim() == 3
    grid = point_coords.unsqueeze(2) if flat else point_coords
    out = F.grid_sample(input, 2.0 * grid - 1.0, **kwargs)
    return out.squeeze(3) if flat else out


def calculate_uncertainty(logits: Tensor) -> Tensor:
    """PointRend's uncertainty of class-agnostic (R, 1, ...) logits: ``-|logit|``."""
    if logits.shape[1] != 1:
        raise ValueError(f"expected class-agnostic logits (R, 1, ...), got {tuple(logits.shape)}")
    return -logits.abs()


def get_uncertain_point_coords_with_randomness(
    coarse_logits: Tensor, uncertainty_func: Callable[[Tensor], Tensor], num_points: int,
    oversample_ratio: float, importance_sample_ratio: float, generator: torch.Generator | None = None,
) -> Tensor:
    """PointRend training points for (N, 1, H, W) logits: (N, num_points, 2) coordinates in [0, 1].

    ``int(num_points * oversample_ratio)`` uniform candidates are drawn; the
    ``int(importance_sample_ratio * num_points)`` most uncertain of them are kept (uncertainty of
    the *interpolated* logit, not the interpolated uncertainty) and the rest are fresh uniform
    points.
    """
    if oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
        raise ValueError("need oversample_ratio >= 1 and 0 <= importance_sample_ratio <= 1")
    n = coarse_logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    device = coarse_logits.device
    candidates = torch.rand(n, num_sampled, 2, device=device, dtype=coarse_logits.dtype, generator=generator)
    uncertainty = uncertainty_func(point_sample(coarse_logits, candidates, align_corners=False))
    num_uncertain = int(importance_sample_ratio * num_points)
    idx = torch.topk(uncertainty[:, 0, :], k=num_uncertain, dim=1).indices
    coords = torch.gather(candidates, 1, idx[..., None].expand(-1, -1, 2))
    num_random = num_points - num_uncertain
    if num_random > 0:
        # default dtype, as the official code: the caller casts the whole set
        coords = torch.cat([coords, torch.rand(n, num_random, 2, device=device, generator=generator)], dim=1)
    return coords


# ----------------------------------------------------------------------------- mask losses and costs

def dice_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Sum over masks of ``1 - (2 |p t| + 1) / (|p| + |t| + 1)``, p = sigmoid(inputs), over ``num_masks``.

    ``inputs`` are (N, P) logits, ``targets`` (N, P) in [0, 1].
    """
    probs = inputs.sigmoid().flatten(1)
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def sigmoid_ce_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Per-mask mean binary cross-entropy of (N, P) logits, summed over masks and divided by ``num_masks``."""
    return F.binary_cross_entropy_with_logits(inputs, targets, reduction="none").mean(1).sum() / num_masks


def batch_dice_cost(inputs: Tensor, targets: Tensor) -> Tensor:
    """Dice loss between every prediction (N, P) logits and every target (M, P): an (N, M) matrix."""
    probs = inputs.sigmoid().flatten(1)
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def batch_sigmoid_ce_cost(inputs: Tensor, targets: Tensor) -> Tensor:
    """Mean BCE between every prediction (N, P) logits and every target (M, P): an (N, M) matrix.

    BCE(x, t) = t softplus(-x) + (1 - t) softplus(x), so the pairwise sum is two matrix products.
    """
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / inputs.shape[1]


def _stack_padded(masks: Sequence[Tensor]) -> list[Tensor]:
    """Zero-pad per-image (n, H, W) masks to the largest H, W in the batch (official `nested_tensor`)."""
    h = max(m.shape[-2] for m in masks)
    w = max(m.shape[-1] for m in masks)
    return [F.pad(m, (0, w - m.shape[-1], 0, h - m.shape[-2])) for m in masks]


# ----------------------------------------------------------------------------- contrastive losses

def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` of every process along dim 0 (sizes may differ); only the local part keeps its gradient."""
    if _world_size() == 1:
        return x
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(_world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, max(sizes) - x.shape[0]))
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    parts = [p[:s] for p, s in zip(parts, sizes)]
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def _scale(logit_scale: Tensor) -> Tensor:
    return logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)


def _normalize(x: Tensor) -> Tensor:
    return x / (x.norm(dim=-1, keepdim=True) + EPS)


def _soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """timm's SoftTargetCrossEntropy: mean over rows of ``-sum(target * log_softmax(logits))``."""
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def vl_similarity(image_feat: Tensor, text_feat: Tensor, logit_scale: Tensor) -> Tensor:
    """``min(exp(logit_scale), 100) * image_feat @ text_feat.T``."""
    return _scale(logit_scale) * image_feat @ text_feat.T


def image_text_contrastive_loss(image_feat: Tensor, text_feat: Tensor, logit_scale: Tensor) -> Tensor:
    """CLIP loss of paired (B, D) image and text features, gathered over processes (official
    ``image_text_contrastive_loss_queue``; there is no queue): mean of the image-to-text and
    text-to-image cross-entropies over the global batch."""
    image_feat = _normalize(_all_gather(image_feat.contiguous()))
    text_feat = _normalize(_all_gather(text_feat.contiguous()))
    logits = vl_similarity(image_feat, text_feat, logit_scale)
    gt = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, gt) + F.cross_entropy(logits.T, gt)) / 2


def multi_positive_contrastive_loss(image_feat: Tensor, text_feat: Tensor, text_hash: Tensor,
                                    logit_scale: Tensor) -> Tensor:
    """Query-phrase contrast with duplicates (official ``ql_multi_contrastive_loss``).

    Row i pairs ``image_feat[i]`` with ``text_feat[i]``; texts with equal ``text_hash`` are one
    concept (its first feature stands for it). Loss: 0.7 image-to-concept cross-entropy + 0.3
    concept-to-image cross-entropy with the concept's images as equal positives.
    """
    image_feat = _all_gather(image_feat)
    text_feat = _all_gather(text_feat)
    text_hash = _all_gather(text_hash.to(image_feat.device))
    concepts, concept_of = torch.unique(text_hash, return_inverse=True)
    rows = torch.arange(len(text_hash), device=text_hash.device)
    first = torch.full((len(concepts),), len(text_hash), device=text_hash.device).scatter_reduce(
        0, concept_of, rows, reduce="amin")
    gt = F.one_hot(concept_of, len(concepts)).to(image_feat.dtype)
    logits = vl_similarity(image_feat, text_feat[first], logit_scale)
    loss_image = _soft_cross_entropy(logits, gt)
    loss_text = _soft_cross_entropy(logits.T, gt.T / gt.T.sum(-1, keepdim=True))
    return 0.7 * loss_image + 0.3 * loss_text


# ----------------------------------------------------------------------------- matching

def _as_index_pairs(pairs: Sequence[tuple[Any, Any]]) -> Indices:
    return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in pairs]


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising the weighted class + BCE + dice cost.

    ``forward`` returns, per image, ``(pred_idx, tgt_idx)`` (pred_idx ascending) with
    ``min(num_queries, num_targets)`` pairs.
    """

    def __init__(self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 num_points: int = 12544):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("all costs can't be 0")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    def cost_matrix(self, cost_class: Tensor, out_mask: Tensor, tgt_mask: Tensor,
                    generator: torch.Generator | None = None) -> Tensor:
        """(Q, T) total cost from a class cost and (Q, h, w) mask logits vs (T, H, W) target masks,
        compared at one shared set of ``num_points`` uniform points (drawn here)."""
        tgt_mask = tgt_mask.to(out_mask)
        coords = torch.rand(1, self.num_points, 2, device=out_mask.device, dtype=tgt_mask.dtype, generator=generator)
        tgt_points = point_sample(tgt_mask[:, None], coords.expand(len(tgt_mask), -1, -1), align_corners=False)
        out_points = point_sample(out_mask[:, None], coords.expand(len(out_mask), -1, -1), align_corners=False)
        out_points, tgt_points = out_points.squeeze(1).float(), tgt_points.squeeze(1).float()
        return (self.cost_mask * batch_sigmoid_ce_cost(out_points, tgt_points)
                + self.cost_class * cost_class
                + self.cost_dice * batch_dice_cost(out_points, tgt_points))

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Any]],
                generator: torch.Generator | None = None) -> Indices:
        """Match ``pred_logits`` / ``pred_masks`` to ``labels`` / ``masks``; class cost ``-softmax(logits)[label]``."""
        pairs = []
        for b, target in enumerate(targets):
            prob = outputs["pred_logits"][b].softmax(-1)
            cost = self.cost_matrix(-prob[:, target["labels"]], outputs["pred_masks"][b], target["masks"], generator)
            pairs.append(linear_sum_assignment(cost.cpu()))
        return _as_index_pairs(pairs)

    @torch.no_grad()
    def match_grounding(self, similarities: Sequence[Tensor], pred_gmasks: Tensor,
                        targets: Sequence[Mapping[str, Any]], generator: torch.Generator | None = None) -> Indices:
        """Match grounding queries to phrases: ``similarities[b]`` (G, t) logits, class cost is
        ``-softmax`` over the queries (dim 0), masks vs ``grounding_masks``."""
        pairs = []
        for b, target in enumerate(targets):
            cost = self.cost_matrix(-similarities[b].softmax(dim=0), pred_gmasks[b], target["grounding_masks"],
                                    generator)
            pairs.append(linear_sum_assignment(cost.cpu()))
        return _as_index_pairs(pairs)

    @torch.no_grad()
    def match_captions(self, unmatched: Sequence[Tensor], targets: Sequence[Mapping[str, Any]],
                       logit_scale: Tensor) -> Indices:
        """Match normalised embeddings of the queries left unmatched (per image (U_b, D)) to the image's
        ``captions``; cost ``-softmax`` over all the batch's captions, class weight only."""
        texts = torch.cat([t["captions"] for t in targets])
        pairs, start = [], 0
        for b, target in enumerate(targets):
            stop = start + len(target["captions"])
            prob = vl_similarity(unmatched[b], texts, logit_scale).softmax(-1)
            pairs.append(linear_sum_assignment((self.cost_class * -prob[:, start:stop]).cpu()))
            start = stop
        return _as_index_pairs(pairs)


# ----------------------------------------------------------------------------- criterion

def _zero(x: Tensor) -> Tensor:
    """A zero that keeps ``x`` in the graph (so DDP sees every parameter used)."""
    return x.sum() * 0.0


def _src_index(indices: Indices) -> tuple[Tensor, Tensor]:
    batch = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
    return batch, torch.cat([src for src, _ in indices])


class SetCriterion(nn.Module):
    """X-Decoder's losses. ``forward`` (segmentation batches: matched) and ``forward_vlp`` (image-caption
    batches: no matching) return unweighted named losses; weight them with
    ``weight_losses(losses, criterion.weight_dict)`` or sum them with ``total_loss``.

    Loss names: ``labels`` -> loss_mask_ce, ``masks`` -> loss_mask_bce / loss_mask_dice, ``captions`` ->
    loss_caption, ``groundings`` -> loss_grounding_bce / _dice / _ce; ``captionings`` -> loss_captioning,
    ``retrievals`` -> loss_retrieval_decoder. Each gets the suffix ``_<layer>`` (0 = last).
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: Mapping[str, float],
                 eos_coef: float = 0.1, top_x_layers: Mapping[str, int] | None = None,
                 seg_losses: Sequence[str] = ("labels", "masks", "captions", "groundings"),
                 vlp_losses: Sequence[str] = ("captionings", "retrievals"),
                 num_points: int = 12544, oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                 grounding_weight: Mapping[str, float] | None = None):
        super().__init__()
        unknown = set(seg_losses) - set(self._seg_loss_fns()) | set(vlp_losses) - set(self._vlp_loss_fns())
        if unknown:
            raise ValueError(f"unknown losses {sorted(unknown)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        self.top_x_layers = dict(TOP_LAYERS if top_x_layers is None else top_x_layers)
        self.seg_losses = tuple(seg_losses)
        self.vlp_losses = tuple(vlp_losses)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.grounding_weight = dict(GROUNDING_WEIGHT if grounding_weight is None else grounding_weight)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def _seg_loss_fns(self) -> dict[str, Callable[..., dict[str, Tensor]]]:
        return {"labels": self.loss_labels, "masks": self.loss_masks, "captions": self.loss_captions,
                "groundings": self.loss_groundings}

    def _vlp_loss_fns(self) -> dict[str, Callable[..., dict[str, Tensor]]]:
        return {"captionings": self.loss_captionings, "retrievals": self.loss_itc}

    def _active(self, task: str, layer: int) -> bool:
        return layer < self.top_x_layers[task]

    def _point_losses(self, src_masks: Tensor, target_masks: Tensor, num_masks: float,
                      generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """BCE and dice of matched (N, h, w) mask logits vs (N, H, W) targets on importance-sampled points."""
        src_masks = src_masks[:, None]
        target_masks = target_masks.to(src_masks)[:, None]
        with torch.no_grad():
            coords = get_uncertain_point_coords_with_randomness(
                src_masks, calculate_uncertainty, self.num_points, self.oversample_ratio,
                self.importance_sample_ratio, generator).to(src_masks.dtype)
            labels = point_sample(target_masks, coords, align_corners=False).squeeze(1)
        logits = point_sample(src_masks, coords, align_corners=False).squeeze(1)
        return sigmoid_ce_loss(logits, labels, num_masks), dice_loss(logits, labels, num_masks)

    # --- segmentation losses: (outputs, targets, indices, num_masks, extra, generator) -> {name: loss}

    def loss_labels(self, outputs, targets, indices, num_masks, extra, generator) -> dict[str, Tensor]:
        """Cross-entropy over K classes + background; unmatched queries are background (weight ``eos_coef``)."""
        logits = outputs["pred_logits"].float()
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(f"pred_logits has {logits.shape[-1]} classes, expected {self.num_classes} + background")
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[_src_index(indices)] = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(
            logits.device)
        return {"loss_mask_ce": F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)}

    def loss_masks(self, outputs, targets, indices, num_masks, extra, generator) -> dict[str, Tensor]:
        """Sigmoid BCE and dice of matched masks on importance-sampled points, over ``num_masks``."""
        src_masks = outputs["pred_masks"][_src_index(indices)]
        if len(src_masks) == 0:
            zero = _zero(outputs["pred_masks"])
            return {"loss_mask_bce": zero, "loss_mask_dice": zero}
        masks = _stack_padded([t["masks"] for t in targets])
        target_masks = torch.cat([m[j] for m, (_, j) in zip(masks, indices)])
        bce, dice = self._point_losses(src_masks, target_masks, num_masks, generator)
        return {"loss_mask_bce": bce, "loss_mask_dice": dice}

    def loss_captions(self, outputs, targets, indices, num_masks, extra, generator) -> dict[str, Tensor]:
        """Query-phrase contrast: matched queries against their class names, and the queries left
        unmatched, matched once more to the image's noun phrases / caption, against those."""
        captions = outputs["pred_captions"]
        logit_scale = extra["logit_scale"]
        v_class = _normalize(torch.cat([captions[b][i] for b, (i, _) in enumerate(indices)]))
        t_class = torch.cat([extra["class_embeddings"][t["labels"][j]] for t, (_, j) in zip(targets, indices)])
        h_class = torch.cat([torch.as_tensor(t["labels_hash"])[j] for t, (_, j) in zip(targets, indices)])

        # The official matcher normalises the unmatched queries in place under no_grad, so the phrase
        # half of the loss trains the text side only; kept (detached here).
        unmatched = []
        for b, (i, _) in enumerate(indices):
            keep = torch.ones(captions.shape[1], dtype=torch.bool, device=captions.device)
            keep[i] = False
            unmatched.append(_normalize(captions[b][keep].detach()))
        phrase_indices = self.matcher.match_captions(unmatched, targets, logit_scale)
        v_phrase = torch.cat([unmatched[b][i] for b, (i, _) in enumerate(phrase_indices)])
        t_phrase = torch.cat([t["captions"][j] for t, (_, j) in zip(targets, phrase_indices)])
        h_phrase = torch.cat([torch.as_tensor(t["captions_hash"])[j] for t, (_, j) in zip(targets, phrase_indices)])

        loss = multi_positive_contrastive_loss(torch.cat([v_phrase, v_class]), torch.cat([t_phrase, t_class]),
                                               torch.cat([h_phrase, h_class]), logit_scale)
        return {"loss_caption": loss}

    def loss_groundings(self, outputs, targets, indices, num_masks, extra, generator) -> dict[str, Tensor]:
        """Grounding queries vs referring phrases: matched (own matching) mask BCE + dice, and a
        phrase-to-query cross-entropy (phrases with equal hash share their queries), weighted by task."""
        gmasks = outputs["pred_gmasks"]
        if any(t["grounding_masks"] is None for t in targets):
            zero = _zero(gmasks)
            return {"loss_grounding_bce": zero, "loss_grounding_dice": zero, "loss_grounding_ce": zero}
        logit_scale = extra["logit_scale"]
        similarities = [vl_similarity(_normalize(outputs["pred_gtexts"][b]), _normalize(t["grounding_class_embs"]),
                                      logit_scale) for b, t in enumerate(targets)]
        g_indices = self.matcher.match_grounding(similarities, gmasks, targets, generator)

        src_masks = gmasks[_src_index(g_indices)]
        masks = _stack_padded([t["grounding_masks"] for t in targets])
        target_masks = torch.cat([m[j] for m, (_, j) in zip(masks, g_indices)])
        bce, dice = self._point_losses(src_masks, target_masks, len(src_masks), generator)

        loss_ce = 0.0
        for sim, t, (i, j) in zip(similarities, targets, g_indices):
            assigned = torch.zeros_like(sim)
            assigned[i, j] = 1
            text_hash = torch.as_tensor(t["grounding_hash"], device=sim.device)
            same = (text_hash[:, None] == text_hash[None, :]).to(sim.dtype)
            assigned = assigned @ (same / same.sum(-1, keepdim=True))
            loss_ce = loss_ce + self.grounding_weight[t["grounding_task"]] * _soft_cross_entropy(sim.T, assigned.T)
        return {"loss_grounding_bce": bce, "loss_grounding_dice": dice, "loss_grounding_ce": loss_ce / len(targets)}

    # --- vision-language losses: (outputs, targets, extra) -> {name: loss}

    def loss_captionings(self, outputs, targets, extra) -> dict[str, Tensor]:
        """Next-token cross-entropy of the caption-token outputs through the tied token embeddings;
        padding ignored, summed over valid targets / (their count + 1)."""
        logits = outputs["pred_captionings"][:, :-1] @ extra["token_embedding"].T
        token_ids = torch.cat([t["caption_tokenids"] for t in targets])[:, 1:]
        mask = torch.cat([t["caption_mask"] for t in targets])[:, 1:].to(logits.dtype)
        loss = F.cross_entropy(logits.transpose(1, 2), token_ids, reduction="none")
        return {"loss_captioning": (loss * mask).sum() / (mask.sum() + 1)}

    def loss_itc(self, outputs, targets, extra) -> dict[str, Tensor]:
        """Image-caption contrast of the global query, plus 0.5 x a fine-grained object-query /
        caption-token contrast (0.7 image-to-token + 0.3 token-to-image, later tokens weigh more)."""
        logit_scale = extra["logit_scale"]
        captions = outputs["pred_captions"]
        loss_global = image_text_contrastive_loss(captions[:, -1], torch.cat([t["caption_proj"] for t in targets]),
                                                  logit_scale)

        tokens = _normalize(torch.cat([t["caption_tokens"] for t in targets]))  # (B, L, D)
        valid = torch.cat([t["caption_mask"] for t in targets]).bool()  # (B, L)
        token_weight = valid.to(tokens.dtype).cumsum(1) * valid  # 1, 2, 3, ... on valid tokens
        queries = _normalize(captions[:, :-1])  # (B, Q, D)
        bs, nq, _ = queries.shape
        # gt[i, k]: weight of valid token k if it belongs to caption i, rows normalised
        owner = torch.arange(bs, device=valid.device)[:, None].expand_as(valid)[valid]
        gt = F.one_hot(owner, bs).T.to(tokens.dtype) * token_weight[valid][None, :]
        gt = gt / (gt.sum(1, keepdim=True) + EPS)
        scale = _scale(logit_scale)
        logits_vt = scale * (queries @ tokens[valid].T).mean(1)  # (B, K)
        logits_tv = scale * (tokens @ queries.flatten(0, 1).T).reshape(bs, -1, bs, nq).mean(-1)[valid]  # (K, B)
        loss_fine = 0.7 * _soft_cross_entropy(logits_vt, gt) + 0.3 * _soft_cross_entropy(logits_tv, gt.T)
        return {"loss_retrieval_decoder": loss_global + 0.5 * loss_fine}

    # --- entry points

    def _num_masks(self, targets: Sequence[Mapping[str, Any]], device: torch.device) -> float:
        num = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        if _world_size() > 1:
            dist.all_reduce(num)
        return torch.clamp(num / _world_size(), min=1).item()

    def forward(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Any]],
                extra: Mapping[str, Any] | None = None, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Segmentation losses of the last layer (``_0``) and of every auxiliary layer, each matched on its own."""
        extra = {} if extra is None else extra
        layers = [outputs, *reversed(outputs.get("aux_outputs", []))]
        num_masks = self._num_masks(targets, outputs["pred_logits"].device)
        tasks = {"labels": "mask", "masks": "mask", "captions": "caption", "groundings": "grounding"}
        fns = self._seg_loss_fns()
        losses: dict[str, Tensor] = {}
        for layer, out in enumerate(layers):
            indices = self.matcher(out, targets, generator)
            for name in self.seg_losses:
                if self._active(tasks[name], layer):
                    for key, value in fns[name](out, targets, indices, num_masks, extra, generator).items():
                        losses[f"{key}_{layer}"] = value
        return losses

    def forward_vlp(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Any]],
                    extra: Mapping[str, Any]) -> dict[str, Tensor]:
        """Captioning and retrieval losses of the last layer and the auxiliary layers (no matching)."""
        layers = [outputs, *reversed(outputs.get("aux_outputs", []))]
        tasks = {"captionings": "captioning", "retrievals": "retrieval"}
        fns = self._vlp_loss_fns()
        losses: dict[str, Tensor] = {}
        for layer, out in enumerate(layers):
            for name in self.vlp_losses:
                if self._active(tasks[name], layer):
                    for key, value in fns[name](out, targets, extra).items():
                        losses[f"{key}_{layer}"] = value
        if "retrievals" in self.vlp_losses and "backbone_embeddings" in outputs:
            losses["loss_retrieval_backbone_0"] = image_text_contrastive_loss(
                outputs["backbone_embeddings"], torch.cat([t["caption_proj"] for t in targets]), extra["logit_scale"])
        return losses


def vlp_targets(caption_tokens: Tensor, caption_proj: Tensor, token_ids: Tensor,
                attention_mask: Tensor) -> list[dict[str, Tensor]]:
    """Per-image vision-language targets from batched (B, L, D), (B, D), (B, L), (B, L) tensors."""
    return [{"caption_tokens": caption_tokens[b:b + 1], "caption_proj": caption_proj[b:b + 1],
             "caption_tokenids": token_ids[b:b + 1], "caption_mask": attention_mask[b:b + 1]}
            for b in range(len(caption_tokens))]


# ----------------------------------------------------------------------------- weights

def xdecoder_weight_dict(
    num_predictions: int = 10, *, class_weight: float = 2.0, mask_weight: float = 5.0, dice_weight: float = 5.0,
    caption_weight: float = 1.0, captioning_weight: float = 2.0, retrieval_weight: float = 2.0,
    backbone_retrieval_weight: float = 8.0, grounding_class_weight: float = 0.4, grounding_mask_weight: float = 1.0,
    grounding_dice_weight: float = 1.0,
    tasks: Sequence[str] = ("mask", "caption", "captioning", "retrieval", "grounding"),
    top_x_layers: Mapping[str, int] | None = None, deep_supervision: bool = True,
) -> dict[str, float]:
    """The official ``weight_dict`` (``GeneralizedXdecoder.from_config``; defaults: focalt_unicl_lang.yaml).

    ``num_predictions`` is the official DEC_LAYERS (10): the decoder layers (``XDecoderConfig.dec_layers``,
    9) + 1 for the prediction on the initial queries. Layer ``i`` of a task gets a weight only if
    ``i < TOP_<task>_LAYERS``. ``loss_retrieval_backbone_*`` is the model's own
    backbone-feature contrast (computed outside the criterion, on the last layer only).
    """
    per_task = {
        "mask": {"loss_mask_ce": class_weight, "loss_mask_dice": dice_weight, "loss_mask_bce": mask_weight},
        "caption": {"loss_caption": caption_weight},
        "captioning": {"loss_captioning": captioning_weight},
        "retrieval": {"loss_retrieval_decoder": retrieval_weight, "loss_retrieval_backbone": backbone_retrieval_weight},
        "grounding": {"loss_grounding_ce": grounding_class_weight, "loss_grounding_dice": grounding_dice_weight,
                      "loss_grounding_bce": grounding_mask_weight},
    }
    unknown = set(tasks) - set(per_task)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}")
    top = TOP_LAYERS if top_x_layers is None else top_x_layers
    base = {name: w for task in per_task if task in tasks for name, w in per_task[task].items()}
    weights = {f"{name}_0": w for name, w in base.items()}
    if deep_supervision:
        for layer in range(1, num_predictions):
            weights.update({f"{name}_{layer}": w for name, w in base.items() if layer < top[name.split("_")[1]]})
    return weights


def weight_losses(losses: Mapping[str, Tensor], weight_dict: Mapping[str, float]) -> dict[str, Tensor]:
    """Each loss times its weight; losses without a weight are dropped (as the official model's forward)."""
    return {k: v * weight_dict[k] for k, v in losses.items() if k in weight_dict}


def total_loss(losses: Mapping[str, Tensor], weight_dict: Mapping[str, float]) -> Tensor:
    """The weighted sum that is back-propagated."""
    return sum(weight_losses(losses, weight_dict).values())

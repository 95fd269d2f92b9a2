"""X-Decoder's training step: targets and text as the official `GeneralizedXdecoder` prepares them.

Official: microsoft/X-Decoder v2.0 `modeling/architectures/xdecoder_model.py` (`forward_seg`,
`forward_vlp`, `prepare_targets`, `prepare_vlp_targets`) and `modeling/language/vlpencoder.py`
(`get_text_embeddings(is_eval=False)`). One step here runs both of the official training passes on the
same batch (the official trainer draws them from two datasets, COCO panoptic and image-text pairs):

- segmentation: class names embedded with ONE random prompt template each (the training path; evaluation
  averages all 81), "background" a class of its own; every referring phrase of an image becomes
  grounding queries (its tokens, padding dropped) and a grounding target (its end-of-text embedding and
  mask); the image's class names ("nouns") and caption give the query-phrase contrast; losses: matched
  class CE (no-object 0.1), mask BCE + dice on importance-sampled points, grounding, caption contrast,
  over every decoder layer (deep supervision as the official weight_dict).
- vision-language: the caption teacher-forced through the decoder's text queries: captioning CE through the
  tied token embeddings, image-text contrast of the global query and of the backbone.

Batches are dicts of lists (`vision.data.shapes.collate_scenes`): image (B, 3, H, W) in [0, 1], per image
masks (n, H, W), labels (n,) into the dataset's `classes`, caption, phrases and phrase_index (the mask each
phrase names).
"""
from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import Tensor

from segmentation.xdecoder import XDecoder
from segmentation.xdecoder_language import PROMPT_TEMPLATES, prompt_class_name
from segmentation.xdecoder_loss import (TOP_LAYERS, HungarianMatcher, SetCriterion, total_loss, vlp_targets,
                                        weight_losses, xdecoder_weight_dict)

__all__ = ["XDecoderLoss", "training_text_embeddings"]


def _hash(text: str) -> int:
    """A stable concept id (the official code hashes stemmed text; equal ids are positives)."""
    return zlib.crc32(text.lower().strip().encode())


def _random_template(name: str, generator: torch.Generator | None) -> str:
    device = generator.device if generator is not None else "cpu"
    k = int(torch.randint(len(PROMPT_TEMPLATES), (1,), generator=generator, device=device))
    return PROMPT_TEMPLATES[k].format(prompt_class_name(name).replace(",", "").replace("+", " "))


def training_text_embeddings(model: XDecoder, names: list[str], *, prompt: bool = True,
                             generator: torch.Generator | None = None) -> Tensor:
    """(len(names), dim_proj) unit embeddings, one random template per name (official is_eval=False)."""
    lang = model.predictor.lang_encoder
    texts = [_random_template(n, generator) for n in names] if prompt else list(names)
    tokens = lang.tokenize(texts, model.config.context_length)
    device = model.pixel_mean.device
    return lang.forward_language(tokens["input_ids"].to(device), tokens["attention_mask"].to(device), norm=True)


class XDecoderLoss:
    """loss(model, batch, class_names) -> (total, metrics). `class_names` is the dataset's vocabulary; the
    model's pred_logits are scored against it + "background"."""

    def __init__(self, num_points: int = 12544, *, tasks: tuple[str, ...] = ("mask", "caption", "captioning",
                 "retrieval", "grounding"), num_predictions: int | None = None, deep_supervision: bool = True,
                 top_layers: dict[str, int] | None = None):
        self.num_points = num_points
        self.top_layers = {**TOP_LAYERS, **(top_layers or {})}  # per task: how many last layers get its loss
        self.tasks = tasks
        self.num_predictions = num_predictions
        self.deep_supervision = deep_supervision
        self._criteria: dict[int, SetCriterion] = {}

    def criterion(self, model: XDecoder, num_classes: int) -> SetCriterion:
        if num_classes not in self._criteria:
            c = model.config
            seg = [name for name, task in (("labels", "mask"), ("masks", "mask"), ("captions", "caption"),
                                           ("groundings", "grounding")) if task in self.tasks]
            vlp = [name for name, task in (("captionings", "captioning"), ("retrievals", "retrieval"))
                   if task in self.tasks]
            weights = xdecoder_weight_dict(self.num_predictions or c.dec_layers + 1, tasks=self.tasks,
                                           top_x_layers=self.top_layers, deep_supervision=self.deep_supervision)
            self._criteria[num_classes] = SetCriterion(
                num_classes, HungarianMatcher(num_points=self.num_points), weights, top_x_layers=self.top_layers,
                seg_losses=seg, vlp_losses=vlp, num_points=self.num_points)
        return self._criteria[num_classes].to(model.pixel_mean.device)

    def __call__(self, model: XDecoder, batch: dict, class_names: list[str],
                 generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        device = model.pixel_mean.device
        images = batch["image"].to(device)
        lang = model.predictor.lang_encoder
        names = list(class_names) + ["background"]
        criterion = self.criterion(model, len(class_names))
        losses: dict[str, Tensor] = {}

        if {"mask", "grounding", "caption"} & set(self.tasks):
            text = training_text_embeddings(model, names, generator=generator)
            # official prepare_targets: masks zero-padded (bottom/right) to the padded input, as the predictions are
            padded = model.preprocess(images[:1]).shape[-2:]
            pad = lambda m: F.pad(m.to(device).float(), (0, padded[1] - m.shape[-1], 0, padded[0] - m.shape[-2]))  # noqa: E731
            batch = dict(batch, masks=[pad(m) for m in batch["masks"]])
            targets = [{"labels": lab.to(device), "masks": m} for lab, m in zip(batch["labels"], batch["masks"])]
            grounding_tokens = None
            if "grounding" in self.tasks:
                grounding_tokens = self._grounding(model, batch, targets)
            if "caption" in self.tasks:
                self._noun_captions(model, batch, targets, class_names, generator)
            out = model.forward_seg(images, text, grounding_tokens)
            extra = {"logit_scale": lang.logit_scale, "class_embeddings": text}
            losses.update(criterion(out, targets, extra, generator))

        if {"captioning", "retrieval"} & set(self.tasks):
            tokens = lang.tokenize(batch["caption"], model.config.context_length)
            ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
            out = model.forward_vlp(images, ids, mask)
            targets_vlp = vlp_targets(out["caption_tokens"], out["caption_proj"], ids, mask)
            extra = {"logit_scale": lang.logit_scale, "token_embedding": lang.lang_encoder.token_embedding.weight}
            losses.update(criterion.forward_vlp(out, targets_vlp, extra))

        weighted = weight_losses(losses, criterion.weight_dict)
        total = total_loss(losses, criterion.weight_dict)
        metrics = {}
        for key, value in weighted.items():  # last-layer losses by name, aux layers summed
            name, layer = key.rsplit("_", 1)
            group = name + ("" if layer == "0" else "_aux")
            metrics[group] = metrics.get(group, 0.0) + float(value.detach())
        return total, metrics

    def _grounding(self, model: XDecoder, batch: dict, targets: list[dict]) -> Tensor:
        """Grounding queries (B, G, D) (each image's phrase tokens, zero-padded, as official pad_sequence)
        and, into `targets`, each phrase's mask and end-of-text embedding (unnormalised)."""
        device = model.pixel_mean.device
        lang = model.predictor.lang_encoder
        phrases = [p for ps in batch["phrases"] for p in ps]
        if not phrases:  # no image refers to anything: one zero query each, no grounding loss (keeps DDP in step)
            for t in targets:
                t.update(grounding_masks=None, grounding_class_embs=None, grounding_hash=[], grounding_task="text")
            return torch.zeros(len(targets), 1, model.config.dim_proj, device=device)
        tokens = lang.tokenize(phrases, model.config.context_length)
        token_emb, class_emb = lang.forward_language_token(tokens["input_ids"].to(device),
                                                           tokens["attention_mask"].to(device), norm=False)
        valid = tokens["attention_mask"].bool().to(device)
        queries, start = [], 0
        for t, ps, index, masks in zip(targets, batch["phrases"], batch["phrase_index"], batch["masks"]):
            n = len(ps)
            if n == 0:
                t.update(grounding_masks=None, grounding_class_embs=class_emb[:0], grounding_hash=[],
                         grounding_task="text")
                queries.append(token_emb.new_zeros(0, token_emb.shape[-1]))
                continue
            rows = slice(start, start + n)
            # official: each distinct phrase's tokens once (by hash), padding dropped
            unique = sorted({p: k for k, p in reversed(list(enumerate(ps)))}.values())
            queries.append(torch.cat([token_emb[rows][k][valid[rows][k]] for k in unique]))
            t.update(grounding_masks=masks[list(index)], grounding_class_embs=class_emb[rows],
                     grounding_hash=[_hash(p) for p in ps], grounding_task="text")
            start += n
        return torch.nn.utils.rnn.pad_sequence(queries, batch_first=True)

    def _noun_captions(self, model: XDecoder, batch: dict, targets: list[dict], class_names: list[str],
                       generator: torch.Generator | None) -> None:
        """Per image: its class names (one random template each) and its caption, embedded without templates
        (official prepare_targets with task_switch caption), with concept ids."""
        texts, spans = [], []
        for t, labels, caption in zip(targets, batch["labels"], batch["caption"]):
            nouns = list(dict.fromkeys(class_names[int(k)] for k in labels))
            spans.append((len(texts), len(nouns) + 1))
            texts += [_random_template(n, generator) for n in nouns] + [caption]
            t["captions_hash"] = [_hash(n) for n in nouns] + [_hash(caption)]
            t["labels_hash"] = [_hash(class_names[int(k)]) for k in labels]
        embedded = training_text_embeddings(model, texts, prompt=False)  # one pass for the whole batch
        for t, (start, n) in zip(targets, spans):
            t["captions"] = embedded[start:start + n]

"""Open-vocabulary evaluation on the synthetic shape scenes (`vision.data.shapes`).

- mIoU: per-class intersection and union summed over the whole set (as COCO/ADE semantic mIoU), averaged
  over the classes that occur, separately for the seen classes and for the held-out combinations. The
  model segments with the full vocabulary (all colour-shape names + "ground"), so a held-out object must
  be told apart from the seen classes that share its colour or its shape.
- Chance: oracle segments with a class drawn uniformly from the object vocabulary (ground kept as ground),
  scored the same way. It knows every object's exact mask, so it is a generous chance level for naming.
- Referring IoU: the mask predicted for "the red circle" thresholded at 0.5 against that object's mask,
  averaged over phrases; chance: the mask of a random object of the same scene.
- Caption exact match: the greedy caption equals the scene's caption after whitespace/case normalisation
  (scenes of seen classes; chance is ~0: the caption names up to three classes of 24, in order).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from vision.data.shapes import GROUND, ShapeScenes, all_classes, held_out_classes, seen_classes

__all__ = ["IoUAccumulator", "evaluate_open_vocabulary", "OpenVocabResult"]


class IoUAccumulator:
    def __init__(self, classes: list[str]):
        self.classes = list(classes)
        self.inter = np.zeros(len(classes))
        self.union = np.zeros(len(classes))
        self.present = np.zeros(len(classes), bool)

    def add(self, pred: np.ndarray, truth: np.ndarray) -> None:
        """pred, truth: (H, W) class indices into `classes`."""
        k = len(self.classes)
        both = np.bincount(truth.ravel() * k + pred.ravel(), minlength=k * k).reshape(k, k)
        tp = np.diag(both)
        self.inter += tp
        self.union += both.sum(0) + both.sum(1) - tp
        self.present |= both.sum(1) > 0

    def miou(self, names: list[str]) -> float:
        idx = [self.classes.index(n) for n in names if self.present[self.classes.index(n)]]
        if not idx:
            return float("nan")
        return float(np.mean(self.inter[idx] / np.maximum(self.union[idx], 1)))


def label_map(item: dict, classes: list[str], split_classes: list[str]) -> np.ndarray:
    """The ground-truth (H, W) label map of a dataset item, as indices into `classes`."""
    truth = np.full(item["masks"].shape[-2:], classes.index(GROUND), dtype=np.int64)
    for m, lab in zip(item["masks"].numpy(), item["labels"].tolist()):
        truth[m] = classes.index(split_classes[lab])
    return truth


@dataclass
class OpenVocabResult:
    miou_seen: float
    miou_heldout: float
    miou_chance_seen: float
    miou_chance_heldout: float
    referring_iou: float
    referring_chance: float
    caption_exact: float
    examples: list[tuple[str, str]] = field(default_factory=list)  # (caption, predicted) pairs

    @property
    def miou_chance(self) -> float:
        return self.miou_chance_heldout

    def flat(self) -> dict[str, float]:
        return {"miou_seen": self.miou_seen, "miou_heldout": self.miou_heldout, "miou_chance": self.miou_chance,
                "miou_chance_seen": self.miou_chance_seen, "referring_iou": self.referring_iou,
                "referring_chance": self.referring_chance, "caption_exact": self.caption_exact}


def _batches(ds: ShapeScenes, batch: int):
    for start in range(0, len(ds), batch):
        yield [ds[i] for i in range(start, min(len(ds), start + batch))]


@torch.no_grad()
def evaluate_open_vocabulary(model, *, n_test: int = 200, n_seen: int = 100, size: int = 64, batch: int = 16,
                             seed: int = 0, device: str | torch.device = "cpu") -> OpenVocabResult:
    """Score an X-Decoder on held-out-combination scenes (mIoU, referring) and seen-class scenes (mIoU,
    captions). Deterministic: scenes come from fixed seeds, the chance baselines from `seed`."""
    rng = np.random.default_rng(seed)
    vocab = all_classes() + [GROUND]
    objects = all_classes()
    acc, chance = IoUAccumulator(vocab), IoUAccumulator(vocab)
    ref_iou, ref_chance, captions, examples = [], [], [], []
    model.eval()
    for split, n in (("test", n_test), ("seen-test", n_seen)):
        ds = ShapeScenes(n, split=split, size=size, first_seed=seed)
        for items in _batches(ds, batch):
            images = torch.stack([it["image"] for it in items]).to(device)
            scores = model.semantic(images, vocab)  # (B, K, H, W)
            preds = scores.argmax(1).cpu().numpy()
            for it, pred in zip(items, preds):
                truth = label_map(it, vocab, ds.classes)
                acc.add(pred, truth)
                fake = np.full_like(truth, vocab.index(GROUND))
                for m in it["masks"][: it["objects"]].numpy():
                    fake[m] = vocab.index(objects[rng.integers(len(objects))])
                chance.add(fake, truth)
            if split == "test":
                phrases = [(i, k, p) for i, it in enumerate(items) for k, p in zip(it["phrase_index"], it["phrases"])]
                probs = model.referring(images[[i for i, _, _ in phrases]], [p for _, _, p in phrases])
                for (i, k, _), prob in zip(phrases, probs.cpu()):
                    truth_mask = items[i]["masks"][k].numpy()
                    ref_iou.append(_iou(prob.numpy() > 0.5, truth_mask))
                    other = items[i]["masks"][rng.integers(items[i]["objects"])].numpy()
                    ref_chance.append(_iou(other, truth_mask))
            else:
                for it, text in zip(items, model.caption(images)):
                    captions.append(_norm(text) == _norm(it["caption"]))
                    if len(examples) < 8:
                        examples.append((it["caption"], text))
    return OpenVocabResult(
        miou_seen=acc.miou(seen_classes()), miou_heldout=acc.miou(held_out_classes()),
        miou_chance_seen=chance.miou(seen_classes()), miou_chance_heldout=chance.miou(held_out_classes()),
        referring_iou=float(np.mean(ref_iou)) if ref_iou else float("nan"),
        referring_chance=float(np.mean(ref_chance)) if ref_chance else float("nan"),
        caption_exact=float(np.mean(captions)) if captions else float("nan"), examples=examples)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _norm(text: str) -> str:
    return " ".join(text.lower().replace(",", " ,").split())

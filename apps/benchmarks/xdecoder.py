"""X-Decoder on the shipped `xdecoder-shapes`: the shared decoder's speed and open-vocabulary quality.

- `multitask_speedup`: wall time of the three single-task passes (`semantic`, `referring`, `caption`: each
  runs the backbone and pixel decoder itself, as three single-task models would) over one multi-task pass
  (`XDecoder.multitask`: the backbone and pixel decoder once; semantic and referring outputs from ONE decoder
  pass holding the latent queries and the phrase's grounding queries; the caption over the same features).
  The outputs are checked to be the same (`multitask_max_abs_diff`). `segmentation_speedup`: the same
  without the caption (semantic + referring apart, against the one shared pass), where the greedy caption's
  sequential decoder passes, the same in both, do not dilute the ratio. Median of alternating repetitions
  on the same held-out-combination scenes (64 x 64; --quick: fewer). Without --quick also
  `segmentation_speedup_focalt`: the same on the released architecture (Focal-T, random weights) on one
  384 x 384 image with three class names, where the backbone is a larger share of the work.
- `miou_seen`, `miou_heldout`, `miou_chance` (the held-out classes' chance level: oracle masks, random
  names), `miou_chance_seen`, `referring_iou` (and `referring_chance`), `caption_exact`: the open-vocabulary
  evaluation of segmentation/xdecoder_eval.py (300 held-out-combination scenes + 150 seen-class scenes;
  --quick: 60 + 30), the protocol recorded with the model.
"""
from __future__ import annotations

import statistics
import time

import torch

from apps.benchmarks import benchmark

MODEL = "xdecoder-shapes"


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure_multitask(model, images: torch.Tensor, vocab: list[str], prompts: list[str], repeats: int) -> dict:
    def separate():
        return model.semantic(images, vocab), model.referring(images, prompts), model.caption(images)

    def together():
        return model.multitask(images, vocab, prompts)

    sem, ref, cap = separate()
    both = together()
    diff = max(float((both["semantic"] - sem).abs().max()), float((both["referring"] - ref).abs().max()))
    if both["captions"] != cap:
        raise RuntimeError("multitask captions differ from caption()")
    if diff > 1e-4:
        raise RuntimeError(f"multitask outputs differ from the single-task ones by {diff}")

    def separate_seg():
        return model.semantic(images, vocab), model.referring(images, prompts)

    def together_seg():
        return model.multitask(images, vocab, prompts, caption=False)

    times: dict[str, list[float]] = {name: [] for name in ("sep", "multi", "sep_seg", "multi_seg")}
    for _ in range(repeats):  # alternate, so that drift in the machine's speed hits all alike
        for name, fn in (("sep", separate), ("multi", together), ("sep_seg", separate_seg),
                         ("multi_seg", together_seg)):
            times[name].append(_median_time(fn, 1))
    t = {name: statistics.median(v) for name, v in times.items()}
    return {"multitask_speedup": t["sep"] / t["multi"], "separate_s": t["sep"], "multitask_s": t["multi"],
            "segmentation_speedup": t["sep_seg"] / t["multi_seg"], "multitask_max_abs_diff": diff}


@torch.no_grad()
def focalt_segmentation_speedup(size: int = 384, repeats: int = 3) -> float:
    """The released architecture (Focal-T, random weights: speed does not depend on them) on one image:
    semantic + referring apart over one shared pass, captions left out (50 sequential steps)."""
    from segmentation.xdecoder import XDecoder, XDecoderConfig

    torch.manual_seed(0)
    model = XDecoder(XDecoderConfig()).eval()
    image = torch.rand(1, 3, size, size)
    vocab, prompt = ["dog", "grass", "sky"], ["the dog on the left"]
    seg = lambda: (model.semantic(image, vocab), model.referring(image, prompt))  # noqa: E731
    multi = lambda: model.multitask(image, vocab, prompt, caption=False)  # noqa: E731
    seg(), multi()  # warm-up
    t_seg, t_multi = [], []
    for _ in range(repeats):
        t_seg.append(_median_time(seg, 1))
        t_multi.append(_median_time(multi, 1))
    return statistics.median(t_seg) / statistics.median(t_multi)


@benchmark("xdecoder", "X-Decoder: one multi-task pass vs single-task passes; open-vocabulary mIoU on shapes")
def run(quick: bool) -> dict[str, float]:
    from segmentation.xdecoder_eval import evaluate_open_vocabulary
    from vision.data.shapes import GROUND, ShapeScenes, all_classes
    from vision.hub import from_pretrained

    model = from_pretrained(MODEL).eval()
    n = 8 if quick else 32
    ds = ShapeScenes(n, split="test", first_seed=10_000)
    images = torch.stack([ds[i]["image"] for i in range(n)])
    prompts = [ds[i]["phrases"][0] for i in range(n)]
    figures = measure_multitask(model, images, all_classes() + [GROUND], prompts, 3 if quick else 5)
    if not quick:
        figures["segmentation_speedup_focalt"] = focalt_segmentation_speedup()
    result = evaluate_open_vocabulary(model, n_test=60 if quick else 300, n_seen=30 if quick else 150)
    figures.update(result.flat())
    return {k: round(float(v), 4) for k, v in figures.items()}

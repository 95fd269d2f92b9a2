"""apps.segment on 2-D images with an open-vocabulary segmenter (X-Decoder).

Reached through `python -m apps.segment --model xdecoder-shapes photo.png --classes "red circle,ground"`
(or a released `xdecoder_focalt_last.pt`). Tasks:

  semantic   (default) a class per pixel over --classes (default: the model's own vocabulary)
  panoptic   segments (things counted one by one, stuff merged per class); --stuff names stuff classes
  instance   thing detections scoring >= --threshold (the official instance inference), higher scores on top
  referring  the mask of the object --prompt describes ("the dog on the left")
--caption prints the model's caption of the image (alone, or after any task).

The image is resized to the model's inference size (the released model: shorter side 800, longer at most
1333, as its COCO evaluation; captions from a 224 x 224 resize, as its captioning evaluation) and the masks
come back at the image's own size (bilinear, official sem_seg_postprocess).

Writes -o OVERLAY (the image with a translucent colour per class/segment, default NAME_overlay.png) and
beside it OVERLAY_labels.png: a label map (8- or 16-bit PNG) where 0 is unlabelled and k + 1 is class k of the
printed table (panoptic/instance: segment id; referring: 1 inside the mask). The pair is written as one: both
files go to temporaries first and are then renamed, the label map first and the overlay last, so an interrupted
run leaves the old pair, or (within the moment between the two renames) a new label map beside the old overlay,
never a new overlay beside an old label map.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vision.atomic import atomic_path
from vision.cli import UserError, check_output

TASKS = ("semantic", "panoptic", "instance", "referring")


def _palette(n: int) -> np.ndarray:
    """n distinct colours (golden-angle hues), fixed."""
    import colorsys

    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.85, 0.95)]
                     for k in range(max(n, 1))], dtype=np.uint8)


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # a long list of names is no path (ENAMETOOLONG), nor one with a NUL
        return False


def parse_classes(text: str | None) -> list[str] | None:
    if text is None:
        return None
    is_file = _is_file(text)
    raw = Path(text).read_text().splitlines() if is_file else text.split(",")
    names = [n.strip() for n in raw]
    names = [n for n in names if n] if is_file else names
    if not names or any(not n for n in names):
        raise UserError(f"--classes {text!r}: give class names separated by commas (or a file with one per line), "
                        "none empty")
    if len(set(names)) != len(names):
        raise UserError(f"--classes {text!r}: a class is named twice")
    return names


def read_rgb(path: Path) -> torch.Tensor:
    """(1, 3, H, W) float in [0, 1]; volumes and unreadable files are refused in one line."""
    from vision.data.images import ImageReadError, read_image

    lower = path.name.lower()
    if path.is_dir() or lower.endswith((".nii", ".nii.gz", ".dcm", ".mha", ".nrrd")):
        raise UserError(f"{path}: a 3-D volume (or a DICOM series), but this X-Decoder segments 2-D images; "
                        "give a .png/.jpg image")
    try:
        image = read_image(path)
    except (ImageReadError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable image ({e})") from None
    return ((image + 1) / 2).clamp(0, 1)[None]


def working_size(h: int, w: int, short: int | None, longest: int | None) -> tuple[int, int]:
    """detectron2's ResizeShortestEdge: shorter side `short`, longer side at most `longest`."""
    if short is None:
        return h, w
    scale = short / min(h, w)
    if longest is not None and max(h, w) * scale > longest:
        scale = longest / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resized(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return torch.nn.functional.interpolate(image, size=size, mode="bilinear", align_corners=False,
                                           antialias=True).clamp(0, 1)


def outputs_for(args, src: Path) -> tuple[Path | None, Path | None]:
    if args.task == "none":
        return None, None
    overlay = Path(args.output) if args.output else src.with_name(f"{src.stem}_overlay.png")
    if overlay.suffix.lower() != ".png":
        raise UserError(f"-o {overlay}: the overlay is written as PNG; use a .png name")
    if overlay.exists() and overlay.resolve() == src.resolve():
        raise UserError(f"-o {overlay} is the input image; give another output name")
    labels = overlay.with_name(overlay.stem + "_labels.png")
    for p in (overlay, labels):
        check_output(p, args.overwrite)
    return overlay, labels


def _write_pair(overlay: np.ndarray, overlay_path: Path, labels: np.ndarray, labels_path: Path,
                overwrite: bool) -> None:
    """Both PNGs to temporaries, then renamed: the label map, then the overlay (the module's docstring)."""
    with atomic_path(overlay_path) as overlay_tmp, atomic_path(labels_path) as labels_tmp:  # the inner renames first
        Image.fromarray(labels).save(labels_tmp, format="PNG")
        Image.fromarray(overlay).save(overlay_tmp, format="PNG")
        for path in (overlay_path, labels_path):
            check_output(path, overwrite)  # one may have appeared while we worked


def _label_png(labels: np.ndarray) -> np.ndarray:
    return labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16)


def blend(image: np.ndarray, labels: np.ndarray, colours: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """image (H, W, 3) uint8; labels (H, W) with 0 = none, k = colours[k - 1]."""
    out = image.astype(np.float32)
    inside = labels > 0
    out[inside] = (1 - alpha) * out[inside] + alpha * colours[labels[inside] - 1]
    return out.round().astype(np.uint8)


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])


def main(args, model, device: torch.device) -> int:
    src = Path(args.input)
    if not src.exists():
        raise UserError(f"{src}: no such file or folder")
    if args.task == "referring" and not args.prompt:
        raise UserError("--task referring needs --prompt \"the thing to find\"")
    if args.prompt and args.task != "referring":
        raise UserError("--prompt is for --task referring")
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("--prompt is empty")
    if args.task == "none" and not args.caption:
        raise UserError("--task none writes nothing: add --caption (or choose a task)")
    if args.stuff and args.task not in ("panoptic", "instance"):
        raise UserError("--stuff is for --task panoptic or instance")
    if not 0 <= args.threshold <= 1:
        raise UserError(f"--threshold must be in [0, 1], got {args.threshold}")
    volume_only = [f"--{k.replace('_', '-')}" for k in ("folds", "checkpoint", "preset", "overlap", "labels")
                   if getattr(args, k) is not None] + [f"--{k.replace('_', '-')}" for k in ("tta", "no_postprocess")
                                                      if getattr(args, k)]
    if volume_only:
        raise UserError(f"{', '.join(volume_only)}: options for volume segmenters; {args.model} segments images "
                        "(its class names: --classes)")
    names = parse_classes(args.classes)
    stuff = parse_classes(args.stuff) or []
    if args.task in ("semantic", "panoptic", "instance"):
        names = names or list(model.config.class_names)
        if not names:
            raise UserError(f"{args.model} has no vocabulary of its own: give --classes \"name,name,...\"")
        unknown = [s for s in stuff if s not in names]
        if unknown:
            raise UserError(f"--stuff names {', '.join(unknown)}, not in the classes ({', '.join(names)})")
    if args.caption and not model.config.captioning:
        raise UserError(f"{args.model} was built without captioning; leave --caption out")
    overlay_path, labels_path = outputs_for(args, src)
    original = read_rgb(src).to(device)
    rgb = (original[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    full = tuple(original.shape[-2:])
    c = model.config  # the model's inference size (the released one: shorter side 800); outputs come back full size
    image = resized(original, working_size(*full, c.test_min_size, c.test_max_size))

    if args.task in ("semantic", "panoptic", "instance"):
        if args.stuff is None and names == list(model.config.class_names) and model.config.is_thing:
            is_thing = list(model.config.is_thing)
        else:
            is_thing = [n not in stuff for n in names]
        if args.task == "semantic":
            scores = model.semantic(image, names, output_size=full)[0]
            labels = scores.argmax(0).cpu().numpy() + 1
            colours = _palette(len(names))
            counts = np.bincount(labels.ravel() - 1, minlength=len(names))
            rows = [("id", "class", "pixels %")] + [(str(k + 1), n, f"{100 * counts[k] / labels.size:.1f}")
                                                   for k, n in enumerate(names) if counts[k]]
        elif args.task == "panoptic":
            segments, infos = model.panoptic(image, names, is_thing=is_thing, output_size=full)
            labels, info = segments[0].cpu().numpy().astype(np.int64), infos[0]
            remap = np.zeros(labels.max(initial=0) + 1, dtype=np.int64)
            for k, d in enumerate(info):
                remap[d["id"]] = k + 1
            labels = remap[labels]
            colours = _palette(len(names))[[d["category_id"] for d in info]] if info else _palette(1)
            rows = [("id", "class", "thing", "pixels %")] + [
                (str(k + 1), names[d["category_id"]], "yes" if d["isthing"] else "no",
                 f"{100 * (labels == k + 1).mean():.1f}") for k, d in enumerate(info)]
        else:  # instance: thing detections scoring >= --threshold, the higher-scoring drawn on top
            found = model.instance(image, names, is_thing=is_thing, output_size=full)[0]
            order = [int(i) for i in found["scores"].argsort() if found["scores"][i] >= args.threshold]
            labels = np.zeros(rgb.shape[:2], dtype=np.int64)
            for k, i in enumerate(order):
                labels[found["masks"][i].cpu().numpy()] = k + 1
            colours = _palette(len(names))[[int(found["labels"][i]) for i in order]] if order else _palette(1)
            rows = [("id", "class", "score", "pixels %")] + [
                (str(k + 1), names[int(found["labels"][i])], f"{float(found['scores'][i]):.2f}",
                 f"{100 * (labels == k + 1).mean():.1f}") for k, i in enumerate(order)]
    elif args.task == "referring":
        prob = model.referring(image, [args.prompt], output_size=full)[0].cpu().numpy()
        labels = (prob > 0.5).astype(np.int64)
        colours = _palette(1)
        rows = [("id", "prompt", "pixels %"), ("1", args.prompt, f"{100 * labels.mean():.1f}")]
    if overlay_path is not None:
        _write_pair(blend(rgb, labels, colours), overlay_path, _label_png(labels), labels_path, args.overwrite)
        print(f"{overlay_path}  (label map: {labels_path})")
        print(table(rows))
    if args.caption:
        size = (c.caption_size, c.caption_size) if c.caption_size else full  # official VLP: a 224 x 224 resize
        print(f"caption: {model.caption(resized(original, size))[0]}")
    return 0

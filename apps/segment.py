"""python -m apps.segment — segment a CT/MRI volume (NIfTI or a DICOM series) into a NIfTI label map, or an image with an open vocabulary (X-Decoder).

    python -m apps.segment scan.nii.gz                                  # writes scan_seg.nii.gz (neunet-phantom)
    python -m apps.segment --model hbformer-phantom scan.nii.gz -o seg.nii.gz --tta
    python -m apps.segment --model runs/neunet/model dicom_series/ -o seg.nii.gz
    python -m apps.segment --model my-model imagesTs/ -o predictions/   # every .nii/.nii.gz in a folder
    python -m apps.segment scan.nii.gz --labels background,liver,spleen,kidney,pancreas,lesion
    python -m apps.segment --model results/neUNetTrainer__nnUNetPlans__3d_fullres --folds 0,1 scan.nii.gz
    python -m apps.segment --model fold_0/checkpoint_final.pth scan.nii.gz
    python -m apps.segment --model best_dice.pth --preset synapse scan.nii.gz   # HBFormer's Synapse weights
    python -m apps.segment --model xdecoder-shapes scene.png --classes "red circle,blue cross,ground" -o overlay.png
    python -m apps.segment --model xdecoder_focalt_last.pt photo.jpg --classes "dog,grass,sky" -o overlay.png
    python -m apps.segment --model xdecoder_focalt_last.pt photo.jpg --task referring --prompt "the dog on the left"
    python -m apps.segment --model xdecoder_focalt_last.pt photo.jpg --task panoptic --caption

The model is a shipped name (weights/index.json), a folder written by apps.train_segmenter, an
nnU-Net v2 result folder or checkpoint_final.pth of neU-Net (run as nnU-Net's own predictor runs
it, segmentation/nnunet.py), or a released network file with --preset naming how scans were prepared
for it (segmentation/presets.py). Tessera's own models carry their preparation (orientation,
spacing, CT/MRI intensity normalisation, window, class names), see segmentation/pipeline.py. Inference is a Gaussian-blended sliding window
(optionally with mirroring TTA), reduced to labels slab by slab so memory stays bounded. The
label map has exactly the input's voxel grid and affine (for DICOM: the series' RAS affine).
A table of voxel counts and volumes (ml) per class is printed.

An X-Decoder (a shipped one such as xdecoder-shapes, a folder written by apps.train_segmenter --model
xdecoder, or the released xdecoder_focalt_last.pt) segments 2-D images instead, with any class names
(--classes), as --task semantic|panoptic|instance|referring, and --caption prints a caption; it writes a
colour overlay and a label map (see apps/segment_image.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from vision.cli import ArgumentParser, UserError, add_common_args, check_output, resolve_device, run
from vision.errors import require_writable

DEFAULT_MODEL = "neunet-phantom"
TASKS = ("semantic", "panoptic", "instance", "referring")
IMAGE_ONLY = ("classes", "prompt", "stuff", "caption")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def parse(argv):
    p = ArgumentParser(prog="python -m apps.segment", description=__doc__.split("\n\n")[0].split(" — ")[1])
    p.add_argument("input", help="a .nii/.nii.gz volume, a folder holding one DICOM series, or a folder of "
                   ".nii/.nii.gz volumes")
    p.add_argument("-o", "--output", help="output .nii.gz (a folder when the input is a folder of NIfTI files, "
                   "not the input folder itself); default: NAME_seg.nii.gz beside the input (for a folder: FOLDER_seg/)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="shipped segmenter name, a saved segmenter folder, an nnU-Net result folder (plans.json, "
                   "dataset.json, fold_N/checkpoint_final.pth) or checkpoint_final.pth of neU-Net, or a released "
                   "network file (e.g. HBFormer's Synapse .pth) together with --preset")
    p.add_argument("--folds", help="nnU-Net result folder: the folds to average, e.g. 0,1,2 or 'all' for fold_all "
                   "(default: every fold_N that has the checkpoint)%(default).0s")
    p.add_argument("--checkpoint", help="nnU-Net result folder: the checkpoint file in each fold "
                   "(default: checkpoint_final.pth)%(default).0s")
    p.add_argument("--preset", choices=sorted(_preset_names()),
                   help="how scans are prepared for a released network file that does not say: "
                   + "; ".join(f"{k}: {v}" for k, v in sorted(_preset_names().items())) + "%(default).0s")
    p.add_argument("--overlap", type=float, default=None,
                   help="sliding-window overlap in [0, 1) (default: the model's, 0.5 for the shipped ones)")
    p.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (2^d passes per window)")
    p.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    p.add_argument("--no-postprocess", action="store_true",
                   help="skip the model's largest-connected-component post-processing")
    p.add_argument("--labels", help="class names, background first: comma-separated, or a file with one name "
                   "per line or an nnU-Net dataset.json (default: the model's names)")
    g = p.add_argument_group("2-D images with an open-vocabulary model (X-Decoder)")
    g.add_argument("--classes", help="class names, comma-separated (or a file with one per line); default: the "
                   "model's vocabulary (the released COCO model: COCO panoptic's 133)")
    g.add_argument("--task", choices=TASKS + ("none",), default="semantic",
                   help="semantic: a class per pixel; panoptic: segments, things one by one; instance: scored "
                   "thing masks; referring: the mask of --prompt; none: only --caption")
    g.add_argument("--prompt", help="--task referring: a phrase naming one object, e.g. \"the dog on the left\"")
    g.add_argument("--stuff", help="panoptic/instance: which --classes are stuff (uncountable), comma-separated; "
                   "default: every class is a thing (the model's own vocabulary says for itself)")
    g.add_argument("--threshold", type=float, default=0.5, help="--task instance: the least score drawn")
    g.add_argument("--caption", action="store_true", help="print a caption of the image")
    add_common_args(p, seed=False)
    return p.parse_args(argv)


def _preset_names() -> dict[str, str]:
    from segmentation.presets import PRESETS

    return {name: p["what"] for name, p in PRESETS.items()}


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _looks_like_file(path: Path) -> bool:
    from vision.data.images import IMAGE_EXTENSIONS

    return _is_nifti(path) or path.suffix.lower() in IMAGE_EXTENSIONS


def plan(args) -> list[tuple[Path, Path]]:
    """(input, output) pairs, every output checked before any work."""
    from segmentation.dataset import case_name

    src = Path(args.input)
    if not src.exists():
        raise UserError(f"{src}: no such file or folder")
    niftis = sorted(p for p in src.iterdir() if p.is_file() and _is_nifti(p) and not p.name.startswith(".")) \
        if src.is_dir() else []
    if niftis:  # a folder of volumes
        out_dir = Path(args.output) if args.output else src.with_name(src.name + "_seg")
        if out_dir.exists() and not out_dir.is_dir():
            raise UserError(f"{out_dir} is a file; with a folder of volumes, -o must be a folder")
        if _looks_like_file(out_dir) and not out_dir.is_dir():
            raise UserError(f"-o {out_dir} looks like a file name, but {src} is a folder of {len(niftis)} volume(s): "
                            "give an output folder (each label map is written there as NAME.nii.gz)")
        if not out_dir.parent.is_dir():
            raise UserError(f"output folder {out_dir.parent} does not exist")
        writes_in = out_dir if out_dir.is_dir() else out_dir.parent  # created there when missing
        require_writable(writes_in, str(out_dir))
        if out_dir.resolve() == src.resolve():
            raise UserError(f"-o {out_dir} is the input folder: the label maps would be read as volumes by the next "
                            "run; give another output folder")
        pairs = [(f, out_dir / f"{case_name(f)}.nii.gz") for f in niftis]
        if len({d for _, d in pairs}) != len(pairs):
            raise UserError(f"{src}: two volumes map to the same case name")
    else:
        default = src.with_name(f"{_stem(src) if src.is_file() else src.name}_seg.nii.gz")
        dst = Path(args.output) if args.output else default
        if dst.is_dir():
            raise UserError(f"{dst} is a folder; give an output file name ending in .nii.gz")
        if dst.exists() and dst.resolve() == src.resolve():
            raise UserError(f"-o {dst} is the input volume; give another output file name")
        pairs = [(src, dst)]
    for _, dst in pairs:
        if not _is_nifti(dst):
            raise UserError(f"{dst}: the label map is written as NIfTI; use a .nii.gz (or .nii) name")
        if dst.exists() and not args.overwrite:
            raise UserError(f"{dst} exists; pass --overwrite to replace it")
    if not niftis:
        check_output(pairs[0][1], args.overwrite)  # its folder must exist
    return pairs


def class_names(args, model) -> list[str]:
    names = list(model.config.class_names)
    if not args.labels:
        return names
    spec = Path(args.labels)
    try:
        is_file = spec.is_file()
    except (OSError, ValueError):  # a long list of names is no path
        is_file = False
    if is_file:
        text = spec.read_text()
        if spec.suffix.lower() == ".json":
            from segmentation.dataset import read_dataset_json

            try:
                data = read_dataset_json(spec.parent) if spec.name == "dataset.json" else {"class_names": json.loads(text)}
            except (ValueError, json.JSONDecodeError) as e:
                raise UserError(f"--labels {spec}: {e}") from None
            given = (data or {}).get("class_names")
            if not isinstance(given, list):
                raise UserError(f"--labels {spec}: expected a dataset.json with \"labels\" or a JSON list of names")
        else:
            given = [ln.strip() for ln in text.splitlines() if ln.strip()]
    else:
        given = [n.strip() for n in args.labels.split(",")]
    if any(not n for n in given):
        raise UserError(f"--labels: empty class name in {args.labels!r}")
    if len(given) != len(names):
        raise UserError(f"--labels names {len(given)} classes, the model predicts {len(names)} "
                        f"({', '.join(names)}); give one name per class, background first")
    return [str(n) for n in given]


def _folds(text: str) -> list[str]:
    folds = [f.strip() for f in text.split(",")]
    if not folds or any(not (f.isdigit() or f == "all") for f in folds) or len(set(folds)) != len(folds):
        raise UserError(f"--folds {text!r}: give fold numbers separated by commas (e.g. 0,1,2) or 'all'")
    return folds


def load_segmenter(args, device: torch.device, model=None):
    """--model through vision.hub.resolve_model (unless already resolved); a bare network needs --preset (and a
    prepared model refuses one)."""
    from segmentation.nnunet import NnUNetSegmenter
    from segmentation.pipeline import Segmenter
    from segmentation.presets import apply_preset
    from vision.hub import resolve_model

    spec = args.model
    options = {}
    if args.folds is not None:
        options["folds"] = _folds(args.folds)
    if args.checkpoint is not None:
        options["checkpoint"] = args.checkpoint
    if model is None:
        model = resolve_model(spec, kind="segmenter", **options)
    prepared = isinstance(model, (Segmenter, NnUNetSegmenter))
    if args.preset and prepared:
        raise UserError(f"--preset {args.preset}: {spec} already says how scans are prepared for it; leave --preset out")
    if args.preset:
        try:
            model = apply_preset(model, args.preset)
        except ValueError as e:
            raise UserError(f"--preset {args.preset}: {e}") from None
    elif not prepared:
        presets = ", ".join(f"{k} ({v})" for k, v in sorted(_preset_names().items()))
        raise UserError(f"{spec} is a bare {type(model).__name__} checkpoint: it does not say how scans are prepared "
                        f"for it; pass --preset NAME, one of: {presets}")
    if model.in_channels != 1:
        raise UserError(f"{spec} expects {model.in_channels} input channels, but a volume has 1 "
                        "(multi-channel models need one co-registered volume per channel)")
    return model.to(device).eval()


def read_input(path: Path):
    from segmentation.io import read_volume

    try:
        return read_volume(path)
    except ValueError as e:
        raise UserError(str(e)) from None


def volume_table(labels: np.ndarray, affine: np.ndarray, names: list[str]) -> str:
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=len(names))
    rows = [("id", "class", "voxels", "volume (ml)")]
    for i, name in enumerate(names):
        rows.append((str(i), name, str(int(counts[i])), f"{counts[i] * voxel_ml:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if j == 1 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])


def _xdecoder_or_none(args):
    """The model when --model is an X-Decoder (loaded once), else None; image-only options on a volume model
    are refused."""
    from segmentation.xdecoder import XDecoder
    from vision.hub import read_index, resolve_model

    spec = args.model
    folder_config = Path(spec) / "config.json"
    if spec in read_index():
        is_x = read_index()[spec].get("architecture") == "xdecoder"
    elif folder_config.is_file():
        is_x = '"xdecoder"' in folder_config.read_text()
    elif Path(spec).is_file() and args.folds is None and args.checkpoint is None:
        is_x = None  # a released file: only loading it tells (it is loaded once, and reused below)
    else:
        is_x = False
    model = None
    if is_x is not False:
        model = resolve_model(spec, kind="segmenter")
        is_x = isinstance(model, XDecoder)
    given = [f"--{k}" for k in IMAGE_ONLY if getattr(args, k)] + (["--task"] if args.task != "semantic" else [])
    if not is_x and given:
        raise UserError(f"{', '.join(given)}: only for an open-vocabulary image model (X-Decoder); {spec} segments volumes")
    return model, is_x


def main(argv=None) -> int:
    from segmentation.io import write_labels

    args = parse(argv)
    loaded, is_xdecoder = _xdecoder_or_none(args)
    if is_xdecoder:
        from apps import segment_image

        device = resolve_device(args.device)
        return segment_image.main(args, loaded.to(device).eval(), device)
    if args.overlap is not None and not 0 <= args.overlap < 1:
        raise UserError(f"--overlap must be in [0, 1), got {args.overlap}")
    if args.batch < 1:
        raise UserError(f"--batch must be >= 1, got {args.batch}")
    pairs = plan(args)
    # every input readable before the model is loaded or the first output written
    first = read_input(pairs[0][0])
    for src, _ in pairs[1:]:
        read_input(src)
    device = resolve_device(args.device)
    model = load_segmenter(args, device, loaded)
    names = class_names(args, model)
    pairs[0][1].parent.mkdir(exist_ok=True)
    for i, (src, dst) in enumerate(pairs):
        vol = first if i == 0 else read_input(src)
        labels = model.segment(vol.array, vol.affine, overlap=args.overlap, tta=args.tta, batch=args.batch,
                               device=device, progress=not args.quiet, postprocess=not args.no_postprocess)
        check_output(dst, args.overwrite)  # it may have appeared while we worked
        write_labels(dst, labels, vol)
        print(f"{dst}  ({'x'.join(map(str, vol.shape))}, {len(names)} classes)")
        print(volume_table(labels, vol.affine, names))
    return 0


if __name__ == "__main__":
    run(main)

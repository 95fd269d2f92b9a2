"""python -m apps.train_segmenter --model xdecoder — train an X-Decoder (open-vocabulary segmentation, referring, captions).

    python -m apps.train_segmenter --model xdecoder --data shapes --out runs/xdecoder --steps 5000   # as xdecoder-shapes
    python -m apps.train_segmenter --model xdecoder --make-shapes data/scenes 500     # a scene folder (a template)
    python -m apps.train_segmenter --model xdecoder --data my_scenes/ --init xdecoder_focalt_last.pt --size 512 --out runs/ft
    torchrun --nproc_per_node 4 -m apps.train_segmenter --model xdecoder --data shapes --out runs/ddp

Data: `shapes` (the seeded coloured-shape scenes of vision.data.shapes, generated on the fly: only the
seen colour-shape classes, the held-out ones never appear), or a folder in the scene-folder layout of
vision.data.scene_folder (images/NAME.png, panoptic/NAME.png segment ids, NAME.json naming each
segment's class, the caption and referring phrases); `--make-shapes DIR N` writes shape scenes in
that layout, as a template for your own data.

One step runs the two official training passes on the batch (segmentation with grounding; captioning
with image-text contrast), losses and weights as microsoft/X-Decoder's focalt_unicl_lang config (see
segmentation/xdecoder_train.py). The official optimiser: AdamW, lr 1e-4 (5e-4 from scratch), weight decay 0.05
except norms and embedding tables, backbone and language encoder at 0.1 x lr (with --init; 1 x from scratch),
linear warm-up, x0.1 at 88.9 % and 96.3 % of the steps, gradient norm clipped at 5. Everything the toolkit gives
(resume bit for bit, DDP via torchrun, EMA, AMP, metrics). OUT/model runs with
`python -m apps.segment --model OUT/model image.png --classes ...`. With --ship (shapes only), the
open-vocabulary figures (vision's segmentation/xdecoder_eval.py) are measured and recorded.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import torch

from vision import argtypes
from vision.cli import ArgumentParser, UserError, add_common_args, resolve_device, seed_everything
from vision.train import Phase, Trainer, add_train_args, train_config_from_args
from vision.train.trainer import add_ship_args

PRESETS = {
    # a small model for 64x64 shape scenes: ~2.4 M parameters besides the 49408-entry token table
    "shapes": dict(embed_dim=32, depths=(1, 1, 2, 1), focal_levels=(2, 2, 2, 2), focal_windows=(3, 3, 3, 3),
                   drop_path_rate=0.1, conv_dim=64, mask_dim=64, enc_layers=1, hidden_dim=64, num_queries=17,
                   nheads=4, dim_feedforward=256, dec_layers=6, dim_proj=64, context_length=16, lang_width=64,
                   lang_layers=2, lang_heads=4, backbone_dim=256, captioning_step=16),
    "focalt": {},  # the official Focal-T configuration (XDecoderConfig's defaults)
}


def parse(argv):
    p = ArgumentParser(prog="python -m apps.train_segmenter --model xdecoder",
                       description=__doc__.split("\n\n")[0].split(" — ")[1])
    p.add_argument("--model", choices=["xdecoder"], default="xdecoder", help="architecture")
    g = p.add_argument_group("scene data (writes a scene folder and exits)")
    g.add_argument("--make-shapes", nargs=2, metavar=("DIR", "N"), help="write N seeded shape scenes into DIR")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="shapes", help="'shapes' (synthetic, generated on the fly) or a scene folder")
    g.add_argument("--scenes", type=argtypes.positive_int, default=20000, help="shapes: training scenes")
    g.add_argument("--size", type=argtypes.positive_int, default=64, help="image side in pixels (scene folders "
                   "are resized to it, shorter side then centre crop)")
    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=sorted(PRESETS), default="shapes", help="model size (focalt: the official)")
    g.add_argument("--init", help="start from these weights: a released xdecoder_focalt_last.pt, a shipped name or "
                   "a model folder (its architecture wins over --preset)")
    g.add_argument("--points", type=argtypes.positive_int, default=512,
                   help="points per mask for matching and mask losses (official 12544 for 1/4 of ~1024^2 inputs)")
    g.add_argument("--caption-layers", type=argtypes.positive_int, default=1,
                   help="decoder layers (from the last) that get the captioning loss (official 3; its 49408-way "
                   "softmax dominates a small model's step on a CPU)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=argtypes.positive_float, default=None, help="AdamW learning rate (default: 1e-4 "
                   "with --init, as official; 5e-4 from scratch)")
    g.add_argument("--weight-decay", type=argtypes.non_negative_float, default=0.05, help="AdamW weight decay")
    g.add_argument("--lr-multiplier", type=argtypes.positive_float, default=None,
                   help="learning-rate factor of the backbone and the language encoder (official 0.1, for their "
                   "pre-trained weights; default: 0.1 with --init, 1 from scratch)")
    g.add_argument("--warmup", type=argtypes.positive_int, default=None,
                   help="linear warm-up steps (default: 10 with --init, as official; 200 from scratch)")
    g.add_argument("--clip", type=argtypes.positive_float, default=None, help="gradient-norm clipping "
                   "(default 5, official)")
    add_ship_args(p, "after training on shapes, measure the open-vocabulary figures and "
                  "write weights/NAME.safetensors + its index.json entry", g)
    g.add_argument("--eval-scenes", type=argtypes.positive_int, default=300,
                   help="--ship: held-out-combination test scenes (and half as many seen-class scenes)")
    add_train_args(p, batch_size=16, max_steps=4000)
    add_common_args(p)
    for action in p._actions:  # --make-shapes needs no run folder; training checks for it in main
        if action.dest == "out":
            action.required = False
    return p.parse_args(argv)


def build_model(args, device):
    from segmentation.xdecoder import XDecoder, XDecoderConfig
    from vision.hub import HubError, resolve_model

    if args.init:
        try:
            model = resolve_model(args.init, kind="segmenter")
        except HubError as e:
            raise UserError(f"--init {args.init}: {e}") from None
        if not isinstance(model, XDecoder):
            raise UserError(f"--init {args.init} is a {type(model).__name__}, not an X-Decoder")
        return model.to(device).train()
    return XDecoder(XDecoderConfig(**PRESETS[args.preset])).to(device).train()


def make_shapes(args) -> int:
    from vision.data.scene_folder import write_shape_scenes

    folder, n = args.make_shapes
    try:
        count = int(n)
    except ValueError:
        raise UserError(f"--make-shapes DIR N: N must be an integer, got {n!r}") from None
    if count < 1:
        raise UserError("--make-shapes DIR N: N must be >= 1")
    write_shape_scenes(folder, count, size=args.size, first_seed=args.seed, overwrite=args.overwrite)
    print(f"{count} shape scenes written to {folder}")
    return 0


def dataset(args):
    from vision.data.shapes import ShapeScenes

    if args.data == "shapes":
        try:
            data = ShapeScenes(args.scenes, split="train", size=args.size)
        except ValueError as e:
            raise UserError(f"--data shapes: {e}") from None
        return data, f"{args.scenes} seeded shape scenes ({args.size}x{args.size}, seen classes only; vision.data.shapes)"
    from vision.data.scene_folder import SceneFolder

    try:
        data = SceneFolder(args.data, size=args.size)
    except ValueError as e:
        raise UserError(f"--data {args.data}: {e}") from None
    return data, f"scene folder {args.data} ({len(data)} scenes, {len(data.classes)} classes)"


NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm,
         torch.nn.GroupNorm, torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d,
         torch.nn.LayerNorm, torch.nn.LocalResponseNorm)


def parameter_groups(model, lr: float, weight_decay: float, multiplier: float) -> list[dict]:
    """The official optimiser's groups (trainer/xdecoder_trainer.py): no weight decay on norm layers and
    nn.Embedding tables (WEIGHT_DECAY_NORM/EMBED 0), the rest decayed (biases included: the official
    bias rule tests the module's name, which never holds "bias"); parameters whose name contains
    `backbone` or `lang_encoder` (LR_MULTIPLIER; `backbone_proj` too, by the same substring rule) at
    `multiplier` x lr."""
    groups, seen = [], set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{module_name}.{name}"
            decay = 0.0 if isinstance(module, NORMS + (torch.nn.Embedding,)) else weight_decay
            scale = multiplier if ("backbone" in full or "lang_encoder" in full) else 1.0
            groups.append({"params": [p], "lr": lr * scale, "weight_decay": decay})
    return groups


class Objective(torch.nn.Module):
    """X-Decoder's training loss as a module's forward (DDP synchronises only what runs through forward)."""

    def __init__(self, model, loss, class_names: list[str], seed: int):
        super().__init__()
        self.model, self.loss, self.class_names, self.seed = model, loss, class_names, seed

    def forward(self, batch, step: int):
        # template choice and point sampling drawn from (seed, step, rank): a resumed run repeats them
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        g = torch.Generator(device=self.model.pixel_mean.device).manual_seed(
            (self.seed * 1_000_003 + step) * 4099 + rank)
        return self.loss(self.model, batch, self.class_names, g)


def main(argv=None) -> int:
    from segmentation.xdecoder_train import XDecoderLoss
    from vision.data.shapes import collate_scenes
    from vision.hub import register_shipped, save_pretrained, shipped_provenance

    args = parse(argv)
    if args.make_shapes:
        return make_shapes(args)
    if not args.out:
        raise UserError("--out is needed to train (or --make-shapes DIR N to write scenes)")
    command = "python -m apps.train_segmenter " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.ship and args.data != "shapes":
        raise UserError("--ship records the shapes benchmark's figures: train with --data shapes")
    device = resolve_device(args.device)
    seed_everything(args.seed)
    data, description = dataset(args)
    model = build_model(args, device)
    classes = list(data.classes)
    model.config.class_names = tuple(classes)
    model.config.is_thing = tuple(getattr(data, "is_thing", [c != "ground" for c in classes]))
    try:
        trainer = Trainer(train_config_from_args(args, str(device), command), data, collate_fn=collate_scenes)
    except ValueError as e:
        raise UserError(str(e)) from None
    lr = args.lr or (1e-4 if args.init else 5e-4)
    multiplier = args.lr_multiplier if args.lr_multiplier is not None else (0.1 if args.init else 1.0)
    opt = torch.optim.AdamW(parameter_groups(model, lr, args.weight_decay, multiplier), lr=lr)
    warmup = args.warmup if args.warmup is not None else (10 if args.init else 200)
    milestones = [round(f * args.steps) for f in (0.88889, 0.96296)]  # official WarmupMultiStepLR, gamma 0.1

    def schedule(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.1 ** sum(step >= m for m in milestones)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    clip = args.clip if args.clip is not None else 5.0
    loss = XDecoderLoss(args.points, top_layers={"captioning": args.caption_layers})
    models = trainer.prepare({"xdecoder": Objective(model, loss, classes, args.seed)}, {"adamw": opt},
                             {"adamw": sched}, ema_of="xdecoder")
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{description}; {len(classes)} classes; X-Decoder ({args.preset if not args.init else args.init}) "
          f"{n_params:.2f} M parameters", file=sys.stderr)
    trainer.fit([Phase("xdecoder", "adamw", lambda batch, step: models["xdecoder"](batch, step),
                       models=("xdecoder",), clip_grad_norm=clip)])
    elapsed = trainer.train_seconds
    if not trainer.dist.is_main:
        return 0
    final = trainer.final_model("xdecoder").model.eval()
    save_pretrained(final, Path(args.out) / "model")
    print(f"model saved to {Path(args.out) / 'model'} ({elapsed / 60:.1f} min)")
    if args.ship:
        from segmentation.xdecoder_eval import evaluate_open_vocabulary

        result = evaluate_open_vocabulary(final, n_test=args.eval_scenes, n_seen=args.eval_scenes // 2,
                                          size=args.size, device=device)
        metrics = {k: round(v, 4) for k, v in result.flat().items()}
        for k, v in metrics.items():
            print(f"{k}: {v}")
        command, train_time = shipped_provenance(trainer, command, args.init)
        entry = register_shipped(
            args.ship, final.cpu(), replace=args.replace_shipped, kind="segmenter", trained_with=command,
            data=description, train_time=train_time, metrics=metrics,
            metrics_protocol=f"segmentation/xdecoder_eval.py: {args.eval_scenes} held-out-combination scenes and "
            f"{args.eval_scenes // 2} seen-class scenes ({args.size}x{args.size}, seeds disjoint from training), "
            "vocabulary = all 24 colour-shape names + ground; mIoU over seen / held-out classes; chance = oracle "
            "masks with uniformly random class names; referring IoU at p > 0.5 (chance: a random object of the "
            "scene); caption exact match on seen-class scenes (greedy)")
        print(f"shipped as {args.ship}: weights/{entry['file']}")
    return 0

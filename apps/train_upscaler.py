"""python -m apps.train_upscaler — train a LIIF upscaler with the official recipe.

    python -m apps.train_upscaler --out runs/liif                        # the sample photos wheels carry
    python -m apps.train_upscaler --data /data/DIV2K_train_HR --preset official --steps 1000000 --out runs/div2k
    torchrun --nproc_per_node 4 -m apps.train_upscaler --data DIR --out runs/ddp
    python -m apps.train_upscaler --out runs/liif --resume                 # continue exactly

Recipe (yinboc/liif train_edsr-baseline-liif.yaml): 48x48 LR crops, scale ~ U(1, 4), HR crop
round(48 s), LR by bicubic, 2304 query pixels per patch, flips/transpose, L1 loss, Adam 1e-4,
learning rate halved at 20/40/60/80 % of the steps (the official 200/400/600/800 of 1000
epochs). Validation PSNR against bicubic on held-out photos is logged at each checkpoint.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import torch

from vision import argtypes
from vision.cli import ArgumentParser, UserError, add_common_args, resolve_device, run, seed_everything
from vision.train import Phase, Trainer, add_train_args, train_config_from_args
from vision.train.trainer import add_ship_args

PRESETS = {  # encoder args, MLP hidden widths
    "official": ({"n_resblocks": 16, "n_feats": 64}, [256, 256, 256, 256]),
    # the shipped default: ~20x less work per output pixel than official, for CPU users
    "lite": ({"n_resblocks": 8, "n_feats": 32}, [64, 64, 64]),
    "tiny": ({"n_resblocks": 2, "n_feats": 16}, [32, 32]),  # smoke tests
}
VAL_SCALES = (2.0, 3.7, 4.0)
DEFAULTS = {"preset": "lite", "encoder": "edsr-baseline", "skip": "none"}  # without --init


def parse(argv):
    p = ArgumentParser(prog="python -m apps.train_upscaler", description=__doc__.split("\n\n")[0].split(" — ")[1])
    p.add_argument("--data", help="folder of HR images (ImageNet layout or flat); default: the sample photos "
                   "installed wheels carry, minus the held-out ones")
    p.add_argument("--val", help="folder of held-out HR images for validation PSNR (default: held-out sample photos)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="model size (default: lite; with --init: the loaded "
                   "model's)")
    p.add_argument("--encoder", choices=["edsr-baseline", "rdn"], help="LIIF encoder (default: edsr-baseline; "
                   "with --init: the loaded model's)")
    p.add_argument("--skip", choices=["none", "bicubic"], help="'bicubic': the MLP predicts a residual over bicubic "
                   "upsampling (not in LIIF; converges much faster on little data). Default: none; with --init: the "
                   "loaded model's")
    p.add_argument("--lr", type=argtypes.positive_float, default=1e-4, help="Adam learning rate")
    p.add_argument("--milestones", default="0.2,0.4,0.6,0.8", help="fractions of --steps where the LR halves")
    p.add_argument("--inp-size", type=argtypes.positive_int, default=48, help="LR crop side")
    p.add_argument("--scale-max", type=argtypes.number(float, min=1), default=4.0,
                   help="training scales ~ U(1, scale-max)")
    p.add_argument("--sample-q", type=argtypes.positive_int, default=2304, help="HR query pixels per crop")
    p.add_argument("--repeat", type=argtypes.positive_int, default=20, help="passes over the image list per epoch")
    p.add_argument("--rgb-permute", action="store_true", help="shuffle colour channels per crop (not in the "
                   "official recipe; helps when training on a handful of photos)")
    p.add_argument("--init", metavar="NAME|DIR", help="start from these LIIF weights (a fresh optimizer and "
                   "schedule); the model's size and --skip are the loaded model's")
    add_ship_args(p, "after training, write weights/NAME.safetensors and its "
                  "index.json entry (command, time, validation PSNR)")
    add_train_args(p, batch_size=16, max_steps=2000, checkpoint_every=500, log_every=20)
    add_common_args(p)
    p.add_check(parse_milestones)
    return p.parse_args(argv)


def parse_milestones(args) -> None:
    try:
        milestones = sorted(float(m) for m in args.milestones.split(",") if m.strip())
    except ValueError:
        milestones = [-1.0]
    if not all(0 <= m <= 1 for m in milestones):
        raise UserError(f"--milestones must be comma-separated fractions in [0, 1], got {args.milestones!r}")
    args.milestones = milestones


def liif_config(preset: str, encoder: str, skip: str):
    from vision.decoders.liif import LIIFConfig

    enc, hidden = PRESETS[preset]
    if encoder == "rdn":
        enc = {}
    return LIIFConfig(encoder=encoder, encoder_args=dict(enc), hidden_list=list(hidden), skip=skip)


def build_model(args):
    """A fresh LIIF from --preset/--encoder/--skip, or the --init model (whose size and skip those may only confirm)."""
    from vision.decoders.liif import LIIF

    if not args.init:
        return LIIF(liif_config(*(getattr(args, k) or v for k, v in DEFAULTS.items())))
    from vision.hub import from_pretrained

    loaded = from_pretrained(args.init)
    if not isinstance(loaded, LIIF):
        raise UserError(f"--init {args.init} is a {type(loaded).__name__}, not a LIIF model")
    c = loaded.config
    given = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None}
    if "skip" in given and given["skip"] != c.skip:
        raise UserError(f"--init {args.init} has --skip {c.skip}, not {given['skip']}; leave --skip out to keep it")
    if "encoder" in given and given["encoder"] != c.encoder:
        raise UserError(f"--init {args.init} has the {c.encoder} encoder, not {given['encoder']}")
    if "preset" in given:
        wanted = liif_config(given["preset"], c.encoder, c.skip)
        if (wanted.encoder_args, wanted.hidden_list) != (c.encoder_args, c.hidden_list):
            raise UserError(f"--init {args.init} is not the {given['preset']} size (encoder {c.encoder_args}, "
                            f"MLP {c.hidden_list}); leave --preset out to keep its size")
    return loaded.train()


def image_lists(args) -> tuple[list, list]:
    from vision.data import ImageFolder
    from vision.data.samples import split_photos

    if args.data:
        if not Path(args.data).is_dir():
            raise UserError(f"--data {args.data}: no such folder")
        train = [p for p, _ in ImageFolder(args.data).samples]
    else:
        train, _ = split_photos()
        if not train:
            raise UserError("no sample photos found; install scikit-image or pass --data DIR")
    if args.val:
        if not Path(args.val).is_dir():
            raise UserError(f"--val {args.val}: no such folder")
        val = [p for p, _ in ImageFolder(args.val).samples]
    else:
        val = split_photos()[1]
    return train, val


def main(argv=None) -> int:
    from vision.data.sr import SRImplicitDownsampled
    from vision.decoders.evaluate import evaluate_upscaler
    from vision.hub import register_shipped, save_pretrained, shipped_provenance

    args = parse(argv)
    command = "python -m apps.train_upscaler " + shlex.join(sys.argv[1:] if argv is None else argv)
    milestones = args.milestones
    device = resolve_device(args.device)
    seed_everything(args.seed)
    train_files, val_files = image_lists(args)
    try:
        data = SRImplicitDownsampled(train_files, inp_size=args.inp_size, scale_max=args.scale_max,
                                     sample_q=args.sample_q, repeat=args.repeat, rgb_permute=args.rgb_permute)
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        trainer = Trainer(train_config_from_args(args, str(device), command), data)
    except ValueError as e:
        raise UserError(str(e)) from None
    model = build_model(args)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [round(m * args.steps) for m in milestones], gamma=0.5)
    models = trainer.prepare({"liif": model}, {"adam": opt}, {"adam": sched}, ema_of="liif")

    def l1(batch, step):
        pred = models["liif"](batch["inp"], batch["coord"], batch["cell"])
        return (pred - batch["gt"]).abs().mean(), {}

    def validate(t: Trainer):
        if t.dist.is_main and val_files:
            figures = evaluate_upscaler(t.final_model().eval(), val_files, [3.7], device=device)
            t.final_model().train()
            gain = figures["psnr_liif_db_x3.7"] - figures["psnr_bicubic_db_x3.7"]
            t.log({"val_psnr_x3.7": figures["psnr_liif_db_x3.7"], "val_gain_db_x3.7": gain})

    trainer.fit([Phase("l1", "adam", l1, models=("liif",))], on_checkpoint=validate)
    elapsed = trainer.train_seconds  # every session of the run, resumes included
    if not trainer.dist.is_main:
        return 0
    final = trainer.final_model().eval()
    save_pretrained(final, Path(args.out) / "model")
    print(f"model saved to {Path(args.out) / 'model'} ({elapsed / 60:.1f} min)")
    if val_files:
        figures = evaluate_upscaler(final, val_files, VAL_SCALES, device=device)
        for s in VAL_SCALES:
            k = f"x{s:g}"
            print(f"held-out PSNR {k}: LIIF {figures[f'psnr_liif_db_{k}']:.2f} dB, "
                  f"bicubic {figures[f'psnr_bicubic_db_{k}']:.2f} dB")
        if args.ship:
            command, train_time = shipped_provenance(trainer, command, args.init)
            entry = register_shipped(
                args.ship, final.cpu(), replace=args.replace_shipped, kind="decoder", trained_with=command,
                data=f"{len(train_files)} photos ({', '.join(Path(p).stem for p in train_files)})",
                train_time=train_time,
                metrics={k: round(v, 3) for k, v in figures.items()},
                metrics_protocol="vision.decoders.evaluate.evaluate_upscaler on the held-out photos "
                f"({', '.join(Path(p).stem for p in val_files)}); rerun: python -m apps.benchmark upscale",
            )
            print(f"shipped as {args.ship}: weights/{entry['file']}")
    return 0


if __name__ == "__main__":
    run(main)

"""python -m apps.train_ldm — train arbitrary-scale latent diffusion in the paper's three stages.

    python -m apps.train_ldm --stage first --out runs/ae                  # autoencoder + implicit decoder (sample photos)
    python -m apps.train_ldm --stage denoiser --task sr --first-stage runs/ae/model --out runs/sr
    python -m apps.train_ldm --stage align --init runs/sr/model --out runs/sr-align
    python -m apps.train_ldm --stage first --data mnist5k --crop 32 --preset small-f2 --out runs/ae-mnist
    python -m apps.train_ldm --stage denoiser --task generate --data mnist5k --crop 32 --preset small-f2 \
        --first-stage runs/ae-mnist/model --out runs/ldm-mnist
    torchrun --nproc_per_node 4 -m apps.train_ldm --stage denoiser --task sr --data DIR --first-stage ae --out runs/ddp

Stages (Kim & Kim, CVPR 2024; zhenshij/arbitrary-scale-diffusion):
- first: the encoder sees a whole HR crop; the implicit decoder renders its latent at a random
  size between the latent's and the crop's (one size per batch), against the bicubic
  downscale of the crop; L1 loss, Adam.
- denoiser: the first stage frozen; the UNet learns the noise of scale * Enc(HR) with the MSE
  loss, DDPM with linear betas 0.0015 -> 0.0155 over 1000 steps. Super-resolution (--task sr)
  concatenates Enc(nearest-upsampled LR) to the noisy latent; --task generate is unconditional.
- align: the denoiser continues with L_align = L_dm + abar/(1 - abar) ||Dec(x0_hat) - x||^2,
  back-propagated through the frozen decoder into the UNet only. Dec renders at the HR crop's size,
  as the paper writes it (the official training renders at the latent's size, a memory saving).
  The official code uses Adam here; AdamW is kept from the denoiser stage.
Latents are diffused at 1/std scale (official `scale_by_std`, measured on 256 training crops).
Photo crops are flipped and transposed at random (as official); MNIST digits are not.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from vision import argtypes
from vision.cli import ArgumentParser, UserError, add_common_args, resolve_device, run, seed_everything
from vision.train import Phase, Trainer, add_train_args, train_config_from_args
from vision.train.trainer import add_ship_args

FIRST_STAGE_PRESETS = {  # ImplicitAEConfig fields
    "small": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=3, norm_num_groups=8, hidden_list=[64, 64, 64]),
    # the official FFHQ SR first stage keeps 32 latent channels at f = 4; 16 keeps photo detail at this size
    "small-z16": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16, norm_num_groups=8,
                      hidden_list=[64, 64, 64]),
    "small-f2": dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=3, norm_num_groups=8, hidden_list=[64, 64, 64]),
    "tiny": dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=3, norm_num_groups=4, hidden_list=[16]),
}
DENOISER_PRESETS = {  # LatentDiffusionConfig fields
    "small": dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8),
    "tiny": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4),
}
DENOISER_PRESETS["small-f2"] = DENOISER_PRESETS["small-z16"] = DENOISER_PRESETS["small"]


def parse(argv):
    p = ArgumentParser(prog="python -m apps.train_ldm", description=__doc__.split("\n\n")[0].split(" — ")[1])
    p.add_argument("--stage", required=True, choices=["first", "denoiser", "align"])
    p.add_argument("--task", choices=["sr", "generate"], help="denoiser stage: super-resolution (concat "
                   "conditioning on the LR image's encoding) or unconditional generation (default: sr)")
    p.add_argument("--data", default="photos", help="'photos' (the sample photos installed wheels carry, held-out "
                   "ones excluded), 'mnist5k' (its training split), or a folder of images")
    p.add_argument("--crop", type=argtypes.positive_int, default=48, help="HR crop side (a multiple of the first "
                   "stage's downsampling); MNIST digits are 32x32")
    p.add_argument("--repeat", type=argtypes.positive_int, default=200, help="crops per image per epoch")
    p.add_argument("--preset", choices=sorted(FIRST_STAGE_PRESETS), default="small", help="model size")
    p.add_argument("--first-stage", metavar="NAME|DIR", help="denoiser stage: the trained first stage (a shipped "
                   "name or a save_pretrained folder)")
    p.add_argument("--init", metavar="NAME|DIR", help="align stage: the trained denoiser to fine-tune")
    p.add_argument("--lr", type=argtypes.positive_float, default=None,
                   help="learning rate (default: 2e-4 first stage (Adam), 2e-4 denoiser (AdamW), 5e-5 align)")
    add_ship_args(p, "after training, write weights/NAME.safetensors and its index.json "
                  "entry (command, time, held-out metrics); a shipped denoiser's --first-stage must be shipped too")
    p.add_argument("--eval", action="store_true", help="print the held-out metrics without shipping")
    add_train_args(p, batch_size=16, max_steps=2000, checkpoint_every=500, log_every=20)
    add_common_args(p)
    p.add_check(check_stage_args)
    return p.parse_args(argv)


def check_stage_args(args) -> None:
    if args.stage == "denoiser" and not args.first_stage:
        raise UserError("--stage denoiser needs --first-stage NAME|DIR (a trained first stage)")
    if args.stage == "align" and not args.init:
        raise UserError("--stage align needs --init NAME|DIR (a trained denoiser)")
    if args.stage != "denoiser" and args.task:
        raise UserError("--task is for --stage denoiser (align keeps the --init model's task)")
    if args.stage != "denoiser" and args.first_stage:
        raise UserError("--first-stage is for --stage denoiser (align uses the --init model's first stage)")
    if args.stage != "align" and args.init:
        raise UserError("--init is for --stage align")
    if args.ship and args.stage == "denoiser":
        from vision.hub import read_index

        if args.first_stage not in read_index():
            raise UserError(f"--ship: the model will name its first stage {args.first_stage!r}, which is not a shipped "
                            "model; ship the first stage first (--stage first --ship NAME) and pass that NAME")


def image_source(args):
    """Training images: a list of paths/arrays or an (N, 3, H, W) tensor, and a description for provenance."""
    if args.data == "mnist5k":
        from vision.data.datasets import MNISTImages

        return MNISTImages(32).x, "MNIST-5k training split (4000 digits, 32x32)"
    if args.data == "photos":
        from vision.data.samples import split_photos

        train, _ = split_photos()
        if not train:
            raise UserError("no sample photos found; install scikit-image or pass --data DIR")
        return train, f"{len(train)} sample photos ({', '.join(Path(p).stem for p in train)})"
    from vision.data import ImageFolder

    if not Path(args.data).is_dir():
        raise UserError(f"--data {args.data}: no such folder")
    paths = [p for p, _ in ImageFolder(args.data).samples]
    return paths, f"{len(paths)} images from {args.data}"


def load_first_stage(spec: str, device):
    from tokenizers.implicit_ae import ImplicitAutoencoder
    from vision.hub import resolve_model

    model = resolve_model(spec, kind="tokenizer", device=device)
    if not isinstance(model, ImplicitAutoencoder):
        raise UserError(f"{spec} is a {type(model).__name__}, not an implicit-decoder autoencoder (--stage first)")
    return model.eval().requires_grad_(False)


def build(args, device):
    """(model to train, frozen first stage or None, factor) for the stage."""
    from generators.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
    from tokenizers.implicit_ae import ImplicitAEConfig, ImplicitAutoencoder

    if args.stage == "first":
        model = ImplicitAutoencoder(ImplicitAEConfig(image_size=args.crop, **FIRST_STAGE_PRESETS[args.preset]))
        return model, None, model.downsample
    if args.stage == "denoiser":
        first = load_first_stage(args.first_stage, device)
        f = first.downsample
        if args.crop % f:
            raise UserError(f"--crop {args.crop} must be a multiple of the first stage's downsampling {f}")
        config = LatentDiffusionConfig(
            tokenizer=str(args.first_stage), latent_channels=first.spec.channels, latent_size=args.crop // f,
            downsample=f, condition="concat" if (args.task or "sr") == "sr" else "none",
            **DENOISER_PRESETS[args.preset])
        model = LatentDiffusion(config)
    else:
        from vision.hub import resolve_model

        model = resolve_model(args.init, kind="generator", device=device)
        if not isinstance(model, LatentDiffusion):
            raise UserError(f"--init {args.init} is a {type(model).__name__}, not a latent diffusion model")
        if model.tokenizer_name is None:
            raise UserError(f"--init {args.init} does not name its first stage")
        first = load_first_stage(model.tokenizer_name, device)
        model.train()
    model.bind_tokenizer(first)
    return model, first, first.downsample


def main(argv=None) -> int:
    from vision.data.sr import HRCrops
    from vision.hub import register_shipped, save_pretrained, shipped_provenance

    args = parse(argv)
    command = "python -m apps.train_ldm " + shlex.join(sys.argv[1:] if argv is None else argv)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    model, first, f = build(args, device)
    images, description = image_source(args)
    try:
        # digits are not flipped or transposed (a generator would learn mirrored digits); photo crops are, as official
        mnist = args.data == "mnist5k"
        data = HRCrops(images, crop=args.crop, factor=f, repeat=1 if mnist else args.repeat, augment=not mnist)
        config = train_config_from_args(args, str(device), command)
        config.ema_warmup = True  # the official LitEma's warm-up (a fixed-decay average of a short run keeps the init)
        trainer = Trainer(config, data)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.stage == "denoiser":
        model.config.scale_factor = latent_scale(first, data)
        print(f"latent scale factor 1/std = {model.config.scale_factor:.4f}")
    lr = args.lr or {"first": 2e-4, "denoiser": 2e-4, "align": 5e-5}[args.stage]
    if args.stage == "first":
        opt = torch.optim.Adam(model.parameters(), lr=lr)  # official: Adam, default betas
    else:
        first = first.to(trainer.device)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)  # the UNet only: the first stage is not a submodule
    models = trainer.prepare({"model": StageLoss(model, args.stage, first, f)}, {"opt": opt}, ema_of="model")

    def loss(batch, step):
        if args.stage == "first":  # one target size per batch, the same in every process: drawn from (seed, step)
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
            size = model.random_target_size(g, args.crop // f, args.crop)
            return models["model"](batch, size), {"size": float(size)}
        return models["model"](batch)

    trainer.fit([Phase(args.stage, "opt", loss, models=("model",))])
    elapsed = trainer.train_seconds
    if not trainer.dist.is_main:
        return 0
    final = trainer.final_model("model").model.eval()
    save_pretrained(final, Path(args.out) / "model")
    print(f"model saved to {Path(args.out) / 'model'} ({elapsed / 60:.1f} min)")
    if not (args.ship or args.eval):
        return 0
    metrics, protocol = evaluate_stage(args, final, device)
    for k, v in metrics.items():
        print(f"{k}: {v}")
    if args.ship:
        command, train_time = shipped_provenance(trainer, command, args.init)
        entry = register_shipped(args.ship, final.cpu(), replace=args.replace_shipped,
                                 kind="tokenizer" if args.stage == "first" else "generator", trained_with=command,
                                 data=description, train_time=train_time, metrics=metrics, metrics_protocol=protocol)
        print(f"shipped as {args.ship}: weights/{entry['file']}")
    return 0


@torch.no_grad()
def latent_scale(first, data, n: int = 256) -> float:
    """Official `scale_by_std`: 1 / std of the training latents (here of the first n crops, a fixed set, so a
    resumed run computes the same number), making the diffused latents unit-variance."""
    hr = torch.stack([data[i]["hr"] for i in range(min(n, len(data)))])
    device = next(first.parameters()).device
    z = torch.cat([first.encode_latents(chunk.to(device)) for chunk in hr.split(64)])
    return round(1.0 / float(z.flatten().std()), 6)


class StageLoss(torch.nn.Module):
    """A stage's objective as a module's forward (DDP synchronises only what runs through forward). The
    frozen first stage is kept outside the module tree: it is neither trained, saved nor averaged."""

    def __init__(self, model, stage: str, first, factor: int):
        super().__init__()
        self.model, self.stage, self.factor = model, stage, factor
        self.__dict__["first"] = first

    def forward(self, batch, size: int | None = None):
        if self.stage == "first":
            return self.model.reconstruction_loss(batch["hr"], (size, size))
        first = self.__dict__["first"]
        with torch.no_grad():
            inputs = {"latents": first.encode_latents(batch["hr"]), "seed": batch["seed"]}
            if self.model.config.condition == "concat":
                lr_up = F.interpolate(batch["lr"], scale_factor=self.factor, mode="nearest")
                inputs["cond"] = first.encode_latents(lr_up)
        if self.stage == "align":
            return self.model.alignment_loss(dict(inputs, images=batch["hr"]))
        return self.model.loss(inputs)


def evaluate_stage(args, model, device) -> tuple[dict[str, float], str]:
    """Held-out figures for the index entry: reconstruction PSNR (first stage), SR PSNR/LPIPS against bicubic
    (SR denoiser), or the Fréchet distance of generated digits (MNIST generator)."""
    from generators.latent_diffusion.evaluate import evaluate_first_stage, evaluate_generation, evaluate_sr

    if args.stage == "first":
        return evaluate_first_stage(model, args.data, args.crop, device)
    if model.config.condition == "concat":
        return evaluate_sr(model, device, seed=args.seed)
    return evaluate_generation(model, device, seed=args.seed)


if __name__ == "__main__":
    run(main)

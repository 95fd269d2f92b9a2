"""python -m apps.train_tokenizer — train WeTok, VQ, VQRAE or KL tokenizers on ImageNet-layout folders.

    python -m apps.train_tokenizer --model wetok-f16 --data /imagenet/train --image-size 256 --out runs/wetok
    torchrun --nproc_per_node 8 -m apps.train_tokenizer --model wetok-f16 --data /imagenet/train --amp bf16 --out runs/wetok
    python -m apps.train_tokenizer --model wetok-f16 --stage 2 --init runs/wetok/model --data DIR --out runs/wetok-gd
    python -m apps.train_tokenizer --model wetok-tiny-f4 --data mnist5k --image-size 32 --out runs/mnist
    python -m apps.train_tokenizer --model vqrae-tiny --stage 2 --init runs/vqrae/model --data DIR --out runs/vqrae2
    python -m apps.train_tokenizer --model kl-mnist --data mnist5k --perceptual-weight 0 --no-gan --out runs/kl

Stage 1 trains the whole tokenizer: L1 (L2 for VQRAE) + LPIPS + GAN + quantizer losses; the
PatchGAN discriminator is trained with hinge loss + LeCAM. Stage 2 is WeTok's generative
decoder (noise at the decoder input, encoder and quantizer frozen, L1 + LPIPS + GAN) or
VQRAE's self-distillation (encoder unfrozen, distilled to its frozen copy). Reconstruction
grids are saved as PNG at each checkpoint; quantizer utilisation and perplexity are logged.
A KL tokenizer (continuous latents) trains with its KL term in place of the quantizer losses, and
its scaling factor is set to 1 / std of the latents of 1000 training images before it is saved.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from vision import argtypes
from vision.cli import ArgumentParser, UserError, add_common_args, resolve_device, run, seed_everything
from vision.train import Phase, Trainer, add_train_args, train_config_from_args
from vision.train.trainer import add_ship_args


def model_names() -> list[str]:
    from generators.var.vqvae import VAR_VQVAE_CONFIGS
    from tokenizers.kl import KL_CONFIGS
    from tokenizers.vq import VQ_CONFIGS
    from tokenizers.wetok import WETOK_CONFIGS

    return sorted([*WETOK_CONFIGS, *VQ_CONFIGS, *VQRAE_CONFIGS, *VAR_VQVAE_CONFIGS, *KL_CONFIGS])


VQRAE_CONFIGS = {  # encoder name and overrides; weights from --encoder-weights (a local file)
    "vqrae-vit-s": dict(encoder="vit_small_patch16_224", image_size=224, patch_size=16),
    "vqrae-tiny": dict(encoder="vit_tiny_patch16_224", image_size=32, patch_size=4, codebook_size=1024,
                       codebook_dim=256, encoder_kwargs={"depth": 2, "embed_dim": 64, "num_heads": 2}),
}


def parse(argv):
    p = ArgumentParser(prog="python -m apps.train_tokenizer", description=__doc__.split("\n\n")[0].split(" — ")[1])
    p.add_argument("--model", required=True, help=f"configuration: {', '.join(model_names())}")
    p.add_argument("--data", required=True, help="ImageNet-layout (or flat) image folder, or 'mnist5k'")
    p.add_argument("--image-size", type=argtypes.positive_int, default=None,
                   help="training resolution, a multiple of the model's downsampling (default: the config's)")
    p.add_argument("--stage", type=int, choices=[1, 2], default=1, help="2: WeTok generative decoder / VQRAE distillation")
    p.add_argument("--init", help="start from this model: stage 1 fine-tunes it, stage 2 needs it (the stage-1 model); "
                   "a shipped name, a save_pretrained folder or a released file such as WeTok.ckpt")
    p.add_argument("--encoder-weights", help="VQRAE stage 1 (required): local file with the pretrained ViT weights "
                   "(timm state dict); VQRAE is defined by its pretrained encoder")
    p.add_argument("--random-encoder", action="store_true", help="VQRAE stage 1: start from a random encoder "
                   "instead of --encoder-weights (tests and smoke runs only)")
    p.add_argument("--lr", type=argtypes.positive_float, default=1e-4, help="Adam learning rate (both networks)")
    p.add_argument("--perceptual-weight", type=argtypes.non_negative_float, default=1.0,
                   help="LPIPS weight; needs the VGG16 backbone in the torch hub cache (0 turns it off)")
    p.add_argument("--lpips-backbone", help="path of torchvision's vgg16-397923af.pth if not in the hub cache")
    p.add_argument("--gan-weight", type=gan_weight, default="0.1",
                   help="fixed GAN weight >= 0 (WeTok: 0.1), or 'adaptive' (VQGAN)")
    p.add_argument("--disc-start", type=argtypes.non_negative_int, default=0,
                   help="step at which the discriminator starts")
    p.add_argument("--no-gan", action="store_true", help="train without the discriminator")
    p.add_argument("--val", metavar="DIR", help="after training, rFID (+ PSNR/SSIM/LPIPS) on this folder via "
                   "`python -m apps.evaluate rfid`; needs the FID Inception weights")
    p.add_argument("--val-num", type=argtypes.positive_int, default=None, help="images of --val to use (default: all)")
    add_ship_args(p, "write weights/NAME.safetensors with its index.json entry")
    add_train_args(p, batch_size=32, max_steps=10000, checkpoint_every=1000, log_every=20)
    add_common_args(p)
    p.add_check(check_image_size_option)
    return p.parse_args(argv)


def check_image_size_option(args) -> None:
    """--image-size against the named model's downsampling, while parsing (stage 2: training_size, once loaded)."""
    from generators.var.vqvae import VAR_VQVAE_CONFIGS
    from tokenizers.kl import KL_CONFIGS
    from tokenizers.vq import VQ_CONFIGS
    from tokenizers.wetok import WETOK_CONFIGS

    if not args.image_size or args.stage != 1:
        return
    var = VAR_VQVAE_CONFIGS.get(args.model)
    if var is not None and args.image_size != var.image_size:  # its scales fix the latent side
        raise UserError(f"--image-size {args.image_size}: --model {args.model} works at {var.image_size} only "
                        f"(scales {var.patch_nums} x downsampling {var.downsample})")
    config = WETOK_CONFIGS.get(args.model) or VQ_CONFIGS.get(args.model) or KL_CONFIGS.get(args.model)
    step = config.downsample if config else VQRAE_CONFIGS.get(args.model, {}).get("patch_size", 1)
    if args.image_size % step:
        what = "patch size" if args.model in VQRAE_CONFIGS else "downsampling factor"
        raise UserError(f"--image-size {args.image_size} must be a multiple of --model {args.model}'s {what} {step} "
                        f"(e.g. {max(step, args.image_size // step * step)})")


def gan_weight(text: str) -> str:
    """'adaptive' or a number >= 0 (kept as text; build_loss reads it)."""
    if text != "adaptive":
        try:
            argtypes.non_negative_float(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"must be 'adaptive' or a number >= 0, got {text!r}") from None
    return text


# ---------------------------------------------------------------- model and data


def build_model(args):
    from generators.var.vqvae import VAR_VQVAE_CONFIGS, MultiScaleVQVAE, var_vqvae_config
    from tokenizers.kl import KL_CONFIGS, KLTokenizer, kl_config
    from tokenizers.vq import VQ_CONFIGS, VQTokenizer, vq_config
    from tokenizers.vqrae import VQRAE, VQRAEConfig
    from tokenizers.wetok import WETOK_CONFIGS, WeTok, to_generative, wetok_config
    from vision.errors import ConfigError
    from vision.hub import resolve_model

    size = {"image_size": args.image_size} if args.image_size else {}
    if args.stage == 1 and args.init:
        return fine_tune_init(args)
    vqrae = args.stage == 1 and args.model in VQRAE_CONFIGS
    if not vqrae and (args.encoder_weights or args.random_encoder):
        raise UserError("--encoder-weights and --random-encoder are for VQRAE stage 1 (--model "
                        f"{' or '.join(VQRAE_CONFIGS)})")
    if vqrae and args.encoder_weights and args.random_encoder:
        raise UserError("pass --encoder-weights or --random-encoder, not both")
    if vqrae and not (args.encoder_weights or args.random_encoder):
        raise UserError(f"--model {args.model} is VQRAE, defined by its pretrained encoder "
                        f"({VQRAE_CONFIGS[args.model]['encoder']}): pass --encoder-weights FILE (its timm state dict), "
                        "or --random-encoder to train from a random one (tests, smoke runs)")
    if args.stage == 2:
        if not args.init:
            raise UserError("--stage 2 needs --init, the stage-1 model")
        model = resolve_model(args.init, kind="tokenizer")
        if isinstance(model, WeTok):
            return to_generative(model) if not model.config.generative else model
        if isinstance(model, VQRAE):
            return model.set_stage(2)
        raise UserError(f"--stage 2 is defined for WeTok and VQRAE, not {type(model).__name__}")
    try:  # the configs check their fields, --image-size against the downsampling included
        if args.model in WETOK_CONFIGS:
            return WeTok(wetok_config(args.model, **size))
        if args.model in VQ_CONFIGS:
            return VQTokenizer(vq_config(args.model, **size))
        if args.model in KL_CONFIGS:
            return KLTokenizer(kl_config(args.model, **size))
        if args.model in VAR_VQVAE_CONFIGS:  # trainable whatever the config's test_mode
            return MultiScaleVQVAE(var_vqvae_config(args.model, **size, test_mode=False))
        if args.model in VQRAE_CONFIGS:
            config = VQRAEConfig(**{**VQRAE_CONFIGS[args.model], **size, "encoder_weights": args.encoder_weights})
            return VQRAE(config).set_stage(1)
    except ConfigError as e:
        raise UserError(f"--model {args.model}: {e}") from None
    raise UserError(f"unknown --model {args.model!r}; known: {', '.join(model_names())}")


def fine_tune_init(args):
    """Stage 1 from trained weights (--init: any form vision.hub.resolve_model takes), of --model's family."""
    from generators.var.vqvae import VAR_VQVAE_CONFIGS, MultiScaleVQVAE
    from tokenizers.kl import KL_CONFIGS, KLTokenizer
    from tokenizers.vq import VQ_CONFIGS, VQTokenizer
    from tokenizers.vqrae import VQRAE
    from tokenizers.wetok import WETOK_CONFIGS, WeTok
    from vision.hub import resolve_model

    if args.encoder_weights or args.random_encoder:
        raise UserError("--encoder-weights and --random-encoder build a new VQRAE; the --init model has its encoder")
    families = [(WETOK_CONFIGS, WeTok), (VQ_CONFIGS, VQTokenizer), (KL_CONFIGS, KLTokenizer),
                (VAR_VQVAE_CONFIGS, MultiScaleVQVAE), (VQRAE_CONFIGS, VQRAE)]
    family = next((cls for configs, cls in families if args.model in configs), None)
    if family is None:
        raise UserError(f"unknown --model {args.model!r}; known: {', '.join(model_names())}")
    model = resolve_model(args.init, kind="tokenizer")
    if not isinstance(model, family):
        raise UserError(f"--init {args.init} is a {type(model).__name__}, --model {args.model} a {family.__name__}")
    if isinstance(model, WeTok) and model.config.generative:
        raise UserError(f"--init {args.init} has WeTok's generative decoder (stage 2): continue it with --stage 2")
    return model.set_stage(1) if isinstance(model, VQRAE) else model


def training_size(args, model) -> int:
    """The resolution to train (and score) at: --image-size or the model's own, which the model must accept."""
    from tokenizers.wetok import check_image_size

    c = model.config
    size = args.image_size or c.image_size
    if hasattr(c, "patch_size"):  # VQRAE: a ViT with fixed position embeddings
        if size != c.image_size:
            raise UserError(f"--image-size {size}: the --init model was trained at {c.image_size}")
    else:
        check_image_size(size, c.downsample)
    return size


def build_data(args, size: int):
    from vision.data.datasets import FolderImages, MNISTImages

    if args.data == "mnist5k":
        return MNISTImages(size)
    if not Path(args.data).is_dir():
        raise UserError(f"--data {args.data}: no such folder")
    try:
        return FolderImages(args.data, size)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None


def build_loss(args, model):
    from tokenizers.losses import LPIPSLoss, WeTokLoss
    from tokenizers.vqrae import VQRAE, VQRAELoss

    perceptual = None
    if args.perceptual_weight > 0:
        try:
            perceptual = LPIPSLoss.from_local("vgg", args.lpips_backbone)
        except FileNotFoundError as e:
            raise UserError(f"{e} (or pass --perceptual-weight 0)") from None
    gan_weight = None if args.gan_weight == "adaptive" else float(args.gan_weight)
    common = dict(perceptual=perceptual, gan=not args.no_gan, perceptual_weight=args.perceptual_weight,
                  gan_weight=gan_weight, disc_start=args.disc_start)
    if isinstance(model, VQRAE):
        return VQRAELoss(**common)
    return WeTokLoss(**common)


# ---------------------------------------------------------------- training


def save_grid(model, images: torch.Tensor, path: Path) -> None:
    """Originals (top row) over reconstructions (bottom row)."""
    import torchvision

    with torch.no_grad():
        was = model.training
        recon = model.eval()(images)[0].clamp(-1, 1)
        model.train(was)
    grid = torchvision.utils.make_grid(torch.cat([images, recon]).cpu() * 0.5 + 0.5, nrow=len(images), padding=2)
    tmp = path.with_name(f".{path.name}.tmp.png")
    torchvision.utils.save_image(grid, tmp)
    tmp.replace(path)


def main(argv=None) -> int:
    from tokenizers.vqrae import VQRAE
    from vision.hub import register_shipped, save_pretrained, shipped_provenance

    args = parse(argv)
    command = "python -m apps.train_tokenizer " + shlex.join(sys.argv[1:] if argv is None else argv)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    model = build_model(args)
    size = training_size(args, model)
    data = build_data(args, size)
    crit = build_loss(args, model)
    try:
        trainer = Trainer(train_config_from_args(args, str(device), command), data)
    except ValueError as e:
        raise UserError(str(e)) from None
    trainable = [p for p in model.parameters() if p.requires_grad]
    opts = {"gen": torch.optim.Adam(trainable, lr=args.lr, betas=(0.5, 0.9))}
    models = {"tokenizer": model}
    extra = {}
    if crit.discriminator is not None:
        models["disc"] = crit.discriminator
        opts["disc"] = torch.optim.Adam(crit.discriminator.parameters(), lr=args.lr, betas=(0.5, 0.9))
        if crit.lecam is not None:
            extra["lecam"] = crit.lecam
    wrapped = trainer.prepare(models, opts, extra_state=extra, ema_of="tokenizer")
    is_vqrae = isinstance(model, VQRAE)
    wetok_stage2 = getattr(model.config, "generative", False)
    pending: list[torch.Tensor] = []  # reconstructions handed from the generator phase to the discriminator's

    def generator(batch, step):
        images = batch[0]
        out = wrapped["tokenizer"](images)
        recon, q = out[0], out[1]
        if "disc" in opts and step >= args.disc_start:  # only what this step's discriminator phase consumes
            pending.append(recon.detach())
        disc = wrapped.get("disc")
        if is_vqrae:
            return crit.generator_loss(model, images, recon, q, out[2], step, discriminator=disc)
        return crit.generator_loss(images, recon, None if wetok_stage2 else q, step, last_layer=model.last_layer,
                                   discriminator=disc)

    def discriminator(batch, step):
        if not pending:
            raise RuntimeError("the discriminator phase found no reconstruction from this step's generator phase")
        return crit.discriminator_loss(batch[0], pending.pop(0), step, discriminator=wrapped["disc"])

    phases = [Phase("gen", "gen", generator, models=("tokenizer",))]
    if "disc" in opts:
        phases.append(Phase("disc", "disc", discriminator, models=("disc",),
                            active=lambda step: step >= args.disc_start))
    preview = torch.stack([data[i][0] for i in range(min(8, len(data)))]).to(device)

    def on_checkpoint(t: Trainer):
        pending.clear()
        if t.dist.is_main:
            save_grid(t.final_model("tokenizer"), preview, Path(args.out) / f"recon_{t.step:07d}.png")

    trainer.fit(phases, on_checkpoint=on_checkpoint)
    elapsed = trainer.train_seconds  # every session of the run, resumes included
    if not trainer.dist.is_main:
        return 0
    final = trainer.final_model("tokenizer").eval()
    calibrate_kl(final, data, device)
    save_pretrained(final, Path(args.out) / "model")
    print(f"model saved to {Path(args.out) / 'model'} ({elapsed / 60:.1f} min)")
    figures = reconstruction_figures(final, args, size, device)
    if args.val:
        figures.update(validation_rfid(args, size))
    print("  ".join(f"{k} {v:.4g}" for k, v in figures.items()))
    if args.ship:
        codes = ", codebook utilisation and perplexity over all their ids" if "utilisation" in figures else ""
        trained_with, train_time = shipped_provenance(trainer, command)
        entry = register_shipped(
            args.ship, final.cpu(), replace=args.replace_shipped, kind="tokenizer", trained_with=trained_with,
            data="MNIST-5k training split (4000 digits, 32x32)" if args.data == "mnist5k" else str(args.data),
            train_time=train_time, metrics={k: round(v, 4) for k, v in figures.items()},
            metrics_protocol="reconstruction of the 1000 held-out MNIST-5k digits (uint8 round trip): "
                             f"PSNR in dB on [0, 1]{codes}"
                             if args.data == "mnist5k" else "reconstruction of the first 256 training images")
        print(f"shipped as {args.ship}: weights/{entry['file']}")
    return 0


def calibrate_kl(model, data, device, count: int = 1000) -> None:
    """A KL tokenizer's scaling factor: 1 / std of the posterior means of the first `count` training images
    (LDM's scale_by_std), so the latents a generator trains on have about unit variance."""
    from tokenizers.kl import KLTokenizer

    if not isinstance(model, KLTokenizer):
        return
    images = torch.stack([data[i][0] for i in range(min(count, len(data)))])
    scale = model.calibrate_scaling_factor(images.to(device))
    print(f"scaling factor {scale:.6g} (1 / std of the latents of {len(images)} training images)")


def validation_rfid(args, size: int) -> dict[str, float]:
    """The evaluation app's rfid protocol on --val with the model just saved, in a single-process child
    (so a torchrun world does not leak into it)."""
    import json
    import os
    import subprocess

    out = Path(args.out) / "val_rfid.json"
    cmd = [sys.executable, "-m", "apps.evaluate", "rfid", "--tokenizer", str(Path(args.out) / "model"), "--data",
           args.val, "--image-size", str(size), "--json", str(out), "--overwrite", "--device", args.device]
    cmd += ["--quiet"] if args.quiet else []
    cmd += ["--num", str(args.val_num)] if args.val_num else []
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                                "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise UserError(f"--val rFID failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return {f"val_{k}": v for k, v in json.loads(out.read_text()).items() if isinstance(v, (int, float))}


@torch.no_grad()
def reconstruction_figures(model, args, size: int, device) -> dict[str, float]:
    """PSNR (uint8 round trip) and code usage on held-out MNIST digits (or the first training images), at the
    training size."""
    from vision.data.datasets import MNISTImages
    from vision.data.images import to_uint8
    from vision.metrics.image_quality import psnr

    if args.data == "mnist5k":
        images = MNISTImages(size, heldout=True).x
    else:
        data = build_data(args, size)
        images = torch.stack([data[i][0] for i in range(min(256, len(data)))])
    values, ids = [], []
    for chunk in images.split(100):
        chunk = chunk.to(device)
        tokens = model.encode(chunk)
        recon = model.decode(tokens)
        values.append(psnr(to_uint8(recon).float() / 255, to_uint8(chunk).float() / 255, reduction="none"))
        if tokens.spec.kind == "continuous":  # KL: no codes to count
            continue
        if tokens.ids is None:  # VAR: the ids of every scale, pooled
            ids.append(torch.cat([s.flatten(1) for s in tokens.scale_ids], 1)[:, None])
        else:
            ids.append(tokens.ids.flatten(2) if tokens.ids.ndim == 4 else tokens.ids.flatten(1)[:, None])
    if not ids:
        return {"psnr_db": torch.cat(values).mean().item()}
    ids = torch.cat(ids).transpose(0, 1).reshape(ids[0].shape[1], -1)  # (groups, n)
    vocab = model.spec.vocab_size
    counts = torch.stack([torch.bincount(g, minlength=vocab) for g in ids]).double()
    probs = counts / counts.sum(1, keepdim=True)
    perplexity = torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum(1)).mean()
    return {"psnr_db": torch.cat(values).mean().item(), "utilisation": (counts > 0).double().mean().item(),
            "perplexity": perplexity.item()}


if __name__ == "__main__":
    run(main)

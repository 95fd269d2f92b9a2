"""python -m apps.train_generator — train any registered generator family on a token cache.

    python -m apps.extract_tokens --tokenizer vq-mnist --data mnist5k --out tokens/vq-mnist
    python -m apps.train_generator --model llamagen-gpt-mnist --tokens tokens/vq-mnist --out runs/ar-mnist
    python -m apps.train_generator --model llamagen-gpt-mnist --tokens tokens/vq-mnist --out runs/ar-mnist --resume
    torchrun --nproc_per_node 8 -m apps.train_generator --model llamagen-gpt-b --tokens tokens/in256 --out runs/gpt-b
    torchrun --nproc_per_node 8 -m apps.train_generator --model llamagen-gpt-xxl --fsdp --tokens ... --out ...

The family supplies the loss; the training toolkit supplies everything else (resume, DDP, EMA, AMP,
curves). AdamW with weight decay on matrices only (as LlamaGen and MAR configure it), linear
warm-up then a constant rate, gradient clipping. Each option left unset takes the family's default.
`--fsdp` shards parameters, gradients and optimizer state over the processes (torch FSDP2) and
writes sharded checkpoints that resume.
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


def parse(argv):
    from generators.base import presets

    names = presets()
    p = ArgumentParser(prog="python -m apps.train_generator", description=__doc__.split("\n\n")[0].split(" — ")[1],
                       epilog="presets: " + ", ".join(f"{n} ({f.architecture})" for n, (f, _, _) in sorted(names.items())))
    p.add_argument("--model", required=True, help="a generator preset (listed below), or a shipped generator or "
                   "save_pretrained folder to continue training from (a fresh schedule; a preset name wins)")
    p.add_argument("--tokens", required=True, help="a token cache made by apps.extract_tokens")
    p.add_argument("--lr", type=argtypes.positive_float, default=None, help="learning rate after warm-up (default: the family's)")
    p.add_argument("--weight-decay", type=argtypes.non_negative_float, default=None, help="AdamW weight decay on matrices (default: the family's)")
    p.add_argument("--warmup-steps", type=argtypes.non_negative_int, default=None, help="linear warm-up steps (default: the family's)")
    p.add_argument("--grad-clip", type=argtypes.non_negative_float, default=None, help="gradient-norm clip, 0 = off (default: the family's)")
    p.add_argument("--fsdp", action="store_true", help="shard the model over the processes (torch FSDP2)")
    d = p.add_argument_group("scales and distillation (VAR; CoDe's specialised fine-tuning)")
    d.add_argument("--train-scales", metavar="A:B", default=None,
                   help="train on scales A..B-1 only (0-based; CoDe: the drafter 0:N, the refiner N:K)")
    d.add_argument("--teacher", metavar="MODEL", default=None,
                   help="distil from MODEL (same family and tokens): alpha KL(teacher || model) T^2 + (1 - alpha) CE")
    d.add_argument("--distill-alpha", type=argtypes.fraction, default=0.5, help="alpha of --teacher, in [0, 1] (CoDe: 0.5)")
    d.add_argument("--distill-temperature", type=argtypes.positive_float, default=1.0, help="T of --teacher (CoDe: 1)")
    add_ship_args(p, "after training, write weights/NAME.safetensors and its index.json "
                  "entry (command, time, and the family's digit metrics when the tokens are MNIST-5k's)")
    add_train_args(p, batch_size=64, max_steps=2000, checkpoint_every=500, log_every=20)
    add_common_args(p)
    return p.parse_args(argv)


def build_model(name: str, cache):
    from generators.base import GeneratorModel, build_preset, presets
    from vision.hub import HubError, from_pretrained, read_index

    shipped = name not in presets() and read_index().get(name, {}).get("kind") == "generator"
    if Path(name).is_dir() or shipped:  # trained weights to continue from (a preset name wins over a shipped one)
        model = from_pretrained(name)
        if not isinstance(model, GeneratorModel):
            raise UserError(f"{name} is not a generator")
    else:
        try:
            model = build_preset(name, cache.spec, cache.num_classes, cache.tokenizer)
        except HubError:
            raise
        except ValueError as e:
            raise UserError(str(e)) from None
    from vision.tokens import compatible

    if not compatible(model.spec, cache.spec) or tuple(model.spec.grid) != tuple(cache.spec.grid):
        raise UserError(f"{name} emits {model.spec} but the token cache holds {cache.spec}")
    if model.num_classes and cache.num_classes > model.num_classes:
        raise UserError(f"the token cache has {cache.num_classes} classes, the model {model.num_classes}")
    if model.needs_tokenizer:  # VAR: the loss builds next-scale inputs with the cache's tokenizer
        from generators.pipeline import load_tokenizer_for

        load_tokenizer_for(model, cache.tokenizer)
    return model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings (dim >= 2); not biases, norms or scalars."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def main(argv=None) -> int:
    from vision.data.token_cache import TokenCache

    args = parse(argv)
    command = "python -m apps.train_generator " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        cache = TokenCache(args.tokens)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    device = resolve_device(args.device)
    seed_everything(args.seed)
    model = build_model(args.model, cache)
    hp = {**model.training_defaults, **{k: v for k, v in (("lr", args.lr), ("weight_decay", args.weight_decay),
                                                          ("warmup_steps", args.warmup_steps),
                                                          ("grad_clip", args.grad_clip)) if v is not None}}
    config = train_config_from_args(args, str(device), command)
    config.fsdp = args.fsdp
    try:
        trainer = Trainer(config, cache)
    except ValueError as e:
        raise UserError(str(e)) from None
    _scales_and_teacher(model, args, trainer.device)
    opt = torch.optim.AdamW(param_groups(model, hp["weight_decay"]), lr=hp["lr"], betas=tuple(hp["betas"]))
    warm = hp["warmup_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    models = trainer.prepare({"generator": FamilyLoss(model)}, {"adamw": opt}, {"adamw": sched}, ema_of="generator")

    def loss(batch, step):
        return models["generator"](batch)

    phase = Phase("gen", "adamw", loss, models=("generator",), clip_grad_norm=hp["grad_clip"] or None)
    trainer.fit([phase])
    elapsed = trainer.train_seconds  # every session of the run, resumes included
    state = trainer.full_state_dict("generator")  # collective under FSDP
    if not trainer.dist.is_main:
        return 0
    final = trainer.final_model("generator").generator
    if trainer.sharded:  # an unsharded copy of the trained weights
        final = type(model)(model.config)
        final.load_state_dict({k.removeprefix("generator."): v for k, v in state.items()})
    final = final.eval()
    from generators.base import presets
    from vision.hub import read_index, register_shipped, save_pretrained, shipped_provenance

    out = Path(args.out)
    save_pretrained(final, out / "model")
    print(f"model saved to {out / 'model'} ({elapsed / 60:.1f} min)")
    if args.ship:
        metrics, protocol = {}, "none measured"
        if cache.meta.get("data") == "mnist5k":
            metrics, protocol = _digit_metrics(final, cache, trainer.device, args.seed)
        shipped = args.model if args.model not in presets() and args.model in read_index() else None
        trained_with, train_time = shipped_provenance(trainer, command, shipped)
        entry = register_shipped(args.ship, final.cpu(), replace=args.replace_shipped, kind="generator",
                                 trained_with=trained_with,
                                 data=f"token cache {args.tokens} ({cache.tokenizer}, {len(cache)} items, data "
                                      f"{cache.meta.get('data')})",
                                 train_time=train_time, metrics=metrics,
                                 metrics_protocol=protocol)
        print(f"shipped as {args.ship}: weights/{entry['file']}")
    return 0


def _scales_and_teacher(model, args, device) -> None:
    """--train-scales A:B and --teacher MODEL, for families that support them (VAR)."""
    if args.train_scales is not None:
        if not hasattr(model, "set_train_scales"):
            raise UserError(f"--train-scales is for multi-scale generators (VAR), not {type(model).__name__}")
        start, _, stop = args.train_scales.partition(":")
        try:
            start, stop = int(start), int(stop)
        except ValueError:
            raise UserError(f"--train-scales: expected A:B (e.g. 0:4), got {args.train_scales!r}") from None
        try:
            model.set_train_scales(start, stop)
        except ValueError as e:
            raise UserError(f"--train-scales: {e}") from None
    if args.teacher is not None:
        if not hasattr(model, "set_teacher"):
            raise UserError(f"--teacher is for generators with a distillation loss (VAR), not {type(model).__name__}")
        if not 0.0 <= args.distill_alpha <= 1.0:
            raise UserError(f"--distill-alpha must lie in [0, 1], got {args.distill_alpha}")
        from generators.pipeline import load_generator

        teacher = load_generator(args.teacher, device)
        if getattr(model, "needs_tokenizer", False):
            teacher.bind_tokenizer(model.tokenizer)
        try:
            model.set_teacher(teacher, temperature=args.distill_temperature, alpha=args.distill_alpha)
        except ValueError as e:
            raise UserError(f"--teacher {args.teacher}: {e}") from None


class FamilyLoss(torch.nn.Module):
    """The family's loss as a module's forward: DDP and FSDP synchronise only what runs through forward."""

    def __init__(self, generator):
        super().__init__()
        self.generator = generator

    def forward(self, batch):
        return self.generator.loss(batch)


def _digit_metrics(model, cache, device, seed: int):
    from generators.pipeline import load_tokenizer_for
    from vision.metrics.digits import score_digits

    tok = load_tokenizer_for(model, cache.tokenizer, device)
    g = torch.Generator(device).manual_seed(seed)
    labels = torch.arange(10, device=device).repeat_interleave(100)
    images = []
    for chunk in labels.split(100):
        tokens, _ = model.to(device).generate(chunk, generator=g)
        images.append(tok.decode(tokens).clamp(-1, 1).cpu())
    scores = score_digits(torch.cat(images), labels.cpu())
    return ({"fd_plain": round(scores["fd"], 3), "accuracy_plain": round(scores["accuracy"], 4)},
            "1000 samples (100 per class) with the plain sampler at the family's default settings, seed "
            f"{seed}; vision.metrics.digits.score_digits against the 1000 held-out MNIST-5k digits")


if __name__ == "__main__":
    run(main)

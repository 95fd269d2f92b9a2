"""A tiny registered generator family for the foundation's tests: a class-conditional table of per-position
logits (positions independent), with the null class for CFG. Small enough to train in seconds, real enough to
go through the hub, apps.generate, apps.train_generator, DDP and FSDP.

Run an app with this family registered (also under torchrun):
    python tests/helpers/tiny_generator.py generate --model DIR ...
"""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from generators.base import (GeneratorModel, SamplerOption, per_sample_rand, register_preset,  # noqa: E402
                             register_sampler)
from generators.sampling import cfg_llamagen, probabilities, sample_categorical  # noqa: E402
from vision.hub import register_model  # noqa: E402
from vision.tokens import Tokens, TokenSpec  # noqa: E402


@dataclass
class TinyConfig:
    tokenizer: str | None = "vq-mnist"
    num_classes: int = 10
    vocab_size: int = 256
    grid: tuple[int, int] = (8, 8)
    downsample: int = 4
    hidden: int = 16
    class_dropout: float = 0.1


@register_model("tiny-test-generator")
class TinyGenerator(GeneratorModel):
    config_class = TinyConfig
    sampling_defaults = {"cfg": 1.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0}

    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = c = config
        n = c.grid[0] * c.grid[1]
        self.class_emb = nn.Embedding(c.num_classes + 1, c.hidden)  # row num_classes: the null class
        self.pos = nn.Parameter(torch.randn(n, c.hidden) * 0.02)
        self.head = nn.Linear(c.hidden, c.vocab_size)

    @property
    def spec(self) -> TokenSpec:
        c = self.config
        return TokenSpec("discrete", c.grid, c.downsample, vocab_size=c.vocab_size)

    def logits(self, labels: Tensor) -> Tensor:
        h = torch.tanh(self.class_emb(labels)[:, None] + self.pos[None])
        return self.head(h)  # (B, positions, vocab)

    def loss(self, batch):
        _maybe_die()
        ids, labels = batch["ids"].flatten(1), batch["labels"]
        drop = per_sample_rand(batch) < self.config.class_dropout
        labels = torch.where(drop, torch.full_like(labels, self.config.num_classes), labels)
        logits = self.logits(labels)
        loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
        return loss, {"accuracy": (logits.argmax(-1) == ids).float().mean()}


_CALLS = [0]


def _maybe_die() -> None:
    """TINY_KILL_AT_CALL=N: SIGKILL this process at the N-th loss call (resume tests)."""
    _CALLS[0] += 1
    if _CALLS[0] == int(os.environ.get("TINY_KILL_AT_CALL", "0")):
        os.kill(os.getpid(), signal.SIGKILL)


@register_sampler(TinyGenerator, "plain")
def plain(model, labels, *, generator, stats, batch_size, cfg, temperature, top_k, top_p):
    """Every position drawn at once from its processed distribution."""
    logits = model.logits(labels)
    stats.nfe += 1
    if cfg != 1.0:
        uncond = model.logits(torch.full_like(labels, model.num_classes))
        logits = cfg_llamagen(logits, uncond, cfg)
    probs = probabilities(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    ids = sample_categorical(probs.flatten(0, 1), generator).view(len(labels), *model.config.grid)
    return Tokens(model.spec, ids=ids)


@register_sampler(TinyGenerator, "twice", options=(SamplerOption("rounds", int, 2, "sampling rounds", min=1),))
def twice(model, labels, *, generator, stats, batch_size, cfg, temperature, top_k, top_p, rounds):
    """Draws `rounds` times and keeps the last (a second sampler with an option of its own)."""
    for _ in range(rounds):
        tokens = plain(model, labels, generator=generator, stats=stats, batch_size=batch_size, cfg=cfg,
                       temperature=temperature, top_k=top_k, top_p=top_p)
        stats.accepted_per_iter.append(1)
    return tokens


register_preset("tiny-test", TinyGenerator,
                lambda spec, num_classes, tokenizer: TinyConfig(tokenizer=tokenizer, num_classes=num_classes,
                                                                vocab_size=spec.vocab_size, grid=spec.grid,
                                                                downsample=spec.downsample))


if __name__ == "__main__":
    import importlib

    from vision.cli import run

    app = importlib.import_module(f"apps.{sys.argv[1]}")
    run(app.main, sys.argv[2:])

"""Generator + tokenizer, loaded and checked together: labels in, images out.

Like a diffusers pipeline, this holds no model code: it resolves the generator and the tokenizer
it speaks through the hub (shipped name, save_pretrained folder or released checkpoint), refuses a
pair whose tokens differ (``vision.tokens.compatible``), and decodes what the generator samples.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from generators.base import GeneratorModel
from vision.hub import HubError, resolve_model
from vision.tokens import GenerationStats, Tokens, compatible


def load_generator(name_or_path: str | os.PathLike, device: str | torch.device = "cpu") -> GeneratorModel:
    model = resolve_model(name_or_path, kind="generator", device=device)
    if not isinstance(model, GeneratorModel):
        raise HubError(f"{name_or_path} is not a generator ({type(model).__name__})")
    return model


def load_tokenizer_for(generator: GeneratorModel, tokenizer: str | os.PathLike | None = None,
                       device: str | torch.device = "cpu") -> nn.Module:
    """The tokenizer to decode `generator`'s tokens: the one given, else the one its config names."""
    name = tokenizer if tokenizer is not None else generator.tokenizer_name
    if name is None:
        raise HubError("this generator's tokenizer ships separately; pass it with --tokenizer (or --vae) FILE")
    tok = resolve_model(name, kind="tokenizer", device=device)
    check_pair(generator, tok, str(name))
    generator.bind_tokenizer(tok)
    return tok


def describe_spec(s) -> str:
    return (f"{s.kind} tokens, vocabulary {s.vocab_size}" if s.kind == "discrete"
            else f"{s.kind} tokens, {s.channels} channels") + f", /{s.downsample}" + (
            f", {s.groups} groups" if s.groups > 1 else "") + (f", scales {s.scales}" if s.scales else "")


def check_pair(generator: GeneratorModel, tokenizer: Any, tokenizer_name: str, generator_name: str = "the generator"
               ) -> None:
    g, t = generator.spec, tokenizer.spec
    if not compatible(g, t):
        raise HubError(f"{generator_name} emits {describe_spec(g)} but tokenizer {tokenizer_name} reads "
                       f"{describe_spec(t)}")


@dataclass
class GenerationPipeline:
    generator: GeneratorModel
    tokenizer: nn.Module

    @classmethod
    def load(cls, model: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
             device: str | torch.device = "cpu") -> "GenerationPipeline":
        gen = load_generator(model, device)
        return cls(gen, load_tokenizer_for(gen, tokenizer, device))

    @property
    def renders_any_size(self) -> bool:
        """Whether the tokenizer's decoder is implicit (vision.tokens.Decoder): it renders any output size."""
        return bool(getattr(self.tokenizer, "renders_any_size", False))

    @torch.no_grad()
    def __call__(self, labels: Tensor | None, *, sampler: str = "plain", generator: torch.Generator | None = None,
                 batch_size: int | None = None, size: tuple[int, int] | None = None,
                 **options: Any) -> tuple[Tensor, Tokens, GenerationStats]:
        """Images in [-1, 1] (B, C, H, W), the tokens they decode from, and the sampler's statistics.

        `size` (H, W) renders at another size than the tokenizer's native one; only an implicit decoder can."""
        if size is not None and not self.renders_any_size:
            raise ValueError(f"{type(self.tokenizer).__name__} decodes only at its native size; an output size needs "
                             "an implicit decoder (a latent diffusion model's first stage)")
        tokens, stats = self.generator.generate(labels, sampler=sampler, generator=generator, batch_size=batch_size,
                                                **options)
        images = self.tokenizer.decode(tokens) if size is None else self.tokenizer.decode(tokens, size=size)
        return images.clamp(-1, 1), tokens, stats

"""What every generator family shares: the model base class and the sampler registry.

A generator family is a registered model (``@register_model("llamagen-gpt")``) that subclasses
``GeneratorModel``. Its config dataclass names the tokenizer it speaks (``tokenizer: "vq-mnist"``,
``None`` for an official checkpoint whose tokenizer ships separately) and ``num_classes`` (0 for
unconditional only). The family implements

- ``spec``: the ``TokenSpec`` of what it emits (checked against the tokenizer with ``compatible``);
- ``loss(batch) -> (loss, metrics)``: one training step's loss on a token-cache batch
  (``{"ids"|"latents"|"scale_ids.K": ..., "labels": ...}``), used by ``apps.train_generator``;

and registers its samplers with ``register_sampler``. ``plain`` must exist; accelerated samplers
(SJD, CSpD, ReCAP, CoDe) are more entries of the same registry with their own options.
``generate`` is written once here: it validates options, fills defaults, and measures
``GenerationStats`` around the sampler, so every sampler is timed and counted the same way.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from vision.tokens import GenerationStats, Tokens, TokenSpec

SamplerFn = Callable[..., Tokens]


@dataclass(frozen=True)
class SamplerOption:
    """One option of a sampler; ``apps.generate`` exposes it as ``--name-with-dashes``.

    ``type`` is int, float, str or ``"model"`` (a second generator, resolved by the hub: a draft or a
    refiner). ``min`` is an inclusive lower bound; ``choices`` the allowed values.
    """

    name: str
    type: Any
    default: Any
    help: str
    choices: tuple | None = None
    min: float | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> Any:
        if value is None:
            return value
        if self.type in (int, float, str):
            try:
                value = self.type(value)
            except (TypeError, ValueError):
                raise ValueError(f"{self.flag} must be {self.type.__name__}, got {value!r}") from None
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{self.flag} must be one of {', '.join(map(str, self.choices))}; got {value!r}")
        if self.min is not None and value < self.min:
            raise ValueError(f"{self.flag} must be >= {self.min:g}, got {value}")
        return value


# The options every family's samplers take. A family states its own defaults in `sampling_defaults`.
COMMON_OPTIONS: tuple[SamplerOption, ...] = (
    SamplerOption("cfg", float, 1.0, "classifier-free guidance scale (1 = off)", min=0.0),
    SamplerOption("temperature", float, 1.0, "softmax temperature", min=0.0),
    SamplerOption("top_k", int, 0, "keep the k most likely tokens (0 = all)", min=0),
    SamplerOption("top_p", float, 1.0, "keep the smallest set of tokens with this much probability (1 = all)", min=0.0),
)


@dataclass(frozen=True)
class Sampler:
    name: str
    fn: SamplerFn
    options: tuple[SamplerOption, ...] = ()
    help: str = ""


class GeneratorModel(nn.Module):
    """Base class of every generator family (see the module docstring)."""

    config: Any
    kind: ClassVar[str] = "generator"
    sampling_defaults: ClassVar[dict[str, Any]] = {"cfg": 1.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    samplers: ClassVar[dict[str, Sampler]] = {}
    # A trained model may carry its own defaults in `config.sampling` (e.g. the CFG scale it was measured with);
    # they take precedence over the family's `sampling_defaults`.
    # AdamW settings apps.train_generator uses unless told otherwise (LlamaGen's: constant 1e-4, wd 0.05)
    training_defaults: ClassVar[dict[str, Any]] = {"lr": 1e-4, "weight_decay": 0.05, "betas": (0.9, 0.95),
                                                   "warmup_steps": 0, "grad_clip": 1.0}

    # VAR builds each next-scale input from its VQVAE's codebook: such a family sets this and reaches the
    # tokenizer through `self.tokenizer` once `bind_tokenizer` has given it one.
    needs_tokenizer: ClassVar[bool] = False

    @property
    def spec(self) -> TokenSpec:
        raise NotImplementedError

    def bind_tokenizer(self, tokenizer: nn.Module) -> None:
        """Give the model the tokenizer it speaks. Kept outside the module tree: it is not part of the
        generator's state dict (a released VAR file holds no VQVAE) and `.to()` does not move it."""
        self.__dict__["_bound_tokenizer"] = tokenizer

    @property
    def tokenizer(self) -> nn.Module:
        tok = self.__dict__.get("_bound_tokenizer")
        if tok is None:
            raise ValueError(f"{type(self).__name__} needs its tokenizer: load it with "
                             "generators.pipeline.GenerationPipeline (or call bind_tokenizer)")
        return tok

    @property
    def num_classes(self) -> int:
        return int(getattr(self.config, "num_classes", 0))

    @property
    def tokenizer_name(self) -> str | None:
        return getattr(self.config, "tokenizer", None)

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError(f"{type(self).__name__} does not define a training loss")

    # ------------------------------------------------------------------ sampling

    @classmethod
    def sampler(cls, name: str) -> Sampler:
        if name not in cls.samplers:
            raise ValueError(f"{cls.__name__} has no sampler {name!r}; it has: {', '.join(sorted(cls.samplers))}")
        return cls.samplers[name]

    def check_labels(self, labels: Tensor | None) -> None:
        if labels is None:
            return
        if self.num_classes == 0:
            raise ValueError("this generator is unconditional; give no labels")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in 0..{self.num_classes - 1}; got {labels.min().item()}..{labels.max().item()}")

    def sampling_options(self, sampler: str, **given: Any) -> dict[str, Any]:
        """Every option of `sampler`, given values checked, the rest at the family's or sampler's default."""
        s = self.sampler(sampler)
        options = {o.name: o for o in (*COMMON_OPTIONS, *s.options)}
        unknown = [k for k in given if k not in options]
        if unknown:
            raise ValueError(f"sampler {sampler!r} takes no option {unknown[0]!r}; it takes "
                             f"{', '.join(sorted(options))}")
        defaults = {**self.sampling_defaults, **(getattr(self.config, "sampling", None) or {})}
        out = {}
        for name, opt in options.items():
            value = given.get(name)
            if value is None:
                value = defaults.get(name, opt.default)
            out[name] = opt.check(value)
        return out

    @torch.no_grad()
    def generate(self, labels: Tensor | None, *, sampler: str = "plain", generator: torch.Generator | None = None,
                 batch_size: int | None = None, **options: Any) -> tuple[Tokens, GenerationStats]:
        """Sample tokens for `labels` (a LongTensor of class ids, or None with `batch_size` for unconditional).

        Every random draw goes through `generator` (a fresh one seeded 0 when None is given).
        """
        self.check_labels(labels)
        if labels is None and batch_size is None:
            raise ValueError("unconditional generation needs batch_size")
        opts = self.sampling_options(sampler, **options)
        device = next(self.parameters()).device
        if generator is None:
            generator = torch.Generator(device).manual_seed(0)
        if labels is not None:
            labels = labels.to(device)
        stats = GenerationStats()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        was_training = self.training
        self.eval()
        try:
            tokens = self.sampler(sampler).fn(self, labels, generator=generator, stats=stats,
                                              batch_size=batch_size if labels is None else len(labels), **opts)
        finally:
            self.train(was_training)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            stats.peak_memory_mb = torch.cuda.max_memory_allocated(device) / 2**20
        stats.wall_time_s = time.perf_counter() - t0
        return tokens, stats


def register_sampler(family: type[GeneratorModel], name: str, *, options: tuple[SamplerOption, ...] = (),
                     help: str = "") -> Callable[[SamplerFn], SamplerFn]:
    """Decorator: register ``fn(model, labels, *, generator, stats, batch_size, cfg, temperature, top_k, top_p,
    **own_options) -> Tokens`` as `family`'s sampler `name`.

    The sampler counts every forward pass in ``stats.nfe`` (``stats.draft_nfe`` for a draft model) and, when
    speculative, appends the tokens accepted in each iteration to ``stats.accepted_per_iter``.
    """
    reserved = {o.name for o in COMMON_OPTIONS}
    clash = [o.name for o in options if o.name in reserved]
    if clash:
        raise ValueError(f"sampler option {clash[0]!r} is common to every sampler; do not redeclare it")

    def wrap(fn: SamplerFn) -> SamplerFn:
        if "samplers" not in family.__dict__:  # each family its own registry, not the base class's
            family.samplers = {}
        family.samplers[name] = Sampler(name, fn, tuple(options), help or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return wrap


def registered_samplers() -> dict[str, list[tuple[type[GeneratorModel], Sampler]]]:
    """Every sampler of every registered family, by sampler name (for --help)."""
    from vision.hub import registered_models

    out: dict[str, list[tuple[type[GeneratorModel], Sampler]]] = {}
    for cls in registered_models().values():
        if isinstance(cls, type) and issubclass(cls, GeneratorModel):
            for s in cls.samplers.values():
                out.setdefault(s.name, []).append((cls, s))
    return out



# ---------------------------------------------------------------- per-sample randomness in training losses


def per_sample_rand(batch: dict[str, Tensor], *shape: int, normal: bool = False, device=None) -> Tensor:
    """(B, *shape) uniform [0, 1) (or standard normal) draws, each row from its sample's own seed
    (``batch["seed"]``, put there by the token cache), so a loss draws the same numbers for a sample
    whichever process and micro-batch it lands in: N processes train exactly what one process trains.
    Without seeds (a batch not from the toolkit) the global RNG is used."""
    ref = next(v for v in batch.values() if isinstance(v, Tensor))
    device = device or ref.device
    seeds = batch.get("seed")
    if seeds is None:
        return (torch.randn if normal else torch.rand)(ref.shape[0], *shape, device=device)
    draw = torch.randn if normal else torch.rand
    rows = [draw(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds.tolist()]
    return torch.stack(rows).to(device) if rows else torch.empty(0, *shape, device=device)


# ---------------------------------------------------------------- presets (apps.train_generator --model NAME)

PresetFn = Callable[[TokenSpec, int, str], Any]
_PRESETS: dict[str, tuple[type[GeneratorModel], PresetFn, str]] = {}


def register_preset(name: str, family: type[GeneratorModel], make: PresetFn, help: str = "") -> None:
    """A named model size for `apps.train_generator --model NAME`: make(spec, num_classes, tokenizer) returns the
    family's config for a token cache with that spec, number of classes and tokenizer name."""
    if name in _PRESETS and _PRESETS[name][0] is not family:
        raise ValueError(f"generator preset {name!r} is already registered by {_PRESETS[name][0].__name__}")
    _PRESETS[name] = (family, make, help)


def presets() -> dict[str, tuple[type[GeneratorModel], PresetFn, str]]:
    from vision.hub import registered_models

    registered_models()  # importing the families registers their presets
    return dict(_PRESETS)


def build_preset(name: str, spec: TokenSpec, num_classes: int, tokenizer: str) -> GeneratorModel:
    known = presets()
    if name not in known:
        raise ValueError(f"unknown generator preset {name!r}; known: {', '.join(sorted(known)) or 'none'}")
    family, make, _ = known[name]
    return family(make(spec, num_classes, tokenizer))

"""The one token interface every tokenizer, generator and decoder speaks.

Data flows one way: pixels -> Tokenizer.encode -> Tokens -> Generator -> Tokens ->
Tokenizer.decode (or an implicit Decoder) -> pixels. Images at these boundaries are
float32 NCHW RGB in [-1, 1].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenSpec:
    """What a tokenizer emits / a generator produces.

    kind: "discrete" (ids) or "continuous" (latents).
    grid: token grid (h, w) at the native image size.
    downsample: pixels per token side.
    vocab_size: discrete only; codes per position (per group when groups > 1).
    groups: WeTok's group-wise quantization; a position carries `groups` sub-codes.
    channels: continuous only; latent channels.
    scales: VAR only; the side length of each scale (the last equals grid).
    """

    kind: Literal["discrete", "continuous"]
    grid: tuple[int, int]
    downsample: int
    vocab_size: int | None = None
    groups: int = 1
    channels: int | None = None
    scales: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("discrete", "continuous"):
            raise ValueError(f"TokenSpec.kind must be 'discrete' or 'continuous', got {self.kind!r}")
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f"TokenSpec.grid must be two positive ints, got {self.grid}")
        if self.downsample < 1:
            raise ValueError(f"TokenSpec.downsample must be >= 1, got {self.downsample}")
        if self.groups < 1:
            raise ValueError(f"TokenSpec.groups must be >= 1, got {self.groups}")
        if self.kind == "discrete" and (self.vocab_size is None or self.vocab_size < 2):
            raise ValueError("a discrete TokenSpec needs vocab_size >= 2")
        if self.kind == "continuous" and (self.channels is None or self.channels < 1):
            raise ValueError("a continuous TokenSpec needs channels >= 1")
        if self.scales is not None:
            object.__setattr__(self, "scales", tuple(int(s) for s in self.scales))
            if list(self.scales) != sorted(self.scales) or self.scales[-1] != self.grid[0]:
                raise ValueError(
                    f"TokenSpec.scales must increase and end at the grid side {self.grid[0]}, got {self.scales}"
                )

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.grid[0] * self.downsample, self.grid[1] * self.downsample)

    @property
    def num_positions(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass
class Tokens:
    """A batch of tokens with the spec that says how to read them.

    ids: (B, h, w) or, when spec.groups > 1, (B, groups, h, w); int64.
    latents: (B, C, h, w) float.
    scale_ids: VAR; one (B, s, s) int64 tensor per scale in spec.scales.
    Construction validates every tensor against the spec and raises ValueError naming the field.
    """

    spec: TokenSpec
    ids: Tensor | None = None
    latents: Tensor | None = None
    scale_ids: list[Tensor] | None = None

    def __post_init__(self) -> None:
        if self.ids is None and self.latents is None and self.scale_ids is None:
            raise ValueError("Tokens needs ids, latents or scale_ids")
        if self.ids is not None:
            self._check_ids("ids", self.ids, self.spec.grid)
        if self.scale_ids is not None:
            if self.spec.scales is None:
                raise ValueError("scale_ids given but the spec has no scales")
            if len(self.scale_ids) != len(self.spec.scales):
                raise ValueError(
                    f"scale_ids has {len(self.scale_ids)} scales, spec.scales has {len(self.spec.scales)}"
                )
            for k, (ids, s) in enumerate(zip(self.scale_ids, self.spec.scales)):
                self._check_ids(f"scale_ids[{k}]", ids, (s, s))
        if self.latents is not None:
            lat = self.latents
            if not torch.is_floating_point(lat):
                raise ValueError(f"latents must be floating point, got {lat.dtype}")
            if lat.ndim != 4:
                raise ValueError(f"latents must be (B, C, h, w), got shape {tuple(lat.shape)}")
            if self.spec.kind == "continuous" and lat.shape[1] != self.spec.channels:
                raise ValueError(f"latents have {lat.shape[1]} channels, spec says {self.spec.channels}")
            if tuple(lat.shape[-2:]) != self.spec.grid:
                raise ValueError(f"latents grid {tuple(lat.shape[-2:])} != spec grid {self.spec.grid}")
        if self.spec.kind == "continuous" and self.latents is None:
            raise ValueError("continuous Tokens need latents")
        if self.spec.kind == "discrete" and self.ids is None and self.scale_ids is None:
            raise ValueError("discrete Tokens need ids or scale_ids")
        sizes = {t.shape[0] for t in self._tensors()}
        if len(sizes) > 1:
            raise ValueError(f"batch sizes disagree across fields: {sorted(sizes)}")

    def _check_ids(self, name: str, ids: Tensor, grid: tuple[int, int]) -> None:
        spec = self.spec
        if spec.kind != "discrete":
            raise ValueError(f"{name} given but the spec is continuous")
        if ids.dtype != torch.int64:
            raise ValueError(f"{name} must be int64, got {ids.dtype}")
        expected = (spec.groups, *grid) if spec.groups > 1 else tuple(grid)
        if tuple(ids.shape[1:]) != expected or ids.ndim != len(expected) + 1:
            raise ValueError(f"{name} shape {tuple(ids.shape)} != (B, {', '.join(map(str, expected))}) from the spec")
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= spec.vocab_size:
                raise ValueError(f"{name} out of range [0, {spec.vocab_size}): min {lo}, max {hi}")

    def _tensors(self) -> list[Tensor]:
        out = [t for t in (self.ids, self.latents) if t is not None]
        return out + list(self.scale_ids or [])

    @property
    def batch_size(self) -> int:
        return self._tensors()[0].shape[0]

    def to(self, device: torch.device | str) -> "Tokens":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Tokens(
            self.spec,
            ids=move(self.ids),
            latents=move(self.latents),
            scale_ids=None if self.scale_ids is None else [t.to(device) for t in self.scale_ids],
        )


@dataclass
class GenerationStats:
    """What speed claims rest on: counted, not estimated.

    nfe: forward passes of the (target) model; draft_nfe: of the draft model.
    accepted_per_iter: tokens accepted in each iteration (speculative samplers).
    refiner_nfe: forward passes of a second model that takes over (CoDe's refiner; nfe counts the drafter's).
    per_model_time_s / per_model_peak_memory_mb: a two-model sampler's time and peak memory (CUDA only) by
    model role (e.g. "drafter", "refiner").
    residual_tries / rejected_tokens: target proposals drawn to resample rejected drafts, and how many drafts
    were rejected (CSpD's exact residual step).
    """

    nfe: int = 0
    draft_nfe: int = 0
    accepted_per_iter: list[int] = field(default_factory=list)
    wall_time_s: float = 0.0
    peak_memory_mb: float = 0.0
    refiner_nfe: int = 0
    per_model_time_s: dict[str, float] = field(default_factory=dict)
    per_model_peak_memory_mb: dict[str, float] = field(default_factory=dict)
    residual_tries: int = 0
    rejected_tokens: int = 0

    @property
    def mean_accepted(self) -> float:
        a = self.accepted_per_iter
        return sum(a) / len(a) if a else 0.0


@runtime_checkable
class Tokenizer(Protocol):
    spec: TokenSpec

    def encode(self, images: Tensor) -> Tokens: ...

    def decode(self, tokens: Tokens) -> Tensor: ...


@runtime_checkable
class DiscreteTokenizer(Tokenizer, Protocol):
    def ids_to_latents(self, ids: Tensor) -> Tensor: ...


@runtime_checkable
class Generator(Protocol):
    spec: TokenSpec

    def generate(
        self, labels: Tensor | None, *, sampler: str = "plain", generator: torch.Generator | None = None, **sampling
    ) -> tuple[Tokens, GenerationStats]: ...


@runtime_checkable
class Decoder(Protocol):
    """Implicit decoders render any output size, not just multiples of the downsample factor."""

    def decode(self, latents: Tensor, size: tuple[int, int]) -> Tensor: ...


def compatible(generator_spec: TokenSpec, tokenizer_spec: TokenSpec) -> bool:
    """A generator plugs into a tokenizer when they agree on what a token is."""
    g, t = generator_spec, tokenizer_spec
    return (g.kind, g.vocab_size, g.groups, g.channels, g.downsample) == (
        t.kind, t.vocab_size, t.groups, t.channels, t.downsample
    ) and (g.scales is None or t.scales is None or g.scales == t.scales)

"""MaskGIT (Chang et al. 2022, "MaskGIT: Masked Generative Image Transformer";
github.com/google-research/maskgit) on the U-ViT transformer that ReCAP evaluates with
(liebenxj/ReCAP, `examples/MaskGIT+ReCAP/models/uvit.py`, from AutoNAT/ImprovedNAT).

A bidirectional transformer over the token grid. The input is the class position followed by the
N grid tokens, where a masked token is the extra id `vocab_size` (the mask id). Embeddings:

* grid token: LayerNorm(token_embed[id] + pos_embed[position]) (eps 1e-6), then dropout;
* class: LayerNorm(class_embed[label] + class_pos_embed[0]); row `num_classes` of the class
  table is the null class that classifier-free guidance and class dropout use.

Blocks are pre-norm ViT blocks (LayerNorm, attention without qkv bias, GELU MLP), arranged as
U-ViT: `depth // 2` in-blocks, a mid block, `depth // 2` out-blocks, where out-block j first mixes
in the output of in-block depth//2 - 1 - j through a linear layer on their concatenation (the long
skips; `skip=False` drops them). The head is BERT's MLM layer tied to the token table:
LayerNorm(GELU(fc(x))) @ token_embed.T + bias, the table taken without gradient (as in the
official code), and the mask id's column dropped. Logits are float32.

Training (`loss`) follows MaskGIT: a ratio r ~ U(0, 1) per sample, ceil(N cos(pi/2 r)) tokens masked
at uniformly random positions, cross-entropy with label smoothing 0.1 on the masked positions only,
and the label replaced by the null class with probability `class_dropout` (for guidance).

ReCAP's interface (generators/recap.py): `forward_full` runs every position and writes each
layer's keys/values into fresh `vision.nn.KVCache`s; `forward_cheap` runs only the given grid
positions (and the class position) as queries through all layers, their fresh keys/values standing
in for the cached ones at those positions. The skips are per token, so they need no cache.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from generators.base import GeneratorModel, per_sample_rand, register_preset
from generators.sampling import MASKGIT_MIN_MASK_RATIO
from vision.hub import register_model
from vision.nn import MLP, Attention, KVCache
from vision.tokens import TokenSpec


@dataclass
class MaskGITConfig:
    tokenizer: str | None = None  # shipped tokenizer it speaks; None: an official import (tokenizer ships apart)
    num_classes: int = 1000  # real classes; the class table has one more row, the null class
    vocab_size: int = 1024  # codebook size; id vocab_size is the mask token
    grid: tuple[int, int] = (16, 16)
    downsample: int = 16  # pixels per token side of the tokenizer
    dim: int = 768
    depth: int = 24  # depth // 2 in-blocks + a mid block + depth // 2 out-blocks
    heads: int = 8
    mlp_ratio: float = 4.0
    skip: bool = True  # U-ViT's long skips
    embed_dropout: float = 0.1
    label_smoothing: float = 0.1  # MaskGIT's class-conditional config
    class_dropout: float = 0.1  # probability of training on the null class (needed for guidance)
    # this model's sampling defaults (--cfg, --choice-temperature); MaskGIT's are no guidance and 4.5
    default_cfg: float = 1.0
    default_choice_temperature: float = 4.5

    def __post_init__(self) -> None:
        self.grid = tuple(self.grid)
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.depth < 0 or self.depth % 2:
            raise ValueError(f"depth must be even (in- and out-blocks pair up), got {self.depth}")
        if not 0 <= self.class_dropout < 1 or not 0 <= self.label_smoothing < 1:
            raise ValueError("class_dropout and label_smoothing must lie in [0, 1)")


class Block(nn.Module):
    """Pre-norm ViT block; with `skip`, a linear layer first merges the long-skip input."""

    def __init__(self, c: MaskGITConfig, skip: bool = False) -> None:
        super().__init__()
        self.skip_proj = nn.Linear(2 * c.dim, c.dim) if skip else None
        self.attn_norm = nn.LayerNorm(c.dim)
        self.attn = Attention(c.dim, c.heads, qkv_bias=False, proj_bias=True)
        self.mlp_norm = nn.LayerNorm(c.dim)
        self.mlp = MLP(c.dim, int(c.dim * c.mlp_ratio))

    def forward(self, x: Tensor, skip: Tensor | None = None, cache: KVCache | None = None,
                positions: Tensor | None = None, update_cache: bool = True) -> Tensor:
        if self.skip_proj is not None:
            x = self.skip_proj(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.attn_norm(x), cache=cache, positions=positions, update_cache=update_cache)
        return x + self.mlp(self.mlp_norm(x))


class TiedHead(nn.Module):
    """BERT's MLM layer: LayerNorm(GELU(fc(x))) @ table.T + bias."""

    def __init__(self, dim: int, rows: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.bias = nn.Parameter(torch.zeros(rows))

    def forward(self, x: Tensor, table: Tensor) -> Tensor:
        return self.norm(F.gelu(self.fc(x))) @ table.t() + self.bias


@register_model("maskgit")
class MaskGIT(GeneratorModel):
    config_class = MaskGITConfig
    sampling_defaults = {"cfg": 1.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    # MaskGIT's class-conditional optimizer (maskgit_class_cond_config.py): AdamW 1e-4, betas (0.9, 0.96),
    # weight decay 0.045, 5000 warm-up steps
    training_defaults = {"lr": 1e-4, "weight_decay": 0.045, "betas": (0.9, 0.96), "warmup_steps": 5000,
                         "grad_clip": 1.0}

    def __init__(self, config: MaskGITConfig) -> None:
        super().__init__()
        self.config = c = config
        self.sampling_defaults = {**type(self).sampling_defaults, "cfg": c.default_cfg,
                                  "choice_temperature": c.default_choice_temperature}
        n = c.grid[0] * c.grid[1]
        self.token_embed = nn.Embedding(c.vocab_size + 1, c.dim)  # last row: the mask token
        self.pos_embed = nn.Embedding(n, c.dim)
        self.embed_norm = nn.LayerNorm(c.dim, eps=1e-6)
        self.embed_dropout = nn.Dropout(c.embed_dropout)
        self.class_embed = nn.Embedding(c.num_classes + 1, c.dim)  # last row: the null class
        self.class_pos_embed = nn.Embedding(1, c.dim)
        self.class_norm = nn.LayerNorm(c.dim, eps=1e-6)
        self.in_blocks = nn.ModuleList(Block(c) for _ in range(c.depth // 2))
        self.mid_block = Block(c)
        self.out_blocks = nn.ModuleList(Block(c, skip=c.skip) for _ in range(c.depth // 2))
        self.norm = nn.LayerNorm(c.dim)
        self.head = TiedHead(c.dim, c.vocab_size + 1)
        if not self.head.bias.is_meta:  # a model built on the meta device gets its weights from a file
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """U-ViT's init: truncated N(0, 0.02) linear weights, zero biases, unit LayerNorms, N(0, 0.02) tables."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    # ------------------------------------------------------------------ interface

    @property
    def spec(self) -> TokenSpec:
        c = self.config
        return TokenSpec(kind="discrete", grid=c.grid, downsample=c.downsample, vocab_size=c.vocab_size)

    @property
    def seq_len(self) -> int:
        return self.config.grid[0] * self.config.grid[1]

    @property
    def mask_id(self) -> int:
        return self.config.vocab_size

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    @property
    def blocks(self) -> list[Block]:
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    def new_caches(self) -> list[KVCache]:
        return [KVCache(capacity=self.seq_len + 1) for _ in self.blocks]

    def condition_labels(self, labels: Tensor | None, batch_size: int, guided: bool) -> Tensor:
        """The class ids of a sampling batch: the labels (the null class when None), followed by as many
        null classes when guided (the batch runs as [cond; uncond])."""
        null = torch.full((batch_size,), self.null_class, dtype=torch.long, device=self.class_embed.weight.device)
        labels = null if labels is None else labels
        return torch.cat([labels, null]) if guided else labels

    def sampling_options(self, sampler: str, **given):
        from generators.recap import check_recap_options, unmask_counts

        options = super().sampling_options(sampler, **given)
        if "mask_schedule" in options:  # an unknown schedule, or one that cannot fill these steps: one line
            unmask_counts(self.seq_len, options["steps"], options["mask_schedule"])
        if sampler == "recap":
            check_recap_options(options["steps"], options["pre_full_iters"], options["num_cache_iters"])
        return options

    # ------------------------------------------------------------------ forward

    def forward(self, ids: Tensor, labels: Tensor, *, positions: Tensor | None = None,
                caches: list[KVCache] | None = None, update_cache: bool = True) -> Tensor:
        """Logits (B, n, vocab_size), float32, for the grid tokens `ids` (B, n) (the mask id where masked).

        positions None: ids is the whole grid (n = N) in raster order; with caches (fresh ones) every
        layer's keys/values are written. positions (B, n): ids sit at those grid positions and only
        they (and the class position) are computed; with caches and update_cache=False they attend to
        the cached keys/values of every other position (ReCAP's cheap step).
        """
        B, n = ids.shape
        if positions is None:
            pos = self.pos_embed.weight[:n][None]
            attn_positions = None
        else:
            pos = self.pos_embed(positions)
            attn_positions = torch.cat([positions.new_zeros(B, 1), positions + 1], dim=1)  # 0: the class
        x = self.embed_dropout(self.embed_norm(self.token_embed(ids) + pos))
        cls = self.class_norm(self.class_embed(labels) + self.class_pos_embed.weight[0])
        x = torch.cat([cls[:, None], x], dim=1)
        caches = caches if caches is not None else [None] * (len(self.in_blocks) * 2 + 1)
        skips = []
        for i, block in enumerate(self.in_blocks):
            x = block(x, cache=caches[i], positions=attn_positions, update_cache=update_cache)
            skips.append(x)
        depth = len(self.in_blocks)
        x = self.mid_block(x, cache=caches[depth], positions=attn_positions, update_cache=update_cache)
        for j, block in enumerate(self.out_blocks):
            x = block(x, skip=skips.pop(), cache=caches[depth + 1 + j], positions=attn_positions,
                      update_cache=update_cache)
        logits = self.head(self.norm(x[:, 1:]), self.token_embed.weight.detach())
        return logits[..., : self.config.vocab_size].float()

    def forward_full(self, ids: Tensor, labels: Tensor, caches: list[KVCache]) -> Tensor:
        """Every position; each layer's keys/values (class position first) go into `caches`, which are reset."""
        for cache in caches:
            cache.reset()
        return self(ids, labels, caches=caches)

    def forward_cheap(self, positions: Tensor, ids: Tensor, labels: Tensor, caches: list[KVCache]) -> Tensor:
        """Only the grid `positions` (B, n) holding `ids` (B, n), and the class position, as queries; every
        other position's keys/values are read from `caches` (not modified)."""
        return self(ids, labels, positions=positions, caches=caches, update_cache=False)

    # ------------------------------------------------------------------ training

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Cross-entropy on the masked positions (see the module docstring). Every random draw comes from the
        sample's own seed: one call of per_sample_rand gives the ratio, the class dropout and the position
        scores (two calls would start from the same seed and draw the same first numbers)."""
        c = self.config
        ids = batch["ids"].flatten(1)
        B, N = ids.shape
        u = per_sample_rand(batch, N + 2, device=ids.device)
        ratio = torch.cos(math.pi / 2 * u[:, 0]).clamp(MASKGIT_MIN_MASK_RATIO, 1.0)
        num_masked = torch.ceil(ratio * N).clamp(1, N).long()
        rank = u[:, 2:].argsort(dim=1).argsort(dim=1)  # a uniformly random order of the positions
        masked = rank < num_masked[:, None]
        labels = batch.get("labels")
        null = torch.full((B,), self.null_class, dtype=torch.long, device=ids.device)
        labels = null if labels is None or c.num_classes == 0 else labels.to(ids.device)
        if self.training and c.class_dropout > 0:
            labels = torch.where(u[:, 1] < c.class_dropout, null, labels)
        logits = self(torch.where(masked, self.mask_id, ids), labels)
        ce = F.cross_entropy(logits[masked], ids[masked], label_smoothing=c.label_smoothing)
        accuracy = (logits[masked].argmax(-1) == ids[masked]).float().mean()
        return ce, {"ce": float(ce.detach()), "masked_accuracy": float(accuracy)}


# ---------------------------------------------------------------------- sizes


def _sized(dim: int, depth: int, heads: int, **extra):
    def make(spec: TokenSpec, num_classes: int, tokenizer: str) -> MaskGITConfig:
        if spec.kind != "discrete" or spec.groups != 1:
            raise ValueError(f"MaskGIT needs a grid of single discrete tokens, got {spec}")
        return MaskGITConfig(tokenizer=tokenizer, num_classes=num_classes, vocab_size=spec.vocab_size,
                             grid=tuple(spec.grid), downsample=spec.downsample, dim=dim, depth=depth,
                             heads=heads, **extra)
    return make


register_preset("maskgit-uvit", MaskGIT, _sized(768, 24, 8),
                "U-ViT MaskGIT as ReCAP evaluates it: width 768, 24 blocks + mid, 8 heads, long skips")
register_preset("maskgit-mnist", MaskGIT, _sized(128, 4, 4, default_cfg=1.5, default_choice_temperature=4.5),
                "small U-ViT MaskGIT for MNIST tokens: width 128, 4 blocks + mid, 4 heads, long skips; "
                "samples with cfg 1.5 and choice temperature 4.5 unless told otherwise")

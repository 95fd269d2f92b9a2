"""LlamaGen class-conditional GPT (Sun et al. 2024, "Autoregressive Model Beats Diffusion: Llama
for Scalable Image Generation"; github.com/FoundationVision/LlamaGen, `autoregressive/models/gpt.py`).

A decoder-only Llama over raster-ordered image tokens. Position 0 holds the class embedding
(row `num_classes` is the null class that classifier-free guidance and class dropout use);
position t+1 holds image token t, and the logits at position t predict token t. Each block is
pre-norm: x + attn(RMSNorm(x)), then + SwiGLU(RMSNorm(.)); attention is causal with LlamaGen's
2-D rotary embedding (the class position's rows are zero: see vision.nn.rotary). The output head
reads the final RMSNorm; logits are float32.

Inference runs on `vision.nn.KVCache`: `run(h, positions, caches)` embeds nothing and decodes the
given positions against the cache, each sample at its own absolute positions when `positions` is
(B, n) (speculative Jacobi decoding lets samples advance at different speeds).

Official checkpoints load through generators/ar/official.py; samplers live in plain.py and
speculative_jacobi.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from generators.base import GeneratorModel, per_sample_rand, register_preset
from vision.hub import register_model
from vision.nn import Attention, KVCache, RMSNorm, SwiGLU, rope_2d, swiglu_hidden_dim
from vision.tokens import TokenSpec


@dataclass
class LlamaGenConfig:
    tokenizer: str | None = None  # shipped tokenizer it speaks; None: an official import (tokenizer ships apart)
    num_classes: int = 1000
    vocab_size: int = 16384
    grid: int = 16  # token grid side; LlamaGen's block_size is grid**2 (16 at 256 px, 24 at 384 px)
    downsample: int = 16  # pixels per token side of the tokenizer
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    ffn_hidden: int | None = None  # None: LLaMA's rule, swiglu_hidden_dim(dim) (multiple of 256)
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    cls_token_num: int = 1  # condition positions; class-conditional LlamaGen uses exactly one
    class_dropout_prob: float = 0.1  # > 0 adds the null-class row (needed for CFG)
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    initializer_range: float = 0.02
    sampling: dict | None = None  # this model's own sampling defaults (cfg, temperature, top_k, top_p), if any

    def __post_init__(self) -> None:
        if self.cls_token_num != 1:
            raise ValueError("class-conditional LlamaGen has one condition position (cls_token_num=1)")
        if self.dim % self.n_head or (self.dim // self.n_head) % 4:
            raise ValueError(f"dim {self.dim} / n_head {self.n_head} must give a head_dim divisible by 4 (2-D RoPE)")


class Block(nn.Module):
    def __init__(self, c: LlamaGenConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(c.dim, eps=c.norm_eps)
        self.attn = Attention(c.dim, c.n_head, attn_dropout=c.attn_dropout_p, proj_dropout=c.resid_dropout_p)
        self.ffn_norm = RMSNorm(c.dim, eps=c.norm_eps)
        self.ffn = SwiGLU(c.dim, c.ffn_hidden or swiglu_hidden_dim(c.dim), dropout=c.ffn_dropout_p)

    def forward(self, x: Tensor, rope: Tensor, cache: KVCache | None = None, positions: Tensor | None = None,
                end: int | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), mask="causal", rope=rope, cache=cache, positions=positions,
                          positions_end=end)
        return x + self.ffn(self.ffn_norm(x))


@register_model("llamagen-gpt")
class LlamaGenGPT(GeneratorModel):
    config_class = LlamaGenConfig
    # LlamaGen's sample_c2i.py defaults (cfg 4, top-k 2000; README examples use top-k 1000)
    sampling_defaults = {"cfg": 4.0, "temperature": 1.0, "top_k": 2000, "top_p": 1.0}

    def __init__(self, config: LlamaGenConfig) -> None:
        super().__init__()
        self.config = c = config
        self.has_null_class = c.class_dropout_prob > 0 or c.num_classes == 0
        self.class_embed = nn.Embedding(c.num_classes + int(self.has_null_class), c.dim)
        self.token_embed = nn.Embedding(c.vocab_size, c.dim)
        self.token_dropout = nn.Dropout(c.token_dropout_p)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.dim, eps=c.norm_eps)
        self.head = nn.Linear(c.dim, c.vocab_size, bias=False)
        self.register_buffer("rope", self.rotary_table(), persistent=False)
        self.reset_parameters()

    def rotary_table(self) -> Tensor:
        """LlamaGen's 2-D rotary table for the class position and the grid (computed, never stored)."""
        c = self.config
        return rope_2d(c.grid, c.dim // c.n_head, c.rope_base, prefix=c.cls_token_num)

    def reset_parameters(self) -> None:
        """LlamaGen's init: N(0, 0.02) for linear and embedding weights, then a zero output head (so an
        untrained model predicts the uniform distribution)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.config.initializer_range)
        nn.init.zeros_(self.head.weight)

    # ------------------------------------------------------------------ interface

    @property
    def spec(self) -> TokenSpec:
        c = self.config
        return TokenSpec(kind="discrete", grid=(c.grid, c.grid), downsample=c.downsample, vocab_size=c.vocab_size)

    @property
    def seq_len(self) -> int:
        return self.config.grid ** 2

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def new_caches(self) -> list[KVCache]:
        return [KVCache(capacity=self.seq_len + 1) for _ in self.blocks]

    def condition_labels(self, labels: Tensor | None, batch_size: int, guided: bool) -> Tensor:
        """Class ids for position 0: the labels (or the null class), followed by as many null classes when
        guided (LlamaGen runs [cond; uncond] as one batch)."""
        device = self.class_embed.weight.device
        null = torch.full((batch_size,), self.null_class, dtype=torch.long, device=device)
        if labels is None:
            if not self.has_null_class:
                raise ValueError("this model has no null class: give labels")
            labels = null
        if guided:
            if not self.has_null_class:
                raise ValueError("classifier-free guidance needs a null class (a model trained with class dropout)")
            labels = torch.cat([labels, null])
        return labels

    # ------------------------------------------------------------------ forward

    def run(self, h: Tensor, positions: Tensor, caches: list[KVCache] | None = None, end: int | None = None) -> Tensor:
        """Logits (B, n, vocab), float32, for the embeddings h (B, n, dim) at absolute `positions`
        ((n,) or per sample (B, n); 0 is the class position). With caches, keys/values are written at
        those positions and every query attends to the cache by absolute position; `end` =
        max(positions) + 1 when the caller knows it (saves a device sync per layer). Without caches the
        positions must be 0..n-1."""
        rope = self.rope[positions.clamp(max=len(self.rope) - 1)]  # past the end: padding whose output is unused
        x = self.token_dropout(h)
        for i, block in enumerate(self.blocks):
            if caches is None:
                x = block(x, rope)
            else:
                x = block(x, rope, caches[i], positions, end)
        return self.head(self.norm(x)).float()

    def forward(self, labels: Tensor, ids: Tensor) -> Tensor:
        """Teacher forcing, no cache: logits (B, 1 + n, vocab) for [class, ids (B, n)]; [:, t] predicts token t."""
        h = torch.cat([self.class_embed(labels)[:, None], self.token_embed(ids)], dim=1)
        return self.run(h, torch.arange(h.shape[1], device=h.device))

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Next-token cross-entropy; labels are replaced by the null class with class_dropout_prob (LlamaGen's
        `token_drop`) while training, each sample from its own seed when the batch carries one."""
        ids = batch["ids"].flatten(1)
        labels = batch.get("labels")
        B = ids.shape[0]
        null = torch.full((B,), self.null_class, dtype=torch.long, device=ids.device)
        labels = null if labels is None or self.config.num_classes == 0 else labels.to(ids.device)
        if self.training and self.config.class_dropout_prob > 0:
            drop = per_sample_rand(batch, device=ids.device) < self.config.class_dropout_prob
            labels = torch.where(drop, null, labels)
        logits = self(labels, ids[:, :-1])
        ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
        return ce, {"ce": float(ce.detach())}


# ---------------------------------------------------------------------- sizes

# LlamaGen's class-conditional sizes (gpt.py GPT_models): n_layer, n_head, dim
OFFICIAL_SIZES = {"B": (12, 12, 768), "L": (24, 16, 1024), "XL": (36, 20, 1280), "XXL": (48, 24, 1536),
                  "XXXL": (48, 40, 2560), "1B": (22, 32, 2048), "3B": (24, 32, 3200), "7B": (32, 32, 4096)}


def _sized(n_layer: int, n_head: int, dim: int, **extra):
    def make(spec: TokenSpec, num_classes: int, tokenizer: str) -> LlamaGenConfig:
        if spec.kind != "discrete" or spec.groups != 1 or spec.grid[0] != spec.grid[1]:
            raise ValueError(f"LlamaGen needs a square grid of single discrete tokens, got {spec}")
        return LlamaGenConfig(tokenizer=tokenizer, num_classes=num_classes, vocab_size=spec.vocab_size,
                              grid=spec.grid[0], downsample=spec.downsample, dim=dim, n_layer=n_layer,
                              n_head=n_head, **extra)
    return make


for _name in ("B", "L", "XL", "XXL", "3B"):  # the released class-conditional sizes
    _layers, _heads, _dim = OFFICIAL_SIZES[_name]
    register_preset(f"llamagen-gpt-{_name.lower()}", LlamaGenGPT, _sized(_layers, _heads, _dim),
                    f"LlamaGen GPT-{_name}: {_layers} layers, {_heads} heads, width {_dim}")
register_preset("llamagen-gpt-mnist", LlamaGenGPT, _sized(4, 4, 128),
                "small LlamaGen GPT for MNIST tokens: 4 layers, 4 heads, width 128 (about 1 s a step of 64 on a CPU core)")

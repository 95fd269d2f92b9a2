"""MAR: masked autoregressive generation of continuous tokens with a per-token diffusion head (Li, Tian, Li,
Deng, He 2024, "Autoregressive Image Generation without Vector Quantization"; github.com/LTH14/mar,
`models/mar.py`, `models/diffloss.py`, `diffusion/`).

Tokens are the latents of a continuous tokenizer (B, C, h, w), already multiplied by its scale factor
(MAR's KL-16 latents times 0.2325), cut into patches of `patch_size` x `patch_size` latents: N = (h / p)
(w / p) tokens of C p^2 values.

* Encoder (a ViT over the known tokens only): z_proj (linear) of every token, `buffer_size` buffer
  positions in front holding the class embedding (or, for the null class of classifier-free guidance,
  the learned `fake_latent`), learned positions, LayerNorm (eps 1e-6); the masked tokens are dropped,
  then pre-norm ViT blocks (timm's: qkv with bias, GELU MLP) and a final LayerNorm.
* Decoder: a linear map to the decoder width, the mask token at every dropped position, learned
  positions, ViT blocks, LayerNorm; the buffer is cut off and `diffusion_pos_embed_learned` added: z
  (B, N, decoder_dim) conditions the diffusion head of each token.
* Diffusion head (`SimpleMLPAdaLN`): input projection of the noisy token, `diffloss_depth` residual MLP
  blocks with adaptive LayerNorm (shift, scale, gate) from timestep embedding + condition, DiT's final
  layer; it outputs the noise and the variance interpolation (generators/mar/diffusion.py).

Training (`loss`, the official `forward`): a random order per sample; a mask ratio from the truncated
normal on [mask_ratio_min, 1] centred at 1 with std 0.25 (official: one ratio per batch; here one per
sample, from the sample's own seed, so a run's randomness does not depend on how the batch is split
over processes); ceil(N ratio) tokens masked (the first ones of the order); the class replaced by the
null class with probability `label_drop_prob`; the diffusion loss (noise MSE + variational bound) of
the masked tokens, each repeated `diffusion_batch_mul` times with its own timestep and noise.

Sampling (plain.py): MAR's `sample_tokens`. Batches whose rows keep different numbers of tokens (the
speculative sampler's) run the encoder on the kept tokens padded to the longest row, with padded keys
masked out of attention; a batch with equal counts runs exactly as the official code does.

Dropout: `attn_dropout` / `proj_dropout` (official 0.1) are applied as timm's blocks do, except that
the MLP drops only after its second layer (timm also after the activation); the MNIST presets train
without dropout, so a 2-process run trains exactly what one process does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
import torch
from torch import Tensor, nn

from generators.base import GeneratorModel, per_sample_rand, register_preset
from generators.mar.diffusion import GaussianDiffusion
from vision.hub import register_model
from vision.nn import MLP, Attention, KVCache
from vision.tokens import TokenSpec


@dataclass
class MARConfig:
    tokenizer: str | None = None  # the shipped tokenizer it speaks; None: an official import (the VAE ships apart)
    num_classes: int = 1000
    grid: tuple[int, int] = (16, 16)  # the tokenizer's latent grid (h, w)
    downsample: int = 16  # pixels per latent (the VAE's stride)
    channels: int = 16  # latent channels (vae_embed_dim)
    patch_size: int = 1
    encoder_dim: int = 1024
    encoder_depth: int = 16
    encoder_heads: int = 16
    decoder_dim: int = 1024
    decoder_depth: int = 16
    decoder_heads: int = 16
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6  # LayerNorm eps of the ViT blocks and final norms (mar_base/large/huge: 1e-6)
    buffer_size: int = 64
    diffloss_depth: int = 3
    diffloss_width: int = 1024
    diffusion_batch_mul: int = 4
    mask_ratio_min: float = 0.7
    label_drop_prob: float = 0.1
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    sampling: dict | None = None  # this model's own sampling defaults (steps, diffusion_steps, cfg, ...), if any

    def __post_init__(self) -> None:
        self.grid = tuple(self.grid)
        if self.grid[0] % self.patch_size or self.grid[1] % self.patch_size:
            raise ValueError(f"the latent grid {self.grid} is not divisible by patch_size {self.patch_size}")
        for dim, heads, name in ((self.encoder_dim, self.encoder_heads, "encoder"),
                                 (self.decoder_dim, self.decoder_heads, "decoder")):
            if dim % heads:
                raise ValueError(f"{name}_dim {dim} is not divisible by {name}_heads {heads}")
        if not 0 < self.mask_ratio_min <= 1:
            raise ValueError(f"mask_ratio_min must lie in (0, 1], got {self.mask_ratio_min}")
        if not 0 <= self.label_drop_prob < 1:
            raise ValueError(f"label_drop_prob must lie in [0, 1), got {self.label_drop_prob}")
        if self.diffusion_batch_mul < 1 or self.buffer_size < 0:
            raise ValueError("diffusion_batch_mul must be >= 1 and buffer_size >= 0")


# ---------------------------------------------------------------------- ViT block (timm's layout)


class Block(nn.Module):
    """timm's pre-norm ViT block: x + attn(norm1(x)), then x + mlp(norm2(x)). Keys as timm's."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, eps: float, attn_dropout: float,
                 proj_dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qkv_bias=True, proj_bias=True, attn_dropout=attn_dropout,
                              proj_dropout=proj_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout=proj_dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None, cache: KVCache | None = None,
                update_cache: bool = True) -> Tensor:
        """cache (ReCAP, generators/mar/recap.py): x's keys/values are appended to it (update_cache) or, not
        written, follow the cached ones during this call only; x attends to all of them."""
        x = x + self.attn(self.norm1(x), mask=mask, cache=cache, update_cache=update_cache)
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------------- the diffusion head (SimpleMLPAdaLN)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_size, width), nn.SiLU(), nn.Linear(width, width))
        self.frequency_size = frequency_size

    def forward(self, t: Tensor) -> Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """MAR's diffusion MLP: (noisy token (M, C), timestep (M,), condition (M, z)) -> (M, 2C): noise, variance."""

    def __init__(self, in_channels: int, width: int, z_channels: int, depth: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_channels, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, 2 * in_channels)

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.res_blocks:  # DiT's zero-initialised modulation and output
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        x = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)


class DiffusionHead(nn.Module):
    """Holds the network under `net` (the official `DiffLoss`, whose keys are `diffloss.net.*`)."""

    def __init__(self, token_dim: int, z_channels: int, width: int, depth: int) -> None:
        super().__init__()
        self.net = SimpleMLPAdaLN(token_dim, width, z_channels, depth)


SPACINGS = ("even", "ddim")


@lru_cache(maxsize=16)
def diffusion_for(steps: int | str | None, spacing: str = "even") -> GaussianDiffusion:
    """The respaced diffusion (cached: its tables depend only on the steps and the spacing). "even" is MAR's
    (`timestep_respacing="100"`: the kept steps spread over 0 .. 999, t = 999 included); "ddim" is the official
    code's other spacing (`"ddim100"`: an integer stride from 0, so t = 999 is left out). See plain.py for when
    the second matters."""
    if spacing not in SPACINGS:
        raise ValueError(f"diffusion spacing must be one of {', '.join(SPACINGS)}; got {spacing!r}")
    if spacing == "ddim" and steps not in (None, ""):
        return GaussianDiffusion(f"ddim{int(steps)}")
    return GaussianDiffusion(steps)


# ---------------------------------------------------------------------- MAR


@register_model("mar")
class MAR(GeneratorModel):
    config_class = MARConfig
    sampling_defaults = {"cfg": 1.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "steps": 64,
                         "diffusion_steps": 100, "diffusion_spacing": "even", "cfg_schedule": "linear"}
    # MAR trains with AdamW (0.9, 0.95), weight decay 0.02, lr 8e-4 at batch 2048 (blr 1e-4 x bsz / 256),
    # gradient clipping 3.0, 100 warm-up epochs
    training_defaults = {"lr": 1e-4, "weight_decay": 0.02, "betas": (0.9, 0.95), "warmup_steps": 0,
                         "grad_clip": 3.0}

    def __init__(self, config: MARConfig) -> None:
        super().__init__()
        self.config = c = config
        p = c.patch_size
        self.seq_h, self.seq_w = c.grid[0] // p, c.grid[1] // p
        self.seq_len = self.seq_h * self.seq_w
        self.token_dim = c.channels * p * p
        n_pos = self.seq_len + c.buffer_size
        self.class_emb = nn.Embedding(c.num_classes, c.encoder_dim)
        self.fake_latent = nn.Parameter(torch.zeros(1, c.encoder_dim))
        self.z_proj = nn.Linear(self.token_dim, c.encoder_dim)
        self.z_proj_ln = nn.LayerNorm(c.encoder_dim, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n_pos, c.encoder_dim))
        self.encoder_blocks = nn.ModuleList(
            Block(c.encoder_dim, c.encoder_heads, c.mlp_ratio, c.norm_eps, c.attn_dropout, c.proj_dropout)
            for _ in range(c.encoder_depth))
        self.encoder_norm = nn.LayerNorm(c.encoder_dim, eps=c.norm_eps)
        self.decoder_embed = nn.Linear(c.encoder_dim, c.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n_pos, c.decoder_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(c.decoder_dim, c.decoder_heads, c.mlp_ratio, c.norm_eps, c.attn_dropout, c.proj_dropout)
            for _ in range(c.decoder_depth))
        self.decoder_norm = nn.LayerNorm(c.decoder_dim, eps=c.norm_eps)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, c.decoder_dim))
        self.diffloss = DiffusionHead(self.token_dim, c.decoder_dim, c.diffloss_width, c.diffloss_depth)
        self.sampling_defaults = {**type(self).sampling_defaults, **(c.sampling or {})}
        if not self.fake_latent.is_meta:  # a model built on the meta device gets its weights from a file
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAR's init: N(0, 0.02) embeddings and learned positions, xavier-uniform linear layers with zero bias,
        unit LayerNorms; the diffusion MLP its own (DiT's zero-initialised modulation and output)."""
        for prm in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                    self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(prm, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.diffloss.net.reset_parameters()

    # ------------------------------------------------------------------ interface

    @property
    def spec(self) -> TokenSpec:
        c = self.config
        return TokenSpec(kind="continuous", grid=c.grid, downsample=c.downsample, channels=c.channels)

    @property
    def head(self) -> SimpleMLPAdaLN:
        return self.diffloss.net

    def train_diffusion(self) -> GaussianDiffusion:
        return diffusion_for(None)

    def sampling_options(self, sampler: str, **given):
        options = super().sampling_options(sampler, **given)
        if options["top_k"] != 0 or options["top_p"] != 1.0:
            raise ValueError("MAR samples continuous tokens: top-k / top-p do not apply (leave them at 0 / 1)")
        if sampler == "recap":
            from generators.mar.recap import check_options

            check_options(options)
        return options

    def patchify(self, latents: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, N, C p p), the official layout (channel-major within a patch)."""
        B, C, H, W = latents.shape
        p = self.config.patch_size
        x = latents.reshape(B, C, H // p, p, W // p, p)
        return torch.einsum("nchpwq->nhwcpq", x).reshape(B, (H // p) * (W // p), C * p * p)

    def unpatchify(self, x: Tensor) -> Tensor:
        B = x.shape[0]
        p, C = self.config.patch_size, self.config.channels
        x = x.reshape(B, self.seq_h, self.seq_w, C, p, p)
        return torch.einsum("nhwcpq->nchpwq", x).reshape(B, C, self.seq_h * p, self.seq_w * p)

    def class_embedding(self, labels: Tensor | None, batch_size: int, guided: bool) -> Tensor:
        """Rows [labels' classes (the null class when None); the null class again when guided]."""
        null = self.fake_latent.expand(batch_size, -1)
        cond = null if labels is None else self.class_emb(labels)
        return torch.cat([cond, null]) if guided else cond

    # ------------------------------------------------------------------ forward

    def forward(self, tokens: Tensor, visible: Tensor, class_embedding: Tensor) -> Tensor:
        """The diffusion conditions z (R, N, decoder_dim) for tokens (R, N, D) of which `visible` (R, N) are
        known (the others are masked and ignored); class_embedding (R, encoder_dim)."""
        c = self.config
        R, N, _ = tokens.shape
        buf = c.buffer_size
        x = self.z_proj(tokens)
        x = torch.cat([class_embedding[:, None].expand(R, buf, -1).to(x.dtype), x], dim=1)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
        keep = torch.cat([visible.new_ones(R, buf), visible.bool()], dim=1)
        counts = keep.sum(dim=1)
        width = int(counts.max()) if R else 0
        equal = R == 0 or bool((counts == width).all())
        if equal:  # the official path: drop the masked tokens
            x = x[keep].reshape(R, width, -1)
            attn_mask = None
        else:  # rows keep different numbers of tokens: pad to the longest, mask padded keys out
            index = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]  # kept first, in order
            x = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
            valid = torch.arange(width, device=x.device) < counts[:, None]
            attn_mask = valid[:, None, None, :]
        for block in self.encoder_blocks:
            x = block(x, attn_mask)
        x = self.decoder_embed(self.encoder_norm(x))
        full = self.mask_token.to(x.dtype).expand(R, N + buf, -1).clone()
        if equal:
            full[keep] = x.reshape(-1, x.shape[-1])
        else:
            rows = torch.arange(R, device=x.device)[:, None].expand(-1, width)
            full[rows[valid], index[valid]] = x[valid]
        x = full + self.decoder_pos_embed_learned
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        return x[:, buf:] + self.diffusion_pos_embed_learned

    # ------------------------------------------------------------------ ReCAP (generators/mar/recap.py)

    def forward_full(self, tokens: Tensor, visible: Tensor, class_embedding: Tensor,
                     group: Tensor) -> tuple[Tensor, "MARCache"]:
        """`forward` (every row keeping as many tokens), plus the context a cheap step reads: each encoder
        layer's keys/values of the known tokens (not the buffer, which every cheap step recomputes) and each
        decoder layer's keys/values of the positions outside `group` (R, N), the ones the cheap steps feed."""
        c = self.config
        R, N, _ = tokens.shape
        buf = c.buffer_size
        keep = torch.cat([visible.new_ones(R, buf), visible.bool()], dim=1)
        width = _equal_count(keep, "known tokens")
        x = self.z_proj(tokens)
        x = torch.cat([class_embedding[:, None].expand(R, buf, -1).to(x.dtype), x], dim=1)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)[keep].reshape(R, width, -1)
        encoder = [KVCache() for _ in self.encoder_blocks]
        for block, cache in zip(self.encoder_blocks, encoder):
            x = block(x, cache=cache)
        x = self.decoder_embed(self.encoder_norm(x))
        full = self.mask_token.to(x.dtype).expand(R, N + buf, -1).clone()
        full[keep] = x.reshape(-1, x.shape[-1])
        x = full + self.decoder_pos_embed_learned
        decoder = [KVCache() for _ in self.decoder_blocks]
        for block, cache in zip(self.decoder_blocks, decoder):
            x = block(x, cache=cache)
        z = self.decoder_norm(x)[:, buf:] + self.diffusion_pos_embed_learned
        known = keep.new_ones(R, width)  # the encoder ran on the buffer and the known tokens only
        known[:, :buf] = False
        outside = torch.cat([keep.new_zeros(R, buf), ~group.bool()], dim=1)
        return z, MARCache([_select(k, known) for k in encoder], [_select(k, outside) for k in decoder])

    def forward_cheap(self, tokens: Tensor, visible: Tensor, positions: Tensor, class_embedding: Tensor,
                      cache: "MARCache") -> Tensor:
        """z (R, n, decoder_dim) of the group's positions (R, n) holding `tokens` (R, n, D), of which `visible`
        are decoded: the buffer and those tokens run through the encoder, the buffer and all n positions through
        the decoder, as the only queries; every other position's keys/values are read from `cache` (unchanged)."""
        c = self.config
        R, n, _ = tokens.shape
        buf = c.buffer_size
        index = torch.cat([torch.arange(buf, device=positions.device).expand(R, buf), positions + buf], dim=1)
        keep = torch.cat([visible.new_ones(R, buf), visible.bool()], dim=1)
        width = _equal_count(keep, "decoded tokens")
        x = self.z_proj(tokens)
        x = torch.cat([class_embedding[:, None].expand(R, buf, -1).to(x.dtype), x], dim=1)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned[0, index])[keep].reshape(R, width, -1)
        for block, kv in zip(self.encoder_blocks, cache.encoder):
            x = block(x, cache=kv, update_cache=False)
        x = self.decoder_embed(self.encoder_norm(x))
        full = self.mask_token.to(x.dtype).expand(R, n + buf, -1).clone()
        full[keep] = x.reshape(-1, x.shape[-1])
        x = full + self.decoder_pos_embed_learned[0, index]
        for block, kv in zip(self.decoder_blocks, cache.decoder):
            x = block(x, cache=kv, update_cache=False)
        return self.decoder_norm(x)[:, buf:] + self.diffusion_pos_embed_learned[0, positions]

    # ------------------------------------------------------------------ training

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """The diffusion loss of the masked tokens (see the module docstring). One call of per_sample_rand gives
        every random number of a sample: class dropout, mask ratio, order, timesteps and (Box-Muller) noise."""
        c = self.config
        x = self.patchify(batch["latents"].to(self.z_proj.weight.dtype))
        B, N, D = x.shape
        mul = c.diffusion_batch_mul
        n_noise = mul * N * D
        n_box = 2 * ((n_noise + 1) // 2)
        u = per_sample_rand(batch, 2 + N + mul * N + n_box, device=x.device).double()
        ratio = truncated_normal_mask_ratio(u[:, 1], c.mask_ratio_min)
        num_masked = torch.ceil(N * ratio).long().clamp(1, N)
        rank = u[:, 2:2 + N].argsort(dim=1).argsort(dim=1)
        mask = rank < num_masked[:, None]  # (B, N): the first num_masked of each sample's order
        labels = batch.get("labels")
        if labels is None or c.num_classes == 0:
            cls = self.fake_latent.expand(B, -1)
        else:
            cls = self.class_emb(labels.to(x.device))
            if self.training and c.label_drop_prob > 0:
                drop = (u[:, 0] < c.label_drop_prob)[:, None].to(cls.dtype)
                cls = drop * self.fake_latent + (1 - drop) * cls
        z = self(x, ~mask, cls)
        off = 2 + N
        diffusion = self.train_diffusion()
        t = (u[:, off:off + mul * N] * diffusion.num_timesteps).long().clamp(max=diffusion.num_timesteps - 1)
        u1, u2 = u[:, off + mul * N:].chunk(2, dim=1)
        radius = torch.sqrt(-2.0 * torch.log1p(-u1))
        noise = torch.cat([radius * torch.cos(2 * math.pi * u2), radius * torch.sin(2 * math.pi * u2)], dim=1)
        noise = noise[:, :n_noise].to(x.dtype)
        # rows laid out as the official `repeat(diffusion_batch_mul, 1)`: copy k of sample b, token n at k B N + b N + n
        target = x.reshape(B * N, D).repeat(mul, 1)
        cond = z.reshape(B * N, -1).repeat(mul, 1)
        weight = mask.reshape(B * N).repeat(mul).to(x.dtype)
        t = t.view(B, mul, N).transpose(0, 1).reshape(-1)
        noise = noise.view(B, mul, N, D).transpose(0, 1).reshape(-1, D)
        terms = diffusion.training_losses(self.head, target, t, cond, noise)
        loss = (terms["loss"] * weight).sum() / weight.sum()
        with torch.no_grad():
            mse = float((terms["mse"] * weight).sum() / weight.sum())
            vb = float((terms["vb"] * weight).sum() / weight.sum())
        return loss, {"mse": mse, "vb": vb, "mask_ratio": float(ratio.mean()), "masked_tokens": float(mask.sum())}


@dataclass
class MARCache:
    """ReCAP's context for the cheap steps of one group: per encoder layer the keys/values of the tokens known at
    the full step, per decoder layer those of every position outside the group (buffer left out of both)."""

    encoder: list[KVCache]
    decoder: list[KVCache]


def _equal_count(keep: Tensor, what: str) -> int:
    counts = keep.sum(dim=1)
    width = int(counts[0]) if len(counts) else 0
    if len(counts) and not bool((counts == width).all()):
        raise ValueError(f"ReCAP needs every row to hold as many {what}")
    return width


def _select(cache: KVCache, keep: Tensor) -> KVCache:
    """A new cache holding the entries of `cache` where keep (R, L) is True (as many in every row, in order)."""
    k, v = cache.read()
    R, H, _, Dh = k.shape
    n = _equal_count(keep, "cached positions")
    out = KVCache()
    if n:
        out.append(*(t.transpose(1, 2)[keep].reshape(R, n, H, Dh).transpose(1, 2) for t in (k, v)))
    return out


def truncated_normal_mask_ratio(u: Tensor, minimum: float, std: float = 0.25) -> Tensor:
    """The inverse CDF of N(1, std^2) truncated to [minimum, 1] at u in [0, 1) (MAR's scipy truncnorm)."""
    u = u.double()
    lo = torch.special.ndtr(torch.tensor((minimum - 1.0) / std, dtype=torch.float64, device=u.device))
    hi = torch.special.ndtr(torch.tensor(0.0, dtype=torch.float64, device=u.device))
    ratio = 1.0 + std * torch.special.ndtri(lo + u * (hi - lo))
    return ratio.clamp(minimum, 1.0)


# ---------------------------------------------------------------------- sizes


def _sized(enc_dim: int, enc_depth: int, dec_dim: int, dec_depth: int, heads: int, diff_width: int,
           diff_depth: int, **extra):
    def make(spec: TokenSpec, num_classes: int, tokenizer: str) -> MARConfig:
        if spec.kind != "continuous":
            raise ValueError(f"MAR generates continuous tokens; the cache holds {spec.kind} ones")
        return MARConfig(tokenizer=tokenizer, num_classes=num_classes, grid=tuple(spec.grid),
                         downsample=spec.downsample, channels=spec.channels, encoder_dim=enc_dim,
                         encoder_depth=enc_depth, encoder_heads=heads, decoder_dim=dec_dim, decoder_depth=dec_depth,
                         decoder_heads=heads, diffloss_width=diff_width, diffloss_depth=diff_depth, **extra)
    return make


# MNIST latents (kl-mnist: 8x8 grid, 4 channels, patch 1 -> 64 tokens of 4 values). No dropout (DDP == one process),
# a small buffer, one diffusion copy per token (MAR uses 4; 1 keeps a CPU step cheap), sampling defaults for digits.
_MNIST = dict(buffer_size=8, attn_dropout=0.0, proj_dropout=0.0, diffusion_batch_mul=1,
              sampling={"steps": 16, "diffusion_steps": 25, "diffusion_spacing": "ddim", "cfg": 2.0, "temperature": 1.0,
                        "cfg_schedule": "linear"})

register_preset("mar-base", MAR, _sized(768, 12, 768, 12, 12, 1024, 6),
                "MAR-B (12+12 blocks, width 768, 12 heads; DiffLoss MLP 6 x 1024) for any continuous tokens")
register_preset("mar-mnist", MAR, _sized(128, 2, 128, 2, 4, 192, 3, **_MNIST),
                "target MAR for kl-mnist latents: 2+2 blocks of width 128, 4 heads; diffusion MLP 3 x 192")
register_preset("mar-mnist-small", MAR, _sized(64, 1, 64, 1, 4, 96, 2, **_MNIST),
                "draft MAR for kl-mnist latents: 1+1 blocks of width 64, 4 heads; diffusion MLP 2 x 96")

"""VAR transformer: next-scale prediction (Tian et al., NeurIPS 2024, "Visual Autoregressive Modeling:
Scalable Image Generation via Next-Scale Prediction"; github.com/FoundationVision/VAR, `models/var.py`,
`models/basic_var.py`, the loss of `trainer.py`).

The token maps of a multi-scale VQVAE (sides `patch_nums`, e.g. 1, 2, 3, 4, 5, 6, 8, 10, 13, 16) form
one sequence of L = sum(pn^2) positions. The first `pn0^2` positions hold the class embedding plus
`pos_start`; the positions of scale k >= 1 hold `word_embed` of the VQVAE's next-scale input for
scale k (the accumulated residual sum f_hat of scales 0..k-1, area-resized to pn_k: the tokenizer's
`scales_to_var_input` / `next_autoregressive_input`). Every position also gets a level embedding
(`lvl_embed`, one row per scale) and an absolute position embedding (`pos_1LC`). The logits at the
positions of scale k predict the token map of scale k, all at once.

Each block is AdaLN-modulated (the class embedding, through SiLU and a linear layer, gives six
vectors: gamma1, gamma2, scale1, scale2, shift1, shift2):
x += gamma1 * attn(LN(x) * (1 + scale1) + shift1); x += gamma2 * ffn(LN(x) * (1 + scale2) + shift2),
with LN without affine parameters, GELU(tanh) in the FFN, and attention with L2-normalised queries
and keys times a learned per-head scale exp(min(s, log 100)) (initialised at log 4), query and value
biases and a zero key bias (vision.nn.Attention's VAR variant). Training attends block-causally (a
position sees its own scale and every earlier one); inference runs one scale per pass on
`vision.nn.KVCache`, which gives the same logits. The head reads a final AdaLN (scale, shift) of the
class embedding; logits are float32.

Row `num_classes` of the class table is the null class: class dropout in training (`cond_drop_rate`,
each sample's draw from its own seed) and the unconditional half of classifier-free guidance.

The samplers (plain.py, and CoDe in collaborative.py) build on the pieces here: `first_input`,
`scale_input`, `run` (with or without caches, with or without the block-causal mask). The model reaches
its VQVAE through `self.tokenizer` (bound by the pipeline; not part of the state dict). Official
checkpoints load through official.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from generators.base import GeneratorModel, per_sample_rand, register_preset
from vision.errors import ConfigError
from vision.hub import register_model
from vision.nn import MLP, AdaLNModulation, Attention, KVCache, block_causal_mask, modulate
from vision.tokens import TokenSpec

OFFICIAL_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


@dataclass
class VARConfig:
    tokenizer: str | None = None  # the VQVAE it speaks; None: an official import (the VAE ships apart)
    num_classes: int = 1000  # the class table has one more row, the null class
    vocab_size: int = 4096  # V of the VQVAE
    cvae: int = 32  # the VQVAE's code width (Cvae, its z_channels)
    patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS
    downsample: int = 16  # pixels per token side of the VQVAE
    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # official training: 0.1 * depth / 24 (inference ignores it)
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = True
    cond_drop_rate: float = 0.1
    label_smooth: float = 0.0  # trainer.py's `ls`
    # official init_weights (build_vae_var's arguments): init_std < 0 means sqrt(1 / (3 C))
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5
    init_head: float = 0.02
    init_std: float = -1.0
    sampling: dict | None = None  # this model's own sampling defaults (cfg, temperature, top_k, top_p)

    def __post_init__(self) -> None:
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        if len(self.patch_nums) < 2 or list(self.patch_nums) != sorted(set(self.patch_nums)) or self.patch_nums[0] < 1:
            raise ConfigError(f"patch_nums must be at least two increasing sides, got {self.patch_nums}")
        for name in ("num_classes", "vocab_size", "cvae", "depth", "downsample", "embed_dim", "num_heads"):
            if getattr(self, name) < (0 if name == "num_classes" else 1):
                raise ConfigError(f"VARConfig.{name} must be {'>= 0' if name == 'num_classes' else '>= 1'}, "
                                  f"got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        for name in ("cond_drop_rate", "label_smooth", "drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"VARConfig.{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"VARConfig.mlp_ratio must be > 0, got {self.mlp_ratio}")


def drop_path(x: Tensor, p: float, training: bool, u: Tensor | None = None) -> Tensor:
    """Stochastic depth (timm's drop_path, as basic_var uses it): drop a sample's branch with probability p and
    scale the kept ones by 1 / (1 - p). `u` (B,): the samples' uniform draws (per-sample seeds); None: drawn
    from the global RNG."""
    if p == 0.0 or not training:
        return x
    if u is None:
        u = torch.rand(x.shape[0], device=x.device)
    keep = (u.to(x.device) >= p).to(x.dtype) / (1 - p)
    return x * keep.view(-1, *(1,) * (x.ndim - 1))


class AdaLNSelfAttn(nn.Module):
    """One VAR block (basic_var.AdaLNSelfAttn)."""

    def __init__(self, c: VARConfig, drop_path_p: float) -> None:
        super().__init__()
        C = c.embed_dim
        self.C, self.shared_aln, self.drop_path_p = C, c.shared_aln, drop_path_p
        head_dim = C // c.num_heads
        self.attn = Attention(C, c.num_heads, qv_bias=True, proj_bias=True,
                              qk_norm="l2" if c.attn_l2_norm else None,
                              scale=None if c.attn_l2_norm else 0.25 / math.sqrt(head_dim),
                              attn_dropout=c.attn_drop_rate, proj_dropout=c.drop_rate)
        self.ffn = MLP(C, round(C * c.mlp_ratio), approximate="tanh", dropout=c.drop_rate)
        self.ln_wo_grad = nn.LayerNorm(C, eps=c.norm_eps, elementwise_affine=False)
        if c.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C ** 0.5)
        else:
            self.adaln = AdaLNModulation(C, C, 6)

    def forward(self, x: Tensor, cond: Tensor, mask: Tensor | None = None, cache: KVCache | None = None,
                drop_u: Tensor | None = None) -> Tensor:
        """x (B, l, C); cond: the class embedding (B, C), or with shared AdaLN the shared (B, 1, 6, C); drop_u
        (B, 2): the samples' uniform draws for stochastic depth of the two branches (training only)."""
        u1, u2 = (None, None) if drop_u is None else drop_u.unbind(1)
        if self.shared_aln:
            gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + cond).unbind(2)
        else:
            gamma1, gamma2, scale1, scale2, shift1, shift2 = self.adaln(cond)
        h = self.attn(modulate(self.ln_wo_grad(x), scale1, shift1), mask=mask, cache=cache)
        x = x + drop_path(h * gamma1, self.drop_path_p, self.training, u1)
        h = self.ffn(modulate(self.ln_wo_grad(x), scale2, shift2))
        return x + drop_path(h * gamma2, self.drop_path_p, self.training, u2)


@register_model("var")
class VAR(GeneratorModel):
    config_class = VARConfig
    needs_tokenizer = True
    # the official FID evaluation (README / demo: cfg 1.5, top_p 0.96, top_k 900, more_smooth off).
    # VAR's cfg is its own ratio: t = cfg * k / (K - 1) at scale k, logits (1 + t) cond - t uncond; 0 = no guidance.
    sampling_defaults = {"cfg": 1.5, "temperature": 1.0, "top_k": 900, "top_p": 0.96}
    # official: AdamW betas (0.9, 0.95), wd 0.05, base lr 1e-4 per 256 samples, grad clip 2
    training_defaults = {"lr": 1e-4, "weight_decay": 0.05, "betas": (0.9, 0.95), "warmup_steps": 0, "grad_clip": 2.0}

    def __init__(self, config: VARConfig) -> None:
        super().__init__()
        self.config = c = config
        C = c.embed_dim
        self.patch_nums = c.patch_nums
        self.L = sum(pn * pn for pn in c.patch_nums)
        self.first_l = c.patch_nums[0] ** 2
        self.begin_ends = []
        cur = 0
        for pn in c.patch_nums:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn

        self.word_embed = nn.Linear(c.cvae, C)
        self.class_emb = nn.Embedding(c.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, self.L, C))
        self.lvl_embed = nn.Embedding(len(c.patch_nums), C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C)) if c.shared_aln else None
        rates = torch.linspace(0, c.drop_path_rate, c.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(AdaLNSelfAttn(c, rates[i]) for i in range(c.depth))
        self.head_nm = AdaLNModulation(C, C, 2)  # AdaLNBeforeHead: (scale, shift) of the class embedding
        self.head_ln = nn.LayerNorm(C, eps=c.norm_eps, elementwise_affine=False)
        self.head = nn.Linear(C, c.vocab_size)
        # computed, never stored (the official files hold them; the importer checks they agree); on the CPU even
        # when the model is built on the meta device
        levels = torch.cat([torch.full((pn * pn,), i, dtype=torch.long, device="cpu")
                            for i, pn in enumerate(c.patch_nums)])
        self.register_buffer("lvl_1L", levels[None], persistent=False)
        self.register_buffer("attn_mask", block_causal_mask([pn * pn for pn in c.patch_nums], device="cpu"),
                             persistent=False)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ------------------------------------------------------------------ initialisation

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official constructor's and `init_weights`' initialisation (build_vae_var's arguments)."""
        c, C = self.config, self.config.embed_dim
        std0 = math.sqrt(1 / C / 3)  # the constructor's init_std for the embeddings and positions
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, mean=0, std=std0)
        std = std0 if c.init_std < 0 else c.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.zero_()
        if c.init_head >= 0:
            self.head.weight.mul_(c.init_head)
            self.head.bias.zero_()
        lin = self.head_nm.ada_lin[-1]
        lin.weight.mul_(c.init_adaln)
        lin.bias.zero_()
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * c.depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * c.depth))
            if c.shared_aln:
                block.ada_gss[:, :, 2:].mul_(c.init_adaln)
                block.ada_gss[:, :, :2].mul_(c.init_adaln_gamma)
            else:
                lin = block.adaln.ada_lin[-1]
                lin.weight[2 * C:].mul_(c.init_adaln)
                lin.weight[:2 * C].mul_(c.init_adaln_gamma)
                lin.bias.zero_()
            block.attn.q_bias.zero_()
            block.attn.v_bias.zero_()
            if c.attn_l2_norm:
                block.attn.log_head_scale.fill_(math.log(4.0))

    # ------------------------------------------------------------------ interface

    @property
    def spec(self) -> TokenSpec:
        c = self.config
        side = c.patch_nums[-1]
        return TokenSpec(kind="discrete", grid=(side, side), downsample=c.downsample, vocab_size=c.vocab_size,
                         scales=c.patch_nums)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def new_caches(self, scales: int | None = None) -> list[KVCache]:
        """One KV cache per block, sized for the positions of the first `scales` scales (default: all)."""
        capacity = self.L if scales is None else self.begin_ends[scales - 1][1]
        return [KVCache(capacity=capacity) for _ in self.blocks]

    # ------------------------------------------------------------------ inputs

    def level_positions(self) -> Tensor:
        """lvl_embed(lvl_1L) + pos_1LC: (1, L, C)."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def first_input(self, cond_BD: Tensor, lvl_pos: Tensor | None = None) -> Tensor:
        """The positions of scale 0: class embedding + pos_start + level/position embedding, (B, pn0^2, C)."""
        lvl_pos = self.level_positions() if lvl_pos is None else lvl_pos
        sos = cond_BD[:, None].expand(-1, self.first_l, -1) + self.pos_start
        return sos + lvl_pos[:, : self.first_l]

    def scale_input(self, x_BlCv: Tensor, start: int, lvl_pos: Tensor | None = None) -> Tensor:
        """word_embed of next-scale inputs (B, l, Cvae) at sequence positions start..start+l-1, plus their
        level/position embedding."""
        lvl_pos = self.level_positions() if lvl_pos is None else lvl_pos
        return self.word_embed(x_BlCv.float()) + lvl_pos[:, start: start + x_BlCv.shape[1]]

    def block_condition(self, cond_BD: Tensor) -> Tensor:
        """What the blocks are modulated by: the class embedding, or with shared AdaLN its shared projection."""
        if self.shared_ada_lin is None:
            return cond_BD
        return self.shared_ada_lin(cond_BD).view(-1, 1, 6, self.config.embed_dim)

    # ------------------------------------------------------------------ forward

    def run(self, x: Tensor, cond_BD: Tensor, *, mask: Tensor | None = None,
            caches: list[KVCache] | None = None, drop_u: Tensor | None = None, last: int | None = None) -> Tensor:
        """Logits (B, l, V), float32, of the embedded positions x (B, l, C) for class embeddings cond_BD (B, C).

        With caches, x's keys/values are appended to them and x attends to everything cached (an inference step
        for one scale: mask None; or the block-causal prefill of several scales: mask the block-causal (l, l)).
        `last`: the logits of the last `last` positions only (a prefill needs those of its last scale).
        """
        cond = self.block_condition(cond_BD)
        for i, block in enumerate(self.blocks):
            x = block(x, cond, mask, None if caches is None else caches[i], None if drop_u is None else drop_u[:, i])
        if last is not None:
            x = x[:, x.shape[1] - last:]
        scale, shift = self.head_nm(cond_BD)
        return self.head(modulate(self.head_ln(x.float()), scale, shift).float()).float()

    def forward(self, labels: Tensor, x_BLCv_wo_first_l: Tensor | None, end: int | None = None,
                drop_u: Tensor | None = None) -> Tensor:
        """Teacher forcing: logits (B, end, V) for class ids `labels` (B,) and the next-scale inputs of scales
        1..K-1 (B, L - pn0^2, Cvae) (the tokenizer's `scales_to_var_input`). `end` (default L) truncates the
        sequence; with the block-causal mask the logits of the kept positions do not change. drop_u (B, depth, 2):
        uniform draws for stochastic depth while training (None: the global RNG)."""
        end = self.L if end is None else end
        cond_BD = self.class_emb(labels)
        lvl_pos = self.level_positions()
        x = self.first_input(cond_BD, lvl_pos)
        if end > self.first_l:
            x = torch.cat([x, self.scale_input(x_BLCv_wo_first_l[:, : end - self.first_l], self.first_l, lvl_pos)], 1)
        return self.run(x[:, :end], cond_BD, mask=self.attn_mask[:end, :end], drop_u=drop_u)

    # ------------------------------------------------------------------ training

    def teacher_inputs(self, scale_ids: list[Tensor]) -> Tensor:
        """The next-scale inputs (B, L - pn0^2, Cvae) of ground-truth token maps, built by the bound VQVAE."""
        tok = self.tokenizer
        device = next(tok.parameters()).device
        with torch.no_grad():
            x = tok.scales_to_var_input([s.to(device) for s in scale_ids])
        return x.to(self.pos_1LC.device, torch.float32)

    def batch_scale_ids(self, batch: dict[str, Tensor]) -> list[Tensor]:
        try:
            return [batch[f"scale_ids.{k}"] for k in range(self.num_scales)]
        except KeyError as e:
            raise ValueError(f"VAR trains on multi-scale token caches; the batch has no {e.args[0]!r}") from None

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """trainer.py's loss: cross-entropy (label smoothing `label_smooth`) averaged over all L positions of
        every sample; labels replaced by the null class with probability cond_drop_rate while training, and
        stochastic depth (drop_path_rate), each sample's draws from its own seed when the batch carries one.

        `train_scales = (a, b)` (set by apps.train_generator --train-scales) restricts the loss to the positions of
        scales a..b-1, and the forward pass to the positions before scale b (CoDe's specialised fine-tuning). A
        teacher (`set_teacher`) adds CoDe's distillation: alpha KL(teacher || student) T^2 + (1 - alpha) CE."""
        scale_ids = self.batch_scale_ids(batch)
        device = self.pos_1LC.device
        B = scale_ids[0].shape[0]
        null = torch.full((B,), self.null_class, dtype=torch.long, device=device)
        labels = batch.get("labels")
        labels = null if labels is None or self.config.num_classes == 0 else labels.to(device)
        if self.training and self.config.cond_drop_rate > 0:
            drop = per_sample_rand(batch, device=device) < self.config.cond_drop_rate
            labels = torch.where(drop, null, labels)
        drop_u = None
        if self.training and self.config.drop_path_rate > 0:
            drop_u = per_sample_rand(batch, self.config.depth + 1, 2, device=device)[:, 1:]
        a, b = getattr(self, "train_scales", None) or (0, self.num_scales)
        begin, end = self.begin_ends[a][0], self.begin_ends[b - 1][1]
        x = self.teacher_inputs(scale_ids)
        logits = self(labels, x, end=end, drop_u=drop_u)[:, begin:end]
        target = torch.cat([s.flatten(1) for s in scale_ids], 1).to(device)[:, begin:end]
        ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), label_smoothing=self.config.label_smooth)
        metrics = {"ce": float(ce.detach())}
        teacher = self.__dict__.get("_teacher")
        if teacher is None:
            return ce, metrics
        model, temperature, alpha = teacher
        with torch.no_grad():
            t_device = model.pos_1LC.device
            t_logits = model(labels.to(t_device), x.to(t_device), end=end)[:, begin:end].to(device)
        kd = distillation_kl(logits.flatten(0, 1), t_logits.flatten(0, 1), temperature)
        metrics["kd"] = float(kd.detach())
        return alpha * kd + (1 - alpha) * ce, metrics

    def set_train_scales(self, start: int, stop: int) -> None:
        """Train on scales start..stop-1 only (0-based, stop exclusive)."""
        if not 0 <= start < stop <= self.num_scales:
            raise ValueError(f"train scales {start}:{stop} must satisfy 0 <= A < B <= {self.num_scales} "
                             f"(this model has {self.num_scales} scales)")
        self.train_scales = (start, stop)

    def set_teacher(self, teacher: "VAR", temperature: float = 1.0, alpha: float = 0.5) -> None:
        """Distil from `teacher` (kept outside the module tree: neither trained nor saved)."""
        if not isinstance(teacher, VAR):
            raise ValueError(f"the teacher must be a VAR model, got {type(teacher).__name__}")
        if teacher.spec != self.spec or teacher.config.cvae != self.config.cvae:
            raise ValueError(f"the teacher emits {teacher.spec}, the student {self.spec}: they must share a VQVAE")
        if teacher.num_classes != self.num_classes:
            raise ValueError(f"the teacher has {teacher.num_classes} classes, the student {self.num_classes}")
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.__dict__["_teacher"] = (teacher.eval(), float(temperature), float(alpha))


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """CoDe's `distillation_loss` term (utils/losses.py): KL(softmax(t / T) || softmax(s / T)) summed over the
    vocabulary and averaged over rows (KLDivLoss 'batchmean'), times T^2."""
    T = temperature
    log_student = F.log_softmax(student_logits.float() / T, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / T, dim=-1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl * T * T


# ---------------------------------------------------------------------- presets


def _code_width(spec: TokenSpec, tokenizer: str) -> int:
    """The VQVAE's code width (Cvae): from the spec when it carries it, else from the tokenizer itself."""
    if spec.channels:
        return int(spec.channels)
    from vision.hub import resolve_model

    tok = resolve_model(tokenizer, kind="tokenizer")
    cvae = getattr(getattr(tok, "config", None), "z_channels", None)
    if cvae is None:
        raise ValueError(f"cannot tell the code width of tokenizer {tokenizer}")
    return int(cvae)


def _sized(depth: int, width: int, heads: int, **extra):
    def make(spec: TokenSpec, num_classes: int, tokenizer: str) -> VARConfig:
        if spec.kind != "discrete" or not spec.scales or spec.groups != 1:
            raise ValueError(f"VAR needs multi-scale discrete tokens (a VAR VQVAE's token cache), got {spec}")
        return VARConfig(tokenizer=tokenizer, num_classes=num_classes, vocab_size=spec.vocab_size,
                         cvae=_code_width(spec, tokenizer), patch_nums=spec.scales, downsample=spec.downsample,
                         depth=depth, embed_dim=width, num_heads=heads, **extra)
    return make


for _depth in (16, 20, 24, 30):  # the released sizes: width 64 * depth, heads = depth
    register_preset(f"var-d{_depth}", VAR, _sized(_depth, 64 * _depth, _depth, drop_path_rate=0.1 * _depth / 24),
                    f"VAR-d{_depth}: {_depth} blocks, width {64 * _depth}, {_depth} heads (the official size)")
# MNIST (var-vae-mnist tokens: scales 1,2,3,4,6,8, V 512): sized to train in about half an hour on two CPU
# threads (a step of 64 costs ~62 GFLOP for d6, ~13 for d2). The sampling settings a shipped model was measured
# with go into its config.sampling.
register_preset("var-mnist-d6", VAR, _sized(6, 128, 4),
                "VAR for MNIST multi-scale tokens, the CoDe drafter: 6 blocks, width 128, 4 heads")
register_preset("var-mnist-d2", VAR, _sized(2, 96, 3),
                "VAR for MNIST multi-scale tokens, the CoDe refiner: 2 blocks, width 96, 3 heads")
register_preset("var-mnist-d4", VAR, _sized(4, 64, 2),
                "VAR for MNIST multi-scale tokens, a deeper CoDe refiner at var-mnist-d2's cost: 4 blocks, width 64, "
                "2 heads")

"""VAR's sampler, scale by scale on the KV cache (FoundationVision/VAR, `models/var.py`:
`autoregressive_infer_cfg`; `models/helpers.py`: `sample_with_top_k_top_p_`, `gumbel_softmax_with_rng`).

For scale k = 0..K-1, one forward pass of the positions of scale k (scale 0: class embedding + pos_start;
scale k > 0: the VQVAE's next-scale input, the running sum f_hat area-resized to pn_k) attends to everything
cached, and the pn_k^2 logits give the whole token map at once:

* guidance: the batch is [cond; null class] and the logits are `(1 + t) cond - t uncond` with the ramp
  `t = cfg * k / (K - 1)` (0 at the first scale, cfg at the last). So VAR's `cfg` is not LlamaGen's scale:
  cfg 0 is no guidance (then the unconditional half is not run), cfg 1 already guides the last scale;
* filtering: top-k, then top-p in VAR's convention (`generators.sampling.filter_logits(top_p_style="var")`:
  a token stays while the mass ranked above it is < top_p; VAR's own "top_p 0 = off" is top_p 1 here);
* temperature: the filtered logits are divided by it (CoDe's `sample_with_top_k_top_p_(temp=...)` order,
  filter then temperature; official VAR has no temperature, which is temperature 1);
* one categorical draw per position from the given generator (`torch.multinomial`, as the official code, so
  a CPU generator seeded alike gives the official samples);
* `more_smooth` (visualisation only, not used for VAR's FID): the codes are the Gumbel-softmax weights of the
  filtered logits times the codebook (`generators.sampling.var_more_smooth`). The official code draws that
  noise with `exponential_` (a different stream of the same distribution). The token ids are still the
  categorical draws; the smooth sum goes into the returned Tokens' `latents` (f_hat).

Then f_hat += phi_k(bicubic(codes)) and the next input is area(f_hat -> pn_{k+1}) (the tokenizer's
`next_autoregressive_input`). The pieces are public because CoDe (collaborative.py) reuses them: a
`ScaleState` holds one model's caches, f_hat, the next input and what was sampled; `run_scales` advances it by
whole scales; `prefill` fills a fresh cache with the positions of the first scales in one block-causal pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from generators.base import SamplerOption, register_sampler
from generators.sampling import (MIN_TEMPERATURE, cfg_var, filter_logits, sample_categorical, var_cfg_ratio,
                                 var_more_smooth)
from generators.var.model import VAR
from vision.nn import KVCache
from vision.tokens import GenerationStats, Tokens

MORE_SMOOTH = SamplerOption("more_smooth", int, 0, "VAR's more_smooth: Gumbel-softmax codes instead of hard ones "
                            "(visualisation only; decoded from the returned f_hat)", choices=(0, 1))
SCALE_TEMPERATURE = SamplerOption("scale_temperature", str, None, "one temperature per scale, comma-separated, "
                                  "'v*n' repeats v n times (CoDe's ImageNet setting: 1.1*7,1.0*3); empty: "
                                  "--temperature at every scale")


def scale_temperatures(text: str | None, temperature: float, num_scales: int) -> float | list[float]:
    """The --scale-temperature list (e.g. "1.1*7,1.0*3") as one float per scale; empty: `temperature`."""
    if not text or not text.strip():
        return temperature
    out: list[float] = []
    for item in text.split(","):
        value, _, times = item.strip().partition("*")
        try:
            v, n = float(value), int(times) if times else 1
        except ValueError:
            raise ValueError(f"--scale-temperature: expected numbers like 1.1*7,1.0*3, got {text!r}") from None
        if v < 0 or n < 1:
            raise ValueError(f"--scale-temperature: temperatures must be >= 0 and counts >= 1, got {item.strip()!r}")
        out.extend([v] * n)
    if len(out) != num_scales:
        raise ValueError(f"--scale-temperature gives {len(out)} temperatures; the model has {num_scales} scales")
    return out


@dataclass
class ScaleState:
    """Where one model stands in generating a batch: `done` scales sampled so far.

    cond_BD: class embeddings of the passes ([cond; null] when guided); caches: the model's KV caches;
    f_hat: the VQVAE's running sum (B, Cvae, H, W); next_input: the input of scale `done`, (B, pn^2, Cvae), None
    before scale 0; inputs: every next-scale input so far (scales 1..done), what CoDe hands to the refiner;
    scale_ids: the sampled (B, pn, pn) maps.
    """

    labels: Tensor
    guided: bool
    cond_BD: Tensor
    caches: list[KVCache]
    f_hat: Tensor | None = None
    next_input: Tensor | None = None
    inputs: list[Tensor] = field(default_factory=list)
    scale_ids: list[Tensor] = field(default_factory=list)
    done: int = 0

    @property
    def batch_size(self) -> int:
        return self.labels.shape[0]


def sampling_labels(model: VAR, labels: Tensor | None, batch_size: int, generator: torch.Generator) -> Tensor:
    """The class ids to sample: the given ones; None: uniformly random classes drawn from the generator (the
    official `label_B=None`), or the null class for a model without classes."""
    device = model.class_emb.weight.device
    if labels is not None:
        return labels.to(device)
    if model.num_classes == 0:
        return torch.full((batch_size,), model.null_class, dtype=torch.long, device=device)
    uniform = torch.full((1, model.num_classes), 1.0 / model.num_classes, device=device)
    return torch.multinomial(uniform, batch_size, replacement=True, generator=generator).reshape(batch_size)


def new_state(model: VAR, labels: Tensor, cfg: float, scales: int | None = None) -> ScaleState:
    """A fresh state for `labels` (B,): guided (batch [cond; null]) when cfg != 0 and the labels are not all null;
    its caches sized for the first `scales` scales (default: all; CoDe's drafter needs only its own)."""
    guided = cfg != 0 and bool((labels != model.null_class).any())
    ids = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels
    return ScaleState(labels=labels, guided=guided, cond_BD=model.class_emb(ids), caches=model.new_caches(scales))


def per_scale(value, k: int):
    """A per-scale option: a scalar for every scale, or a sequence with one entry per scale."""
    return value[k] if isinstance(value, (list, tuple)) else value


def guided_logits(logits: Tensor, state: ScaleState, k: int, num_scales: int, cfg: float) -> Tensor:
    """(B or 2B, l, V) -> (B, l, V): VAR's ramped guidance (1 + t) cond - t uncond, t = cfg k / (K - 1)."""
    if not state.guided:
        return logits
    cond, uncond = logits.chunk(2, dim=0)
    return cfg_var(cond, uncond, var_cfg_ratio(cfg, k, num_scales))


def sample_scale(model: VAR, state: ScaleState, k: int, logits: Tensor, *, generator: torch.Generator, cfg: float,
                 temperature, top_k, top_p: float, more_smooth: bool = False) -> None:
    """Sample scale k from its logits (B or 2B, pn^2, V) and advance the state (f_hat, next input, ids)."""
    K, B, pn = model.num_scales, state.batch_size, model.patch_nums[k]
    logits = guided_logits(logits, state, k, K, cfg)
    filtered = filter_logits(logits, top_k=per_scale(top_k, k), top_p=top_p, top_p_style="var")
    temp = max(float(per_scale(temperature, k)), MIN_TEMPERATURE)
    probs = (filtered / temp if temp != 1.0 else filtered).softmax(dim=-1)
    ids = sample_categorical(probs, generator)[..., 0]  # (B, pn^2)
    tok = model.tokenizer
    if more_smooth:
        codebook = tok.embed_ids(torch.arange(model.config.vocab_size, device=ids.device).view(-1, 1, 1))
        weights = var_more_smooth(filtered, k, K, generator)  # (B, l, V)
        h = (weights @ codebook.flatten(1).to(weights.dtype)).transpose(1, 2).reshape(B, -1, pn, pn)
    else:
        h = tok.embed_ids(ids.view(B, pn, pn))
    f_hat, nxt = tok.next_autoregressive_input(k, state.f_hat, h)
    state.f_hat = f_hat
    state.scale_ids.append(ids.view(B, pn, pn))
    state.done = k + 1
    if k + 1 < K:
        state.next_input = nxt.flatten(2).transpose(1, 2)  # (B, pn_{k+1}^2, Cvae)
        state.inputs.append(state.next_input)
    else:
        state.next_input = None


def step_input(model: VAR, state: ScaleState, k: int, lvl_pos: Tensor) -> Tensor:
    """The embedded positions of scale k for the next pass: (B or 2B, pn_k^2, C)."""
    if k == 0:
        return model.first_input(state.cond_BD, lvl_pos)
    x = model.scale_input(state.next_input, model.begin_ends[k][0], lvl_pos)
    return x.repeat(2, 1, 1) if state.guided else x


def run_scales(model: VAR, state: ScaleState, stop: int, *, generator: torch.Generator, stats: GenerationStats,
               count: str = "nfe", cfg: float, temperature, top_k, top_p: float, more_smooth: bool = False) -> None:
    """Sample scales state.done..stop-1, one cached forward pass each (counted in `stats.<count>`)."""
    lvl_pos = model.level_positions()
    for k in range(state.done, stop):
        logits = model.run(step_input(model, state, k, lvl_pos), state.cond_BD, caches=state.caches)
        setattr(stats, count, getattr(stats, count) + 1)
        sample_scale(model, state, k, logits, generator=generator, cfg=cfg, temperature=temperature, top_k=top_k,
                     top_p=top_p, more_smooth=more_smooth)


def prefill(model: VAR, state: ScaleState, inputs: Sequence[Tensor]) -> Tensor:
    """One block-causal pass over scales 0..n (n = len(inputs)): scale 0 from the class embedding, scales
    1..n from the given next-scale inputs (each (B, pn_k^2, Cvae)). Fills the state's (empty) caches with all
    those positions, exactly as n + 1 cached steps would, and returns the logits of scale n (B or 2B, pn_n^2, V).
    """
    if any(len(c) for c in state.caches):
        raise ValueError("prefill needs empty caches")
    lvl_pos = model.level_positions()
    parts = [model.first_input(state.cond_BD, lvl_pos)]
    if inputs:
        x = model.scale_input(torch.cat(list(inputs), 1), model.first_l, lvl_pos)
        parts.append(x.repeat(2, 1, 1) if state.guided else x)
    x = torch.cat(parts, 1)
    n = len(inputs)
    end = model.begin_ends[n][1]
    if x.shape[1] != end:
        raise ValueError(f"inputs of scales 1..{n} should hold {end - model.first_l} positions, "
                         f"got {x.shape[1] - model.first_l}")
    begin = model.begin_ends[n][0]
    return model.run(x, state.cond_BD, mask=model.attn_mask[:end, :end], caches=state.caches, last=end - begin)


def finish(model: VAR, state: ScaleState, more_smooth: bool) -> Tokens:
    latents = state.f_hat if more_smooth else None
    return Tokens(model.spec, scale_ids=state.scale_ids, latents=latents)


@register_sampler(VAR, "plain", options=(SCALE_TEMPERATURE, MORE_SMOOTH),
                  help="one forward pass per scale (VAR's autoregressive_infer_cfg)")
def sample_plain(model: VAR, labels: Tensor | None, *, generator: torch.Generator, stats: GenerationStats,
                 batch_size: int, cfg: float, temperature: float, top_k: int, top_p: float,
                 scale_temperature: str | None = None, more_smooth: int = 0) -> Tokens:
    temps = scale_temperatures(scale_temperature, temperature, model.num_scales)
    state = new_state(model, sampling_labels(model, labels, batch_size, generator), cfg)
    run_scales(model, state, model.num_scales, generator=generator, stats=stats, cfg=cfg, temperature=temps,
               top_k=top_k, top_p=top_p, more_smooth=bool(more_smooth))
    return finish(model, state, bool(more_smooth))

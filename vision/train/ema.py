"""Exponential moving average of a model's parameters (buffers are copied)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from vision.errors import ConfigError


class EMA:
    """`warmup`: the decay of update n is min(decay, (1 + n) / (10 + n)), as CompVis latent diffusion's `LitEma`,
    so the average forgets the initial weights quickly; without it a short run's average keeps
    decay^steps of them (8 % after 2500 steps at 0.999)."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = False):
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        self.updates += 1
        ema_params = dict(self.model.named_parameters())
        for name, p in model.named_parameters():
            ema_params[name].lerp_(p.detach(), 1.0 - decay)
        ema_buffers = dict(self.model.named_buffers())
        for name, b in model.named_buffers():
            ema_buffers[name].copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.warmup, self.updates = state.get("warmup", False), state.get("updates", 0)  # older checkpoints: none
        self.model.load_state_dict(state["model"])

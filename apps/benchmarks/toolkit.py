"""Overhead of the training toolkit (checkpoint-free steps) against a hand-written loop, same work."""
from __future__ import annotations

import tempfile
import time

import torch
from torch import nn
from torch.utils.data import TensorDataset

from apps.benchmarks import benchmark


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))


@benchmark("toolkit", "vision.train.Trainer step time vs a plain PyTorch loop on the same MLP and data")
def run(quick: bool) -> dict[str, float]:
    from vision.train import Phase, TrainConfig, Trainer

    steps, batch = (30, 64) if quick else (200, 64)
    data = TensorDataset(torch.randn(steps * batch, 256))

    model = _model()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    t0 = time.perf_counter()
    for i in range(steps):
        (x,) = data[i * batch:(i + 1) * batch]
        opt.zero_grad(set_to_none=True)
        ((model(x) - x) ** 2).mean().backward()
        opt.step()
    plain = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(out_dir=out, max_steps=steps, batch_size=batch, checkpoint_every=10**9, log_every=10,
                          quiet=True)
        trainer = Trainer(cfg, data)
        model = _model()
        models = trainer.prepare({"m": model}, {"opt": torch.optim.Adam(model.parameters(), 1e-3)})
        loss = lambda b, step: (((models["m"](b[0]) - b[0]) ** 2).mean(), {})  # noqa: E731
        t0 = time.perf_counter()
        trainer.fit([Phase("ae", "opt", loss)])
        toolkit = time.perf_counter() - t0  # includes the one final checkpoint and plot
    return {"plain_step_ms": 1000 * plain / steps, "toolkit_step_ms": 1000 * toolkit / steps,
            "overhead_ratio": toolkit / plain}

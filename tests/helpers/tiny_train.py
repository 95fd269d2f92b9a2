"""A tiny regression run through vision.train, driven by the toolkit tests (plain, torchrun, killed)."""
import argparse
import os
import signal

import torch
from torch import nn
from torch.utils.data import Dataset

from vision.cli import run
from vision.train import Phase, TrainConfig, Trainer


class Toy(Dataset):
    def __init__(self, n=48):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.randn(8, 1, generator=g) + 0.1

    def __len__(self):
        return len(self.x)

    def sample(self, index, generator):  # per-sample augmentation through the sample's own generator
        return self.x[index] + 0.05 * torch.randn(8, generator=generator), self.y[index]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--noise", action="store_true", help="draw from the global RNG inside the loss")
    p.add_argument("--kill-at-step", type=int, default=-1)
    p.add_argument("--kill-in-save", type=int, default=-1, help="SIGKILL halfway through the N-th checkpoint write")
    p.add_argument("--nan-at-step", type=int, default=-1)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    if a.kill_in_save > 0:
        real_save, calls = torch.save, [0]

        def torn_save(obj, f, *args, **kw):
            calls[0] += 1
            if calls[0] == a.kill_in_save:
                f.write(b"\x80\x02partial checkpoint bytes")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kw)

        torch.save = torn_save
    cfg = TrainConfig(out_dir=a.out, max_steps=a.steps, batch_size=a.batch, grad_accum=a.accum, seed=7,
                      ema_decay=0.9, checkpoint_every=a.every, log_every=1, resume=a.resume, quiet=True)
    trainer = Trainer(cfg, Toy())
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    models = trainer.prepare({"model": model}, {"opt": opt}, {"opt": sched})

    def loss_fn(batch, step):
        if step == a.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = batch
        pred = models["model"](x)
        if a.noise:
            pred = pred + 0.01 * torch.randn_like(pred)
        loss = ((pred - y) ** 2).mean()
        if step == a.nan_at_step:
            loss = loss * float("nan")
        return loss, {}

    trainer.fit([Phase("main", "opt", loss_fn, models=("model",))])
    if trainer.dist.is_main:
        torch.save({"model": model.state_dict(), "ema": trainer.ema.model.state_dict()}, os.path.join(a.out, "final.pt"))


if __name__ == "__main__":  # as an app runs: a torchrun rank leaves the way vision.cli.run makes it
    run(main)

"""BatchNorm whose training statistics are those of the global batch under torch.distributed.

A PatchGAN discriminator normalises with batch statistics, so under DDP every process would
otherwise normalise its own slice of the batch and train a different discriminator from the
single-process run. `torch.nn.SyncBatchNorm` fixes that on GPUs only; `GlobalBatchNorm` does the
same with `torch.distributed.nn` all-reduces, which work on every backend (gloo on CPU too).

Forward: mean and variance over all processes' samples (two passes: the global mean, then the
global sum of squared deviations); running statistics updated as `nn.BatchNorm*` would on the
concatenated batch (unbiased variance). Backward: the all-reduces are differentiable and sum their
gradients across processes, so after DDP averages the parameter gradients each one equals the
single-process gradient of the mean loss.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from vision.nn.distributed import all_reduce_sum, world_size


class GlobalBatchNorm(_BatchNorm):
    """Drop-in for `nn.BatchNorm1d/2d/3d` (same parameters and buffers, same state_dict keys)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = all_reduce_sum(x.new_tensor([x.numel() // x.shape[1]], dtype=torch.float64))[0]
        mean = all_reduce_sum(x.sum(dims, dtype=torch.float64)) / count
        var = all_reduce_sum(((x - mean.to(x.dtype).view(shape)) ** 2).sum(dims, dtype=torch.float64)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * count / (count - 1) if count > 1 else var
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        out = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype).view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm in `module` (in place; the same Parameter objects, so optimizers that
    already hold them stay valid): `torch.nn.SyncBatchNorm` for CUDA modules, `GlobalBatchNorm`
    otherwise. Returns the module (a new one only if `module` itself is a BatchNorm)."""
    if isinstance(module, (nn.SyncBatchNorm, GlobalBatchNorm)):
        return module
    if isinstance(module, _BatchNorm):
        on_cuda = any(t.is_cuda for t in [*module.parameters(), *module.buffers()])
        cls = nn.SyncBatchNorm if on_cuda else GlobalBatchNorm
        new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module

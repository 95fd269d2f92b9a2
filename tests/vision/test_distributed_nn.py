"""vision.nn under a 2-process gloo world == one process on the whole batch (values and gradients)."""
import torch
from torch import nn

from tests.helpers.two_processes import run_two_processes
from vision.nn import GlobalBatchNorm, convert_sync_batchnorm, global_mean


def _batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 5, 3, generator=g) * 3 + 1.5
    target = torch.randn(6, 4, 5, 3, generator=g)
    return x, target


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=0.3))
    nn.init.normal_(model[1].weight, 1.0, 0.5)
    nn.init.normal_(model[1].bias, 0.0, 0.5)
    return model


def _step(model, x, target):
    x = x.clone().requires_grad_(True)
    out = model(x)
    ((out - target) ** 2).mean().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


def _bn_rank(rank, world):
    x, target = _batch()
    sl = slice(rank * 3, rank * 3 + 3)  # each process its half of the batch
    model = convert_sync_batchnorm(_model())
    assert isinstance(model[1], GlobalBatchNorm)
    out, x_grad, grads = _step(model, x[sl], target[sl])
    for g in grads.values():  # what DDP does to parameter gradients
        torch.distributed.all_reduce(g)
        g /= world
    return out, x_grad, grads, {k: v.clone() for k, v in model.state_dict().items()}


def test_global_batchnorm_equals_batchnorm_on_the_whole_batch(tmp_path):
    x, target = _batch()
    model = _model()
    out, x_grad, grads = _step(model, x, target)
    ranks = run_two_processes(tmp_path, _bn_rank)
    torch.testing.assert_close(torch.cat([r[0] for r in ranks]), out, rtol=0, atol=1e-5)
    # each process's input gradient carries every process's loss: 2x the gradient of the mean loss
    torch.testing.assert_close(torch.cat([r[1] for r in ranks]), 2 * x_grad, rtol=0, atol=1e-6)
    for rank in ranks:
        for name, g in grads.items():
            torch.testing.assert_close(rank[2][name], g, rtol=0, atol=1e-5)
        for key, value in model.state_dict().items():  # running mean / unbiased var / count
            torch.testing.assert_close(rank[3][key], value, rtol=0, atol=1e-5)
    # and plain per-process BatchNorm would not have matched
    local = _model()
    local_out = torch.cat([local(x[:3]), local(x[3:])]).detach()
    assert (local_out - out).abs().max() > 1e-2


def _mean_rank(rank, world):
    t = torch.arange(12.0).view(6, 2)[rank * 2: rank * 2 + 2 + rank * 2].requires_grad_(True)  # 2 and 4 rows
    m = global_mean(t)
    (m ** 2).sum().backward()
    return m.detach(), t.grad


def test_global_mean_over_uneven_slices_and_its_gradient(tmp_path):
    t = torch.arange(12.0).view(6, 2).requires_grad_(True)
    m = t.mean(0)
    (m ** 2).sum().backward()
    ranks = run_two_processes(tmp_path, _mean_rank)
    for r in ranks:
        torch.testing.assert_close(r[0], m.detach())
    # the all-reduce's backward sums both processes' (identical) losses: 2x the single gradient
    torch.testing.assert_close(torch.cat([r[1] for r in ranks]), 2 * t.grad)

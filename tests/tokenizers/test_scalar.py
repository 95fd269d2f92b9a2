"""QLAE's scalar (latent) quantizer."""
import pytest
import torch

from tokenizers.quantizers import ScalarQuantizer


def test_initial_values_nearest_value_and_round_trip():
    sq = ScalarQuantizer(3, 5)
    assert torch.equal(sq.values.detach(), torch.linspace(-0.5, 0.5, 5).expand(3, 5))
    z = torch.tensor([[0.26, -0.9, 0.1], [0.0, 0.49, -0.13]])
    out = sq(z)
    assert out.ids.tolist() == [[3, 0, 2], [2, 4, 1]]
    assert out.quantized.tolist() == [[0.25, -0.5, 0.0], [0.0, 0.5, -0.25]]
    assert torch.equal(sq.ids_to_latents(out.ids), out.quantized)


def test_losses_gradients_and_weights():
    sq = ScalarQuantizer(2, 3)
    z = torch.tensor([[0.3, -0.2]], requires_grad=True)
    out = sq(z)
    zq = torch.tensor([[0.5, 0.0]])
    assert out.losses["quantization"].item() == pytest.approx(0.01 * ((z.detach() - zq) ** 2).mean().item())
    assert out.losses["commitment"].item() == pytest.approx(0.01 * ((z.detach() - zq) ** 2).mean().item())
    # straight-through: the decoder's gradient reaches z, not the values
    w = torch.tensor([[2.0, -3.0]])
    (out.quantized * w).sum().backward(retain_graph=True)
    assert torch.equal(z.grad, w) and sq.values.grad is None
    z.grad = None
    out.losses["quantization"].backward(retain_graph=True)  # moves the values only
    assert z.grad is None
    expected = torch.zeros(2, 3)
    expected[0, 2] = 0.01 * 2 * (0.5 - 0.3) / 2
    expected[1, 1] = 0.01 * 2 * (0.0 + 0.2) / 2
    torch.testing.assert_close(sq.values.grad, expected)
    sq.values.grad = None
    out.losses["commitment"].backward()  # moves the encoder only
    assert sq.values.grad is None
    torch.testing.assert_close(z.grad, 0.01 * 2 * (z.detach() - zq) / 2)


def test_ids_stay_consistent_after_the_values_move():
    torch.manual_seed(0)
    sq = ScalarQuantizer(4, 10)
    z = torch.randn(256, 4) * 0.4 + 0.1
    opt = torch.optim.SGD(sq.parameters(), lr=50.0)
    before = sq.values.detach().clone()
    out = sq(z)
    out.loss.backward()
    opt.step()
    moved = sq.values.detach()
    assert (moved - before).abs().max() > 1e-2
    # no longer the evenly spaced grid, so a grid-based inverse (LatentQuantize) would be wrong
    assert not torch.allclose(moved[:, 1:] - moved[:, :-1], torch.full((4, 9), 1 / 9), atol=1e-3)
    out = sq(z)
    assert torch.equal(sq.ids_to_latents(out.ids), out.quantized)
    assert torch.equal(out.quantized, torch.gather(moved, 1, out.ids.T).T)
    # every value is still the nearest to what it quantized
    assert torch.equal(out.ids, (z.unsqueeze(-1) - moved).abs().argmin(-1))


def test_mixed_value_counts_and_spatial_layout():
    sq = ScalarQuantizer(2, [3, 5])
    z = torch.tensor([0.45, 0.45]).view(1, 2, 1, 1).expand(2, 2, 3, 3)
    out = sq(z)
    assert out.ids.shape == (2, 2, 3, 3)
    assert (out.ids[:, 0] == 2).all() and (out.ids[:, 1] == 4).all()  # padding never chosen
    assert torch.equal(sq.ids_to_latents(out.ids), out.quantized)
